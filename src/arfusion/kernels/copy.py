"""A plain copy kernel: the bench's copy baseline (bench.timing.copy_us), next to
torch's `copy_`, which a CUDA graph turns into a memcpy node that copies slower."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)


def copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst <- src (contiguous, same dtype and size; 16-byte accesses when the element
    count is a multiple of 16, as Triton then specialises it)."""
    _copy_kernel[(triton.cdiv(src.numel(), BLOCK),)](src, dst, src.numel(), BLOCK=BLOCK,
                                                     num_warps=8)
