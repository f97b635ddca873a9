"""`AllReduceFusionWorkspace`: what every backend's workspace shares.

A workspace is created collectively by all ranks, is reused for any call whose
`num_tokens * hidden_dim` fits what it was sized for (same dtype, same world
size), and must be destroyed (explicitly or as a context manager) by all ranks.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import os
import warnings
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from .patterns import PATTERNS, SUPPORTED_DTYPES

if TYPE_CHECKING:
    from .comm import CommBackend
    from .validation import FusionCall


DEFAULT_TIMEOUT_S = 30.0
TIMEOUT_ENV = "ARFUSION_TIMEOUT_S"


def default_timeout_s() -> float:
    """The wait bound of calls, creation and destroy(): env ARFUSION_TIMEOUT_S, default 30 s."""
    value = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0, got {value}")
    return value


class MNNVLAllreduceFusionStrategy(enum.Enum):
    """FlashInfer's strategy enum (`flashinfer.comm.trtllm_mnnvl_ar`)."""

    ONESHOT = 0
    TWOSHOT = 1
    AUTO = 99

    @property
    def use_oneshot(self) -> bool | None:
        """The `use_oneshot` argument that means the same."""
        return {0: True, 1: False, 99: None}[self.value]



# Live workspaces by id(): the torch custom op (torch.compile's view of a call)
# carries this key instead of the workspace object.
LIVE_WORKSPACES: weakref.WeakValueDictionary[int, AllReduceFusionWorkspace] = (
    weakref.WeakValueDictionary()
)


class AllReduceFusionWorkspace(abc.ABC):
    """Base class of the `trtllm`, `mnnvl` and `torch` workspaces."""

    backend: str = ""
    served_patterns: tuple[int, ...] = tuple(sorted(PATTERNS))  # the kernels' are fewer

    def __init__(
        self,
        world_size: int,
        rank: int,
        max_token_num: int,
        hidden_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self._destroyed = True  # until fully constructed: __del__ stays quiet
        self._world_size = world_size
        self._rank = rank
        self.max_token_num = max_token_num
        self.hidden_dim = hidden_dim
        self.dtype = dtype
        self.device = device
        self.plans: dict = {}  # call signature -> validation.Plan (the hot path's cache)
        self.timeout_s = None

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def destroyed(self) -> bool:
        return self._destroyed

    def capacity(self, use_oneshot: bool | None = None) -> int:
        """Largest num_tokens * hidden_dim a call may have with this strategy."""
        return self.max_token_num * self.hidden_dim

    def is_buffer_size_sufficient(
        self,
        tp_size: int,
        num_tokens: int,
        hidden_dim: int,
        dtype: torch.dtype,
        use_oneshot: bool | MNNVLAllreduceFusionStrategy | None = None,
        strategy: MNNVLAllreduceFusionStrategy | None = None,
    ) -> bool:
        """Whether a call of this shape fits: same world size, a dtype of the
        workspace dtype's element size, num_tokens * hidden_dim within the capacity
        of the strategy (`use_oneshot`, or FlashInfer's `strategy` enum, by keyword or
        in `use_oneshot`'s place as FlashInfer's mnnvl workspace takes it; None: the
        one the heuristic picks)."""
        if isinstance(use_oneshot, MNNVLAllreduceFusionStrategy):
            use_oneshot, strategy = None, use_oneshot
        if strategy is not None:
            use_oneshot = MNNVLAllreduceFusionStrategy(strategy).use_oneshot
        return (
            tp_size == self.world_size
            and dtype in SUPPORTED_DTYPES
            and dtype.itemsize == self.dtype.itemsize
            and num_tokens >= 1
            and hidden_dim >= 1
            and num_tokens * hidden_dim <= self.capacity(use_oneshot)
        )

    @property
    def timeout_s(self) -> float:
        """Seconds a call waits for its peers before giving up (env ARFUSION_TIMEOUT_S,
        default 30); destroy() waits for them at most as long."""
        return self._timeout_s

    @timeout_s.setter
    def timeout_s(self, value: float | None) -> None:
        if value is None:
            value = default_timeout_s()
        if not value > 0:
            raise ValueError(f"timeout_s must be > 0, got {value}")
        self._timeout_s = float(value)

    def failed_ranks(self) -> list[int]:
        """Ranks an earlier call waited for in vain (empty while all is well)."""
        return []

    def check(self) -> None:
        """Raise RuntimeError if an earlier call failed (a peer never arrived)."""
        if missing := self.failed_ranks():
            raise RuntimeError(self.missing_message(missing, "an earlier"))

    def missing_message(self, missing: list[int], which: str) -> str:
        """What every rank that waited in vain raises (`which` call: "this", "an earlier")."""
        return (f"rank {self.rank}: ranks {missing} did not arrive within {self.timeout_s:g} s "
                f"in {which} allreduce_fusion call; this workspace is unusable: destroy it and "
                "create a new one on every rank")

    @contextlib.contextmanager
    def compile_only(self) -> Iterator[None]:
        """Within this block, calls build (compile and load) the kernels they need and
        launch nothing; a no-op for backends without kernels of their own."""
        yield

    @property
    def comm(self) -> CommBackend | None:
        """The CommBackend the ranks met through (None where there is none to share)."""
        return None

    def precompile(self, **variants) -> int:
        """Compile and load the kernel variants calls to this workspace will need, before
        the first call (`arfusion.precompile`: which variants, keyword arguments to
        narrow or widen them). Call it on every rank. Returns how many example calls
        were built (one per variant asked for, and per token count where the kernels
        differ by it); 0 for backends without kernels of their own."""
        return 0

    @abc.abstractmethod
    def run(self, call: FusionCall) -> None:
        """Launch one validated call (outputs are in `call`)."""

    def _release(self) -> None:
        """Free what this workspace holds; called once by destroy()."""

    def destroy(self) -> None:
        """Free the workspace's memory. Idempotent; call it on every rank.

        Never hangs: it waits for the peers at most the workspace's wait bound, and
        frees only what no live peer can still write (the backends say how)."""
        if self._destroyed:
            return
        self._destroyed = True
        self._release()

    def _mark_ready(self) -> None:
        """Called by subclasses at the end of a successful constructor."""
        self._destroyed = False
        LIVE_WORKSPACES[id(self)] = self

    def __enter__(self) -> AllReduceFusionWorkspace:
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def __del__(self) -> None:
        if not getattr(self, "_destroyed", True):
            warnings.warn(
                f"{type(self).__name__} (rank {self._rank}) was never destroyed; "
                "call workspace.destroy() on every rank or use it as a context manager",
                ResourceWarning,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backend={self.backend!r}, world_size={self.world_size}, "
            f"rank={self.rank}, max_token_num={self.max_token_num}, "
            f"hidden_dim={self.hidden_dim}, dtype={self.dtype}, device={self.device})"
        )
