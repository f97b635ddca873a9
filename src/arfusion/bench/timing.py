"""How the bench measures: CUDA-graph medians, one rank or every rank in one graph, host
cost, copy bandwidth, and the bytes each strategy must move (the roofline)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from .. import testing
from ..patterns import PATTERNS, Quant

WARMUP_REPLAYS = 3


def _median_replay_us(graph, stream: torch.cuda.Stream, calls: int,
                      replays: int, before: Callable[[], None] = lambda: None) -> float:
    times = []
    for _ in range(replays + WARMUP_REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream.synchronize()
        before()
        start.record(stream)
        graph.replay()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times[WARMUP_REPLAYS:])


def time_graph(step: Callable[[], None], calls: int, replays: int,
               ctx: testing.RankContext | None = None) -> float:
    """Median microseconds per call of `step` (which issues `calls` calls), replayed as
    a CUDA graph; with `ctx` (one process per rank), every rank captures its own graph
    and the ranks meet before each replay."""
    if ctx is None:
        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return _median_replay_us(graph, torch.cuda.current_stream(), calls, replays)
    graph = testing.capture_graph(ctx, step)
    us = _median_replay_us(graph, ctx.stream, calls, replays, ctx.comm.barrier)
    del graph
    ctx.comm.barrier()
    return us


def time_ranks_graph(calls_by_rank: list[list[Callable[[], None]]], replays: int,
                     check: Callable[[], None] = lambda: None) -> float:
    """Every rank of this process at once: rank r's calls (`calls_by_rank[r]`) are
    captured into a graph of their own on rank r's stream, and a replay launches all N
    graphs back to back from this thread between a fork and a join event (a few us of
    skew between ranks, no thread scheduling). Returns the median us per call of the
    whole (fork to join, over the calls per rank).

    One graph holding every rank as a branch was tried first and stalls: CUDA does not
    promise that independent branches run at the same time, and a rank that waits for
    a peer serialised behind it never finishes. Separate launches on separate streams
    (as the eager warm-up below, issued call by call across the ranks) do run together.
    """
    main = torch.cuda.Stream()
    streams = [torch.cuda.Stream() for _ in calls_by_rank]

    def fork_join(body: Callable[[], None]) -> None:
        fork = torch.cuda.Event()
        fork.record(main)
        for stream in streams:
            stream.wait_event(fork)
        body()
        for stream in streams:
            done = torch.cuda.Event()
            done.record(stream)
            main.wait_event(done)

    def eager() -> None:
        for batch in zip(*calls_by_rank, strict=True):
            for stream, call in zip(streams, batch, strict=True):
                with torch.cuda.stream(stream):
                    call()

    with torch.cuda.stream(main):
        fork_join(eager)  # every rank's kernels run concurrently on their streams
    torch.cuda.synchronize()
    check()  # a stalled eager run must not be captured
    graphs = []
    for stream, calls in zip(streams, calls_by_rank, strict=True):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for call in calls:
                call()
        graphs.append(graph)

    def replay_all() -> None:
        for stream, graph in zip(streams, graphs, strict=True):
            with torch.cuda.stream(stream):
                graph.replay()

    class _AllRanks:  # what _median_replay_us replays
        def replay(self) -> None:
            fork_join(replay_all)

    torch.cuda.synchronize()
    us = _median_replay_us(_AllRanks(), main, len(calls_by_rank[0]), replays)
    check()  # a replay that stalled leaves the workspaces aborted: its time means nothing
    return us


def host_us(fns: dict[str, Callable[[], object]], blocks: int = 9,
            n: int = 250) -> dict[str, float]:
    """Host microseconds per eager call of each of `fns`: the median over `blocks`
    blocks of `n` calls, the functions taking turns block by block, so that all see the
    same host (one long block per function let a busy moment land on one of them:
    the same build measured 19.6 and 52.5 us). The device is synchronised only between
    blocks, and kept busy enough within one not to throttle the host."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(50):
            fn()
    for _ in range(blocks):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - start) / n * 1e6)
    sync()
    return {name: statistics.median(t) for name, t in times.items()}


def copy_us(src: torch.Tensor, dst: torch.Tensor, calls: int, replays: int) -> float:
    """Median us per copy of `src` (int64) into `dst`, `calls` copies per graph: the
    faster of torch's `copy_` and a plain Triton copy kernel. Both count: in a graph
    `copy_` becomes a memcpy node, which measured 2.42 TB/s on an H100 where the fused
    kernels moved 2.95, and a slow copy would flatter every roofline share."""
    from ..kernels.copy import copy

    memcpy = time_graph(lambda: [dst.copy_(src) for _ in range(calls)], calls, replays)
    kernel = time_graph(lambda: [copy(src, dst) for _ in range(calls)], calls, replays)
    return min(memcpy, kernel)


def copy_gbps(nbytes: int = 1 << 30, replays: int = 20) -> float:
    """Device-to-device copy bandwidth, bytes read plus bytes written, GB/s (8-byte
    elements: a byte-wise copy runs slower and would flatter the roofline shares)."""
    src = torch.empty(nbytes // 8, dtype=torch.int64, device="cuda")
    return 2 * nbytes / copy_us(src, torch.empty_like(src), 1, replays) / 1e3


def epilogue_bytes(pattern: int, t: int, h: int, itemsize: int) -> int:
    """Bytes the pattern must read and write besides the exchange: x, and residual_in,
    residual_out, norm_out, quantised output and scales as the pattern has them (output
    for kAllReduce)."""
    traits = PATTERNS[pattern]
    e = t * h
    moved = 2 * e * itemsize  # read x; write output (kAllReduce) or residual_out
    if traits.norm:
        moved += e * itemsize  # residual_in
    if traits.norm_out:
        moved += e * itemsize
    moved += {Quant.NONE: 0, Quant.FP8: e, Quant.DYNAMIC_FP8: e + 4 * t,
              Quant.NVFP4: e // 2 + e // 16}[traits.quant]
    return moved


def lamport_bytes(world: int, t: int, h: int, itemsize: int, oneshot: bool) -> int:
    """Bytes the exchange adds per rank (local HBM traffic when ranks share a GPU).
    One-shot: write N copies, poll-read N slots, clear N slots: 3*N*E. Two-shot:
    scatter-write E, reduce-read E, gather-write E, gather-read E, clear 2E: 6*E."""
    if world == 1:
        return 0
    e = t * h * itemsize
    return 3 * world * e if oneshot else 6 * e
