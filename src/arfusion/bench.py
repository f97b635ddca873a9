"""`python -m arfusion bench`: latency of arfusion against what users would pick instead.

Timing: every measurement is a CUDA graph of `--calls` back-to-back calls, each on
its own input set (so caches do not flatter), replayed `--replays` times after a
warm-up; the time per call is the median over replays of event time / calls, and
the maximum over ranks. Baselines run in the same process on the same card.

Where the ranks live decides what is measured:
- as many GPUs as ranks: one process per GPU (not in this module yet: the
  multi-GPU issue adds it);
- one GPU: the N ranks are threads of one process (emulation: their traffic is
  local memory, not NVLink, and they share the SMs). Emulated rows are labelled
  and never comparable with NVLink numbers. The baselines that exist on one GPU
  (NCCL and PyTorch symmetric memory at world size 1, each followed by the same
  epilogue compiled with torch.compile) are measured at world size 1 against
  arfusion at world size 1.

Also on one GPU: the fused epilogue's achieved bandwidth vs a device-to-device
copy, the host overhead of an eager call vs `torch.add`, the workspace footprint
vs FlashInfer's formula, and (`--tp-layer`) a tensor-parallel block.
`--tune` re-derives the one-shot threshold table of `heuristics.py`.
"""

from __future__ import annotations

import argparse
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
from .comm import InProcessGroup
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
    p.add_argument("--tune", action="store_true",
                   help="re-derive heuristics.ONESHOT_MAX_BYTES from this run and write it")


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


def _arfusion_rows(ctx: testing.RankContext, args, dtype, backends) -> list[dict]:
    """Every (backend, pattern, hidden, tokens, strategy) on this rank (threads)."""
    rows = []
    for backend in backends:
        with create_allreduce_fusion_workspace(
                backend, world_size=ctx.world_size, rank=ctx.rank,
                max_token_num=max(args.tokens), hidden_dim=max(args.hidden), dtype=dtype,
                comm_backend=ctx.comm) as ws:
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


# ---------------------------------------------------------------- baselines (world size 1)


def _epilogue_fn(pattern: int, dtype: torch.dtype):
    """The unfused epilogue after an all-reduce, compiled: residual + RMSNorm (+ quant)."""
    case = _case(pattern, 1, 1, dtype)

    def epilogue(s: torch.Tensor, residual: torch.Tensor, gamma: torch.Tensor):
        if not PATTERNS[pattern].norm:
            return {"output": s}
        return reference.epilogue(s.float(), dtype, pattern, residual_in=residual,
                                  rms_gamma=gamma, scale_factor=case.scale_factor, layout_code=0)

    return torch.compile(epilogue, dynamic=False)


def _baseline_rows(args, dtype) -> list[dict]:
    """NCCL all_reduce and symmetric-memory one_shot_all_reduce at world size 1, each
    followed by the compiled epilogue, in this process."""
    import torch.distributed as dist

    rows = []
    dist.init_process_group("nccl", init_method=f"file://{tempfile.mkdtemp()}/pg", rank=0,
                            world_size=1, device_id=torch.device("cuda", 0))
    try:
        reducers = {"nccl + compiled epilogue": dist.all_reduce}
        if (symm := _symm_mem_all_reduce()) is not None:
            reducers["symm_mem one_shot + compiled epilogue"] = symm
        epilogues = {p: _epilogue_fn(p, dtype) for p in args.patterns}
        for pattern, h, t in itertools.product(args.patterns, args.hidden, args.tokens):
            if pattern_supports(pattern, h, dtype):
                rows += _time_baselines(_case(pattern, t, h, dtype), epilogues[pattern],
                                        reducers, args)
    finally:
        dist.destroy_process_group()
    return rows


def _time_baselines(case: Case, epilogue, reducers: dict, args) -> list[dict]:
    """Each reducer + the compiled epilogue; a failing one is reported and left out."""
    xs = [_case(case.pattern, case.num_tokens, case.hidden_dim, case.dtype).input(101 * i,
                                                                                   "cuda")
          for i in range(args.calls)]
    kw = case.shared("cuda")
    rows = []
    for name, reduce in reducers.items():

        def step(reduce=reduce):
            for x in xs:
                y = reduce(x)  # NCCL reduces in place and returns None
                epilogue(x if y is None else y, kw["residual_in"], kw["rms_gamma"])

        try:
            us = time_graph(step, args.calls, args.replays)
        except Exception as e:  # noqa: BLE001 - reported, then left out
            print(f"baseline {name} failed for {case.label()}: {type(e).__name__}: {e}")
            continue
        rows.append(dict(method=name, pattern=case.pattern, hidden=case.hidden_dim,
                         tokens=case.num_tokens, strategy="-", us=us, world_size=1,
                         mode="world-1"))
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
                mnnvl=M.get_required_buffer_size_bytes(world, tokens, hidden, dtype),
                mnnvl_force_oneshot=M.get_required_buffer_size_bytes(world, tokens, hidden,
                                                                     dtype, True),
                flashinfer_trtllm=flashinfer)


