"""The mnnvl backend's own parts on a GPU: the cuMem transport between processes and
its strategy-aware sizing. (Its kernels run the whole trtllm suite: test_trtllm.py
parametrises every protocol test over both backends.)"""

from __future__ import annotations

import pytest
import torch

from arfusion import AllReduceFusionPattern as P
from arfusion import (
    MNNVLAllReduceFusionWorkspace,
    create_allreduce_fusion_workspace,
    heuristics,
    sizing,
)
from arfusion.comm import TorchDistBackend, set_up
from arfusion.mnnvl import MNNVLAllreduceFusionStrategy
from arfusion.testing import Case, precompile_cases, run_case, run_processes, run_ranks

pytestmark = pytest.mark.gpu

CUDA = "cuda:0"
NBYTES = 6 << 20  # not a multiple of the 2 MiB granularity on purpose


def _posix_fd_rank(rank, world_size, cycles):
    from arfusion.memory import wrap_pointer
    from arfusion.memory.cumem import CuMemBuffer

    device = torch.device(CUDA)
    comm = TorchDistBackend()
    ok, free_before, kinds = [], None, set()
    for i in range(cycles + 1):
        if i == 1:  # after one round: the driver's own start-up memory is in use
            torch.cuda.synchronize()
            free_before = torch.cuda.mem_get_info(device)[0]
        buf = CuMemBuffer(set_up(comm, 30.0), NBYTES, device)
        kinds.add(buf.handle_type.name)
        buf.local.fill_(rank + 1)
        torch.cuda.synchronize()
        comm.barrier()
        peer = wrap_pointer(buf.peer_ptrs[1 - rank], NBYTES, device)
        ok.append(bool((peer == 2 - rank).all()))  # read the peer's memory
        peer[rank * 64:(rank + 1) * 64].fill_(100 + rank)  # write into it
        torch.cuda.synchronize()
        comm.barrier()
        ok.append(bool((buf.local[(1 - rank) * 64:(2 - rank) * 64] == 101 - rank).all()))
        del peer
        buf.close(30.0)
    torch.cuda.synchronize()
    comm.barrier()
    return ok, free_before - torch.cuda.mem_get_info(device)[0], kinds


def test_posix_fd_exchange_between_two_processes_and_no_leak_over_100_cycles():
    for ok, leaked, kinds in run_processes(2, _posix_fd_rank, 100, backend="gloo"):
        assert len(ok) == 202 and all(ok)
        assert kinds == {"CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR"}
        assert leaked < NBYTES  # 100 buffers of 6 MiB (3 mappings each) created and freed


def _default_sizing_rank(ctx):
    """Sized for two-shot at every size and one-shot up to the heuristic threshold;
    one-shot is then allowed for every call the rotations hold, and refused beyond."""
    dtype = torch.bfloat16
    max_tokens, hidden = 1024, 4096
    with create_allreduce_fusion_workspace(
            "mnnvl", world_size=ctx.world_size, rank=ctx.rank, max_token_num=max_tokens,
            hidden_dim=hidden, dtype=dtype, comm_backend=ctx.comm) as ws:
        assert isinstance(ws, MNNVLAllReduceFusionWorkspace)
        fits = ws.buffer_size_bytes // dtype.itemsize // ctx.world_size // 16 * 16
        big_t = fits // hidden + 1
        answers = (ws.is_buffer_size_sufficient(ctx.world_size, big_t, hidden, dtype, True),
                   ws.is_buffer_size_sufficient(ctx.world_size, big_t, hidden, dtype, False),
                   ws.is_buffer_size_sufficient(ctx.world_size, big_t, hidden, dtype, None),
                   ws.is_buffer_size_sufficient(ctx.world_size, big_t - 1, hidden, dtype,
                                                strategy=MNNVLAllreduceFusionStrategy.ONESHOT),
                   big_t - 1 > heuristics.oneshot_max_elements(ctx.world_size, dtype) // hidden)
        case = Case(P.kARResidualRMSNorm, big_t, hidden, dtype, seed=5)
        with pytest.raises(ValueError, match="use_oneshot=True needs"):
            run_case(ws, case, ctx.rank, ctx.world_size, CUDA, use_oneshot=True)
        allowed = Case(P.kARResidualRMSNorm, big_t - 1, hidden, dtype, seed=6)
        runs = [(case, dict(use_oneshot=None)), (case, dict(use_oneshot=False)),
                (allowed, dict(use_oneshot=True))]
        precompile_cases(ws, runs, ctx.rank, CUDA, ctx.comm)
        results = [run_case(ws, c, ctx.rank, ctx.world_size, CUDA, comm=ctx.comm,
                            **kw).check.ok for c, kw in runs]
        footprint = ws.footprint_bytes
    return answers, results, footprint


def test_default_sizing_is_strategy_aware():
    for answers, results, footprint in run_ranks(4, _default_sizing_rank, device=CUDA):
        assert answers == (False, True, True, True, True)
        assert results == [True, True, True]
        e = 1024 * 4096
        assert footprint == sizing.buffer_bytes(
            4, e, MNNVLAllReduceFusionWorkspace.oneshot_capacity(4, e, torch.bfloat16, False),
            torch.bfloat16)


def _flashinfer_constructor_rank(ctx):
    """FlashInfer's own constructor form (a mapping, FlashInfer's keyword names, its
    one-shot buffer override) gives a workspace that computes what arfusion's does."""
    from types import SimpleNamespace

    mapping = SimpleNamespace(world_size=ctx.world_size, rank=ctx.rank, gpus_per_node=8,
                              tp_size=ctx.world_size, tp_rank=ctx.rank)
    dtype, hidden = torch.bfloat16, 1536
    one_shot = MNNVLAllReduceFusionWorkspace.get_required_buffer_size_bytes(
        ctx.world_size, 48, hidden, dtype, MNNVLAllreduceFusionStrategy.ONESHOT)
    made = [MNNVLAllReduceFusionWorkspace(mapping, max_num_tokens=48, hidden_dim=hidden,
                                          dtype=dtype, comm_backend=ctx.comm),
            MNNVLAllReduceFusionWorkspace(mapping, 48, hidden, dtype, one_shot, ctx.comm)]
    out = []
    for ws in made:
        with ws:
            case = Case(P.kARResidualRMSNorm, 48, hidden, dtype, seed=9)
            runs = [(case, dict(use_oneshot=True)), (case, dict(use_oneshot=False))]
            fits = [ws.is_buffer_size_sufficient(ctx.world_size, 48, hidden, dtype, s)
                    for s in (MNNVLAllreduceFusionStrategy.ONESHOT,
                              MNNVLAllreduceFusionStrategy.TWOSHOT)]
            ok = []
            if fits[0]:
                precompile_cases(ws, runs, ctx.rank, CUDA, ctx.comm)
                ok = [run_case(ws, c, ctx.rank, ctx.world_size, CUDA, comm=ctx.comm,
                               **kw).check.ok for c, kw in runs]
            out.append((ws.rank, ws.world_size, ws.max_token_num, fits, ok))
    return out


def test_flashinfer_constructor_form():
    for rank, got in enumerate(run_ranks(4, _flashinfer_constructor_rank, device=CUDA)):
        default, override = got
        assert default[:3] == (rank, 4, 48) and default[3][1]
        # One-shot bytes for 48 tokens at 4 ranks hold two-shot calls of 96.
        assert override[:4] == (rank, 4, 96, [True, True]) and override[4] == [True, True]
