"""Strategy and backend choice by size: small tables, with where each number comes from.

`ONESHOT_MAX_BYTES[world_size]` is the largest per-rank input (bytes) for which
`use_oneshot=None` picks one-shot; above it two-shot moves fewer bytes per rank
(one-shot sends N-1 copies of the whole input, two-shot about two).

World size 2 was measured: two H200s over NVLink (NV18), one process each, `python -m
arfusion bench --world-size 2 --patterns 1,2 --hidden 4096,8192 --tokens
64,128,256,512,1024,2048 --tune` (docs/history/benchmarks-2026-11.md, run K,
2026-11-26): one-shot is faster up to 2 MiB per rank and within 3 % at 4 MiB; at 8 MiB
(1024 x 4096 bf16) two-shot took 39.7 us against 45.1. Hopper's NVLink is the same on
the H100. The other sizes still start from vLLM's published H100 (compute capability
9.0) one-shot thresholds for FlashInfer's Lamport all-reduce fusion, the same protocol
family (vLLM's `_FI_ALLREDUCE_ONE_SHOT_MAX_SIZES_MB`: 2 MB at 4 ranks, 0.5 MB at 8; 32
MB at 2, which the measurement replaced); 3 ranks take 4's value and 16 take 8's. The
same table sizes the mnnvl workspace's one-shot part (SPEC: one-shot up to the heuristic
threshold unless `force_oneshot_support`). World size 1 runs the local kernel whatever
the strategy.

`prefer_backend`: trtllm and mnnvl run the same kernels and measured within noise
of each other at world size 1 and in emulation, so within a node the choice is
trtllm (no virtual-memory set-up); across nodes only mnnvl can serve.
"""

from __future__ import annotations

import torch

# Tuned by `python -m arfusion bench --tune` on NVIDIA H200, 2026-11-26:
# world size 2 from processes measurements.
ONESHOT_MAX_BYTES: dict[int, int] = {
    1: 1 << 62,
    2: 4 << 20,
    3: 2 << 20,
    4: 2 << 20,
    8: 512 << 10,
    16: 512 << 10,
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
