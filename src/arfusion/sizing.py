"""How much symmetric memory a Lamport workspace needs (no GPU, no triton needed).

Each of the three rotations holds a header of N * 16 elements (the ranks' call
signatures), then either a one-shot call (N slots of the call's T*H elements,
each slot rounded up to 16) or a two-shot call (N scatter slots of
C = ceil(T*H / N) rounded up to 16, plus the gather region of N*C). A workspace
sized for E elements (max_token_num * hidden_dim) with one-shot up to E1 <= E:

    bytes = 3 * round_up(16 N + max(N * round_up(E1, 16), 2 * N * C(E)), 64) * element size

A one-shot call of up to `oneshot_fit` elements fits whatever E1 was asked for.
World size 1 moves nothing between ranks (a local kernel): its rotations are a
token 64 elements, and every call fits.
"""

from __future__ import annotations

import torch

ROTATIONS = 3
HEADER_SLOT = 16  # header elements per rank: keeps the data 16-element aligned


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def chunk_elements(num_elements: int, world_size: int) -> int:
    """Two-shot: elements each rank owns (16-aligned so every slot stays aligned)."""
    return round_up(-(-num_elements // world_size), 16)


def rotation_elements(world_size: int, max_elements: int, oneshot_elements: int) -> int:
    """Elements of one rotation: the header, then N one-shot slots or two-shot scatter +
    gather."""
    if world_size == 1:
        return 64
    oneshot = world_size * round_up(oneshot_elements, 16)
    twoshot = 2 * world_size * chunk_elements(max_elements, world_size)
    return round_up(header_elements(world_size) + max(oneshot, twoshot), 64)


def header_elements(world_size: int) -> int:
    """Elements of a rotation's signature header (none at world size 1)."""
    return world_size * HEADER_SLOT if world_size > 1 else 0


def buffer_bytes(world_size: int, max_elements: int, oneshot_elements: int,
                 dtype: torch.dtype) -> int:
    """Symmetric-buffer bytes per rank (see the module docstring)."""
    return ROTATIONS * rotation_elements(world_size, max_elements, oneshot_elements) \
        * dtype.itemsize


def oneshot_fit(world_size: int, rotation: int) -> int:
    """Largest one-shot call (elements per rank) a rotation of `rotation` elements holds."""
    return (rotation - header_elements(world_size)) // world_size // 16 * 16


def capacity(max_elements: int, oneshot_elements: int, use_oneshot: bool | None) -> int:
    """Largest T*H a call may have: one-shot forced, or any strategy (the heuristic
    falls back to two-shot beyond the one-shot capacity)."""
    return min(max_elements, oneshot_elements) if use_oneshot else max_elements
