"""FlashInfer's own all-reduce fusion tests, unmodified, twice on one GPU under MPS: once
against FlashInfer ("flashinfer" column) and once against arfusion through the no-edit
opt-in (ARFUSION_FLASHINFER_COMM=force: `flashinfer.comm` is arfusion's, the rest of
FlashInfer stays its own); then a table of both columns, item by item.

    python scripts/flashinfer_tests.py ROOT --flashinfer SITE [--files test_a.py,...]

ROOT holds FlashInfer's test files as in its repository (`tests/comm/test_*.py`,
`tests/test_helpers/comm.py`); they are read from FlashInfer's sources, never committed
here. SITE is a folder where `import flashinfer` works without JIT (the bundle that
../shared/flashinfer/build.sh makes, unpacked). The run needs root (the MPS daemon).

How one GPU runs tests written for one process per GPU (scripts/one_gpu/sitecustomize.py,
put first on every process's PYTHONPATH): each process poses as a host of its own for
NCCL (the tests' references), device ordinals below the largest world size all name
GPU 0, FlashInfer's trtllm workspace falls back to CUDA-IPC buffers where cuMem cannot
serve ranks on one GPU, and NVLink multicast is refused. Files that import mpi4py run
under `mpirun -np W` for each world size W; the others spawn their own ranks.

Each item runs under a watchdog (scripts/one_gpu/fi_results.py): a hung item is recorded
and the items after it run in a fresh pytest. An item is "ok" when arfusion passes
wherever FlashInfer passes and never fails by more mismatched elements than FlashInfer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ONE_GPU = HERE / "one_gpu"
FILES = ("test_trtllm_allreduce_dynamic_fp8_quant.py", "test_allreduce_unified_api.py",
         "test_gemma_ar_fusion.py", "test_trtllm_allreduce_fusion.py",
         "test_trtllm_mnnvl_allreduce_dynamic_fp8_quant.py")
COLUMNS = ("flashinfer", "arfusion")
# Folding ranks' records of an item, the first found wins: a rank's failure is the cause
# where its peers then hang (MPI ranks wait in a collective the failed rank never joins).
WORST = ("not run", "failed", "hung", "passed", "skipped")


def column_env(column: str, site: Path, root: Path, args: argparse.Namespace,
               shared: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0",
               TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               FLASHINFER_DISABLE_JIT="1", FLASHINFER_USE_CUDA_NORM="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               ARFUSION_FI_ITEM_TIMEOUT_S=str(args.item_timeout))
    if shared:  # ranks share GPU 0 (under MPS)
        env["ARFUSION_ONE_GPU_DEVICES"] = str(max(args.world_sizes))
    path = [ONE_GPU, REPO / "src", site, root]
    if column == "arfusion":
        env["ARFUSION_FLASHINFER_COMM"] = "force"
        path.insert(0, REPO / "src" / "arfusion" / "startup")  # the shim, chained to ONE_GPU
    else:
        env.pop("ARFUSION_FLASHINFER_COMM", None)
        env["ARFUSION_FI_IPC_WORKSPACE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in path)
    return env


def uses_mpi(test: Path) -> bool:
    text = test.read_text()
    return "mpi4py" in text or "mpirun" in text


def collect(test: Path, env: dict, keyword: str | None, root: Path) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
           str(test)] + (["-k", keyword] if keyword else [])
    out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
    ids = [line.strip() for line in out.stdout.splitlines() if "::" in line]
    if not ids:  # say why (an import error, most often)
        print("\n".join((out.stdout + out.stderr).splitlines()[-12:]), flush=True)
    return ids


def read_results(path: Path) -> dict[str, dict]:
    """Records of every rank's file (`path`, `path.rank<R>`), folded per item: the worst
    outcome and the largest mismatch."""
    found: dict[str, dict] = {}
    for f in sorted(path.parent.glob(path.name + "*")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            seen = found.setdefault(r["id"], {"outcome": "skipped", "mismatch": None})
            if WORST.index(r["outcome"]) < WORST.index(seen["outcome"]):
                seen["outcome"] = r["outcome"]
            m = r.get("mismatch")
            if m and (seen["mismatch"] is None or m > seen["mismatch"]):
                seen["mismatch"] = m
    return found


def run_items(ids: list[str], launcher: list[str], env: dict, results: Path, root: Path,
              log: Path, deadline: float) -> dict[str, dict]:
    """Run `ids` (a fresh pytest after each hung item) until done or past `deadline`."""
    left = list(ids)
    while left and time.monotonic() < deadline:
        cmd = launcher + [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-p", "fi_results", "--tb=short", *left]
        with open(log, "a") as f:
            # A session of its own: at the budget, its spawned ranks go with it.
            proc = subprocess.Popen(cmd, env=dict(env, ARFUSION_FI_RESULTS=str(results)),
                                    cwd=root, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                f.write("\n(run stopped at the time budget)\n")
        done = read_results(results)
        if not any(i in done for i in left):
            break  # nothing ran: a collection or start-up error (see the log)
        left = [i for i in left if i not in done]
    found = read_results(results)
    return {i: found.get(i, {"outcome": "not run", "mismatch": None}) for i in ids}


def ok(fi: dict, af: dict) -> bool:
    """arfusion passes, or fails where FlashInfer fails too and by no more mismatched
    elements; items both skip count as ok, anything else (hung, not run) does not."""
    if af["outcome"] == "passed":
        return True
    if af["outcome"] == "failed" and fi["outcome"] == "failed":
        return None not in (af["mismatch"], fi["mismatch"]) and \
            af["mismatch"][0] <= fi["mismatch"][0]
    return af["outcome"] == fi["outcome"] == "skipped"


def cell(r: dict) -> str:
    m = r["mismatch"]
    return r["outcome"] + (f" ({m[0]}/{m[1]})" if m and r["outcome"] == "failed" else "")


def table(rows: list[tuple[str, dict, dict]]) -> str:
    lines = ["| item | FlashInfer | arfusion | ok |", "| --- | --- | --- | --- |"]
    for item, fi, af in rows:
        lines.append(f"| {item} | {cell(fi)} | {cell(af)} | {'yes' if ok(fi, af) else 'NO'} |")
    count = {c: {o: 0 for o in WORST} for c in COLUMNS}
    for _, fi, af in rows:
        count["flashinfer"][fi["outcome"]] += 1
        count["arfusion"][af["outcome"]] += 1
    for c in COLUMNS:
        lines.append(f"{c}: " + ", ".join(f"{n} {o}" for o, n in count[c].items() if n))
    lines.append(f"ok: {sum(ok(fi, af) for _, fi, af in rows)} of {len(rows)} items")
    return "\n".join(lines)


def gpus() -> int:
    """The GPUs nvidia-smi lists (this process never creates a CUDA context: MPS must
    start before any process does)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return sum(line.startswith("GPU ") for line in out.splitlines())


