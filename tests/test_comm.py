"""CommBackend implementations: in-process threads, torch.distributed (gloo), MPI."""

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

from arfusion import CommBackend, InProcessGroup, TorchDistBackend
from arfusion.testing import run_processes, run_ranks


def _exercise(comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    gathered = comm.allgather(("r", rank))
    root = comm.bcast(f"from {rank}", root=size - 1)
    comm.barrier()
    sub = comm.Split(rank % 2, -rank)  # key reverses the order inside each color
    return {
        "gathered": gathered, "root": root,
        "sub": (sub.Get_rank(), sub.Get_size(), sub.allgather(rank)),
    }


def _expected(size):
    out = []
    for rank in range(size):
        members = sorted((r for r in range(size) if r % 2 == rank % 2), reverse=True)
        # allgather returns a tuple, as FlashInfer's backends do
        out.append({"gathered": tuple(("r", r) for r in range(size)), "root": f"from {size - 1}",
                    "sub": (members.index(rank), len(members), tuple(members))})
    return out


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_in_process_backend(size):
    assert run_ranks(size, lambda ctx: _exercise(ctx.comm)) == _expected(size)


def test_in_process_backend_is_a_comm_backend_and_aborts_cleanly():
    group = InProcessGroup(2, timeout_s=5)
    a, _ = group.backends()
    assert isinstance(a, CommBackend)
    errors = []

    def waiter():
        try:
            a.barrier()
        except threading.BrokenBarrierError as e:
            errors.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    group.abort()
    t.join(5)
    assert errors and not t.is_alive()


def _torch_rank(rank, world_size):
    return _exercise(TorchDistBackend())


def test_torch_dist_backend_over_gloo():
    assert run_processes(3, _torch_rank) == _expected(3)


def test_torch_dist_backend_needs_an_initialised_group():
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):  # FlashInfer's
        TorchDistBackend()


MPI_SCRIPT = """
import json, sys
sys.path[:0] = {path!r}
from arfusion import MPIBackend
from tests.test_comm import _exercise
comm = MPIBackend()
everyone = comm.allgather(_exercise(comm))
if comm.Get_rank() == 0:
    print(json.dumps(everyone))
"""


def test_mpi_backend_under_mpiexec():
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep
                           + os.environ.get("PATH", ""))
    assert mpiexec, "mpiexec not found: install the test extra (mpi4py, mpich)"
    script = MPI_SCRIPT.format(path=[os.getcwd(), os.path.join(os.getcwd(), "src")])
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # tuples come back as lists through JSON
    assert json.loads(proc.stdout) == json.loads(json.dumps(_expected(2)))
