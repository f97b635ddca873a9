"""Patterns 6 and 7 (MoE reduction, MoE finalize) through the public API on the CPU torch
backend, called as their clients call them: TensorRT-LLM's DeepSeek/Kimi finalize (fresh
outputs, bf16 weights, a shared expert), Qwen3-MoE (no shared expert), Llama-4's reduction
(fp32 scales [E, T], a device expert count); argument checks; ranks that disagree."""

import pytest
import torch

from arfusion import AllReduceFusionPattern as P
from arfusion import allreduce_fusion, create_allreduce_fusion_workspace, moe, reference
from arfusion.patterns import sf_size
from arfusion.testing import poison, run_processes

BF = torch.bfloat16


def finalize_inputs(t: int, h: int, top_k: int, seed: int, shared: bool = True):
    """A real permutation into expert blocks padded to 8 rows, -1 slots, a repeated row;
    unreferenced rows NaN."""
    g = torch.Generator().manual_seed(seed)
    rows = t * top_k
    padded = rows + 8 - rows % 8
    order = torch.randperm(padded, generator=g)[:rows]
    idx = order.reshape(t, top_k).to(torch.int32)
    idx[0, 1] = -1
    if t > 2:
        idx[2, 0] = idx[1, 0]
    x = torch.full((padded, h), float("nan"))
    x[idx[idx >= 0].long()] = torch.randn(int((idx >= 0).sum()), h, generator=g)
    kw = dict(expanded_idx_to_permuted_idx=idx,
              expert_scale_factor=torch.rand(t, top_k, generator=g).to(BF),
              shared_expert_output=torch.randn(t, h, generator=g).to(BF) if shared else None,
              residual_in=torch.randn(t, h, generator=g).to(BF),
              rms_gamma=(torch.rand(h, generator=g) + 0.5).to(BF))
    return x.to(BF), kw


def expected(x_r: list[torch.Tensor], kw: dict) -> dict:
    return reference.reference_allreduce_fusion(x_r, 1, residual_in=kw["residual_in"],
                                                rms_gamma=kw["rms_gamma"], rms_eps=1e-5)


def bits(t):
    return t.view(torch.int16)


