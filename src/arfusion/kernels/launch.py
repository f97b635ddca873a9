"""From a validated call to a kernel launch: block sizes, grid, arguments.

Host work per call is a handful of integer operations and one Triton launch; no
allocation, no synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ..patterns import Quant
from ..sizing import chunk_elements, round_up
from ..validation import FusionCall
from .oneshot import oneshot_kernel
from .protocol import CANONICAL_NAN_BITS, STATE_SIZE
from .twoshot import twoshot_kernel

__all__ = ["BITS", "STATE_SIZE", "Resources", "launch"]

MAX_BLOCK = 8192  # widest row chunk held in registers
BITS = {2: torch.int16, 4: torch.int32}


@dataclass
class Resources:
    """What a rank's kernels need besides the call: its memory and protocol state."""

    buf: torch.Tensor  # this rank's symmetric buffer, as 16/32-bit integers
    deltas: torch.Tensor  # int64 [N]: element distance from buf to each rank's buffer
    state: torch.Tensor  # int64 protocol state (protocol.py)
    err_addr: int  # host-visible int32 [1 + N] error array (pinned)
    rank: int
    world_size: int
    buf_stride: int  # elements per rotation
    max_programs: int  # programs that can be resident at once for this rank
    dummy: dict[torch.dtype, torch.Tensor]  # stand-ins for pointers a pattern never uses


def launch(call: FusionCall, res: Resources, oneshot: bool, timeout_ns: int) -> None:
    x = call.input
    t, h = call.num_tokens, call.hidden_dim
    n = t * h
    traits = call.traits
    block = max(64, min(triton.next_power_of_2(h), MAX_BLOCK))
    # At least two elements per thread: no lane holds a replicated copy of another's.
    num_warps = min(16, max(1, block // 256))
    push_block = num_warps * 32 * (16 // x.element_size())
    if oneshot:
        kernel, stride = oneshot_kernel, round_up(n, 16)
        pieces = triton.cdiv(n, push_block)
    else:
        kernel, stride = twoshot_kernel, chunk_elements(n, res.world_size)
        pieces = triton.cdiv(stride, push_block)
    grid = (min(res.max_programs, max(t, pieces)),)

    quant = traits.quant
    sf = call.scale_factor
    scale_from_ptr = isinstance(sf, torch.Tensor)
    if quant == Quant.NVFP4:
        scale_out = call.scale_out.view(torch.uint8)
    elif quant == Quant.DYNAMIC_FP8:
        scale_out = call.scale_out
    else:
        scale_out = res.dummy[torch.uint8]
    kernel[grid](
        x.view(BITS[x.element_size()]), res.buf, res.deltas, res.state, res.err_addr,
        call.output if call.output is not None else call.residual_out,
        call.residual_in if traits.norm else x,
        call.residual_out if traits.norm else x,
        call.rms_gamma if traits.norm else x,
        call.norm_out if traits.norm_out else x,
        call.quant_out if quant != Quant.NONE else res.dummy[torch.uint8],
        scale_out,
        sf if scale_from_ptr else res.dummy[torch.float32],
        float(sf) if sf is not None and not scale_from_ptr else 1.0,
        call.rms_eps, call.weight_bias, t, h, res.rank, res.world_size, res.buf_stride,
        stride, timeout_ns,
        NORM=traits.norm, WRITE_OUTPUT=traits.norm and call.output is not None,
        WRITE_NORM=traits.norm_out, QUANT=int(quant),
        LAYOUT=call.layout_code if quant == Quant.NVFP4 else 0,
        SCALE_FROM_PTR=scale_from_ptr, BLOCK=block, NUM_CHUNKS=triton.cdiv(h, block),
        PUSH_BLOCK=push_block, CANON=CANONICAL_NAN_BITS[x.element_size()],
        USE_PDL=call.launch_with_pdl,
        TRIGGER_AT_END=call.trigger_completion_at_end or not call.launch_with_pdl,
        num_warps=num_warps, launch_pdl=call.launch_with_pdl, enable_fp_fusion=False,
    )
