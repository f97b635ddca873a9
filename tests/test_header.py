"""The signature header's words (kernels/protocol.py) on the CPU, under Triton's interpreter:
the kernels' own publish_signature and header_status, for 2 to 16 ranks and both element
widths (tests/header_probe.py runs in a subprocess, so the interpreter is on before triton
is imported). Needs triton; CI, which has none, skips it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def seen() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([os.path.join(HERE, "..", "src"), HERE])}
    run = subprocess.run([sys.executable, os.path.join(HERE, "header_probe.py")], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    return {(name, case): value for name, case, value in map(json.loads, lines)}


@pytest.mark.parametrize("n", [2, 3, 8, 16])
@pytest.mark.parametrize("width", ["int16", "int32"])
def test_header_counts_unwritten_and_differing_words(seen, n, width):
    name = f"{n}-{width}"
    assert seen[name, "all"] == [0, 0]
    assert seen[name, "none"] == [2 * n, 0]  # two words a rank, none arrived, none differs
    assert seen[name, "even"] == [2 * (n // 2), 0]
    assert seen[name, "other_tokens"] == [0, 1]  # only word 0 (num_tokens) of one rank


@pytest.mark.parametrize("n", [2, 3, 8])
def test_header_reaches_every_peer_through_its_offset_picked_or_loaded(seen, n):
    statuses, same = seen[f"{n}-int16", "spread"]
    assert statuses == [[0, 0]] * n  # every rank's header: all n signatures, none differs
    assert same  # one-shot's picked lane offsets write what two-shot's loaded ones do


def test_header_fields_are_the_signature_and_a_torn_word_is_unwritten(seen):
    # rank 1's slot as 16-bit fields: T, T >> 15, H, SIG_MISC, the call counter, sentinels
    assert seen["2-int16", "fields"] == [4, 0, 256, 17, 5, -1, -1, -1]
    for f in range(5):
        assert seen["4-int16", f"torn{f}"] == [1, 0]


def test_a_launch_without_signature_neither_writes_nor_waits(seen):
    assert seen["4-int16", "unsigned_writes"] == 0
    assert seen["4-int16", "unsigned_waits"] == [0, 0]  # an empty header, nothing unwritten
