"""FlashInfer's own fused all-reduce as a bench baseline, used when `flashinfer.comm`
imports: its unified `allreduce_fusion` on its trtllm workspace, one-shot and two-shot,
on the same inputs and with the same timing as arfusion's rows (one process per rank:
one GPU each, or ranks sharing a GPU under MPS).

The workspace comes from FlashInfer's `create_allreduce_fusion_workspace("trtllm")`
(cuMem with POSIX-fd handles); where that fails (ranks sharing one GPU), the same
workspace is built on CUDA-IPC buffers (`flashinfer.comm.create_shared_buffer`) by
pointing FlashInfer's allocator there. Calls pass `fp32_acc=True` (arfusion always
sums in fp32) and every output tensor (no allocation inside a graph).

FlashInfer's kernels wait for their peers without a bound: the first call of every case
runs eagerly and is given `HANG_S` seconds; a case that does not finish is recorded as
hung (not timed) and ends this rank's FlashInfer rows (its stream stays blocked). Its
outputs on the first input set are compared with arfusion's (`compare`): how many
elements differ, per output, and how far norm_out is from arfusion.reference in ulp.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..patterns import PATTERNS, Quant
from ..testing import case_outputs, ulp_distance

HANG_S = 20.0
COMPARED = ("output", "residual_out", "norm_out", "quant_out", "scale_out")


def module() -> Any | None:
    """`flashinfer.comm`, or None where it does not import."""
    try:
        import flashinfer.comm as fc
    except Exception:  # noqa: BLE001 - any failure means no baseline
        return None
    return fc


def runs_pattern(pattern: int) -> bool:
    """FlashInfer's trtllm kernels on Hopper: NVFP4 is compiled out below sm_100."""
    return pattern in PATTERNS and PATTERNS[pattern].quant != Quant.NVFP4


def workspace(fc: Any, rank: int, world: int, max_tokens: int, hidden: int,
              dtype: torch.dtype) -> Any:
    """FlashInfer's trtllm workspace (the log says which memory it got)."""
    from flashinfer.comm.mnnvl import TorchDistBackend

    try:
        ws = fc.create_allreduce_fusion_workspace(
            backend="trtllm", world_size=world, rank=rank, max_token_num=max_tokens,
            hidden_dim=hidden, dtype=dtype, comm_backend=TorchDistBackend())
        return ws
    except Exception as e:  # noqa: BLE001 - ranks sharing a GPU: CUDA IPC below
        print(f"[rank {rank}] FlashInfer's cuMem workspace failed ({type(e).__name__}: "
              f"{e}); building it on CUDA IPC buffers", flush=True)
    return ipc_workspace(fc, rank, world, max_tokens, hidden, dtype)


def ipc_workspace(fc: Any, rank: int, world: int, max_tokens: int, hidden: int,
                  dtype: torch.dtype) -> Any:
    """FlashInfer's trtllm workspace on CUDA-IPC buffers (its `create_shared_buffer`,
    over the default process group), for ranks that share one GPU."""
    import flashinfer.comm.allreduce as fa
    import flashinfer.comm.trtllm_ar as ft

    def ipc_alloc(size, _world, _dtype, _device, _group_name):
        return fc.create_shared_buffer(size), None, None

    saved = ft._alloc_symm_buffer_bytes, fa.is_confidential_compute
    ft._alloc_symm_buffer_bytes, fa.is_confidential_compute = ipc_alloc, lambda: True
    try:  # confidential compute: FlashInfer's own switch to its non-cuMem allocator
        return fa.TRTLLMAllReduceFusionWorkspace(world, rank, max_tokens, hidden, dtype)
    finally:
        ft._alloc_symm_buffer_bytes, fa.is_confidential_compute = saved


class Calls:
    """FlashInfer's calls of one case on one rank: the input sets and residuals of
    arfusion's rows (`runs._Calls`), outputs of its own."""

    def __init__(self, fc: Any, calls: Any, device: torch.device):
        case = calls.case
        self.fc, self.calls, self.case = fc, calls, case
        self.out = case_outputs(case, device, with_output=True)
        self.kw = dict(calls.kw)
        if PATTERNS[case.pattern].quant == Quant.FP8:  # a tensor keeps graphs valid
            self.kw["scale_factor"] = torch.full((1,), float(case.scale_factor),
                                                 dtype=torch.float32, device=device)

    def one(self, ws: Any, i: int, oneshot: bool) -> None:
        x, residual = self.calls.sets[i]
        extra = {"residual_in": residual} if PATTERNS[self.case.pattern].norm else {}
        if PATTERNS[self.case.pattern].quant == Quant.DYNAMIC_FP8:
            extra["output"] = None  # FlashInfer writes no all-reduce output there
        self.fc.allreduce_fusion(input=x, workspace=ws, pattern=self.case.pattern,
                                 use_oneshot=oneshot, fp32_acc=True,
                                 **{**self.out, **extra}, **self.kw)

    def all(self, ws: Any, oneshot: bool) -> None:
        for i in range(len(self.calls.sets)):
            self.one(ws, i, oneshot)

    def finishes(self, ws: Any, oneshot: bool) -> bool:
        """Call 0 eagerly; whether it finished within HANG_S (else the stream is stuck)."""
        self.one(ws, 0, oneshot)
        done = torch.cuda.Event()
        done.record()
        end = time.monotonic() + HANG_S
        while not done.query():
            if time.monotonic() > end:
                return False
            time.sleep(0.01)
        return True


def compare(fi_out: dict[str, torch.Tensor], ours: dict[str, torch.Tensor],
            ref: dict[str, torch.Tensor], pattern: int) -> dict[str, list[int]]:
    """Per output both wrote: [elements that differ, elements]; and norm_out's largest
    distance from the reference in ulp (FlashInfer's rsqrt and reduction tree differ).
    FlashInfer's kernels write the all-reduce output for kAllReduce only (arfusion
    writes it wherever it is passed), so `output` is compared for pattern 0 alone."""
    skip = set() if pattern == 0 else {"output"}
    found: dict[str, list[int]] = {}
    for name in COMPARED:
        if name in skip or name not in fi_out or name not in ours:
            continue
        a, b = fi_out[name].reshape(-1), ours[name].reshape(-1)
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
        found[name] = [int((a.view(bits) != b.view(bits)).sum()), a.numel()]
    if "norm_out" in fi_out:
        found["norm_out ulp vs reference"] = [
            int(ulp_distance(fi_out["norm_out"], ref["norm_out"]).max()), 0]
    return found
