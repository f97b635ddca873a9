"""Replays of how real clients call `allreduce_fusion`, checked against arfusion.reference.

Each scenario reproduces one client's argument conventions (written from their
public behaviour, not copied):

- vLLM's fusion pass (`call_trtllm_fused_allreduce_norm`), the same residual and
  gamma on every rank, as a tensor-parallel engine has them: 3-D inputs viewed as
  2-D; with a residual, norm_out=input and residual_out=residual_in (in place);
  without one, a zero residual_in, residual_out=input and a separate norm_out;
  quant patterns get norm_out too (unused), an fp8 quant_out shaped like the
  3-D input, an int32 NVFP4 scale buffer viewed as fp8, layout SWIZZLED_128x4,
  use_oneshot from vLLM's H100 size table (None on mnnvl), PDL on and
  trigger_completion_at_end only for one-shot or more than 16 tokens;
- vLLM's `FlashInferAllReduce.all_reduce`: kAllReduce into an allocated output;
- FlashInfer's unified-API tests: each rank its own residual and gamma, every
  output passed for every pattern, byte
  buffers of other dtypes for quant_out/scale_out, scale_factor tensors of
  other dtypes, fp16 calls on a bf16 workspace;
- the MoE and group-FP8 callers of ../shared/MOE-PATTERNS.md section 4
  (`moe_scenarios`): TensorRT-LLM's DeepSeek/Kimi finalize (H 7168, top_k 8, weights
  in the input dtype, a shared expert, fresh norm_out/residual_out), Qwen3-MoE (no
  shared expert, H 4096 and 2048), SGLang's index map and weights reshaped to
  [T, top_k] (weights cast to bf16), Llama-4's reduction (H 5120, T <= 8, fp32 scales
  [E, T], a device expert count), vLLM's DeepGEMM group FP8 (G 128, patterns 8 and 9,
  T % 4 != 0 and Kg % 4 != 0, the scale buffer pre-filled with 0x7F7F7F7F) and the
  third-party G = 32 caller (weight_bias 1, residual_out=input, scale_out an int32
  view of a larger byte buffer). Index maps are permutations into expert blocks padded
  to 8 rows, with -1 slots and a row two tokens read; unreferenced rows are NaN.

`run_scenarios(ws, rank, world, device, seed, exact, meet)` runs them all on one
rank (every rank must call it) and returns a list of (label, CheckResult, digest).
Every call goes through `meet(fn)`: ranks that are threads on one GPU meet at a
barrier before it and synchronise after it (see arfusion.testing).
"""

from __future__ import annotations

import functools

import torch

from arfusion import AllReduceFusionPattern as P
from arfusion import allreduce_fusion, moe, reference
from arfusion.patterns import MOE_PATTERNS, NVFP4_BLOCK, PATTERNS, Quant, sf_size
from arfusion.testing import Case, check_outputs, poison, shared_digest

VLLM_ONESHOT_MAX_MB = {2: 32, 4: 2, 8: 0.5}  # vLLM's table for compute capability 9.0
VLLM_PDL_ADVANCE_TOKENS = 16
MIB = 1 << 20


def vllm_fused_allreduce_norm(ws, allreduce_in, residual, rms_gamma, pattern, norm_out=None,
                              quant_out=None, scale_out=None, scale_factor=None,
                              rms_eps=1e-6, weight_bias=0.0) -> None:
    """vLLM's call: mutates allreduce_in, residual, norm_out, quant_out, scale_out."""
    hidden = allreduce_in.shape[-1]
    x, res = allreduce_in.view(-1, hidden), residual.view(-1, hidden)
    if norm_out is not None:
        norm_out = norm_out.view(-1, hidden)
    size = x.numel() * x.element_size()
    if ws.backend == "mnnvl":
        use_oneshot = None
    else:
        limit = VLLM_ONESHOT_MAX_MB.get(ws.world_size)
        use_oneshot = limit is None or size <= limit * MIB
    if norm_out is None:
        norm_out, residual_out = x, res
    else:
        residual_out = x
    allreduce_fusion(
        input=x, workspace=ws, pattern=pattern, launch_with_pdl=True, output=None,
        residual_out=residual_out, norm_out=norm_out, quant_out=quant_out,
        scale_out=scale_out, residual_in=res, rms_gamma=rms_gamma, rms_eps=rms_eps,
        scale_factor=scale_factor,
        layout_code=0 if ws.backend in ("trtllm", "mnnvl") else None,
        use_oneshot=use_oneshot, fp32_acc=True, weight_bias=weight_bias,
        trigger_completion_at_end=use_oneshot is True or x.shape[0] > VLLM_PDL_ADVANCE_TOKENS)


