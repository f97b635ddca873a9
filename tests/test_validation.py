"""Every validation error: raised before anything runs, naming the argument, no output touched."""

import pytest
import torch

from arfusion import AllReduceFusionPattern as P
from arfusion import allreduce_fusion, create_allreduce_fusion_workspace
from arfusion.testing import poison

T, H = 4, 32
BF = torch.bfloat16


@pytest.fixture
def ws():
    w = create_allreduce_fusion_workspace("torch", world_size=1, rank=0, max_token_num=T,
                                          hidden_dim=H, dtype=BF)
    yield w
    w.destroy()


def base(pattern=P.kARResidualRMSNorm, **over):
    kw = dict(input=torch.randn(T, H).to(BF), pattern=pattern,
              residual_in=torch.randn(T, H).to(BF), rms_gamma=torch.ones(H, dtype=BF),
              residual_out=poison(torch.empty(T, H, dtype=BF)),
              norm_out=poison(torch.empty(T, H, dtype=BF)))
    if pattern in (2, 3, 4, 5):
        kw["scale_factor"] = 1.0
    if pattern in (2, 3, 10):
        kw.pop("norm_out")
    if pattern == 0:
        for k in ("residual_in", "rms_gamma", "residual_out", "norm_out"):
            kw.pop(k)
    kw.update(over)
    if kw.get("norm_out") is SAME_AS_RESIDUAL_OUT:
        kw["norm_out"] = kw["residual_out"]
    return {k: v for k, v in kw.items() if v is not DROP}


DROP = object()
SAME_AS_RESIDUAL_OUT = object()
SHARED = torch.randn(T + 1, H).to(BF)

