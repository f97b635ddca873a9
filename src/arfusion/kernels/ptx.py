"""PTX-level helpers the protocol needs, each a thin wrapper with its reason.

Everything here is device code (`@triton.jit`), callable from the kernels.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

try:  # Triton 3.5+
    from triton.language.target_info import cuda_capability_geq
except ImportError:  # Triton 3.4: the same question, asked of the active driver
    @tl.constexpr_function
    def cuda_capability_geq(major: int, minor: int = 0) -> bool:
        target = triton.runtime.driver.active.get_current_target()
        return target.backend == "cuda" and target.arch >= major * 10 + minor


@triton.jit
def globaltimer():
    """Nanoseconds from the GPU's global timer (`%globaltimer`), for bounded waits.

    Not pure: every call must read the timer again, so the compiler may not
    hoist it out of a polling loop.
    """
    return tl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
    )


@triton.jit
def max_bits(a, b):
    """Lane-wise unsigned maximum of two bit patterns (16 or 32 bits): all-ones (the
    sentinel) iff one of them is. Sixteen-bit lanes go two to a `max.u16x2` from sm_90
    on: one instruction where comparing each lane took four."""
    if a.dtype.primitive_bitwidth == 32:
        m = tl.inline_asm_elementwise("max.u32 $0, $1, $2;", "=r,r,r", [a, b], dtype=a.dtype,
                                      is_pure=True, pack=1)
    elif cuda_capability_geq(9):
        m = tl.inline_asm_elementwise("max.u16x2 $0, $1, $2;", "=r,r,r", [a, b],
                                      dtype=a.dtype, is_pure=True, pack=2)
    else:
        m = tl.maximum(a.to(tl.uint16, bitcast=True), b.to(tl.uint16, bitcast=True))
    return m.to(a.dtype, bitcast=True)


@triton.jit
def load_volatile(ptr, mask):
    """`ld.volatile`: bypasses L1 and is never cached in registers, so a polling
    loop sees a peer's store as soon as it lands. Masked-off lanes read 0."""
    return tl.load(ptr, mask=mask, other=0, volatile=True)


@triton.jit
def wait_for_previous_grid(USE_PDL: tl.constexpr):
    """With programmatic dependent launch, block until the previous kernel on the
    stream has finished and its memory is visible (`griddepcontrol.wait`). Must come
    before the first read of inputs or protocol state."""
    if USE_PDL:
        gdc_wait()


@triton.jit
def release_dependents(USE_PDL: tl.constexpr):
    """Let the next PDL kernel start its prologue (`griddepcontrol.launch_dependents`).
    Safe anywhere: the dependent still waits for this grid's completion before it
    reads anything (`wait_for_previous_grid`)."""
    if USE_PDL:
        gdc_launch_dependents()
