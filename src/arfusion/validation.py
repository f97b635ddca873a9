"""One validation layer for every backend: checks a call, then resolves its outputs.

`validate_call` raises `TypeError`/`ValueError` naming the argument and what was
expected before anything is allocated or launched, so a rejected call leaves
every tensor untouched. What each pattern reads and writes comes from
`patterns.PATTERNS`; the drop-in rules (docs/contract.md, "Drop-in details") live
here and nowhere else:

- outputs a pattern does not write may be passed and are ignored;
- `quant_out` / `scale_out` are byte buffers (any dtype and shape, contiguous,
  large enough); the call carries flat views of the dtype the kernels store;
- `scale_factor` is a float, or a floating tensor (element 0) on the device or
  the CPU; floats and CPU tensors must be finite and > 0;
- `input` may be any floating dtype of the workspace dtype's element size;
- an output may be the very memory of an input (results are as if the inputs
  were read first); outputs that overlap each other, or overlap an input only
  partly, are rejected.

Hot path: everything that depends only on the call's *signature* (pattern,
flags, and each tensor's dtype, shape, device and contiguity) is checked once
and kept as a `Plan` in the workspace's `plans` dict. A call with a known
signature only re-checks what depends on the values: the scale factor, eps,
and which tensors alias which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from .moe import group_fp8_layout, group_fp8_scale_bytes, group_fp8_storage
from .patterns import (
    LAYOUT_NAMES,
    MOE_PATTERNS,
    NVFP4_BLOCK,
    PATTERNS,
    SUPPORTED_DTYPES,
    PatternTraits,
    Quant,
    QuantizationSFLayout,
    sf_size,
)

# FlashInfer's MoE keyword arguments (patterns 6 and 7; other patterns ignore them).
MOE_ARGUMENTS = (
    "moe_reduction_device_num_experts", "moe_reduction_scale_input",
    "moe_reduction_active_experts_token_input", "moe_reduction_token_input",
    "expanded_idx_to_permuted_idx", "expert_scale_factor", "shared_expert_output",
)
MOE_REDUCTION, MOE_FINALIZE = MOE_PATTERNS
DEFAULT_EPS = 1e-6
# The tensors a call reads or writes, in the kernels' argument order (FusionCall.ptrs);
# scale_factor is one when it is a device tensor.
POINTER_ORDER = ("input", "output", "residual_in", "residual_out", "rms_gamma", "norm_out",
                 "quant_out", "scale_out", "scale_factor")
QUANT_SLOT, SCALE_SLOT = POINTER_ORDER.index("quant_out"), POINTER_ORDER.index("scale_out")
# allreduce_fusion's arguments that validate_call takes, in its order.
CALL_ARGUMENTS = ("input", "pattern", "launch_with_pdl", "trigger_completion_at_end", "output",
                  "residual_out", "norm_out", "quant_out", "scale_out", "residual_in",
                  "rms_gamma", "rms_eps", "scale_factor", "layout_code", "use_oneshot",
                  "weight_bias", "block_quant_group_size")


class WorkspaceFacts(Protocol):
    """What validation reads of a workspace (plain data; no import of workspace.py)."""

    world_size: int
    dtype: torch.dtype
    device: torch.device | None
    max_token_num: int
    hidden_dim: int
    plans: dict
    backend: str
    served_patterns: tuple[int, ...]

    def capacity(self, use_oneshot: bool | None = None) -> int: ...


@dataclass(frozen=True, slots=True)
class Plan:
    """What a call signature decides once (see the module docstring)."""

    pattern: int
    traits: PatternTraits
    num_tokens: int
    hidden_dim: int
    layout: int
    group: int | None  # block_quant_group_size (per-token-group FP8), else None
    use_oneshot: bool | None
    launch_with_pdl: bool
    trigger_completion_at_end: bool
    write_output: bool  # `output` receives cast(s)
    quant_view: torch.dtype | None  # flat view the kernel stores into (None: as passed)
    scale_view: torch.dtype | None
    scale_mode: str  # "none", "value" (a float), "host" (CPU tensor), "device"
    returns: int  # POINTER_ORDER slot of the output allreduce_fusion returns
    written: tuple[str, ...]  # outputs this call writes
    # (POINTER_ORDER slot, shape, dtype) of each output written but passed as None
    alloc: tuple[tuple[int, tuple[int, ...], torch.dtype], ...]
    carried: tuple[bool, ...]  # per tensor slot (POINTER_ORDER[:8]): the pattern uses it
    read_slots: tuple[int, ...]  # POINTER_ORDER slots of the tensors passed and used
    spans: tuple[tuple[int, int, int], ...]  # (slot, bytes, ALIAS_*) for check_addresses
    # Address tuples already found free of bad aliasing (eager loops reuse buffers),
    # each with its `align` (check_addresses).
    verified: dict = field(default_factory=dict, compare=False)
    # What a backend keeps per plan (the kernel launcher: its compiled launches).
    launches: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True, slots=True)
class MoEInputs:
    """Pattern 6's or 7's own inputs, checked; `contribution` builds what the rank
    all-reduces from them (arfusion.moe). 6: E experts (an int, or a device int32 tensor
    read when the call runs), `scale` fp32 [E, T], `active` [E, T, H]; the token input is
    the call's `input`. 7: `index` int32 [T, top_k] into the call's `input` rows,
    `expert_scale` [T, top_k] or None, `shared` [T, H] or None."""

    num_experts: int | torch.Tensor | None = None
    scale: torch.Tensor | None = None
    active: torch.Tensor | None = None
    index: torch.Tensor | None = None
    expert_scale: torch.Tensor | None = None
    shared: torch.Tensor | None = None

    def contribution(self, x: torch.Tensor) -> torch.Tensor:
        """x_r [T, H]: from the token input `x` (6) or the permuted rows `x` (7)."""
        from . import moe

        if self.index is None:
            return moe.moe_reduction_input(self.active, self.scale, x, self.experts(x))
        return moe.moe_finalize_input(x, self.index, self.expert_scale, self.shared)

    def experts(self, x: torch.Tensor) -> int:
        """Pattern 6's E for token input `x`; a device count is read now and checked
        against what the tensors hold."""
        e = self.num_experts
        if not isinstance(e, torch.Tensor):
            return e or 0
        e = int(e.item())
        t, h = x.shape
        if e < 0 or self.scale.numel() < e * t or self.active.numel() < e * t * h:
            raise ValueError(
                f"moe_reduction_device_num_experts holds {e}: must be >= 0 and at most what "
                f"moe_reduction_scale_input ({self.scale.numel()} elements) and "
                f"moe_reduction_active_experts_token_input ({self.active.numel()}) hold for "
                f"{t} tokens of {h}")
        return e

    def signature(self, x: torch.Tensor) -> tuple[int, int]:
        """(experts, top_k) as the ranks must agree on them (0 where unused)."""
        return self.experts(x), 0 if self.index is None else self.index.shape[1]


def _tensor(name: str) -> property:
    """FusionCall's tensor `name`, or None where the pattern has no use for it."""
    slot = POINTER_ORDER.index(name)
    return property(lambda call: call.tensors[slot] if call.plan.carried[slot] else None)


