"""One workspace class per backend. Each module imports without a GPU; kernels load lazily."""

from __future__ import annotations

import importlib

# backend name -> (module, class)
BACKENDS: dict[str, tuple[str, str]] = {
    "trtllm": ("arfusion.backends.trtllm", "TRTLLMAllReduceFusionWorkspace"),
    "mnnvl": ("arfusion.backends.mnnvl", "MNNVLAllReduceFusionWorkspace"),
    "torch": ("arfusion.backends.torch", "TorchAllReduceFusionWorkspace"),
}


def workspace_class(backend: str) -> type:
    """The workspace class of `backend`; RuntimeError for an unknown name."""
    if backend not in BACKENDS:
        raise RuntimeError(
            f"Unknown backend: {backend!r}; choose one of {sorted(BACKENDS)} or 'auto'"
        )
    module, cls = BACKENDS[backend]
    return getattr(importlib.import_module(module), cls)
