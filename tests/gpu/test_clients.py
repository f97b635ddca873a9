"""Real clients' call sequences (tests/clients.py) on the GPU kernels: ranks as threads
of one process on one GPU, both backends, 2, 4 and 8 ranks; results against
arfusion.reference (output/residual_out bit-exact, norm within 1 ulp, quantised codes
up to rounding boundaries) and bits equal on every rank."""

from __future__ import annotations

import pytest
import torch

from arfusion.testing import run_ranks

from .. import clients
from .test_trtllm import CUDA, compile_first, make_workspace

pytestmark = pytest.mark.gpu


def _clients_rank(ctx, backend):
    def meet(fn):
        ctx.comm.barrier()
        result = fn()
        ctx.stream.synchronize()
        return result

    out = []
    for dtype in (torch.bfloat16, torch.float32):
        with make_workspace(ctx, dtype, 64, 1024, backend) as ws:
            compile_first(ctx, ws, lambda ws=ws: clients.run_scenarios(
                ws, ctx.rank, ctx.world_size, CUDA, seed=1, exact=False))
            out += [(label, chk.ok, chk.problems, dig) for label, chk, dig in
                    clients.run_scenarios(ws, ctx.rank, ctx.world_size, CUDA,
                                          seed=ctx.world_size, exact=False, meet=meet)]
    return out


@pytest.mark.parametrize("world_size", [2, 4, 8])
@pytest.mark.parametrize("backend", ["trtllm", "mnnvl"])
def test_client_call_sequences_on_gpu(world_size, backend):
    by_rank = run_ranks(world_size, _clients_rank, backend, device=CUDA)
    clients.assert_ranks_agree(by_rank)
