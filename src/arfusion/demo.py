"""`python -m arfusion demo`: every supported pattern through the public API, checked.

Launches N local ranks, runs each (pattern, shape, dtype[, strategy]) through
`create_allreduce_fusion_workspace` / `allreduce_fusion`, compares every output
with `arfusion.reference` (outputs poisoned first), checks that all ranks got
the same bits, and prints a table. Exits non-zero if any check fails.

Where the ranks live:
- no GPU: one process per rank, torch.distributed over gloo, `torch` backend;
- as many GPUs as ranks: one process per GPU over NCCL;
- fewer GPUs than ranks: ranks are threads of one process on GPU 0, each on its
  own stream (emulation: same protocol, but no NVLink between the ranks).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from . import testing
from .api import allreduce_fusion, create_allreduce_fusion_workspace
from .cliargs import DTYPES, dtype_list, pattern_list, positive, positive_list
from .patterns import KERNEL_PATTERNS, PATTERNS, Quant, pattern_supports
from .testing import Case, case_kwargs, case_outputs, precompile_cases, run_case

SCALE = {Quant.FP8: 0.05, Quant.NVFP4: 400.0}


@dataclass
class DemoConfig:
    world_size: int
    backend: str
    tokens: list[int]
    hidden: list[int]
    dtypes: list[torch.dtype]
    patterns: list[int]
    seed: int
    mode: str  # "processes-gloo", "processes-nccl" or "threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream().synchronize()


def _cases(cfg: DemoConfig, dtype: torch.dtype) -> list[tuple[Case, dict]]:
    """Every supported (pattern, tokens, hidden, strategy) of `cfg` for `dtype`, with
    the run_case arguments it is checked with."""
    strategies = [None] if cfg.backend == "torch" else [True, False]
    cases = []
    for i, (pattern, t, h, oneshot) in enumerate(
            (p, t, h, s) for p in cfg.patterns for t in cfg.tokens for h in cfg.hidden
            for s in strategies):
        if pattern_supports(pattern, h, dtype):
            quant = PATTERNS[pattern].quant
            case = Case(pattern, t, h, dtype, seed=cfg.seed * 7919 + i, layout_code=i % 3,
                        scale_factor=SCALE.get(quant, 1.0), weight_bias=1.0 if i % 2 else 0.0)
            cases.append((case, dict(with_output=i % 2 == 0, use_oneshot=oneshot)))
    return cases


def run_rank(rank: int, world_size: int, cfg: DemoConfig, comm=None,
             device: torch.device | None = None) -> list[dict]:
    """One rank's part of the demo; returns a row per case."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if cfg.mode != \
            "processes-gloo" else torch.device("cpu")
    rows = []
    barrier = comm if cfg.mode == "threads" else None  # see arfusion.testing
    start = time.perf_counter()
    for dtype in cfg.dtypes:
        cases = _cases(cfg, dtype)
        ws = create_allreduce_fusion_workspace(
            cfg.backend, world_size=world_size, rank=rank, max_token_num=max(cfg.tokens),
            hidden_dim=max(cfg.hidden), dtype=dtype, comm_backend=comm)
        with ws:
            if barrier is not None:
                precompile_cases(ws, cases, rank, device, barrier)
            for case, kw in cases:
                result = run_case(ws, case, rank, world_size, device,
                                  exact=cfg.backend == "torch", comm=barrier, **kw)
                # Time a few more identical calls (the first one above compiled and checked).
                x, out = case.input(rank, device), case_outputs(case, device, kw["with_output"])
                kwargs = case_kwargs(case, device, rank)
                _sync(device)
                if barrier is not None:
                    barrier.barrier()
                begin = time.perf_counter()
                for _ in range(3):
                    allreduce_fusion(x, ws, case.pattern, use_oneshot=kw["use_oneshot"], **out,
                                     **kwargs)
                _sync(device)
                chk = result.check
                rows.append({
                    "pattern": PATTERNS[case.pattern].name,
                    "shape": f"{case.num_tokens}x{case.hidden_dim}",
                    "dtype": str(dtype).removeprefix("torch."),
                    "strategy": {None: "-", True: "oneshot", False: "twoshot"}[kw["use_oneshot"]],
                    "err": chk.max_abs_err, "ulp": chk.max_ulp, "boundary": chk.boundary,
                    "ok": chk.ok, "problems": chk.problems,
                    "us": (time.perf_counter() - begin) / 3 * 1e6, "digest": result.digest,
                })
        if rank == 0:
            print(f"  {str(dtype).removeprefix('torch.')}: {len(cases)} calls checked on "
                  f"{world_size} ranks ({time.perf_counter() - start:.1f} s so far)", flush=True)
    return rows


