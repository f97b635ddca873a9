"""`python -m arfusion bench`: latency of arfusion against what users would pick instead.

Timing: every measurement is a CUDA graph of `--calls` back-to-back calls, each on
its own input set (so caches do not flatter), replayed `--replays` times after a
warm-up; the time per call is the median over replays of event time / calls, and
the maximum over ranks. Baselines run in the same run on the same card: NCCL
all_reduce and PyTorch symmetric memory's one_shot_all_reduce, each followed by the
epilogue compiled with torch.compile, and FlashInfer's allreduce_fusion where
flashinfer is importable (one process per rank only).

Where the ranks live decides what is measured:
- as many GPUs as ranks (or `--processes`): one process per GPU over NCCL, arfusion
  over symmetric memory, baselines on the same process group;
- one GPU (or fewer GPUs than ranks): the N ranks are threads of one process
  (emulation: their traffic is local memory, not NVLink, and they share the SMs).
  Emulated rows are labelled and never comparable with NVLink numbers. The
  baselines that exist on one GPU (NCCL and PyTorch symmetric memory at world size
  1, each followed by the same epilogue compiled with torch.compile) are measured
  at world size 1 against arfusion at world size 1.

Also on one GPU: the fused epilogue's achieved bandwidth vs a device-to-device
copy, the host overhead of an eager call vs `torch.add`, the workspace footprint
vs FlashInfer's formula, and (`--tp-layer`) a tensor-parallel block.
`--tune` re-derives the one-shot threshold table of `heuristics.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import json
import os
import re
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from . import heuristics, reference, sizing, testing
from .api import allreduce_fusion, create_allreduce_fusion_workspace
from .comm import InProcessBackend, InProcessGroup, TorchDistBackend
from .patterns import PATTERNS, Quant
from .testing import Case, capture_graph, case_kwargs, case_outputs, pattern_supports

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STRATEGIES = {None: "auto", True: "oneshot", False: "twoshot"}
SCALE = {Quant.FP8: 0.05, Quant.NVFP4: 400.0}


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--patterns", type=_int_list, default=sorted(PATTERNS))
    p.add_argument("--dtype", default="bf16", help="of bf16, fp16, fp32")
    p.add_argument("--hidden", type=_int_list, default=[4096, 6144, 8192])
    p.add_argument("--tokens", type=_int_list, default=[2**i for i in range(12)])
    p.add_argument("--backends", default="trtllm,mnnvl")
    p.add_argument("--calls", type=int, default=8, help="calls per CUDA graph (input sets)")
    p.add_argument("--replays", type=int, default=25)
    p.add_argument("--out", default="bench-out", help="folder for bench.md/.json/.png")
    p.add_argument("--tp-layer", action="store_true", help="also time a TP decoder block")
    p.add_argument("--processes", action="store_true",
                   help="one process per GPU even at world size 1 (default when there are "
                        "as many GPUs as ranks)")
    p.add_argument("--tune", action="store_true",
                   help="re-derive heuristics.ONESHOT_MAX_BYTES from this run and write it")
    p.add_argument("--tune-from", metavar="BENCH_JSON",
                   help="only re-derive the table from an earlier run's bench.json (no GPU)")


# ---------------------------------------------------------------- timing


def time_graph(step: Callable[[], None], calls: int, replays: int,
               ctx: testing.RankContext | None = None) -> float:
    """Median microseconds per call of `step` (which issues `calls` calls), replayed as
    a CUDA graph; with `ctx`, captured and replayed by every rank together."""
    if ctx is None:
        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        stream = torch.cuda.current_stream()
    else:
        graph = capture_graph(ctx, step)
        stream = ctx.stream
    times = []
    for _ in range(replays + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream.synchronize()
        if ctx is not None:
            ctx.comm.barrier()
        start.record(stream)
        graph.replay()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    if ctx is not None:
        # A graph's memory pool may not be freed while any thread captures: free it
        # here, then meet, before anyone captures the next one.
        del graph
        ctx.comm.barrier()
    return statistics.median(times[3:])


def _case(pattern: int, t: int, h: int, dtype: torch.dtype) -> Case:
    quant = PATTERNS[pattern].quant
    return Case(pattern, t, h, dtype, scale_factor=SCALE.get(quant, 1.0))


def _flashinfer_rows(ctx: testing.RankContext, args, dtype) -> list[dict]:
    """FlashInfer's allreduce_fusion (same API as arfusion's) where flashinfer is
    importable; it needs one process per rank, so not with ranks as threads."""
    try:
        import flashinfer.comm as fi
    except ImportError:
        return []
    if isinstance(ctx.comm, InProcessBackend) and ctx.world_size > 1:
        return []
    rows = []
    try:
        ws = fi.create_allreduce_fusion_workspace(
            "auto", world_size=ctx.world_size, rank=ctx.rank, max_token_num=max(args.tokens),
            hidden_dim=max(args.hidden), dtype=dtype)
    except Exception as e:  # noqa: BLE001 - reported, then left out
        print(f"flashinfer baseline not available: {type(e).__name__}: {e}")
        return []
    for pattern, h, t in itertools.product(args.patterns, args.hidden, args.tokens):
        if not pattern_supports(pattern, h, dtype):
            continue
        case = _case(pattern, t, h, dtype)
        xs = [_case(pattern, t, h, dtype).input(ctx.rank + 101 * i, ctx.device)
              for i in range(args.calls)]
        out, kw = case_outputs(case, ctx.device, False), case_kwargs(case, ctx.device)

        def step(case=case, xs=xs, out=out, kw=kw):
            for x in xs:
                fi.allreduce_fusion(input=x, workspace=ws, pattern=case.pattern, **out, **kw)

        try:
            us = time_graph(step, args.calls, args.replays, ctx)
        except Exception as e:  # noqa: BLE001 - reported, then left out
            print(f"flashinfer failed for {case.label()}: {type(e).__name__}: {e}")
            continue
        rows.append(dict(method=f"flashinfer {ws.backend}", pattern=pattern, hidden=h,
                         tokens=t, strategy="-", us=us))
    ws.destroy()
    return rows


def _ws_comm(ctx: testing.RankContext):
    """Threads pass their in-process backend; processes rendezvous through the process
    group (symmetric memory), as users do."""
    return ctx.comm if isinstance(ctx.comm, InProcessBackend) else None


def _arfusion_rows(ctx: testing.RankContext, args, dtype, backends) -> list[dict]:
    """Every (backend, pattern, hidden, tokens, strategy) on this rank."""
    rows = []
    for backend in backends:
        with create_allreduce_fusion_workspace(
                backend, world_size=ctx.world_size, rank=ctx.rank,
                max_token_num=max(args.tokens), hidden_dim=max(args.hidden), dtype=dtype,
                comm_backend=_ws_comm(ctx)) as ws:
            for pattern, h, t in itertools.product(args.patterns, args.hidden, args.tokens):
                if pattern_supports(pattern, h, dtype):
                    rows += _time_strategies(ctx, ws, backend, _case(pattern, t, h, dtype), args)
    return rows


def _time_strategies(ctx, ws, backend: str, case: Case, args) -> list[dict]:
    """Auto and each forced strategy the workspace holds, on `args.calls` input sets."""
    t, h = case.num_tokens, case.hidden_dim
    xs = [_case(case.pattern, t, h, case.dtype).input(ctx.rank + 101 * i, ctx.device)
          for i in range(args.calls)]
    out, kw = case_outputs(case, ctx.device, False), case_kwargs(case, ctx.device)
    rows = []
    for oneshot in (None, True, False):
        if not ws.is_buffer_size_sufficient(ctx.world_size, t, h, case.dtype, oneshot):
            continue

        def step(oneshot=oneshot):
            for x in xs:
                allreduce_fusion(x, ws, case.pattern, use_oneshot=oneshot, **out, **kw)

        rows.append(dict(method=f"arfusion {backend} {STRATEGIES[oneshot]}",
                         pattern=case.pattern, hidden=h, tokens=t,
                         strategy=STRATEGIES[ws.picks_oneshot(t * h, oneshot)],
                         us=time_graph(step, args.calls, args.replays, ctx)))
    return rows


# ---------------------------------------------------------------- baselines


def _epilogue_fn(pattern: int, dtype: torch.dtype):
    """The unfused epilogue after an all-reduce, compiled: residual + RMSNorm (+ quant).
    Compiled per shape (dynamic=False); the recompile limit is raised so that no shape
    silently falls back to eager."""
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.accumulated_recompile_limit = 4096
    case = _case(pattern, 1, 1, dtype)

    def epilogue(s: torch.Tensor, residual: torch.Tensor, gamma: torch.Tensor):
        if not PATTERNS[pattern].norm:
            return {"output": s}
        return reference.epilogue(s.float(), dtype, pattern, residual_in=residual,
                                  rms_gamma=gamma, scale_factor=case.scale_factor, layout_code=0)

    return torch.compile(epilogue, dynamic=False)


@contextlib.contextmanager
def _world1_group():
    """An NCCL process group of this process alone (the baselines at world size 1)."""
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"file://{tempfile.mkdtemp()}/pg", rank=0,
                            world_size=1, device_id=torch.device("cuda", 0))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _baseline_rows(args, dtype, ctx: testing.RankContext | None = None) -> list[dict]:
    """NCCL all_reduce and symmetric-memory one_shot_all_reduce on the current process
    group, each followed by the compiled epilogue."""
    import torch.distributed as dist

    reducers = {"nccl + compiled epilogue": dist.all_reduce}
    if (symm := _symm_mem_all_reduce()) is not None:
        reducers["symm_mem one_shot + compiled epilogue"] = symm
    epilogues = {p: _epilogue_fn(p, dtype) for p in args.patterns}
    rows = []
    for pattern, h, t in itertools.product(args.patterns, args.hidden, args.tokens):
        if pattern_supports(pattern, h, dtype):
            rows += _time_baselines(_case(pattern, t, h, dtype), epilogues[pattern], reducers,
                                    args, ctx)
    return rows


def _time_baselines(case: Case, epilogue, reducers: dict, args,
                    ctx: testing.RankContext | None) -> list[dict]:
    """Each reducer + the compiled epilogue; a failing one is reported and left out."""
    rank = ctx.rank if ctx is not None else 0
    xs = [_case(case.pattern, case.num_tokens, case.hidden_dim, case.dtype).input(
        rank + 101 * i, "cuda") for i in range(args.calls)]
    kw = case.shared("cuda")
    rows = []
    for name, reduce in reducers.items():

        def step(reduce=reduce):
            for x in xs:
                y = reduce(x)  # NCCL reduces in place and returns None
                epilogue(x if y is None else y, kw["residual_in"], kw["rms_gamma"])

        try:
            us = time_graph(step, args.calls, args.replays, ctx)
        except Exception as e:  # noqa: BLE001 - reported, then left out
            print(f"baseline {name} failed for {case.label()}: {type(e).__name__}: {e}")
            continue
        rows.append(dict(method=name, pattern=case.pattern, hidden=case.hidden_dim,
                         tokens=case.num_tokens, strategy="-", us=us))
    return rows


def _symm_mem_all_reduce():
    """PyTorch symmetric memory's one-shot all-reduce at world size 1, or None."""
    try:
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        group = dist.group.WORLD.group_name
        bufs: dict[tuple, torch.Tensor] = {}

        def reduce(x: torch.Tensor) -> torch.Tensor:
            key = (x.shape, x.dtype)
            if key not in bufs:
                bufs[key] = symm_mem.empty(x.shape, dtype=x.dtype, device=x.device)
                symm_mem.rendezvous(bufs[key], group)
            bufs[key].copy_(x)
            return torch.ops.symm_mem.one_shot_all_reduce(bufs[key], "sum", group)

        probe = torch.ones(8, 16, dtype=torch.bfloat16, device="cuda")
        assert torch.equal(reduce(probe), probe)
        return reduce
    except Exception as e:  # noqa: BLE001 - reported as missing
        print(f"symm_mem baseline not available: {type(e).__name__}: {e}")
        return None


