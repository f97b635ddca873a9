"""The public functions: `create_allreduce_fusion_workspace` and `allreduce_fusion`."""

import os
from typing import Any, Literal

import torch

from . import heuristics, topology
from .backends import BACKENDS, workspace_class
from .comm import CommBackend
from .patterns import MOE_PATTERNS
from .validation import FusionCall, MoEInputs, validate_call
from .workspace import LIVE_WORKSPACES, AllReduceFusionWorkspace, default_timeout_s

PRECOMPILE_ENV = "ARFUSION_PRECOMPILE"


def create_allreduce_fusion_workspace(
    backend: Literal["trtllm", "mnnvl", "torch", "auto"] = "auto",
    world_size: int = None,
    rank: int = None,
    max_token_num: int = None,
    hidden_dim: int = None,
    dtype: torch.dtype = None,
    gpus_per_node: int = None,
    comm_backend: CommBackend | None = None,
    force_oneshot_support: bool = False,
    group: Any = None,
) -> AllReduceFusionWorkspace:
    """Create a workspace for `allreduce_fusion` (collective: every rank calls it).

    The workspace holds `max_token_num * hidden_dim` elements of `dtype` per call and
    can be reused for any shape with `num_tokens * hidden_dim` up to that (check with
    `workspace.is_buffer_size_sufficient`). `backend="auto"` picks `trtllm` or `mnnvl`
    by topology checks and measured heuristics; `"torch"` must be asked for.

    With the environment variable ARFUSION_PRECOMPILE=1 (an opt-in that needs no code
    change in the client), the workspace builds the kernel variants its calls may
    need before it is returned (`workspace.precompile()`), not on first use of each.

    With peers, the ranks first meet (bounded by ARFUSION_TIMEOUT_S, default 30 s):
    duplicate ranks, or ranks that disagree on backend, world_size, max_token_num,
    hidden_dim, dtype or force_oneshot_support, are a ValueError on every rank; a
    rank whose own arguments fail raises its error and its peers a RuntimeError
    naming it; a peer that never comes is a RuntimeError naming it.

    Raises ValueError if no backend can serve the request (each one's reason is
    listed) or an argument is invalid; RuntimeError for an unknown backend name.
    """
    if backend != "auto" and backend not in BACKENDS:
        workspace_class(backend)  # raises RuntimeError naming the choices
    error = None
    try:
        req = topology.make_request(
            world_size, rank, max_token_num, hidden_dim, dtype, gpus_per_node,
            comm_backend, force_oneshot_support, group,
        )
    except (TypeError, ValueError) as e:
        error = e
    if (comm := topology.rendezvous(world_size, comm_backend, group)) is not None:
        topology.meet(comm, error, default_timeout_s(), backend=backend,
                      world_size=comm.Get_size() if world_size is None else world_size,
                      rank=rank, max_token_num=max_token_num, hidden_dim=hidden_dim,
                      dtype=str(dtype), force_oneshot_support=force_oneshot_support)
    if error is not None:
        raise error
    if backend == "auto":
        reasons = {name: check(req) for name, check in topology.REJECTIONS.items()}
        candidates = [name for name, reason in reasons.items() if reason is None]
        if not candidates:
            listed = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
            raise ValueError(
                f"No suitable backend found for world_size={req.world_size} "
                f"(gpus_per_node={req.gpus_per_node}): {listed}. "
                'Use backend="torch" for the portable torch.distributed fallback.'
            )
        backend = heuristics.prefer_backend(candidates, req.nodes)
    elif backend in topology.REJECTIONS and (reason := topology.REJECTIONS[backend](req)):
        raise ValueError(f"backend {backend!r} cannot serve this request: {reason}")
    workspace = workspace_class(backend).create(req)
    if os.environ.get(PRECOMPILE_ENV, "0") not in ("", "0"):
        try:
            workspace.precompile()
        except BaseException:
            workspace.destroy()
            raise
    return workspace


