"""A row's outputs do not depend on its batch (docs/contract.md: the row's sum of squares
has no summation order), on the CPU torch backend: every row computed in batches of 1,
7, 64 and 72 (the workspace's maximum), at world size 1, over 2 gloo processes (every
dtype) and 8 threads (bf16), every pattern but the MoE ones (their inputs are not rows of
one tensor);
each output row, scales read back per row, bit-identical across batches and to
arfusion.reference (a NaN matching any NaN: the contract leaves NaN bits open). Rows
hold huge next to tiny values, subnormals, zeros, inf and NaN."""

from __future__ import annotations

import pytest
import torch

from arfusion import allreduce_fusion, create_allreduce_fusion_workspace, moe, reference
from arfusion.comm import InProcessGroup
from arfusion.patterns import MOE_PATTERNS, PATTERNS, Quant
from arfusion.testing import Case, case_outputs, differing_elements, run_processes, run_ranks

ROWS, H = 72, 48
BATCHES = (1, 7, 64, ROWS)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CODES = [p for p in sorted(PATTERNS) if p not in MOE_PATTERNS]


def rows(rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s input and residual rows; the first rows special."""
    g = torch.Generator().manual_seed(50 + rank)
    x = torch.randn(ROWS, H, generator=g) * 3
    x[1, :24] *= 1e-4 if dtype != torch.float32 else 1e-25  # tiny next to ordinary
    x[2] = torch.finfo(dtype).tiny * torch.randn(H, generator=g)  # subnormal squares
    x[3] = 0.0
    x[4, 9] = float("inf")
    x[5, 2] = float("nan")
    if dtype == torch.float32:
        x[6, 0] = 1e18  # its square is finite, 1e36, beside squares near 1
    res = torch.randn(ROWS, H, generator=g)
    res[3] = 0.0
    return x.to(dtype), res.to(dtype)


def per_row(pattern: int, name: str, t: torch.Tensor, tokens: int, layout: int) -> torch.Tensor:
    """Output `name` as one row per token (scale layouts read back to fp32)."""
    quant = PATTERNS[pattern].quant
    if name == "scale_out" and quant == Quant.NVFP4:
        return reference.read_scales(t, tokens, H, layout)
    if name == "scale_out" and quant == Quant.GROUP_FP8:
        return moe.read_group_fp8_scales(t, tokens, H, 16)
    return t.contiguous().reshape(tokens, -1)


def differing(rank: int, world: int, dtype: torch.dtype, comm=None) -> dict:
    """Bytes that differ from the reference, per (pattern, batch, output)."""
    x, res = rows(rank, dtype)
    gamma = (torch.rand(H, generator=torch.Generator().manual_seed(9)) * 2.5 - 0.75).to(dtype)
    inputs = [rows(r, dtype)[0] for r in range(world)]
    out = {}
    with create_allreduce_fusion_workspace("torch", world_size=world, rank=rank,
                                           max_token_num=ROWS, hidden_dim=H, dtype=dtype,
                                           comm_backend=comm) as ws:
        for i, pattern in enumerate(CODES):
            if PATTERNS[pattern].quant == Quant.NVFP4 and dtype == torch.float32:
                continue
            layout = i % 3
            own = dict(residual_in=res, rms_gamma=gamma, rms_eps=1e-6, scale_factor=0.5,
                       layout_code=layout, block_quant_group_size=16, weight_bias=0.25)
            ref = reference.reference_allreduce_fusion(
                inputs, pattern, **own) if PATTERNS[pattern].norm else \
                reference.reference_allreduce_fusion(inputs, pattern)
            for batch in BATCHES:
                got: dict[str, list] = {}
                for s in range(0, ROWS, batch):
                    t = min(batch, ROWS - s)
                    case = Case(pattern, t, H, dtype, layout_code=layout, group=16)
                    outs = case_outputs(case, "cpu")
                    kw = {k: v[s:s + t] if k == "residual_in" else v for k, v in own.items()}
                    if PATTERNS[pattern].norm:
                        allreduce_fusion(x[s:s + t], ws, pattern, **outs, **kw)
                    else:
                        allreduce_fusion(x[s:s + t], ws, pattern, **outs)
                    for name, v in outs.items():
                        got.setdefault(name, []).append(per_row(pattern, name, v, t, layout))
                for name, parts in got.items():
                    want = per_row(pattern, name, ref[name], ROWS, layout)
                    out[pattern, batch, name] = differing_elements(torch.cat(parts), want)
    return out


def _process(rank, world, dtype):
    return differing(rank, world, dtype)


def _thread(ctx, dtype):
    return differing(ctx.rank, ctx.world_size, dtype, ctx.comm)


@pytest.mark.parametrize("world,dtype", [(w, d) for w in (1, 2) for d in DTYPES]
                         + [(8, torch.bfloat16)])
def test_no_row_depends_on_its_batch(world, dtype):
    if world == 1:
        results = [differing(0, 1, dtype)]
    elif world == 8:
        results = run_ranks(world, _thread, dtype)
    else:
        results = run_processes(world, _process, dtype, timeout_s=600)
    for rank, out in enumerate(results):
        assert out and not {k: v for k, v in out.items() if v}, (rank, out)


def test_the_check_sees_a_batch_dependent_sum_of_squares(monkeypatch):
    """The same check fails where the sum of squares is a float sum of the batch's layout
    (rows summed in another order when batched): the test can fail."""
    plain = reference.sum_squares

    def batch_dependent(hf):
        if hf.shape[0] > 1:  # a batch: the float sum, in reverse column order
            return hf.flip(-1).mul(hf.flip(-1)).sum(-1, keepdim=True)
        return plain(hf)

    monkeypatch.setattr(reference, "sum_squares", batch_dependent)
    out = differing(0, 1, torch.float32, InProcessGroup(1).backends()[0])
    assert any(v for k, v in out.items() if k[2] == "norm_out"), out
