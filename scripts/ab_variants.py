"""A/B of arfusion trees in ONE process on one GPU: the variants take turns, round after
round, so they see the same card at the same moment (separate bench runs of the same
code differ by up to 0.7 us at 1 token in the emulation; this resolves ~0.1 us).

    PYTHONPATH=src python3 scripts/ab_variants.py --variant base=/path/to/old/src \\
        [--variant nosig=@nosig] [--parts w1,emu,host] [--w1 4:8192:1,2048]
        [--emu 2:1:8192:1] [--rounds 3] [--replays 20] [--compiled]

`arfusion` (first on PYTHONPATH) is always variant one; each `--variant NAME=TREE`
copies TREE/arfusion to a temporary package `arfusion_NAME` (absolute module names
rewritten) and imports it beside. TREE `@nosig` is this tree with no signature
published or checked: for timing the signature only, never for results. Every variant
runs through variant one's harness (inputs, timing, baselines: arfusion.bench) and only
its own API (create_allreduce_fusion_workspace, allreduce_fusion, comm.InProcessGroup),
so `w1` and `host` work with any tree back to the first; `emu` also needs the tree's
`testing.run_ranks` and `workspace.compile_only`.

Parts: `w1` world size 1 (`--w1 PATTERN:HIDDEN:TOKENS,...`, time_graph medians, with
`--compiled` the torch.compile'd epilogue too); `emu` N ranks as streams of this
process (`--emu N:PATTERN:HIDDEN:TOKENS`, time_ranks_graph), printing every round's
difference to variant one; `host` eager host us per call (patterns 1 and 2, world
size 1) next to torch.add_.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable

import torch

from arfusion.bench import baselines as B
from arfusion.bench import runs as R
from arfusion.bench import timing as T
from arfusion.patterns import PATTERNS

DTYPE = torch.bfloat16
CALLS = 8  # input sets per graph, as the bench
NOSIG = {  # launch.py edits of the @nosig variant: every launch without the signature
    "        self.signed = True": "        self.signed = False  # TIMING ONLY",
}


def make_package(root: str, name: str, tree: str) -> str:
    """TREE/arfusion copied to ROOT/arfusion_NAME, importable beside `arfusion`."""
    pkg = f"arfusion_{name}"
    shutil.copytree(os.path.join("src" if tree == "@nosig" else tree, "arfusion"),
                    os.path.join(root, pkg))
    for folder, _, files in os.walk(os.path.join(root, pkg)):
        for f in (f for f in files if f.endswith(".py")):
            path = os.path.join(folder, f)
            with open(path) as fh:
                text = fh.read().replace('"arfusion.', f'"{pkg}.')
            if tree == "@nosig" and f == "launch.py":
                for old, new in NOSIG.items():
                    if text.count(old) != 1:
                        raise SystemExit(f"@nosig: launch.py changed, update NOSIG ({old!r})")
                    text = text.replace(old, new)
            with open(path, "w") as fh:
                fh.write(text)
    return pkg


def load(pkg: str) -> dict:
    return {m: importlib.import_module(pkg + m) for m in ("", ".comm")}


def issue(m: dict, c: R._Calls, ws, i: int) -> None:
    """Call i of `c` (a harness _Calls) through variant `m`'s own allreduce_fusion."""
    x, residual = c.sets[i]
    extra = {"residual_in": residual} if PATTERNS[c.case.pattern].norm else {}
    m[""].allreduce_fusion(x, ws, c.case.pattern, **c.out, **c.kw, **extra)


def rounds(fns: dict[str, Callable[[], float]], n: int, label: str) -> dict[str, float]:
    """Every function once per round, `n` rounds; medians, and each round's difference
    of the first to the others printed."""
    t: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(n):
        for k, f in fns.items():
            t[k].append(f())
    first, *others = t
    for k in others:
        d = [a - b for a, b in zip(t[first], t[k], strict=True)]
        print(f"  {label}: {first} - {k} per round " + " ".join(f"{x:+.2f}" for x in d)
              + f"; median {statistics.median(d):+.2f} us", flush=True)
    return {k: statistics.median(v) for k, v in t.items()}


def world1(mods: dict, cases: list[tuple[int, int, list[int]]], args) -> None:
    hidden = max(h for _, h, _ in cases)
    tokens = max(max(ts) for _, _, ts in cases)
    wss = {p: m[""].create_allreduce_fusion_workspace(
        "trtllm", world_size=1, rank=0, max_token_num=tokens, hidden_dim=hidden, dtype=DTYPE,
        comm_backend=m[".comm"].InProcessGroup(1).backends()[0]) for p, m in mods.items()}
    names = list(mods) + (["compiled"] if args.compiled else [])
    print("| pattern | hidden | tokens | " + " | ".join(names) + " |")
    print("|" + " --- |" * (3 + len(names)))
    for pattern, h, ts in cases:
        for t in ts:
            case = R._case(pattern, t, h, DTYPE)
            calls = R._Calls(case, 0, CALLS)  # the same inputs for every variant
            fns = {p: lambda m=m, w=wss[p], c=calls: T.time_graph(
                lambda: [issue(m, c, w, i) for i in range(CALLS)], CALLS, args.replays)
                for p, m in mods.items()}
            if args.compiled:
                epilogue = B.epilogue_fn(pattern, DTYPE, case.scale_factor)
                fns["compiled"] = lambda e=epilogue, c=calls: T.time_graph(
                    lambda: c.baseline(e), CALLS, args.replays)
            r = rounds(fns, args.rounds, f"p{pattern} {t}x{h}")
            print(f"| {pattern} | {h} | {t} | " + " | ".join(f"{r[k]:.1f}" for k in names)
                  + " |", flush=True)
    for ws in wss.values():
        ws.destroy()


