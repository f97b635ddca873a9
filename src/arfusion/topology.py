"""Where the ranks are and which backend can serve them: the checks behind "auto".

Each `*_rejection` returns None when the backend can serve the request, else one
sentence saying why not. `"auto"` collects them; if nothing can serve, the
`ValueError` lists every reason and suggests `backend="torch"`.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

from .comm import CommBackend, default_comm, is_in_process, join
from .patterns import SUPPORTED_DTYPES

TRTLLM_MAX_RANKS = 16


@dataclass(frozen=True)
class Request:
    """create_allreduce_fusion_workspace's arguments, checked and completed."""

    world_size: int
    rank: int
    max_token_num: int
    hidden_dim: int
    dtype: torch.dtype
    gpus_per_node: int
    comm_backend: CommBackend | None
    force_oneshot_support: bool
    group: Any

    @property
    def nodes(self) -> int:
        """Node count; ranks that are threads of one process share this node."""
        if is_in_process(self.comm_backend):
            return 1
        return -(-self.world_size // self.gpus_per_node)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _dist_group_info(group: Any) -> tuple[int, int] | None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    g = group if group is not None else dist.group.WORLD
    return dist.get_world_size(g), dist.get_rank(g)


def make_request(
    world_size, rank, max_token_num, hidden_dim, dtype, gpus_per_node,
    comm_backend, force_oneshot_support, group,
) -> Request:
    """Check the arguments; take world_size/rank from comm_backend or the group if None."""
    if comm_backend is not None and not isinstance(comm_backend, CommBackend):
        raise TypeError(
            "comm_backend must implement CommBackend (Get_rank, Get_size, allgather, bcast, "
            f"barrier, Split), got {type(comm_backend).__name__}"
        )
    source = None
    if comm_backend is not None:
        source = ("comm_backend", comm_backend.Get_size(), comm_backend.Get_rank())
    elif (info := _dist_group_info(group)) is not None:
        source = ("the torch.distributed group", *info)
    if world_size is None:
        if source is None:
            raise ValueError(
                "world_size is required (or pass comm_backend / initialise torch.distributed)"
            )
        world_size = source[1]
    if rank is None:
        if source is None:
            raise ValueError(
                "rank is required (or pass comm_backend / initialise torch.distributed)"
            )
        rank = source[2]
    world_size = _positive_int("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if source is not None and (source[1], source[2]) != (world_size, rank):
        raise ValueError(
            f"world_size={world_size}, rank={rank} do not match {source[0]} "
            f"(size {source[1]}, rank {source[2]})"
        )
    for name, value in (("max_token_num", max_token_num), ("hidden_dim", hidden_dim)):
        if value is None:
            raise ValueError(f"{name} is required")
        _positive_int(name, value)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"dtype must be one of torch.float16, torch.bfloat16, torch.float32, got {dtype}"
        )
    if gpus_per_node is None:
        gpus_per_node = min(torch.cuda.device_count(), world_size) or world_size
    gpus_per_node = _positive_int("gpus_per_node", gpus_per_node)
    if not isinstance(force_oneshot_support, bool):
        raise TypeError(
            f"force_oneshot_support must be a bool, got {type(force_oneshot_support).__name__}"
        )
    return Request(world_size, rank, max_token_num, hidden_dim, dtype, gpus_per_node,
                   comm_backend, force_oneshot_support, group)


def rendezvous(world_size: object, comm_backend: object, group: Any) -> CommBackend | None:
    """The group the ranks meet in at creation, or None where there is none to meet
    (one rank, or no way to reach the peers: make_request or the backend says why)."""
    if comm_backend is not None and not isinstance(comm_backend, CommBackend):
        return None
    try:
        comm = default_comm(world_size, comm_backend, group)
    except ValueError:
        return None
    return comm if comm.Get_size() > 1 else None


def meet(comm: CommBackend, error: Exception | None, timeout_s: float, **args: object) -> None:
    """Creation's first exchange (bounded: `comm.join`). A rank whose own arguments
    failed (`error`) still takes part, so that its peers can name it, and returns to
    raise its own error (also when its peers never came); the others raise alike:
    ValueError if two ranks claim one rank or disagree on any other argument in
    `args`, else RuntimeError naming the failed peers. Arguments that are no plain
    values travel as their repr."""
    plain = {k: v if v is None or isinstance(v, (bool, int, float, str)) else repr(v)
             for k, v in args.items()}
    if plain["rank"] is None:
        plain["rank"] = comm.Get_rank()
    plain["error"] = None if error is None else f"{type(error).__name__}: {error}"
    if error is not None:
        with contextlib.suppress(RuntimeError):
            join(comm, plain, timeout_s)
        return
    tickets = join(comm, plain, timeout_s)
    me = comm.Get_rank()
    claims = [t["rank"] for t in tickets]
    if dup := sorted({c for c in claims if claims.count(c) > 1}, key=str):
        twice = "; ".join(f"ranks {[r for r, c in enumerate(claims) if c == d]} all passed "
                          f"rank={d!r}" for d in dup)
        raise ValueError(f"rank {me}: duplicate ranks at workspace creation: {twice} "
                         "(each rank must pass its own rank)")
    agreed = [name for name in args if name != "rank"]
    for name in agreed:
        if len({repr(t[name]) for t in tickets}) > 1:
            each = ", ".join(f"rank {r}: {t[name]}" for r, t in enumerate(tickets))
            raise ValueError(f"rank {me}: the ranks passed different {name} to the "
                             f"workspace creation ({each}); every rank must pass the same "
                             f"{', '.join(agreed)}")
    if failed := [(r, t["error"]) for r, t in enumerate(tickets) if t["error"] is not None]:
        each = "; ".join(f"rank {r}: {e}" for r, e in failed)
        raise RuntimeError(f"rank {me}: ranks {[r for r, _ in failed]} could not create "
                           f"their workspace ({each}); no workspace was created")


def _gpu_stack_missing() -> str | None:
    if not torch.cuda.is_available():
        return "CUDA is not available"
    missing = [m for m in ("triton", "cuda.bindings") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install 'arfusion[cuda]')"
    return None


def _peer_access_missing(gpus: int) -> str | None:
    n = min(gpus, torch.cuda.device_count())
    for i in range(n):
        for j in range(n):
            if i != j and not torch.cuda.can_device_access_peer(i, j):
                return f"GPU {i} cannot access GPU {j}'s memory (no peer access)"
    return None


def trtllm_rejection(req: Request) -> str | None:
    if (reason := _gpu_stack_missing()) is not None:
        return reason
    if req.nodes > 1:
        return (
            f"{req.world_size} ranks at gpus_per_node={req.gpus_per_node} span {req.nodes} "
            "nodes; trtllm works within one node"
        )
    if req.world_size > TRTLLM_MAX_RANKS:
        return f"supports at most {TRTLLM_MAX_RANKS} ranks, got {req.world_size}"
    return _peer_access_missing(req.gpus_per_node)


def mnnvl_rejection(req: Request) -> str | None:
    """mnnvl needs CUDA virtual memory; across nodes, FABRIC handles on every rank
    (checked with an allgather, so every rank must evaluate this), within a node
    POSIX file-descriptor handles."""
    if (reason := _gpu_stack_missing()) is not None:
        return reason
    from .comm import default_comm
    from .memory.cumem import device_supports, fabric_supported

    device = torch.device("cuda", torch.cuda.current_device())
    if not device_supports(device, "VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED"):
        return "the GPU does not support CUDA virtual memory management"
    if req.nodes > 1:
        try:
            comm = default_comm(req.world_size, req.comm_backend, req.group)
        except ValueError:
            return (f"{req.nodes} nodes need FABRIC handles on every rank, and checking "
                    "needs comm_backend or a torch.distributed process group")
        if not all(comm.allgather(fabric_supported(device))):
            return (f"{req.world_size} ranks span {req.nodes} nodes but not every rank's GPU "
                    "supports FABRIC handles (multi-node NVLink with IMEX)")
    elif not is_in_process(req.comm_backend) and not device_supports(
            device, "HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED"):
        return "the GPU does not support POSIX file-descriptor memory handles"
    return None


REJECTIONS = {"trtllm": trtllm_rejection, "mnnvl": mnnvl_rejection}