CASES = [
    # (description, pattern, overrides, exception, message regex)
    ("input not a tensor", 1, dict(input=[[1.0]]), TypeError, "input must be a torch.Tensor"),
    ("input 1-D", 1, dict(input=torch.randn(H).to(BF)), ValueError, "input must be 2-D"),
    ("input wrong dtype", 1, dict(input=torch.randn(T, H)), ValueError,
     "input must have a dtype of the workspace dtype's element size"),
    ("input not contiguous", 1, dict(input=torch.randn(H, T).to(BF).t()), ValueError,
     "input must be contiguous"),
    ("input too large", 1, dict(input=torch.randn(T + 1, H).to(BF)), ValueError,
     "exceeds the workspace's capacity"),
    ("zero tokens", 1, dict(input=torch.randn(0, H).to(BF)), ValueError, "at least one token"),
    ("moe reduction without its token input", 6, {}, ValueError,
     "pattern kMoEReductionARResidualRMSNorm requires moe_reduction_token_input"),
    ("pattern unknown", 42, {}, ValueError, "pattern must be one of"),
    ("pattern not int", "1", {}, TypeError, "pattern must be an AllReduceFusionPattern"),
    # Both phrasings FlashInfer's messages use (its own tests match "requires residual_in").
    ("residual missing", 1, dict(residual_in=DROP), ValueError, "requires residual_in"),
    ("residual missing", 4, dict(residual_in=DROP), ValueError, "residual_in is required"),
    ("gamma missing", 1, dict(rms_gamma=DROP), ValueError, "requires rms_gamma"),
    ("gamma missing", 3, dict(rms_gamma=DROP), ValueError, "rms_gamma is required"),
    ("residual shape", 1, dict(residual_in=torch.randn(T, H + 1).to(BF)), ValueError,
     r"residual_in must have shape \[4, 32\]"),
    ("residual dtype", 1, dict(residual_in=torch.randn(T, H).half()), ValueError,
     "residual_in must have dtype torch.bfloat16"),
    ("gamma shape", 1, dict(rms_gamma=torch.ones(H + 1, dtype=BF)), ValueError,
     r"rms_gamma must have shape \[32\]"),
    ("gamma dtype", 1, dict(rms_gamma=torch.ones(H, dtype=torch.int32)), ValueError,
     "rms_gamma must have dtype"),
    ("negative eps", 1, dict(rms_eps=-1.0), ValueError, "rms_eps must be >= 0"),
    ("eps not a number", 1, dict(rms_eps="x"), TypeError, "rms_eps must be a float"),
    ("output shape", 1, dict(output=torch.empty(T, H - 1, dtype=BF)), ValueError,
     "output must have shape"),
    ("residual_out dtype", 1, dict(residual_out=torch.empty(T, H)), ValueError,
     "residual_out must have dtype"),
    ("scale_factor zero", 2, dict(scale_factor=0.0), ValueError, "scale_factor must be finite"),
    ("scale_factor nan", 2, dict(scale_factor=float("nan")), ValueError,
     "scale_factor must be finite"),
    ("scale_factor int tensor", 2, dict(scale_factor=torch.ones(1, dtype=torch.int32)),
     ValueError, "floating-point tensor with at least one element"),
    ("scale_factor empty tensor", 2, dict(scale_factor=torch.ones(0)), ValueError,
     "floating-point tensor with at least one element"),
    ("scale_factor CPU tensor -1", 2, dict(scale_factor=torch.tensor([-1.0])), ValueError,
     r"scale_factor must be finite and > 0, got -1.0"),
    ("scale_factor CPU tensor 0", 3, dict(scale_factor=torch.zeros(1, 1, dtype=BF)),
     ValueError, r"scale_factor must be finite and > 0, got 0.0"),
    ("scale_factor CPU tensor nan", 2, dict(scale_factor=torch.tensor([float("nan")])),
     ValueError, "scale_factor must be finite and > 0, got nan"),
    ("scale_factor CPU tensor inf", 2, dict(scale_factor=torch.tensor([float("inf")],
                                                                       dtype=torch.float64)),
     ValueError, "scale_factor must be finite and > 0, got inf"),
    ("scale_factor other device", 2, dict(scale_factor=torch.ones(1, device="meta")),
     ValueError, "scale_factor must be on cpu or the CPU"),
    ("scale_factor string", 2, dict(scale_factor="1"), TypeError, "scale_factor must be a float"),
    ("fp8 quant_out too small", 2, dict(quant_out=torch.empty(T, H - 1, dtype=torch.uint8)),
     ValueError, "quant_out must hold at least 128 bytes"),
    ("fp8 quant_out not contiguous", 2,
     dict(quant_out=torch.empty(H, T, dtype=torch.float8_e4m3fn).t()), ValueError,
     "quant_out must be contiguous"),
    ("fp4 quant_out too small", 3, dict(quant_out=torch.empty(T, H // 4, dtype=torch.uint8)),
     ValueError, "quant_out must hold at least 64 bytes"),
    ("fp4 quant_out not a tensor", 3, dict(quant_out=[0] * 64), TypeError,
     "quant_out must be a torch.Tensor"),
    ("fp4 scale_out too small", 3, dict(scale_out=torch.empty(511, dtype=torch.uint8)),
     ValueError, "scale_out must hold at least 512 bytes"),
    ("fp4 scale_out too small linear", 3, dict(scale_out=torch.empty(7, dtype=torch.uint8),
                                               layout_code=2), ValueError,
     "at least 8 bytes .* LINEAR"),
    ("fp4 scale_out not contiguous", 3, dict(scale_out=torch.empty(1024, dtype=torch.uint8)[::2]),
     ValueError, "scale_out must be contiguous"),
    ("fp4 bad layout", 3, dict(layout_code=3), ValueError, "layout_code must be a"),
    ("dynamic scale_out too small", 10, dict(scale_out=torch.empty(T, 1, dtype=BF)),
     ValueError, "scale_out must hold at least 16 bytes"),
    ("use_oneshot not bool", 1, dict(use_oneshot=2), TypeError, "use_oneshot must be a bool"),
    ("launch_with_pdl not bool", 1, dict(launch_with_pdl="yes"), TypeError,
     "launch_with_pdl must be a bool"),
    ("pattern bool", True, {}, TypeError, "pattern must be an AllReduceFusionPattern"),
    ("residual_out is norm_out", 1, dict(norm_out=SAME_AS_RESIDUAL_OUT), ValueError,
     "norm_out and residual_out overlap"),
    ("norm_out partly overlaps input", 1, dict(input=SHARED[:T], norm_out=SHARED[1:T + 1]),
     ValueError, "norm_out partly overlaps input"),
    ("rms_eps nan", 1, dict(rms_eps=float("nan")), ValueError, "rms_eps must be >= 0"),
    ("weight_bias nan", 1, dict(weight_bias=float("nan")), ValueError,
     "weight_bias must be finite"),
    ("weight_bias inf", 2, dict(weight_bias=float("inf")), ValueError,
     "weight_bias must be finite"),
    ("input on meta", 1, dict(input=torch.empty(T, H, dtype=BF, device="meta")), ValueError,
     "input must be on the CPU or a CUDA device, got meta"),
]


@pytest.mark.parametrize("desc,pattern,over,exc,msg", CASES, ids=[c[0] for c in CASES])
def test_bad_call_raises_before_touching_outputs(ws, desc, pattern, over, exc, msg):
    kw = base(pattern if type(pattern) is int and pattern in (0, 1, 2, 3, 10) else 1, **over)
    kw["pattern"] = pattern
    outs = {k: v for k, v in kw.items() if k.endswith("_out") or k == "output"}
    before = {k: v.clone() for k, v in outs.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(exc, match=msg):
        allreduce_fusion(workspace=ws, **kw)
    for k, v in before.items():
        assert torch.equal(outs[k].view(torch.uint8), v.view(torch.uint8)), k


def test_nvfp4_needs_16_bit_input_and_hidden_multiple_of_16():
    with create_allreduce_fusion_workspace("torch", world_size=1, rank=0, max_token_num=4,
                                           hidden_dim=40, dtype=torch.float32) as w32:
        with pytest.raises(ValueError, match="NVFP4 patterns need float16 or bfloat16"):
            allreduce_fusion(torch.randn(2, 32), w32, 3, residual_in=torch.randn(2, 32),
                             rms_gamma=torch.ones(32), scale_factor=1.0)
    with create_allreduce_fusion_workspace("torch", world_size=1, rank=0, max_token_num=4,
                                           hidden_dim=40, dtype=BF) as w:
        with pytest.raises(ValueError, match="hidden_dim % 16 == 0, got hidden_dim=40"):
            allreduce_fusion(torch.randn(2, 40).to(BF), w, 3,
                             residual_in=torch.randn(2, 40).to(BF),
                             rms_gamma=torch.ones(40, dtype=BF), scale_factor=1.0)


def test_workspace_argument_checks(ws):
    with pytest.raises(TypeError, match="workspace must be an AllReduceFusionWorkspace"):
        allreduce_fusion(torch.randn(T, H).to(BF), object(), 0)
    ws.destroy()
    with pytest.raises(ValueError, match="workspace has been destroyed"):
        allreduce_fusion(torch.randn(T, H).to(BF), ws, 0)


def test_device_mismatch_is_rejected(ws):
    with pytest.raises(ValueError, match="rms_gamma must be on cpu"):
        allreduce_fusion(torch.randn(T, H).to(BF), ws, 1, residual_in=torch.randn(T, H).to(BF),
                         rms_gamma=torch.ones(H, dtype=BF, device="meta"))


def test_reuse_with_other_shapes_within_capacity(ws):
    assert ws.is_buffer_size_sufficient(1, 2, 64, BF)
    assert ws.is_buffer_size_sufficient(1, 128, 1, BF)
    assert not ws.is_buffer_size_sufficient(1, 129, 1, BF)
    assert not ws.is_buffer_size_sufficient(2, 1, 1, BF)  # other world size
    assert not ws.is_buffer_size_sufficient(1, 1, 1, torch.float32)  # other element size
    assert ws.is_buffer_size_sufficient(1, 1, 1, torch.float16)  # same size: served
    out = allreduce_fusion(torch.randn(2, 64).to(BF), ws, 0)
    assert out.shape == (2, 64)


def test_call_pointers_are_the_tensors_the_pattern_touches(ws):
    """FusionCall.ptrs, what the GPU launcher passes: in POINTER_ORDER the address of each
    tensor the pattern reads or writes (outputs it allocates included), 0 for one it
    ignores; a call with other tensors gets theirs (nothing kept from the plan); `align`
    marks the pointers that are not 16-byte aligned."""
    import inspect

    from arfusion.validation import CALL_ARGUMENTS, POINTER_ORDER, validate_call

    defaults = {n: p.default for n, p in inspect.signature(allreduce_fusion).parameters.items()}

    def ptrs(pattern, **over):
        args = {**defaults, **base(pattern, **over)}
        call = validate_call(ws, True, *[args[name] for name in CALL_ARGUMENTS])
        return dict(zip(POINTER_ORDER, call.ptrs, strict=True)), call

    for _ in range(2):  # the second round: same signature, new tensors
        stray = torch.empty(T, H, dtype=torch.float8_e4m3fn)  # not written by pattern 1
        got, call = ptrs(P.kARResidualRMSNorm, quant_out=stray)
        assert got == {"input": call.input.data_ptr(), "output": 0,
                       "residual_in": call.residual_in.data_ptr(),
                       "residual_out": call.residual_out.data_ptr(),
                       "rms_gamma": call.rms_gamma.data_ptr(),
                       "norm_out": call.norm_out.data_ptr(), "quant_out": 0, "scale_out": 0,
                       "scale_factor": 0}
        assert call.align == 0
        got, call = ptrs(P.kAllReduce)  # output allocated by the call
        assert got["output"] == call.output.data_ptr() != 0
        assert [name for name, p in got.items() if p] == ["input", "output"]
        q = torch.empty(T * H, dtype=torch.uint8)  # bytes: the call stores through a view
        got, call = ptrs(P.kARResidualRMSNormOutFP8Quant, quant_out=q)
        assert got["quant_out"] == q.data_ptr() == call.quant_out.data_ptr()
        assert got["scale_out"] == 0 and got["norm_out"] == call.norm_out.data_ptr()
        odd = torch.empty(T * H + 1, dtype=BF)[1:].view(T, H)  # 2 bytes past an aligned one
        got, call = ptrs(P.kARResidualRMSNorm, residual_out=odd)
        assert got["residual_out"] == odd.data_ptr()
        assert call.align == 1 << POINTER_ORDER.index("residual_out")


def test_buffer_size_takes_flashinfer_strategy_by_position_or_keyword(ws, monkeypatch):
    """FlashInfer's mnnvl workspace takes `strategy` where arfusion has `use_oneshot`:
    the enum means the same strategy in either place."""
    from arfusion.mnnvl import MNNVLAllreduceFusionStrategy as S

    seen = []
    monkeypatch.setattr(ws, "capacity", lambda use_oneshot=None: seen.append(use_oneshot) or 128)
    for s in (S.ONESHOT, S.TWOSHOT, S.AUTO):
        assert ws.is_buffer_size_sufficient(1, 2, 64, BF, s)
        assert ws.is_buffer_size_sufficient(1, 2, 64, BF, strategy=s)
    assert seen == [True, True, False, False, None, None]
