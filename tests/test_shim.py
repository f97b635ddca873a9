"""The flashinfer.comm opt-in (arfusion.shim): engines that import flashinfer.comm get
arfusion in every process when asked, and nothing changes otherwise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from arfusion.shim import ENV, startup_path

CLIENT = Path(__file__).with_name("shim_client.py")


def _run_client(env_value: str | None, extra_path: str | None = None) -> dict:
    env = dict(os.environ)
    env.pop(ENV, None)
    if env_value is not None:
        env[ENV] = env_value
    paths = [startup_path(), str(Path(__file__).parents[1] / "src")]
    if extra_path:
        paths.insert(0, extra_path)
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(CLIENT)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def fake_flashinfer(tmp_path) -> str:
    """A 'real' FlashInfer install: its own comm module, and another module."""
    comm = tmp_path / "flashinfer" / "comm"
    comm.mkdir(parents=True)
    (tmp_path / "flashinfer" / "__init__.py").write_text("")
    (tmp_path / "flashinfer" / "sampling.py").write_text("TOP_K = 'flashinfer'\n")
    (comm / "__init__.py").write_text("MARKER = 'real flashinfer'\n")
    (comm / "mnnvl.py").write_text("TorchDistBackend = object\n")
    return str(tmp_path)


def test_engine_gets_arfusion_in_every_process_when_asked():
    got = _run_client("1")
    for where in ("main", "spawned"):
        assert got[where] == {"flashinfer": True, "module": "flashinfer.comm", "marker": None,
                              "fi_ar_available": True, "exact": True}, got


def test_nothing_changes_unless_asked(fake_flashinfer):
    for value in (None, "", "0"):
        assert _run_client(value) == {"main": {"flashinfer": False},
                                      "spawned": {"flashinfer": False}}
    got = _run_client(None, fake_flashinfer)["spawned"]
    assert got["marker"] == "real flashinfer" and not got["fi_ar_available"]


def test_a_real_flashinfer_is_shadowed_only_when_forced(fake_flashinfer):
    kept = _run_client("1", fake_flashinfer)
    assert all(r["marker"] == "real flashinfer" for r in kept.values()), kept
    forced = _run_client("force", fake_flashinfer)
    for r in forced.values():
        assert r["marker"] is None and r["fi_ar_available"] and r["exact"], forced
    # The rest of the real install stays importable beside the forced comm.
    env = dict(os.environ, **{ENV: "force"}, PYTHONPATH=os.pathsep.join(
        [fake_flashinfer, startup_path(), str(Path(__file__).parents[1] / "src")]))
    out = subprocess.run([sys.executable, "-c", "import flashinfer.sampling as s, "
                          "flashinfer.comm as c; print(s.TOP_K, c.__name__, "
                          "hasattr(c, 'allreduce_fusion'))"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["flashinfer", "flashinfer.comm", "True"], out.stderr


def test_bad_value_and_late_install_are_named(monkeypatch):
    from arfusion import shim

    monkeypatch.setenv(ENV, "yes")
    with pytest.raises(ValueError, match="ARFUSION_FLASHINFER_COMM must be 0, 1 or force"):
        shim.install_from_env()
    monkeypatch.setitem(sys.modules, "flashinfer.comm", object())
    monkeypatch.setattr(shim, "installed", lambda: False)
    monkeypatch.setattr(shim.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="already imported: install the hook first"):
        shim.install()


def test_vllm_plugin_entry_point_installs_the_hook():
    """vLLM loads `vllm.general_plugins` entry points in every process it starts."""
    from importlib.metadata import entry_points

    (plugin,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "arfusion"]
    assert plugin.value == "arfusion.shim:vllm_plugin"
    code = ("from importlib.metadata import entry_points; from importlib.util import "
            "find_spec; [e.load()() for e in entry_points(group='vllm.general_plugins') "
            "if e.name == 'arfusion']; import flashinfer.comm as c; "
            "print(find_spec('flashinfer') is not None, hasattr(c, 'allreduce_fusion'))")
    env = dict(os.environ, **{ENV: "1"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.split() == ["True", "True"], out.stderr
