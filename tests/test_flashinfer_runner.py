"""scripts/flashinfer_tests.py's bookkeeping on the CPU: a pytest run under its plugin
records passes, failures with torch.testing's mismatch count (printed by a spawned
rank), and a hung item, after which the items left run in a fresh pytest."""

from __future__ import annotations

import importlib.util
import os
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FAKE = '''
import multiprocessing as mp
import time

import torch


def _rank(wrong):
    a = torch.arange(100.0)
    b = a.clone()
    b[:wrong] += 1
    torch.testing.assert_close(a, b)


def _spawn(wrong):
    p = mp.get_context("spawn").Process(target=_rank, args=(wrong,))
    p.start()
    p.join()
    assert p.exitcode == 0


def test_passes():
    _spawn(0)


def test_fails():
    _spawn(7)


def test_hangs():
    time.sleep(60)


def test_after_the_hang():
    pass
'''


def _runner():
    spec = importlib.util.spec_from_file_location("fi_runner", REPO / "scripts" /
                                                  "flashinfer_tests.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runner_records_outcomes_mismatches_and_hangs(tmp_path):
    r = _runner()
    root = tmp_path / "root"
    (root / "tests" / "comm").mkdir(parents=True)
    test = root / "tests" / "comm" / "test_fake.py"
    test.write_text(textwrap.dedent(FAKE))
    env = dict(os.environ, PYTHONPATH=f"{r.ONE_GPU}:{REPO / 'src'}:{root}",
               ARFUSION_FI_ITEM_TIMEOUT_S="5")
    ids = r.collect(test, env, None, root)
    assert [i.split("::")[-1] for i in ids] == \
        ["test_passes", "test_fails", "test_hangs", "test_after_the_hang"]
    start = time.monotonic()
    got = r.run_items(ids, [], env, tmp_path / "af.jsonl", root, tmp_path / "af.log",
                      time.monotonic() + 120)
    assert time.monotonic() - start < 60
    by = {i.split("::")[-1]: v for i, v in got.items()}
    assert by["test_passes"] == {"outcome": "passed", "mismatch": None}
    assert by["test_fails"] == {"outcome": "failed", "mismatch": [7, 100]}
    assert by["test_hangs"]["outcome"] == "hung"
    assert by["test_after_the_hang"]["outcome"] == "passed"
    # arfusion fails by fewer elements than FlashInfer: ok; by more, or hangs: not ok.
    fi = {"outcome": "failed", "mismatch": [9, 100]}
    assert r.ok(fi, by["test_fails"]) and not r.ok(by["test_fails"], fi)
    assert not r.ok(by["test_passes"], by["test_hangs"])
    assert not r.ok(by["test_passes"], {"outcome": "skipped", "mismatch": None})
    text = r.table([(i, by[i], by[i]) for i in by])
    assert "| test_fails | failed (7/100) | failed (7/100) | yes |" in text
    assert "ok: 3 of 4 items" in text


def test_ranks_records_fold_to_the_cause(tmp_path):
    """An MPI rank that failed is the item's outcome even where its peers then hung in a
    collective; the largest mismatch of any rank is kept."""
    r = _runner()
    base = tmp_path / "col.jsonl"
    (tmp_path / "col.jsonl.rank0").write_text(
        '{"id": "a", "outcome": "failed", "mismatch": [3, 10]}\n'
        '{"id": "b", "outcome": "passed", "mismatch": null}\n')
    (tmp_path / "col.jsonl.rank1").write_text(
        '{"id": "a", "outcome": "hung", "seconds": 5}\n'
        '{"id": "b", "outcome": "passed", "mismatch": [1, 10]}\n')
    assert r.read_results(base) == {"a": {"outcome": "failed", "mismatch": [3, 10]},
                                    "b": {"outcome": "passed", "mismatch": [1, 10]}}
