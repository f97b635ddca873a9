"""The bench's report: header, tables (markdown), plot, footprints, and the tuner that
rewrites heuristics.ONESHOT_MAX_BYTES from measured rows."""

from __future__ import annotations

import datetime
import itertools
import os
import re
from pathlib import Path

import torch

from .. import heuristics, sizing
from ..patterns import PATTERNS
from .runs import SIGNATURE, TP_SHAPE

TITLES = {
    "processes": "{n} processes, one GPU each",
    "mps": "{n} processes on one GPU under MPS (CUDA IPC between them; not NVLink)",
    "emulation": "{n} ranks as streams of one process on one GPU, graphs launched "
                 "together (emulation: the exchange is local HBM traffic, not NVLink)",
    "world-1": "world size 1 on one GPU, with baselines",
    SIGNATURE: "{n} ranks (emulation), 1 token: what the call signature costs (the same "
               "calls with and without it, taking turns; without: timing only)",
}


def merge_ranks(rows_by_rank: list[list[dict]], world: int, mode: str) -> list[dict]:
    """Rank 0's rows with the slowest rank's time (hung where any rank hung) and, for
    FlashInfer's rows, every rank's agreement counts added up."""
    merged = []
    for i, row in enumerate(rows_by_rank[0]):
        mine = [r[i] for r in rows_by_rank]
        row = dict(row, us=max(r["us"] for r in mine), world_size=world, mode=mode,
                   hung=any(r.get("hung", False) for r in mine))
        if row["hung"]:
            row.pop("agree", None)
        elif "agree" in row:
            row["agree"] = {k: [sum(r["agree"][k][0] for r in mine) if "ulp" not in k
                                else max(r["agree"][k][0] for r in mine),
                                sum(r["agree"][k][1] for r in mine)] for k in row["agree"]}
        merged.append(row)
    return merged


def header(world: int) -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    driver = os.popen("nvidia-smi -i 0 --query-gpu=driver_version --format=csv,noheader")
    return dict(card=props.name, sms=props.multi_processor_count, driver=driver.read().strip(),
                torch=torch.__version__, triton=triton.__version__,
                date=datetime.date.today().isoformat(), world_size=world,
                gpus=torch.cuda.device_count())


def _cell(row: dict) -> str:
    if row.get("hung"):
        return "hung"
    if row["mode"] == SIGNATURE:  # tenths of a us matter here
        return f"{row['us']:{'+' if row['method'].endswith('cost') else ''}.2f}"
    text = f"{row['us']:.1f}"
    if row["method"].endswith("auto"):
        text += f" ({row['strategy']})"
    if row.get("roofline") is not None:
        text += f" [{100 * row['roofline']:.0f}%]"
    return text


def markdown(header: dict, rows: list[dict], extras: dict) -> str:
    share = (f", MPS: each rank process {header['mps_share_percent']} % of the SMs"
             if "mps_share_percent" in header else "")
    lines = [f"### {header['card']} ({header['sms']} SMs), driver {header['driver']}, "
             f"torch {header['torch']}, triton {header['triton']}, {header['date']}{share}", "",
             f"Copy bandwidth (device to device, read + write): {extras['copy_GBps']:.0f} GB/s. "
             "Cells: median us per call (max over ranks) [share of the memory roofline: the "
             "time a copy of the bytes the call must move takes, over the measured time].", ""]
    for (mode, title), n in itertools.product(TITLES.items(), sorted({r["world_size"]
                                                                     for r in rows})):
        part = [r for r in rows if r["mode"] == mode and r["world_size"] == n]
        if not part:
            continue
        methods = sorted({r["method"] for r in part})
        lines += [f"#### {title.format(n=n)}", "",
                  "| pattern | dtype | hidden | tokens | " + " | ".join(methods) + " |",
                  "| --- | --- | --- | --- | " + " | ".join("---" for _ in methods) + " |"]
        keys = sorted({(r["pattern"], r["dtype"], r["hidden"], r["tokens"]) for r in part})
        for key in keys:
            cells = {r["method"]: r for r in part
                     if (r["pattern"], r["dtype"], r["hidden"], r["tokens"]) == key}
            vals = [_cell(cells[m]) if m in cells else "-" for m in methods]
            lines.append(f"| {PATTERNS[key[0]].name} | {key[1]} | {key[2]} | {key[3]} | "
                         + " | ".join(vals) + " |")
        lines.append("")
    lines += _agreement(rows)
    host, fp = extras.get("host_us"), extras.get("footprint")
    notes = []
    if host:
        notes.append(f"- host cost of one eager call: allreduce_fusion "
                     f"{host['allreduce_fusion']:.1f} us vs torch.add_ {host['torch_add_']:.1f} "
                     "us, same process")
    if first := extras.get("first_call"):
        notes.append(f"- workspace creation to first completed call, new process: "
                     f"{first['cold_s']:.1f} s with an empty Triton cache, "
                     f"{first['warm_s']:.2f} s with it warm")
    if fp:
        notes.append(f"- symmetric memory per rank for {fp['config']}: trtllm "
                     f"{fp['trtllm'] / 2**20:.1f} MiB, mnnvl {fp['mnnvl'] / 2**20:.1f} MiB "
                     f"({fp['mnnvl_force_oneshot'] / 2**20:.1f} MiB with force_oneshot_support), "
                     f"FlashInfer trtllm formula {fp['flashinfer_trtllm'] / 2**20:.1f} MiB")
    t, h = TP_SHAPE
    for r in extras.get("tp_layer", []):
        notes.append(f"- TP block ({t} tokens, hidden {h}, intermediate {4 * h}), "
                     f"{r['method']}, {r['world_size']} ranks ({r['mode']}): "
                     f"{r['us']:.1f} us per block, output rel. error vs the single-GPU "
                     f"model {r['rel_err']:.1e}")
    if notes:
        lines += ["#### Also measured", "", *notes, ""]
    return "\n".join(lines)


