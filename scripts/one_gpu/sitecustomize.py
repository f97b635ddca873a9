"""Every Python process started with this folder on PYTHONPATH (scripts/flashinfer_tests.py
puts it there) runs a multi-GPU test written for one process per GPU on one GPU shared
under MPS (on a machine with a GPU per rank, only the multicast guard applies):

- with ARFUSION_ONE_GPU_DEVICES=N, `torch.cuda.device_count()` says N and device
  ordinals 0..N-1 all name GPU 0 (`torch.device("cuda:k")`, `torch.cuda.set_device(k)`),
  so tests that spawn rank k on `cuda:k` and skip below N GPUs run; and NCCL_HOSTID is
  this process's own: NCCL refuses two ranks on one GPU of one host, so each process
  poses as a host of its own (the tests' NCCL references then run over sockets);
- with ARFUSION_FI_IPC_WORKSPACE=1, FlashInfer's trtllm workspace that cannot be made
  of cuMem memory for ranks on one GPU is built on CUDA-IPC buffers instead
  (`arfusion.bench.flashinfer.ipc_workspace`: the same kernels and layout);
- NVLink multicast is refused (cuda-python's cuMulticastCreate raises): it is forbidden
  on these machines, and FlashInfer's mnnvl workspace would ask for it.

Then the `sitecustomize` this one hides, if any, runs (arfusion's shim puts its own
first on PYTHONPATH and chains to this one the same way).
"""

import importlib.util
import inspect
import os
import sys


def _refuse_multicast() -> None:
    try:
        from cuda.bindings import driver
    except ImportError:
        return

    def refused(*_args, **_kwargs):
        raise RuntimeError("cuMulticastCreate: NVLink multicast is forbidden on this machine")

    driver.cuMulticastCreate = refused


def _one_gpu_as(count: int) -> None:
    import torch

    real_device = torch.device

    class _DeviceType(type):
        def __instancecheck__(cls, obj):
            return isinstance(obj, real_device)

    class device(metaclass=_DeviceType):  # noqa: N801 - stands in for torch.device
        """torch.device whose CUDA ordinals below `count` all name GPU 0."""

        def __new__(cls, *args, **kwargs):
            made = real_device(*args, **kwargs)
            if made.type == "cuda" and made.index is not None and made.index < count:
                return real_device("cuda", 0)
            return made

    def ordinal(dev):
        """GPU 0 for an ordinal below `count`, else `dev` unchanged."""
        if dev is None:
            return dev
        index = dev if isinstance(dev, int) else real_device(dev).index
        return 0 if index is not None and index < count else dev

    def on_gpu_0(function):
        def mapped(*args, **kwargs):
            if args:
                args = (ordinal(args[0]), *args[1:])
            if "device" in kwargs:
                kwargs["device"] = ordinal(kwargs["device"])
            return function(*args, **kwargs)
        return mapped

    for name in ("set_device", "get_device_properties", "get_device_capability",
                 "get_device_name", "mem_get_info", "synchronize"):
        setattr(torch.cuda, name, on_gpu_0(getattr(torch.cuda, name)))
    torch.device = device
    torch.cuda.device_count = lambda: count
    # Every ordinal is this GPU: its memory is its own, no peer access needed.
    torch.cuda.can_device_access_peer = lambda a, b: ordinal(a) == ordinal(b) == 0


def _flashinfer_ipc_workspace() -> None:
    import flashinfer.comm as fc

    from arfusion.bench.flashinfer import ipc_workspace

    create = fc.create_allreduce_fusion_workspace

    def create_or_ipc(*args, **kwargs):
        try:
            return create(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - ranks on one GPU: CUDA IPC below
            a = inspect.signature(create).bind(*args, **kwargs)
            a.apply_defaults()
            a = a.arguments
            if a["backend"] != "trtllm":
                raise
            print(f"[rank {a['rank']}] FlashInfer's cuMem workspace failed "
                  f"({type(e).__name__}: {e}); building it on CUDA IPC buffers",
                  file=sys.stderr, flush=True)
            return ipc_workspace(fc, a["rank"], a["world_size"], a["max_token_num"],
                                 a["hidden_dim"], a["dtype"])

    fc.create_allreduce_fusion_workspace = create_or_ipc


_refuse_multicast()
if os.environ.get("ARFUSION_ONE_GPU_DEVICES"):
    os.environ["NCCL_HOSTID"] = f"one-gpu-{os.getpid()}"
    _one_gpu_as(int(os.environ["ARFUSION_ONE_GPU_DEVICES"]))
if os.environ.get("ARFUSION_FI_IPC_WORKSPACE") == "1":
    _flashinfer_ipc_workspace()

_here = os.path.dirname(os.path.abspath(__file__))
_folders = [os.path.abspath(f) for f in sys.path if f]
# Only folders after this one: the sitecustomize before it (arfusion's shim) chained here.
for _folder in _folders[_folders.index(_here) + 1:] if _here in _folders else []:
    _path = os.path.join(_folder, "sitecustomize.py")
    if os.path.isfile(_path):
        _spec = importlib.util.spec_from_file_location("_hidden_sitecustomize", _path)
        _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
        break
