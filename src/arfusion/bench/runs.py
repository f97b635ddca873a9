"""The bench's measurements, one function per way of placing the ranks.

- `world1_rows`: one rank on one GPU: arfusion's local kernel against the compiled
  epilogue, NCCL / symmetric memory + that epilogue, and a copy of the same bytes.
- `emulated_rows`: N ranks as N streams of this process on one GPU, every rank's
  graph launched from one thread (no thread skew); their exchange is local HBM traffic.
  With them, the harness's floor: the same streams running world-size-1 calls, and at
  1 token what the call signature costs (the same calls with and without it).
- `process_rows`: one process per rank (one GPU each over NCCL and symmetric
  memory, or several on one GPU under MPS over CUDA IPC), max over ranks; FlashInfer's
  own kernels beside arfusion's where it imports (flashinfer.py).
- `tp_block`: a tensor-parallel block around the fused call, checked and timed.

Every row carries `us` (median per call) and, where the bytes are known, `roofline`:
the time a copy of the bytes the call must move takes at the measured copy bandwidth,
over `us` (1.0 = at the memory roofline).
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
from collections.abc import Iterator

import torch

from .. import reference, testing
from ..api import allreduce_fusion, create_allreduce_fusion_workspace
from ..comm import InProcessBackend, InProcessGroup, TorchDistBackend
from ..patterns import PATTERNS, Quant, pattern_supports
from ..testing import Case, case_kwargs, case_outputs
from . import baselines, flashinfer
from .timing import (
    copy_us,
    epilogue_bytes,
    host_us,
    lamport_bytes,
    time_graph,
    time_ranks_graph,
    time_ranks_graphs,
)

STRATEGIES = {None: "auto", True: "oneshot", False: "twoshot"}
SCALE = {Quant.FP8: 0.05, Quant.NVFP4: 400.0}


def _case(pattern: int, t: int, h: int, dtype: torch.dtype) -> Case:
    return Case(pattern, t, h, dtype, scale_factor=SCALE.get(PATTERNS[pattern].quant, 1.0))


def _shapes(args, dtype):
    for pattern, h, t in itertools.product(args.patterns, args.hidden, args.tokens):
        if pattern_supports(pattern, h, dtype):
            yield _case(pattern, t, h, dtype)


class _Calls:
    """One rank's `calls` calls of a case, each on its own input and residual (so no
    call finds its data in L2), with shared outputs."""

    def __init__(self, case: Case, rank: int, calls: int, device="cuda"):
        self.case = case
        self.sets = []
        for i in range(calls):
            rotated = Case(case.pattern, case.num_tokens, case.hidden_dim, case.dtype,
                           seed=i, scale_factor=case.scale_factor)
            self.sets.append((rotated.input(rank, device),
                              rotated.own(rank, device)["residual_in"]))
        self.out = case_outputs(case, device, with_output=False)
        self.kw = case_kwargs(case, device, rank)
        self.kw.pop("residual_in", None)
        self.gamma = case.own(rank, device)["rms_gamma"]

    def one(self, ws, i: int, use_oneshot=None) -> None:
        """Call i (on input set i)."""
        x, residual = self.sets[i]
        extra = {"residual_in": residual} if PATTERNS[self.case.pattern].norm else {}
        allreduce_fusion(x, ws, self.case.pattern, use_oneshot=use_oneshot, **self.out,
                         **self.kw, **extra)

    def fused(self, ws, use_oneshot=None) -> None:
        for i in range(len(self.sets)):
            self.one(ws, i, use_oneshot)

    def baseline(self, epilogue, reduce=None) -> None:
        for x, residual in self.sets:
            epilogue(x if reduce is None else reduce(x), residual, self.gamma)


def _row(method, case, us, world, mode, strategy="-", moved=None, copy=None) -> dict:
    return dict(method=method, pattern=case.pattern, hidden=case.hidden_dim,
                tokens=case.num_tokens, dtype=str(case.dtype).removeprefix("torch."),
                strategy=strategy, us=us, world_size=world, mode=mode,
                roofline=None if moved is None else moved / copy / 1e3 / us)


def world1_rows(args, dtype, copy: float) -> list[dict]:
    """World size 1 on one GPU, every baseline in the same run."""
    comm = InProcessGroup(1).backends()[0]
    rows = []
    with contextlib.ExitStack() as stack:
        ws = stack.enter_context(create_allreduce_fusion_workspace(
            "trtllm", world_size=1, rank=0, max_token_num=max(args.tokens),
            hidden_dim=max(args.hidden), dtype=dtype, comm_backend=comm))
        stack.enter_context(baselines.world1_group())
        reducers = baselines.reducers()
        for case in _shapes(args, dtype):
            calls = _Calls(case, 0, args.calls)
            moved = epilogue_bytes(case.pattern, case.num_tokens, case.hidden_dim,
                                   dtype.itemsize)
            us = time_graph(lambda c=calls: c.fused(ws), args.calls, args.replays)
            rows.append(_row("arfusion", case, us, 1, "world-1", moved=moved, copy=copy))
            epilogue = baselines.epilogue_fn(case.pattern, dtype, case.scale_factor)
            try:
                us = time_graph(lambda e=epilogue, c=calls: c.baseline(e), args.calls,
                                args.replays)
                rows.append(_row("torch.compile epilogue", case, us, 1, "world-1",
                                 moved=moved, copy=copy))
                for name, reduce in reducers.items():
                    us = time_graph(lambda e=epilogue, r=reduce, c=calls: c.baseline(e, r),
                                    args.calls, args.replays)
                    rows.append(_row(f"{name} + compiled epilogue", case, us, 1, "world-1"))
            except Exception as e:  # noqa: BLE001 - reported, then left out
                print(f"baseline failed for {case.label()}: {type(e).__name__}: {e}")
            # half the bytes moved, read then written, whole 16-element groups (16-byte
            # accesses in the Triton copy)
            src = torch.empty(-(-moved // 256) * 16, dtype=torch.int64, device="cuda")
            dst = torch.empty_like(src)
            us = copy_us(src, dst, args.calls, args.replays)
            rows.append(_row("copy of the same bytes", case, us, 1, "world-1", moved=moved,
                             copy=copy))
    return rows


def _emulated_workspaces(args, dtype, backend: str, max_token_num: int | None = None) -> list:
    n = args.world_size
    wss = testing.run_ranks(n, lambda ctx: create_allreduce_fusion_workspace(
        backend, world_size=n, rank=ctx.rank, max_token_num=max_token_num or max(args.tokens),
        hidden_dim=max(args.hidden), dtype=dtype, comm_backend=ctx.comm,
        force_oneshot_support=True), device="cuda:0")
    for ws in wss:
        ws.timeout_s = EMULATION_TIMEOUT_S
    return wss


def _destroy(wss: list) -> None:
    testing.run_ranks(len(wss), lambda ctx: wss[ctx.rank].destroy(), device="cuda:0")


EMULATION_TIMEOUT_S = 10.0  # a stalled emulated row costs this, not the default 30 s


def emulated_rows(args, dtype, backends, copy: float) -> list[dict]:
    """N ranks as N streams of this process on one GPU (timing.time_ranks_graph). A row
    whose ranks stall is reported and left out (its workspaces are recreated)."""
    n = args.world_size
    rows = []
    for backend in backends:
        wss = _emulated_workspaces(args, dtype, backend)
        for case in _shapes(args, dtype):
            t, h = case.num_tokens, case.hidden_dim
            ranks = [_Calls(case, r, args.calls) for r in range(n)]
            for oneshot in (None, True, False):
                if not wss[0].is_buffer_size_sufficient(n, t, h, dtype, oneshot):
                    continue
                for r in range(n):  # build the kernels first (nothing launches)
                    with wss[r].compile_only():
                        ranks[r].one(wss[r], 0, oneshot)
                steps = [[lambda c=ranks[r], w=wss[r], i=i, o=oneshot: c.one(w, i, o)
                          for i in range(args.calls)] for r in range(n)]
                label = f"{n} ranks {backend} {STRATEGIES[oneshot]} {case.label()}"
                try:
                    captures = time_ranks_graphs([steps], args.replays,
                                                 [lambda w=wss: [ws.check() for ws in w]])[0]
                    us = statistics.median(captures)
                except RuntimeError as e:
                    print(f"emulated row left out: {label}: {e}", flush=True)
                    _destroy(wss)
                    wss = _emulated_workspaces(args, dtype, backend)
                    continue
                used = wss[0].picks_oneshot(t * h, oneshot)
                moved = n * (epilogue_bytes(case.pattern, t, h, dtype.itemsize)
                             + lamport_bytes(n, t, h, dtype.itemsize, used))
                rows.append(_row(f"arfusion {backend} {STRATEGIES[oneshot]}", case, us, n,
                                 "emulation", STRATEGIES[used], moved, copy))
                print(f"{label}: {us:.1f} us (captures: "
                      + ", ".join(f"{c:.1f}" for c in captures) + ")", flush=True)
        _destroy(wss)
        rows += _signature_rows(args, dtype, backend)
    return rows + _harness_floor_rows(args, dtype)


SIGNATURE_ROUNDS = 20  # single captures of emulated ranks stray by microseconds at N = 8
SIGNATURE = "signature"  # the rows' mode


def _signature_rows(args, dtype, backend: str) -> list[dict]:
    """At 1 token, what the call signature costs: each case's calls (strategy auto),
    checking it and skipping it (`without_signature`: timing only) on the same
    workspaces, taking turns on the same streams, each round captured anew
    (time_ranks_graphs); the cost is the median of the rounds' differences. (A second
    set of workspaces puts the same calls in other buffers: identical kernels in two
    sets measured 0.1 us apart at N = 8 x 4096 on an H100, a third of the cost there.)"""
    n = args.world_size
    cases = [c for c in _shapes(args, dtype) if c.num_tokens == 1]
    if not cases:
        return []
    wss = _emulated_workspaces(args, dtype, backend, max_token_num=1)
    rows = []
    for case in cases:
        oneshot = wss[0].picks_oneshot(case.hidden_dim)
        ranks = [_Calls(case, r, args.calls) for r in range(n)]
        kinds = (_Calls.one, _unsigned)  # with the signature, without it
        for r in range(n):
            for call in kinds:
                with wss[r].compile_only():
                    call(ranks[r], wss[r], 0, oneshot)
        variants = [[[lambda f=call, c=ranks[r], ws=wss[r], i=i, o=oneshot: f(c, ws, i, o)
                      for i in range(args.calls)] for r in range(n)] for call in kinds]
        checks = [lambda: [ws.check() for ws in wss]] * 2
        try:
            signed, unsigned = time_ranks_graphs(variants, args.replays, checks,
                                                 SIGNATURE_ROUNDS)
        except RuntimeError as e:
            print(f"signature rows left out: {n} ranks {backend} {case.label()}: {e}",
                  flush=True)
            break  # a stalled workspace is aborted: the rest would stall too
        diffs = [a - b for a, b in zip(signed, unsigned, strict=True)]
        cost = statistics.median(diffs)
        q1, _, q3 = statistics.quantiles(diffs, n=4)
        signed, unsigned = statistics.median(signed), statistics.median(unsigned)
        rows += [_row(method, case, us, n, SIGNATURE, STRATEGIES[oneshot]) for method, us in (
            (f"{backend} with signature", signed), (f"{backend} without (timing only)", unsigned),
            (f"{backend} signature cost", cost))]
        print(f"{n} ranks {backend} {case.label()}: signature {cost:+.2f} us "
              f"({signed:.2f} vs {unsigned:.2f}; rounds' differences, middle half "
              f"{q1:+.2f} to {q3:+.2f})", flush=True)
    _destroy(wss)
    return rows


def _unsigned(calls: _Calls, ws, i: int, oneshot: bool) -> None:
    """Call i of `calls` without the signature (timing only)."""
    with ws.without_signature():
        calls.one(ws, i, oneshot)


HARNESS_FLOOR = "no exchange: N x world size 1"


def _harness_floor_rows(args, dtype) -> list[dict]:
    """What the emulation costs before any exchange: every rank's stream runs world-size-1
    calls of the case (a workspace of its own, no peer), timed as the ranks are. At few
    tokens the N streams' small kernels do not fully overlap, so this, not the exchange,
    is most of an emulated N-rank call."""
    rows = []
    with contextlib.ExitStack() as stack:
        wss = [stack.enter_context(create_allreduce_fusion_workspace(
            "trtllm", world_size=1, rank=0, max_token_num=max(args.tokens),
            hidden_dim=max(args.hidden), dtype=dtype,
            comm_backend=InProcessGroup(1).backends()[0])) for _ in range(args.world_size)]
        for case in _shapes(args, dtype):
            ranks = [_Calls(case, r, args.calls) for r in range(args.world_size)]
            steps = [[lambda c=c, w=w, i=i: c.one(w, i) for i in range(args.calls)]
                     for c, w in zip(ranks, wss, strict=True)]
            rows.append(_row(HARNESS_FLOOR, case, time_ranks_graph(steps, args.replays),
                             args.world_size, "emulation"))
    return rows


def process_rows(ctx: testing.RankContext, args, dtype, backends, mode: str) -> list[dict]:
    """This rank's rows when every rank is a process (one GPU each, or MPS): arfusion
    (symmetric memory or CUDA IPC, as `create_allreduce_fusion_workspace` picks), and
    the NCCL baselines when each rank has its own GPU."""
    rows = []
    comm = ctx.comm if isinstance(ctx.comm, InProcessBackend) else None
    for backend in backends:
        with create_allreduce_fusion_workspace(
                backend, world_size=ctx.world_size, rank=ctx.rank,
                max_token_num=max(args.tokens), hidden_dim=max(args.hidden), dtype=dtype,
                comm_backend=comm, force_oneshot_support=True,
                gpus_per_node=ctx.world_size if mode == "mps" else None) as ws:
            for case in _shapes(args, dtype):
                calls = _Calls(case, ctx.rank, args.calls)
                for oneshot in (None, True, False):
                    with ws.compile_only():
                        calls.one(ws, 0, oneshot)
                    us = time_graph(lambda o=oneshot, c=calls: c.fused(ws, o), args.calls,
                                    args.replays, ctx)
                    used = ws.picks_oneshot(case.num_tokens * case.hidden_dim, oneshot)
                    rows.append(_row(f"arfusion {backend} {STRATEGIES[oneshot]}", case, us,
                                     ctx.world_size, mode, STRATEGIES[used]))
    fc = flashinfer.module()
    if fc is not None:
        rows += _flashinfer_rows(fc, ctx, args, dtype, mode)
    if mode == "processes":
        for case in _shapes(args, dtype):
            calls = _Calls(case, ctx.rank, args.calls)
            epilogue = baselines.epilogue_fn(case.pattern, dtype, case.scale_factor)
            for name, reduce in baselines.reducers().items():
                us = time_graph(lambda e=epilogue, r=reduce, c=calls: c.baseline(e, r),
                                args.calls, args.replays, ctx)
                rows.append(_row(f"{name} + compiled epilogue", case, us, ctx.world_size,
                                 mode))
    return rows


def _flashinfer_rows(fc, ctx: testing.RankContext, args, dtype, mode: str) -> list[dict]:
    """FlashInfer's trtllm kernels (bench/flashinfer.py), one-shot and two-shot (its
    two-shot needs more tokens than ranks), each case's first call compared with
    arfusion's on the same inputs. A hung case is recorded and ends the rows."""
    fws = flashinfer.workspace(fc, ctx.rank, ctx.world_size, max(args.tokens),
                               max(args.hidden), dtype)
    rows = []
    with create_allreduce_fusion_workspace(
            "trtllm", world_size=ctx.world_size, rank=ctx.rank,
            max_token_num=max(args.tokens), hidden_dim=max(args.hidden), dtype=dtype,
            gpus_per_node=ctx.world_size if mode == "mps" else None) as ws:
        for case in (c for c in _shapes(args, dtype) if flashinfer.runs_pattern(c.pattern)):
            calls = _Calls(case, ctx.rank, args.calls)
            fi = flashinfer.Calls(fc, calls, ctx.device)
            ours = case_outputs(case, ctx.device)
            kw = case_kwargs(case, ctx.device, ctx.rank)
            with ws.compile_only():  # then every rank runs it: arfusion's outputs to compare
                allreduce_fusion(calls.sets[0][0], ws, case.pattern, **ours, **kw)
            ctx.comm.barrier()
            allreduce_fusion(calls.sets[0][0], ws, case.pattern, **ours, **kw)
            ref = case.reference(ctx.world_size, ctx.device, ctx.rank)
            for oneshot in (True, False):
                if not oneshot and case.num_tokens <= ctx.world_size:
                    continue
                method = f"flashinfer {STRATEGIES[oneshot]}"
                ctx.comm.barrier()
                if not fi.finishes(fws, oneshot):
                    print(f"[rank {ctx.rank}] {method} {case.label()} did not finish within "
                          f"{flashinfer.HANG_S:.0f} s: recorded as hung, no more FlashInfer "
                          "rows", flush=True)
                    return rows + [dict(_row(method, case, float("nan"), ctx.world_size, mode),
                                        hung=True)]
                agree = flashinfer.compare(fi.out, ours, ref, case.pattern)
                us = time_graph(lambda f=fi, o=oneshot: f.all(fws, o), args.calls,
                                args.replays, ctx)
                rows.append(dict(_row(method, case, us, ctx.world_size, mode,
                                      STRATEGIES[oneshot]), agree=agree))
    return rows


