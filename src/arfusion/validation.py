"""One validation layer for every backend: checks a call, then resolves its outputs.

`validate_call` raises `TypeError`/`ValueError` naming the argument and what was
expected before anything is allocated or launched, so a rejected call leaves
every tensor untouched. Only after every check has passed does it allocate the
outputs the caller left as None. What each pattern reads and writes comes from
`patterns.PATTERNS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .patterns import (
    LAYOUT_NAMES,
    NVFP4_BLOCK,
    PATTERNS,
    UNSUPPORTED_PATTERNS,
    PatternTraits,
    Quant,
    QuantizationSFLayout,
    sf_size,
)
from .workspace import SUPPORTED_DTYPES, AllReduceFusionWorkspace

SCALE_DTYPES = (torch.uint8, torch.float8_e4m3fn)


@dataclass(slots=True)
class FusionCall:
    """A validated call: every tensor a backend reads or writes, outputs allocated."""

    input: torch.Tensor
    pattern: int
    traits: PatternTraits
    num_tokens: int
    hidden_dim: int
    output: torch.Tensor | None
    residual_out: torch.Tensor | None
    norm_out: torch.Tensor | None
    quant_out: torch.Tensor | None
    scale_out: torch.Tensor | None
    residual_in: torch.Tensor | None
    rms_gamma: torch.Tensor | None
    rms_eps: float
    scale_factor: float | torch.Tensor | None
    layout_code: int
    use_oneshot: bool | None
    launch_with_pdl: bool
    trigger_completion_at_end: bool
    weight_bias: float

    def result(self) -> torch.Tensor:
        """The tensor allreduce_fusion returns for this pattern."""
        return getattr(self, self.traits.returns)


def _fmt_dtypes(dtypes) -> str:
    return " or ".join(str(d) for d in dtypes)


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: tuple[torch.dtype, ...],
    shape: tuple[int, ...] | None,
    device: torch.device,
) -> torch.Tensor:
    """`t` is a contiguous tensor of one of `dtypes`, `shape` (if given), on `device`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {_fmt_dtypes(dtypes)}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return t


def _check_scale_factor(scale_factor: object, device: torch.device, pattern_name: str):
    if scale_factor is None:
        raise ValueError(f"scale_factor is required for pattern {pattern_name}")
    if isinstance(scale_factor, torch.Tensor):
        if scale_factor.dtype != torch.float32 or scale_factor.numel() != 1:
            raise ValueError(
                "scale_factor must be a float or a 1-element torch.float32 tensor, got a "
                f"{scale_factor.dtype} tensor of {scale_factor.numel()} elements"
            )
        if scale_factor.device != device:
            raise ValueError(f"scale_factor must be on {device}, got {scale_factor.device}")
        return scale_factor
    if isinstance(scale_factor, bool) or not isinstance(scale_factor, (int, float)):
        raise TypeError(
            "scale_factor must be a float or a 1-element torch.float32 tensor, "
            f"got {type(scale_factor).__name__}"
        )
    if not (math.isfinite(scale_factor) and scale_factor > 0):
        raise ValueError(f"scale_factor must be finite and > 0, got {scale_factor}")
    return float(scale_factor)


def _check_capacity(ws: AllReduceFusionWorkspace, t: int, h: int, use_oneshot) -> None:
    elems = t * h
    if ws.is_buffer_size_sufficient(ws.world_size, t, h, ws.dtype, use_oneshot):
        return
    limit = ws.capacity(use_oneshot)
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


