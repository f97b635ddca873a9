"""One process per rank on one GPU under MPS: the real deployment path (workspaces made
the way vLLM makes them: a gloo group, CUDA IPC or POSIX-fd cuMem handles between the
processes), with the CUDA Multi-Process Service so that the processes' kernels run
concurrently. Real clients' call sequences (tests/clients.py) at 2 and 4 ranks, both
backends, against arfusion.reference and equal on every rank.

Marked `mps`: scripts/gpu_suite.sh runs these first, in a pytest process of their own,
because the daemon must start before the pytest process creates a CUDA context.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from arfusion import create_allreduce_fusion_workspace
from arfusion.testing import mps_daemon, run_processes

from .. import clients

pytestmark = [pytest.mark.gpu, pytest.mark.mps]


@pytest.fixture(scope="module")
def mps():
    with mps_daemon() as running:
        if not running:
            pytest.skip("the MPS control daemon cannot start here (needs "
                        "nvidia-cuda-mps-control and root)")
        yield


def _rank(rank: int, world: int, backend: str) -> list:
    torch.cuda.set_device(0)

    def meet(fn):
        dist.barrier()
        result = fn()
        torch.cuda.synchronize()
        return result

    with create_allreduce_fusion_workspace(
            backend, world_size=world, rank=rank, max_token_num=64, hidden_dim=1024,
            dtype=torch.bfloat16, gpus_per_node=world) as ws:
        with ws.compile_only():  # build every kernel first: nothing launches
            clients.run_scenarios(ws, rank, world, "cuda", seed=1, exact=False)
        dist.barrier()
        return [(label, chk.ok, chk.problems, dig) for label, chk, dig in
                clients.run_scenarios(ws, rank, world, "cuda", seed=world, exact=False,
                                      meet=meet)]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", ["trtllm", "mnnvl"])
def test_client_sequences_one_process_per_rank_under_mps(mps, world, backend):
    by_rank = run_processes(world, _rank, backend, backend="gloo", timeout_s=900)
    clients.assert_ranks_agree(by_rank)
