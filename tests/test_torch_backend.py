"""The torch backend over gloo: every pattern, dtype and many shapes at world sizes 1 to 4.

Each rank's outputs must equal arfusion.reference, built from every rank's input and
the rank's own residual and gamma, bit for bit (the backend runs the reference
epilogue on the rank-order fp32 sum), and all ranks must agree where they pass the
same tensors.
"""

import pytest
import torch

from arfusion import create_allreduce_fusion_workspace
from arfusion.patterns import PATTERNS, Quant, pattern_supports
from arfusion.testing import Case, run_case, run_processes, run_ranks

SHAPES = [(1, 16), (3, 17), (1, 1), (7, 2880), (300, 64), (2, 5120), (5, 7168), (1, 8192),
          (33, 1000), (130, 48)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def cases(world_size):
    out = []
    for pattern in sorted(PATTERNS):
        quant = PATTERNS[pattern].quant
        for dtype in DTYPES:
            for t, h in SHAPES:
                if not pattern_supports(pattern, h, dtype):
                    continue
                i = len(out)
                scale = {Quant.FP8: 0.07, Quant.NVFP4: 300.0}.get(quant, 1.0)
                out.append(Case(pattern, t, h, dtype, seed=world_size * 1000 + i,
                                layout_code=i % 3, scale_factor=scale,
                                weight_bias=float(i % 2), scale_as_tensor=bool(i % 4 == 1),
                                replicated=i % 3 == 0))
    return out


def _rank(rank, world_size, comm=None):
    results = []
    for dtype in DTYPES:
        with create_allreduce_fusion_workspace(
                "torch", world_size=world_size, rank=rank, max_token_num=300,
                hidden_dim=8192, dtype=dtype, comm_backend=comm) as ws:
            for i, case in enumerate(c for c in cases(world_size) if c.dtype == dtype):
                res = run_case(ws, case, rank, world_size, "cpu", exact=True,
                               with_output=bool(i % 2))
                results.append((res.label, res.check.ok, res.check.problems, res.digest))
    return results


def _check(results_by_rank):
    assert len(results_by_rank[0]) == sum(1 for _ in cases(len(results_by_rank)))
    for i, (label, _, _, digest) in enumerate(results_by_rank[0]):
        for rank, results in enumerate(results_by_rank):
            assert results[i][1], f"rank {rank} {label}: {results[i][2]}"
            assert results[i][3] == digest, f"{label}: rank {rank} got other bits"


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_gloo_processes_match_reference(world_size):
    _check(run_processes(world_size, _rank, timeout_s=900))


@pytest.mark.parametrize("world_size", [3, 8])
def test_ranks_as_threads_with_in_process_backend(world_size):
    _check(run_ranks(world_size, lambda ctx: _rank(ctx.rank, ctx.world_size, ctx.comm)))


def test_case_draws_every_rank_its_own_tensors_unless_replicated():
    """testing.Case: each rank its own residual and gamma (negative gamma too); replicated
    cases and `shared()` (rank 0's, for callers that pass one set everywhere) agree."""
    case = Case(1, 3, 64, torch.bfloat16, seed=5)
    own = [case.own(r) for r in range(3)]
    assert not torch.equal(own[0]["residual_in"], own[1]["residual_in"])
    assert not torch.equal(own[1]["rms_gamma"], own[2]["rms_gamma"])
    assert (own[0]["rms_gamma"] < 0).any() and (own[0]["rms_gamma"] > 0).any()
    assert torch.equal(case.shared()["residual_in"], own[0]["residual_in"])
    same = Case(1, 3, 64, torch.bfloat16, seed=5, replicated=True)
    for r in range(3):
        assert torch.equal(same.own(r)["residual_in"], own[0]["residual_in"])
        assert torch.equal(same.own(r)["rms_gamma"], own[0]["rms_gamma"])
    ref = [case.reference(3, "cpu", r) for r in range(3)]
    assert torch.equal(ref[0]["output"], ref[2]["output"])  # the sum is the same everywhere
    assert not torch.equal(ref[0]["residual_out"], ref[2]["residual_out"])
