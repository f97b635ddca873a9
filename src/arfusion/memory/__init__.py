"""Device memory that every rank can load from and store to: one interface, four transports.

A `SymmetricBuffer` gives this rank `nbytes` of device memory (`local`, a uint8
tensor) and the address of every rank's buffer as mapped in this process
(`peer_ptrs`, by rank; `peer_ptrs[rank]` is `local`'s address). Kernels reach a
peer's byte i at `peer_ptrs[p] + i` with ordinary loads and stores. No multicast.

`open_buffer` picks the transport of the `trtllm` backend (`mnnvl` always uses cuMem):

| transport | when |
| --- | --- |
| `in_process.InProcessBuffer` | ranks are threads of one process (`InProcessBackend`) |
| `cuda_ipc.CudaIpcBuffer` | a `comm_backend` is given, or ranks share a GPU |
| `torch_symm.TorchSymmBuffer` | a torch.distributed group, one GPU per rank |
| `cumem.CuMemBuffer` | the `mnnvl` backend: CUDA virtual memory, FABRIC or POSIX fd handles |

Creating is collective: every exchange goes through `setup` (`comm.set_up`: bounded,
a peer that failed on its way is named), and the buffer keeps the plain comm
(`setup.comm`). `close(timeout_s)` waits for this device, then for the
peers at most `timeout_s` (a barrier on a helper thread): if all meet, nobody
can still be reading or writing, and everything is freed. If a peer does not
come (it died, or its process group is gone), `abandon` frees only what is safe
without it, per transport:

- in_process: everything (peers hold references to our tensor: the memory lives
  on until the last reference drops);
- cuda_ipc: our mappings of the peers' buffers; our cudaMalloc'd buffer is kept
  (a peer may still have it mapped);
- cumem between processes: everything (the driver keeps physical memory alive
  while any process maps it); between threads of one process: nothing (peers
  write through our address range);
- torch_symm: nothing.

What is kept stays referenced in `ABANDONED` until the process exits.
"""

from __future__ import annotations

import abc
import socket
from typing import Any

import torch

from ..comm import BoundedSteps, CommBackend, bounded, is_in_process

# Buffers closed without meeting every peer: what was not safe to free stays here.
ABANDONED: list[SymmetricBuffer] = []


class SymmetricBuffer(abc.ABC):
    def __init__(self, setup: BoundedSteps, nbytes: int, device: torch.device):
        self.comm: CommBackend = setup.comm
        self.rank = setup.Get_rank()
        self.world_size = setup.Get_size()
        self.nbytes = nbytes
        self.device = device
        self.local: torch.Tensor
        self.peer_ptrs: list[int]
        self._closed = False

    def close(self, timeout_s: float) -> bool:
        """Wait for this device and, at most `timeout_s`, for every rank; then free.
        Returns False if a peer did not come (then only what is safe was freed)."""
        if self._closed:
            return True
        self._closed = True
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if bounded(self.comm.barrier, timeout_s):
            return self._free(timeout_s)
        self.abandon()
        return False

    @abc.abstractmethod
    def _free(self, timeout_s: float) -> bool:
        """Free everything (all ranks are here); False if that turned out unsafe."""

    def abandon(self) -> None:
        """Without the peers (they did not come to the close, or the workspace's set-up
        failed): keep everything alive until the process exits."""
        ABANDONED.append(self)


def check(result: object) -> object:
    """Unpack a cuda.bindings call's (error, value...) and raise on error.

    Runtime and driver calls alike: success is 0 in both enums."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA call failed: {getattr(err, 'name', err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


class _CudaArray:
    """Just enough `__cuda_array_interface__` for torch to wrap a raw device pointer."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3,
            "strides": None,
        }


def wrap_pointer(ptr: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 tensor over `nbytes` of device memory at `ptr` (no copy, not owned)."""
    return torch.as_tensor(_CudaArray(ptr, nbytes), device=device)


def ranks_on_my_gpu(setup: BoundedSteps, device: torch.device) -> int:
    """How many ranks (this one included) use this rank's GPU (collective)."""
    me = (socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid))
    return setup.allgather(me, "GPU census").count(me)


def open_buffer(nbytes: int, device: torch.device, setup: BoundedSteps, own_comm: bool,
                group: Any) -> SymmetricBuffer:
    """Allocate and exchange one symmetric buffer for `trtllm` (collective). `own_comm`:
    the ranks meet through arfusion's default rendezvous (no `comm_backend` given)."""
    if is_in_process(setup.comm):
        from .in_process import InProcessBuffer

        return InProcessBuffer(setup, nbytes, device)
    if own_comm and ranks_on_my_gpu(setup, device) == 1:
        from .torch_symm import TorchSymmBuffer

        return TorchSymmBuffer(setup, nbytes, device, group)
    from .cuda_ipc import CudaIpcBuffer

    return CudaIpcBuffer(setup, nbytes, device)