@dataclass(slots=True)
class FusionCall:
    """A validated call: every tensor a backend reads or writes, outputs allocated.

    `tensors` are as passed (outputs left as None allocated), in POINTER_ORDER without
    scale_factor; the properties named after them give None where the pattern has no
    use for one. `quant_out` / `scale_out` are flat views of the dtype the kernels
    store (fp8 codes, packed uint8, scale bytes, fp32 per-token scales); `ret` is the
    tensor allreduce_fusion returns; `ptrs` the addresses, read once per call.
    Everything else is the plan's."""

    tensors: tuple[torch.Tensor | None, ...]
    rms_eps: float
    weight_bias: float
    scale_factor: float | torch.Tensor | None  # None: no quantisation scale
    plan: Plan
    ret: torch.Tensor
    ptrs: tuple[int, ...]  # data pointers in POINTER_ORDER, 0 for tensors the pattern skips
    align: int  # bit i set: ptrs[i] is not 16-byte aligned (kernels specialise on it)
    moe: MoEInputs | None = None  # patterns 6 and 7

    input = _tensor("input")
    output = _tensor("output")
    residual_in = _tensor("residual_in")
    residual_out = _tensor("residual_out")
    rms_gamma = _tensor("rms_gamma")
    norm_out = _tensor("norm_out")
    quant_out = _tensor("quant_out")
    scale_out = _tensor("scale_out")

    @property
    def traits(self) -> PatternTraits:
        return self.plan.traits

    @property
    def pattern(self) -> int:
        return self.plan.pattern

    @property
    def num_tokens(self) -> int:
        return self.plan.num_tokens

    @property
    def hidden_dim(self) -> int:
        return self.plan.hidden_dim

    @property
    def layout_code(self) -> int:
        return self.plan.layout

    @property
    def use_oneshot(self) -> bool | None:
        return self.plan.use_oneshot

    @property
    def launch_with_pdl(self) -> bool:
        return self.plan.launch_with_pdl

    @property
    def trigger_completion_at_end(self) -> bool:
        return self.plan.trigger_completion_at_end


