"""The bench end to end on one GPU at a tiny size: it runs, and its report holds every
table (world size 1 with its baselines; N emulated ranks, each strategy, the harness
floor, and at 1 token the signature's cost)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from arfusion.bench.runs import HARNESS_FLOOR, SIGNATURE

pytestmark = pytest.mark.gpu


def test_bench_runs_and_reports_every_table(tmp_path):
    tokens = [1, 3]
    proc = subprocess.run(
        [sys.executable, "-m", "arfusion", "bench", "--world-size", "2", "--patterns", "1",
         "--hidden", "256", "--tokens", ",".join(map(str, tokens)), "--backends", "trtllm",
         "--calls", "2", "--replays", "2", "--warm", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "warm-up: " in proc.stdout and "warm-up left to the run" not in proc.stdout
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    seen: dict[tuple, list[int]] = {}
    for r in rows:
        assert r["us"] > 0 or r["mode"] == SIGNATURE, r  # a difference may be < 0
        seen.setdefault((r["mode"], r["world_size"], r["method"]), []).append(r["tokens"])
    expected = [("world-1", 1, "arfusion"), ("world-1", 1, "torch.compile epilogue"),
                ("world-1", 1, "copy of the same bytes"), ("emulation", 2, HARNESS_FLOOR)]
    expected += [("emulation", 2, f"arfusion trtllm {s}") for s in ("auto", "oneshot", "twoshot")]
    for key in expected:
        assert sorted(seen.get(key, [])) == tokens, (key, sorted(seen))
    sig = {r["method"]: r for r in rows if r["mode"] == SIGNATURE}
    assert sorted(sig) == ["trtllm signature cost", "trtllm with signature",
                           "trtllm without (timing only)"], sorted(seen)
    assert all(r["tokens"] == 1 and r["world_size"] == 2 for r in sig.values())
    assert sig["trtllm with signature"]["us"] > 0 and sig["trtllm without (timing only)"]["us"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert HARNESS_FLOOR in md and "what the call signature costs" in md