# ---------------------------------------------------------------- TP layer


def _tp_rank(ctx: testing.RankContext, t: int, h: int, dtype, calls: int, replays: int):
    """Row-parallel down projection, fused all-reduce + residual + RMSNorm, column-parallel
    up projection; checked against the single-GPU model; timed as a CUDA graph."""
    n, inter = ctx.world_size, 4 * h
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(t, inter, generator=g, device="cuda").to(dtype)
    w_down = (torch.randn(inter, h, generator=g, device="cuda") / inter**0.5).to(dtype)
    w_up = (torch.randn(h, inter, generator=g, device="cuda") / h**0.5).to(dtype)
    residual = torch.randn(t, h, generator=g, device="cuda").to(dtype)
    gamma = torch.rand(h, generator=g, device="cuda").to(dtype) + 0.5
    k = inter // n
    a_r, wd_r = a[:, ctx.rank * k:(ctx.rank + 1) * k], w_down[ctx.rank * k:(ctx.rank + 1) * k]
    wu_r = w_up[:, ctx.rank * k:(ctx.rank + 1) * k]
    ws = create_allreduce_fusion_workspace("trtllm", world_size=n, rank=ctx.rank,
                                           max_token_num=t, hidden_dim=h, dtype=dtype,
                                           comm_backend=ctx.comm)
    with ws:
        res_out, norm = torch.empty_like(residual), torch.empty_like(residual)
        partial = torch.empty_like(residual)

        def block():
            torch.matmul(a_r, wd_r, out=partial)
            allreduce_fusion(partial, ws, 1, residual_out=res_out, norm_out=norm,
                             residual_in=residual, rms_gamma=gamma)
            return norm @ wu_r

        ctx.comm.barrier()
        z_r = block()
        ctx.stream.synchronize()
        want = reference.rms_norm((a @ w_down).float().add(residual.float()).to(dtype), gamma,
                                  1e-6) @ w_up[:, ctx.rank * k:(ctx.rank + 1) * k]
        err = ((z_r.float() - want.float()).norm() / want.float().norm()).item()
        us = time_graph(lambda: [block() for _ in range(calls)], calls, replays, ctx)
    return dict(rel_err=err, us=us)


