"""Patterns 6-9 in plain torch: the MoE pre-reductions and the per-token-group FP8
with DeepGEMM's packed UE8M0 scales (../shared/MOE-PATTERNS.md section 5, as
docs/contract.md states it). The oracle the backends will be checked against; like
`reference`, every step is one correctly rounded fp32 operation, so CPU and CUDA give
the same bits.

What each rank contributes to the all-reduce (`x_r`), before contract steps 1-4:

    6 (MoE reduction): x_r = cast(0.0 + act[0,t]*scale[0,t] + ... + act[E-1,t]*scale[E-1,t]
                                  + token_in[t])
    7 (MoE finalize):  x_r = cast(0.0 + sum over k with idx[t,k] != -1 of
                                  input[idx[t,k]] * w[t,k] (k order) + shared[t])

Each product is rounded to fp32 and then added (no fused multiply-add), in expert / k
order, starting from +0.0; w = 1 (no multiply) without `expert_scale_factor`, no
shared term without `shared_expert_output`. One rounding to the input dtype at the
end, where the unfused finalize rounds (FlashInfer's MoE kernels round to 16 bits
after every expert: a deliberate difference).

Patterns 8 and 9 quantise the normalised row n per token and group of G elements:

    amax = max |n|;  y = max(amax / 448, 1e-10)     # fp32, correctly rounded
    y = 2^ceil(log2 y)                              # exponent bits; y stays if a power of 2
    code = e4m3(clamp(n / y, -448, 448));  scale byte = biased exponent of y (UE8M0)

Scale bytes go to DeepGEMM's MN-major, TMA-aligned, packed layout: an int32 tensor
(T, Kp) with strides (1, Tm), Kg = H/G groups, Kp = ceil(Kg/4), Tm = ceil(T/4)*4; group
g of token t is byte g%4 (little-endian) of word (g//4)*Tm + t. Every byte of the
T + (Kp-1)*Tm words is written: padding (groups past Kg in the last pack, rows T..Tm-1)
is 0.
"""

from __future__ import annotations

import torch

from .reference import _const, e4m3

GROUP_FP8_MIN = 1e-10  # floor of a group's scale before rounding up to a power of two


def moe_reduction_input(active: torch.Tensor, scale: torch.Tensor, token_input: torch.Tensor,
                        num_experts: int) -> torch.Tensor:
    """Pattern 6's x_r [T, H] (input dtype): `active` holds E*T*H elements [E, T, H],
    `scale` fp32 E*T elements [E, T] (expert-major), `token_input` [T, H]."""
    t, h = token_input.shape
    act = active.reshape(-1)[: num_experts * t * h].reshape(num_experts, t, h).float()
    sc = scale.reshape(-1)[: num_experts * t].reshape(num_experts, t, 1).float()
    acc = torch.zeros((t, h), dtype=torch.float32, device=token_input.device)
    for e in range(num_experts):
        acc = acc + act[e] * sc[e]  # the product rounded to fp32, then added
    return (acc + token_input.float()).to(token_input.dtype)


def moe_finalize_input(permuted: torch.Tensor, index: torch.Tensor,
                       expert_scale: torch.Tensor | None,
                       shared: torch.Tensor | None) -> torch.Tensor:
    """Pattern 7's x_r [T, H] (dtype of `permuted`): `permuted` [P, H] rows, `index` int32
    [T, top_k] into them (-1: skip), `expert_scale` [T, top_k] of any float dtype (read
    as fp32) or None, `shared` [T, H] or None. Rows no index names are never read."""
    t, top_k = index.shape
    h = permuted.shape[1]
    acc = torch.zeros((t, h), dtype=torch.float32, device=permuted.device)
    for k in range(top_k):
        rows = index[:, k].long()
        take = rows != -1
        p = torch.zeros((t, h), dtype=torch.float32, device=permuted.device)
        p[take] = permuted[rows[take]].float()
        if expert_scale is not None:
            p = p * expert_scale[:, k].float().unsqueeze(1)
        acc = torch.where(take.unsqueeze(1), acc + p, acc)
    if shared is not None:
        acc = acc + shared.float()
    return acc.to(permuted.dtype)


