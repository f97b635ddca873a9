"""A stand-in engine for tests/test_shim.py: it imports and probes `flashinfer.comm` the
way vLLM's fusion pass and `FlashInferAllReduce` and SGLang's `flashinfer_comm_fusion.py`
do, then runs one fused call, in this process and in a spawned worker. Prints JSON."""

import json
import multiprocessing as mp
import sys
from importlib.util import find_spec


def probe() -> dict:
    found = {"flashinfer": find_spec("flashinfer") is not None}
    if not found["flashinfer"]:  # vLLM and SGLang stop here: no FlashInfer, no fusion
        return found
    try:  # vLLM: vllm/distributed/device_communicators/flashinfer_all_reduce.py
        import flashinfer.comm as flashinfer_comm
        from flashinfer.comm.mnnvl import TorchDistBackend  # noqa: F401
    except ImportError as e:
        return found | {"import_error": str(e)}
    found["module"] = getattr(flashinfer_comm, "__name__", "")
    found["marker"] = getattr(flashinfer_comm, "MARKER", None)
    found["fi_ar_available"] = all(hasattr(flashinfer_comm, name) for name in (
        "allreduce_fusion", "create_allreduce_fusion_workspace", "AllReduceFusionPattern"))
    if not found["fi_ar_available"]:
        return found
    import torch

    from arfusion.reference import reference_allreduce_fusion

    comm = flashinfer_comm  # SGLang: `import flashinfer.comm as comm`, keyword calls
    pattern = comm.AllReduceFusionPattern.kARResidualRMSNorm
    ws = comm.create_allreduce_fusion_workspace(
        backend="torch", world_size=1, rank=0, max_token_num=16, hidden_dim=64,
        dtype=torch.bfloat16)
    x = torch.randn(5, 64).to(torch.bfloat16)
    residual, gamma = torch.randn(5, 64).to(torch.bfloat16), torch.rand(64).to(torch.bfloat16)
    residual_out, norm_out = torch.empty_like(x), torch.empty_like(x)
    comm.allreduce_fusion(
        input=x, workspace=ws, pattern=pattern, launch_with_pdl=False,
        residual_out=residual_out, norm_out=norm_out, residual_in=residual, rms_gamma=gamma,
        rms_eps=1e-6, use_oneshot=None, fp32_acc=True)
    want = reference_allreduce_fusion([x], pattern, residual_in=residual, rms_gamma=gamma)
    found["exact"] = bool(torch.equal(norm_out, want["norm_out"])
                          and torch.equal(residual_out, want["residual_out"]))
    ws.destroy()
    return found


def _worker(queue) -> None:
    queue.put(probe())


if __name__ == "__main__":
    here = probe()
    ctx = mp.get_context("spawn")  # a fresh interpreter, as engines start their workers
    queue = ctx.Queue()
    worker = ctx.Process(target=_worker, args=(queue,))
    worker.start()
    spawned = queue.get(timeout=120)
    worker.join(30)
    json.dump({"main": here, "spawned": spawned}, sys.stdout)
