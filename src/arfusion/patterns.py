"""Fusion patterns, scale-factor layouts, and the one table everything else reads.

`PATTERNS` says, per pattern, what a call reads and writes and how it quantises.
Validation, the reference, the torch backend and the kernel launch all look
patterns up here, so a new pattern is a new row, not a new if-chain.

`sf_offset` is the NVFP4 scale-factor index math. It is written with plain
arithmetic only, so the same function body runs on Python ints, on torch tensors
(the reference) and, wrapped by `triton.jit`, inside the kernels.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

# Element types of the communication tensors (input, residuals, norm outputs).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class AllReduceFusionPattern:
    """Integer pattern codes, identical to `flashinfer.comm.AllReduceFusionPattern`."""

    kAllReduce = 0
    kARResidualRMSNorm = 1
    kARResidualRMSNormFP8Quant = 2
    kARResidualRMSNormFP4Quant = 3
    kARResidualRMSNormOutFP8Quant = 4
    kARResidualRMSNormOutFP4Quant = 5
    kMoEReductionARResidualRMSNorm = 6
    kMoEFinalizeARResidualRMSNorm = 7
    kARResidualRMSNormPerTokenGroupFP8PackedQuant = 8
    kARResidualRMSNormOutPerTokenGroupFP8PackedQuant = 9
    kARResidualRMSNormDynamicFP8Quant = 10
    kARResidualRMSNormOutDynamicFP8Quant = 11


class QuantizationSFLayout:
    """NVFP4 scale-factor layouts, identical to `flashinfer.comm.QuantizationSFLayout`."""

    SWIZZLED_128x4 = 0
    SWIZZLED_8x4 = 1
    LINEAR = 2


LAYOUT_NAMES = {0: "SWIZZLED_128x4", 1: "SWIZZLED_8x4", 2: "LINEAR"}


class Quant(enum.IntEnum):
    """How the normalised row is quantised (a kernel constexpr, hence an int)."""

    NONE = 0
    FP8 = 1  # static per-tensor FP8: scale_factor divides
    NVFP4 = 2  # E2M1 codes + E4M3 block scales; scale_factor multiplies
    DYNAMIC_FP8 = 3  # per-token FP8 scale written to scale_out
    GROUP_FP8 = 4  # per-token-group FP8, packed UE8M0 scales (DeepGEMM) in scale_out


@dataclass(frozen=True)
class PatternTraits:
    name: str
    norm: bool  # residual add + RMSNorm (writes residual_out)
    norm_out: bool  # also writes the normalised row to norm_out
    quant: Quant

    @property
    def returns(self) -> str:
        """Which output allreduce_fusion returns for this pattern."""
        if self.quant != Quant.NONE:
            return "quant_out"
        return "norm_out" if self.norm else "output"


P = AllReduceFusionPattern
PATTERNS: dict[int, PatternTraits] = {
    P.kAllReduce: PatternTraits("kAllReduce", False, False, Quant.NONE),
    P.kARResidualRMSNorm: PatternTraits("kARResidualRMSNorm", True, True, Quant.NONE),
    P.kARResidualRMSNormFP8Quant: PatternTraits(
        "kARResidualRMSNormFP8Quant", True, False, Quant.FP8
    ),
    P.kARResidualRMSNormFP4Quant: PatternTraits(
        "kARResidualRMSNormFP4Quant", True, False, Quant.NVFP4
    ),
    P.kARResidualRMSNormOutFP8Quant: PatternTraits(
        "kARResidualRMSNormOutFP8Quant", True, True, Quant.FP8
    ),
    P.kARResidualRMSNormOutFP4Quant: PatternTraits(
        "kARResidualRMSNormOutFP4Quant", True, True, Quant.NVFP4
    ),
    P.kARResidualRMSNormDynamicFP8Quant: PatternTraits(
        "kARResidualRMSNormDynamicFP8Quant", True, False, Quant.DYNAMIC_FP8
    ),
    P.kARResidualRMSNormOutDynamicFP8Quant: PatternTraits(
        "kARResidualRMSNormOutDynamicFP8Quant", True, True, Quant.DYNAMIC_FP8
    ),
    P.kMoEReductionARResidualRMSNorm: PatternTraits(
        "kMoEReductionARResidualRMSNorm", True, True, Quant.NONE
    ),
    P.kMoEFinalizeARResidualRMSNorm: PatternTraits(
        "kMoEFinalizeARResidualRMSNorm", True, True, Quant.NONE
    ),
    P.kARResidualRMSNormPerTokenGroupFP8PackedQuant: PatternTraits(
        "kARResidualRMSNormPerTokenGroupFP8PackedQuant", True, False, Quant.GROUP_FP8
    ),
    P.kARResidualRMSNormOutPerTokenGroupFP8PackedQuant: PatternTraits(
        "kARResidualRMSNormOutPerTokenGroupFP8PackedQuant", True, True, Quant.GROUP_FP8
    ),
}
# The MoE patterns: each rank all-reduces what it builds from its expert outputs
# (arfusion.moe), not `input` as it is.
MOE_PATTERNS = (P.kMoEReductionARResidualRMSNorm, P.kMoEFinalizeARResidualRMSNorm)
# The patterns the Triton kernels (trtllm, mnnvl, world size 1) serve; the torch backend
# serves every pattern in PATTERNS.
KERNEL_PATTERNS = tuple(code for code, t in sorted(PATTERNS.items())
                        if t.quant != Quant.GROUP_FP8 and code not in MOE_PATTERNS)

NVFP4_BLOCK = 16  # values per E4M3 block scale


def pattern_supports(pattern: int, hidden_dim: int, dtype: torch.dtype) -> bool:
    """Whether `pattern` accepts this hidden size and dtype (NVFP4 needs 16-bit, H % 16)."""
    if PATTERNS[pattern].quant == Quant.NVFP4:
        return dtype != torch.float32 and hidden_dim % NVFP4_BLOCK == 0
    return True
FP8_MAX = 448.0  # largest finite float8_e4m3fn
E2M1_MAX = 6.0  # largest E2M1 magnitude


def sf_offset(m, k, num_blocks, layout):
    """Byte offset of the scale of row `m`, block `k` in an NVFP4 `scale_out`.

    `num_blocks` is K = hidden_dim // 16. Tiles: SWIZZLED_128x4 stores 128 rows x
    4 blocks in 512 bytes (row m%32 picks a 16-byte line, (m%128)//32 a 4-byte group
    in it); SWIZZLED_8x4 stores 8 rows x 4 blocks in 32 bytes; LINEAR is row-major.
    `layout` must be a compile-time constant inside a kernel.
    """
    k_tiles = (num_blocks + 3) // 4
    if layout == 0:
        return (
            (m // 128) * k_tiles * 512
            + (k // 4) * 512
            + (m % 32) * 16
            + ((m % 128) // 32) * 4
            + k % 4
        )
    elif layout == 1:
        return (m // 8) * k_tiles * 32 + (k // 4) * 32 + (m % 8) * 4 + k % 4
    else:
        return m * num_blocks + k


def sf_size(num_tokens: int, num_blocks: int, layout: int) -> int:
    """Bytes an NVFP4 `scale_out` needs for `num_tokens` rows of `num_blocks` blocks."""
    k_padded = (num_blocks + 3) // 4 * 4
    if layout == QuantizationSFLayout.SWIZZLED_128x4:
        return (num_tokens + 127) // 128 * 128 * k_padded
    if layout == QuantizationSFLayout.SWIZZLED_8x4:
        return (num_tokens + 7) // 8 * 8 * k_padded
    return num_tokens * num_blocks