# ---------------------------------------------------------------- one-GPU extras


def _extras(args, dtype) -> dict:
    """World size 1: epilogue bandwidth vs copy, host overhead, footprint vs FlashInfer."""
    comm = InProcessGroup(1).backends()[0]
    t, h = 16384, 8192
    out: dict = {}
    with create_allreduce_fusion_workspace("trtllm", world_size=1, rank=0, max_token_num=t,
                                           hidden_dim=h, dtype=dtype, comm_backend=comm) as ws:
        case = _case(1, t, h, dtype)
        x, outs, kw = case.input(0, "cuda"), case_outputs(case, "cuda", False), \
            case_kwargs(case, "cuda")
        us = time_graph(lambda: allreduce_fusion(x, ws, 1, **outs, **kw), 1, args.replays)
        essential = 4 * t * h * dtype.itemsize  # read x, residual; write residual_out, norm
        src, dst = torch.empty(t * h * 2, dtype=dtype, device="cuda"), \
            torch.empty(t * h * 2, dtype=dtype, device="cuda")
        copy_us = time_graph(lambda: dst.copy_(src), 1, args.replays)
        out["bandwidth"] = dict(shape=f"{t}x{h}", fused_us=us,
                                fused_GBps=essential / us / 1e3,
                                copy_GBps=2 * src.numel() * dtype.itemsize / copy_us / 1e3)
        small = _case(1, 8, 4096, dtype)
        xs, o, k = small.input(0, "cuda"), case_outputs(small, "cuda", False), \
            case_kwargs(small, "cuda")
        a = torch.ones(8, 4096, dtype=dtype, device="cuda")
        out["host_us"] = dict(
            allreduce_fusion=_host_us(lambda: allreduce_fusion(xs, ws, 1, **o, **k)),
            torch_add=_host_us(lambda: torch.add(a, a, out=a)))
    out["footprint"] = _footprints(args.world_size, max(args.tokens), max(args.hidden), dtype)
    return out