def validate_call(
    input: object,
    workspace: object,
    pattern: object,
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
    scale_factor: float | torch.Tensor | None,
    layout_code: int | None,
    use_oneshot: bool | None,
    weight_bias: float,
) -> FusionCall:
    if not isinstance(workspace, AllReduceFusionWorkspace):
        raise TypeError(
            "workspace must be an AllReduceFusionWorkspace (from "
            f"create_allreduce_fusion_workspace), got {type(workspace).__name__}"
        )
    if workspace.destroyed:
        raise ValueError("workspace has been destroyed; create a new one")
    workspace.check()

    if isinstance(pattern, bool) or not isinstance(pattern, int):
        raise TypeError(f"pattern must be an AllReduceFusionPattern int, got {pattern!r}")
    if pattern in UNSUPPORTED_PATTERNS:
        raise ValueError(
            f"pattern {pattern} ({UNSUPPORTED_PATTERNS[pattern]}) is not supported by "
            f"arfusion; supported patterns: {sorted(PATTERNS)}"
        )
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {sorted(PATTERNS)}, got {pattern}")
    traits = PATTERNS[pattern]

    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() != 2:
        raise ValueError(
            f"input must be 2-D [num_tokens, hidden_dim], got shape {list(input.shape)}"
        )
    t, h = input.shape
    if t < 1 or h < 1:
        raise ValueError(f"input must have at least one token and one column, got {[t, h]}")
    if input.dtype != workspace.dtype:
        raise ValueError(
            f"input must have the workspace dtype {workspace.dtype}, got {input.dtype}"
        )
    device = workspace.device if workspace.device is not None else input.device
    check_tensor("input", input, dtypes=SUPPORTED_DTYPES, shape=None, device=device)
    if use_oneshot is not None and not isinstance(use_oneshot, bool):
        raise TypeError(f"use_oneshot must be None, True or False, got {use_oneshot!r}")
    _check_capacity(workspace, t, h, use_oneshot)

    row = (t, h)
    same = (input.dtype,)
    unused = {
        "output": False,  # output is optional for every pattern
        "residual_out": not traits.norm,
        "norm_out": not traits.norm_out,
        "quant_out": traits.quant == Quant.NONE,
        "scale_out": traits.quant in (Quant.NONE, Quant.FP8),
    }
    given = {"output": output, "residual_out": residual_out, "norm_out": norm_out,
             "quant_out": quant_out, "scale_out": scale_out}
    for name, is_unused in unused.items():
        if is_unused and given[name] is not None:
            raise ValueError(f"{name} is not written by pattern {traits.name}; pass None")

    if traits.norm:
        if residual_in is None:
            raise ValueError(f"residual_in is required for pattern {traits.name}")
        if rms_gamma is None:
            raise ValueError(f"rms_gamma is required for pattern {traits.name}")
        check_tensor("residual_in", residual_in, dtypes=same, shape=row, device=device)
        check_tensor("rms_gamma", rms_gamma, dtypes=SUPPORTED_DTYPES, shape=(h,), device=device)
        for name, value in (("rms_eps", rms_eps), ("weight_bias", weight_bias)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not rms_eps >= 0:
            raise ValueError(f"rms_eps must be >= 0, got {rms_eps}")

    for name in ("output", "residual_out", "norm_out"):
        if given[name] is not None:
            check_tensor(name, given[name], dtypes=same, shape=row, device=device)

    layout = QuantizationSFLayout.SWIZZLED_128x4 if layout_code is None else layout_code
    quant = traits.quant
    if quant in (Quant.FP8, Quant.NVFP4):
        scale_factor = _check_scale_factor(scale_factor, device, traits.name)
    if quant in (Quant.FP8, Quant.DYNAMIC_FP8) and quant_out is not None:
        check_tensor("quant_out", quant_out, dtypes=(torch.float8_e4m3fn,), shape=row,
                     device=device)
    if quant == Quant.DYNAMIC_FP8 and scale_out is not None:
        check_tensor("scale_out", scale_out, dtypes=(torch.float32,), shape=None, device=device)
        if tuple(scale_out.shape) not in ((t, 1), (t,)):
            raise ValueError(
                f"scale_out must have shape [{t}, 1] for dynamic FP8, got {list(scale_out.shape)}"
            )
    if quant == Quant.NVFP4:
        if input.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"NVFP4 patterns need float16 or bfloat16 input, got {input.dtype}")
        if h % NVFP4_BLOCK:
            raise ValueError(f"NVFP4 patterns need hidden_dim % 16 == 0, got hidden_dim={h}")
        if isinstance(layout, bool) or layout not in LAYOUT_NAMES:
            raise ValueError(
                f"layout_code must be a QuantizationSFLayout ({sorted(LAYOUT_NAMES)}), "
                f"got {layout_code!r}"
            )
        if quant_out is not None:
            check_tensor("quant_out", quant_out, dtypes=(torch.uint8,), shape=(t, h // 2),
                         device=device)
        if scale_out is not None:
            check_tensor("scale_out", scale_out, dtypes=SCALE_DTYPES, shape=None, device=device)
            need = sf_size(t, h // NVFP4_BLOCK, layout)
            if scale_out.numel() < need:
                raise ValueError(
                    f"scale_out must hold at least {need} bytes for {t} tokens, hidden_dim "
                    f"{h} in layout {LAYOUT_NAMES[layout]}, got {scale_out.numel()}"
                )

    # Every check passed: allocate what the caller left out.
    def alloc(shape, dtype=input.dtype):
        return torch.empty(shape, dtype=dtype, device=input.device)

    if not traits.norm and output is None:
        output = alloc(row)
    if traits.norm:
        residual_out = alloc(row) if residual_out is None else residual_out
        if traits.norm_out and norm_out is None:
            norm_out = alloc(row)
    if quant in (Quant.FP8, Quant.DYNAMIC_FP8) and quant_out is None:
        quant_out = alloc(row, torch.float8_e4m3fn)
    if quant == Quant.DYNAMIC_FP8 and scale_out is None:
        scale_out = alloc((t, 1), torch.float32)
    if quant == Quant.NVFP4:
        quant_out = alloc((t, h // 2), torch.uint8) if quant_out is None else quant_out
        if scale_out is None:
            scale_out = alloc((sf_size(t, h // NVFP4_BLOCK, layout),), torch.uint8)

    return FusionCall(
        input=input,
        pattern=pattern,
        traits=traits,
        num_tokens=t,
        hidden_dim=h,
        output=output,
        residual_out=residual_out,
        norm_out=norm_out,
        quant_out=quant_out,
        scale_out=scale_out,
        residual_in=residual_in if traits.norm else None,
        rms_gamma=rms_gamma if traits.norm else None,
        rms_eps=float(rms_eps),
        scale_factor=scale_factor if quant in (Quant.FP8, Quant.NVFP4) else None,
        layout_code=layout,
        use_oneshot=use_oneshot,
        launch_with_pdl=bool(launch_with_pdl),
        trigger_completion_at_end=bool(trigger_completion_at_end),
        weight_bias=float(weight_bias),
    )