def process_rank(rank: int, world: int, args, dtypes, backends, mode: str) -> dict:
    """Entry point of a rank process (started by testing.run_processes)."""
    stream = torch.cuda.Stream()
    ctx = testing.RankContext(rank, world, TorchDistBackend(),
                              torch.device("cuda", torch.cuda.current_device()), stream)
    with torch.cuda.stream(stream):
        rows = [r for dtype in dtypes for r in process_rows(ctx, args, dtype, backends, mode)]
        tp = []
        if args.tp_layer and mode == "processes":
            tp = [dict(tp_block(ctx, *TP_SHAPE, dtypes[0], args.calls, args.replays, fused),
                       method=method, world_size=world, mode=mode)
                  for method, fused in (("arfusion", True), ("nccl + separate ops", False))]
    return dict(rows=rows, tp=tp)


@contextlib.contextmanager
def host_probe(dtype: torch.dtype) -> Iterator[tuple]:
    """The call whose host cost the bench reports: a world-size-1 workspace, then the
    input, outputs and keyword arguments of one 8 x 4096 kARResidualRMSNorm call."""
    comm = InProcessGroup(1).backends()[0]
    with create_allreduce_fusion_workspace("trtllm", world_size=1, rank=0, max_token_num=8,
                                           hidden_dim=4096, dtype=dtype,
                                           comm_backend=comm) as ws:
        case = _case(1, 8, 4096, dtype)
        yield ws, case.input(0, "cuda"), case_outputs(case, "cuda", False), \
            case_kwargs(case, "cuda", 0)


