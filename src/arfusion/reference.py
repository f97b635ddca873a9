"""The numerics of docs/contract.md in plain torch: the oracle every backend is checked against.

Runs on CPU and CUDA tensors alike and gives the same bits on both: every step is a
single correctly rounded fp32 operation (add, multiply, divide, sqrt: `sqrt_rn`), every
division is tensor by tensor on one device, because torch turns division by a
Python or CPU scalar into multiplication by a reciprocal on CUDA, and the row's sum of
squares is an integer sum (`sum_squares`), the same in any order.

Unfused equivalent of one call, per rank r of N::

    s = 0.0 + x_0 + x_1 + ... + x_{N-1}          # fp32, rank order: identical bits everywhere
    output = cast(s)                               # kAllReduce
    h = residual_out = cast(cast(s) + residual_in) # residual patterns: the sum rounded first
    n = cast(h * (1 / sqrt(sum_squares(h) / H + eps)) * (gamma + weight_bias))
    quant_out, scale_out = quantise(n)             # FP8, NVFP4, dynamic or group FP8

The sum starts from +0.0, so a sum of zeros is +0.0 whatever their signs, at
every world size (the world-size-1 kernel adds its input to +0.0 too). The sum is
rounded to the input dtype before the residual is added, as FlashInfer, TensorRT-LLM
and the unfused path (all-reduce, then add) round it. `residual_in`, `rms_gamma`,
`weight_bias` and `scale_factor` are the rank's own: `epilogue` gives one rank's
outputs from the shared sum and that rank's tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from .patterns import (
    E2M1_MAX,
    FP8_MAX,
    NVFP4_BLOCK,
    PATTERNS,
    Quant,
    QuantizationSFLayout,
    sf_offset,
    sf_size,
)

# 2^-9 / 448 rounded once in fp32: the floor of the dynamic FP8 scale.
DYNAMIC_FP8_MIN_SCALE = float(np.float32(2.0**-9) / np.float32(FP8_MAX))

# E2M1 magnitudes by 3-bit code; the sign is bit 3.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    """`value` as a 1-element fp32 tensor on `like`'s device (keeps divisions exact)."""
    return torch.full((1,), value, dtype=torch.float32, device=like.device)


