"""Rendezvous: the small collective interface workspaces use at set-up.

`CommBackend` is the structural protocol of `flashinfer.comm.CommBackend`
(MPI-style names). Three implementations:

- `TorchDistBackend`: any `torch.distributed` group (gloo, nccl, ...).
- `MPIBackend`: mpi4py's COMM_WORLD (imported only when constructed).
- `InProcessBackend`: ranks that are threads of one process. Objects pass by
  reference, so a transport can hand tensors to its peers directly. Create the
  ranks' backends with `InProcessGroup(world_size).backends()`.

None of these is used on the hot path of `allreduce_fusion`.

Workspace creation never waits unbounded. `join`, its first exchange, and `set_up`,
every exchange after it (handles, buffer pointers, the closing barrier), give up after
`timeout_s` and name the ranks that never came, read from an `ArrivalBoard` (each rank
posts how far it got before waiting: the process group's key-value store, or the
in-process group's dict; MPI has neither, so there the message cannot name them).
`set_up` is a bounded view used only while building: the transport is chosen from the
comm itself, and what a workspace keeps is the comm itself. `bounded` runs any other
collective with a time limit.
"""

from __future__ import annotations

import os
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
    """Run `fn` (a collective such as a barrier) for at most `timeout_s` seconds, on
    the caller's CUDA device (NCCL's object collectives run there): True if it
    returned, False if it raised or is still waiting (it is left behind on a daemon
    thread; a peer that is gone never answers)."""
    done = threading.Event()
    device = _cuda_device()

    def target() -> None:
        try:
            if device is not None:
                import torch

                torch.cuda.set_device(device)
            fn()
            done.set()
        except BaseException:  # noqa: BLE001 - a failed collective is a missing peer
            pass

    threading.Thread(target=target, daemon=True).start()
    return done.wait(timeout_s)


def default_comm(world_size: int, comm_backend: CommBackend | None, group: Any) -> CommBackend:
    """The rendezvous to use: comm_backend, else the torch.distributed group, else MPI's
    COMM_WORLD when running under an MPI launcher, else (one rank) a group of one."""
    if comm_backend is not None:
        return comm_backend
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return TorchDistBackend(group)
    if world_size == 1:
        return InProcessGroup(1).backends()[0]
    if any(v in os.environ for v in MPI_ENV):
        return MPIBackend()
    raise ValueError(
        f"world_size={world_size} needs comm_backend, an initialised torch.distributed "
        "process group or an MPI launcher for the rendezvous"
    )


MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


class ArrivalBoard:
    """Which step each rank has reached: `post(seq)` before waiting, `behind(seq)`
    lists the ranks that have not reached step `seq`. Over a torch.distributed
    key-value store, or a dict shared by ranks that are threads of one process."""

    def __init__(self, store: Any, prefix: str, rank: int, world_size: int):
        self._store, self._prefix, self._rank, self._world = store, prefix, rank, world_size

    def post(self, seq: int) -> None:
        self._set(f"{self._prefix}/{self._rank}", seq)

    def behind(self, seq: int) -> list[int]:
        return [r for r in range(self._world) if self._get(f"{self._prefix}/{r}") < seq]

    def _set(self, key: str, seq: int) -> None:
        if isinstance(self._store, dict):
            self._store[key] = seq
        else:
            self._store.set(key, str(seq))

    def _get(self, key: str) -> int:
        if isinstance(self._store, dict):
            return self._store.get(key, -1)
        return int(self._store.get(key)) if self._store.check([key]) else -1


def arrival_board(comm: CommBackend, prefix: str) -> ArrivalBoard | None:
    """`comm`'s arrival board under `prefix` (which must name the group), or None
    where there is no store to post on (MPI, a user's own CommBackend)."""
    if isinstance(comm, InProcessBackend):
        store = comm.group.arrivals
    elif isinstance(comm, TorchDistBackend):
        from torch.distributed import distributed_c10d

        store = distributed_c10d._get_default_store()
    else:
        return None
    return ArrivalBoard(store, prefix, comm.Get_rank(), comm.Get_size())


