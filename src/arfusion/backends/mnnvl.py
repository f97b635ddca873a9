"""The `mnnvl` backend: the same Triton kernels over CUDA virtual memory (cuMem).

Memory comes from `memory.cumem.CuMemBuffer`: FABRIC handles where every rank's
GPU supports them (NVLink domains spanning nodes), POSIX file descriptors within
a node, direct mappings between ranks that are threads of one process. No NVLink
multicast, so it runs on every NVLink system.

Sizing follows flashinfer's MNNVL workspace: two-shot at every size up to
max_token_num * hidden_dim, one-shot only up to the heuristic threshold, unless
`force_oneshot_support=True` sizes one-shot for every size too. Forcing one-shot
beyond what the workspace holds is a ValueError (`is_buffer_size_sufficient`
answers per strategy).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import heuristics, sizing
from ..comm import CommBackend
from ..memory import default_comm
from ..memory.cumem import CuMemBuffer
from ..topology import Request
from .symmetric import SymmetricWorkspace


class MNNVLAllReduceFusionWorkspace(SymmetricWorkspace):
    backend = "mnnvl"

    def __init__(
        self,
        world_size: int,
        rank: int,
        max_token_num: int,
        hidden_dim: int,
        dtype: torch.dtype = torch.bfloat16,
        comm_backend: CommBackend | None = None,
        force_oneshot_support: bool = False,
        group: Any = None,
        timeout_s: float | None = None,
    ):
        device = torch.device("cuda", torch.cuda.current_device())
        comm = default_comm(world_size, comm_backend, group)
        self.force_oneshot_support = force_oneshot_support
        super().__init__(
            world_size, rank, max_token_num, hidden_dim, dtype, device,
            oneshot_elements=self.oneshot_capacity(
                world_size, max_token_num * hidden_dim, dtype, force_oneshot_support),
            buffer_factory=lambda nbytes: CuMemBuffer(comm, nbytes, device),
            timeout_s=timeout_s,
        )

    @classmethod
    def create(cls, req: Request) -> MNNVLAllReduceFusionWorkspace:
        return cls(req.world_size, req.rank, req.max_token_num, req.hidden_dim, req.dtype,
                   comm_backend=req.comm_backend,
                   force_oneshot_support=req.force_oneshot_support, group=req.group)

    @staticmethod
    def oneshot_capacity(world_size: int, num_elements: int, dtype: torch.dtype,
                         force_oneshot_support: bool) -> int:
        """Largest call (elements per rank) the one-shot part of the buffer holds."""
        if force_oneshot_support:
            return num_elements
        return min(num_elements, heuristics.oneshot_max_elements(world_size, dtype))

    @classmethod
    def get_required_buffer_size_bytes(cls, tp_size: int, num_tokens: int, hidden_dim: int,
                                       dtype: torch.dtype, use_oneshot: bool | None = None
                                       ) -> int:
        """Symmetric memory per rank for calls up to num_tokens x hidden_dim:
        `use_oneshot=True` sizes one-shot for every size (force_oneshot_support);
        False or None, two-shot for every size and one-shot up to the threshold."""
        elems = num_tokens * hidden_dim
        return sizing.buffer_bytes(
            tp_size, elems, cls.oneshot_capacity(tp_size, elems, dtype, bool(use_oneshot)),
            dtype)
