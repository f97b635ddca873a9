"""The `mnnvl` backend: the same Triton kernels over CUDA virtual memory (cuMem).

Memory comes from `memory.cumem.CuMemBuffer`: FABRIC handles where every rank's
GPU supports them (NVLink domains spanning nodes), POSIX file descriptors within
a node, direct mappings between ranks that are threads of one process. No NVLink
multicast, so it runs on every NVLink system.

Sizing follows flashinfer's MNNVL workspace: two-shot at every size up to
max_token_num * hidden_dim, one-shot up to the heuristic threshold, unless
`force_oneshot_support=True` sizes one-shot for every size too. One-shot is then
allowed for every call the allocated rotations hold (often more than the
threshold); forcing it beyond that is a ValueError (`is_buffer_size_sufficient`
answers per strategy, `use_oneshot=` or FlashInfer's `strategy=` enum).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import heuristics, sizing
from ..comm import CommBackend
from ..memory import default_comm
from ..memory.cumem import CuMemBuffer
from ..topology import Request
from ..workspace import MNNVLAllreduceFusionStrategy
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

    @property
    def buffer_size_bytes(self) -> int:
        """Bytes of one Lamport buffer (one of the three rotations, less its signature
        header), as FlashInfer's: what get_required_buffer_size_bytes compares with."""
        return (self.buf_stride - sizing.header_elements(self.world_size)) \
            * self.dtype.itemsize

    @staticmethod
    def get_required_buffer_size_bytes(
        tp_size: int, num_tokens: int, hidden_dim: int, dtype: torch.dtype,
        strategy: MNNVLAllreduceFusionStrategy | bool | None = MNNVLAllreduceFusionStrategy.AUTO,
    ) -> int:
        """Bytes of one Lamport buffer a call of num_tokens x hidden_dim needs with
        `strategy` (AUTO: the one the heuristic picks; a bool means use_oneshot).
        One-shot: T*H*N*element size, as FlashInfer; two-shot: N scatter slots and
        N gather slots of ceil(T*H/N) elements each, rounded up to 16."""
        if isinstance(strategy, MNNVLAllreduceFusionStrategy):
            strategy = strategy.use_oneshot
        elems = num_tokens * hidden_dim
        if strategy is None:
            strategy = heuristics.choose_oneshot(tp_size, elems, dtype)
        if strategy:
            return elems * tp_size * dtype.itemsize
        return 2 * tp_size * sizing.chunk_elements(elems, tp_size) * dtype.itemsize