def _host_us(fn: Callable[[], object], n: int = 300) -> float:
    import time

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / n * 1e6


def _footprints(world: int, tokens: int, hidden: int, dtype: torch.dtype) -> dict:
    """Symmetric memory per rank: arfusion's backends vs FlashInfer's trtllm formula
    (buffer N*T*H*2 + flags N*256*4 + Lamport 3*N*T*H*s, each rounded up to 2 MiB)."""
    from .backends.mnnvl import MNNVLAllReduceFusionWorkspace as M

    e, mib2 = tokens * hidden, 2 << 20
    flashinfer = sum(sizing.round_up(b, mib2) for b in (
        world * e * 2, world * 256 * 4, 3 * min(world * e * dtype.itemsize, 2**31 - mib2)))
    return dict(config=f"{world} ranks, {tokens}x{hidden} {dtype}",
                trtllm=sizing.buffer_bytes(world, e, e, dtype),
                mnnvl=sizing.buffer_bytes(world, e, M.oneshot_capacity(world, e, dtype, False),
                                          dtype),
                mnnvl_force_oneshot=sizing.buffer_bytes(world, e, e, dtype),
                flashinfer_trtllm=flashinfer)


# ---------------------------------------------------------------- TP layer


def _tp_block(ctx: testing.RankContext, t: int, h: int, dtype, calls: int, replays: int,
              fused: bool) -> dict:
    """Row-parallel down projection, all-reduce + residual + RMSNorm (arfusion fused, or
    NCCL then a compiled norm), column-parallel up projection; checked against the
    single-GPU model and timed as a CUDA graph."""
    import torch.distributed as dist

    n, inter = ctx.world_size, 4 * h
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(t, inter, generator=g, device="cuda").to(dtype)
    w_down = (torch.randn(inter, h, generator=g, device="cuda") / inter**0.5).to(dtype)
    w_up = (torch.randn(h, inter, generator=g, device="cuda") / h**0.5).to(dtype)
    residual = torch.randn(t, h, generator=g, device="cuda").to(dtype)
    gamma = torch.rand(h, generator=g, device="cuda").to(dtype) + 0.5
    shard = slice(ctx.rank * inter // n, (ctx.rank + 1) * inter // n)
    a_r, wd_r, wu_r = a[:, shard], w_down[shard], w_up[:, shard]
    with contextlib.ExitStack() as stack:
        if fused:
            ws = stack.enter_context(create_allreduce_fusion_workspace(
                "trtllm", world_size=n, rank=ctx.rank, max_token_num=t, hidden_dim=h,
                dtype=dtype, comm_backend=_ws_comm(ctx)))
            res_out, norm_out = torch.empty_like(residual), torch.empty_like(residual)

            def middle(y):
                allreduce_fusion(y, ws, 1, residual_out=res_out, norm_out=norm_out,
                                 residual_in=residual, rms_gamma=gamma)
                return norm_out
        else:
            norm = torch.compile(lambda y: reference.rms_norm(
                (y.float() + residual.float()).to(dtype), gamma, 1e-6))

            def middle(y):
                dist.all_reduce(y)
                return norm(y)

        def block():
            return middle(a_r @ wd_r) @ wu_r

        ctx.comm.barrier()
        got = block()
        ctx.stream.synchronize()
        want = reference.rms_norm((a @ w_down).float().add(residual.float()).to(dtype), gamma,
                                  1e-6) @ wu_r
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        us = time_graph(lambda: [block() for _ in range(calls)], calls, replays, ctx)
    return dict(rel_err=err, us=us)


# ---------------------------------------------------------------- report


def _merge_ranks(rows_by_rank: list[list[dict]], world: int, mode: str) -> list[dict]:
    merged = []
    for i, row in enumerate(rows_by_rank[0]):
        merged.append(dict(row, us=max(r[i]["us"] for r in rows_by_rank), world_size=world,
                           mode=mode))
    return merged


def _header(world: int) -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    driver = os.popen("nvidia-smi --query-gpu=driver_version --format=csv,noheader")
    return dict(card=props.name, sms=props.multi_processor_count, driver=driver.read().strip(),
                torch=torch.__version__, triton=triton.__version__,
                date=datetime.date.today().isoformat(), world_size=world,
                gpus=torch.cuda.device_count())


def _markdown(header: dict, rows: list[dict], extras: dict) -> str:
    lines = [f"### {header['card']} ({header['sms']} SMs), driver {header['driver']}, "
             f"torch {header['torch']}, triton {header['triton']}, {header['date']}", ""]
    n = header["world_size"]
    for (world, mode), title in (((n, "processes"), f"{n} processes, one GPU each"),
                                 ((n, "emulation"),
                                  f"{n} ranks as threads on one GPU (emulation, not NVLink)"),
                                 ((1, "world-1"), "world size 1 on one GPU, with baselines")):
        part = [r for r in rows if r["world_size"] == world and r["mode"] == mode]
        if not part:
            continue
        methods = sorted({r["method"] for r in part})
        lines += [f"#### {title}: median us per call (max over ranks)", "",
                  "| pattern | dtype | hidden | tokens | " + " | ".join(methods) + " |",
                  "| --- | --- | --- | --- | " + " | ".join("---" for _ in methods) + " |"]
        keys = sorted({(r["pattern"], r["dtype"], r["hidden"], r["tokens"]) for r in part})
        for key in keys:
            cells = {r["method"]: r for r in part
                     if (r["pattern"], r["dtype"], r["hidden"], r["tokens"]) == key}
            vals = [f"{cells[m]['us']:.1f}" + (f" ({cells[m]['strategy']})"
                                               if m.endswith("auto") else "")
                    if m in cells else "-" for m in methods]
            lines.append(f"| {PATTERNS[key[0]].name} | {key[1]} | {key[2]} | {key[3]} | "
                         + " | ".join(vals) + " |")
        lines.append("")
    if extras:
        bw, host, fp = extras["bandwidth"], extras["host_us"], extras["footprint"]
        lines += ["#### One GPU: what it can show", "",
                  f"- fused kARResidualRMSNorm at world size 1, {bw['shape']}: "
                  f"{bw['fused_us']:.0f} us, {bw['fused_GBps']:.0f} GB/s of essential traffic "
                  f"(x, residual in; residual_out, norm_out out) vs {bw['copy_GBps']:.0f} GB/s "
                  "for a device-to-device copy (read + write)",
                  f"- host overhead of one eager call: allreduce_fusion "
                  f"{host['allreduce_fusion']:.1f} us vs torch.add {host['torch_add']:.1f} us",
                  f"- symmetric memory per rank for {fp['config']}: trtllm "
                  f"{fp['trtllm'] / 2**20:.0f} MiB, mnnvl {fp['mnnvl'] / 2**20:.0f} MiB "
                  f"({fp['mnnvl_force_oneshot'] / 2**20:.0f} MiB with force_oneshot_support), "
                  f"FlashInfer trtllm formula {fp['flashinfer_trtllm'] / 2**20:.0f} MiB", ""]
        t, h = TP_SHAPE
        for r in extras.get("tp_layer", []):
            lines.append(f"- TP block ({t} tokens, hidden {h}, intermediate {4 * h}), "
                         f"{r['method']}, {r['world_size']} ranks ({r['mode']}): "
                         f"{r['us']:.1f} us per block, output rel. error vs the single-GPU "
                         f"model {r['rel_err']:.1e}")
        lines.append("")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["mode"], r["pattern"], r["dtype"], r["hidden"]) for r in rows})
    cols = min(3, len(groups))
    nrows = -(-len(groups) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4 * nrows), squeeze=False)
    for ax, (mode, pattern, dtype, hidden) in zip(axes.flat, groups, strict=False):
        part = [r for r in rows if (r["mode"], r["pattern"], r["dtype"], r["hidden"])
                == (mode, pattern, dtype, hidden)]
        for method in sorted({r["method"] for r in part}):
            pts = sorted((r["tokens"], r["us"]) for r in part if r["method"] == method)
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="us per call",
               title=f"{PATTERNS[pattern].name} {dtype} H={hidden} ({mode})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


