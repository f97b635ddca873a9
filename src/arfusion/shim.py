"""Opt-in: `flashinfer.comm` resolves to arfusion in every process of an engine.

vLLM and SGLang import `flashinfer.comm` (and `flashinfer.comm.mnnvl` for
`TorchDistBackend`) and probe it with `find_spec` and `hasattr`. With the
environment variable ARFUSION_FLASHINFER_COMM set, an import hook answers those
names with arfusion's modules, so the engines run unedited:

- unset, "" or "0": nothing changes;
- "1": where FlashInfer is not installed, `flashinfer` is a stand-in that holds only
  `comm`; a real FlashInfer install is never shadowed (nothing changes);
- "force": `flashinfer.comm` and its submodules above are arfusion's even where
  FlashInfer is installed (the rest of FlashInfer stays its own).

The hook must be installed in every process, spawned workers included. Two ways,
both doing nothing while the variable is unset:

- vLLM: the `vllm.general_plugins` entry point `arfusion` (`vllm_plugin`), which vLLM
  loads in every process it starts, before the model (and its fusion pass) is built;
- any program (SGLang): put `python -m arfusion shim-path` on PYTHONPATH; its
  `sitecustomize` installs the hook when the interpreter starts (and runs the
  `sitecustomize` it hides, if any).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from typing import Any

ENV = "ARFUSION_FLASHINFER_COMM"
# The flashinfer.comm modules clients import, and what answers each.
MODULES = {
    "flashinfer.comm": "arfusion",
    "flashinfer.comm.mnnvl": "arfusion.mnnvl",
    "flashinfer.comm.trtllm_mnnvl_ar": "arfusion.mnnvl",
}


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers MODULES (and, where FlashInfer is absent, the `flashinfer` package)."""

    def __init__(self, stand_in: bool):
        self.stand_in = stand_in

    def find_spec(self, name: str, path: Any = None, target: Any = None):
        if name in MODULES or (self.stand_in and name == "flashinfer"):
            package = name in ("flashinfer", "flashinfer.comm")
            return importlib.machinery.ModuleSpec(name, self, is_package=package)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        """A module of its own holding the target's public names (so the target keeps
        its own name and spec, and a client that patches an attribute patches only
        what it sees)."""
        if spec.name == "flashinfer":
            return types.ModuleType("flashinfer", "arfusion's stand-in: only flashinfer.comm")
        target = importlib.import_module(MODULES[spec.name])
        module = types.ModuleType(spec.name, target.__doc__)
        module.__dict__.update((k, v) for k, v in vars(target).items() if not k.startswith("_"))
        module.__all__ = list(getattr(target, "__all__", ()))
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def installed() -> bool:
    return any(isinstance(f, _Finder) for f in sys.meta_path)


def install(force: bool = False) -> bool:
    """Answer `flashinfer.comm` with arfusion from now on; True if the hook is in
    place. A real FlashInfer is left alone unless `force`."""
    if installed():
        return True
    real = importlib.util.find_spec("flashinfer") is not None
    if real and not force:
        return False
    stale = [m for m in sys.modules if m in MODULES]
    if stale:
        raise RuntimeError(f"{', '.join(stale)} already imported: install the hook first")
    sys.meta_path.insert(0, _Finder(stand_in=not real))
    return True


def install_from_env() -> bool:
    """`install` as ARFUSION_FLASHINFER_COMM asks (module docstring); False if not asked."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "0"):
        return False
    if value not in ("1", "force"):
        raise ValueError(f"{ENV} must be 0, 1 or force, got {value!r}")
    return install(force=value == "force")


def vllm_plugin() -> None:
    """vLLM's general plugin (entry point `vllm.general_plugins: arfusion`)."""
    install_from_env()


def startup_path() -> str:
    """The folder whose `sitecustomize` installs the hook at interpreter start."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "startup")
