"""Ranks that are threads of one process: buffers are plain tensors, pointers are shared directly.

Each rank allocates its buffer with torch and the allgather passes the tensor
objects themselves, so every rank holds a reference to every buffer: memory
lives on until the last rank drops its reference, so closing never frees what a
peer still uses, whether or not the peers come to the close.
"""

from __future__ import annotations

import torch

from ..comm import BoundedSteps
from . import SymmetricBuffer


class InProcessBuffer(SymmetricBuffer):
    def __init__(self, setup: BoundedSteps, nbytes: int, device: torch.device):
        super().__init__(setup, nbytes, device)
        self.local = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self._all = setup.allgather(self.local, "buffer exchange")
        self.peer_ptrs = [t.data_ptr() for t in self._all]

    def _free(self, timeout_s: float) -> bool:
        del self._all, self.local
        return True

    def abandon(self) -> None:
        self._free(0.0)  # the peers' references keep the memory alive for them
