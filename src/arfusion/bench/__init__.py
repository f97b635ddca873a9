"""`python -m arfusion bench`: arfusion against what users would pick instead, in one run.

Timing (timing.py): CUDA-graph replays of `--calls` calls, each on its own input
and residual (rotated, so caches do not flatter), median over `--replays` after a
warm-up; several ranks: the max over ranks (processes) or the graph that holds them
all (emulation). Every baseline (baselines.py) and the copy bandwidth are measured
in the same run on the same card.

Modes (runs.py), by where the ranks are:
- world size 1 on one GPU, always: arfusion's local kernel vs the compiled epilogue,
  NCCL / symmetric memory + that epilogue, a copy of the same bytes;
- one GPU, N > 1 (default): N ranks as N streams of this process, each rank's calls a
  graph, all N graphs launched back to back from one thread (no thread skew); the
  exchange is local HBM traffic, so the roofline is HBM's;
- `--mps`: N processes on one GPU under the CUDA Multi-Process Service (started and
  stopped here), CUDA IPC between them: the real deployment path, but not NVLink;
- as many GPUs as ranks (or `--processes`): one process per GPU over NCCL.
`--tune` re-derives the one-shot threshold table of `heuristics.py`; `--warm J` compiles
what the run needs in J processes first (warm.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch

from .. import heuristics, testing
from ..cliargs import dtype_list, dtype_names, pattern_list, positive, positive_list
from ..patterns import KERNEL_PATTERNS
from . import report, runs, warm
from .report import footprints as _footprints  # noqa: F401 - tests and users
from .report import markdown as _markdown  # noqa: F401
from .report import tune
from .timing import copy_gbps

__all__ = ["add_arguments", "main", "tune"]

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world-size", type=positive, default=4,
                   help="ranks of the N-rank rows (default 4)")
    p.add_argument("--patterns", type=pattern_list, default=list(KERNEL_PATTERNS),
                   help="pattern codes, e.g. 1,2,10 (default all the kernels serve)")
    p.add_argument("--dtype", type=dtype_names, default="bf16",
                   help="of bf16, fp16, fp32, comma-separated (default bf16)")
    p.add_argument("--hidden", type=positive_list, default=[4096, 8192],
                   help="hidden sizes (default 4096,8192)")
    p.add_argument("--tokens", type=positive_list, default=[1, 16, 128, 512, 2048, 8192],
                   help="token counts (default 1,16,128,512,2048,8192)")
    p.add_argument("--emulate", type=positive_list, default=None,
                   help="world sizes of the one-GPU N-rank rows (default: --world-size)")
    p.add_argument("--emulation-tokens", type=positive_list, default=None,
                   help="tokens for the N-rank rows (default: --tokens)")
    p.add_argument("--backends", type=_backends, default="trtllm,mnnvl",
                   help="arfusion backends to time, of trtllm, mnnvl (default both)")
    p.add_argument("--calls", type=positive, default=8,
                   help="calls per CUDA graph, each on its own input set (default 8)")
    p.add_argument("--replays", type=positive, default=25,
                   help="timed replays of each graph (default 25)")
    p.add_argument("--out", default="bench-out", help="folder for bench.md/.json/.png")
    p.add_argument("--tp-layer", action="store_true", help="also time a TP decoder block")
    p.add_argument("--mps", action="store_true",
                   help="N processes on one GPU under MPS instead of the one-process runs")
    p.add_argument("--mps-share", type=positive, default=None, metavar="PCT",
                   help="--mps: each rank process's share of the SMs in percent "
                        "(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE; default 100 / world size: "
                        "FlashInfer's grid spans every SM it sees and spins on its peers)")
    p.add_argument("--processes", action="store_true",
                   help="one process per GPU even at world size 1 (default when there are "
                        "as many GPUs as ranks)")
    p.add_argument("--tune", action="store_true",
                   help="re-derive heuristics.ONESHOT_MAX_BYTES from this run and write it")
    p.add_argument("--warm", type=positive, default=0, metavar="J",
                   help="first compile every kernel variant and baseline the run needs in J "
                        "processes (a cold cache otherwise compiles them one by one)")
    p.add_argument("--tune-from", metavar="BENCH_JSON",
                   help="only re-derive the table from an earlier run's bench.json (no GPU)")


def _backends(text: str) -> str:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in ("trtllm", "mnnvl") for n in names):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from trtllm, mnnvl")
    return ",".join(names)


def _tune_from(path: str) -> int:
    """--tune-from: the table re-derived from a saved bench.json (no GPU)."""
    try:
        saved = json.loads(Path(path).read_text())
        table = tune(saved["rows"], saved["header"]["world_size"], saved["header"],
                     Path(heuristics.__file__))
    except (OSError, ValueError, KeyError, TypeError) as e:
        detail = f"missing {e}" if isinstance(e, KeyError) else str(e)
        raise SystemExit(f"--tune-from {path}: not a bench.json of `python -m arfusion "
                         f"bench` ({type(e).__name__}: {detail})") from None
    print(f"heuristics.ONESHOT_MAX_BYTES <- {table}")
    return 0


def _merged(by_rank: list[dict], world: int, mode: str) -> tuple[list[dict], list[dict]]:
    rows = report.merge_ranks([r["rows"] for r in by_rank], world, mode)
    tp = [dict(row, us=max(r["tp"][i]["us"] for r in by_rank),
               rel_err=max(r["tp"][i]["rel_err"] for r in by_rank))
          for i, row in enumerate(by_rank[0]["tp"])]
    return rows, tp


def _one_gpu(args, dtypes, backends, copy: float) -> tuple[list[dict], list[dict]]:
    rows, tp = [], []
    for dtype in dtypes:
        rows += runs.world1_rows(args, dtype, copy)
        for world in args.emulate or [args.world_size]:
            if world > 1:
                emu = argparse.Namespace(**{**vars(args), "world_size": world,
                                            "tokens": args.emulation_tokens or args.tokens})
                rows += runs.emulated_rows(emu, dtype, backends, copy)
    if args.tp_layer:
        block = (*runs.TP_SHAPE, dtypes[0], args.calls, args.replays)
        fused = testing.run_ranks(1, runs.tp_block, *block, True, device="cuda:0")[0]
        tp.append(dict(fused, method="arfusion", world_size=1, mode="world-1"))
        from .baselines import world1_group

        with world1_group():
            nccl = testing.run_ranks(1, runs.tp_block, *block, False, device="cuda:0")[0]
        tp.append(dict(nccl, method="nccl + separate ops", world_size=1, mode="world-1"))
    return rows, tp


def main(args: argparse.Namespace) -> int:
    if args.tune_from:
        return _tune_from(args.tune_from)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtypes = dtype_list(args.dtype)
    backends = args.backends.split(",")
    if args.warm > 0:  # before this process (or MPS) touches CUDA
        start = time.perf_counter()
        for failed in warm.fill_caches(args, dtypes, backends[0], args.warm):
            print(f"warm-up left to the run: {failed}", flush=True)
        print(f"warm-up: {time.perf_counter() - start:.0f} s in {args.warm} processes",
              flush=True)
    gc.disable()  # graphs are freed explicitly (a collection mid-capture is not allowed)
    if not args.mps:
        # Emulated ranks are streams of one process: give every stream its own hardware
        # queue (the default 8 can put two ranks' streams behind each other). Only takes
        # effect before this process creates its CUDA context. Not under MPS: its rank
        # processes inherit the environment, and 4 clients of 32 queues each failed to
        # create a stream ("CUDA error: out of memory", H100).
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
    if args.mps:
        # Before this process touches CUDA: the rank processes must be MPS clients.
        share = args.mps_share or 100 // args.world_size
        with testing.mps_daemon() as running:
            if not running:
                raise SystemExit("--mps: the MPS control daemon could not be started "
                                 "(needs nvidia-cuda-mps-control and root)")
            os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(share)  # rank processes'
            try:
                by_rank = testing.run_processes(args.world_size, runs.process_rank, args,
                                                dtypes, backends, "mps", backend="gloo",
                                                timeout_s=3000)
            finally:
                del os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"]
        rows, tp = _merged(by_rank, args.world_size, "mps")
        copy = copy_gbps()
    elif not torch.cuda.is_available():
        raise SystemExit("bench needs a CUDA GPU")
    elif args.processes or torch.cuda.device_count() >= args.world_size > 1:
        by_rank = testing.run_processes(args.world_size, runs.process_rank, args, dtypes,
                                        backends, "processes", backend="nccl",
                                        timeout_s=3000)
        rows, tp = _merged(by_rank, args.world_size, "processes")
        copy = copy_gbps()
    else:
        copy = copy_gbps()
        rows, tp = _one_gpu(args, dtypes, backends, copy)
    header = report.header(args.world_size)
    if args.mps:
        header["mps_share_percent"] = args.mps_share or 100 // args.world_size
    extras = dict(copy_GBps=copy, host_us=runs.host_costs(dtypes[0]), tp_layer=tp,
                  first_call=runs.cold_start(),
                  footprint=report.footprints(args.world_size, max(args.tokens),
                                              max(args.hidden), dtypes[0]))
    if args.tune:
        table = tune(rows, args.world_size, header, Path(heuristics.__file__))
        extras["tuned_oneshot_max_bytes"] = table
        print(f"heuristics.ONESHOT_MAX_BYTES <- {table}")
    md = report.markdown(header, rows, extras)
    (out / "bench.md").write_text(md + "\n")
    (out / "bench.json").write_text(json.dumps(dict(header=header, rows=rows, extras=extras),
                                               indent=1))
    try:
        report.plot(rows, out / "bench.png")
    except ImportError:
        print("no plot: matplotlib is not installed (pip install 'arfusion[bench]')")
    print(md)
    bad_tp = [r for r in tp if not r["rel_err"] < runs.TP_TOLERANCE]
    for r in bad_tp:
        print(f"TP block output of {r['method']} ({r['mode']}) differs from the single-GPU "
              f"model: relative error {r['rel_err']:.2e} >= {runs.TP_TOLERANCE}")
    return 1 if bad_tp else 0