TUNE_MARGIN = 1.10  # one-shot is "clearly slower" once it takes 10% longer than two-shot


def tune(rows: list[dict], world: int, header: dict, path: Path) -> dict[int, int]:
    """Re-derive the one-shot threshold for `world` from measured rows and write it into
    heuristics.py (`path`).

    Per series (backend, pattern, hidden, dtype), walking up the token counts, the
    threshold is the last size before forced one-shot first takes more than
    TUNE_MARGIN times forced two-shot (sizes where both are within noise keep
    one-shot); the table gets the smallest threshold over all series, in bytes per rank.
    """
    def series(r):
        return (r["method"].rsplit(" ", 1)[0], r["pattern"], r["hidden"], r["dtype"])

    twoshot = {(series(r), r["tokens"]): r["us"] for r in rows
               if r["world_size"] == world and r["method"].endswith("twoshot")}
    oneshot: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["world_size"] == world and r["method"].endswith("oneshot") and \
                (series(r), r["tokens"]) in twoshot:
            oneshot.setdefault(series(r), []).append(r)
    limits = []
    for key, points in oneshot.items():
        limit = 0
        for r in sorted(points, key=lambda r: r["tokens"]):
            if r["us"] > TUNE_MARGIN * twoshot[(key, r["tokens"])]:
                break
            limit = r["tokens"] * r["hidden"] * getattr(torch, r["dtype"]).itemsize
        limits.append(limit)
    table = dict(heuristics.ONESHOT_MAX_BYTES)
    if not limits:
        return table
    table[world] = min(limits)
    mode = next(r["mode"] for r in rows if r["world_size"] == world)
    note = (f"# Tuned by `python -m arfusion bench --tune` on {header['card']}, "
            f"{header['date']}: world size {world} from {mode} measurements.\n")
    src = re.sub(r"# Tuned by .*\n", "", path.read_text())
    body = "".join(f"    {w}: {v},\n" for w, v in sorted(table.items()))
    src = re.sub(r"ONESHOT_MAX_BYTES: dict\[int, int\] = \{\n(?:    .*\n)*?\}",
                 lambda _: note + "ONESHOT_MAX_BYTES: dict[int, int] = {\n" + body + "}", src)
    path.write_text(src)
    return table


