"""CUDA IPC: cudaMalloc'd buffers whose handles travel through `comm_backend.allgather`.

Works between processes on different GPUs of a node and between processes that
share one GPU. Each rank opens every peer's handle once
(`cudaIpcOpenMemHandle`); close unmaps the peers' buffers before freeing its own.
"""

from __future__ import annotations

import torch

from ..comm import CommBackend
from . import SymmetricBuffer, check, wrap_pointer


class CudaIpcBuffer(SymmetricBuffer):
    def __init__(self, comm: CommBackend, nbytes: int, device: torch.device):
        from cuda.bindings import runtime as rt

        super().__init__(comm, nbytes, device)
        with torch.cuda.device(device):
            self._ptr = int(check(rt.cudaMalloc(nbytes)))
            handle = check(rt.cudaIpcGetMemHandle(self._ptr))
        self.local = wrap_pointer(self._ptr, nbytes, device)
        handles = comm.allgather(bytes(handle.reserved))
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

    def _free(self) -> None:
        from cuda.bindings import runtime as rt

        with torch.cuda.device(self.device):
            for ptr in self._opened:
                check(rt.cudaIpcCloseMemHandle(ptr))
            self._opened.clear()
            self.comm.barrier()  # every peer has unmapped our buffer
            del self.local
            check(rt.cudaFree(self._ptr))