# The hot path's shortcuts: workspace classes already checked (isinstance against an ABC
# costs ~0.1 us a call) and the compile check bound once.
_WORKSPACE_CLASSES: set[type] = set()
_is_compiling = torch.compiler.is_compiling


def allreduce_fusion(
    input: torch.Tensor,
    workspace: AllReduceFusionWorkspace,
    pattern: int,
    launch_with_pdl: bool = False,
    trigger_completion_at_end: bool = True,
    output: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    norm_out: torch.Tensor | None = None,
    quant_out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
    residual_in: torch.Tensor | None = None,
    rms_gamma: torch.Tensor | None = None,
    rms_eps: float = 1e-6,
    scale_factor: float | torch.Tensor | None = None,
    layout_code: int | None = None,
    use_oneshot: bool | None = None,
    fp32_acc: bool = False,
    moe_reduction_device_num_experts: int | None = None,
    moe_reduction_scale_input: torch.Tensor | None = None,
    moe_reduction_active_experts_token_input: torch.Tensor | None = None,
    moe_reduction_token_input: torch.Tensor | None = None,
    expanded_idx_to_permuted_idx: torch.Tensor | None = None,
    expert_scale_factor: torch.Tensor | None = None,
    shared_expert_output: torch.Tensor | None = None,
    block_quant_group_size: int | None = None,
    weight_bias: float = 0.0,
) -> torch.Tensor:
    """All-reduce `input` over the workspace's ranks, then the pattern's epilogue.

    Unfused equivalent (pattern kARResidualRMSNorm)::

        dist.all_reduce(input)                 # fp32 sum in rank order
        residual_out = input + residual_in
        norm_out = rms_norm(residual_out, rms_gamma, rms_eps, weight_bias)

    Returns norm_out when the caller passed it, else quant_out for quant patterns,
    norm_out for kARResidualRMSNorm and output for kAllReduce. Outputs left as None
    are allocated; pass them all for CUDA graphs. Outputs the pattern does not write
    are ignored. `fp32_acc` is accepted for compatibility (accumulation is always
    fp32); the MoE arguments are read by patterns 6 and 7 only, `block_quant_group_size`
    by the per-token-group FP8 patterns 8 and 9 only (docs/contract.md, step 8). Every
    rank must issue the same sequence of calls.
    """
    moe = None
    if (moe_reduction_device_num_experts is not None or moe_reduction_scale_input is not None
            or moe_reduction_active_experts_token_input is not None
            or moe_reduction_token_input is not None or expanded_idx_to_permuted_idx is not None
            or expert_scale_factor is not None or shared_expert_output is not None):
        moe = dict(moe_reduction_device_num_experts=moe_reduction_device_num_experts,
                   moe_reduction_scale_input=moe_reduction_scale_input,
                   moe_reduction_active_experts_token_input=(
                       moe_reduction_active_experts_token_input),
                   moe_reduction_token_input=moe_reduction_token_input,
                   expanded_idx_to_permuted_idx=expanded_idx_to_permuted_idx,
                   expert_scale_factor=expert_scale_factor,
                   shared_expert_output=shared_expert_output)
    if workspace.__class__ not in _WORKSPACE_CLASSES:
        if not isinstance(workspace, AllReduceFusionWorkspace):
            raise TypeError(
                "workspace must be an AllReduceFusionWorkspace (from "
                f"create_allreduce_fusion_workspace), got {type(workspace).__name__}"
            )
        _WORKSPACE_CLASSES.add(workspace.__class__)
    if workspace.destroyed:
        raise ValueError("workspace has been destroyed; create a new one")
    workspace.check()
    real = not _is_compiling()
    call = validate_call(
        workspace, real, input, pattern, launch_with_pdl, trigger_completion_at_end, output,
        residual_out, norm_out, quant_out, scale_out, residual_in, rms_gamma, rms_eps,
        scale_factor, layout_code, use_oneshot, weight_bias, block_quant_group_size, moe)
    if real:
        workspace.run(call)
    else:
        _launch_op(call, workspace)
    return call.ret


