"""Ranks that are threads of one process: buffers are plain tensors, pointers are shared directly.

Each rank allocates its buffer with torch and the allgather passes the tensor
objects themselves, so every rank holds a reference to every buffer: memory
lives on until the last rank drops its reference, so closing never frees what a
peer still uses, whether or not the peers come to the close.
"""

from __future__ import annotations

import torch

from ..comm import CommBackend
from . import SymmetricBuffer


class InProcessBuffer(SymmetricBuffer):
    def __init__(self, comm: CommBackend, nbytes: int, device: torch.device):
        super().__init__(comm, nbytes, device)
        self.local = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self._all = comm.allgather(self.local)
        self.peer_ptrs = [t.data_ptr() for t in self._all]

    def _free(self, timeout_s: float) -> bool:
        del self._all, self.local
        return True

    def _abandon(self) -> None:
        self._free(0.0)  # the peers' references keep the memory alive for them
