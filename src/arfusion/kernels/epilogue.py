"""The epilogue both strategies share: residual add, RMSNorm, FP8 / NVFP4 / dynamic FP8.

Numerics follow docs/contract.md step by step, each a single correctly rounded fp32
operation in the reference's order: divisions and the square root use
`div_rn`/`sqrt_rn` (Triton's `/` is approximate), or `divide_by`, which gives the
same quotients, and kernels are compiled without FMA contraction, so the only
differences from `arfusion.reference` are the order of the row's sum of squares
(RMSNorm, within 1 ulp of the output). The sum is rounded to the input dtype before
the rank's own residual is added (FlashInfer's rounding points); static FP8
multiplies by the reciprocal of the scale, rounded once (`quant_scale`).
Every rank finishes its rows from the same all-reduced sum with its own residual,
gamma and scale, so ranks that pass the same tensors get the same bits.

A row is processed in `NUM_CHUNKS` chunks of `BLOCK` columns. With one chunk
the residual row `h` stays in registers; with more, the producing stage writes
`h` to residual_out, and `finish_rows_chunked` reads it back (after a CTA barrier)
once for the sum of squares and once more to normalise.

NVFP4 is converted in software (Hopper has no E2M1 instruction): per 16-value
block, `sf = e4m3(scale * amax / 6)`, `k = scale / sf`, each value rounds to the
nearest E2M1 value of `v * k` (ties to even, saturating at 6) by comparisons
with the midpoints. Scale bytes are placed by `sf_offset`, the same function
the reference uses.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..patterns import sf_offset as _sf_offset
from ..reference import DYNAMIC_FP8_MIN_SCALE

sf_offset = triton.jit(_sf_offset)

QUANT_FP8 = tl.constexpr(1)
QUANT_NVFP4 = tl.constexpr(2)
QUANT_DYNAMIC_FP8 = tl.constexpr(3)
FP8_MAX = tl.constexpr(448.0)
MIN_DYNAMIC_SCALE = tl.constexpr(DYNAMIC_FP8_MIN_SCALE)


@triton.jit
def load_residual(row, cols, cm, H, residual_in_ptr, NORM: tl.constexpr):
    """The residual row chunk in its own dtype (0 without a residual). Loaded before the
    strategy polls for the sum, so its latency overlaps the wait; widened only after it
    (residual_add), so that it holds half the registers during the poll."""
    if NORM:
        return tl.load(residual_in_ptr + row * H + cols, mask=cm, other=0)
    return tl.zeros(cols.shape, residual_in_ptr.dtype.element_ty)


@triton.jit
def residual_add(s, r, row, cols, cm, H, out_ptr, residual_out_ptr, NORM: tl.constexpr,
                 WRITE_OUTPUT: tl.constexpr):
    """From the sum chunk `s` (fp32, or already in the output dtype) and residual `r`
    (load_residual): write output = cast(s) (kAllReduce, or when asked), and for
    residual patterns residual_out = h = cast(cast(s) + r). Returns h (cast(s) without
    a residual). Masked lanes must hold s = 0."""
    DT = out_ptr.dtype.element_ty
    offs = row * H + cols
    sd = s.to(DT)
    if NORM:
        if WRITE_OUTPUT:
            tl.store(out_ptr + offs, sd, mask=cm)
        h = (sd.to(tl.float32) + r.to(tl.float32)).to(DT)
        tl.store(residual_out_ptr + offs, h, mask=cm)
    else:
        h = sd
        tl.store(out_ptr + offs, h, mask=cm)
    return h


@triton.jit
def quant_scale(scale_ptr, scale_value, QUANT: tl.constexpr, SCALE_FROM_PTR: tl.constexpr):
    """The factor the quantiser multiplies by: for static FP8 the reciprocal of the
    scale, rounded once (FlashInfer's and vLLM's form), for NVFP4 the scale itself.
    The scale is element 0 of a device tensor of any floating dtype, as fp32 (read at
    run time: CUDA-graph friendly), or a float."""
    if SCALE_FROM_PTR:
        scale = tl.load(scale_ptr).to(tl.float32)
    else:
        scale = scale_value
    if QUANT == QUANT_FP8:
        scale = tl.div_rn(1.0, scale)
    return scale


@triton.jit
def inv_rms(ssq, H, eps):
    """1 / sqrt(ssq / H + eps), each step correctly rounded."""
    return tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(ssq, tl.cast(H, tl.float32)) + eps))


@triton.jit
def load_gamma(gamma_ptr, cols, cm, weight_bias):
    """gamma + weight_bias for a chunk of columns, fp32 (the same for every row)."""
    return gamma_weight(tl.load(gamma_ptr + cols, mask=cm, other=0), weight_bias)


@triton.jit
def gamma_weight(gamma, weight_bias):
    """gamma (as loaded) + weight_bias, fp32."""
    return gamma.to(tl.float32) + weight_bias


@triton.jit
def normalize(hf, gw, rstd, DT: tl.constexpr):
    """cast(h * rstd * (gamma + weight_bias)); returned as fp32 of the rounded value."""
    return (hf * rstd * gw).to(DT).to(tl.float32)


@triton.jit
def dynamic_scale(amax, row, scale_out_ptr):
    """Per-token FP8 scale max(amax / 448, 2^-9 / 448), written to scale_out[row]."""
    scale = tl.maximum(tl.div_rn(amax, FP8_MAX), MIN_DYNAMIC_SCALE)
    tl.store(scale_out_ptr + row, scale)
    return scale


# divide_by: the divisors it takes the short way; quotients below DIV_TINY it leaves unrefined.
DIV_MIN = tl.constexpr(2.0**-32)
DIV_MAX = tl.constexpr(2.0**32)
DIV_TINY = tl.constexpr(2.0**-64)


@triton.jit
def divide_by(x, s):
    """x / s for fp32 `x` and one divisor `s` for all of it (dynamic FP8's per-token
    scale), as div_rn gives it wherever
    |x / s| >= 2^-62; below, where every code of the formats quantised here is a zero, a
    value of the same sign.

    Hopper's div.rn.f32 checks each quotient's range and branches around a slow path, so
    a thread's divisions ran one after another. Here, for 2^-32 <= s <= 2^32: y = RN(1/s)
    once; q = RN(x y), within 1.5 ulp of x / s; a Newton step q + RN(x - s q) y brings it
    within 1 ulp; Markstein's correction RN(q + (x - s q) y), whose residual is then
    exact, is RN(x / s) for a correctly rounded y, barring underflow (|q| >= 2^-64 and the
    range of s keep |x| >= 2^-96). Where that result is NaN (x infinite or NaN, or x y
    overflowing) or under 2^-64 (a zero would lose the sign of -0.0), x y stands instead:
    infinite or NaN as x / s is, large enough to saturate, or tiny of the right sign.
    Other divisors (zero, NaN, huge or tiny: an infinite row's scale) take div_rn.
    tests/gpu/test_quant.py compares the two on every bf16 value and a million random
    fp32 bit patterns."""
    if (s >= DIV_MIN) & (s <= DIV_MAX):
        y = tl.div_rn(1.0, s)
        q = x * y
        q = tl.fma(tl.fma(-s, q, x), y, q)
        q = tl.fma(tl.fma(-s, q, x), y, q)
        q = tl.where((tl.abs(q) >= DIV_TINY) & (q == q), q, x * y)
    else:
        q = tl.div_rn(x, tl.zeros_like(x) + s)
    return q


@triton.jit
def e4m3(x):
    """Round fp32 to float8_e4m3fn, nearest even, saturating at +-448."""
    return tl.clamp(x, -FP8_MAX, FP8_MAX).to(tl.float8e4nv)


@triton.jit
def e2m1_codes(y):
    """4-bit E2M1 codes (int32) of fp32 `y`: nearest, ties to even, saturating at 6."""
    a = tl.abs(y)
    mag = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
           + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
           + (a > 5.0).to(tl.int32))
    sign = (y.to(tl.int32, bitcast=True) >> 31) & 1
    return mag | (sign << 3)


@triton.jit
def store_nvfp4(nf, row, c0, H, quant_ptr, scale_out_ptr, scale_factor,
                BLOCK: tl.constexpr, LAYOUT: tl.constexpr):
    """Quantise one chunk (columns c0 .. c0+BLOCK) to packed E2M1 + E4M3 block scales."""
    NB: tl.constexpr = BLOCK // 16
    v = tl.reshape(nf, [NB, 16])
    amax = tl.max(tl.abs(v), axis=1)
    sf = e4m3(tl.div_rn(scale_factor * amax, 6.0))
    sf_f = sf.to(tl.float32)
    k = tl.where(sf_f == 0.0, 0.0, tl.div_rn(tl.zeros_like(sf_f) + scale_factor, sf_f))
    # Pack pairs, low nibble first: the nibbles do not overlap, so a sum is an or.
    pairs = tl.reshape(e2m1_codes(v * k[:, None]), [BLOCK // 2, 2])
    packed = tl.sum(pairs << (tl.arange(0, 2) * 4)[None, :], axis=1)
    pcols = c0 // 2 + tl.arange(0, BLOCK // 2)
    tl.store(quant_ptr + row * (H // 2) + pcols, packed.to(tl.uint8), mask=pcols < H // 2)
    kb = c0 // 16 + tl.arange(0, NB)
    off = sf_offset(row, kb, H // 16, LAYOUT)
    tl.store(scale_out_ptr + off, sf.to(tl.uint8, bitcast=True), mask=kb < H // 16)


@triton.jit
def store_normalized(nf, row, c0, cols, cm, H, norm_out_ptr, quant_ptr, scale_out_ptr,
                     qscale, dyn_scale, WRITE_NORM: tl.constexpr,
                     QUANT: tl.constexpr, LAYOUT: tl.constexpr, BLOCK: tl.constexpr):
    """Write one chunk of the normalised row and its quantisation (`qscale`:
    quant_scale)."""
    offs = row * H + cols
    if WRITE_NORM:
        tl.store(norm_out_ptr + offs, nf.to(norm_out_ptr.dtype.element_ty), mask=cm)
    if QUANT == QUANT_FP8:
        tl.store(quant_ptr + offs, e4m3(nf * qscale), mask=cm)
    elif QUANT == QUANT_DYNAMIC_FP8:
        tl.store(quant_ptr + offs, e4m3(divide_by(nf, dyn_scale)), mask=cm)
    elif QUANT == QUANT_NVFP4:
        store_nvfp4(nf, row, c0, H, quant_ptr, scale_out_ptr, qscale, BLOCK, LAYOUT)


@triton.jit
def finish_row(h, row, cols, cm, H, gw, norm_out_ptr, quant_ptr, scale_out_ptr, eps,
               qscale, WRITE_NORM: tl.constexpr,
               QUANT: tl.constexpr, LAYOUT: tl.constexpr, BLOCK: tl.constexpr):
    """RMSNorm + quantisation of a row held whole in registers (one chunk); `gw`:
    load_gamma of the row."""
    hf = h.to(tl.float32)
    rstd = inv_rms(tl.sum(hf * hf, axis=0), H, eps)
    nf = normalize(hf, gw, rstd, h.dtype)
    dyn = 0.0
    if QUANT == QUANT_DYNAMIC_FP8:
        dyn = dynamic_scale(tl.max(tl.abs(nf), axis=0), row, scale_out_ptr)
    store_normalized(nf, row, 0, cols, cm, H, norm_out_ptr, quant_ptr, scale_out_ptr,
                     qscale, dyn, WRITE_NORM, QUANT, LAYOUT, BLOCK)


@triton.jit
def finish_row_chunked(row, H, residual_out_ptr, gamma_ptr, norm_out_ptr, quant_ptr,
                       scale_out_ptr, eps, weight_bias, qscale,
                       WRITE_NORM: tl.constexpr, QUANT: tl.constexpr, LAYOUT: tl.constexpr,
                       BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """RMSNorm + quantisation of a row already written to residual_out, chunk by chunk."""
    tl.debug_barrier()  # residual_out of this row was written by other threads of this CTA
    DT = residual_out_ptr.dtype.element_ty
    base = residual_out_ptr + row * H
    ssq = 0.0
    for c in tl.static_range(NUM_CHUNKS):
        cols = c * BLOCK + tl.arange(0, BLOCK)
        hf = tl.load(base + cols, mask=cols < H, other=0).to(tl.float32)
        ssq += tl.sum(hf * hf, axis=0)
    rstd = inv_rms(ssq, H, eps)
    dyn = 0.0
    if QUANT == QUANT_DYNAMIC_FP8:
        amax = 0.0
        for c in tl.static_range(NUM_CHUNKS):
            cols = c * BLOCK + tl.arange(0, BLOCK)
            cm = cols < H
            hf = tl.load(base + cols, mask=cm, other=0).to(tl.float32)
            nf = normalize(hf, load_gamma(gamma_ptr, cols, cm, weight_bias), rstd, DT)
            amax = tl.maximum(amax, tl.max(tl.abs(nf), axis=0))
        dyn = dynamic_scale(amax, row, scale_out_ptr)
    for c in tl.static_range(NUM_CHUNKS):
        cols = c * BLOCK + tl.arange(0, BLOCK)
        cm = cols < H
        hf = tl.load(base + cols, mask=cm, other=0).to(tl.float32)
        nf = normalize(hf, load_gamma(gamma_ptr, cols, cm, weight_bias), rstd, DT)
        store_normalized(nf, row, c * BLOCK, cols, cm, H, norm_out_ptr, quant_ptr,
                         scale_out_ptr, qscale, dyn, WRITE_NORM, QUANT, LAYOUT, BLOCK)


@triton.jit
def process_rows(PRODUCE: tl.constexpr, rot_ptr, stride, T, H, sig, rank, deadline,
                 state_ptr, err_addr, out_ptr, residual_in_ptr, residual_out_ptr, gamma_ptr,
                 norm_out_ptr, quant_ptr, scale_out_ptr, eps, weight_bias, qscale,
                 NORM: tl.constexpr, WRITE_OUTPUT: tl.constexpr, WRITE_NORM: tl.constexpr,
                 QUANT: tl.constexpr, LAYOUT: tl.constexpr, BLOCK: tl.constexpr,
                 NUM_CHUNKS: tl.constexpr, WORLD: tl.constexpr):
    """Rows pid, pid+P, ...: `PRODUCE` (the strategy's) yields each chunk's h and
    writes output/residual_out; then RMSNorm and quantisation of the whole row. The
    first chunk a program produces also checks the call signature (protocol.py)."""
    pid = tl.program_id(0)
    if NUM_CHUNKS == 1:
        cols = tl.arange(0, BLOCK)
        cm = cols < H
        gamma = tl.zeros([BLOCK], gamma_ptr.dtype.element_ty)
        if NORM:  # once for all rows, in its own dtype: half the registers during a poll
            gamma = tl.load(gamma_ptr + cols, mask=cm, other=0)
        for row in range(pid, T, tl.num_programs(0)):
            h = PRODUCE(rot_ptr, stride, row, cols, cm, H, row == pid, sig, rank, deadline,
                        state_ptr, err_addr, out_ptr, residual_in_ptr, residual_out_ptr, NORM,
                        WRITE_OUTPUT, WORLD)
            if NORM:
                finish_row(h, row, cols, cm, H, gamma_weight(gamma, weight_bias), norm_out_ptr,
                           quant_ptr, scale_out_ptr, eps, qscale, WRITE_NORM, QUANT,
                           LAYOUT, BLOCK)
    else:
        for row in range(pid, T, tl.num_programs(0)):
            for c in tl.static_range(NUM_CHUNKS):
                cols = c * BLOCK + tl.arange(0, BLOCK)
                PRODUCE(rot_ptr, stride, row, cols, cols < H, H, (row == pid) & (c == 0), sig,
                        rank, deadline, state_ptr, err_addr, out_ptr, residual_in_ptr,
                        residual_out_ptr, NORM, WRITE_OUTPUT, WORLD)
            if NORM:
                finish_row_chunked(row, H, residual_out_ptr, gamma_ptr, norm_out_ptr,
                                   quant_ptr, scale_out_ptr, eps, weight_bias, qscale,
                                   WRITE_NORM, QUANT, LAYOUT, BLOCK, NUM_CHUNKS)