def _launch_op(call: FusionCall, workspace: AllReduceFusionWorkspace) -> None:
    """torch.compile sees one opaque op that mutates the outputs in place; the workspace
    travels as its key in LIVE_WORKSPACES. Only the outputs the pattern writes are
    passed (already allocated), so unused outputs are not marked as mutated."""
    sf, moe = call.scale_factor, call.moe or MoEInputs()
    e = moe.num_experts
    torch.ops.arfusion.allreduce_fusion_(
        call.input, id(workspace), call.pattern, call.launch_with_pdl,
        call.trigger_completion_at_end, call.output, call.residual_out, call.norm_out,
        call.quant_out, call.scale_out, call.residual_in, call.rms_gamma, call.rms_eps,
        sf if isinstance(sf, torch.Tensor) else None,
        -1.0 if sf is None or isinstance(sf, torch.Tensor) else sf,
        call.layout_code, -1 if call.use_oneshot is None else int(call.use_oneshot),
        call.weight_bias, -1 if call.plan.group is None else call.plan.group,
        e if isinstance(e, torch.Tensor) else None, -1 if e is None or isinstance(
            e, torch.Tensor) else e, moe.scale, moe.active, moe.index, moe.expert_scale,
        moe.shared,
    )


@torch.library.custom_op(
    "arfusion::allreduce_fusion_",
    mutates_args=("output", "residual_out", "norm_out", "quant_out", "scale_out"),
)
def _allreduce_fusion_op(
    input: torch.Tensor,
    workspace_id: int,
    pattern: int,
    launch_with_pdl: bool,
    trigger_completion_at_end: bool,
    output: torch.Tensor | None,
    residual_out: torch.Tensor | None,
    norm_out: torch.Tensor | None,
    quant_out: torch.Tensor | None,
    scale_out: torch.Tensor | None,
    residual_in: torch.Tensor | None,
    rms_gamma: torch.Tensor | None,
    rms_eps: float,
    scale_tensor: torch.Tensor | None,
    scale_value: float,
    layout_code: int,
    use_oneshot: int,
    weight_bias: float,
    block_quant_group_size: int,
    num_experts_tensor: torch.Tensor | None,
    num_experts: int,
    moe_scale: torch.Tensor | None,
    moe_active: torch.Tensor | None,
    moe_index: torch.Tensor | None,
    moe_expert_scale: torch.Tensor | None,
    moe_shared: torch.Tensor | None,
) -> None:
    workspace = LIVE_WORKSPACES[workspace_id]
    allreduce_fusion(
        input, workspace, pattern, launch_with_pdl, trigger_completion_at_end, output=output,
        residual_out=residual_out, norm_out=norm_out, quant_out=quant_out,
        scale_out=scale_out, residual_in=residual_in, rms_gamma=rms_gamma, rms_eps=rms_eps,
        scale_factor=scale_tensor if scale_tensor is not None else
        (None if scale_value < 0 else scale_value), layout_code=layout_code,
        use_oneshot=None if use_oneshot < 0 else bool(use_oneshot), weight_bias=weight_bias,
        block_quant_group_size=None if block_quant_group_size < 0 else block_quant_group_size,
        moe_reduction_device_num_experts=num_experts_tensor if num_experts_tensor is not None
        else (None if num_experts < 0 else num_experts),
        moe_reduction_scale_input=moe_scale, moe_reduction_active_experts_token_input=moe_active,
        moe_reduction_token_input=input if pattern == MOE_PATTERNS[0] else None,
        expanded_idx_to_permuted_idx=moe_index, expert_scale_factor=moe_expert_scale,
        shared_expert_output=moe_shared)


@_allreduce_fusion_op.register_fake
def _(*args, **kwargs) -> None:
    return None