def _agreement(rows: list[dict]) -> list[str]:
    """FlashInfer's outputs against arfusion's on the same inputs (every rank's first
    call, added up): differing elements per output, and norm_out's largest distance
    from arfusion.reference in ulp."""
    part = [r for r in rows if "agree" in r]
    if not part:
        return []
    lines = ["#### FlashInfer's outputs against arfusion's, same inputs (differing elements "
             "/ elements, all ranks; norm_out: largest ulp from arfusion.reference)", "",
             "| ranks | pattern | dtype | hidden | tokens | strategy | differences |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in part:
        cells = ", ".join(f"{k} {d}" if "ulp" in k else f"{k} {d}/{n}"
                          for k, (d, n) in r["agree"].items())
        lines.append(f"| {r['world_size']} | {PATTERNS[r['pattern']].name} | {r['dtype']} | "
                     f"{r['hidden']} | {r['tokens']} | {r['strategy']} | {cells} |")
    return lines + [""]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def group(r: dict) -> tuple:  # one panel per placement, world size and case family
        return r["mode"], r["world_size"], r["pattern"], r["dtype"], r["hidden"]

    rows = [r for r in rows if r["mode"] != SIGNATURE]  # differences, not latencies
    groups = sorted({group(r) for r in rows})
    cols = min(3, len(groups))
    nrows = -(-len(groups) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, groups, strict=False):
        mode, world, pattern, dtype, hidden = key
        part = [r for r in rows if group(r) == key]
        for method in sorted({r["method"] for r in part}):
            pts = sorted((r["tokens"], r["us"]) for r in part if r["method"] == method)
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="us per call",
               title=f"{PATTERNS[pattern].name} {dtype} H={hidden} ({mode}, N={world})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


TUNE_MARGIN = 1.10  # one-shot is "clearly slower" once it takes 10% longer than two-shot


def size_literal(n: int) -> str:
    """`n` bytes as heuristics.py writes them: 32 << 20, 512 << 10, 1 << 62."""
    for shift in (20, 10):
        if n % (1 << shift) == 0 and 0 < n >> shift < 1 << 20:
            return f"{n >> shift} << {shift}"
    if n > 0 and n & (n - 1) == 0:
        return f"1 << {n.bit_length() - 1}"
    return str(n)


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

    ours = [r for r in rows if r["world_size"] == world and r["method"].startswith("arfusion")]
    twoshot = {(series(r), r["tokens"]): r["us"] for r in ours
               if r["method"].endswith("twoshot")}
    oneshot: dict[tuple, list[dict]] = {}
    for r in ours:
        if r["method"].endswith("oneshot") and (series(r), r["tokens"]) in twoshot:
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
            f"{header['date']}:\n# world size {world} from {mode} measurements.\n")
    src = re.sub(r"# Tuned by .*\n(?:# world size .*\n)?", "", path.read_text())
    body = "".join(f"    {w}: {size_literal(v)},\n" for w, v in sorted(table.items()))
    src = re.sub(r"ONESHOT_MAX_BYTES: dict\[int, int\] = \{\n(?:    .*\n)*?\}",
                 lambda _: note + "ONESHOT_MAX_BYTES: dict[int, int] = {\n" + body + "}", src)
    path.write_text(src)
    return table


def footprints(world: int, tokens: int, hidden: int, dtype: torch.dtype) -> dict:
    """Symmetric memory per rank: arfusion's backends vs FlashInfer's trtllm formula
    (buffer N*T*H*2 + flags N*256*4 + Lamport 3*N*T*H*s, each rounded up to 2 MiB)."""
    from ..backends.mnnvl import MNNVLAllReduceFusionWorkspace as M

    e, mib2 = tokens * hidden, 2 << 20
    flashinfer = sum(sizing.round_up(b, mib2) for b in (
        world * e * 2, world * 256 * 4, 3 * min(world * e * dtype.itemsize, 2**31 - mib2)))
    return dict(config=f"{world} ranks, {tokens}x{hidden} {dtype}",
                trtllm=sizing.buffer_bytes(world, e, e, dtype),
                mnnvl=sizing.buffer_bytes(world, e, M.oneshot_capacity(world, e, dtype, False),
                                          dtype),
                mnnvl_force_oneshot=sizing.buffer_bytes(world, e, e, dtype),
                flashinfer_trtllm=flashinfer)
