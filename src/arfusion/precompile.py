"""Cold start: build the kernel variants a workspace's calls will need before the first call.

Triton compiles a kernel variant on its first use: seconds each, and a process
serving many patterns meets dozens. A variant is fixed by the pattern, the input
dtype, the hidden size, the strategy, the PDL flags, whether `output` is passed,
whether `scale_factor` is a tensor and the NVFP4 layout; by the token count only
where the backend says so (`tokens`: at world size 1, more rows than fit the GPU
at once can take another chunk width).
`precompile` issues one tiny example call per combination asked for under
`workspace.compile_only()`: everything is compiled and loaded, nothing launches,
no peer is needed. Triton keeps what it compiled on disk (`TRITON_CACHE_DIR`,
default ~/.triton/cache), so a later process only loads it.

Ranks that are processes split the work: rank r compiles every N-th variant, the
ranks meet (for at most the workspace's wait bound: a rank that does not come
only leaves its share to the others), then each loads the rest from the disk
cache. Ranks that are threads of one process share Triton's in-memory cache:
rank 0 compiles everything while the others wait, then they find it there.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch

from .comm import bounded, is_in_process
from .moe import group_fp8_scale_bytes
from .patterns import MOE_PATTERNS, PATTERNS, Quant, QuantizationSFLayout, pattern_supports


def example_calls(workspace, patterns: Iterable[int] | None = None,
                  launch_with_pdl: Iterable[bool] = (False, True),
                  with_output: Iterable[bool] = (False,),
                  scale_tensor: Iterable[bool] = (False, True),
                  layout_codes: Iterable[int] = (QuantizationSFLayout.SWIZZLED_128x4,),
                  dtypes: Iterable[torch.dtype] | None = None,
                  tokens: Iterable[int] = (1,),
                  groups: Iterable[int] = (128,)) -> list[dict]:
    """allreduce_fusion keyword arguments, one call per variant asked for, at the
    workspace's hidden size, both strategies where the workspace allows them, PDL
    with either trigger, each token count of `tokens`, each group size of `groups`
    that divides the hidden size (per-token-group FP8). The defaults cover vLLM's and
    SGLang's calls."""
    h, device = workspace.hidden_dim, workspace.device
    dtypes = [workspace.dtype] if dtypes is None else list(dtypes)
    strategies = [None] if workspace.world_size == 1 else [
        o for o in (True, False) if workspace.capacity(o) >= h]
    pdl = [(p, t) for p in launch_with_pdl for t in ((True, False) if p else (True,))]
    scale = torch.ones(1, device=device)
    calls, tensors = [], {}
    for pattern, dtype in itertools.product(
            workspace.served_patterns if patterns is None else patterns, dtypes):
        traits = PATTERNS[pattern]
        if not pattern_supports(pattern, h, dtype):
            continue
        static_quant = traits.quant in (Quant.FP8, Quant.NVFP4)
        for t, oneshot, (use_pdl, trigger), out, tensor_scale, layout, group in \
                itertools.product(
                    tokens, strategies, pdl, with_output if traits.norm else (True,),
                    scale_tensor if static_quant else (False,),
                    layout_codes if traits.quant == Quant.NVFP4 else (None,),
                    [g for g in groups if h % g == 0] if traits.quant == Quant.GROUP_FP8
                    else (None,)):
            # One set of tensors per shape for all its calls (inputs are only read).
            if (t, dtype) not in tensors:
                x = torch.zeros(t, h, dtype=dtype, device=device)
                tensors[t, dtype] = (x, torch.empty_like(x), torch.zeros_like(x),
                                     torch.ones_like(x[0]))
            x, output, residual, gamma = tensors[t, dtype]
            kw = dict(input=x, pattern=pattern, use_oneshot=oneshot, launch_with_pdl=use_pdl,
                      trigger_completion_at_end=trigger)
            if out:
                kw["output"] = output
            if traits.norm:
                kw.update(residual_in=residual, rms_gamma=gamma)
            if static_quant:
                kw["scale_factor"] = scale if tensor_scale else 1.0
            if layout is not None:
                kw["layout_code"] = layout
            if pattern == MOE_PATTERNS[0]:  # one expert
                kw.update(moe_reduction_device_num_experts=1, moe_reduction_token_input=x,
                          moe_reduction_scale_input=torch.ones(1, t, device=device),
                          moe_reduction_active_experts_token_input=torch.zeros_like(x))
            elif pattern == MOE_PATTERNS[1]:  # top_k 1, row t of input for token t
                kw["expanded_idx_to_permuted_idx"] = torch.arange(
                    t, dtype=torch.int32, device=device).reshape(t, 1)
            if group is not None:
                kw.update(block_quant_group_size=group, scale_out=torch.empty(
                    group_fp8_scale_bytes(t, h, group), dtype=torch.uint8, device=device))
            calls.append(kw)
    return calls


def precompile(workspace, **variants) -> int:
    """Compile and load every variant `example_calls(workspace, **variants)` lists;
    collective when ranks are processes (see the module docstring). Returns how
    many example calls that was."""
    from .api import allreduce_fusion

    calls = example_calls(workspace, **variants)
    n, rank, comm = workspace.world_size, workspace.rank, workspace.comm
    if n == 1 or comm is None:
        first, then = calls, []
    elif is_in_process(comm):
        first, then = (calls, []) if rank == 0 else ([], calls)
    else:
        first, then = calls[rank::n], calls
    with workspace.compile_only():
        for kw in first:
            allreduce_fusion(workspace=workspace, **kw)
        if n > 1 and comm is not None:
            if is_in_process(comm):  # rank 0 compiles, however long that takes
                comm.barrier()
            else:  # a rank that did not come only costs the others its share
                bounded(comm.barrier, workspace.timeout_s)
        for kw in then:
            allreduce_fusion(workspace=workspace, **kw)
    return len(calls)
