"""Drop-in behaviour on the CPU torch backend: real clients' call sequences (tests/clients.py)
over gloo at 2 and 3 ranks, bit-exact against arfusion.reference and equal across ranks;
mismatched calls named on every rank; bounded waits; a rank killed mid-sequence; destroy()
with a peer gone; the module paths clients import from."""

from __future__ import annotations

import importlib.util
import os
import signal
import time

import pytest
import torch

from arfusion import AllReduceFusionPattern as P
from arfusion import allreduce_fusion, create_allreduce_fusion_workspace
from arfusion.comm import set_up
from arfusion.memory import ABANDONED, SymmetricBuffer
from arfusion.testing import run_processes, run_ranks

from . import clients


def _client_rank(rank: int, world: int) -> list:
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        with create_allreduce_fusion_workspace("torch", world_size=world, rank=rank,
                                               max_token_num=64, hidden_dim=1024,
                                               dtype=dtype) as ws:
            out += [(label, chk.ok, chk.problems, dig) for label, chk, dig in
                    clients.run_scenarios(ws, rank, world, "cpu", seed=world, exact=True)]
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_client_call_sequences_over_gloo(world):
    by_rank = run_processes(world, _client_rank, timeout_s=600)
    assert len(by_rank[0]) > 40
    clients.assert_ranks_agree(by_rank)


def _mismatch_rank(rank: int, world: int) -> list[str]:
    """Rank 0 and 1 disagree on tokens, then on hidden size, then on pattern; then all
    agree again (the workspace stays usable)."""
    errors = []
    with create_allreduce_fusion_workspace("torch", world_size=world, rank=rank,
                                           max_token_num=8, hidden_dim=64,
                                           dtype=torch.bfloat16) as ws:
        ws.timeout_s = 20.0
        shapes = [((4 + rank, 32), P.kAllReduce), ((4, 32 + 16 * rank), P.kAllReduce),
                  ((4, 32), P.kAllReduce if rank else P.kARResidualRMSNorm)]
        for (t, h), pattern in shapes:
            kw = {} if pattern == P.kAllReduce else dict(
                residual_in=torch.zeros(t, h, dtype=torch.bfloat16),
                rms_gamma=torch.ones(h, dtype=torch.bfloat16))
            try:
                allreduce_fusion(torch.ones(t, h, dtype=torch.bfloat16), ws, pattern, **kw)
                errors.append("no error")
            except RuntimeError as e:
                errors.append(str(e))
        out = allreduce_fusion(torch.ones(2, 16, dtype=torch.bfloat16), ws, P.kAllReduce)
        errors.append(f"sum {out[0, 0].item()}")
    return errors


def test_mismatched_calls_are_named_on_every_rank():
    for rank, errs in enumerate(run_processes(2, _mismatch_rank, timeout_s=300)):
        assert "num_tokens: rank 0 4, rank 1 5" in errs[0], (rank, errs[0])
        assert "hidden_dim: rank 0 32, rank 1 48" in errs[1], (rank, errs[1])
        assert "pattern: rank 0 1, rank 1 0" in errs[2], (rank, errs[2])
        assert all("mismatched" in e and f"rank {rank}:" in e for e in errs[:3])
        assert errs[3] == "sum 2.0"


def _missing_rank(rank: int, world: int) -> tuple:
    with create_allreduce_fusion_workspace("torch", world_size=world, rank=rank,
                                           max_token_num=4, hidden_dim=16,
                                           dtype=torch.float32) as ws:
        ws.timeout_s = 2.0
        x = torch.ones(4, 16)
        allreduce_fusion(x, ws, P.kAllReduce)  # all ranks meet once
        if rank == 1:
            time.sleep(6)  # comes to the next call long after the others gave up
            with pytest.raises(RuntimeError, match="did not arrive"):
                allreduce_fusion(x, ws, P.kAllReduce)
            return ("late",)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"ranks \[1\] did not arrive within 2 s"):
            allreduce_fusion(x, ws, P.kAllReduce)
        elapsed = time.monotonic() - start
        with pytest.raises(RuntimeError, match=r"ranks \[1\] .* in an earlier allreduce_fusion"):
            ws.check()
        return ("raised", elapsed)


def test_torch_backend_wait_is_bounded_and_names_the_missing_rank():
    results = run_processes(3, _missing_rank, timeout_s=120)
    for rank in (0, 2):
        kind, elapsed = results[rank]
        assert kind == "raised" and 1.5 < elapsed < 10.0


