"""The N-rank kernels on the CPU, under Triton's interpreter (tests/kernels_probe.py runs in a
subprocess, so the interpreter is on before triton is imported): one-shot and two-shot at
2, 3 and 4 ranks, 1 token, fewer tokens than ranks and more, fp16 and fp32, each rank its
own residual, gamma and weight_bias; each rank's outputs against the reference built from
its own tensors. Needs triton (CI, which has none, skips it) and a numpy the interpreter
runs on (it converts 1-element arrays to scalars, which numpy 2.3 refuses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("triton")
if tuple(int(v) for v in np.__version__.split(".")[:2]) >= (2, 3):
    pytest.skip("Triton's interpreter needs numpy < 2.3", allow_module_level=True)

HERE = os.path.dirname(__file__)


def test_every_rank_finishes_its_rows_with_its_own_tensors_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([os.path.join(HERE, "..", "src"), HERE])}
    run = subprocess.run([sys.executable, os.path.join(HERE, "kernels_probe.py")], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(rows) == 3 * 2 * 2 * 2 * 3
    bad = [row for row in rows if any(r != [True, 0, 1] for r in row[5])]
    assert not bad, bad[:5]
