"""Quantised epilogues on a GPU (static FP8, NVFP4 in software on Hopper, dynamic FP8).

N ranks as threads of one process; every output poisoned first and compared with
arfusion.reference (each rank's own residual and gamma, a third of the cases the same
on every rank): codes and scale bytes equal except where the reference value is
within 1 ulp of a rounding boundary (counted and printed), dequantised values within
the format's bound, identical bits on every rank where the ranks pass the same tensors.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch

from arfusion import AllReduceFusionPattern, allreduce_fusion, reference
from arfusion.patterns import PATTERNS, Quant
from arfusion.testing import (
    Case,
    capture_graph,
    case_kwargs,
    case_outputs,
    check_outputs,
    precompile_cases,
    replay_graph,
    run_case,
    run_ranks,
)

from .test_trtllm import CUDA, assert_all_good, compile_first, make_workspace

pytestmark = pytest.mark.gpu

P = AllReduceFusionPattern
QUANT_PATTERNS = [P.kARResidualRMSNormFP8Quant, P.kARResidualRMSNormFP4Quant,
                  P.kARResidualRMSNormOutFP8Quant, P.kARResidualRMSNormOutFP4Quant,
                  P.kARResidualRMSNormDynamicFP8Quant, P.kARResidualRMSNormOutDynamicFP8Quant]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
HIDDEN = {Quant.NVFP4: [16, 2880, 16384], Quant.FP8: [7, 2880, 16384],
          Quant.DYNAMIC_FP8: [7, 2880, 16384]}
MAX_TOKENS, MAX_HIDDEN = 200, 16384


def variants(dtype):
    """(pattern, layout, oneshot, hidden, scale as tensor): every pattern x layout x
    strategy once, hidden sizes and scale kinds cycled."""
    out = []
    for pattern in QUANT_PATTERNS:
        quant = PATTERNS[pattern].quant
        if quant == Quant.NVFP4 and dtype == torch.float32:
            continue
        for layout in ((0, 1, 2) if quant == Quant.NVFP4 else (0,)):
            for oneshot in (True, False):
                i = len(out)
                out.append((pattern, layout, oneshot, HIDDEN[quant][i % 3], bool(i % 2)))
    return out


def plan(world_size, dtype, seed):
    rng = random.Random(seed)
    cases = []
    for pattern, layout, oneshot, h, as_tensor in variants(dtype):
        quant = PATTERNS[pattern].quant
        top = MAX_TOKENS if h <= 8192 else 40
        for t in sorted({1, max(1, world_size - 1), rng.randint(2, top)}):
            scale = rng.uniform(0.02, 0.5) if quant == Quant.FP8 else rng.uniform(20, 2000)
            case = Case(pattern, t, h, dtype, seed=seed * 7_919 + len(cases), layout_code=layout,
                        scale_factor=scale, weight_bias=float(len(cases) % 2),
                        scale_as_tensor=as_tensor, replicated=len(cases) % 3 == 0)
            cases.append((case, dict(use_oneshot=oneshot, with_output=False)))
    return cases


def run_plan(ctx, dtype, seed):
    cases = plan(ctx.world_size, dtype, seed)
    with make_workspace(ctx, dtype, MAX_TOKENS, MAX_HIDDEN) as ws:
        precompile_cases(ws, cases, ctx.rank, ctx.device, ctx.comm)
        return [run_case(ws, case, ctx.rank, ctx.world_size, ctx.device, comm=ctx.comm, **kw)
                for case, kw in cases]


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quant_patterns_match_reference(world_size, dtype):
    results = run_ranks(world_size, run_plan, dtype, world_size, device=CUDA)
    assert_all_good(results)
    boundary = sum(r.check.boundary for r in results[0])
    print(f"{len(results[0])} calls on {world_size} ranks, {dtype}: {boundary} quantised "
          "values differ from the reference at a rounding boundary")


def edge_gamma(h: int) -> torch.Tensor:
    """Per 16-column block: all zero, E2M1 midpoints (with block max 6), e4m3 ties and
    values past 448, random."""
    blocks = [
        [0.0] * 16,
        [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 0.0, 6.0],
        [1.0625, 1.1875, 2.125, 0.015625, 448.0, 464.0, 240.0, 0.001953125,
         3.0, 5.5, 0.3125, 0.4375, 13.0, 30.0, 0.0, 1.0],
    ]
    g = torch.rand(h, generator=torch.Generator().manual_seed(h)) * 8
    for i in range(0, h - 15, 16):
        if i // 16 % 4 < 3:
            g[i:i + 16] = torch.tensor(blocks[i // 16 % 4])
    return g


def _edge_rank(ctx, dtype, scales):
    """h = +-1 exactly, eps 0, so rstd = 1 and norm_out = +-gamma exactly: the quantisers
    see chosen values (all-zero blocks, -0.0, midpoints, ties, saturation)."""
    out = []
    with make_workspace(ctx, dtype, 8, MAX_HIDDEN) as ws:
        for pattern, layout, oneshot, h, as_tensor in variants(dtype):
            t = 8
            signs = torch.where(torch.rand(t, h, generator=torch.Generator().manual_seed(7)) < .5,
                                -1.0, 1.0)
            x = [signs if r == 0 else torch.zeros(t, h) for r in range(ctx.world_size)]
            x = [v.to(dtype).to(CUDA) for v in x]
            gamma = edge_gamma(h).to(dtype).to(CUDA)
            residual = torch.zeros(t, h, dtype=dtype, device=CUDA)
            for scale in scales[PATTERNS[pattern].quant]:
                case = Case(pattern, t, h, dtype, layout_code=layout, scale_factor=scale,
                            rms_eps=0.0)
                outs = case_outputs(case, CUDA, with_output=False)
                kw = dict(residual_in=residual, rms_gamma=gamma, rms_eps=0.0,
                          use_oneshot=oneshot)
                if scale is not None:
                    kw["scale_factor"] = torch.full((1,), scale, device=CUDA) if as_tensor \
                        else scale
                call = functools.partial(allreduce_fusion, x[ctx.rank], ws, pattern,
                                         layout_code=layout, **outs, **kw)
                compile_first(ctx, ws, call)
                call()
                ctx.stream.synchronize()
                ref = reference.reference_allreduce_fusion(
                    x, pattern, residual_in=residual, rms_gamma=gamma, rms_eps=0.0,
                    scale_factor=scale, layout_code=layout)
                chk = check_outputs(outs, ref, case, exact=True)
                out.append((case.label(), scale, chk.problems))
    return out


EDGE_SCALES = {Quant.FP8: [1.0, 1e-3, 1e6], Quant.NVFP4: [1.0, 1e4, 1e-30],
               Quant.DYNAMIC_FP8: [None]}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quant_edge_cases_are_exact(dtype):
    for rank_results in run_ranks(2, _edge_rank, dtype, EDGE_SCALES, device=CUDA):
        bad = [r for r in rank_results if r[2]]
        assert not bad, bad[:5]


def _graph_scale_rank(ctx, replays):
    """CUDA graph of an FP8 and an NVFP4 call whose scale_factor is a tensor that
    changes between replays."""
    dtype = torch.bfloat16
    picks = {}
    for v in variants(dtype):
        if v[4] and PATTERNS[v[0]].quant in (Quant.FP8, Quant.NVFP4):
            picks.setdefault(PATTERNS[v[0]].quant, v)
    with make_workspace(ctx, dtype, 16, MAX_HIDDEN) as ws:
        static = []
        for pattern, layout, oneshot, h, _ in picks.values():
            case = Case(pattern, 9, h, dtype, layout_code=layout, scale_factor=1.0,
                        scale_as_tensor=True)
            kw = case_kwargs(case, CUDA, ctx.rank)
            static.append((case, case.input(ctx.rank, CUDA), case_outputs(case, CUDA, False),
                           kw, oneshot))

        def step():
            for case, x, out, kw, oneshot in static:
                allreduce_fusion(x, ws, case.pattern, use_oneshot=oneshot, **out, **kw)

        compile_first(ctx, ws, step)
        graph = capture_graph(ctx, step)
        bad = 0
        for i in range(replays):
            for case, x, out, kw, _ in static:
                step_scale = 0.05 if PATTERNS[case.pattern].quant == Quant.FP8 else 50.0
                case.seed, case.scale_factor = i + 1, step_scale * (i + 1)
                x.copy_(case.input(ctx.rank, CUDA))
                kw["scale_factor"].fill_(case.scale_factor)
                for t in out.values():
                    t.view(torch.uint8).fill_(0xFF)
            replay_graph(ctx, graph)
            for case, _, out, _, _ in static:
                inputs = [case.input(r, CUDA) for r in range(ctx.world_size)]
                shared = Case(case.pattern, case.num_tokens, case.hidden_dim, dtype,
                              layout_code=case.layout_code).own(ctx.rank, CUDA)
                ref = reference.reference_allreduce_fusion(
                    inputs, case.pattern, residual_in=shared["residual_in"],
                    rms_gamma=shared["rms_gamma"], scale_factor=case.scale_factor,
                    layout_code=case.layout_code)
                bad += not check_outputs(out, ref, case).ok
        return bad


def test_cuda_graph_replays_with_changing_scale_tensor():
    assert run_ranks(2, _graph_scale_rank, 20, device=CUDA) == [0, 0]


def _many_rows_rank(ctx, dtype):
    """World size 1 with more rows than programs fit at once: the quant patterns whose
    rows then take chunks of 4096 (kernels/launch.py). Precompile (one PDL setting)
    must have built them: nothing compiles during the checked calls."""
    import triton

    sms = torch.cuda.get_device_properties(ctx.device).multi_processor_count
    rng = random.Random(11)
    cases = []
    for i, pattern in enumerate([P.kARResidualRMSNormFP4Quant,
                                 P.kARResidualRMSNormOutFP8Quant,
                                 P.kARResidualRMSNormOutFP4Quant,
                                 P.kARResidualRMSNormOutDynamicFP8Quant]):
        for h in (6000, 8192):  # two chunks, the second partly masked at 6000
            for t in (1, sms + 1, rng.randint(sms + 2, 300)):
                quant = PATTERNS[pattern].quant
                scale = rng.uniform(20, 2000) if quant == Quant.NVFP4 else rng.uniform(0.02, 0.5)
                cases.append(Case(pattern, t, h, dtype, seed=100 * i + t, scale_factor=scale,
                                  weight_bias=float(t % 2), scale_as_tensor=bool(t % 2)))
    misses = []
    with make_workspace(ctx, dtype, 300, 8192) as ws:
        ws.precompile(patterns=sorted({c.pattern for c in cases}), launch_with_pdl=(False,),
                      dtypes=[dtype])
        triton.knobs.runtime.jit_cache_hook = lambda *a, **k: misses.append(k) and False
        try:
            results = [run_case(ws, case, 0, 1, ctx.device, with_output=False)
                       for case in cases]
        finally:
            triton.knobs.runtime.jit_cache_hook = None
    return results, len(misses)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_world_size_1_many_rows_narrower_chunks_match_and_were_precompiled(dtype):
    (results, misses), = run_ranks(1, _many_rows_rank, dtype, device=CUDA)
    assert_all_good([results])
    assert misses == 0, f"{misses} kernel variants compiled after precompile"


def test_divide_by_gives_div_rn_quotients_and_codes():
    """epilogue.divide_by (the FP8 quantisers' division by one scale) against div_rn on
    the GPU: every bf16 value and a million random fp32 bit patterns (NaN, inf,
    subnormals included), divided by 260 scales (log-uniform over 2^-40 .. 2^40, the
    edges of its fast range, and divisors a device scale tensor may hold unchecked: 0,
    negative, NaN, inf, subnormal). Quotients must have div_rn's bits wherever |x / s| >=
    2^-62 (NaN for NaN), and e4m3 codes must be equal everywhere."""
    import triton
    import triton.language as tl

    from arfusion.kernels.epilogue import divide_by, e4m3

    @triton.jit
    def divide(x_ptr, s_ptr, fast_ptr, exact_ptr, fast_code_ptr, exact_code_ptr, n,
               BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        out = tl.program_id(1) * n + offs
        m = offs < n
        x = tl.load(x_ptr + offs, mask=m)
        s = tl.load(s_ptr + tl.program_id(1))
        fast = divide_by(x, s)
        exact = tl.div_rn(x, tl.zeros_like(x) + s)
        tl.store(fast_ptr + out, fast, mask=m)
        tl.store(exact_ptr + out, exact, mask=m)
        tl.store(fast_code_ptr + out, e4m3(fast).to(tl.uint8, bitcast=True), mask=m)
        tl.store(exact_code_ptr + out, e4m3(exact).to(tl.uint8, bitcast=True), mask=m)

    gen = torch.Generator().manual_seed(11)
    every_bf16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = torch.cat([every_bf16.view(torch.bfloat16).float(),
                   torch.randint(-(2**31), 2**31, (2**20,), generator=gen,
                                 dtype=torch.int64).to(torch.int32).view(torch.float32)])
    near = [2.0**-32, 2.0**32, 2.0**-32 * (1 - 2**-24), 2.0**32 * (1 + 2**-23)]
    odd = [0.0, -0.0, -1.0, -3.5, float("nan"), float("inf"), 1e-45, 1e-39, 3.4e38,
           2.0**-100, 2.0**100]
    common = [1.0, 3.0, 7.0, 0.1, 448.0, 1 / 448, 2.0**-9 / 448, 0.0123, 6.0]
    scales = torch.cat([torch.tensor(near + odd + common),
                        torch.exp2(torch.rand(260 - 24, generator=gen) * 80 - 40)])
    x, scales = x.to(CUDA), scales.float().to(CUDA)
    n, block = x.numel(), 1024
    for part in scales.split(20):
        fast, exact = (torch.empty(len(part), n, device=CUDA) for _ in range(2))
        codes = [torch.empty(len(part), n, dtype=torch.uint8, device=CUDA) for _ in range(2)]
        divide[(triton.cdiv(n, block), len(part))](x, part, fast, exact, *codes, n,
                                                   BLOCK=block, enable_fp_fusion=False)
        big = exact.abs() >= 2.0**-62  # False for NaN
        same_bits = fast.view(torch.int32) == exact.view(torch.int32)
        both_nan = fast.isnan() & exact.isnan()
        wrong = (big & ~same_bits) | (exact.isnan() & ~both_nan) | (codes[0] != codes[1])
        if wrong.any():
            j, i = wrong.nonzero()[0].tolist()
            pytest.fail(f"{int(wrong.sum())} quotients differ, e.g. {x[i].item()!r} / "
                        f"{part[j].item()!r}: {fast[j, i].item()!r} (code {codes[0][j, i]}) "
                        f"!= div_rn {exact[j, i].item()!r} (code {codes[1][j, i]})")