def _fmt_dtypes(dtypes) -> str:
    return " or ".join(str(d) for d in dtypes)


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: tuple[torch.dtype, ...] | None,
    shape: tuple[int, ...] | None,
    device: torch.device,
) -> torch.Tensor:
    """`t` is a contiguous tensor of one of `dtypes` (None: any), `shape` (if given),
    on `device`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {_fmt_dtypes(dtypes)}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return t


def _check_bytes(name: str, t: object, need: int, device: torch.device, what: str) -> None:
    """A byte buffer: any contiguous tensor on `device` with at least `need` bytes."""
    check_tensor(name, t, dtypes=None, shape=None, device=device)
    have = t.numel() * t.element_size()
    if have < need:
        raise ValueError(f"{name} must hold at least {need} bytes for {what}, got {have}")


def flat_view(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous tensor's bytes as a 1-D tensor of `dtype`."""
    return t.reshape(-1).view(torch.uint8).view(dtype)


def as_bool(name: str, value: object) -> bool:
    """True/False, 0/1 and numpy booleans, as Python takes them."""
    if value is True or value is False:
        return value
    try:
        if value in (0, 1) and not isinstance(value, float):
            return bool(value)
    except (TypeError, ValueError):
        pass
    raise TypeError(f"{name} must be a bool (or 0/1), got {value!r}")


def _as_pattern(pattern: object, ws: WorkspaceFacts) -> int:
    """The pattern code as an int (numpy integers accepted, bools not), one `ws`
    serves."""
    if isinstance(pattern, bool) or not hasattr(pattern, "__index__"):
        raise TypeError(f"pattern must be an AllReduceFusionPattern int, got {pattern!r}")
    code = int(pattern.__index__())
    if code not in PATTERNS:
        raise ValueError(f"pattern must be one of {sorted(PATTERNS)}, got {code}")
    if code not in ws.served_patterns:
        raise ValueError(
            f"pattern {code} ({PATTERNS[code].name}) is not served by the {ws.backend} "
            f"backend yet (it serves {list(ws.served_patterns)}); a workspace created "
            "with backend='torch' runs it"
        )
    return code


def _check_moe(pattern: int, a: dict[str, Any], t: int, h: int, dtype: torch.dtype,
               device: torch.device) -> None:
    """Every MoE argument pattern 6 or 7 reads (`a`: the call's arguments; `t`, `h`:
    residual_in's rows and the hidden size)."""
    if pattern == MOE_REDUCTION:
        e = a["moe_reduction_device_num_experts"]
        if isinstance(e, torch.Tensor):
            check_tensor("moe_reduction_device_num_experts", e, dtypes=(torch.int32,),
                         shape=None, device=device)
            if e.numel() != 1:
                raise ValueError("moe_reduction_device_num_experts must be an int or a "
                                 f"one-element int32 tensor, got {e.numel()} elements")
            experts = None  # read when the call runs: the tensors must hold the maximum
        else:
            wanted = ("pattern kMoEReductionARResidualRMSNorm requires "
                      "moe_reduction_device_num_experts, an int >= 0 (or a one-element int32 "
                      f"tensor), got {e!r}")
            if e is not None and (isinstance(e, bool) or not hasattr(e, "__index__")):
                raise TypeError(wanted)
            if e is None or int(e.__index__()) < 0:
                raise ValueError(wanted)
            experts = int(e.__index__())
        for name, dt, per_expert in (("moe_reduction_scale_input", torch.float32, t),
                                     ("moe_reduction_active_experts_token_input", dtype, t * h)):
            v = a[name]
            if v is None:
                raise ValueError(f"pattern kMoEReductionARResidualRMSNorm requires {name}")
            check_tensor(name, v, dtypes=(dt,), shape=None, device=device)
            if experts is not None and v.numel() < experts * per_expert:
                raise ValueError(f"{name} must hold at least {experts} x {per_expert} "
                                 f"elements ([experts, tokens{', hidden' if dt == dtype else ''}"
                                 f"], expert-major), got {v.numel()}")
        return
    idx = a["expanded_idx_to_permuted_idx"]
    if idx is None:
        raise ValueError("pattern kMoEFinalizeARResidualRMSNorm requires "
                         "expanded_idx_to_permuted_idx")
    check_tensor("expanded_idx_to_permuted_idx", idx, dtypes=(torch.int32,), shape=None,
                 device=device)
    if idx.dim() != 2 or idx.shape[0] != t or idx.shape[1] < 1:
        raise ValueError("expanded_idx_to_permuted_idx must be 2-D [num_tokens, top_k] with "
                         f"num_tokens = residual_in's {t} rows, got shape {list(idx.shape)}")
    w = a["expert_scale_factor"]
    if w is not None:
        check_tensor("expert_scale_factor", w, dtypes=SUPPORTED_DTYPES, shape=tuple(idx.shape),
                     device=device)
    if a["shared_expert_output"] is not None:
        check_tensor("shared_expert_output", a["shared_expert_output"], dtypes=(dtype,),
                     shape=(t, h), device=device)


