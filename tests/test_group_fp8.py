"""Patterns 8 and 9 (per-token-group FP8, DeepGEMM's packed UE8M0 scales) through the
public API on the CPU torch backend: the scale_out forms callers pass, every byte of
the packed storage (padding 0, nothing past it touched), argument checks, and the
kernel backends' refusal until their kernels serve these patterns."""

import types

import pytest
import torch

from arfusion import AllReduceFusionPattern as P
from arfusion import allreduce_fusion, create_allreduce_fusion_workspace, moe
from arfusion.patterns import KERNEL_PATTERNS
from arfusion.testing import Case, poison, run_processes

BF = torch.bfloat16
PREFILL = 0x7F7F7F7F  # vLLM's test fills the scale buffer with it and demands exact bytes


def deepgemm_scales(t: int, h: int, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the strided int32 (T, Kp) tensor FlashInfer checks, its storage) pre-filled."""
    _, kp, tm = moe.group_fp8_layout(t, h, g)
    storage = torch.full((moe.group_fp8_scale_bytes(t, h, g) // 4,), PREFILL, dtype=torch.int32)
    return storage.as_strided((t, kp), (1, tm)), storage


def expected(case: Case, world: int = 1) -> dict[str, torch.Tensor]:
    return case.reference(world, "cpu", 0)


@pytest.mark.parametrize("pattern", [P.kARResidualRMSNormPerTokenGroupFP8PackedQuant,
                                     P.kARResidualRMSNormOutPerTokenGroupFP8PackedQuant])
@pytest.mark.parametrize("t,h,g", [(1, 128, 128), (3, 640, 128), (5, 96, 3), (4, 240, 48),
                                   (7, 60, 12), (2, 16, 2), (6, 5 * 32, 32)])
def test_flashinfer_form_every_storage_byte(pattern, t, h, g):
    """T % 4 != 0 (padding rows), Kg % 4 != 0 (padding bytes in the last pack), G not a
    power of two: codes, residual_out, norm_out (9 only) and every storage byte exact."""
    case = Case(pattern, t, h, BF, seed=t * h + g, group=g, weight_bias=1.0 if t % 2 else 0.0)
    ref = expected(case)
    scale_out, storage = deepgemm_scales(t, h, g)
    outs = dict(residual_out=poison(torch.empty(t, h, dtype=BF)),
                norm_out=poison(torch.empty(t, h, dtype=BF)),
                quant_out=poison(torch.empty(t, h, dtype=torch.float8_e4m3fn)))
    norm_before = outs["norm_out"].clone()
    with create_allreduce_fusion_workspace("torch", world_size=1, rank=0, max_token_num=8,
                                           hidden_dim=h, dtype=BF) as ws:
        own = case.own(0)
        ret = allreduce_fusion(case.input(0), ws, pattern, residual_in=own["residual_in"],
                               rms_gamma=own["rms_gamma"], weight_bias=own["weight_bias"],
                               scale_out=scale_out, block_quant_group_size=g, **outs)
    assert ret is outs["norm_out"]  # FlashInfer returns a passed norm_out, 8 included
    assert torch.equal(outs["residual_out"].view(torch.int16),
                       ref["residual_out"].view(torch.int16))
    assert torch.equal(outs["quant_out"].view(torch.uint8), ref["quant_out"].view(torch.uint8))
    assert torch.equal(storage.view(torch.uint8), ref["scale_out"])  # padding 0 included
    if pattern == P.kARResidualRMSNormOutPerTokenGroupFP8PackedQuant:
        assert torch.equal(outs["norm_out"].view(torch.int16),
                           ref["norm_out"].view(torch.int16))
    else:  # 8 does not write norm_out
        assert torch.equal(outs["norm_out"].view(torch.int16), norm_before.view(torch.int16))
    # What DeepGEMM reads back: element (t, k) of the int32 tensor, byte g % 4 of it.
    kg = h // g
    words = scale_out.clone()
    byte = torch.stack([(words >> (8 * i)) & 0xFF for i in range(4)], -1).reshape(t, -1)[:, :kg]
    scales = ((byte.to(torch.int32)) << 23).view(torch.float32)
    dequant = outs["quant_out"].float().reshape(t, kg, g) * scales.unsqueeze(-1)
    n = ref["norm_out"].float().reshape(t, kg, g)
    assert ((dequant - n).abs() <= n.abs() * 2.0**-4 + scales.unsqueeze(-1) * 2.0**-10).all()


def test_third_party_call_style():
    """The G = 32 plugin: weight_bias 1, residual_out = input (in place), no norm_out,
    scale_out an int32 as_strided view of a larger uint8 buffer; bytes past the packed
    storage are never touched."""
    t, h, g = 5, 5 * 32 * 4 + 32, 32  # Kg = 21: the last pack holds one group
    case = Case(P.kARResidualRMSNormPerTokenGroupFP8PackedQuant, t, h, BF, seed=9, group=g,
                weight_bias=1.0)
    ref = expected(case)
    _, kp, tm = moe.group_fp8_layout(t, h, g)
    need = moe.group_fp8_scale_bytes(t, h, g)
    big = torch.full((need + 64,), 0xAB, dtype=torch.uint8)
    scale_out = big.view(torch.int32).as_strided((t, kp), (1, tm))
    x = case.input(0).clone()
    own = case.own(0)
    quant = torch.empty(t, h, dtype=torch.float8_e4m3fn)
    with create_allreduce_fusion_workspace("torch", world_size=1, rank=0, max_token_num=t,
                                           hidden_dim=h, dtype=BF) as ws:
        ret = allreduce_fusion(x, ws, 8, residual_out=x, residual_in=own["residual_in"],
                               rms_gamma=own["rms_gamma"], quant_out=quant, scale_out=scale_out,
                               weight_bias=1.0, fp32_acc=True, block_quant_group_size=g,
                               layout_code=0)
    assert ret is quant
    assert torch.equal(x.view(torch.int16), ref["residual_out"].view(torch.int16))
    assert torch.equal(big[:need], ref["scale_out"])
    assert (big[need:] == 0xAB).all()


def test_byte_buffer_form_and_allocated_outputs():
    """Any contiguous buffer of enough bytes takes the packed storage; residual_out and
    quant_out left as None are allocated (the codes are returned)."""
    t, h, g = 3, 256, 64
    case = Case(P.kARResidualRMSNormOutPerTokenGroupFP8PackedQuant, t, h, torch.float16,
                seed=4, group=g)
    ref = expected(case)
    need = moe.group_fp8_scale_bytes(t, h, g)
    buf = torch.full((need + 3,), 0xCD, dtype=torch.uint8)
    own = case.own(0)
    with create_allreduce_fusion_workspace("torch", world_size=1, rank=0, max_token_num=t,
                                           hidden_dim=h, dtype=torch.float16) as ws:
        ret = allreduce_fusion(case.input(0), ws, 9, residual_in=own["residual_in"],
                               rms_gamma=own["rms_gamma"], scale_out=buf,
                               block_quant_group_size=g)
    assert ret.dtype == torch.float8_e4m3fn
    assert torch.equal(ret.view(torch.uint8), ref["quant_out"].view(torch.uint8))
    assert torch.equal(buf[:need], ref["scale_out"]) and (buf[need:] == 0xCD).all()


def _args(t=4, h=64, **over):
    kw = dict(input=torch.randn(t, h).to(BF), pattern=8, residual_in=torch.randn(t, h).to(BF),
              rms_gamma=torch.ones(h, dtype=BF), block_quant_group_size=16,
              scale_out=deepgemm_scales(t, h, 16)[0])
    kw.update(over)
    return kw


@pytest.mark.parametrize("over,exc,msg", [
    (dict(block_quant_group_size=None), ValueError, "requires block_quant_group_size"),
    (dict(block_quant_group_size=0), ValueError, "block_quant_group_size must be > 0"),
    (dict(block_quant_group_size=-128), ValueError, "block_quant_group_size must be > 0"),
    (dict(block_quant_group_size=24), ValueError,
     "hidden_dim must be divisible by block_quant_group_size, got 64 and 24"),
    (dict(block_quant_group_size=16.0), TypeError, "block_quant_group_size must be an int"),
    (dict(block_quant_group_size=True), TypeError, "block_quant_group_size must be an int"),
    (dict(scale_out=None), ValueError, "scale_out is required"),
    (dict(scale_out=torch.empty(3, dtype=torch.int32)), ValueError,
     "scale_out must hold at least 16 bytes"),
    (dict(scale_out=torch.zeros(16, dtype=torch.int32)[::2]), ValueError,
     "scale_out must be contiguous"),
    # G = 8: Kg = 8, Kp = 2; a row-major (4, 2) int32 tensor is not DeepGEMM's
    (dict(block_quant_group_size=8, scale_out=torch.empty(4, 2, dtype=torch.int32)),
     ValueError, r"scale_out stride must be \(1, 4\)"),
    (dict(quant_out=torch.empty(4, 63, dtype=torch.float8_e4m3fn)), ValueError,
     "quant_out must hold at least 256 bytes"),
])
def test_bad_arguments_are_named_before_anything_runs(over, exc, msg):
    kw = _args(**over)
    before = kw["scale_out"].clone() if isinstance(kw["scale_out"], torch.Tensor) else None
    with create_allreduce_fusion_workspace("torch", world_size=1, rank=0, max_token_num=4,
                                           hidden_dim=64, dtype=BF) as ws:
        with pytest.raises(exc, match=msg):
            allreduce_fusion(workspace=ws, **kw)
    if before is not None:
        assert torch.equal(before, kw["scale_out"])


def test_other_patterns_ignore_block_quant_group_size():
    with create_allreduce_fusion_workspace("torch", world_size=1, rank=0, max_token_num=4,
                                           hidden_dim=64, dtype=BF) as ws:
        x = torch.randn(4, 64).to(BF)
        out = allreduce_fusion(x, ws, 0, block_quant_group_size=7)
    assert torch.equal(out, x)


def test_kernel_backends_name_what_serves_8_and_9():
    """Until the Triton kernels serve them, a trtllm/mnnvl workspace refuses 8 and 9 at
    validation, naming the backend that does (checked here on the validation layer)."""
    from arfusion.validation import CALL_ARGUMENTS, validate_call

    assert 8 not in KERNEL_PATTERNS and 9 not in KERNEL_PATTERNS and 10 in KERNEL_PATTERNS
    ws = types.SimpleNamespace(world_size=2, dtype=BF, device=torch.device("cpu"),
                               max_token_num=4, hidden_dim=64, plans={}, backend="trtllm",
                               served_patterns=KERNEL_PATTERNS, capacity=lambda *a: 256)
    kw = dict.fromkeys(CALL_ARGUMENTS)
    kw.update(_args(), launch_with_pdl=False, trigger_completion_at_end=True)
    with pytest.raises(ValueError, match=r"pattern 8 .* not served by the trtllm backend yet"
                                         r".*backend='torch'"):
        validate_call(ws, True, *[kw[n] for n in CALL_ARGUMENTS])


def _mismatched_groups(rank, world):
    with create_allreduce_fusion_workspace("torch", world_size=world, rank=rank,
                                           max_token_num=4, hidden_dim=64, dtype=BF) as ws:
        g = 16 if rank == 0 else 32
        try:
            allreduce_fusion(**_args(block_quant_group_size=g,
                                     scale_out=deepgemm_scales(4, 64, g)[0]), workspace=ws)
        except RuntimeError as e:
            return str(e)
    return "no error"


def test_ranks_with_different_group_sizes_are_named():
    for msg in run_processes(2, _mismatched_groups, timeout_s=120):
        assert "block_quant_group_size: rank 0 16, rank 1 32" in msg, msg