def group_key(comm: CommBackend) -> str:
    """A name of `comm`'s group that every member computes alike (arrival-board keys)."""
    if isinstance(comm, InProcessBackend):
        return f"threads-{id(comm.group):x}"
    if isinstance(comm, TorchDistBackend):
        members = comm._dist.get_process_group_ranks(comm.group)
        return "ranks-" + "-".join(str(members[i]) for i in comm._order)
    return type(comm).__name__


# Workspace creations so far, per group and rank: the steps on the arrival board.
_JOINS: dict[tuple[str, int], int] = {}


class BoundedSteps:
    """`comm`'s collectives, each waiting at most `timeout_s`, as numbered steps on the
    arrival board under `prefix` (a step is posted before its wait): one that does not
    complete is a RuntimeError saying which ranks never reached it. A peer that is gone
    leaves its collective behind on a daemon thread (`bounded`), and the group with it."""

    def __init__(self, comm: CommBackend, timeout_s: float, prefix: str, step: int = 0,
                 stage: str = ""):
        self.comm, self.timeout_s, self._step, self._stage = comm, timeout_s, step, stage
        self._board = arrival_board(comm, prefix)

    def Get_rank(self) -> int:
        return self.comm.Get_rank()

    def Get_size(self) -> int:
        return self.comm.Get_size()

    # `what`: the step, as the error names it after `stage` ("handle exchange").
    def allgather(self, obj: Any, what: str) -> tuple[Any, ...]:
        return tuple(self._run(lambda: self.comm.allgather(obj), what))

    def bcast(self, obj: Any, root: int, what: str) -> Any:
        return self._run(lambda: self.comm.bcast(obj, root), what)

    def barrier(self, what: str) -> None:
        self._run(self.comm.barrier, what)

    def _run(self, fn: Callable[[], Any], what: str) -> Any:
        what = self._stage + what
        self._step += 1
        if self._board is not None:
            self._board.post(self._step)
        got: list[Any] = []
        if bounded(lambda: got.append(fn()), self.timeout_s):
            return got[0]
        if self._board is None:
            what = f"not every rank took part in {what}"
        elif behind := self._board.behind(self._step):
            what = (f"ranks {behind} did not reach {what} (they failed before it, or were "
                    "never started)")
        else:
            what = (f"every rank reached {what}, but it did not complete (a peer exited or "
                    "its process group broke)")
        raise RuntimeError(f"rank {self.comm.Get_rank()}: {what} within {self.timeout_s:g} s; "
                           "no workspace was created")


def join(comm: CommBackend, ticket: Any, timeout_s: float) -> tuple[Any, ...]:
    """Every rank's `ticket` (workspace creation's first exchange), waiting at most
    `timeout_s`: RuntimeError naming the ranks that never came (a peer that failed
    before it got here, or was never started). Later creations on the group stay
    usable only if every rank took part in this one."""
    key = group_key(comm)
    mine = (key, comm.Get_rank())  # ranks may be threads of this process
    creation = _JOINS[mine] = _JOINS.get(mine, 0) + 1
    steps = BoundedSteps(comm, timeout_s, f"arfusion/join/{key}", creation - 1)
    return steps.allgather(ticket, "the workspace creation")


def set_up(comm: CommBackend, timeout_s: float) -> BoundedSteps:
    """The bounded collectives of a workspace's set-up after `join` (every rank's
    steps numbered alike: they joined the same creation)."""
    key = group_key(comm)
    creation = _JOINS.get((key, comm.Get_rank()), 0)
    return BoundedSteps(comm, timeout_s, f"arfusion/setup/{key}/{creation}",
                        stage="the workspace set-up's ")


def _cuda_device() -> int | None:
    import torch

    return torch.cuda.current_device() if torch.cuda.is_initialized() else None