def group_fp8_layout(num_tokens: int, hidden_dim: int, group: int) -> tuple[int, int, int]:
    """(Kg, Kp, Tm) of the packed UE8M0 scale layout (module docstring)."""
    kg = hidden_dim // group
    return kg, -(-kg // 4), -(-num_tokens // 4) * 4


def group_fp8_scale_bytes(num_tokens: int, hidden_dim: int, group: int) -> int:
    """Bytes of the packed scale storage: 4 * (T + (Kp - 1) * Tm)."""
    _, kp, tm = group_fp8_layout(num_tokens, hidden_dim, group)
    return 4 * (num_tokens + (kp - 1) * tm)


def group_fp8_offsets(num_tokens: int, hidden_dim: int, group: int,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Byte offset [T, Kg] of each token's group scale in the packed storage."""
    kg, _, tm = group_fp8_layout(num_tokens, hidden_dim, group)
    t = torch.arange(num_tokens, device=device).unsqueeze(1)
    g = torch.arange(kg, device=device).unsqueeze(0)
    return ((g // 4) * tm + t) * 4 + g % 4


def quantize_group_fp8(n: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group FP8 of `n` [T, H]: (codes float8_e4m3fn [T, H], scale storage uint8
    of `group_fp8_scale_bytes` in the packed layout, padding 0)."""
    t, h = n.shape
    v = n.float().reshape(t, h // group, group)
    amax = v.abs().amax(-1)
    y = torch.maximum(amax / _const(448.0, v), _const(GROUP_FP8_MIN, v))
    bits = y.view(torch.int32)
    up = torch.where((bits & 0x7FFFFF) != 0, (bits + 0x800000) & 0x7F800000, bits)
    y2 = up.view(torch.float32)
    codes = e4m3(v / y2.unsqueeze(-1)).reshape(t, h)
    exponent = ((up >> 23) & 0xFF).to(torch.uint8)
    storage = torch.zeros(group_fp8_scale_bytes(t, h, group), dtype=torch.uint8,
                          device=n.device)
    storage[group_fp8_offsets(t, h, group, n.device)] = exponent
    return codes, storage


def group_fp8_storage(scale_out: torch.Tensor, num_tokens: int, hidden_dim: int,
                      group: int) -> torch.Tensor:
    """The packed scale storage (uint8, `group_fp8_scale_bytes`) of `scale_out`: DeepGEMM's
    strided int32 (T, Kp) tensor with strides (1, Tm), or any contiguous buffer."""
    need = group_fp8_scale_bytes(num_tokens, hidden_dim, group)
    # Both forms start at the storage's first byte and hold at least `need` bytes there.
    words = -(-need // scale_out.element_size())
    return scale_out.as_strided((words,), (1,)).view(torch.uint8)[:need]


def read_group_fp8_scales(scale_out: torch.Tensor, num_tokens: int, hidden_dim: int,
                          group: int) -> torch.Tensor:
    """The fp32 scales [T, Kg] (2^(e - 127)) held in a packed scale buffer (any form
    `group_fp8_storage` takes)."""
    raw = group_fp8_storage(scale_out, num_tokens, hidden_dim, group)
    e = raw[group_fp8_offsets(num_tokens, hidden_dim, group, raw.device)].to(torch.int32)
    return (e << 23).view(torch.float32)


def dequantize_group_fp8(codes: torch.Tensor, storage: torch.Tensor, group: int) -> torch.Tensor:
    """float(code) * its group's scale, [T, H] fp32 (exact: the scales are powers of two)."""
    t, h = codes.shape
    s = read_group_fp8_scales(storage, t, h, group)
    return (codes.float().reshape(t, h // group, group) * s.unsqueeze(-1)).reshape(t, h)