def vllm_all_reduce(ws, x: torch.Tensor) -> torch.Tensor:
    """vLLM's FlashInferAllReduce.all_reduce: kAllReduce into a fresh output."""
    out = torch.empty_like(x)
    ret = allreduce_fusion(input=x, workspace=ws, pattern=P.kAllReduce, launch_with_pdl=True,
                           output=out, fp32_acc=True)
    assert ret is out, "kAllReduce must return the output it was given"
    return out


def _standard(got: dict, case: Case) -> dict:
    """Byte-buffer outputs read back in the reference's shapes and dtypes."""
    t, h = case.num_tokens, case.hidden_dim
    quant = PATTERNS[case.pattern].quant
    out = dict(got)
    q, s = got.get("quant_out"), got.get("scale_out")
    flat = lambda b: b.reshape(-1).view(torch.uint8)  # noqa: E731
    if quant in (Quant.FP8, Quant.DYNAMIC_FP8):
        out["quant_out"] = flat(q)[: t * h].view(torch.float8_e4m3fn).reshape(t, h)
    if quant == Quant.DYNAMIC_FP8:
        out["scale_out"] = flat(s)[: 4 * t].view(torch.float32).reshape(t, 1)
    if quant == Quant.NVFP4:
        out["quant_out"] = flat(q)[: t * h // 2].reshape(t, h // 2)
        # Padding bytes are unspecified: keep only the scales (for digests across ranks).
        scales = reference.read_scales(s, t, h, case.layout_code).to(torch.float8_e4m3fn)
        out["scale_out"] = reference.scatter_scales(scales.view(torch.uint8), case.layout_code)
    return out


def _check(label, got, ref, case, exact):
    got = _standard(got, case)
    return label, check_outputs(got, ref, case, exact=exact), shared_digest(got, case)


def _scale_tensor(value: float, dtype: torch.dtype, shape, device) -> tuple[torch.Tensor, float]:
    """A scale_factor tensor and the fp32 value the kernels must use (element 0)."""
    t = torch.full(shape, value, dtype=dtype, device=device)
    return t, float(t.reshape(-1)[0].float())


def _direct(fn):
    return fn()


def vllm_scenarios(ws, rank, world, device, seed, t, h, dtype, exact, meet=_direct):
    """Every vLLM fused-pattern call style at one shape."""
    results = []
    for i, (pattern, with_residual, three_d) in enumerate([
            (P.kARResidualRMSNorm, True, False), (P.kARResidualRMSNorm, False, True),
            (P.kARResidualRMSNormFP8Quant, True, True),
            (P.kARResidualRMSNormFP8Quant, False, False),
            (P.kARResidualRMSNormFP4Quant, True, False),
            (P.kARResidualRMSNormFP4Quant, False, True)]):
        quant = PATTERNS[pattern].quant
        if quant == Quant.NVFP4 and (dtype == torch.float32 or h % NVFP4_BLOCK):
            continue
        scale_value = {Quant.FP8: 0.07, Quant.NVFP4: 300.0}.get(quant, 1.0)
        scale, used = _scale_tensor(scale_value, torch.float32, (1, 1), device)
        case = Case(pattern, t, h, dtype, seed=seed * 31 + i, scale_factor=used,
                    layout_code=0, weight_bias=float(i % 2), replicated=True)
        inputs = [case.input(r, device) for r in range(world)]
        kw = case.own(rank, device)
        residual = kw["residual_in"].clone() if with_residual else \
            torch.zeros(t, h, dtype=dtype, device=device)
        ref = reference.reference_allreduce_fusion(
            inputs, pattern, residual_in=residual.clone(), rms_gamma=kw["rms_gamma"],
            scale_factor=used, layout_code=0, weight_bias=case.weight_bias)
        x = inputs[rank].clone()
        shape = (1, t, h) if three_d else (t, h)
        x, residual = x.view(shape), residual.view(shape)
        norm_out = None if with_residual else torch.full(shape, float("nan"), dtype=dtype,
                                                         device=device)
        quant_out = scale_out = None
        if quant == Quant.FP8:
            quant_out = poison(torch.empty(shape, dtype=torch.float8_e4m3fn, device=device))
        elif quant == Quant.NVFP4:
            quant_out = poison(torch.empty(t, h // 2, dtype=torch.uint8, device=device))
            rows, cols = -(-t // 128) * 128, -(-(h // 16) // 4)
            scale_out = poison(torch.empty(rows, cols, dtype=torch.int32, device=device)).view(
                torch.float8_e4m3fn)
        meet(functools.partial(
            vllm_fused_allreduce_norm, ws, x, residual, kw["rms_gamma"], pattern,
            norm_out=norm_out, quant_out=quant_out, scale_out=scale_out, scale_factor=scale,
            weight_bias=case.weight_bias))
        # With a residual the results land in place: residual <- h, input <- norm.
        got = {"residual_out": (residual if with_residual else x).view(t, h)}
        if quant == Quant.NONE:
            got["norm_out"] = (x if with_residual else norm_out).view(t, h)
        else:
            got.update(quant_out=quant_out, scale_out=scale_out)
            if with_residual and not torch.equal(x.view(t, h).view(torch.uint8),
                                                 inputs[rank].view(torch.uint8)):
                got["input_untouched"] = None  # reported below
        label = (f"vllm {PATTERNS[pattern].name} {'fused-add' if with_residual else 'no-res'}"
                 f"{' 3-D' if three_d else ''} {t}x{h} {dtype}")
        res = _check(label, {k: v for k, v in got.items() if k != "input_untouched"}, ref,
                     case, exact)
        if "input_untouched" in got:
            res[1].ok = False
            res[1].problems.append("input was written although the pattern does not write "
                                   "norm_out")
        results.append(res)
    case = Case(P.kAllReduce, t, h, dtype, seed=seed * 31 + 7)
    inputs = [case.input(r, device) for r in range(world)]
    x = inputs[rank].clone()
    out = meet(functools.partial(vllm_all_reduce, ws, x))
    results.append(_check(f"vllm FlashInferAllReduce.all_reduce {t}x{h} {dtype}",
                          {"output": out}, reference.reference_allreduce_fusion(
                              inputs, P.kAllReduce), case, exact))
    return results


def flashinfer_test_scenarios(ws, rank, world, device, seed, t, h, dtype, exact,
                              meet=_direct, call_dtype=None):
    """FlashInfer's unified-API test style: every output passed for every pattern,
    byte buffers of other dtypes, scale tensors of other dtypes; `call_dtype` runs the
    calls in another dtype of the same element size (fp16 on a bf16 workspace)."""
    dtype = call_dtype or dtype
    results = []
    scale_dtypes = [torch.bfloat16, torch.float64, torch.float16, torch.float32]
    for i, pattern in enumerate(ws.served_patterns):
        quant = PATTERNS[pattern].quant
        if quant == Quant.NVFP4 and (dtype == torch.float32 or h % NVFP4_BLOCK):
            continue
        if quant == Quant.GROUP_FP8 or pattern in MOE_PATTERNS:  # replays of their own
            continue
        sdt = scale_dtypes[i % len(scale_dtypes)]
        scale_value = {Quant.FP8: 0.07, Quant.NVFP4: 300.0}.get(quant, 1.0)
        scale, used = _scale_tensor(scale_value, sdt, (1,), device if i % 2 else "cpu")
        layout = i % 3
        case = Case(pattern, t, h, dtype, seed=seed * 37 + i, scale_factor=used,
                    layout_code=layout)
        inputs = [case.input(r, device) for r in range(world)]
        kw = case.own(rank, device)  # FlashInfer's tests draw every rank's own
        ref = reference.reference_allreduce_fusion(
            inputs, pattern, residual_in=kw["residual_in"], rms_gamma=kw["rms_gamma"],
            scale_factor=used, layout_code=layout) if PATTERNS[pattern].norm else \
            reference.reference_allreduce_fusion(inputs, pattern)
        nan = lambda shape, dt=dtype: torch.full(shape, float("nan"), dtype=dt,  # noqa: E731
                                                 device=device)
        outs = {"output": nan((t, h)), "residual_out": nan((t, h)), "norm_out": nan((t, h)),
                # byte buffers: FlashInfer allocates these as raw bytes of its own shapes
                "quant_out": torch.full((t, h), 0xFF, dtype=torch.uint8, device=device),
                "scale_out": torch.full((sf_size(t, max(1, h // 16), 0) + 4 * t,), -1,
                                        dtype=torch.int32, device=device)}
        x = inputs[rank].clone()
        ret = meet(functools.partial(
            allreduce_fusion, input=x, workspace=ws, pattern=pattern, launch_with_pdl=False,
            **outs, residual_in=kw["residual_in"], rms_gamma=kw["rms_gamma"], rms_eps=1e-6,
            scale_factor=scale, layout_code=layout, use_oneshot=None, fp32_acc=False))
        if ret is not outs["norm_out"]:
            raise AssertionError("a passed norm_out must be returned")
        traits = PATTERNS[pattern]
        got = {"output": outs["output"]}
        if traits.norm:
            got["residual_out"] = outs["residual_out"]
        if traits.norm_out:
            got["norm_out"] = outs["norm_out"]
        if quant != Quant.NONE:
            got["quant_out"] = outs["quant_out"]
        if quant in (Quant.NVFP4, Quant.DYNAMIC_FP8):
            got["scale_out"] = outs["scale_out"]
        label = f"flashinfer-style {traits.name} {t}x{h} {dtype} scale {sdt}"
        res = _check(label, got, ref, case, exact)
        untouched = [name for name in ("norm_out", "scale_out") if name not in got and
                     not _all_poison(outs[name])]
        if untouched:
            res[1].ok = False
            res[1].problems.append(f"{untouched} written although the pattern does not")
        results.append(res)
    return results


def _routed_rows(g: torch.Generator, t: int, top_k: int, h: int, dtype, device):
    """(permuted rows [P, H], index map int32 [T, top_k]): each routed copy a row of an
    expert block padded to 8 rows, a dropped slot (-1), a row two tokens read, the rows
    no index names NaN."""
    copies = t * top_k
    blocks = torch.randint(0, 4, (copies,), generator=g)  # 4 experts on this rank
    rows, start = torch.empty(copies, dtype=torch.int64), 0
    for e in range(4):
        mine = (blocks == e).nonzero().flatten()
        rows[mine] = start + torch.arange(len(mine))
        start += -(-len(mine) // 8) * 8
    idx = rows.reshape(t, top_k).to(torch.int32)
    idx[0, -1] = -1
    if t > 1:
        idx[1, 0] = idx[0, 0]
    permuted = torch.full((max(start, 1), h), float("nan"))
    used = idx[idx >= 0].long().unique()
    permuted[used] = torch.randn(len(used), h, generator=g)
    return permuted.to(dtype).to(device), idx.to(device)


def _finalize_call(ws, rank, world, device, seed, t, h, top_k, shared, sglang, exact, meet,
                   label):
    """TensorRT-LLM's finalize (SGLang's when `sglang`: flat index map and fp32 weights
    reshaped to [T, top_k], weights cast to bf16); fresh norm_out and residual_out."""
    dtype = ws.dtype
    case = Case(P.kMoEFinalizeARResidualRMSNorm, t, h, dtype, seed=seed, replicated=True)
    kw = case.own(rank, device)
    mine = None
    contributions = []
    for r in range(world):  # every rank's own experts, drawn alike on every rank
        g = torch.Generator().manual_seed(seed * 1009 + r)
        rows, idx = _routed_rows(g, t, top_k, h, dtype, device)
        w = torch.rand(t * top_k if sglang else (t, top_k), generator=g)
        w = (w.to(torch.bfloat16) if sglang else w.to(dtype)).to(device)
        sh = torch.randn(t, h, generator=g).to(dtype).to(device) if shared else None
        if sglang:  # SGLang's [T * top_k] tensors, reshaped as its fused call does
            idx, w = idx.reshape(-1).view(t, top_k), w.view(t, top_k)
        contributions.append(moe.moe_finalize_input(rows, idx, w, sh))
        if r == rank:
            mine = (rows, idx, w, sh)
    rows, idx, w, sh = mine
    ref = reference.reference_allreduce_fusion(
        contributions, P.kMoEFinalizeARResidualRMSNorm, residual_in=kw["residual_in"],
        rms_gamma=kw["rms_gamma"], rms_eps=1e-5)
    residual_out = torch.empty_like(kw["residual_in"])
    norm_out = torch.empty_like(kw["residual_in"])
    ret = meet(functools.partial(
        allreduce_fusion, input=rows, workspace=ws, pattern=P.kMoEFinalizeARResidualRMSNorm,
        launch_with_pdl=True, residual_in=kw["residual_in"], residual_out=residual_out,
        norm_out=norm_out, rms_gamma=kw["rms_gamma"], rms_eps=1e-5,
        expanded_idx_to_permuted_idx=idx, expert_scale_factor=w, shared_expert_output=sh))
    if ret is not norm_out:
        raise AssertionError("a passed norm_out must be returned")
    return _check(label, {"residual_out": residual_out, "norm_out": norm_out}, ref, case,
                  exact)


def _llama4_reduction(ws, rank, world, device, seed, t, h, exact, meet):
    """TensorRT-LLM's Llama-4 min-latency call: a device expert count, fp32 scores
    [E, T], the active experts' outputs [E, T, H], the shared output as token input;
    buffers sized for more experts than are active."""
    dtype, active = ws.dtype, 3
    case = Case(P.kMoEReductionARResidualRMSNorm, t, h, dtype, seed=seed, replicated=True)
    kw = case.own(rank, device)
    contributions, mine = [], None
    for r in range(world):
        g = torch.Generator().manual_seed(seed * 2003 + r)
        outs = torch.randn(active + 2, t, h, generator=g).to(dtype).to(device)
        score = torch.rand(active + 2, t, generator=g).to(device)
        token = torch.randn(t, h, generator=g).to(dtype).to(device)
        contributions.append(moe.moe_reduction_input(outs, score, token, active))
        if r == rank:
            mine = (outs, score, token)
    outs, score, token = mine
    ref = reference.reference_allreduce_fusion(
        contributions, P.kMoEReductionARResidualRMSNorm, residual_in=kw["residual_in"],
        rms_gamma=kw["rms_gamma"], rms_eps=1e-5)
    residual_out = torch.empty_like(kw["residual_in"])
    norm_out = torch.empty_like(kw["residual_in"])
    meet(functools.partial(
        allreduce_fusion, input=token, workspace=ws,
        pattern=P.kMoEReductionARResidualRMSNorm, launch_with_pdl=True,
        residual_in=kw["residual_in"], residual_out=residual_out, norm_out=norm_out,
        rms_gamma=kw["rms_gamma"], rms_eps=1e-5,
        moe_reduction_device_num_experts=torch.tensor([active], dtype=torch.int32,
                                                      device=device),
        moe_reduction_scale_input=score, moe_reduction_active_experts_token_input=outs,
        moe_reduction_token_input=token))
    return _check(f"llama4 reduction {t}x{h} {dtype}",
                  {"residual_out": residual_out, "norm_out": norm_out}, ref, case, exact)


def _group_fp8_call(ws, rank, world, device, seed, pattern, t, h, group, plugin, exact, meet):
    """vLLM's DeepGEMM call (a DeepGEMM-shaped scale tensor pre-filled with 0x7F7F7F7F,
    norm_out for 9), or the third-party plugin's (`plugin`: weight_bias 1, residual_out =
    input in place, no norm_out, scale_out an int32 view of a larger byte buffer)."""
    dtype = ws.dtype
    case = Case(pattern, t, h, dtype, seed=seed, replicated=True, group=group,
                weight_bias=1.0 if plugin else 0.0)
    kw = case.own(rank, device)
    inputs = [case.input(r, device) for r in range(world)]
    ref = reference.reference_allreduce_fusion(
        inputs, pattern, residual_in=kw["residual_in"], rms_gamma=kw["rms_gamma"],
        weight_bias=case.weight_bias, block_quant_group_size=group)
    kg = h // group
    kp, tm = -(-kg // 4), -(-t // 4) * 4
    if plugin:
        raw = torch.full((4 * (t + (kp - 1) * tm) + 64,), 0x7F, dtype=torch.uint8,
                         device=device)
        scale_out = raw.view(torch.int32).as_strided((t, kp), (1, tm))
    else:
        scale_out = torch.full((kp, tm), 0x7F7F7F7F, dtype=torch.int32,
                               device=device).t()[:t]
    x = inputs[rank].clone()
    quant_out = poison(torch.empty(t, h, dtype=torch.float8_e4m3fn, device=device))
    out = {"quant_out": quant_out, "scale_out": scale_out}
    if plugin:
        out["residual_out"] = x
    else:
        out["residual_out"] = torch.empty_like(x)
        if PATTERNS[pattern].norm_out:
            out["norm_out"] = torch.empty_like(x)
    meet(functools.partial(
        allreduce_fusion, input=x, workspace=ws, pattern=pattern, launch_with_pdl=True,
        residual_in=kw["residual_in"], rms_gamma=kw["rms_gamma"], rms_eps=1e-6,
        weight_bias=case.weight_bias, fp32_acc=True, block_quant_group_size=group,
        layout_code=0 if plugin else None, **out))
    who = "plugin" if plugin else "vllm deepgemm"
    return _check(f"{who} {PATTERNS[pattern].name} G{group} {t}x{h} {dtype}", out, ref, case,
                  exact)


def moe_scenarios(ws, rank, world, device, seed, exact, meet=_direct) -> list:
    """The MoE and group-FP8 callers (module docstring), at shapes that fit a workspace
    of `ws.capacity()` elements, on the patterns `ws` serves."""
    results = []
    fits = lambda t, h: t * h <= ws.capacity()  # noqa: E731
    served = set(ws.served_patterns)
    if P.kMoEFinalizeARResidualRMSNorm in served:
        for label, t, h, top_k, shared, sglang in (
                ("trtllm deepseek finalize", 9, 7168, 8, True, False),
                ("trtllm qwen3 finalize", 13, 4096, 8, False, False),
                ("trtllm qwen3 finalize", 30, 2048, 8, False, False),
                ("sglang kimi finalize", 1, 7168, 8, True, True)):
            if fits(t, h):
                results.append(_finalize_call(
                    ws, rank, world, device, seed * 7 + t, t, h, top_k, shared, sglang, exact,
                    meet, f"{label} {t}x{h} top_k {top_k} {ws.dtype}"))
    if P.kMoEReductionARResidualRMSNorm in served and fits(8, 5120):
        for t in (1, 8):
            results.append(_llama4_reduction(ws, rank, world, device, seed * 11 + t, t, 5120,
                                             exact, meet))
    for pattern in (P.kARResidualRMSNormPerTokenGroupFP8PackedQuant,
                    P.kARResidualRMSNormOutPerTokenGroupFP8PackedQuant):
        if pattern not in served:
            continue
        for t, h, group, plugin in ((7, 1664, 128, False), (9, 7168, 128, False),
                                    (11, 5120, 32, True)):
            if fits(t, h) and (pattern == P.kARResidualRMSNormPerTokenGroupFP8PackedQuant
                               or not plugin):
                results.append(_group_fp8_call(ws, rank, world, device, seed * 13 + t,
                                               pattern, t, h, group, plugin, exact, meet))
    return results


def _all_poison(t: torch.Tensor) -> bool:
    if t.dtype == torch.int32:
        return bool((t == -1).all())
    return bool(t.isnan().all())


SHAPES = [(1, 256), (5, 1024), (33, 112)]


def run_scenarios(ws, rank: int, world: int, device, seed: int, exact: bool,
                  meet=_direct) -> list:
    """Every scenario at every shape on this rank (every rank calls it)."""
    results = []
    other = _other_16bit(ws.dtype)
    for t, h in SHAPES:
        results += vllm_scenarios(ws, rank, world, device, seed, t, h, ws.dtype, exact, meet)
        results += flashinfer_test_scenarios(ws, rank, world, device, seed, t, h, ws.dtype,
                                             exact, meet)
        if other is not None:
            results += flashinfer_test_scenarios(ws, rank, world, device, seed, t, h,
                                                 ws.dtype, exact, meet, call_dtype=other)
    return results + moe_scenarios(ws, rank, world, device, seed, exact, meet)


def _other_16bit(dtype: torch.dtype) -> torch.dtype | None:
    return {torch.bfloat16: torch.float16, torch.float16: torch.bfloat16}.get(dtype)


def assert_ranks_agree(by_rank: list[list[tuple]]) -> None:
    """Every (label, ok, problems, digest) row passed on every rank, and every rank got
    the bits all must share (testing.shared_digest)."""
    failures = []
    for i, (label, _, _, dig) in enumerate(by_rank[0]):
        for rank, results in enumerate(by_rank):
            if not results[i][1]:
                failures.append(f"rank {rank} {label}: {results[i][2]}")
            if results[i][3] != dig:
                failures.append(f"{label}: rank {rank} got other bits")
    assert not failures, "\n".join(failures[:20])
