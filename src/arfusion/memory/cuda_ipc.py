"""CUDA IPC: cudaMalloc'd buffers whose handles travel through `comm_backend.allgather`.

Works between processes on different GPUs of a node and between processes that
share one GPU. Each rank opens every peer's handle once
(`cudaIpcOpenMemHandle`); close unmaps the peers' buffers, meets them again
(bounded) so that every peer has unmapped ours, and only then frees its own. A
peer that misses either meeting may still map our buffer: it is then kept.
"""

from __future__ import annotations

import torch

from ..comm import BoundedSteps, bounded
from . import ABANDONED, SymmetricBuffer, check, wrap_pointer


class CudaIpcBuffer(SymmetricBuffer):
    def __init__(self, setup: BoundedSteps, nbytes: int, device: torch.device):
        from cuda.bindings import runtime as rt

        super().__init__(setup, nbytes, device)
        with torch.cuda.device(device):
            self._ptr = int(check(rt.cudaMalloc(nbytes)))
            handle = check(rt.cudaIpcGetMemHandle(self._ptr))
        self.local = wrap_pointer(self._ptr, nbytes, device)
        try:
            handles = setup.allgather(bytes(handle.reserved), "handle exchange")
        except RuntimeError:
            self.abandon()  # a peer may have our handle: keep the buffer
            raise
        self._opened: list[int] = []
        self.peer_ptrs = []
        with torch.cuda.device(device):
            for r, raw in enumerate(handles):
                if r == self.rank:
                    self.peer_ptrs.append(self._ptr)
                    continue
                h = rt.cudaIpcMemHandle_t()
                h.reserved = raw
                flags = rt.cudaIpcMemLazyEnablePeerAccess
                ptr = int(check(rt.cudaIpcOpenMemHandle(h, flags)))
                self._opened.append(ptr)
                self.peer_ptrs.append(ptr)

    def _unmap_peers(self) -> None:
        from cuda.bindings import runtime as rt

        with torch.cuda.device(self.device):
            for ptr in self._opened:
                check(rt.cudaIpcCloseMemHandle(ptr))
        self._opened.clear()

    def _free(self, timeout_s: float) -> bool:
        from cuda.bindings import runtime as rt

        self._unmap_peers()
        if not bounded(self.comm.barrier, timeout_s):  # every peer unmapped our buffer?
            ABANDONED.append(self)
            return False
        del self.local
        with torch.cuda.device(self.device):
            check(rt.cudaFree(self._ptr))
        return True

    def _abandon(self) -> None:
        self._unmap_peers()
        ABANDONED.append(self)
