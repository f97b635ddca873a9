"""PyTorch symmetric memory: `torch.distributed._symmetric_memory` over a process group.

One GPU per rank (it refuses two ranks on one GPU). Multicast is never used:
only `buffer_ptrs`, the peers' buffers mapped for ordinary loads and stores.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..comm import BoundedSteps
from . import SymmetricBuffer


class TorchSymmBuffer(SymmetricBuffer):
    def __init__(self, setup: BoundedSteps, nbytes: int, device: torch.device, group: Any):
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        super().__init__(setup, nbytes, device)
        group = group if group is not None else dist.group.WORLD
        self.local = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        # Bounded: rendezvous itself is not, so every rank must have allocated first.
        setup.barrier("allocation")
        self._handle = symm_mem.rendezvous(self.local, group)
        self.peer_ptrs = [int(p) for p in self._handle.buffer_ptrs]

    def _free(self, timeout_s: float) -> bool:
        del self._handle, self.local
        return True