TP_SHAPE = (64, 4096)  # tokens, hidden of the TP block (intermediate 4 * hidden)
# bf16 block vs the single-GPU model: sharded partial sums round differently, so a few
# bf16 ulps (2^-8 relative) of difference are expected; anything larger is a bug.
TP_TOLERANCE = 2e-2


def _process_rank(rank: int, world: int, args, dtypes, backends) -> dict:
    """One process per GPU (started by run_processes over NCCL): arfusion over symmetric
    memory and the baselines on the real process group."""
    stream = torch.cuda.Stream()
    ctx = testing.RankContext(rank, world, TorchDistBackend(),
                              torch.device("cuda", torch.cuda.current_device()), stream)
    rows, tp = [], []
    with torch.cuda.stream(stream):
        for dtype in dtypes:
            name = str(dtype).removeprefix("torch.")
            rows += [dict(r, dtype=name) for r in _arfusion_rows(ctx, args, dtype, backends)
                     + _baseline_rows(args, dtype, ctx) + _flashinfer_rows(ctx, args, dtype)]
        if args.tp_layer:
            tp = [dict(_tp_block(ctx, *TP_SHAPE, dtypes[0], args.calls, args.replays, fused),
                       method=method, world_size=world, mode="processes")
                  for method, fused in (("arfusion", True), ("nccl + separate ops", False))]
    return dict(rows=rows, tp=tp)


