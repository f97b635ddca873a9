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
CAPTURES = 3  # ranks sharing a GPU: each timing is the median of this many captures


def _replay_us(graph, stream: torch.cuda.Stream, calls: int, replays: int,
               before: Callable[[], None] = lambda: None) -> list[float]:
    """us per call of each of `replays` replays of `graph` on `stream` (after warm-up)."""
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
    return times[WARMUP_REPLAYS:]


def _median_replay_us(graph, stream: torch.cuda.Stream, calls: int,
                      replays: int, before: Callable[[], None] = lambda: None) -> float:
    return statistics.median(_replay_us(graph, stream, calls, replays, before))


def time_graph(step: Callable[[], None], calls: int, replays: int,
               ctx: testing.RankContext | None = None) -> float:
    """Median microseconds per call of `step` (which issues `calls` calls), replayed as
    a CUDA graph; with `ctx` (one process per rank), every rank captures its own graph
    and the ranks meet before each replay, CAPTURES times (the median of the captures'
    medians: ranks sharing a GPU settle into a pace per capture, see
    time_ranks_graphs)."""
    if ctx is None:
        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return _median_replay_us(graph, torch.cuda.current_stream(), calls, replays)
    medians = []
    for _ in range(CAPTURES):
        graph = testing.capture_graph(ctx, step)
        medians.append(_median_replay_us(graph, ctx.stream, calls, replays, ctx.comm.barrier))
        del graph
        ctx.comm.barrier()
    return statistics.median(medians)


_STREAMS: dict[int, list[torch.cuda.Stream]] = {}


def _rank_streams(n: int) -> list[torch.cuda.Stream]:
    """The fork/join stream and one per rank, the same for every timing of N ranks (so
    that which hardware queue a new stream lands on is not one more variable)."""
    if n not in _STREAMS:
        _STREAMS[n] = [torch.cuda.Stream() for _ in range(n + 1)]
    return _STREAMS[n]


class _RanksGraph:
    """Every rank of this process at once: rank r's calls are captured into a graph of
    their own on rank r's stream, and `replay` launches all N graphs back to back from
    this thread between a fork and a join event on `main` (a few us of skew between
    ranks, no thread scheduling).

    One graph holding every rank as a branch was tried first and stalls: CUDA does not
    promise that independent branches run at the same time, and a rank that waits for
    a peer serialised behind it never finishes. Separate launches on separate streams
    (as the eager warm-up below, issued call by call across the ranks) do run together.
    """

    def __init__(self, calls_by_rank: list[list[Callable[[], None]]],
                 check: Callable[[], None]):
        self.main, *self.streams = _rank_streams(len(calls_by_rank))
        self.calls = len(calls_by_rank[0])

        def eager() -> None:
            for batch in zip(*calls_by_rank, strict=True):
                for stream, call in zip(self.streams, batch, strict=True):
                    with torch.cuda.stream(stream):
                        call()

        with torch.cuda.stream(self.main):
            self._fork_join(eager)  # every rank's kernels run concurrently on their streams
        torch.cuda.synchronize()
        check()  # a stalled eager run must not be captured
        self.graphs = []
        for stream, calls in zip(self.streams, calls_by_rank, strict=True):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                for call in calls:
                    call()
            self.graphs.append(graph)
        torch.cuda.synchronize()

    def _fork_join(self, body: Callable[[], None]) -> None:
        fork = torch.cuda.Event()
        fork.record(self.main)
        for stream in self.streams:
            stream.wait_event(fork)
        body()
        for stream in self.streams:
            done = torch.cuda.Event()
            done.record(stream)
            self.main.wait_event(done)

    def replay(self) -> None:
        def replay_all() -> None:
            for stream, graph in zip(self.streams, self.graphs, strict=True):
                with torch.cuda.stream(stream):
                    graph.replay()

        self._fork_join(replay_all)


def time_ranks_graph(calls_by_rank: list[list[Callable[[], None]]], replays: int,
                     check: Callable[[], None] = lambda: None) -> float:
    """Median us per call (fork to join, over the calls per rank) of every rank's calls
    (`calls_by_rank[r]`) replayed together (_RanksGraph): the median of CAPTURES
    captures' medians (time_ranks_graphs)."""
    return statistics.median(time_ranks_graphs([calls_by_rank], replays, [check])[0])


def time_ranks_graphs(variants: list[list[list[Callable[[], None]]]], replays: int,
                      checks: list[Callable[[], None]],
                      rounds: int = CAPTURES) -> list[list[float]]:
    """Per variant (every rank's calls), the median us per call of each of `rounds`
    rounds; in a round every variant is captured anew (_RanksGraph) and replayed
    `replays` times, the variants taking turns (in reverse order every other round).

    Anew: emulated ranks settle into a pace per capture (how their kernels overlap on
    the one GPU), so one capture can be far off: the same kernel on the same inputs and
    workspaces measured 82.6 and 120.4 us in two captures (N = 2, 1024 x 4096, H100).
    Taking turns: the variants see the card in the same state (clocks, temperature)."""
    times: list[list[float]] = [[] for _ in variants]
    turns = list(zip(variants, checks, times, strict=True))
    for i in range(rounds):
        for calls, check, t in turns if i % 2 == 0 else turns[::-1]:  # neither always first
            graph = _RanksGraph(calls, check)
            t.append(statistics.median(_replay_us(graph, graph.main, graph.calls, replays)))
            del graph  # its memory back before the next capture
    for check in checks:
        check()  # a replay that stalled leaves the workspaces aborted: its time means nothing
    return times


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