def emulated(mods: dict, n: int, pattern: int, h: int, t: int, args) -> None:
    fns, made = {}, []
    ranks = [R._Calls(R._case(pattern, t, h, DTYPE), r, CALLS) for r in range(n)]
    for p, m in mods.items():
        X = importlib.import_module(m[""].__name__ + ".testing")
        wss = X.run_ranks(n, lambda ctx, m=m: m[""].create_allreduce_fusion_workspace(
            "trtllm", world_size=n, rank=ctx.rank, max_token_num=t, hidden_dim=h, dtype=DTYPE,
            comm_backend=ctx.comm, force_oneshot_support=True), device="cuda:0")
        for ws in wss:
            ws.timeout_s = 10.0  # a stalled row costs this, not the default bound
        for r in range(n):  # compile first, nothing launches
            with wss[r].compile_only():
                issue(m, ranks[r], wss[r], 0)
        steps = [[lambda m=m, c=ranks[r], w=wss[r], i=i: issue(m, c, w, i)
                  for i in range(CALLS)] for r in range(n)]
        fns[p] = lambda s=steps, w=wss: T.time_ranks_graph(
            s, args.replays, lambda: [x.check() for x in w])
        made.append((X, wss))
    r = rounds(fns, args.rounds, f"N={n} p{pattern} {t}x{h}")
    print(f"N={n} p{pattern} {t}x{h}: " + "  ".join(f"{k} {v:.2f} us" for k, v in r.items()),
          flush=True)
    for X, wss in made:
        X.run_ranks(n, lambda ctx, w=wss: w[ctx.rank].destroy(), device="cuda:0")


def host(mods: dict) -> None:
    fns, wss = {}, []
    a = torch.ones(8, 4096, device="cuda", dtype=DTYPE)
    for p, m in mods.items():
        ws = m[""].create_allreduce_fusion_workspace(
            "trtllm", world_size=1, rank=0, max_token_num=8, hidden_dim=4096, dtype=DTYPE,
            comm_backend=m[".comm"].InProcessGroup(1).backends()[0])
        wss.append(ws)
        x = torch.randn(8, 4096, device="cuda", dtype=DTYPE)
        r, ro, no = torch.randn_like(x), torch.empty_like(x), torch.empty_like(x)
        g = torch.ones(4096, device="cuda", dtype=DTYPE)
        q = torch.empty(8, 4096, device="cuda", dtype=torch.float8_e4m3fn)
        f = m[""].allreduce_fusion
        fns[f"{p} pattern 1"] = lambda f=f, ws=ws, x=x, r=r, ro=ro, no=no, g=g: f(
            x, ws, 1, residual_out=ro, norm_out=no, residual_in=r, rms_gamma=g)
        fns[f"{p} pattern 2"] = lambda f=f, ws=ws, x=x, r=r, ro=ro, q=q, g=g: f(
            x, ws, 2, residual_out=ro, quant_out=q, residual_in=r, rms_gamma=g,
            scale_factor=0.5)
    fns["torch.add_"] = lambda: a.add_(a)
    for k, v in T.host_us(fns).items():
        print(f"host {k}: {v:.2f} us", flush=True)
    for ws in wss:
        ws.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=TREE")
    ap.add_argument("--parts", default="w1,emu,host")
    ap.add_argument("--w1", nargs="*", default=["4:8192:1,128,2048"],
                    metavar="PATTERN:HIDDEN:TOKENS")
    ap.add_argument("--emu", nargs="*", default=["2:1:8192:1"], metavar="N:PATTERN:HIDDEN:TOKENS")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--compiled", action="store_true", help="w1: the compiled epilogue too")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="arfusion-ab-")
    sys.path.insert(0, root)
    mods = {"arfusion": load("arfusion")}
    for v in args.variant:
        name, tree = v.split("=", 1)
        pkg = make_package(root, name, tree)
        mods[pkg] = load(pkg)
    parts = args.parts.split(",")
    if "w1" in parts:
        world1(mods, [(int(p), int(h), [int(t) for t in ts.split(",")])
                      for p, h, ts in (c.split(":") for c in args.w1)], args)
    if "emu" in parts:
        for c in args.emu:
            emulated(mods, *(int(v) for v in c.split(":")), args)
    if "host" in parts:
        host(mods)
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