def _on_one_gpu(args, dtypes, backends) -> tuple[list[dict], list[dict]]:
    """World size 1 with baselines, then the N ranks as threads (emulation)."""
    rows, tp = [], []
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        world1 = testing.run_ranks(1, _arfusion_rows, args, dtype, backends, device="cuda:0")
        with _world1_group():
            base = _baseline_rows(args, dtype)
            base += testing.run_ranks(1, _flashinfer_rows, args, dtype, device="cuda:0")[0]
        rows += [dict(r, dtype=name) for r in _merge_ranks(world1, 1, "world-1")]
        rows += [dict(r, dtype=name, world_size=1, mode="world-1") for r in base]
        if args.world_size > 1:
            emulated = testing.run_ranks(args.world_size, _arfusion_rows, args, dtype, backends,
                                         device="cuda:0")
            rows += [dict(r, dtype=name)
                     for r in _merge_ranks(emulated, args.world_size, "emulation")]
    if args.tp_layer:
        block = (*TP_SHAPE, dtypes[0], args.calls, args.replays)
        for world, mode in ((1, "world-1"), (args.world_size, "emulation")):
            results = testing.run_ranks(world, _tp_block, *block, True, device="cuda:0")
            tp.append(dict(method="arfusion", world_size=world, mode=mode,
                           us=max(r["us"] for r in results),
                           rel_err=max(r["rel_err"] for r in results)))
        with _world1_group():
            nccl = testing.run_ranks(1, _tp_block, *block, False, device="cuda:0")[0]
        tp.append(dict(nccl, method="nccl + separate ops", world_size=1, mode="world-1"))
    return rows, tp