def _tp_nccl(t, h, dtype, calls, replays):
    """The same block at world size 1 with NCCL and separate ops (torch.compile'd norm)."""
    import torch.distributed as dist

    tmp = tempfile.mkdtemp()
    dist.init_process_group("nccl", init_method=f"file://{tmp}/pg", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        inter = 4 * h
        a = torch.randn(t, inter, generator=g, device="cuda").to(dtype)
        w_down = (torch.randn(inter, h, generator=g, device="cuda") / inter**0.5).to(dtype)
        w_up = (torch.randn(h, inter, generator=g, device="cuda") / h**0.5).to(dtype)
        residual = torch.randn(t, h, generator=g, device="cuda").to(dtype)
        gamma = torch.rand(h, generator=g, device="cuda").to(dtype) + 0.5
        norm = torch.compile(lambda y, r, w: reference.rms_norm((y.float() + r.float())
                                                                .to(dtype), w, 1e-6))

        def block():
            y = a @ w_down
            dist.all_reduce(y)
            return norm(y, residual, gamma) @ w_up

        return dict(us=time_graph(lambda: [block() for _ in range(calls)], calls, replays))
    finally:
        dist.destroy_process_group()


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
    for (world, mode), title in (((header["world_size"], "emulation"),
                                  f"{header['world_size']} ranks as threads on one GPU "
                                  "(emulation, not NVLink)"),
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
        if "tp_layer" in extras:
            tp = extras["tp_layer"]
            lines += [f"- TP block {tp['shape']}: arfusion {tp['world']} ranks (emulation) "
                      f"{tp['emulated']['us']:.1f} us (rel. error vs single-GPU model "
                      f"{tp['emulated']['rel_err']:.1e}); world size 1: arfusion "
                      f"{tp['world1']['us']:.1f} us vs NCCL + separate ops "
                      f"{tp['nccl']['us']:.1f} us", ""]
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


def tune(rows: list[dict], world: int, header: dict, path: Path) -> dict[int, int]:
    """Largest per-rank bytes at which forced one-shot is still no slower than two-shot,
    for every hidden size and pattern measured; the minimum over them. Written into
    heuristics.py for `world`."""
    def key(r):
        return (r["method"].rsplit(" ", 1)[0], r["pattern"], r["hidden"], r["dtype"])

    twoshot = {(key(r), r["tokens"]): r["us"] for r in rows
               if r["world_size"] == world and r["method"].endswith("twoshot")}
    best: dict[tuple, int] = {}
    for r in rows:
        if r["world_size"] != world or not r["method"].endswith("oneshot"):
            continue
        two = twoshot.get((key(r), r["tokens"]))
        if two is not None and r["us"] <= two:
            nbytes = r["tokens"] * r["hidden"] * getattr(torch, r["dtype"]).itemsize
            best[key(r)] = max(best.get(key(r), 0), nbytes)
    if not best:
        return dict(heuristics.ONESHOT_MAX_BYTES)
    table = dict(heuristics.ONESHOT_MAX_BYTES)
    table[world] = min(best.values())
    src = path.read_text()
    body = "".join(f"    {w}: {v},\n" for w, v in sorted(table.items()))
    note = (f"# Tuned by `python -m arfusion bench --tune` on {header['card']}, "
            f"{header['date']}, world size {world} ({rows[0]['mode']}).\n")
    src = re.sub(r"# Tuned by .*\n", "", src)
    src = re.sub(r"ONESHOT_MAX_BYTES: dict\[int, int\] = \{\n(?:    .*\n)*?\}",
                 note + "ONESHOT_MAX_BYTES: dict[int, int] = {\n" + body + "}", src)
    path.write_text(src)
    return table


def main(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("bench needs a CUDA GPU")
    gpus = torch.cuda.device_count()
    if gpus >= args.world_size > 1:
        print(f"note: {gpus} GPUs; one process per GPU is not in this bench yet, running "
              "the ranks as threads on GPU 0 (emulation)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtypes = [DTYPES[d] for d in args.dtype.split(",")]
    backends = args.backends.split(",")
    header = _header(args.world_size)
    rows: list[dict] = []
    # Cyclic garbage collection could free a CUDA graph while a rank thread captures
    # another one (not allowed); graphs are freed explicitly instead (time_graph).
    gc.disable()
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        world1 = testing.run_ranks(1, _arfusion_rows, args, dtype, backends, device="cuda:0")
        rows += [dict(r, dtype=name) for r in _merge_ranks(world1, 1, "world-1")]
        rows += [dict(r, dtype=name) for r in _baseline_rows(args, dtype)]
        if args.world_size > 1:
            emulated = testing.run_ranks(args.world_size, _arfusion_rows, args, dtype, backends,
                                         device="cuda:0")
            rows += [dict(r, dtype=name)
                     for r in _merge_ranks(emulated, args.world_size, "emulation")]
    extras = _extras(args, dtypes[0])
    if args.tp_layer:
        t, h = 64, 4096
        world1 = testing.run_ranks(1, _tp_rank, t, h, dtypes[0], args.calls, args.replays,
                                   device="cuda:0")[0]  # first: compiles alone
        emulated = testing.run_ranks(args.world_size, _tp_rank, t, h, dtypes[0], args.calls,
                                     args.replays, device="cuda:0")
        extras["tp_layer"] = dict(
            shape=f"{t} tokens, hidden {h}, intermediate {4 * h}", world=args.world_size,
            emulated=dict(us=max(r["us"] for r in emulated),
                          rel_err=max(r["rel_err"] for r in emulated)),
            world1=world1, nccl=_tp_nccl(t, h, dtypes[0], args.calls, args.replays))
    if args.tune:
        table = tune(rows, args.world_size, header, Path(heuristics.__file__))
        extras["tuned_oneshot_max_bytes"] = table
        print(f"heuristics.ONESHOT_MAX_BYTES <- {table}")
    md = _markdown(header, rows, extras)
    (out / "bench.md").write_text(md + "\n")
    (out / "bench.json").write_text(json.dumps(dict(header=header, rows=rows, extras=extras),
                                               indent=1))
    _plot(rows, out / "bench.png")
    print(md)
    return 0