def host_costs(dtype) -> dict:
    """Eager host microseconds of one call (host_probe) next to a torch.add_ in the same
    process."""
    with host_probe(dtype) as (ws, x, o, k):
        a = torch.ones(8, 4096, dtype=dtype, device="cuda")
        return host_us(dict(allreduce_fusion=lambda: allreduce_fusion(x, ws, 1, **o, **k),
                            torch_add_=lambda: a.add_(a)))


# One process from workspace creation to its first completed call (CUDA context made
# first, not counted): kARResidualRMSNorm, 16 x 4096 bf16, world size 1.
_FIRST_CALL = """
import sys, time, torch
torch.cuda.init()
start = time.perf_counter()
from arfusion import allreduce_fusion, create_allreduce_fusion_workspace
ws = create_allreduce_fusion_workspace("trtllm", world_size=1, rank=0, max_token_num=16,
                                       hidden_dim=4096, dtype=torch.bfloat16)
x = torch.randn(16, 4096, dtype=torch.bfloat16, device="cuda")
allreduce_fusion(x, ws, 1, residual_in=torch.zeros_like(x), rms_gamma=torch.ones_like(x[0]))
torch.cuda.synchronize()
print(time.perf_counter() - start)
ws.destroy()
"""


def cold_start() -> dict:
    """Seconds from creating a workspace to the first completed call, in a new process:
    cold (empty Triton cache: everything compiles) and warm (the same cache again)."""
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        times = [float(subprocess.run([sys.executable, "-c", _FIRST_CALL], env=env,
                                      check=True, capture_output=True,
                                      text=True).stdout.split()[-1]) for _ in range(2)]
    return dict(cold_s=times[0], warm_s=times[1])


TP_SHAPE = (64, 4096)  # tokens, hidden of the TP block (intermediate 4 * hidden)
# bf16 block vs the single-GPU model: sharded partial sums round differently, so a few
# bf16 ulps (2^-8 relative) of difference are expected; anything larger is a bug.
TP_TOLERANCE = 2e-2


def tp_block(ctx: testing.RankContext, t: int, h: int, dtype, calls: int, replays: int,
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
            comm = ctx.comm if isinstance(ctx.comm, InProcessBackend) else None
            ws = stack.enter_context(create_allreduce_fusion_workspace(
                "trtllm", world_size=n, rank=ctx.rank, max_token_num=t, hidden_dim=h,
                dtype=dtype, comm_backend=comm))
            res_out, norm_out = torch.empty_like(residual), torch.empty_like(residual)

            def middle(y):
                allreduce_fusion(y, ws, 1, residual_out=res_out, norm_out=norm_out,
                                 residual_in=residual, rms_gamma=gamma)
                return norm_out
        else:
            norm = torch.compile(lambda y: reference.rms_norm(
                (y.float() + residual.float()).to(dtype), gamma, 1e-6), fullgraph=True,
                dynamic=False)

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