def _moe_inputs(pattern: int, a: dict[str, Any]) -> MoEInputs:
    """A checked call's MoE inputs (`a`: the MoE arguments by name)."""
    if pattern == MOE_REDUCTION:
        e = a["moe_reduction_device_num_experts"]
        return MoEInputs(num_experts=e if isinstance(e, torch.Tensor) else int(e),
                         scale=a["moe_reduction_scale_input"],
                         active=a["moe_reduction_active_experts_token_input"])
    return MoEInputs(index=a["expanded_idx_to_permuted_idx"], expert_scale=a["expert_scale_factor"],
                     shared=a["shared_expert_output"])


def _check_group(value: object, hidden_dim: int, traits: PatternTraits) -> int:
    """block_quant_group_size of a per-token-group FP8 pattern: an int > 0 dividing H."""
    if value is None:
        raise ValueError(f"pattern {traits.name} requires block_quant_group_size (the "
                         "elements per FP8 group, e.g. 128)")
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"block_quant_group_size must be an int, got {value!r}")
    group = int(value.__index__())
    if group <= 0:
        raise ValueError(f"block_quant_group_size must be > 0, got {group}")
    if hidden_dim % group:
        raise ValueError("hidden_dim must be divisible by block_quant_group_size, got "
                         f"{hidden_dim} and {group}")
    return group


def _check_group_scales(s: object, t: int, h: int, group: int,
                        device: torch.device) -> int:
    """scale_out of a per-token-group FP8 pattern (required, as FlashInfer requires it):
    DeepGEMM's int32 (T, Kp) tensor with strides (1, Tm), as FlashInfer checks it, or any
    contiguous buffer of at least the layout's bytes. Returns those bytes."""
    need = group_fp8_scale_bytes(t, h, group)
    if s is None:
        raise ValueError("scale_out is required for the per-token-group FP8 patterns (the "
                         "packed UE8M0 group scales)")
    _, kp, tm = group_fp8_layout(t, h, group)
    if isinstance(s, torch.Tensor) and s.dtype == torch.int32 and tuple(s.shape) == (t, kp):
        # DeepGEMM's tensor: element (t, k) must be word t + k * Tm, whatever strides say so
        # (a row-major one would read the scales back in another order: FlashInfer refuses
        # it too).
        if (t > 1 and s.stride(0) != 1) or (kp > 1 and s.stride(1) != tm):
            raise ValueError(f"scale_out stride must be (1, {tm}) (DeepGEMM's MN-major "
                             f"packed layout), got {s.stride()}")
        if s.device != device:
            raise ValueError(f"scale_out must be on {device}, got {s.device}")
    else:
        _check_bytes("scale_out", s, need, device,
                     f"{t} tokens of {h // group} groups: DeepGEMM's int32 ({t}, {kp}) "
                     f"tensor with strides (1, {tm}), or any contiguous buffer")
    return need


