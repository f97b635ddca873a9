"""The mnnvl backend's own parts on a GPU: the cuMem transport between processes and
its strategy-aware sizing. (Its kernels run the whole trtllm suite: test_trtllm.py
parametrises every protocol test over both backends.)"""

from __future__ import annotations

import pytest
import torch

from arfusion import AllReduceFusionPattern as P
from arfusion import MNNVLAllReduceFusionWorkspace, create_allreduce_fusion_workspace, heuristics
from arfusion.comm import TorchDistBackend
from arfusion.testing import Case, run_case, run_processes, run_ranks

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
        buf = CuMemBuffer(comm, NBYTES, device)
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
        buf.close()
    torch.cuda.synchronize()
    comm.barrier()
    return ok, free_before - torch.cuda.mem_get_info(device)[0], kinds


def test_posix_fd_exchange_between_two_processes_and_no_leak_over_100_cycles():
    for ok, leaked, kinds in run_processes(2, _posix_fd_rank, 100, backend="gloo"):
        assert len(ok) == 202 and all(ok)
        assert kinds == {"CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR"}
        assert leaked < NBYTES  # 100 buffers of 6 MiB (3 mappings each) created and freed


def _default_sizing_rank(ctx):
    dtype = torch.bfloat16
    max_tokens, hidden = 256, 4096
    with create_allreduce_fusion_workspace(
            "mnnvl", world_size=ctx.world_size, rank=ctx.rank, max_token_num=max_tokens,
            hidden_dim=hidden, dtype=dtype, comm_backend=ctx.comm) as ws:
        assert isinstance(ws, MNNVLAllReduceFusionWorkspace)
        cap = heuristics.oneshot_max_elements(ctx.world_size, dtype)
        big_t = cap // hidden + 1
        answers = (ws.is_buffer_size_sufficient(ctx.world_size, big_t, hidden, dtype, True),
                   ws.is_buffer_size_sufficient(ctx.world_size, big_t, hidden, dtype, False),
                   ws.is_buffer_size_sufficient(ctx.world_size, big_t, hidden, dtype, None),
                   ws.is_buffer_size_sufficient(ctx.world_size, 1, hidden, dtype, True))
        case = Case(P.kARResidualRMSNorm, big_t, hidden, dtype, seed=5)
        with pytest.raises(ValueError, match="use_oneshot=True needs"):
            run_case(ws, case, ctx.rank, ctx.world_size, CUDA, use_oneshot=True)
        results = [run_case(ws, case, ctx.rank, ctx.world_size, CUDA, comm=ctx.comm,
                            use_oneshot=o).check.ok for o in (None, False)]
        footprint = ws.footprint_bytes
    return answers, results, footprint


def _compile_alone(ctx):
    with create_allreduce_fusion_workspace("mnnvl", world_size=1, rank=0, max_token_num=4,
                                           hidden_dim=4096, dtype=torch.bfloat16,
                                           comm_backend=ctx.comm) as ws:
        return [run_case(ws, Case(P.kARResidualRMSNorm, 4, 4096, torch.bfloat16), 0, 1, CUDA,
                         use_oneshot=o).check.ok for o in (True, False)]


def test_default_sizing_is_strategy_aware():
    assert run_ranks(1, _compile_alone, device=CUDA) == [[True, True]]
    for answers, results, footprint in run_ranks(4, _default_sizing_rank, device=CUDA):
        assert answers == (False, True, True, True)
        assert results == [True, True]
        assert footprint == MNNVLAllReduceFusionWorkspace.get_required_buffer_size_bytes(
            4, 256, 4096, torch.bfloat16)
