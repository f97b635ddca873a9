"""Strategy and backend choice by size: small tables, measured, not guessed.

`ONESHOT_MAX_BYTES[world_size]` is the largest per-rank input (bytes) for which
`use_oneshot=None` picks one-shot; above it two-shot moves fewer bytes per rank
(one-shot sends N-1 copies of the whole input, two-shot about two). The first
values are conservative placeholders taken from published NVLink results for
similar kernels; `python -m arfusion bench --tune` re-derives them on the card at
hand (issue: benchmarks and tuned heuristics).
"""

from __future__ import annotations

import torch

ONESHOT_MAX_BYTES: dict[int, int] = {
    1: 1 << 62,  # no peers: one-shot is a local copy at any size
    2: 1 << 20,
    3: 768 << 10,
    4: 512 << 10,
    8: 256 << 10,
    16: 128 << 10,
}


def oneshot_max_bytes(world_size: int) -> int:
    """The one-shot threshold for `world_size` (nearest smaller tabulated size)."""
    known = max(w for w in ONESHOT_MAX_BYTES if w <= world_size)
    return ONESHOT_MAX_BYTES[known]


def choose_oneshot(world_size: int, num_elements: int, dtype: torch.dtype) -> bool:
    """The strategy `use_oneshot=None` picks for a call of `num_elements` per rank."""
    return num_elements * dtype.itemsize <= oneshot_max_bytes(world_size)


def oneshot_max_elements(world_size: int, dtype: torch.dtype) -> int:
    return oneshot_max_bytes(world_size) // dtype.itemsize


def prefer_backend(candidates: list[str], nodes: int) -> str:
    """Pick among backends that passed their checks: trtllm within a node, else mnnvl."""
    if nodes == 1 and "trtllm" in candidates:
        return "trtllm"
    return candidates[0]
