"""Rendezvous: the small collective interface workspaces use at set-up.

`CommBackend` is the structural protocol of `flashinfer.comm.CommBackend`
(MPI-style names). Three implementations:

- `TorchDistBackend`: any `torch.distributed` group (gloo, nccl, ...).
- `MPIBackend`: mpi4py's COMM_WORLD (imported only when constructed).
- `InProcessBackend`: ranks that are threads of one process. Objects pass by
  reference, so a transport can hand tensors to its peers directly. Create the
  ranks' backends with `InProcessGroup(world_size).backends()`.

None of these is used on the hot path of `allreduce_fusion`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class CommBackend(Protocol):
    def Get_rank(self) -> int: ...

    def Get_size(self) -> int: ...

    def allgather(self, obj: Any) -> Sequence[Any]: ...

    def bcast(self, obj: Any, root: int) -> Any: ...

    def barrier(self) -> None: ...

    def Split(self, color: int, key: int) -> CommBackend: ...


class TorchDistBackend:
    """`CommBackend` over a `torch.distributed` process group (default: WORLD).

    `order` lists the group's ranks in this backend's rank order (MPI's Split orders
    by key; torch.distributed groups always order by global rank).
    """

    def __init__(self, group: Any = None, order: Sequence[int] | None = None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchDistBackend needs an initialised torch.distributed process group "
                "(call torch.distributed.init_process_group first)"
            )
        self._dist = dist
        self.group = group if group is not None else dist.group.WORLD
        self._order = list(order) if order is not None else list(range(self.Get_size()))

    def Get_rank(self) -> int:
        return self._order.index(self._dist.get_rank(self.group))

    def Get_size(self) -> int:
        return self._dist.get_world_size(self.group)

    def allgather(self, obj: Any) -> tuple[Any, ...]:
        out: list[Any] = [None] * self.Get_size()
        self._dist.all_gather_object(out, obj, group=self.group)
        return tuple(out[g] for g in self._order)

    def bcast(self, obj: Any, root: int) -> Any:
        box = [obj]
        src = self._dist.get_global_rank(self.group, self._order[root])
        self._dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def barrier(self) -> None:
        self._dist.barrier(group=self.group)

    def Split(self, color: int, key: int) -> TorchDistBackend:
        # new_group is collective over the whole parent group: every rank creates
        # every color's group, in the same order, and keeps its own.
        me = self._dist.get_rank()
        members = self.allgather((color, key, self.Get_rank(), me))
        mine = None
        for c in sorted({m[0] for m in members}):
            by_key = [m[3] for m in sorted(m for m in members if m[0] == c)]
            group = self._dist.new_group(sorted(by_key))
            if c == color:
                mine = (group, [sorted(by_key).index(g) for g in by_key])
        return TorchDistBackend(*mine)


class MPIBackend:
    """`CommBackend` over an mpi4py communicator (default: COMM_WORLD)."""

    def __init__(self, comm: Any = None):
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise ImportError(
                "MPIBackend needs mpi4py: pip install 'arfusion[mpi]'"
            ) from e
        self.comm = comm if comm is not None else MPI.COMM_WORLD

    def Get_rank(self) -> int:
        return self.comm.Get_rank()

    def Get_size(self) -> int:
        return self.comm.Get_size()

    def allgather(self, obj: Any) -> tuple[Any, ...]:
        return tuple(self.comm.allgather(obj))

    def bcast(self, obj: Any, root: int) -> Any:
        return self.comm.bcast(obj, root=root)

    def barrier(self) -> None:
        self.comm.Barrier()

    def Split(self, color: int, key: int) -> MPIBackend:
        return MPIBackend(self.comm.Split(color, key))


class InProcessGroup:
    """Shared state of `world_size` ranks that are threads of one process."""

    def __init__(self, world_size: int, timeout_s: float = 300.0):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._barrier = threading.Barrier(world_size, timeout=timeout_s)
        self._slots: list[Any] = [None] * world_size
        self._splits: dict[tuple[int, int], InProcessGroup] = {}
        self._split_count = [0] * world_size
        self._lock = threading.Lock()
        self.arrivals: dict[str, int] = {}  # the torch backend's arrival board

    def abort(self) -> None:
        """Break the barrier: every rank waiting in a collective gets BrokenBarrierError."""
        self._barrier.abort()

    def backends(self) -> list[InProcessBackend]:
        return [InProcessBackend(self, r) for r in range(self.world_size)]

    def exchange(self, rank: int, obj: Any) -> list[Any]:
        """Every rank's `obj`, once all ranks have called this."""
        self._slots[rank] = obj
        self._barrier.wait()
        out = list(self._slots)
        self._barrier.wait()  # nobody overwrites a slot before all have read it
        return out

    def subgroup(self, rank: int, color: int, size: int) -> InProcessGroup:
        """The group of `color` in this rank's next Split (created by its first caller)."""
        with self._lock:
            key = (self._split_count[rank], color)
            self._split_count[rank] += 1
            if key not in self._splits:
                self._splits[key] = InProcessGroup(size, self.timeout_s)
            return self._splits[key]


class InProcessBackend:
    """One rank's `CommBackend` in an `InProcessGroup`."""

    def __init__(self, group: InProcessGroup, rank: int):
        if not 0 <= rank < group.world_size:
            raise ValueError(f"rank must be in [0, {group.world_size}), got {rank}")
        self.group = group
        self.rank = rank

    def Get_rank(self) -> int:
        return self.rank

    def Get_size(self) -> int:
        return self.group.world_size

    def allgather(self, obj: Any) -> tuple[Any, ...]:
        return tuple(self.group.exchange(self.rank, obj))

    def bcast(self, obj: Any, root: int) -> Any:
        return self.group.exchange(self.rank, obj)[root]

    def barrier(self) -> None:
        self.group.exchange(self.rank, None)

    def Split(self, color: int, key: int) -> InProcessBackend:
        members = self.allgather((color, key, self.rank))
        same = sorted(m for m in members if m[0] == color)
        sub = self.group.subgroup(self.rank, color, len(same))
        return InProcessBackend(sub, [m[2] for m in same].index(self.rank))


def is_in_process(comm: CommBackend | None) -> bool:
    return isinstance(comm, InProcessBackend)


def bounded(fn: Callable[[], object], timeout_s: float) -> bool:
    """Run `fn` (a collective such as a barrier) for at most `timeout_s` seconds:
    True if it returned, False if it raised or is still waiting (it is left behind
    on a daemon thread; a peer that is gone never answers)."""
    done = threading.Event()

    def target() -> None:
        try:
            fn()
            done.set()
        except BaseException:  # noqa: BLE001 - a failed collective is a missing peer
            pass

    threading.Thread(target=target, daemon=True).start()
    return done.wait(timeout_s)