def _killed_rank(rank: int, world: int) -> tuple:
    ws = create_allreduce_fusion_workspace("torch", world_size=world, rank=rank,
                                           max_token_num=4, hidden_dim=16, dtype=torch.float32)
    ws.timeout_s = 2.0
    x = torch.full((4, 16), float(rank + 1))
    for _ in range(3):
        assert allreduce_fusion(x.clone(), ws, P.kAllReduce).eq(sum(range(1, world + 1))).all()
    if rank == world - 1:
        os.kill(os.getpid(), signal.SIGKILL)  # mid-sequence, no goodbye
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"rank {rank}: ranks \[{world - 1}\] did not arrive "
                       r"within 2 s in this allreduce_fusion call"):
        allreduce_fusion(x, ws, P.kAllReduce)
    waited = time.monotonic() - start
    start = time.monotonic()
    ws.destroy()
    return waited, time.monotonic() - start


def test_survivors_of_a_killed_rank_name_it_within_the_bound_and_destroy_returns():
    results = run_processes(3, _killed_rank, timeout_s=120, may_die={2})
    assert results[2] is None
    for waited, destroyed in results[:2]:
        assert 1.5 < waited < 10.0 and destroyed < 5.0


def _exits_early(rank: int, world: int) -> int:
    if rank == 1:
        os._exit(3)
    return rank


def test_run_processes_fails_at_once_when_a_rank_exits_without_reporting():
    start = time.monotonic()
    with pytest.raises(RuntimeError,
                       match=r"ranks \[1\] exited without reporting \(exit codes \[3\]\)"):
        run_processes(2, _exits_early, timeout_s=300)
    assert time.monotonic() - start < 60
    assert run_processes(2, _exits_early, timeout_s=300, may_die={1}) == [0, None]


class _Buffer(SymmetricBuffer):
    def __init__(self, comm):
        super().__init__(set_up(comm, 1.0), 16, torch.device("cpu"))
        self.freed = False

    def _free(self, timeout_s: float) -> bool:
        self.freed = True
        return True


def test_buffer_close_without_a_peer_returns_within_the_bound_and_frees_nothing():
    from arfusion.comm import InProcessGroup

    comms = InProcessGroup(2).backends()
    both = [_Buffer(c) for c in comms]
    start = time.monotonic()
    assert both[0].close(0.5) is False  # rank 1 never comes
    assert time.monotonic() - start < 2.0
    assert not both[0].freed and both[0] in ABANDONED
    ABANDONED.remove(both[0])
    comms[0].group.abort()


def test_in_process_ranks_mismatch_and_destroy_bound():
    def rank_fn(ctx):
        ws = create_allreduce_fusion_workspace("torch", world_size=2, rank=ctx.rank,
                                               max_token_num=8, hidden_dim=16,
                                               dtype=torch.float16, comm_backend=ctx.comm)
        try:
            allreduce_fusion(torch.ones(1 + ctx.rank, 16, dtype=torch.float16), ws, 0)
        except RuntimeError as e:
            msg = str(e)
        ws.destroy()
        return msg

    for msg in run_ranks(2, rank_fn):
        assert "num_tokens: rank 0 1, rank 1 2" in msg


def test_client_module_paths():
    from arfusion.mnnvl import (
        CommBackend,
        MNNVLAllreduceFusionStrategy,
        MPIBackend,
        TorchDistBackend,
        is_mnnvl_fabric_supported,
        mpi_barrier,
    )

    assert {s.name: s.value for s in MNNVLAllreduceFusionStrategy} == \
        {"ONESHOT": 0, "TWOSHOT": 1, "AUTO": 99}
    from arfusion import comm

    assert is_mnnvl_fabric_supported() is False  # no CUDA on this machine
    assert (CommBackend, MPIBackend, TorchDistBackend) == \
        (comm.CommBackend, comm.MPIBackend, comm.TorchDistBackend)
    # trtllm_mnnvl_ar.mpi_barrier, which FlashInfer's MPI-launched tests call: a barrier
    # of one process here, or the install hint where mpi4py is missing.
    if importlib.util.find_spec("mpi4py") is None:
        with pytest.raises(ImportError, match="mpi4py"):
            mpi_barrier()
    else:
        assert mpi_barrier() is None


