"""What users would run instead of arfusion, each measured in the same run on the same card.

- the epilogue alone (residual add + RMSNorm + the pattern's quantisation) compiled
  with `torch.compile(fullgraph=True, dynamic=False)`: the world-size-1 target;
- NCCL `all_reduce` and PyTorch symmetric memory's `one_shot_all_reduce`, each
  followed by that compiled epilogue (at world size 1 on one GPU: what the
  communication library costs when there is nothing to exchange);
- a device-to-device copy of the same bytes;
- FlashInfer's `allreduce_fusion` where flashinfer is importable (one process per rank).

Earlier versions compiled `reference.epilogue` (which also writes cast(s) and builds
its constants as tensors on every call) without `fullgraph`: that baseline measured
2.5x slower than a plain compiled add+RMSNorm and flattered arfusion.
"""

from __future__ import annotations

import contextlib
import tempfile

import torch

from .. import reference
from ..patterns import FP8_MAX, PATTERNS, Quant

EPS = 1e-6


def epilogue_fn(pattern: int, dtype: torch.dtype, scale: float):
    """fn(x, residual, gamma) -> the pattern's outputs, compiled for static shapes."""
    traits = PATTERNS[pattern]
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.accumulated_recompile_limit = 4096

    def epilogue(x: torch.Tensor, residual: torch.Tensor, gamma: torch.Tensor):
        if not traits.norm:
            return (x.clone(),)
        h = (x.float() + residual.float()).to(dtype)
        hf = h.float()
        n = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS) * gamma.float()).to(dtype)
        outs = [h, n] if traits.norm_out else [h]
        if traits.quant == Quant.FP8:
            outs.append((n.float() * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX)
                        .to(torch.float8_e4m3fn))
        elif traits.quant == Quant.DYNAMIC_FP8:
            amax = n.float().abs().amax(-1, keepdim=True)
            s = torch.clamp(amax / FP8_MAX, min=reference.DYNAMIC_FP8_MIN_SCALE)
            outs += [(n.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s]
        elif traits.quant == Quant.NVFP4:
            outs += list(reference.quantize_nvfp4(n, scale, 0))
        return tuple(outs)

    return torch.compile(epilogue, fullgraph=True, dynamic=False)


@contextlib.contextmanager
def world1_group():
    """An NCCL process group of this process alone (the baselines at world size 1)."""
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"file://{tempfile.mkdtemp()}/pg", rank=0,
                            world_size=1, device_id=torch.device("cuda", 0))
    try:
        yield
    finally:
        dist.destroy_process_group()


def reducers() -> dict:
    """name -> fn(x) -> the all-reduced tensor, for the process group in use."""
    import torch.distributed as dist

    def nccl(x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    found = {"nccl": nccl}
    try:
        import torch.distributed._symmetric_memory as symm_mem

        group = dist.group.WORLD.group_name
        bufs: dict[tuple, torch.Tensor] = {}

        def one_shot(x: torch.Tensor) -> torch.Tensor:
            key = (x.shape, x.dtype)
            if key not in bufs:
                bufs[key] = symm_mem.empty(x.shape, dtype=x.dtype, device=x.device)
                symm_mem.rendezvous(bufs[key], group)
            bufs[key].copy_(x)
            return torch.ops.symm_mem.one_shot_all_reduce(bufs[key], "sum", group)

        probe = torch.ones(8, 16, dtype=torch.bfloat16, device="cuda")
        if torch.equal(one_shot(probe), probe * dist.get_world_size()):
            found["symm_mem one_shot"] = one_shot
    except Exception as e:  # noqa: BLE001 - reported as missing
        print(f"symm_mem baseline not available: {type(e).__name__}: {e}")
    return found
