"""The README's quick-start demo command, as a user runs it."""

import subprocess
import sys


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
    proc = subprocess.run([sys.executable, "-m", "arfusion", "demo", "--patterns", "7"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "not a supported pattern" in proc.stderr