def test_numpy_pattern_none_defaults_and_moe_none_are_accepted():
    import numpy as np

    with create_allreduce_fusion_workspace("torch", world_size=1, rank=0, max_token_num=4,
                                           hidden_dim=16, dtype=torch.bfloat16) as ws:
        x = torch.randn(4, 16).to(torch.bfloat16)
        res, gamma = torch.randn(4, 16).to(torch.bfloat16), torch.ones(16, dtype=torch.bfloat16)
        got = allreduce_fusion(x, ws, np.int64(1), launch_with_pdl=1, residual_in=res,
                               rms_gamma=gamma, rms_eps=None, weight_bias=None,
                               moe_reduction_device_num_experts=None, expert_scale_factor=None,
                               block_quant_group_size=None, use_oneshot=np.bool_(False))
        want = allreduce_fusion(x, ws, 1, residual_in=res, rms_gamma=gamma)
        assert torch.equal(got, want)
        assert ws.is_buffer_size_sufficient(1, 4, 16, torch.float16)
        assert not ws.is_buffer_size_sufficient(1, 4, 16, torch.float32)


def test_mpi_is_the_rendezvous_under_an_mpi_launcher(monkeypatch):
    from arfusion import comm

    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    made = []
    monkeypatch.setattr(comm, "MPIBackend", lambda: made.append(1) or "mpi")
    assert comm.default_comm(2, None, None) == "mpi" and made == [1]
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    with pytest.raises(ValueError, match="MPI launcher"):
        comm.default_comm(2, None, None)


def test_trtllm_workspace_metadata_has_flashinfer_keys():
    """FlashInfer's tests read `workspace.metadata` (its keys, arfusion's sizes)."""
    from types import SimpleNamespace

    from arfusion import TRTLLMAllReduceFusionWorkspace as W

    ws = SimpleNamespace(rank=1, world_size=4, max_token_num=64, hidden_dim=4096,
                         dtype=torch.bfloat16, buf_stride=1 << 20, footprint_bytes=6 << 20)
    meta = W.metadata.fget(ws)
    assert meta == dict(tp_rank=1, tp_size=4, max_token_num=64, hidden_dim=4096,
                        use_fp32_lamport=False, buffer_size=6 << 20, flag_size=0,
                        lamport_comm_size=2 << 20, lamport_buffer_size=6 << 20)


def test_mnnvl_workspace_takes_flashinfer_constructor_arguments():
    """FlashInfer's `MNNVLAllReduceFusionWorkspace(mapping, max_num_tokens=, hidden_dim=,
    dtype=, buffer_size_in_bytes=, comm_backend=)`, translated (the GPU test builds one)."""
    from types import SimpleNamespace

    from arfusion.backends.mnnvl import from_mapping_arguments as translate
    from arfusion.mnnvl import MNNVLAllreduceFusionStrategy as S
    from arfusion.mnnvl import MNNVLAllReduceFusionWorkspace as W

    m = SimpleNamespace(world_size=4, rank=1, gpus_per_node=4, tp_size=4, tp_rank=1)
    bf16 = torch.bfloat16
    want = dict(world_size=4, rank=1, max_token_num=128, hidden_dim=4096, dtype=bf16,
                comm_backend=None, oneshot_elements=None)
    assert translate(m, 128, 4096, bf16) == want
    # FlashInfer's one-shot override: bytes for a one-shot call of 128 x 4096, which
    # also hold two-shot calls of 256 tokens.
    one_shot = W.get_required_buffer_size_bytes(4, 128, 4096, bf16, S.ONESHOT)
    assert translate(m, 128, 4096, bf16, one_shot) == want | dict(
        max_token_num=256, oneshot_elements=128 * 4096)
    two_shot = W.get_required_buffer_size_bytes(4, 1024, 4096, bf16, S.TWOSHOT)
    assert translate(m, 128, 4096, bf16, two_shot) == want | dict(
        max_token_num=1024, oneshot_elements=512 * 4096)
    # Bytes alone: elements of bfloat16.
    assert translate(m, buffer_size_in_bytes=1 << 20) == want | dict(
        max_token_num=1 << 18, hidden_dim=1, oneshot_elements=1 << 17)
    for kwargs, exc, match in [
            (dict(), ValueError, "must be provided if buffer_size_in_bytes"),
            (dict(max_num_tokens=8, hidden_dim=8), ValueError, "must be provided"),
            (dict(max_num_tokens=0, hidden_dim=8, dtype=bf16), ValueError, ">= 1, got 0"),
            (dict(buffer_size_in_bytes=1), ValueError, "holds no call"),
            (dict(buffer_size_in_bytes=True), ValueError, "positive int"),
            (dict(max_num_tokens=8, hidden_dim=8, dtype=torch.int8), ValueError, "dtype")]:
        with pytest.raises(exc, match=match):
            translate(m, **kwargs)
    with pytest.raises(TypeError, match="mapping must have int tp_size"):
        translate(object(), 8, 8, bf16)
    with pytest.raises(TypeError, match="mapping must have int tp_size"):
        W(object(), 8, 8, bf16)
