"""`bench --warm J`: fill the disk caches before anything is timed, in J processes.

A bench run meets dozens of kernel variants (arfusion's, by pattern, hidden size,
world size, strategy; world size 1 also by whether the rows outnumber the
programs that fit at once) and a compiled epilogue per case (static shapes).
Triton and Inductor compile each on the CPU on first use, one after another: a
cold run of two hidden sizes and three world sizes spends most of its time
compiling. Here the run's variants are split among J spawned processes; each
builds its share (arfusion's through `compile_only`, launching nothing; an
epilogue by calling it once) into the disk caches (`TRITON_CACHE_DIR`, Inductor's
FX graph cache), where the measuring process then finds them. Nothing here is
timed, and a unit that fails only leaves its compile to the run itself.
"""

from __future__ import annotations

import argparse
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch

from .. import testing
from ..api import create_allreduce_fusion_workspace
from ..comm import InProcessGroup
from . import baselines
from .runs import _case, _shapes

# ("world-1", dtype, pattern, tokens, hidden) or ("ranks", dtype, world, backend, pattern,
# hidden): a variant (and, at world size 1, the compiled epilogue of the case)
Unit = tuple


def units(args: argparse.Namespace, dtypes: list[torch.dtype], backend: str) -> list[Unit]:
    """What the run will compile, one entry per variant (or per compiled baseline), the
    longest first (four N-rank variants each), so that round-robin shares even out."""
    ranks: dict[Unit, None] = {}
    world1: dict[Unit, None] = {}
    tokens = args.tokens + (args.emulation_tokens or [])  # the floor rows: world size 1
    worlds = [args.world_size] if args.mps else args.emulate or [args.world_size]
    for dtype in dtypes:
        shapes = argparse.Namespace(**{**vars(args), "tokens": sorted(set(tokens))})
        for case in _shapes(shapes, dtype):
            world1[("world-1", dtype, case.pattern, case.num_tokens, case.hidden_dim)] = None
            for world in (w for w in worlds if w > 1):  # whatever the token count
                ranks[("ranks", dtype, world, backend, case.pattern, case.hidden_dim)] = None
    return [*ranks, *world1]


def _world1(wss: dict, dtype, pattern: int, t: int, h: int, max_tokens: int,
            max_hidden: int) -> None:
    # One world-size-1 workspace per dtype, as large as the run's (the variant depends on
    # whether the rows outnumber the programs, not on the workspace's size).
    if dtype not in wss:
        wss[dtype] = create_allreduce_fusion_workspace(
            "trtllm", world_size=1, rank=0, max_token_num=max_tokens, hidden_dim=max_hidden,
            dtype=dtype, comm_backend=InProcessGroup(1).backends()[0])
    case = _case(pattern, t, h, dtype)
    testing.precompile_cases(wss[dtype], [(case, dict(with_output=False))], 0, "cuda")
    epilogue = baselines.epilogue_fn(pattern, dtype, case.scale_factor)
    own = case.own(0, "cuda")
    epilogue(case.input(0, "cuda"), own["residual_in"], own["rms_gamma"])


def _ranks(dtype, world: int, backend: str, pattern: int, h: int) -> None:
    # Every rank must take part in creating the workspaces; rank 0 alone compiles (the
    # variants do not depend on the rank), both strategies, then signed and unsigned.
    wss = testing.run_ranks(world, lambda ctx: create_allreduce_fusion_workspace(
        backend, world_size=world, rank=ctx.rank, max_token_num=1, hidden_dim=h, dtype=dtype,
        comm_backend=ctx.comm, force_oneshot_support=True), device="cuda:0")
    try:
        cases = [(_case(pattern, 1, h, dtype), dict(with_output=False, use_oneshot=o))
                 for o in (True, False)]
        testing.precompile_cases(wss[0], cases, 0, "cuda")
        with wss[0].without_signature():
            testing.precompile_cases(wss[0], cases, 0, "cuda")
    finally:
        testing.run_ranks(world, lambda ctx: wss[ctx.rank].destroy(), device="cuda:0")


def _worker(share: list[Unit], max_tokens: int, max_hidden: int) -> list[str]:
    """One process's share; returns what failed (the run compiles those itself)."""
    failed, wss = [], {}
    for unit in share:
        try:
            if unit[0] == "world-1":
                _world1(wss, *unit[1:], max_tokens, max_hidden)
            else:
                _ranks(*unit[1:])
        except Exception as e:  # noqa: BLE001 - reported; the run compiles it itself
            failed.append(f"{unit}: {type(e).__name__}: {e}")
    for ws in wss.values():
        ws.destroy()
    return failed


def fill_caches(args: argparse.Namespace, dtypes: list[torch.dtype], backend: str,
                jobs: int) -> Iterator[str]:
    """Compile the run's units in `jobs` spawned processes (round robin); yields what
    failed. A process that dies (not an exception: a crash) leaves its share to the run."""
    todo = units(args, dtypes, backend)
    shares = [todo[i::jobs] for i in range(jobs) if todo[i::jobs]]
    max_tokens = max(args.tokens + (args.emulation_tokens or []))
    with ProcessPoolExecutor(len(shares), mp_context=multiprocessing.get_context("spawn")) as ex:
        futures = [ex.submit(_worker, s, max_tokens, max(args.hidden)) for s in shares]
        for future in futures:
            try:
                yield from future.result()
            except BrokenProcessPool as e:
                yield f"a warm-up process died ({e}): its share compiles in the run"