@pytest.mark.parametrize("t,h,top_k,shared", [(1, 64, 8, True), (5, 7168 // 32, 8, True),
                                              (4, 128, 8, False), (3, 40, 10, True)])
def test_finalize_as_tensorrt_llm_calls_it(t, h, top_k, shared):
    """Fresh norm_out/residual_out (left None: allocated, norm_out returned); a passed
    output is never written, as FlashInfer's pattern 7 leaves it."""
    x, kw = finalize_inputs(t, h, top_k, seed=t * 100 + h, shared=shared)
    output = poison(torch.empty(t, h, dtype=BF))
    with create_allreduce_fusion_workspace("torch", world_size=1, rank=0, max_token_num=8,
                                           hidden_dim=h, dtype=BF) as ws:
        ret = allreduce_fusion(x, ws, P.kMoEFinalizeARResidualRMSNorm, rms_eps=1e-5,
                               output=output, launch_with_pdl=True, **kw)
    x_r = moe.moe_finalize_input(x, kw["expanded_idx_to_permuted_idx"],
                                 kw["expert_scale_factor"], kw["shared_expert_output"])
    want = expected([x_r], kw)
    assert torch.equal(bits(ret), bits(want["norm_out"]))
    assert not ret.isnan().any()  # no unreferenced (NaN) row was read
    assert output.view(torch.uint8).eq(0xFF).all()


def test_reduction_as_llama4_calls_it_with_a_device_expert_count():
    """Llama-4's min-latency reduction: scale [E, T] fp32, experts [E, T, H], the shared
    output as token input (also passed as `input`, which pattern 6 ignores); the expert
    count a one-element int32 tensor (read when the call runs), the buffers sized for
    more experts than are active."""
    t, h, e_max, e = 4, 160, 8, 5
    g = torch.Generator().manual_seed(1)
    scale = torch.rand(e_max, t, generator=g)
    act = torch.randn(e_max, t, h, generator=g).to(BF)
    token = torch.randn(t, h, generator=g).to(BF)
    res = torch.randn(t, h, generator=g).to(BF)
    gamma = torch.rand(h, generator=g).to(BF)
    kw = dict(residual_in=res, rms_gamma=gamma, moe_reduction_scale_input=scale,
              moe_reduction_active_experts_token_input=act, moe_reduction_token_input=token)
    with create_allreduce_fusion_workspace("torch", world_size=1, rank=0, max_token_num=t,
                                           hidden_dim=h, dtype=BF) as ws:
        outs = []
        for count in (torch.tensor([e], dtype=torch.int32), e):
            output = torch.empty(t, h, dtype=BF)
            norm = allreduce_fusion(token, ws, 6, output=output, rms_eps=1e-5,
                                    moe_reduction_device_num_experts=count, **kw)
            outs.append((output, norm))
        with pytest.raises(ValueError, match="moe_reduction_device_num_experts holds 9"):
            allreduce_fusion(token, ws, 6, moe_reduction_device_num_experts=torch.tensor(
                [9], dtype=torch.int32), **kw)
    # The active experts are the first E of the expert-major buffers.
    x_r = moe.moe_reduction_input(act[:e].contiguous(), scale[:e].contiguous(), token, e)
    want = reference.reference_allreduce_fusion([x_r], 1, residual_in=res, rms_gamma=gamma,
                                                rms_eps=1e-5)
    for output, norm in outs:
        assert torch.equal(bits(output), bits(want["output"]))
        assert torch.equal(bits(norm), bits(want["norm_out"]))


@pytest.mark.parametrize("layout", [0, 1, 2])
def test_reduction_quantises_to_nvfp4_as_pattern_5(layout):
    """Pattern 6 with a quant_out quantises its normalised rows to NVFP4 (FlashInfer's
    behaviour), every layout, a float or a device-tensor scale_factor: the bytes pattern 5
    writes for the same all-reduced contributions; over two gloo ranks alike."""
    assert run_processes(2, _nvfp4_reduction_rank, layout) == [[], []]


def _nvfp4_reduction_rank(rank, world, layout) -> list[str]:
    """The outputs whose bytes differ from pattern 5's (names only: tensors returned from
    a process that has exited cannot always be received)."""
    t, h, e = 3, 64, 2
    x_r, mine = [], None
    for r in range(world):
        g = torch.Generator().manual_seed(40 + r)
        kw = dict(moe_reduction_device_num_experts=e,
                  moe_reduction_scale_input=torch.rand(e, t, generator=g),
                  moe_reduction_active_experts_token_input=torch.randn(e, t, h, generator=g)
                  .to(BF), moe_reduction_token_input=torch.randn(t, h, generator=g).to(BF))
        x_r.append(moe.moe_reduction_input(kw["moe_reduction_active_experts_token_input"],
                                           kw["moe_reduction_scale_input"],
                                           kw["moe_reduction_token_input"], e))
        mine = kw if r == rank else mine
    g = torch.Generator().manual_seed(7)
    res, gamma = torch.randn(t, h, generator=g).to(BF), torch.rand(h, generator=g).to(BF)
    scale = 300.0 if layout != 1 else torch.tensor([300.0])
    outs = {"residual_out": poison(torch.empty(t, h, dtype=BF)),
            "norm_out": poison(torch.empty(t, h, dtype=BF)),
            "quant_out": poison(torch.empty(t, h // 2, dtype=torch.uint8)),
            "scale_out": poison(torch.empty(sf_size(t, h // 16, layout), dtype=torch.uint8))}
    with create_allreduce_fusion_workspace("torch", world_size=world, rank=rank,
                                           max_token_num=t, hidden_dim=h, dtype=BF) as ws:
        ret = allreduce_fusion(mine["moe_reduction_token_input"], ws, 6, residual_in=res,
                               rms_gamma=gamma, scale_factor=scale, layout_code=layout,
                               **outs, **mine)
    assert ret is outs["norm_out"]
    want = reference.reference_allreduce_fusion(
        x_r, P.kARResidualRMSNormOutFP4Quant, residual_in=res, rms_gamma=gamma,
        scale_factor=scale, layout_code=layout)
    return [k for k, v in outs.items()
            if not torch.equal(v.view(torch.uint8), want[k].view(torch.uint8))]


def _args(**over):
    x, kw = finalize_inputs(4, 32, 2, seed=3)
    kw.update(input=x, pattern=7)
    kw.update(over)
    return {k: v for k, v in kw.items() if v is not DROP}


DROP = object()


@pytest.mark.parametrize("over,exc,msg", [
    (dict(expanded_idx_to_permuted_idx=None), ValueError,
     "requires expanded_idx_to_permuted_idx"),
    (dict(expanded_idx_to_permuted_idx=torch.zeros(8, dtype=torch.int32)), ValueError,
     r"must be 2-D \[num_tokens, top_k\]"),
    (dict(expanded_idx_to_permuted_idx=torch.zeros(3, 2, dtype=torch.int32)), ValueError,
     "num_tokens = residual_in's 4 rows"),
    (dict(expanded_idx_to_permuted_idx=torch.zeros(4, 2, dtype=torch.int64)), ValueError,
     "expanded_idx_to_permuted_idx must have dtype torch.int32"),
    (dict(expert_scale_factor=torch.ones(4, 3)), ValueError,
     r"expert_scale_factor must have shape \[4, 2\]"),
    (dict(expert_scale_factor=torch.ones(4, 2, dtype=torch.int32)), ValueError,
     "expert_scale_factor must have dtype"),
    (dict(shared_expert_output=torch.ones(4, 31, dtype=BF)), ValueError,
     r"shared_expert_output must have shape \[4, 32\]"),
    (dict(residual_in=DROP), ValueError, "requires residual_in"),
    (dict(quant_out=torch.empty(4, 32, dtype=torch.float8_e4m3fn)), ValueError,
     "does not quantise: pass quant_out=None"),
    (dict(pattern=6), ValueError, "requires moe_reduction_token_input"),
    (dict(pattern=6, moe_reduction_token_input=torch.ones(4, 32, dtype=BF)), ValueError,
     "requires moe_reduction_device_num_experts"),
    (dict(pattern=6, moe_reduction_token_input=torch.ones(4, 32, dtype=BF),
          moe_reduction_device_num_experts=-1), ValueError,
     "moe_reduction_device_num_experts, an int >= 0"),
    (dict(pattern=6, moe_reduction_token_input=torch.ones(4, 32, dtype=BF),
          moe_reduction_device_num_experts=2.0), TypeError,
     "moe_reduction_device_num_experts, an int >= 0"),
    (dict(pattern=6, moe_reduction_token_input=torch.ones(4, 32, dtype=BF),
          moe_reduction_device_num_experts=2, moe_reduction_scale_input=torch.ones(2, 3),
          moe_reduction_active_experts_token_input=torch.ones(2, 4, 32, dtype=BF)),
     ValueError, "moe_reduction_scale_input must hold at least 2 x 4 elements"),
    (dict(pattern=6, moe_reduction_token_input=torch.ones(4, 32, dtype=BF),
          moe_reduction_device_num_experts=2, moe_reduction_scale_input=torch.ones(2, 4),
          moe_reduction_active_experts_token_input=torch.ones(2, 4, 32)),
     ValueError, "moe_reduction_active_experts_token_input must have dtype torch.bfloat16"),
])
def test_bad_moe_arguments_are_named_before_anything_runs(over, exc, msg):
    kw = _args(**over)
    norm = poison(torch.empty(4, 32, dtype=BF))
    with create_allreduce_fusion_workspace("torch", world_size=1, rank=0, max_token_num=4,
                                           hidden_dim=32, dtype=BF) as ws:
        with pytest.raises(exc, match=msg):
            allreduce_fusion(workspace=ws, norm_out=norm, **kw)
    assert norm.view(torch.uint8).eq(0xFF).all()


def test_other_patterns_ignore_moe_arguments():
    with create_allreduce_fusion_workspace("torch", world_size=1, rank=0, max_token_num=4,
                                           hidden_dim=32, dtype=BF) as ws:
        x = torch.randn(4, 32).to(BF)
        out = allreduce_fusion(x, ws, 0, expert_scale_factor=torch.ones(1),
                               moe_reduction_device_num_experts=3)
    assert torch.equal(out, x)


def _two_ranks(rank, world, top_k_of):
    x, kw = finalize_inputs(4, 32, top_k_of[rank], seed=10 + rank)
    with create_allreduce_fusion_workspace("torch", world_size=world, rank=rank,
                                           max_token_num=4, hidden_dim=32, dtype=BF) as ws:
        try:
            norm = allreduce_fusion(x, ws, 7, **kw)
        except RuntimeError as e:
            return str(e)
    return [moe.moe_finalize_input(x, kw["expanded_idx_to_permuted_idx"],
                                   kw["expert_scale_factor"], kw["shared_expert_output"]),
            kw, norm]


def test_two_ranks_reduce_what_each_builds_and_name_a_top_k_mismatch():
    results = run_processes(2, _two_ranks, (8, 8), timeout_s=120)
    x_r = [r[0] for r in results]
    for rank, (_, kw, norm) in enumerate(results):
        want = reference.reference_allreduce_fusion(x_r, 1, residual_in=kw["residual_in"],
                                                    rms_gamma=kw["rms_gamma"])
        assert torch.equal(bits(norm), bits(want["norm_out"])), rank
    for msg in run_processes(2, _two_ranks, (8, 6), timeout_s=120):
        assert "top_k: rank 0 8, rank 1 6" in msg, msg


def test_torch_compile_carries_moe_and_group_arguments():
    """Under torch.compile the call is one custom op (api._launch_op): pattern 7's index
    map, weights and shared output and pattern 8's group size and strided scale_out
    travel through it; the results equal the eager call's. The op's schema and fake
    implementation pass torch.library.opcheck with them."""
    from .test_group_fp8 import deepgemm_scales

    x, kw = finalize_inputs(4, 64, 8, seed=21)
    ws = create_allreduce_fusion_workspace("torch", world_size=1, rank=0, max_token_num=4,
                                           hidden_dim=64, dtype=BF)

    def finalize(x, idx, w, shared, res, gamma):
        return allreduce_fusion(x, ws, 7, expanded_idx_to_permuted_idx=idx,
                                expert_scale_factor=w, shared_expert_output=shared,
                                residual_in=res, rms_gamma=gamma)

    args = (x, kw["expanded_idx_to_permuted_idx"], kw["expert_scale_factor"],
            kw["shared_expert_output"], kw["residual_in"], kw["rms_gamma"])
    compiled = torch.compile(finalize, backend="aot_eager", fullgraph=True)
    assert torch.equal(bits(compiled(*args)), bits(finalize(*args)))

    def grouped(h, res, gamma, quant, scales):
        allreduce_fusion(h, ws, 8, residual_in=res, rms_gamma=gamma, quant_out=quant,
                         scale_out=scales, block_quant_group_size=16)
        return quant

    h = torch.randn(4, 64).to(BF)
    got_q, got_s = torch.empty(4, 64, dtype=torch.float8_e4m3fn), deepgemm_scales(4, 64, 16)
    want_q, want_s = torch.empty(4, 64, dtype=torch.float8_e4m3fn), deepgemm_scales(4, 64, 16)
    torch.compile(grouped, backend="aot_eager")(h, kw["residual_in"], kw["rms_gamma"],
                                                got_q, got_s[0])
    grouped(h, kw["residual_in"], kw["rms_gamma"], want_q, want_s[0])
    assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(got_s[1], want_s[1])
    torch.library.opcheck(
        torch.ops.arfusion.allreduce_fusion_.default,
        (x, id(ws), 7, False, True, None, torch.empty(4, 64, dtype=BF),
         torch.empty(4, 64, dtype=BF), None, None, kw["residual_in"], kw["rms_gamma"], 1e-6,
         None, -1.0, 0, -1, 0.0, -1, None, -1, None, None, kw["expanded_idx_to_permuted_idx"],
         kw["expert_scale_factor"], kw["shared_expert_output"]),
        test_utils=("test_schema", "test_faketensor"))
    ws.destroy()