def main(args: argparse.Namespace) -> int:
    if args.tune_from:
        saved = json.loads(Path(args.tune_from).read_text())
        table = tune(saved["rows"], saved["header"]["world_size"], saved["header"],
                     Path(heuristics.__file__))
        print(f"heuristics.ONESHOT_MAX_BYTES <- {table}")
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("bench needs a CUDA GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtypes = [DTYPES[d] for d in args.dtype.split(",")]
    backends = args.backends.split(",")
    header = _header(args.world_size)
    # Cyclic garbage collection could free a CUDA graph while a rank thread captures
    # another one (not allowed); graphs are freed explicitly instead (time_graph).
    gc.disable()
    if args.processes or torch.cuda.device_count() >= args.world_size > 1:
        by_rank = testing.run_processes(args.world_size, _process_rank, args, dtypes, backends,
                                        backend="nccl", timeout_s=3000)
        rows = _merge_ranks([r["rows"] for r in by_rank], args.world_size, "processes")
        tp = [dict(row, us=max(r["tp"][i]["us"] for r in by_rank),
                   rel_err=max(r["tp"][i]["rel_err"] for r in by_rank))
              for i, row in enumerate(by_rank[0]["tp"])]
    else:
        rows, tp = _on_one_gpu(args, dtypes, backends)
    extras = _extras(args, dtypes[0])
    extras["tp_layer"] = tp
    if args.tune:
        table = tune(rows, args.world_size, header, Path(heuristics.__file__))
        extras["tuned_oneshot_max_bytes"] = table
        print(f"heuristics.ONESHOT_MAX_BYTES <- {table}")
    bad_tp = [r for r in tp if not r["rel_err"] < TP_TOLERANCE]
    md = _markdown(header, rows, extras)
    (out / "bench.md").write_text(md + "\n")
    (out / "bench.json").write_text(json.dumps(dict(header=header, rows=rows, extras=extras),
                                               indent=1))
    _plot(rows, out / "bench.png")
    print(md)
    for r in bad_tp:
        print(f"TP block output of {r['method']} ({r['mode']}) differs from the single-GPU "
              f"model: relative error {r['rel_err']:.2e} >= {TP_TOLERANCE}")
    return 1 if bad_tp else 0
