"""The README's quick-start demo command, as a user runs it."""

import subprocess
import sys

import pytest
import torch


def test_demo_runs_every_pattern_and_passes():
    proc = subprocess.run([sys.executable, "-m", "arfusion", "demo"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "no GPU: using the torch backend over gloo" in out
    assert " 0 failed (2 ranks, backend torch, processes-gloo)" in out
    for name in ("kAllReduce", "kARResidualRMSNormFP4Quant",
                 "kARResidualRMSNormOutDynamicFP8Quant"):
        assert name in out


def test_demo_fails_loudly_on_a_bad_pattern():
    proc = subprocess.run([sys.executable, "-m", "arfusion", "demo", "--patterns", "12"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "not a supported pattern" in proc.stderr


def _demo(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arfusion", "demo", *argv],
                          capture_output=True, text=True, timeout=120)


def test_demo_rejects_bad_flags_with_one_line_and_exit_2():
    for argv, flag in [(("--dtype", "float16x"), "--dtype"), (("--world-size", "-1"),
                       "--world-size"), (("--world-size", "0"), "--world-size"),
                       (("--tokens", "0"), "--tokens"), (("--hidden", "0"), "--hidden"),
                       (("--patterns", "3", "--dtype", "fp32"), "select nothing")]:
        proc = _demo(*argv)
        assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
        last = proc.stderr.strip().splitlines()[-1]
        assert "error:" in last and flag in last and "Traceback" not in proc.stderr, argv


def test_version_and_legend():
    proc = subprocess.run([sys.executable, "-m", "arfusion", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("arfusion ")
    run = _demo("--patterns", "1", "--dtype", "bf16", "--tokens", "3", "--hidden", "32")
    assert run.returncode == 0, run.stderr
    assert "bfloat16: 1 calls checked on 2 ranks" in run.stdout
    assert "ulp        largest norm_out distance" in run.stdout


@pytest.mark.parametrize("launcher", [
    [], ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]],
    ids=["python", "torchrun"])
def test_two_ranks_example_runs_as_written(launcher):
    proc = subprocess.run([sys.executable, *launcher, "examples/two_ranks.py"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    backend = "trtllm" if torch.cuda.device_count() >= 2 else "torch"
    for rank in (0, 1):
        assert f"rank {rank}/2: backend {backend}, residual_out bit-exact: True" in proc.stdout


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arfusion", *argv], capture_output=True,
                          text=True, timeout=120)


def test_cli_user_errors_are_one_line_never_a_traceback(tmp_path):
    (tmp_path / "empty.json").write_text("{}")
    (tmp_path / "text.json").write_text("not json")
    cases = [(("bench", "--patterns", "abc"), "--patterns"),
             (("bench", "--tokens", "x"), "--tokens"),
             (("bench", "--backends", "nccl"), "--backends"),
             (("bench", "--dtype", "int8"), "--dtype"),
             (("bench", "--tune-from", str(tmp_path / "missing.json")), "--tune-from"),
             (("bench", "--tune-from", str(tmp_path / "empty.json")), "--tune-from"),
             (("bench", "--tune-from", str(tmp_path / "text.json")), "--tune-from"),
             (("demo", "--patterns", "abc"), "--patterns")]
    import torch

    if not torch.cuda.is_available():
        cases += [(("demo", "--backend", "trtllm"), "--backend trtllm needs a CUDA GPU"),
                  (("demo", "--backend", "mnnvl"), "--backend mnnvl needs a CUDA GPU")]
    for argv, flag in cases:
        proc = _cli(*argv)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and lines, argv
        assert "Traceback" not in proc.stderr and flag in lines[-1], (argv, proc.stderr)
        assert "_list" not in proc.stderr, (argv, proc.stderr)  # no internal names


def test_every_cli_option_has_help():
    import argparse

    from arfusion import bench, demo

    for add in (bench.add_arguments, demo.add_arguments):
        parser = argparse.ArgumentParser()
        add(parser)
        bare = [a.option_strings for a in parser._actions if a.help is None]
        assert bare == [], bare


def test_readme_usage_runs_as_written():
    from pathlib import Path

    readme = Path(__file__).parents[1].joinpath("README.md").read_text()
    usage = readme.split("## Usage", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    proc = subprocess.run([sys.executable, "-c", usage + "\nprint(out is normed)"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["True"], proc.stderr
