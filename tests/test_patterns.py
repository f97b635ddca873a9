"""Pattern and layout constants, traits, and the scale-layout index math."""

import pytest
import torch

from arfusion import AllReduceFusionPattern as P
from arfusion import QuantizationSFLayout as L
from arfusion.patterns import KERNEL_PATTERNS, PATTERNS, Quant, sf_offset, sf_size


def test_constants_match_flashinfer():
    assert [P.kAllReduce, P.kARResidualRMSNorm, P.kARResidualRMSNormFP8Quant,
            P.kARResidualRMSNormFP4Quant, P.kARResidualRMSNormOutFP8Quant,
            P.kARResidualRMSNormOutFP4Quant, P.kARResidualRMSNormDynamicFP8Quant,
            P.kARResidualRMSNormOutDynamicFP8Quant] == [0, 1, 2, 3, 4, 5, 10, 11]
    assert (L.SWIZZLED_128x4, L.SWIZZLED_8x4, L.LINEAR) == (0, 1, 2)
    assert [P.kMoEReductionARResidualRMSNorm, P.kMoEFinalizeARResidualRMSNorm,
            P.kARResidualRMSNormPerTokenGroupFP8PackedQuant,
            P.kARResidualRMSNormOutPerTokenGroupFP8PackedQuant] == [6, 7, 8, 9]
    assert sorted(PATTERNS) == list(range(12))
    assert KERNEL_PATTERNS == (0, 1, 2, 3, 4, 5, 10, 11)


def test_traits_table():
    assert PATTERNS[0].returns == "output" and not PATTERNS[0].norm
    assert PATTERNS[1].returns == "norm_out" and PATTERNS[1].norm_out
    for code, quant, out in [(2, Quant.FP8, False), (3, Quant.NVFP4, False),
                             (4, Quant.FP8, True), (5, Quant.NVFP4, True),
                             (10, Quant.DYNAMIC_FP8, False), (11, Quant.DYNAMIC_FP8, True)]:
        t = PATTERNS[code]
        assert (t.quant, t.norm_out, t.norm, t.returns) == (quant, out, True, "quant_out")


# (m, k, K) -> byte offset, derived by hand from the formulas of docs/contract.md.
HAND_128x4 = [((0, 0, 8), 0), ((1, 0, 8), 16), ((32, 0, 8), 4), ((0, 1, 8), 1),
              ((0, 4, 8), 512), ((128, 0, 8), 1024), ((33, 5, 8), 533),
              ((127, 7, 8), 1023), ((130, 2, 5), 1024 + 2 * 16 + 2), ((5, 4, 5), 512 + 80)]
HAND_8x4 = [((0, 0, 8), 0), ((1, 0, 8), 4), ((7, 3, 8), 31), ((0, 4, 8), 32),
            ((8, 0, 8), 64), ((9, 5, 8), 101), ((17, 6, 7), 2 * 64 + 32 + 4 + 2)]
HAND_LINEAR = [((2, 3, 8), 19), ((0, 0, 1), 0), ((5, 2, 3), 17)]


@pytest.mark.parametrize("layout,cases", [(L.SWIZZLED_128x4, HAND_128x4),
                                          (L.SWIZZLED_8x4, HAND_8x4), (L.LINEAR, HAND_LINEAR)])
def test_sf_offset_matches_hand_derived_values(layout, cases):
    for (m, k, kk), want in cases:
        assert sf_offset(m, k, kk, layout) == want, (m, k, kk)


def test_sf_sizes():
    assert sf_size(1, 1, L.SWIZZLED_128x4) == 512
    assert sf_size(129, 5, L.SWIZZLED_128x4) == 256 * 8
    assert sf_size(9, 5, L.SWIZZLED_8x4) == 16 * 8
    assert sf_size(3, 5, L.LINEAR) == 15


@pytest.mark.parametrize("layout", [0, 1, 2])
@pytest.mark.parametrize("t,kb", [(1, 1), (7, 3), (130, 9), (257, 4)])
def test_sf_offsets_are_a_bijection_into_the_buffer(layout, t, kb):
    m = torch.arange(t).unsqueeze(1)
    k = torch.arange(kb).unsqueeze(0)
    off = sf_offset(m, k, kb, layout).reshape(-1)
    assert off.unique().numel() == t * kb
    assert int(off.min()) >= 0 and int(off.max()) < sf_size(t, kb, layout)
