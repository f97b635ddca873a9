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
from ..comm import CommBackend, default_comm
from ..memory.cumem import CuMemBuffer
from ..topology import Request, make_request, meet
from ..workspace import MNNVLAllreduceFusionStrategy, default_timeout_s
from .symmetric import SymmetricWorkspace


class MNNVLAllReduceFusionWorkspace(SymmetricWorkspace):
    """Two constructors: arfusion's `(world_size, rank, max_token_num, hidden_dim, ...)`
    below, and FlashInfer's `(mapping, max_num_tokens=None, hidden_dim=None,
    dtype=None, buffer_size_in_bytes=None, comm_backend=None)`, taken when the first
    argument is a mapping (any object with `tp_size`/`tp_rank` or `world_size`/`rank`,
    such as `flashinfer.comm.mapping.Mapping`): see `from_mapping_arguments`."""

    backend = "mnnvl"

    def __init__(self, *args: Any, **kwargs: Any):
        first = args[0] if args else kwargs.get("mapping")
        if first is not None and not isinstance(first, int) and "world_size" not in kwargs:
            native = from_mapping_arguments(*args, **kwargs)
            # Clients that construct it directly (vLLM) meet as create_allreduce_fusion_
            # workspace's callers do: bounded, duplicate ranks and mismatches named.
            comm = native["comm_backend"] = default_comm(native["world_size"],
                                                         native["comm_backend"], None)
            if comm.Get_size() > 1:
                meet(comm, None, default_timeout_s(), backend=self.backend,
                     **{k: v for k, v in native.items() if k != "comm_backend"})
            self._create(**native)
        else:
            self._create(*args, **kwargs)

    def _create(
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
        oneshot_elements: int | None = None,
    ):
        """`oneshot_elements`: the one-shot capacity FlashInfer's buffer_size_in_bytes
        holds (None: as force_oneshot_support says)."""
        device = torch.device("cuda", torch.cuda.current_device())
        comm = default_comm(world_size, comm_backend, group)
        self.force_oneshot_support = force_oneshot_support
        if oneshot_elements is None:
            oneshot_elements = self.oneshot_capacity(
                world_size, max_token_num * hidden_dim, dtype, force_oneshot_support)
        super().__init__(
            world_size, rank, max_token_num, hidden_dim, dtype, device,
            oneshot_elements=oneshot_elements,
            comm=comm,
            buffer_factory=lambda nbytes, setup: CuMemBuffer(setup, nbytes, device),
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


def from_mapping_arguments(
    mapping: Any,
    max_num_tokens: int | None = None,
    hidden_dim: int | None = None,
    dtype: torch.dtype | None = None,
    buffer_size_in_bytes: int | None = None,
    comm_backend: CommBackend | None = None,
) -> dict[str, Any]:
    """FlashInfer's constructor arguments as arfusion's. Either max_num_tokens,
    hidden_dim and dtype, or buffer_size_in_bytes (bytes of one Lamport buffer, as
    `get_required_buffer_size_bytes` gives), or both. With the bytes, as FlashInfer's
    workspace: two-shot calls of max_num_tokens * hidden_dim or of what the bytes hold,
    whichever is more, and one-shot calls of what the bytes hold (its one-shot
    override). Without hidden_dim the capacity counts elements (hidden_dim 1); without
    dtype it is bfloat16, and calls must use a dtype of its element size."""
    world_size = getattr(mapping, "tp_size", None) or getattr(mapping, "world_size", None)
    rank = getattr(mapping, "tp_rank", None)
    rank = getattr(mapping, "rank", None) if rank is None else rank
    if not isinstance(world_size, int) or not isinstance(rank, int):
        raise TypeError("mapping must have int tp_size and tp_rank (or world_size and rank), "
                        f"got {type(mapping).__name__}")
    sized = (max_num_tokens, hidden_dim, dtype)
    if buffer_size_in_bytes is None and None in sized:
        raise ValueError("max_num_tokens, hidden_dim and dtype must be provided if "
                         "buffer_size_in_bytes is not provided")
    dtype = torch.bfloat16 if dtype is None else dtype
    elements = max_num_tokens * hidden_dim if None not in sized else 0
    oneshot = None
    if buffer_size_in_bytes is not None:
        if isinstance(buffer_size_in_bytes, bool) or not isinstance(buffer_size_in_bytes, int) \
                or buffer_size_in_bytes < 1:
            raise ValueError(f"buffer_size_in_bytes must be a positive int, got "
                             f"{buffer_size_in_bytes!r}")
        held = buffer_size_in_bytes // getattr(dtype, "itemsize", 1)
        elements = max(elements, held // (2 * world_size) // 16 * 16 * world_size)
        if elements < 1:
            raise ValueError(f"buffer_size_in_bytes={buffer_size_in_bytes} holds no call of "
                             f"{dtype} at world size {world_size}")
        oneshot = min(elements, held // world_size // 16 * 16)
    if hidden_dim is None:
        max_num_tokens, hidden_dim = elements, 1
    elif max_num_tokens is None or elements > max_num_tokens * hidden_dim:
        max_num_tokens = elements // hidden_dim
    req = make_request(world_size, rank, max_num_tokens, hidden_dim, dtype, None, comm_backend,
                       False, None)  # the checks create_allreduce_fusion_workspace makes
    return dict(world_size=req.world_size, rank=req.rank, max_token_num=req.max_token_num,
                hidden_dim=req.hidden_dim, dtype=req.dtype, comm_backend=comm_backend,
                oneshot_elements=oneshot)