@contextlib.contextmanager
def mps(needed: bool) -> Iterator[None]:
    if not needed:
        yield
        return
    sys.path.insert(0, str(REPO / "src"))
    from arfusion.testing import mps_daemon

    with mps_daemon() as started:
        if not started:
            raise SystemExit("the MPS control daemon could not be started (needs root and "
                             "nvidia-cuda-mps-control)")
        yield


def _select(text: str) -> tuple[str, str]:
    name, sep, expr = text.partition("=")
    if not (sep and name and expr):
        raise argparse.ArgumentTypeError(f"{text!r}: expected FILE=EXPR")
    return name, expr


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path, help="folder holding FlashInfer's tests/ tree")
    p.add_argument("--flashinfer", type=Path, required=True, help="FlashInfer's site folder")
    p.add_argument("--files", default=",".join(FILES), help="test files under tests/comm")
    p.add_argument("-k", dest="keyword", help="pytest -k expression for every file")
    p.add_argument("--select", action="append", default=[], metavar="FILE=EXPR", type=_select,
                   help="pytest -k expression for one file, instead of -k (e.g. "
                   "test_trtllm_allreduce_fusion.py='False and 1024': its unified items)")
    p.add_argument("--world-sizes", default="2,4",
                   type=lambda s: [int(w) for w in s.split(",")])
    p.add_argument("--columns", default=",".join(COLUMNS), type=lambda s: s.split(","))
    p.add_argument("--item-timeout", type=float, default=120.0)
    p.add_argument("--budget", type=float, default=3600.0, help="seconds for the whole run")
    p.add_argument("--out", type=Path, default=Path("/tmp/flashinfer-tests"))
    args = p.parse_args()
    select = dict(args.select)
    root, site = args.root.resolve(), args.flashinfer.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
    rows: list[tuple[str, dict, dict]] = []
    shared = gpus() < max(args.world_sizes)
    print(f"{gpus()} GPUs: " + ("ranks share GPU 0 under MPS" if shared else
                                "one GPU per rank"), flush=True)
    with mps(shared):
        for name in args.files.split(","):
            test = root / "tests" / "comm" / name
            if not test.is_file():
                print(f"{test}: not there, skipped", flush=True)
                continue
            if uses_mpi(test) and mpirun is None:
                print(f"{test.name}: needs mpirun (or mpiexec), which is not installed: "
                      "skipped", flush=True)
                continue
            launchers = ({f"np{w}": [mpirun, "-np", str(w)] for w in args.world_sizes}
                         if uses_mpi(test) else {"": []})
            found = {}
            for column in args.columns:
                env = column_env(column, site, root, args, shared)
                ids = collect(test, env, select.get(name, args.keyword), root)
                for tag, launcher in launchers.items():
                    stem = f"{column}-{test.stem}{'-' + tag if tag else ''}"
                    results = args.out / f"{stem}.jsonl"
                    for old in args.out.glob(results.name + "*"):
                        old.unlink()
                    print(f"{stem}: {len(ids)} items", flush=True)
                    got = run_items(ids, launcher, env, results, root,
                                    args.out / f"{stem}.log", deadline)
                    for i, r in got.items():
                        found.setdefault((i, tag), {})[column] = r
            blank = {"outcome": "not run", "mismatch": None}
            for (i, tag), by in found.items():
                item = i.split("::", 1)[-1] + (f" [{tag}]" if tag else "")
                rows.append((f"{test.stem}::{item}", by.get("flashinfer", blank),
                             by.get("arfusion", blank)))
    text = table(rows)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0 if all(ok(fi, af) for _, fi, af in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
