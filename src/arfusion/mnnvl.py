"""The names clients import from `flashinfer.comm.mnnvl` (and `trtllm_mnnvl_ar`).

vLLM and SGLang do `from flashinfer.comm.mnnvl import TorchDistBackend` (and
`CommBackend`); with arfusion the same import reads `from arfusion.mnnvl import ...`.
"""

from __future__ import annotations

import importlib.util

import torch

from .backends.mnnvl import MNNVLAllReduceFusionWorkspace
from .comm import CommBackend, MPIBackend, TorchDistBackend
from .workspace import MNNVLAllreduceFusionStrategy

__all__ = [
    "CommBackend",
    "MNNVLAllReduceFusionWorkspace",
    "MNNVLAllreduceFusionStrategy",
    "MPIBackend",
    "TorchDistBackend",
    "is_mnnvl_fabric_supported",
    "mpi_barrier",
]


def is_mnnvl_fabric_supported(device_idx: int | None = None) -> bool:
    """Whether GPU `device_idx` (default: the current one) can export FABRIC memory
    handles, the multi-node NVLink path (probed: the attribute alone is not enough
    without an IMEX channel). False without CUDA or cuda-python."""
    if not torch.cuda.is_available() or importlib.util.find_spec("cuda.bindings") is None:
        return False
    from .memory.cumem import fabric_supported

    index = torch.cuda.current_device() if device_idx is None else device_idx
    return fabric_supported(torch.device("cuda", index))


def mpi_barrier() -> None:
    """A barrier over MPI's COMM_WORLD (FlashInfer's test and benchmark helper of the
    same name, which their MPI-launched scripts call between steps)."""
    MPIBackend().barrier()
