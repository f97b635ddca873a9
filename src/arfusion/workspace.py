"""`AllReduceFusionWorkspace`: what every backend's workspace shares.

A workspace is created collectively by all ranks, is reused for any call whose
`num_tokens * hidden_dim` fits what it was sized for (same dtype, same world
size), and must be destroyed (explicitly or as a context manager) by all ranks.
"""

from __future__ import annotations

import abc
import warnings
import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .validation import FusionCall

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Live workspaces by id(): the torch custom op (torch.compile's view of a call)
# carries this key instead of the workspace object.
LIVE_WORKSPACES: weakref.WeakValueDictionary[int, AllReduceFusionWorkspace] = (
    weakref.WeakValueDictionary()
)


class AllReduceFusionWorkspace(abc.ABC):
    """Base class of the `trtllm`, `mnnvl` and `torch` workspaces."""

    backend: str = ""

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
        use_oneshot: bool | None = None,
    ) -> bool:
        """Whether a call of this shape fits (None: the strategy the heuristic picks)."""
        return (
            tp_size == self.world_size
            and dtype == self.dtype
            and num_tokens >= 1
            and hidden_dim >= 1
            and num_tokens * hidden_dim <= self.capacity(use_oneshot)
        )

    def check(self) -> None:
        """Raise RuntimeError if an earlier call failed (e.g. a peer never arrived)."""

    @abc.abstractmethod
    def run(self, call: FusionCall) -> None:
        """Launch one validated call (outputs are in `call`)."""

    def _release(self) -> None:
        """Free what this workspace holds; called once by destroy()."""

    def destroy(self) -> None:
        """Free the workspace's memory. Idempotent; call it on every rank."""
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
