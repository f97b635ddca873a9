"""arfusion.reference: the numerics of docs/contract.md, edge cases included."""

import pytest
import torch

from arfusion import reference as R
from arfusion.patterns import QuantizationSFLayout as L

F32 = torch.float32


def bits(t):
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def test_sum_is_fp32_in_rank_order():
    xs = [torch.tensor([1e8], dtype=F32), torch.tensor([1.0]), torch.tensor([-1e8])]
    assert R.allreduce_sum(xs).item() == 0.0  # (1e8 + 1) rounds back to 1e8
    assert R.allreduce_sum([xs[0], xs[2], xs[1]]).item() == 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, F32])
def test_sum_of_negative_zeros_is_positive_zero(dtype):
    xs = [torch.full((4,), -0.0, dtype=dtype) for _ in range(3)]
    out = R.reference_allreduce_fusion(xs, 0)["output"]
    assert torch.equal(bits(out), torch.zeros(4, dtype=bits(out).dtype))


def test_sum_of_16_bit_inputs_is_exact_in_fp32():
    xs = [torch.tensor([0.1, 3.0], dtype=torch.bfloat16) for _ in range(3)]
    want = (xs[0].double() * 3).float()
    assert torch.equal(R.allreduce_sum(xs), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, F32])
def test_rms_norm_against_float64(dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(9, 2880, generator=g).to(dtype)
    gamma = (torch.rand(2880, generator=g) + 0.5).to(dtype)
    for wb in (0.0, 1.0):
        got = R.rms_norm(h, gamma, 1e-6, wb)
        hd = h.double()
        want = hd / torch.sqrt((hd * hd).mean(-1, keepdim=True) + 1e-6) * (gamma.double() + wb)
        # 16-bit: the final rounding (<= 1 ulp) dominates; fp32: five roundings in a row.
        ulps = 4 if dtype == F32 else 1
        bound = want.abs() * torch.finfo(dtype).eps * ulps + 1e-30
        assert ((got.double() - want).abs() <= bound).all()


def _sumsq_exact(hf: torch.Tensor) -> torch.Tensor:
    """The contract's sum of squares from scratch, one row at a time in Python integers:
    each fp32 square truncated to a multiple of 2^(X - 166), summed, rounded once."""
    import numpy as np

    out = []
    for row in hf.double().numpy().astype(np.float32):
        q = row * row  # fp32 products, rounded
        if not np.isfinite(q).all():
            out.append(np.float32(q.sum()))
            continue
        fields = [(int(v.view(np.int32)) >> 23 & 0xFF, int(v.view(np.int32)) & 0x7FFFFF)
                  for v in q]
        big = max(max(x, 1) for x, _ in fields)
        total = sum(((m | (1 << 23) if x else m) << 16) >> min(big - max(x, 1), 63)
                    for x, m in fields)
        out.append(np.float32(np.float32(total) * np.float64(2.0) ** (big - 166)))
    return torch.tensor(np.array(out, dtype=np.float32)).unsqueeze(-1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, F32])
def test_sum_of_squares_is_order_free_and_the_contracts(dtype):
    """Any permutation of a row gives the same bits (what lets every kernel layout,
    chunk width and batch give them too), equal to the definition computed from scratch,
    within 2^-23 of the exact sum of the fp32 squares."""
    g = torch.Generator().manual_seed(3)
    h = (torch.randn(16, 1000, generator=g) * 3).to(dtype).float()
    h[1, :500] *= 1e-4  # magnitudes 2^13 apart
    h[2] = torch.finfo(dtype).tiny * torch.randn(1000, generator=g)  # subnormal-size values
    h[3] = 0.0
    h[4, ::7] = -h[4, ::7]
    ssq = R.sum_squares(h)
    for _ in range(3):
        perm = torch.randperm(1000, generator=g)
        assert torch.equal(bits(R.sum_squares(h[:, perm])), bits(ssq))
    assert torch.equal(bits(R.sum_squares(h)), bits(_sumsq_exact(h)))
    exact = (h * h).double().sum(-1, keepdim=True)  # the fp32 squares, added exactly
    assert ((ssq.double() - exact).abs() <= exact * 2.0**-23).all()
    assert ssq[3].item() == 0.0 and not torch.signbit(ssq[3])


