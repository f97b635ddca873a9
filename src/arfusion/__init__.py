"""arfusion: fused all-reduce + residual + RMSNorm (+ FP8/NVFP4) for tensor-parallel inference.

A drop-in for `flashinfer.comm.create_allreduce_fusion_workspace` / `allreduce_fusion`.
Importing needs only torch and numpy; the GPU backends load triton and cuda-python
when a workspace is created.
"""

from .api import allreduce_fusion, create_allreduce_fusion_workspace
from .backends.mnnvl import MNNVLAllReduceFusionWorkspace
from .backends.torch import TorchAllReduceFusionWorkspace
from .backends.trtllm import TRTLLMAllReduceFusionWorkspace
from .comm import CommBackend, InProcessBackend, InProcessGroup, MPIBackend, TorchDistBackend
from .patterns import AllReduceFusionPattern, QuantizationSFLayout
from .workspace import AllReduceFusionWorkspace

__version__ = "0.1.0"

__all__ = [
    "AllReduceFusionPattern",
    "AllReduceFusionWorkspace",
    "CommBackend",
    "InProcessBackend",
    "InProcessGroup",
    "MNNVLAllReduceFusionWorkspace",
    "MPIBackend",
    "QuantizationSFLayout",
    "TRTLLMAllReduceFusionWorkspace",
    "TorchAllReduceFusionWorkspace",
    "TorchDistBackend",
    "allreduce_fusion",
    "create_allreduce_fusion_workspace",
]
