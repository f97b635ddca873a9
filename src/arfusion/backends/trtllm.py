"""The `trtllm` backend: Triton one-shot/two-shot kernels over symmetric memory within a node.

Memory comes from `memory.open_buffer`: PyTorch symmetric memory with a process
group and one GPU per rank, CUDA IPC when a `comm_backend` is given or ranks
share a GPU, direct pointers when ranks are threads of one process. The
workspace supports both strategies at every size it admits (one-shot capacity =
max_token_num * hidden_dim); see `backends/symmetric.py` for the footprint.
"""

from __future__ import annotations

from typing import Any

import torch

from ..comm import CommBackend, default_comm
from ..memory import open_buffer
from ..topology import Request
from .symmetric import SymmetricWorkspace


class TRTLLMAllReduceFusionWorkspace(SymmetricWorkspace):
    backend = "trtllm"

    def __init__(
        self,
        tp_size: int,
        tp_rank: int,
        max_token_num: int,
        hidden_dim: int,
        dtype: torch.dtype = torch.float16,
        comm_backend: CommBackend | None = None,
        group: Any = None,
        timeout_s: float | None = None,
    ):
        device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(
            tp_size, tp_rank, max_token_num, hidden_dim, dtype, device,
            oneshot_elements=max_token_num * hidden_dim,
            comm=default_comm(tp_size, comm_backend, group),
            buffer_factory=lambda nbytes, setup: open_buffer(nbytes, device, setup,
                                                             comm_backend is None, group),
            timeout_s=timeout_s,
        )

    @property
    def metadata(self) -> dict[str, Any]:
        """FlashInfer's workspace description (its tests read it): the sizes, in bytes, of
        arfusion's own layout (one Lamport rotation is `lamport_comm_size`; no flags)."""
        rotation = self.buf_stride * self.dtype.itemsize
        return dict(tp_rank=self.rank, tp_size=self.world_size,
                    max_token_num=self.max_token_num, hidden_dim=self.hidden_dim,
                    use_fp32_lamport=self.dtype.itemsize == 4,
                    buffer_size=self.footprint_bytes, flag_size=0,
                    lamport_comm_size=rotation, lamport_buffer_size=3 * rotation)

    @classmethod
    def create(cls, req: Request) -> TRTLLMAllReduceFusionWorkspace:
        return cls(req.world_size, req.rank, req.max_token_num, req.hidden_dim, req.dtype,
                   comm_backend=req.comm_backend, group=req.group)
