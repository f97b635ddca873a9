"""The `torch` backend: torch.distributed collectives plus the reference epilogue.

Portable (gloo on CPU included) and exact: every rank gathers every rank's input,
sums in rank order in fp32 and runs `reference.epilogue`, so it gives the same
bits as the GPU kernels. It moves N times the data of a real all-reduce; it is
the fallback and the oracle, never chosen by "auto".

Exchange: `comm_backend.allgather` when one is given (ranks in one process pass
tensors by reference; MPI pickles them), else `torch.distributed.all_gather` on
`group` (default WORLD). World size 1 needs neither.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import reference
from ..comm import CommBackend, is_in_process
from ..topology import Request
from ..validation import FusionCall
from ..workspace import AllReduceFusionWorkspace


def write_outputs(call: FusionCall, results: dict[str, torch.Tensor]) -> None:
    """Copy `reference.epilogue` results into the call's output tensors."""
    for name in ("output", "residual_out", "norm_out", "quant_out"):
        dst = getattr(call, name)
        if dst is not None:
            dst.copy_(results[name])
    if call.scale_out is not None:
        src = results["scale_out"].reshape(-1)
        call.scale_out.reshape(-1)[: src.numel()].copy_(src.view(call.scale_out.dtype))


class TorchAllReduceFusionWorkspace(AllReduceFusionWorkspace):
    backend = "torch"

    def __init__(
        self,
        world_size: int,
        rank: int,
        max_token_num: int,
        hidden_dim: int,
        dtype: torch.dtype,
        comm_backend: CommBackend | None = None,
        group: Any = None,
    ):
        super().__init__(world_size, rank, max_token_num, hidden_dim, dtype, device=None)
        self._comm = comm_backend
        self._group = None
        if world_size > 1 and comm_backend is None:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(
                    "the torch backend with world_size > 1 needs comm_backend or an "
                    "initialised torch.distributed process group"
                )
            self._group = group if group is not None else dist.group.WORLD
            if dist.get_world_size(self._group) != world_size:
                raise ValueError(
                    f"world_size={world_size} does not match the process group's size "
                    f"{dist.get_world_size(self._group)}"
                )
        self._mark_ready()

    @classmethod
    def create(cls, req: Request) -> TorchAllReduceFusionWorkspace:
        return cls(req.world_size, req.rank, req.max_token_num, req.hidden_dim, req.dtype,
                   comm_backend=req.comm_backend, group=req.group)

    def _gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.world_size == 1:
            return [x]
        if self._comm is not None:
            if x.is_cuda and is_in_process(self._comm):
                # Peers read this tensor on their own streams.
                torch.cuda.current_stream().synchronize()
            return list(self._comm.allgather(x))
        import torch.distributed as dist

        raw = x.view(torch.uint8)  # any backend moves bytes, whatever it thinks of bf16
        parts = [torch.empty_like(raw) for _ in range(self.world_size)]
        dist.all_gather(parts, raw, group=self._group)
        return [p.view(x.dtype) for p in parts]

    def run(self, call: FusionCall) -> None:
        inputs = [t.to(call.input.device) for t in self._gather(call.input)]
        results = reference.epilogue(
            reference.allreduce_sum(inputs),
            call.input.dtype,
            call.pattern,
            residual_in=call.residual_in,
            rms_gamma=call.rms_gamma,
            rms_eps=call.rms_eps,
            scale_factor=call.scale_factor,
            layout_code=call.layout_code,
            weight_bias=call.weight_bias,
        )
        write_outputs(call, results)
        if is_in_process(self._comm) and self.world_size > 1:
            # Peers read our input by reference: keep it unchanged until all are done.
            if call.input.is_cuda:
                torch.cuda.current_stream().synchronize()
            self._comm.barrier()
