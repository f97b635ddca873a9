"""Patterns 6-9's reference (arfusion.moe) against plain scalar fp32 loops and
DeepGEMM's strided int32 scale layout, built independently here."""

import math

import numpy as np
import pytest
import torch

from arfusion import moe
from arfusion.reference import e4m3

f32 = np.float32


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({2: torch.int16, 4: torch.int32}[x.element_size()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_finalize_is_the_k_order_fp32_sum_rounded_once(dtype):
    g = torch.Generator().manual_seed(3)
    t, h, top_k, rows = 5, 24, 4, 40
    permuted = torch.randn(rows, h, generator=g).to(dtype)
    index = torch.randint(0, 30, (t, top_k), generator=g, dtype=torch.int32)
    index[0, 1] = -1
    index[2] = -1  # a token with every slot dropped: only its shared term
    index[3, 2] = index[3, 0]  # a duplicate
    permuted[30:] = float("nan")  # rows no index names: a stray read shows
    weights = torch.rand(t, top_k, generator=g).to(dtype)
    shared = torch.randn(t, h, generator=g).to(dtype)
    for w, sh in [(weights, shared), (None, shared), (weights, None), (weights.float(), None)]:
        got = moe.moe_finalize_input(permuted, index, w, sh)
        want = np.zeros((t, h), dtype=f32)
        x = permuted.float().numpy()
        for i in range(t):
            acc = np.zeros(h, dtype=f32)
            for k in range(top_k):
                if index[i, k] == -1:
                    continue
                p = x[index[i, k]]
                acc = acc + (p if w is None else p * f32(w[i, k].float()))
            want[i] = acc if sh is None else acc + sh[i].float().numpy()
        assert torch.equal(_bits(got), _bits(torch.from_numpy(want).to(dtype)))
        assert not torch.isnan(got).any()


def test_moe_reduction_is_the_expert_order_fp32_sum_then_the_token_input():
    g = torch.Generator().manual_seed(4)
    e, t, h = 3, 4, 16
    active = torch.randn(e, t, h, generator=g).to(torch.bfloat16)
    scale = torch.rand(e, t, generator=g)
    token = torch.randn(t, h, generator=g).to(torch.bfloat16)
    got = moe.moe_reduction_input(active, scale, token, e)
    a, s = active.float().numpy(), scale.numpy()
    acc = np.zeros((t, h), dtype=f32)
    for i in range(e):
        acc = acc + a[i] * s[i][:, None]
    want = torch.from_numpy(acc + token.float().numpy()).to(torch.bfloat16)
    assert torch.equal(_bits(got), _bits(want))
    # Zero experts: the token input alone; negative zeros sum to +0.0.
    assert torch.equal(moe.moe_reduction_input(active, scale, token, 0), token)
    neg = torch.full((t, h), -0.0, dtype=torch.bfloat16)
    zero = moe.moe_reduction_input(neg.expand(e, t, h).contiguous(), scale, neg, e)
    assert not torch.signbit(zero.float()).any()


def _deepgemm_storage(exponents: torch.Tensor, t: int, kg: int) -> torch.Tensor:
    """The bytes of torch.empty_strided((T, Kp), (1, Tm), int32) filled pack by pack."""
    kp, tm = -(-kg // 4), -(-t // 4) * 4
    words = torch.zeros(t + (kp - 1) * tm, dtype=torch.int64)
    view = torch.as_strided(words, (t, kp), (1, tm))
    for i in range(t):
        for p in range(kp):
            word = 0
            for b in range(4):
                if 4 * p + b < kg:
                    word |= int(exponents[i, 4 * p + b]) << (8 * b)
            view[i, p] = word
    return torch.from_numpy(words.numpy().astype(np.uint32).view(np.uint8).copy())


@pytest.mark.parametrize("t,h,group", [(1, 128, 128), (3, 384, 128), (5, 4096, 128),
                                       (7, 96, 2), (4, 7200, 48), (9, 5120, 32), (6, 36, 12)])
def test_group_fp8_codes_scales_and_packed_layout(t, h, group):
    g = torch.Generator().manual_seed(t * 1000 + group)
    n = (torch.randn(t, h, generator=g) * torch.rand(t, 1, generator=g) * 300).to(torch.bfloat16)
    n[0, :group] = 0.0  # an all-zero group: the 1e-10 floor
    codes, storage = moe.quantize_group_fp8(n, group)
    kg = h // group
    assert storage.numel() == moe.group_fp8_scale_bytes(t, h, group)
    scales = moe.read_group_fp8_scales(storage, t, h, group)
    exps = torch.zeros(t, kg, dtype=torch.int64)
    v = n.float().reshape(t, kg, group)
    for i in range(t):
        for j in range(kg):
            amax = float(v[i, j].abs().max())
            y = max(float(f32(amax) / f32(448.0)), float(f32(1e-10)))
            y = float(f32(y))
            mant, exp = math.frexp(y)  # y = mant * 2^exp, mant in [0.5, 1)
            y2 = 2.0 ** (exp - 1) if mant == 0.5 else 2.0 ** exp
            assert float(scales[i, j]) == y2, (i, j, y, float(scales[i, j]))
            exps[i, j] = int(math.log2(y2)) + 127
            assert amax / y2 <= 448.0
            want = e4m3(v[i, j] / y2)
            assert torch.equal(codes.reshape(t, kg, group)[i, j].view(torch.uint8),
                               want.view(torch.uint8))
    assert int(exps[0, 0]) == 94  # 1e-10 rounds up to 2^-33
    assert torch.equal(storage, _deepgemm_storage(exps, t, kg))
    deq = moe.dequantize_group_fp8(codes, storage, group)
    assert torch.allclose(deq, n.float(), rtol=2**-3, atol=float(scales.max()) * 2**-9)
