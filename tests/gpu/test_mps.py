"""One process per rank on one GPU under MPS: the real deployment path (workspaces made
the way vLLM makes them: a gloo group, CUDA IPC or POSIX-fd cuMem handles between the
processes), with the CUDA Multi-Process Service so that the processes' kernels run
concurrently. Real clients' call sequences (tests/clients.py) at 2 and 4 ranks, both
backends, against arfusion.reference and equal on every rank; a peer killed
mid-sequence; 200 create/destroy cycles.

Marked `mps`: scripts/gpu_suite.sh runs these first, in a pytest process of their own,
because the daemon must start before the pytest process creates a CUDA context.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from arfusion import allreduce_fusion, create_allreduce_fusion_workspace
from arfusion.testing import Case, case_kwargs, case_outputs, mps_daemon, run_case, run_processes

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


def _cycles_rank(rank: int, world: int, backend: str, cycles: int) -> tuple:
    """`cycles` workspaces made, used once (a call checked against the reference) and
    destroyed; free device memory before the second and after the last (the first
    loads the kernels), PyTorch's cache emptied both times."""
    torch.cuda.set_device(0)
    ok, free_before, footprint = [], 0, 0
    for i in range(cycles + 1):
        if i == 1:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            dist.barrier()
            free_before = torch.cuda.mem_get_info()[0]
        with create_allreduce_fusion_workspace(
                backend, world_size=world, rank=rank, max_token_num=64, hidden_dim=4096,
                dtype=torch.bfloat16, gpus_per_node=world) as ws:
            ws.timeout_s = 5.0  # a stall costs seconds, not the default bound
            footprint = ws.footprint_bytes
            case = Case(1, 1 + i % 64, 4096, torch.bfloat16, seed=i)
            if i == 0:
                with ws.compile_only():
                    run_case(ws, case, rank, world, "cuda")
                dist.barrier()
            check = run_case(ws, case, rank, world, "cuda").check
            # Raised, not returned: a rank that left early would show only as its peer's
            # broken connection.
            assert check.ok, f"cycle {i}: {check.problems[:3]}; failed ranks {ws.failed_ranks()}"
            ok.append(check.ok)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    dist.barrier()
    return ok, free_before - torch.cuda.mem_get_info()[0], footprint


@pytest.mark.parametrize("backend", ["trtllm", "mnnvl"])
def test_200_create_destroy_cycles_give_the_device_memory_back(mps, backend):
    for ok, leaked, footprint in run_processes(2, _cycles_rank, backend, 200, backend="gloo",
                                               timeout_s=300):
        assert len(ok) == 201 and all(ok), leaked
        # Free memory is the whole GPU's: both ranks measure after the same barrier. One
        # 2 MiB granule of slack; a workspace (footprint) leaked per cycle would be 200x.
        assert leaked <= 2 << 20, (leaked, footprint)


def _dead_peer_rank(rank: int, world: int, backend: str) -> tuple | None:
    torch.cuda.set_device(0)
    case = Case(1, 8, 1024, torch.bfloat16, seed=7)  # the same on every rank
    ws = create_allreduce_fusion_workspace(backend, world_size=world, rank=rank,
                                           max_token_num=16, hidden_dim=1024,
                                           dtype=torch.bfloat16, gpus_per_node=world)
    ws.timeout_s = 3.0
    with ws.compile_only():
        run_case(ws, case, rank, world, "cuda")
    dist.barrier()
    ok = [run_case(ws, case, rank, world, "cuda").check.ok for _ in range(5)]
    if rank == world - 1:
        torch.cuda.synchronize()
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    for _ in range(2):
        allreduce_fusion(case.input(rank, "cuda"), ws, case.pattern,
                         **case_outputs(case, "cuda"), **case_kwargs(case, "cuda", rank))
    torch.cuda.synchronize()
    waited = time.monotonic() - start
    try:
        ws.check()
        message = "no error"
    except RuntimeError as e:
        message = str(e)
    start = time.monotonic()
    ws.destroy()
    return ok, waited, message, time.monotonic() - start


@pytest.mark.parametrize("backend", ["trtllm", "mnnvl"])
def test_killed_peer_is_named_within_the_bound_and_destroy_returns(mps, backend):
    world = 4
    results = run_processes(world, _dead_peer_rank, backend, backend="gloo", timeout_s=300,
                            may_die={world - 1})
    assert results[world - 1] is None
    for rank, (ok, waited, message, destroy_s) in enumerate(results[:world - 1]):
        assert all(ok) and len(ok) == 5
        # The first call after the kill waits out its 3 s bound; the second does nothing.
        assert 2.0 < waited < 10.0, (rank, waited)
        assert f"rank {rank}: ranks [{world - 1}] did not arrive" in message, message
        assert destroy_s < 5.0, (rank, destroy_s)
