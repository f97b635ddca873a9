"""The `torch` backend: torch.distributed collectives plus the reference epilogue.

Portable (gloo on CPU included) and exact: every rank gathers every rank's input,
sums in rank order in fp32 and runs `reference.epilogue`, so it gives the same
bits as the GPU kernels. It moves N times the data of a real all-reduce; it is
the fallback and the oracle, never chosen by "auto".

Each call first exchanges a small signature (call index, tokens, hidden size,
dtype, pattern) and only then the data:

- the signature exchange runs on a helper thread for at most `timeout_s`; a rank
  that waited in vain names the ranks that never reached this call (each rank
  posts the index of the call it reached on an arrival board: the process
  group's store, or the in-process group), and the workspace is unusable after;
- ranks whose signatures differ all raise `RuntimeError` naming the ranks and
  what differed, before any data moves; the workspace stays usable (every rank
  saw the same signatures and moved nothing).

Exchange: `comm_backend.allgather` when one is given (ranks in one process pass
tensors by reference; MPI pickles them), else `torch.distributed.all_gather` on
`group` (default WORLD). World size 1 needs neither.
"""

from __future__ import annotations

import uuid
from typing import Any

import torch

from .. import reference, signature
from ..comm import (
    ArrivalBoard,
    CommBackend,
    TorchDistBackend,
    arrival_board,
    bounded,
    is_in_process,
    set_up,
)
from ..topology import Request
from ..validation import FusionCall
from ..workspace import AllReduceFusionWorkspace

# The strategy is the kernels' business; the group size is the per-token-group FP8's,
# the expert count and top_k the MoE patterns'.
SIGNATURE = (*signature.FIELDS[:5], "block_quant_group_size", "num_experts", "top_k")


def write_outputs(call: FusionCall, results: dict[str, torch.Tensor]) -> None:
    """Copy `reference.epilogue` results into the call's output tensors (quant_out and
    scale_out are flat views of the kernels' dtypes: the results fill their front)."""
    for name in ("output", "residual_out", "norm_out", "quant_out", "scale_out"):
        dst = getattr(call, name)
        if dst is not None:
            src = results[name].reshape(-1)
            dst.reshape(-1)[: src.numel()].copy_(src)


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
        timeout_s: float | None = None,
    ):
        super().__init__(world_size, rank, max_token_num, hidden_dim, dtype, device=None)
        self.timeout_s = timeout_s
        self._comm = comm_backend
        self._group = None
        self._seq = 0
        self._missing: list[int] = []
        self._board = None
        if world_size > 1:
            if comm_backend is None:
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
            self._board = self._arrival_board()
        self._mark_ready()

    def _arrival_board(self) -> ArrivalBoard | None:
        comm = self._comm if self._comm is not None else TorchDistBackend(self._group)
        name = set_up(comm, self.timeout_s).bcast(uuid.uuid4().hex, 0,
                                                  "board name")
        return arrival_board(comm, f"arfusion/{name}")

    @classmethod
    def create(cls, req: Request) -> TorchAllReduceFusionWorkspace:
        return cls(req.world_size, req.rank, req.max_token_num, req.hidden_dim, req.dtype,
                   comm_backend=req.comm_backend, group=req.group)

    def failed_ranks(self) -> list[int]:
        return self._missing

    def _allgather_object(self, obj: Any) -> list[Any]:
        if self._comm is not None:
            return list(self._comm.allgather(obj))
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def _agree(self, call: FusionCall) -> None:
        """Exchange this call's signature (bounded); raise on a missing or mismatched
        rank (module docstring)."""
        self._seq += 1
        mine = (self._seq, call.num_tokens, call.hidden_dim, str(call.input.dtype),
                call.pattern, call.plan.group,
                *(call.moe.signature(call.input) if call.moe else (0, 0)))
        if self._board is not None:
            self._board.post(self._seq)
        got: list[Any] = []
        device = torch.cuda.current_device() if call.input.is_cuda else None

        def exchange() -> None:
            if device is not None:
                torch.cuda.set_device(device)
            got.extend(self._allgather_object(mine))

        if not bounded(exchange, self.timeout_s):
            behind = self._board.behind(self._seq) if self._board is not None else None
            self._missing = behind or [r for r in range(self.world_size) if r != self.rank]
            raise RuntimeError(self.missing_message(self._missing, "this"))
        if any(sig != mine for sig in got):
            raise RuntimeError(signature.mismatch_message(
                self.rank, dict(enumerate(got)), SIGNATURE,
                "nothing was computed, the workspace is still usable once every rank "
                "issues the same calls"))

    def _gather(self, x: torch.Tensor) -> list[torch.Tensor]:
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
        x = call.input if call.moe is None else call.moe.contribution(call.input)
        if self.world_size == 1:
            inputs = [x]
        else:
            self._agree(call)
            inputs = [t.to(x.device) for t in self._gather(x)]
        results = reference.epilogue(
            reference.allreduce_sum(inputs),
            x.dtype,
            call.pattern,
            residual_in=call.residual_in,
            rms_gamma=call.rms_gamma,
            rms_eps=call.rms_eps,
            scale_factor=call.scale_factor,
            layout_code=call.layout_code,
            weight_bias=call.weight_bias,
            block_quant_group_size=call.plan.group,
            quant=call.traits.quant,
        )
        write_outputs(call, results)
        if is_in_process(self._comm) and self.world_size > 1:
            # Peers read our input by reference: keep it unchanged until all are done.
            if call.input.is_cuda:
                torch.cuda.current_stream().synchronize()
            self._comm.barrier()