def test_sum_of_squares_of_special_rows():
    """1e-30 next to 1e18 in fp32 (a square that underflows beside one that does not),
    a square beyond fp32 (inf), inf and NaN rows: as the contract says, in any order."""
    h = torch.tensor([[1e-30, 1e18, -3e-20, 0.0],
                      [2e19, 1.0, 0.0, 0.0],
                      [float("inf"), 1.0, 2.0, 0.0],
                      [float("nan"), float("inf"), 1.0, 0.0],
                      [-float("inf"), 0.0, 0.0, 0.0],
                      [1e-45, 1e-44, 0.0, 0.0]])
    ssq = R.sum_squares(h)
    assert ssq[0].item() == pytest.approx(1e36, rel=2**-23)
    assert ssq[1].item() == float("inf") and ssq[2].item() == float("inf")
    assert ssq[3].isnan().item() and ssq[4].item() == float("inf")
    assert ssq[5].item() == 0.0  # squares below the smallest subnormal
    for perm in ([3, 2, 1, 0], [1, 3, 0, 2]):
        assert torch.equal(bits(R.sum_squares(h[:, perm])), bits(ssq))


def test_sqrt_is_correctly_rounded_on_every_device():
    """torch.sqrt on the CPU is within 0.5001 ulp (SLEEF): this fp32 rounds the wrong way
    there. The reference's sqrt_rn rounds it right, as a GPU's sqrt.rn does."""
    x = torch.tensor([10.544156074523926 + 1e-6], dtype=F32)
    want = torch.tensor([float(x.double().sqrt())], dtype=F32)
    assert torch.equal(R.sqrt_rn(x), want)
    g = torch.Generator().manual_seed(4)
    xs = torch.rand(100000, generator=g) * 1000
    assert torch.equal(R.sqrt_rn(xs), xs.double().sqrt().float())


def test_residual_pattern_outputs():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 64, generator=g).half() for _ in range(2)]
    res = torch.randn(3, 64, generator=g).half()
    gamma = torch.ones(64).half()
    out = R.reference_allreduce_fusion(xs, 1, residual_in=res, rms_gamma=gamma)
    s = xs[0].float() + xs[1].float()
    assert torch.equal(out["output"], s.half())
    assert torch.equal(out["residual_out"], (s.half().float() + res.float()).half())
    assert torch.equal(out["norm_out"], R.rms_norm(out["residual_out"], gamma, 1e-6))


def test_sum_is_rounded_before_the_residual_is_added():
    """FlashInfer's rounding points: h = cast(cast(s) + r), not cast(s + r). Here s =
    1 + 2^-11 + 2^-20 rounds up to 1 + 2^-10, and adding r = 2^-11 then lands on a tie
    that rounds to even (1 + 2^-9); rounding once would give 1 + 2^-10."""
    xs = [torch.tensor([[1.0]]).half(), torch.tensor([[2.0**-11 + 2.0**-20]]).half()]
    res = torch.tensor([[2.0**-11]]).half()
    out = R.reference_allreduce_fusion(xs, 1, residual_in=res, rms_gamma=torch.ones(1).half())
    assert out["output"].item() == 1 + 2.0**-10
    assert out["residual_out"].item() == 1 + 2.0**-9
    assert (xs[0].float() + xs[1].float() + res.float()).half().item() == 1 + 2.0**-10


def test_static_fp8_multiplies_by_the_rounded_reciprocal():
    """quant_out = e4m3(n * fp32(1 / scale)) (FlashInfer's and vLLM's form). 10.9375 / 7
    is 1.5625, a tie that rounds to even (1.5); fp32(1 / 7) is a little above 1 / 7, so
    the product lies past the tie and rounds up to 1.625."""
    n = torch.tensor([10.9375, -10.9375])
    assert R.quantize_fp8(n, 7.0).float().tolist() == [1.625, -1.625]
    assert R.e4m3(n / torch.tensor([7.0])).float().tolist() == [1.5, -1.5]
    g = torch.randn(1 << 12, generator=torch.Generator().manual_seed(5)) * 100
    recip = torch.tensor([1.0]) / torch.tensor([0.37])
    assert torch.equal(bits(R.quantize_fp8(g, 0.37)), bits(R.e4m3(g * recip)))


def test_fp8_rounding_ties_saturation_and_signed_zero():
    n = torch.tensor([1.0625, 1.1875, 1000.0, -1000.0, -0.0, 448.0, 464.0], dtype=F32)
    q = R.quantize_fp8(n, 1.0).float()
    assert q.tolist()[:4] == [1.0, 1.25, 448.0, -448.0]
    assert bits(R.quantize_fp8(n, 1.0))[4].item() == 0x80  # -0.0 stays -0.0
    assert q.tolist()[5:] == [448.0, 448.0]
    assert R.quantize_fp8(torch.tensor([3.0]), 2.0).float().item() == 1.5  # times 1 / 2