def _rank_in_thread(ctx: testing.RankContext, cfg: DemoConfig) -> list[dict]:
    return run_rank(ctx.rank, ctx.world_size, cfg, comm=ctx.comm, device=ctx.device)


LEGEND = """\
  max|err|   largest |difference| from arfusion.reference in the returned tensor
  ulp        largest norm_out distance from the reference, in units in the last place
             (up to 1 allowed for fp16/bf16, 32 for fp32: row sums round differently)
  bnd        quantised bytes that differ from the reference because the normalised
             value sits on a rounding boundary (allowed, counted)
  ranks      equal: every rank got bit-identical outputs
  time/call  wall time of an eager call on rank 0, host overhead included"""


def _print_table(rows_by_rank: list[list[dict]], cfg: DemoConfig) -> bool:
    header = ("pattern", "shape", "dtype", "strategy", "max|err|", "ulp", "bnd", "ranks",
              "result", "time/call")
    lines = []
    all_ok = True
    for i, row in enumerate(rows_by_rank[0]):
        same = len({rows[i]["digest"] for rows in rows_by_rank}) == 1
        ok = same and all(rows[i]["ok"] for rows in rows_by_rank)
        all_ok &= ok
        lines.append((row["pattern"], row["shape"], row["dtype"], row["strategy"],
                      f"{row['err']:.3g}", str(row["ulp"]), str(row["boundary"]),
                      "equal" if same else "DIFFER", "pass" if ok else "FAIL",
                      f"{row['us']:.0f} us"))
        if not ok:
            for rank, rows in enumerate(rows_by_rank):
                for problem in rows[i]["problems"]:
                    lines.append((f"  rank {rank}: {problem}",) + ("",) * 9)
    widths = [max(len(r[c]) for r in [header, *lines]) for c in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *lines]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print(LEGEND)
    passed = sum(1 for line in lines if line[8] == "pass")
    print(f"\n{passed} passed, {sum(1 for line in lines if line[8] == 'FAIL')} failed "
          f"({cfg.world_size} ranks, backend {cfg.backend}, {cfg.mode})")
    return all_ok


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world-size", type=positive, default=None,
                   help="ranks to launch (default: 2 without a GPU, else max(2, GPUs))")
    p.add_argument("--backend", default="auto", choices=["auto", "trtllm", "mnnvl", "torch"],
                   help="auto: the Triton kernels with a GPU, the torch backend without")
    p.add_argument("--tokens", type=positive_list, default=[1, 37], help="e.g. 1,37,300")
    p.add_argument("--hidden", type=positive_list, default=[128, 4096], help="e.g. 16,2880")
    p.add_argument("--dtype", type=dtype_list, default=list(DTYPES.values()),
                   help="of bf16, fp16, fp32 (default all)")
    p.add_argument("--patterns", type=pattern_list, default=None,
                   help="pattern codes, default all the backend serves")
    p.add_argument("--seed", type=int, default=0, help="of the random inputs")
    p.set_defaults(parser=p)


def main(args: argparse.Namespace) -> int:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world = args.world_size or (max(2, gpus) if gpus else 2)
    if not gpus:
        mode = "processes-gloo"
    elif gpus >= world and world > 1:
        mode = "processes-nccl"
    else:
        mode = "threads"
    backend = args.backend
    if backend in ("trtllm", "mnnvl") and not gpus:
        args.parser.error(f"--backend {backend} needs a CUDA GPU; without one use --backend "
                          "torch (or auto)")
    if backend == "auto" and not gpus:
        backend = "torch"
        print("no GPU: using the torch backend over gloo")
    patterns = args.patterns or (sorted(PATTERNS) if backend == "torch" else KERNEL_PATTERNS)
    cfg = DemoConfig(world, backend, args.tokens, args.hidden, args.dtype, list(patterns),
                     args.seed, mode)
    if not any(_cases(cfg, dtype) for dtype in cfg.dtypes):
        args.parser.error(
            "--patterns, --hidden and --dtype select nothing to run (NVFP4 patterns need "
            "bf16 or fp16 and a hidden size divisible by 16)")
    print(f"checking {len(cfg.patterns)} patterns x {len(cfg.dtypes)} dtypes on {world} ranks",
          flush=True)
    if mode == "threads":
        print(f"one GPU: {world} ranks as threads of one process on "
              f"{torch.cuda.get_device_name(0)} (emulation, no NVLink)", flush=True)
        rows = testing.run_ranks(world, _rank_in_thread, cfg, device="cuda:0")
    else:
        rows = testing.run_processes(world, run_rank, cfg,
                                     backend="gloo" if mode == "processes-gloo" else "nccl")
    return 0 if _print_table(rows, cfg) else 1