def _check_capacity(ws: WorkspaceFacts, t: int, h: int, use_oneshot) -> None:
    elems = t * h
    limit = ws.capacity(use_oneshot)
    if elems <= limit:
        return
    if use_oneshot and elems <= ws.capacity(None):
        raise ValueError(
            f"use_oneshot=True needs num_tokens*hidden_dim <= {limit} for this workspace, "
            f"got {t}*{h} = {elems}; pass use_oneshot=None or False, or create the "
            "workspace with force_oneshot_support=True"
        )
    raise ValueError(
        f"input of {t}x{h} = {elems} elements exceeds the workspace's capacity of "
        f"{limit} (max_token_num*hidden_dim = {ws.max_token_num}*{ws.hidden_dim}); "
        "check workspace.is_buffer_size_sufficient() or create a larger workspace"
    )


def _number(name: str, value: object, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def _make_plan(ws: WorkspaceFacts, a: dict[str, Any]) -> Plan:
    """Every signature-level check of a call (`a`: allreduce_fusion's arguments)."""
    pattern = _as_pattern(a["pattern"], ws)
    traits = PATTERNS[pattern]
    # Pattern 6 reads its token input where the others read `input` (FlashInfer ignores
    # `input` there); 7's `input` holds the permuted expert rows, residual_in the tokens.
    xname = "moe_reduction_token_input" if pattern == MOE_REDUCTION else "input"
    x = a[xname]
    if x is None and pattern == MOE_REDUCTION:
        raise ValueError(f"pattern {traits.name} requires moe_reduction_token_input")
    a = {**a, "input": x}
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{xname} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(
            f"{xname} must be 2-D [num_tokens, hidden_dim], got shape {list(x.shape)}"
        )
    t, h = x.shape
    if t < 1 or h < 1:
        raise ValueError(f"{xname} must have at least one token and one column, got {[t, h]}")
    if x.dtype not in SUPPORTED_DTYPES or x.element_size() != ws.dtype.itemsize:
        same_size = [d for d in SUPPORTED_DTYPES if d.itemsize == ws.dtype.itemsize]
        raise ValueError(
            f"{xname} must have a dtype of the workspace dtype's element size "
            f"({_fmt_dtypes(same_size)} for a {ws.dtype} workspace), got {x.dtype}"
        )
    device = ws.device if ws.device is not None else x.device
    if device.type not in ("cpu", "cuda"):  # the torch backend serves either, nothing else
        raise ValueError(f"{xname} must be on the CPU or a CUDA device, got {x.device}")
    check_tensor(xname, x, dtypes=None, shape=None, device=device)
    if pattern == MOE_FINALIZE:  # `input` has a row per routed copy; residual_in, a token
        if a["residual_in"] is None:
            raise ValueError(f"pattern {traits.name} requires residual_in (its rows are the "
                             "tokens)")
        if isinstance(a["residual_in"], torch.Tensor) and a["residual_in"].dim() == 2:
            t = a["residual_in"].shape[0]
    if pattern == MOE_FINALIZE and a["quant_out"] is not None:
        raise ValueError(f"pattern {traits.name} does not quantise: pass quant_out=None "
                         "(FlashInfer leaves its quant_out undefined)")
    if pattern == MOE_REDUCTION and a["quant_out"] is not None:
        traits = replace(traits, quant=Quant.NVFP4)  # as FlashInfer: NVFP4, as pattern 5
    use_oneshot = a["use_oneshot"]
    if use_oneshot is not None:
        use_oneshot = as_bool("use_oneshot", use_oneshot)
    _check_capacity(ws, t, h, use_oneshot)
    for flag in ("launch_with_pdl", "trigger_completion_at_end"):
        as_bool(flag, a[flag])

    row, same = (t, h), (x.dtype,)
    quant = traits.quant
    if traits.norm:
        for name in ("residual_in", "rms_gamma"):
            if a[name] is None:
                raise ValueError(f"pattern {traits.name} requires {name} ({name} is "
                                 "required for its residual add and RMSNorm)")
        check_tensor("residual_in", a["residual_in"], dtypes=same, shape=row, device=device)
        check_tensor("rms_gamma", a["rms_gamma"], dtypes=SUPPORTED_DTYPES, shape=(h,),
                     device=device)
        _number("rms_eps", a["rms_eps"], DEFAULT_EPS)
        _number("weight_bias", a["weight_bias"], 0.0)
    written = ["output"] if (a["output"] is not None or not traits.norm) \
        and pattern != MOE_FINALIZE else []  # 7 never writes output, as FlashInfer
    if traits.norm:
        written.append("residual_out")
    if traits.norm_out:
        written.append("norm_out")
    if quant != Quant.NONE:
        written.append("quant_out")
    if quant in (Quant.NVFP4, Quant.DYNAMIC_FP8, Quant.GROUP_FP8):
        written.append("scale_out")
    for name in ("output", "residual_out", "norm_out"):
        if name in written and a[name] is not None:
            check_tensor(name, a[name], dtypes=same, shape=row, device=device)

    layout = QuantizationSFLayout.SWIZZLED_128x4 if a["layout_code"] is None \
        else a["layout_code"]
    scale_mode = "none"
    if quant in (Quant.FP8, Quant.NVFP4):
        scale_mode = _check_scale_factor(a["scale_factor"], device)
    quant_view = scale_view = None
    q, s = a["quant_out"], a["scale_out"]
    group = scale_bytes = None
    if quant == Quant.GROUP_FP8:
        group = _check_group(a["block_quant_group_size"], h, traits)
        scale_bytes = _check_group_scales(s, t, h, group, device)
        scale_view = torch.uint8
    if quant in (Quant.FP8, Quant.DYNAMIC_FP8, Quant.GROUP_FP8):
        if q is not None:
            _check_bytes("quant_out", q, t * h, device, f"{t}x{h} FP8 codes")
            if q.dtype != torch.float8_e4m3fn or tuple(q.shape) != row:
                quant_view = torch.float8_e4m3fn
    if quant == Quant.DYNAMIC_FP8 and s is not None:
        _check_bytes("scale_out", s, 4 * t, device, f"{t} fp32 per-token scales")
        if s.dtype != torch.float32 or tuple(s.shape) not in ((t, 1), (t,)):
            scale_view = torch.float32
    if quant == Quant.NVFP4:
        if x.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"NVFP4 patterns need float16 or bfloat16 input, got {x.dtype}")
        if h % NVFP4_BLOCK:
            raise ValueError(f"NVFP4 patterns need hidden_dim % 16 == 0, got hidden_dim={h}")
        if isinstance(layout, bool) or layout not in LAYOUT_NAMES:
            raise ValueError(
                f"layout_code must be a QuantizationSFLayout ({sorted(LAYOUT_NAMES)}), "
                f"got {a['layout_code']!r}"
            )
        layout = int(layout)
        if q is not None:
            _check_bytes("quant_out", q, t * h // 2, device, f"{t}x{h} packed NVFP4 codes")
            if q.dtype != torch.uint8 or tuple(q.shape) != (t, h // 2):
                quant_view = torch.uint8
        if s is not None:
            _check_bytes("scale_out", s, sf_size(t, h // NVFP4_BLOCK, layout), device,
                         f"{t} tokens, hidden_dim {h} in layout {LAYOUT_NAMES[layout]}")
            if s.dtype != torch.uint8 or s.dim() != 1:
                scale_view = torch.uint8
    returns = POINTER_ORDER.index(traits.returns)  # unless the caller passed norm_out
    shapes = {"output": ((t, h), x.dtype), "residual_out": ((t, h), x.dtype),
              "norm_out": ((t, h), x.dtype)}
    if quant in (Quant.FP8, Quant.DYNAMIC_FP8, Quant.GROUP_FP8):
        shapes["quant_out"] = ((t, h), torch.float8_e4m3fn)
        shapes["scale_out"] = ((t, 1), torch.float32)
    elif quant == Quant.NVFP4:
        shapes["quant_out"] = ((t, h // 2), torch.uint8)
        shapes["scale_out"] = ((sf_size(t, h // NVFP4_BLOCK, layout),), torch.uint8)
    read = ["input", *written] + (["residual_in", "rms_gamma"] if traits.norm else [])
    carried = tuple(name in read for name in POINTER_ORDER[:-1])
    read_slots = tuple(i for i, name in enumerate(POINTER_ORDER[:-1])
                       if name in read and a[name] is not None)
    read_slots += (len(POINTER_ORDER) - 1,) if scale_mode == "device" else ()
    slot = POINTER_ORDER.index
    spans = [(slot(name), scale_bytes if name == "scale_out" and scale_bytes
              else _nbytes(a[name]), ALIAS_OUTPUT) for name in written if a[name] is not None]
    spans += [(slot(name), _nbytes(a[name]), ALIAS_INPUT) for name in ("input", "residual_in")
              if name == "input" or traits.norm]
    if pattern in MOE_PATTERNS:
        _check_moe(pattern, a, t, h, x.dtype, device)
    if traits.norm:
        spans.append((slot("rms_gamma"), _nbytes(a["rms_gamma"]), ALIAS_NEVER))
    return Plan(
        pattern, traits, t, h, layout, group, use_oneshot, bool(a["launch_with_pdl"]),
        bool(a["trigger_completion_at_end"]), a["output"] is not None and traits.norm,
        quant_view, scale_view, scale_mode, returns, tuple(written),
        tuple((slot(name), *shapes[name]) for name in written if a[name] is None),
        carried, read_slots, tuple(spans))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _check_scale_factor(scale_factor: object, device: torch.device) -> str:
    """The scale factor's mode; its value is checked per call (`_scale_value`)."""
    if scale_factor is None or (isinstance(scale_factor, (int, float))
                                and not isinstance(scale_factor, bool)):
        return "value"
    if isinstance(scale_factor, torch.Tensor):
        if not scale_factor.is_floating_point() or scale_factor.numel() < 1:
            raise ValueError(
                "scale_factor must be a float or a floating-point tensor with at least one "
                f"element, got a {scale_factor.dtype} tensor of {scale_factor.numel()} elements"
            )
        if scale_factor.device.type == "cpu":
            return "host"
        if scale_factor.device != device:
            raise ValueError(f"scale_factor must be on {device} or the CPU, got "
                             f"{scale_factor.device}")
        return "device"
    raise TypeError(
        "scale_factor must be a float or a floating-point tensor, "
        f"got {type(scale_factor).__name__}"
    )


def _scale_value(plan: Plan, scale_factor: object) -> float | torch.Tensor | None:
    """What the kernels get: a checked float, or the device tensor (not read here, so
    CUDA graphs stay valid when its value changes)."""
    mode = plan.scale_mode
    if mode == "none":
        return None
    if mode == "device":
        return scale_factor
    if scale_factor is None:
        return 1.0
    value = float(scale_factor.reshape(-1)[0]) if mode == "host" else float(scale_factor)
    if not 0.0 < value < math.inf:
        raise ValueError(f"scale_factor must be finite and > 0, got {value}")
    return value


ALIAS_INPUT, ALIAS_OUTPUT, ALIAS_NEVER = 0, 1, 2
VERIFIED_MAX = 256


def check_addresses(plan: Plan, ptrs: tuple[int, ...]) -> int:
    """Written outputs may not overlap each other or rms_gamma, and may overlap an
    input only as the very same memory (read first, then written). Sorted by address,
    any overlap shows between neighbours. `ptrs`: the passed tensors' addresses in
    POINTER_ORDER. Returns the call's `align` (FusionCall); both are kept per address
    tuple."""
    align = plan.verified.get(ptrs)
    if align is not None:
        return align
    spans = sorted((ptrs[i], n, kind, POINTER_ORDER[i]) for i, n, kind in plan.spans)
    for (p, n, kind, name), (q, m, kind2, other) in zip(spans, spans[1:], strict=False):
        if q >= p + n or ALIAS_OUTPUT not in (kind, kind2):  # apart, or both only read
            continue
        if (p, n) == (q, m) and {kind, kind2} == {ALIAS_INPUT, ALIAS_OUTPUT}:
            continue
        if kind == kind2 == ALIAS_OUTPUT:
            raise ValueError(f"{name} and {other} overlap: each output needs its own memory, "
                             "or one result would overwrite the other")
        out, inp = (name, other) if kind == ALIAS_OUTPUT else (other, name)
        raise ValueError(f"{out} partly overlaps {inp}: an output may be an input's very "
                         "memory (in place), not part of it")
    if len(plan.verified) >= VERIFIED_MAX:
        plan.verified.clear()
    plan.verified[ptrs] = align = sum(bool(p & 15) << i for i, p in enumerate(ptrs))
    return align


def validate_call(ws: WorkspaceFacts, real: bool, input: Any, pattern: Any,
                  launch_with_pdl: Any, trigger_completion_at_end: Any, output: Any,
                  residual_out: Any, norm_out: Any, quant_out: Any, scale_out: Any,
                  residual_in: Any, rms_gamma: Any, rms_eps: Any, scale_factor: Any,
                  layout_code: Any, use_oneshot: Any, weight_bias: Any,
                  block_quant_group_size: Any = None,
                  moe: dict[str, Any] | None = None) -> FusionCall:
    """Check one call (allreduce_fusion's arguments, in CALL_ARGUMENTS order) and
    allocate the outputs left as None. `real=False` (torch.compile tracing, fake
    tensors) skips the checks that read memory addresses."""
    passed = (input, output, residual_in, residual_out, rms_gamma, norm_out, quant_out,
              scale_out)  # POINTER_ORDER, then scale_factor
    # The plan's key: pattern, flags, each tensor's dtype, shape, device, contiguity (the
    # strides of one that is not: a per-token-group scale_out may be strided).
    try:
        key = (pattern.__class__, pattern, layout_code, use_oneshot, launch_with_pdl,
               trigger_completion_at_end, rms_eps.__class__, weight_bias.__class__,
               block_quant_group_size.__class__, block_quant_group_size,
               (scale_factor.dtype, scale_factor.device, scale_factor.numel() > 0)
               if isinstance(scale_factor, torch.Tensor) else scale_factor.__class__,
               *[None if t is None else (t.dtype, t.shape, t.device,
                                         t.is_contiguous() or t.stride()) for t in passed],
               None if moe is None else tuple(
                   (v.dtype, v.shape, v.device, v.is_contiguous())
                   if isinstance(v, torch.Tensor) else (v.__class__, v) for v in moe.values()))
        plan = ws.plans.get(key)
    except (AttributeError, TypeError):  # a wrong type or an unhashable value
        key = plan = None
    if plan is None:
        plan = _make_plan(ws, {**dict.fromkeys(MOE_ARGUMENTS), **(moe or {}), **dict(zip(
            CALL_ARGUMENTS, (
                input, pattern, launch_with_pdl, trigger_completion_at_end, output,
                residual_out, norm_out, quant_out, scale_out, residual_in, rms_gamma, rms_eps,
                scale_factor, layout_code, use_oneshot, weight_bias, block_quant_group_size),
            strict=True))})
        if key is not None:
            ws.plans[key] = plan
    scale = _scale_value(plan, scale_factor) if plan.scale_mode != "none" else None
    rms_eps = DEFAULT_EPS if rms_eps is None else float(rms_eps)
    if not rms_eps >= 0 and plan.traits.norm:
        raise ValueError(f"rms_eps must be >= 0, got {rms_eps}")
    weight_bias = 0.0 if weight_bias is None else float(weight_bias)
    if not math.isfinite(weight_bias) and plan.traits.norm:
        raise ValueError(f"weight_bias must be finite, got {weight_bias}")
    moe_in = None
    if plan.pattern in MOE_PATTERNS:
        moe = {**dict.fromkeys(MOE_ARGUMENTS), **moe}  # the plan checked them: not None
        moe_in = _moe_inputs(plan.pattern, moe)
        if plan.pattern == MOE_REDUCTION:
            passed = (moe["moe_reduction_token_input"], *passed[1:])
    ptrs, align = (), 0
    if real:
        tensors = (*passed, scale_factor)
        found = [0] * len(tensors)
        for i in plan.read_slots:
            found[i] = tensors[i].data_ptr()
        ptrs = tuple(found)
        align = check_addresses(plan, ptrs)

    # Every check passed: allocate what the caller left out (fresh memory: aligned),
    # make the kernels' views; a call that passed every output as it is copies nothing.
    out = passed
    if plan.alloc:
        out, fresh = list(passed), list(ptrs)
        for i, shape, dtype in plan.alloc:
            out[i] = t = torch.empty(shape, dtype=dtype, device=passed[0].device)
            if real:
                fresh[i] = t.data_ptr()
        ptrs = tuple(fresh)
    ret = norm_out if norm_out is not None else out[plan.returns]
    if plan.quant_view is not None or plan.scale_view is not None:
        out = list(out)
        if plan.quant_view is not None:
            out[QUANT_SLOT] = flat_view(out[QUANT_SLOT], plan.quant_view)
        if plan.group is not None:
            out[SCALE_SLOT] = group_fp8_storage(out[SCALE_SLOT], plan.num_tokens,
                                                plan.hidden_dim, plan.group)
        elif plan.scale_view is not None:
            out[SCALE_SLOT] = flat_view(out[SCALE_SLOT], plan.scale_view)
    return FusionCall(tuple(out), rms_eps, weight_bias, scale, plan, ret, ptrs, align, moe_in)