def _scale_tensor(scale_factor: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(scale_factor, torch.Tensor):  # element 0, as fp32
        return scale_factor.reshape(-1)[:1].to(device=like.device, dtype=torch.float32)
    return _const(float(scale_factor), like)


def allreduce_sum(inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """fp32 sum of every rank's input, in rank order, starting from +0.0."""
    s = torch.zeros(inputs[0].shape, dtype=torch.float32, device=inputs[0].device)
    for x in inputs:
        s = s + x.float()
    return s


# Fraction bits the row's sum of squares keeps below the largest square's significand.
SUMSQ_FRACTION_BITS = 16


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e as fp32 for int32 e in [-126, 127] (from the exponent bits: exact)."""
    return ((e + 127) << 23).view(torch.float32)


def sum_squares(hf: torch.Tensor) -> torch.Tensor:
    """The sum of squares of each row of fp32 `hf` ([..., H] -> [..., 1]) as the contract
    defines it, independent of any summation order:

        q_c = h_c * h_c (fp32, rounded) = m_c * 2^(x_c - 150), m_c < 2^24, x_c >= 1
        X = max_c x_c;  S = sum_c floor(m_c * 2^16 / 2^(X - x_c))   (int64: exact)
        ssq = fp32(S) * 2^(X - 166)       (one rounding, as two exact power-of-2 steps)

    Each square is truncated to a fixed point 2^-16 below the largest square's
    significand, so the integer sum is the same in any order, and rounded once. A row
    with an infinite or NaN square (X = 255) gets the float sum of its squares instead:
    inf or NaN whatever the order."""
    q = hf * hf
    bits = q.view(torch.int32)
    x = (bits >> 23) & 0xFF
    m = torch.where(x > 0, (bits & 0x7FFFFF) | 0x800000, bits & 0x7FFFFF).to(torch.int64)
    x = torch.clamp(x, min=1)  # subnormal squares share exponent 1's grid
    big = x.amax(-1, keepdim=True)
    shift = torch.clamp(big - x, max=63).to(torch.int64)
    total = ((m << SUMSQ_FRACTION_BITS) >> shift).sum(-1, keepdim=True)
    half = (big - 166) >> 1  # floor: both factors and the first product stay normal
    fixed = total.to(torch.float32) * _pow2(half) * _pow2(big - 166 - half)
    return torch.where(big == 255, q.sum(-1, keepdim=True), fixed)


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded fp32 square root. torch.sqrt on the CPU is SLEEF's, within
    0.5001 ulp: one fp32 in millions rounds the other way. In fp64, then rounded to fp32,
    it is exact on every device (53 >= 2 * 24 + 2 bits: no double-rounding error)."""
    return torch.sqrt(x.double()).float()


def rms_norm(
    h: torch.Tensor, gamma: torch.Tensor, eps: float, weight_bias: float = 0.0
) -> torch.Tensor:
    """cast(h * (1 / sqrt(sum_squares(h) / H + eps)) * (gamma + weight_bias)), in h's
    dtype."""
    hf = h.float()
    mean_sq = sum_squares(hf) / _const(hf.shape[-1], hf)
    rstd = _const(1.0, hf) / sqrt_rn(mean_sq + _const(eps, hf))
    weight = gamma.float() + _const(weight_bias, hf)
    return (hf * rstd * weight).to(h.dtype)


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to float8_e4m3fn, nearest even, saturating at +-448."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_fp8(n: torch.Tensor, scale_factor: float | torch.Tensor) -> torch.Tensor:
    """Static FP8: e4m3(clamp(float(n) * (1 / scale_factor))), the reciprocal rounded to
    fp32 first (FlashInfer's and vLLM's form)."""
    return e4m3(n.float() * (_const(1.0, n) / _scale_tensor(scale_factor, n)))


def quantize_dynamic_fp8(n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8: returns (codes [T, H], scales fp32 [T, 1])."""
    nf = n.float()
    amax = nf.abs().amax(-1, keepdim=True)
    scale = torch.maximum(amax / _const(FP8_MAX, nf), _const(DYNAMIC_FP8_MIN_SCALE, nf))
    return e4m3(nf / scale), scale


def e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes (uint8) of fp32 `y`: nearest value, ties to even, saturating."""
    a = y.abs()
    # Each threshold is a midpoint between neighbours; ">" rounds a tie down to the
    # even code, ">=" rounds it up to the even code.
    mag = (
        (a > 0.25).to(torch.uint8)
        + (a >= 0.75)
        + (a > 1.25)
        + (a >= 1.75)
        + (a > 2.5)
        + (a >= 3.5)
        + (a > 5.0)
    )
    return mag.to(torch.uint8) | (torch.signbit(y).to(torch.uint8) << 3)


def nvfp4_block_scales(n: torch.Tensor, scale_factor: float | torch.Tensor) -> torch.Tensor:
    """E4M3 block scales [T, H/16]: e4m3_satfinite(scale_factor * amax / 6) per block."""
    t, h = n.shape
    v = n.float().reshape(t, h // NVFP4_BLOCK, NVFP4_BLOCK)
    gs = _scale_tensor(scale_factor, v)
    return e4m3(gs * v.abs().amax(-1) / _const(E2M1_MAX, v))


def nvfp4_codes(n: torch.Tensor, block_scales: torch.Tensor,
                scale_factor: float | torch.Tensor) -> torch.Tensor:
    """Unpacked E2M1 codes [T, H] of `n` given its block scales: nearest of v * k,
    k = scale_factor / block_scale (0 where the block scale is 0)."""
    t, h = n.shape
    v = n.float().reshape(t, h // NVFP4_BLOCK, NVFP4_BLOCK)
    sf_f = block_scales.float()
    k = torch.where(sf_f == 0, torch.zeros_like(sf_f), _scale_tensor(scale_factor, v) / sf_f)
    return e2m1_codes(v * k.unsqueeze(-1)).reshape(t, h)


def quantize_nvfp4(
    n: torch.Tensor, scale_factor: float | torch.Tensor, layout: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4: returns (packed codes uint8 [T, H/2], scale bytes uint8 in `layout` order)."""
    sf = nvfp4_block_scales(n, scale_factor)
    codes = nvfp4_codes(n, sf, scale_factor)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed, scatter_scales(sf.view(torch.uint8), layout)


def _sf_index(t: int, k_blocks: int, layout: int, device: torch.device) -> torch.Tensor:
    m = torch.arange(t, device=device).unsqueeze(1)
    k = torch.arange(k_blocks, device=device).unsqueeze(0)
    return sf_offset(m, k, k_blocks, layout)


def scatter_scales(sf: torch.Tensor, layout: int) -> torch.Tensor:
    """Lay out [T, K] scale bytes in `layout` order (padding bytes are 0)."""
    t, k_blocks = sf.shape
    out = torch.zeros(sf_size(t, k_blocks, layout), dtype=torch.uint8, device=sf.device)
    out[_sf_index(t, k_blocks, layout, sf.device)] = sf.view(torch.uint8)
    return out


def read_scales(scale_out: torch.Tensor, num_tokens: int, hidden_dim: int, layout: int):
    """The [T, K] block scales (fp32) stored in an NVFP4 `scale_out` of any layout."""
    k_blocks = hidden_dim // NVFP4_BLOCK
    raw = scale_out.reshape(-1).view(torch.uint8)
    idx = _sf_index(num_tokens, k_blocks, layout, raw.device)
    return raw[idx].view(torch.float8_e4m3fn).float()


def unpack_nvfp4(packed: torch.Tensor) -> torch.Tensor:
    """E2M1 values (fp32 [T, H]) of packed codes [T, H/2] (low nibble first)."""
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)
    mag = table[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def dequantize_nvfp4(
    packed: torch.Tensor,
    scale_out: torch.Tensor,
    scale_factor: float | torch.Tensor,
    layout: int = QuantizationSFLayout.SWIZZLED_128x4,
) -> torch.Tensor:
    """Approximate float(n) back from NVFP4 output: e2m1 * block_scale / scale_factor."""
    t, h = packed.shape[0], packed.shape[1] * 2
    sf = read_scales(scale_out, t, h, layout)
    vals = unpack_nvfp4(packed).reshape(t, h // NVFP4_BLOCK, NVFP4_BLOCK)
    gs = _scale_tensor(scale_factor, vals)
    return (vals * sf.unsqueeze(-1) / gs).reshape(t, h)


def dequantize_fp8(quant_out: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """float(q) * scale: for static FP8 pass scale_factor, for dynamic FP8 scale_out."""
    if isinstance(scale, torch.Tensor) and scale.numel() > 1:
        return quant_out.float() * scale.reshape(-1, 1).float()
    return quant_out.float() * _scale_tensor(scale, quant_out)


def epilogue(
    s: torch.Tensor,
    dtype: torch.dtype,
    pattern: int,
    residual_in: torch.Tensor | None = None,
    rms_gamma: torch.Tensor | None = None,
    rms_eps: float = 1e-6,
    scale_factor: float | torch.Tensor | None = None,
    layout_code: int | None = None,
    weight_bias: float = 0.0,
    block_quant_group_size: int | None = None,
    quant: Quant | None = None,
) -> dict[str, torch.Tensor]:
    """Everything `pattern` writes on one rank, from the fp32 sum `s` and that rank's
    own residual_in, rms_gamma, weight_bias and scale_factor.

    Keys: "output" (always: cast(s)), and for residual patterns "residual_out",
    "norm_out" (the normalised row, also for patterns that only quantise it),
    "quant_out" and "scale_out" where the pattern quantises (per-token-group FP8:
    `arfusion.moe.quantize_group_fp8` of n in groups of `block_quant_group_size`).
    `quant` overrides the pattern's quantisation (pattern 6 with a `quant_out`: NVFP4,
    as pattern 5).
    """
    traits = PATTERNS[pattern]
    if quant is not None and quant != traits.quant:
        traits = replace(traits, quant=quant)
    out = {"output": s.to(dtype)}
    if not traits.norm:
        return out
    h = (out["output"].float() + residual_in.float()).to(dtype)
    n = rms_norm(h, rms_gamma, rms_eps, weight_bias)
    out["residual_out"] = h
    out["norm_out"] = n
    if traits.quant == Quant.FP8:
        out["quant_out"] = quantize_fp8(n, scale_factor)
    elif traits.quant == Quant.NVFP4:
        layout = QuantizationSFLayout.SWIZZLED_128x4 if layout_code is None else layout_code
        out["quant_out"], out["scale_out"] = quantize_nvfp4(n, scale_factor, layout)
    elif traits.quant == Quant.DYNAMIC_FP8:
        out["quant_out"], out["scale_out"] = quantize_dynamic_fp8(n)
    elif traits.quant == Quant.GROUP_FP8:
        from .moe import quantize_group_fp8  # moe builds on this module

        out["quant_out"], out["scale_out"] = quantize_group_fp8(n, block_quant_group_size)
    return out


def reference_allreduce_fusion(
    inputs: Sequence[torch.Tensor], pattern: int, **kwargs
) -> dict[str, torch.Tensor]:
    """What a rank must get from `allreduce_fusion` given every rank's input.

    `inputs[r]` is rank r's input; `kwargs` are `epilogue`'s, the rank's own
    (residual_in, rms_gamma, rms_eps, scale_factor, layout_code, weight_bias).
    """
    return epilogue(allreduce_sum(inputs), inputs[0].dtype, pattern, **kwargs)
