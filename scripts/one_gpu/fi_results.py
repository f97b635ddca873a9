"""pytest plugin (`-p fi_results`, scripts/flashinfer_tests.py): one JSON line per test
item in $ARFUSION_FI_RESULTS (`.rank<R>` appended under MPI): its outcome, and the
largest "Mismatched elements: m / n" that torch.testing reported anywhere in the
item's failure and captured output (ranks spawned by the test print theirs to the
captured stderr).

An item that runs past $ARFUSION_FI_ITEM_TIMEOUT_S seconds is recorded as "hung": its
spawned ranks are killed and this pytest process exits (a GPU stream that waits for a
peer stays blocked, so nothing after it would run); the runner goes on with the items
left.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import threading

import pytest

MISMATCH = re.compile(r"Mismatched elements: (\d+) / (\d+)")
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def _path() -> str | None:
    path = os.environ.get("ARFUSION_FI_RESULTS")
    rank = next((os.environ[v] for v in _RANK_VARS if v in os.environ), None)
    return f"{path}.rank{rank}" if path and rank is not None else path


def _write(record: dict) -> None:
    if (path := _path()) is not None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _mismatch(text: str) -> list[int] | None:
    found = [(int(m), int(n)) for m, n in MISMATCH.findall(text)]
    return list(max(found)) if found else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A watchdog thread, not a signal: a rank blocked in a CUDA or NCCL wait never
    returns to the interpreter to run a signal handler."""
    limit = float(os.environ.get("ARFUSION_FI_ITEM_TIMEOUT_S", "0"))

    def hung():
        for child in multiprocessing.active_children():
            child.kill()
        _write({"id": item.nodeid, "outcome": "hung", "seconds": limit})
        os._exit(3)

    watchdog = threading.Timer(limit, hung) if limit > 0 else None
    if watchdog is not None:
        watchdog.daemon = True
        watchdog.start()
    try:
        yield
    finally:
        if watchdog is not None:
            watchdog.cancel()


_seen: dict[str, dict] = {}


def pytest_runtest_logreport(report):
    """Fold the setup, call and teardown reports of an item into one record."""
    seen = _seen.setdefault(report.nodeid, {"id": report.nodeid, "outcome": "passed",
                                            "mismatch": None})
    if report.failed:
        seen["outcome"] = "failed"
    elif report.skipped and seen["outcome"] == "passed":
        seen["outcome"] = "skipped"
    text = "\n".join((report.longreprtext or "", report.capstdout, report.capstderr))
    found = _mismatch(text)
    if found and (seen["mismatch"] is None or found > seen["mismatch"]):
        seen["mismatch"] = found
    if report.when == "teardown":
        _write(_seen.pop(report.nodeid))
