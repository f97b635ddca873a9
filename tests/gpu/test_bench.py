"""The bench end to end on one GPU at a tiny size: it runs, and its report holds every
table (world size 1 with its baselines; N emulated ranks, each strategy, and the
harness floor)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from arfusion.bench.runs import HARNESS_FLOOR

pytestmark = pytest.mark.gpu


def test_bench_runs_and_reports_every_table(tmp_path):
    tokens = [1, 3]
    proc = subprocess.run(
        [sys.executable, "-m", "arfusion", "bench", "--world-size", "2", "--patterns", "1",
         "--hidden", "256", "--tokens", ",".join(map(str, tokens)), "--backends", "trtllm",
         "--calls", "2", "--replays", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    seen: dict[tuple, list[int]] = {}
    for r in rows:
        assert r["us"] > 0, r
        seen.setdefault((r["mode"], r["world_size"], r["method"]), []).append(r["tokens"])
    expected = [("world-1", 1, "arfusion"), ("world-1", 1, "torch.compile epilogue"),
                ("world-1", 1, "copy of the same bytes"), ("emulation", 2, HARNESS_FLOOR)]
    expected += [("emulation", 2, f"arfusion trtllm {s}") for s in ("auto", "oneshot", "twoshot")]
    for key in expected:
        assert sorted(seen.get(key, [])) == tokens, (key, sorted(seen))
    assert HARNESS_FLOOR in (tmp_path / "bench.md").read_text()