def test_fp8_scale_tensor_equals_float():
    n = torch.randn(4, 33, generator=torch.Generator().manual_seed(2))
    assert torch.equal(bits(R.quantize_fp8(n, 0.37)),
                       bits(R.quantize_fp8(n, torch.tensor([0.37]))))


def test_e2m1_midpoints_round_half_to_even_and_saturate():
    y = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -0.25, -5.0, -0.0,
                      0.2500001, 0.7499999, 5.0000005])
    codes = R.e2m1_codes(y).tolist()
    assert codes[:9] == [0, 2, 2, 4, 4, 6, 6, 7, 7]
    assert codes[9:12] == [8, 8 | 6, 8]
    assert codes[12:] == [1, 1, 7]


def _nvfp4_row(values, scale):
    n = torch.tensor([values], dtype=torch.bfloat16)
    packed, sf = R.quantize_nvfp4(n, scale, L.LINEAR)
    return R.unpack_nvfp4(packed)[0].tolist(), sf.view(torch.float8_e4m3fn).float().tolist()


def test_nvfp4_block_with_amax_6_keeps_midpoints():
    vals = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 0.0, -6.0]
    got, sf = _nvfp4_row(vals, 1.0)
    assert sf == [1.0]
    assert got == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 0.0,
                   -6.0]


def test_nvfp4_zero_block_tiny_and_huge_scales():
    zero, sf = _nvfp4_row([0.0] * 8 + [-0.0] * 8, 5.0)
    assert sf == [0.0] and all(v == 0 for v in zero)
    packed, _ = R.quantize_nvfp4(torch.tensor([[-0.0] * 16], dtype=torch.bfloat16), 5.0, 2)
    assert packed[0].tolist() == [0x88] * 8  # sign of -0.0 kept
    tiny, sf = _nvfp4_row([1.0] * 16, 1e-30)
    assert sf == [0.0] and tiny == [0.0] * 16
    huge, sf = _nvfp4_row([1.0, -2.0] * 8, 1e30)
    assert sf == [448.0] and huge == [6.0, -6.0] * 8  # scale saturates, codes saturate


def test_nvfp4_packs_low_nibble_first():
    packed, _ = R.quantize_nvfp4(torch.tensor([[0.5, 6.0] + [0.0] * 14]).half(), 1.0, 2)
    assert packed[0, 0].item() == 0x71


def test_dynamic_fp8_scale_and_zero_row():
    n = torch.tensor([[448.0, -224.0, 1.0], [0.0, 0.0, -0.0]], dtype=F32)
    q, s = R.quantize_dynamic_fp8(n)
    assert s[0, 0].item() == 1.0 and s[1, 0].item() == R.DYNAMIC_FP8_MIN_SCALE
    assert q.float()[0].tolist() == [448.0, -224.0, 1.0]


@pytest.mark.parametrize("layout", [0, 1, 2])
def test_scales_roundtrip_through_every_layout(layout):
    sf = torch.randint(0, 127, (37, 6), dtype=torch.uint8)
    laid = R.scatter_scales(sf, layout)
    assert torch.equal(R.read_scales(laid, 37, 6 * 16, layout),
                       sf.view(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("layout", [0, 1, 2])
def test_dequantize_nvfp4_is_within_half_a_step(layout):
    g = torch.Generator().manual_seed(3)
    n = (torch.randn(5, 64, generator=g) * 3).bfloat16()
    packed, sf = R.quantize_nvfp4(n, 448 * 6 / 12.0, layout)
    back = R.dequantize_nvfp4(packed, sf, 448 * 6 / 12.0, layout)
    block = R.read_scales(sf, 5, 64, layout).repeat_interleave(16, dim=1) / (448 * 6 / 12.0)
    assert ((back - n.float()).abs() <= block * 1.0 + 1e-6).all()


def test_dequantize_fp8_static_and_dynamic():
    n = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    q = R.quantize_fp8(n, 0.5)
    assert torch.equal(R.dequantize_fp8(q, 0.5), n)
    qd, s = R.quantize_dynamic_fp8(n)
    assert torch.allclose(R.dequantize_fp8(qd, s), n)
