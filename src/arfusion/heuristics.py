"""Strategy and backend choice by size: small tables, measured, not guessed.

`ONESHOT_MAX_BYTES[world_size]` is the largest per-rank input (bytes) for which
`use_oneshot=None` picks one-shot; above it two-shot moves fewer bytes per rank
(one-shot sends N-1 copies of the whole input, two-shot about two).

The values for 2 to 16 ranks are placeholders, not measurements: only one-GPU
machines have been available, and there the emulated ranks' timings at small sizes
are dominated by launch skew (docs/benchmarks.md, H100, 2026-11-25), so no
threshold could be derived. `python -m arfusion bench --tune` on an NVLink machine
rewrites this table (and stamps it with the card and date). World size 1 always
picks one-shot: it measured faster at every size on the H100 (world-1 table).

`prefer_backend`: trtllm and mnnvl run the same kernels and measured within noise
of each other at world size 1 and in emulation, so within a node the choice is
trtllm (no virtual-memory set-up); across nodes only mnnvl can serve.
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
