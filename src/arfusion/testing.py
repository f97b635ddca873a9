"""Test harnesses and checks for arfusion and for code that uses it.

- `run_ranks`: N ranks as threads of this process, each with its own
  `InProcessBackend` and (on CUDA) its own stream. This is how the multi-rank
  protocol runs on one GPU: kernels of one process on different streams run
  concurrently.
- `run_processes`: N spawned processes joined by `torch.distributed` (gloo on
  CPU, nccl with one GPU each).
- `Case` draws a call's inputs reproducibly, so every rank can rebuild every
  other rank's input and compute the reference locally; every rank draws its own
  residual and gamma (the contract is per rank: a rank's outputs follow from the sum
  and its own tensors).
- `check_outputs` compares one rank's outputs with `arfusion.reference` by the
  rules of docs/contract.md: output and residual_out bit-exact, norm_out within 1 ulp
  (16-bit) or 32 ulp (fp32), quantised bytes equal except where the reference
  value is within 1 ulp of a rounding boundary (counted). Ranks that pass different
  residuals get different bits; `digest` hashes what every rank must share.

Ranks as threads on one GPU follow one discipline (`run_case` does): prepare
everything, meet at a barrier, launch, synchronise the rank's own stream, and
only then allocate, memset or compile anything. A device allocation, memset or
module load issued while a rank's kernel waits for a peer serialises the GPU
(CUDA's implicit synchronisation), so the peer's kernel cannot start and both
wait until the timeout. For the same reason every kernel variant is built
first (`precompile_cases`: `workspace.compile_only()`, nothing launched).
Separate processes on separate GPUs need none of this.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import moe, reference
from .comm import InProcessBackend, InProcessGroup
from .patterns import MOE_PATTERNS, NVFP4_BLOCK, PATTERNS, Quant, sf_size

OUTPUT_NAMES = ("output", "residual_out", "norm_out", "quant_out", "scale_out")


@dataclass
class RankContext:
    rank: int
    world_size: int
    comm: InProcessBackend
    device: torch.device
    stream: torch.cuda.Stream | None = None


def run_ranks(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    device: torch.device | str | None = None,
    timeout_s: float = 600.0,
) -> list[Any]:
    """Run `fn(ctx, *args)` for every rank on its own thread; return the results by rank.

    On CUDA each rank runs inside `torch.cuda.stream(ctx.stream)` and its stream is
    synchronised before the result is taken. If any rank raises, the group's
    barrier is broken (so no rank waits forever) and the first error is re-raised.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    group = InProcessGroup(world_size, timeout_s=timeout_s)
    comms = group.backends()
    results: list[Any] = [None] * world_size
    errors: list[BaseException | None] = [None] * world_size

    def worker(rank: int) -> None:
        try:
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
                stream = torch.cuda.Stream(dev)
                with torch.cuda.stream(stream):
                    results[rank] = fn(RankContext(rank, world_size, comms[rank], dev, stream),
                                       *args)
                stream.synchronize()
            else:
                results[rank] = fn(RankContext(rank, world_size, comms[rank], dev), *args)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors[rank] = e
            group.abort()

    threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    if any(t.is_alive() for t in threads):
        group.abort()
        raise TimeoutError(f"ranks did not finish within {timeout_s} s")
    causes = [(r, e) for r, e in enumerate(errors) if e is not None and not
              _is_broken_barrier(e)]
    for rank, e in causes[1:]:  # the first is raised; show the others too
        print(f"[rank {rank}] also failed:", file=sys.stderr)
        traceback.print_exception(e, file=sys.stderr)
    first = causes[0][1] if causes else next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results


def capture_graph(ctx: RankContext, step: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """Run `step` once (all ranks together), then capture it on the rank's stream.

    Not `torch.cuda.graph(...)`: its device-wide synchronize is illegal while another
    rank's thread is capturing. Ranks meet before capturing (everything idle) and
    after it (nobody synchronises, allocates or frees while another still captures).
    """
    ctx.comm.barrier()
    step()
    ctx.stream.synchronize()
    ctx.comm.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(ctx.stream):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            step()
        finally:
            graph.capture_end()
    ctx.comm.barrier()
    return graph


def replay_graph(ctx: RankContext, graph: torch.cuda.CUDAGraph) -> None:
    """Replay with every rank, following the barrier discipline (module docstring)."""
    ctx.stream.synchronize()
    ctx.comm.barrier()
    graph.replay()
    ctx.stream.synchronize()


def _is_broken_barrier(e: BaseException) -> bool:
    return isinstance(e, threading.BrokenBarrierError)


def _process_main(rank, world_size, init_file, backend, fn, args, results) -> None:
    import torch.distributed as dist

    try:
        device = None
        if backend == "nccl":  # bound at creation: collectives need not guess the device
            device = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size, device_id=device)
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, False, traceback.format_exc()))


def run_processes(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 600.0,
    may_die: Collection[int] = (),
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` spawned processes.

    Each process joins a `torch.distributed` group (`backend`); `fn` must be
    importable by module path (spawn pickles it). Returns the results by rank;
    raises RuntimeError with the failing ranks' tracebacks. A rank in `may_die`
    may exit without reporting (a test that kills it): its result is None. Any
    other rank that exits without reporting fails the run at once, not at the
    timeout.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_process_main,
                        args=(r, world_size, init_file, backend, fn, args, results))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        out: dict[int, tuple[bool, Any]] = {}
        dead: dict[int, int] = {}  # exited without reporting: exit code
        try:
            dead = _collect(procs, results, out, timeout_s, set(may_die))
        finally:
            for p in procs:
                p.join(timeout=5 if len(out) + len(dead) == world_size else 0.1)
                if p.is_alive():
                    p.kill()
    failed = {r: payload for r, (ok, payload) in out.items() if not ok}
    if failed:
        raise RuntimeError("ranks failed:\n" + "\n".join(f"[rank {r}] {tb}" for r, tb in
                                                           sorted(failed.items())))
    if unexpected := {r: code for r, code in dead.items() if r not in may_die}:
        raise RuntimeError(f"ranks {sorted(unexpected)} exited without reporting "
                           f"(exit codes {[unexpected[r] for r in sorted(unexpected)]})")
    if missing := sorted(set(range(world_size)) - set(out) - set(dead)):
        raise RuntimeError(f"ranks {missing} did not report within {timeout_s} s")
    return [out[r][1] if r in out else None for r in range(world_size)]


def _collect(procs: list, results, out: dict[int, tuple[bool, Any]], timeout_s: float,
             may_die: set[int]) -> dict[int, int]:
    """Gather reports into `out` until every rank reported or died, one failed, a rank
    not in `may_die` died, or the timeout; returns the ranks that died without
    reporting (a process that just exited gets a second for its report to arrive)."""
    end = time.monotonic() + timeout_s
    exited: dict[int, float] = {}
    while len(out) < len(procs) and time.monotonic() < end:
        try:
            rank, ok, payload = results.get(timeout=0.25)
        except queue_mod.Empty:
            now = time.monotonic()
            for r, p in enumerate(procs):
                if r not in out and p.exitcode is not None:
                    exited.setdefault(r, now)
            dead = {r: procs[r].exitcode for r, t in exited.items()
                    if r not in out and now - t > 1.0}
            if set(dead) - may_die or len(out) + len(dead) == len(procs):
                return dead
            continue
        out[rank] = (ok, payload)
        if not ok:
            break
    return {r: procs[r].exitcode for r in exited if r not in out}


MPS_ENV = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")


@contextlib.contextmanager
def mps_daemon() -> Iterator[bool]:
    """Run the CUDA Multi-Process Service for the block, so that processes started in
    it (`run_processes`) share one GPU with their kernels running concurrently (without
    it, spin-waits across processes of one GPU never progress). Yields False where the
    daemon cannot start (not installed, not root, already in use); quits it after.
    Start it before this process initialises CUDA: only later processes are clients."""
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        yield False
        return
    folder = tempfile.mkdtemp(prefix="arfusion-mps-")
    saved = {k: os.environ.get(k) for k in MPS_ENV}
    os.environ.update({k: os.path.join(folder, k.split("_")[-2].lower()) for k in MPS_ENV})
    for k in MPS_ENV:
        os.makedirs(os.environ[k], exist_ok=True)
    started = subprocess.run([control, "-d"], capture_output=True).returncode == 0
    try:
        yield started
    finally:
        if started:
            subprocess.run([control], input=b"quit\n", capture_output=True, timeout=60)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(folder, ignore_errors=True)


MOE_EXPERTS = 3  # pattern 6's local experts in a Case
MOE_TOP_K = 3  # pattern 7's experts per token
MOE_PADDING = 5  # pattern 7's permuted rows no index reads


@dataclass
class Case:
    """One call's inputs for every rank, reproducible from (seed, index)."""

    pattern: int
    num_tokens: int
    hidden_dim: int
    dtype: torch.dtype
    seed: int = 0
    layout_code: int = 0
    scale_factor: float = 1.0
    weight_bias: float = 0.0
    rms_eps: float = 1e-6
    scale_as_tensor: bool = False  # pass scale_factor as a 1-element fp32 tensor
    replicated: bool = False  # every rank passes the same residual and gamma (as engines do)
    group: int = 0  # block_quant_group_size of group FP8; 0: the largest of 128, 64, .. 1
    # that divides hidden_dim

    @property
    def block_quant_group_size(self) -> int:
        if self.group:
            return self.group
        return next(g for g in (128, 64, 32, 16, 8, 4, 2, 1) if self.hidden_dim % g == 0)

    def _generator(self, salt: int, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + salt)

    def input(self, rank: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Rank `rank`'s input (drawn on `device`, so every rank can redraw it). Pattern 7:
        the permuted expert rows, NaN where no index points (a stray read shows)."""
        device = torch.device(device)
        g = self._generator(7919 * rank + 1, device)
        rows = self.num_tokens
        if self.pattern == MOE_PATTERNS[1]:
            rows = self.num_tokens * MOE_TOP_K + MOE_PADDING
        x = torch.randn(rows, self.hidden_dim, generator=g, device=device) * 2.0
        if self.pattern == MOE_PATTERNS[1]:
            read = torch.zeros(rows, dtype=torch.bool, device=device)
            idx = self.moe(rank, device)["expanded_idx_to_permuted_idx"]
            read[idx[idx >= 0].long()] = True
            x[~read] = float("nan")
        return x.to(self.dtype)

    def moe(self, rank: int, device: torch.device | str = "cpu") -> dict[str, Any]:
        """Rank `rank`'s MoE arguments (patterns 6 and 7; {} otherwise). 6: MOE_EXPERTS
        experts, their outputs [E, T, H] and fp32 scales [E, T]; 7: a top-k index map
        into padded permuted rows (a permutation, with -1 slots and repeated rows),
        weights in the input dtype, a shared expert's output."""
        device = torch.device(device)
        g = self._generator(31337 + 7919 * rank, device)
        t, h = self.num_tokens, self.hidden_dim
        if self.pattern == MOE_PATTERNS[0]:
            return {"moe_reduction_device_num_experts": MOE_EXPERTS,
                    "moe_reduction_scale_input":
                        torch.rand(MOE_EXPERTS, t, generator=g, device=device) * 2 - 0.5,
                    "moe_reduction_active_experts_token_input":
                        torch.randn(MOE_EXPERTS, t, h, generator=g, device=device).to(self.dtype),
                    "moe_reduction_token_input": self.input(rank, device)}
        if self.pattern != MOE_PATTERNS[1]:
            return {}
        order = torch.randperm(t * MOE_TOP_K + MOE_PADDING, generator=g, device=device)
        idx = order[: t * MOE_TOP_K].reshape(t, MOE_TOP_K).to(torch.int32)
        idx[0, -1] = -1  # a dropped slot
        if t > 1:
            idx[1, 0] = idx[0, 0]  # two tokens reading one row
        return {"expanded_idx_to_permuted_idx": idx,
                "expert_scale_factor":
                    torch.rand(t, MOE_TOP_K, generator=g, device=device).to(self.dtype),
                "shared_expert_output":
                    torch.randn(t, h, generator=g, device=device).to(self.dtype)}

    def contribution(self, rank: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """What rank `rank` all-reduces: its input, or what the MoE patterns build."""
        x = self.input(rank, device)
        m = self.moe(rank, device)
        if self.pattern == MOE_PATTERNS[0]:
            return moe.moe_reduction_input(m["moe_reduction_active_experts_token_input"],
                                           m["moe_reduction_scale_input"], x, MOE_EXPERTS)
        if self.pattern == MOE_PATTERNS[1]:
            return moe.moe_finalize_input(x, m["expanded_idx_to_permuted_idx"],
                                          m["expert_scale_factor"], m["shared_expert_output"])
        return x

    def own(self, rank: int, device: torch.device | str = "cpu") -> dict[str, Any]:
        """What rank `rank` passes besides its input: its own residual_in and rms_gamma
        (every rank draws its own unless `replicated`; gamma has negative values too),
        and rms_eps, weight_bias, scale_factor, layout_code."""
        device = torch.device(device)
        g = self._generator(104729 + 7919 * (0 if self.replicated else rank), device)
        t, h = self.num_tokens, self.hidden_dim
        residual = torch.randn(t, h, generator=g, device=device)
        gamma = torch.rand(h, generator=g, device=device) * 2.5 - 0.75
        return {
            "residual_in": residual.to(self.dtype),
            "rms_gamma": gamma.to(self.dtype),
            "rms_eps": self.rms_eps,
            "weight_bias": self.weight_bias,
            "scale_factor": (torch.full((1,), self.scale_factor, device=device)
                             if self.scale_as_tensor else self.scale_factor),
            "layout_code": self.layout_code,
            "block_quant_group_size": self.block_quant_group_size,
        }

    def shared(self, device: torch.device | str = "cpu") -> dict[str, Any]:
        """`own(0, device)`: what every rank passes where the ranks pass the same tensors
        (each calling `case_kwargs` and `reference` with rank 0, as tensor-parallel
        engines do)."""
        return self.own(0, device)

    def reference(self, world_size: int, device: torch.device | str = "cpu", rank: int = 0):
        """Rank `rank`'s outputs: every rank's input, that rank's own tensors."""
        inputs = [self.contribution(r, device) for r in range(world_size)]
        kwargs = self.own(rank, device)
        if not PATTERNS[self.pattern].norm:
            kwargs = {}
        return reference.reference_allreduce_fusion(inputs, self.pattern, **kwargs)

    def label(self) -> str:
        own = " replicated" if self.replicated else ""
        return (f"{PATTERNS[self.pattern].name} {self.num_tokens}x{self.hidden_dim} "
                f"{self.dtype}{own}")


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with 0xFF bytes (NaN for floats): an unwritten element cannot pass a check."""
    t.view(torch.uint8).fill_(0xFF)
    return t


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Integer keys whose order and distance follow the floats' (1 apart = 1 ulp)."""
    bits = {2: torch.int16, 4: torch.int32}[t.element_size()]
    i = t.contiguous().view(bits).to(torch.int64)
    sign = 1 << (8 * t.element_size() - 1)
    return torch.where(i < 0, -(i + sign), i)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (ordered_bits(a) - ordered_bits(b)).abs()


def _step(n: torch.Tensor, direction: int) -> torch.Tensor:
    """`n` moved one ulp of its dtype toward +inf (1) or -inf (-1)."""
    key = ordered_bits(n) + direction
    sign = 1 << (8 * n.element_size() - 1)
    bits = torch.where(key < 0, -key - sign, key)
    return bits.to({2: torch.int16, 4: torch.int32}[n.element_size()]).view(n.dtype)


@dataclass
class CheckResult:
    ok: bool
    max_abs_err: float = 0.0
    max_ulp: int = 0
    boundary: int = 0
    problems: list[str] = field(default_factory=list)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    # A fresh tensor: a "contiguous" one may still carry odd strides on size-1 dimensions
    # (a (1, 1) group-FP8 scale_out with strides (1, 4)), which view() refuses.
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t).reshape(-1) \
        .view(torch.uint8)


def check_outputs(
    got: dict[str, torch.Tensor],
    ref: dict[str, torch.Tensor],
    case: Case,
    exact: bool = False,
) -> CheckResult:
    """Compare a rank's outputs (`got`, by name) with the reference (`ref`).

    `exact=True` demands identical bits everywhere (the torch backend runs the
    reference itself). Otherwise norm_out may be 1 ulp off (16-bit) or 32 ulp off
    (fp32), and a quantised byte may differ where the reference value is within
    1 ulp of a rounding boundary; such bytes are counted in `boundary`.
    """
    res = CheckResult(ok=True)
    traits = PATTERNS[case.pattern]
    for name in ("output", "residual_out"):
        if name in got and got[name] is not None and not torch.equal(_bytes(got[name]),
                                                                     _bytes(ref[name])):
            bad = (_bytes(got[name]) != _bytes(ref[name])).sum().item()
            res.problems.append(f"{name}: {bad} bytes differ from the reference")
    if got.get("norm_out") is not None:
        dist = ulp_distance(got["norm_out"], ref["norm_out"])
        res.max_ulp = int(dist.max().item()) if dist.numel() else 0
        limit = 0 if exact else (32 if case.dtype == torch.float32 else 1)
        if res.max_ulp > limit or got["norm_out"].isnan().any():
            res.problems.append(f"norm_out: {res.max_ulp} ulp from the reference (limit {limit})")
    final = got.get(traits.returns)
    res.max_abs_err = _max_abs_err(got, ref, case)
    if traits.quant != Quant.NONE and final is not None:
        _check_quant(got, ref, case, exact, res)
    res.ok = not res.problems
    return res


def _max_abs_err(got, ref, case) -> float:
    name = PATTERNS[case.pattern].returns
    if name == "quant_out":
        name = "norm_out" if got.get("norm_out") is not None else "residual_out"
    a, b = got[name].float(), ref[name].float()
    return float((a - b).abs().max().item()) if a.numel() else 0.0


def _check_quant(got, ref, case: Case, exact: bool, res: CheckResult) -> None:
    """Quantised bytes against the reference norm `n`, allowing n to be off by the
    norm tolerance (`tol` ulps): the kernel's scales must lie between the scales of
    n moved toward and away from zero, and its codes, decoded with its own scales,
    between the codes of n moved down and up. Bytes that differ from the reference
    are counted in `res.boundary`; with `exact` any difference is a problem."""
    quant = PATTERNS[case.pattern].quant
    n = ref["norm_out"]
    tol = 0 if exact else (32 if case.dtype == torch.float32 else 1)
    lo, hi = _step(n, -tol).float(), _step(n, tol).float()
    inward = torch.where(n.float() >= 0, lo, hi)  # |n| shrunk
    outward = torch.where(n.float() >= 0, hi, lo)  # |n| grown
    differ = _bytes(got["quant_out"]) != _bytes(ref["quant_out"])
    if quant == Quant.NVFP4:
        t, h = case.num_tokens, case.hidden_dim
        sf = reference.read_scales(got["scale_out"], t, h, case.layout_code)
        sf_lo = reference.nvfp4_block_scales(inward, case.scale_factor).float()
        sf_hi = reference.nvfp4_block_scales(outward, case.scale_factor).float()
        scale_ok = (sf_lo <= sf) & (sf <= sf_hi)
        sf8 = sf.to(torch.float8_e4m3fn)
        value = reference.unpack_nvfp4(got["quant_out"])
        code_lo = reference.unpack_nvfp4(_pack(reference.nvfp4_codes(lo, sf8, case.scale_factor)))
        code_hi = reference.unpack_nvfp4(_pack(reference.nvfp4_codes(hi, sf8, case.scale_factor)))
        ref_sf = reference.read_scales(ref["scale_out"], t, h, case.layout_code)
        differ_sf = sf != ref_sf
    elif quant == Quant.GROUP_FP8:
        t, h, g = case.num_tokens, case.hidden_dim, case.block_quant_group_size
        raw = moe.group_fp8_storage(got["scale_out"], t, h, g)
        sf = moe.read_group_fp8_scales(raw, t, h, g)
        s_lo = moe.read_group_fp8_scales(moe.quantize_group_fp8(inward, g)[1], t, h, g)
        s_hi = moe.read_group_fp8_scales(moe.quantize_group_fp8(outward, g)[1], t, h, g)
        scale_ok = (s_lo <= sf) & (sf <= s_hi)
        differ_sf = raw != ref["scale_out"]  # padding bytes included: they must be 0
        scale = sf.repeat_interleave(g, dim=1)
        value = got["quant_out"].float()
        code_lo, code_hi = reference.e4m3(lo / scale).float(), reference.e4m3(hi / scale).float()
    else:
        if quant == Quant.DYNAMIC_FP8:
            scale = got["scale_out"].float().reshape(-1, 1)
            s_lo = reference.quantize_dynamic_fp8(inward)[1]
            s_hi = reference.quantize_dynamic_fp8(outward)[1]
            scale_ok = (s_lo <= scale) & (scale <= s_hi)
            differ_sf = scale != ref["scale_out"].reshape(-1, 1)
        else:
            scale = torch.full((1,), case.scale_factor, device=n.device)
            scale_ok, differ_sf = torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)
        value = got["quant_out"].float()
        if quant == Quant.FP8:
            code_lo = reference.quantize_fp8(lo, case.scale_factor).float()
            code_hi = reference.quantize_fp8(hi, case.scale_factor).float()
        else:
            code_lo = reference.e4m3(lo / scale).float()
            code_hi = reference.e4m3(hi / scale).float()
    codes_ok = (code_lo <= value) & (value <= code_hi)
    res.boundary += int(differ.sum()) + int(differ_sf.sum())
    if exact and (differ.any() or differ_sf.any()):
        res.problems.append(f"quantised: {int(differ.sum())} code bytes and "
                            f"{int(differ_sf.sum())} scales differ from the reference")
    if not codes_ok.all():
        res.problems.append(f"quant_out: {int((~codes_ok).sum())} values off by more than "
                            "a rounding boundary")
    if not scale_ok.all():
        res.problems.append(f"scale_out: {int((~scale_ok).sum())} scales off by more than "
                            "a rounding boundary")
    _check_dequantised(got, n, case, res, slack=(hi - lo).abs())


def _pack(codes: torch.Tensor) -> torch.Tensor:
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def _check_dequantised(got, n: torch.Tensor, case: Case, res: CheckResult,
                       slack: torch.Tensor) -> None:
    """Dequantised output within the format's rounding error (plus `slack`, the norm
    tolerance) of the reference norm; saturated values and NVFP4 blocks whose scale
    saturated or underflowed excepted."""
    quant = PATTERNS[case.pattern].quant
    nf = n.float()
    sf = case.scale_factor
    if quant == Quant.NVFP4:
        t, h = case.num_tokens, case.hidden_dim
        deq = reference.dequantize_nvfp4(got["quant_out"], got["scale_out"], sf,
                                         case.layout_code).reshape(t, h // 16, 16)
        block = reference.read_scales(got["scale_out"], t, h, case.layout_code).unsqueeze(-1)
        err = (deq - nf.reshape(t, h // 16, 16)).abs() - slack.reshape(t, h // 16, 16)
        # E2M1's widest gap is 2 (4 to 6): half of it, in this block's units.
        bound = block / sf * 1.0 * (1 + 1e-6)
        exact = (block > 0) & (block < reference.FP8_MAX)
        bad = (err > bound) & exact
    else:
        scale = got["scale_out"].float().reshape(-1, 1) if quant == Quant.DYNAMIC_FP8 else sf
        if quant == Quant.GROUP_FP8:
            g = case.block_quant_group_size
            scale = moe.read_group_fp8_scales(got["scale_out"], case.num_tokens,
                                              case.hidden_dim, g).repeat_interleave(g, dim=1)
        deq = got["quant_out"].float() * scale
        # e4m3: half an ulp is 2^-4 relative; subnormals are 2^-9 apart.
        bound = nf.abs() * 2.0**-4 + 2.0**-10 * scale
        saturated = nf.abs() / scale >= reference.FP8_MAX
        bad = ((deq - nf).abs() - slack > bound * (1 + 1e-6)) & ~saturated
    if bad.any():
        res.problems.append(f"dequantised: {int(bad.sum())} values beyond the format's bound")


def differing_elements(got: torch.Tensor, want: torch.Tensor) -> int:
    """Elements of two tensors of one dtype whose bits differ, a NaN matching any NaN
    (docs/contract.md leaves NaN bits open)."""
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[got.element_size()]
    nan = got.float().isnan() & want.float().isnan()
    return int(((got.view(bits) != want.view(bits)) & ~nan).sum())


def digest(tensors: dict[str, torch.Tensor | None]) -> str:
    """A hash of the outputs' bytes, for checking bit-equality across ranks."""
    h = hashlib.sha256()
    for name in OUTPUT_NAMES:
        t = tensors.get(name)
        if t is not None:
            h.update(name.encode())
            h.update(_bytes(t).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def shared_digest(tensors: dict[str, torch.Tensor | None], case: Case) -> str:
    """`digest` of what every rank must get alike: every output when the ranks pass the
    same residual and gamma (`case.replicated`), else the all-reduced `output`."""
    return digest(tensors if case.replicated else {"output": tensors.get("output")})


def case_outputs(case: Case, device: torch.device | str, with_output: bool = True):
    """Poisoned tensors for every output `case.pattern` writes (`output` optional
    for residual patterns)."""
    t, h, traits = case.num_tokens, case.hidden_dim, PATTERNS[case.pattern]

    def new(shape, dtype=case.dtype):
        return poison(torch.empty(shape, dtype=dtype, device=device))

    out = {}
    if (with_output or not traits.norm) and case.pattern != MOE_PATTERNS[1]:
        out["output"] = new((t, h))  # (pattern 7 never writes it)
    if traits.norm:
        out["residual_out"] = new((t, h))
    if traits.norm_out:
        out["norm_out"] = new((t, h))
    if traits.quant in (Quant.FP8, Quant.DYNAMIC_FP8):
        out["quant_out"] = new((t, h), torch.float8_e4m3fn)
    if traits.quant == Quant.DYNAMIC_FP8:
        out["scale_out"] = new((t, 1), torch.float32)
    if traits.quant == Quant.NVFP4:
        out["quant_out"] = new((t, h // 2), torch.uint8)
        out["scale_out"] = new((sf_size(t, h // NVFP4_BLOCK, case.layout_code),), torch.uint8)
    if traits.quant == Quant.GROUP_FP8:  # DeepGEMM's strided int32 tensor, as vLLM makes it
        out["quant_out"] = new((t, h), torch.float8_e4m3fn)
        g = case.block_quant_group_size
        _, kp, tm = moe.group_fp8_layout(t, h, g)
        storage = new((moe.group_fp8_scale_bytes(t, h, g) // 4,), torch.int32)
        out["scale_out"] = storage.as_strided((t, kp), (1, tm))
    return out


def case_kwargs(case: Case, device: torch.device | str, rank: int = 0) -> dict[str, Any]:
    """The non-output keyword arguments of `allreduce_fusion` for `case` on `rank`."""
    traits = PATTERNS[case.pattern]
    if not traits.norm:
        return {}
    kwargs = case.own(rank, device)
    if traits.quant not in (Quant.FP8, Quant.NVFP4):
        del kwargs["scale_factor"]
    if traits.quant != Quant.NVFP4:
        del kwargs["layout_code"]
    if traits.quant != Quant.GROUP_FP8:
        del kwargs["block_quant_group_size"]
    return {**kwargs, **case.moe(rank, device)}


def precompile_cases(workspace, cases: list[tuple[Case, dict]], rank: int,
                     device: torch.device | str, comm: InProcessBackend | None = None) -> None:
    """Build every kernel variant `cases` ((case, run_case kwargs) pairs) need on this
    rank, launching nothing; with `comm`, rank 0 compiles first and the others then
    find Triton's cache warm, and all meet after."""
    from .api import allreduce_fusion

    for turn in (0, 1) if comm is not None else (1,):
        if comm is None or (rank == 0) == (turn == 0):
            with workspace.compile_only():
                for case, kw in cases:
                    kw = dict(kw)
                    out = case_outputs(case, device, kw.pop("with_output", True))
                    allreduce_fusion(case.input(rank, device), workspace, case.pattern, **out,
                                     **case_kwargs(case, device, rank), **kw)
        if comm is not None:
            comm.barrier()


@dataclass
class CaseResult:
    label: str
    check: CheckResult
    digest: str  # of the bits every rank must share: all outputs when replicated, else output


def run_case(workspace, case: Case, rank: int, world_size: int, device: torch.device | str,
             exact: bool = False, with_output: bool = True, comm: InProcessBackend | None = None,
             **call_kwargs) -> CaseResult:
    """One checked call of `allreduce_fusion` on this rank (all ranks must run it).

    Outputs are poisoned first; the result is compared with the reference built
    from every rank's input and this rank's own residual and gamma; `call_kwargs` go
    to allreduce_fusion (use_oneshot, launch_with_pdl, ...). With `comm` (ranks as
    threads), ranks meet at a barrier before the call and the rank's stream is
    synchronised after it (module docstring).
    """
    from .api import allreduce_fusion

    out = case_outputs(case, device, with_output)
    x, kwargs = case.input(rank, device), case_kwargs(case, device, rank)
    if comm is not None:
        comm.barrier()
    ret = allreduce_fusion(x, workspace, case.pattern, **out, **kwargs, **call_kwargs)
    if torch.device(device).type == "cuda":
        torch.cuda.current_stream().synchronize()
    want = out["norm_out"] if "norm_out" in out else out[PATTERNS[case.pattern].returns]
    if ret is not want:
        raise AssertionError("allreduce_fusion did not return norm_out (when passed) or the "
                             "pattern's output tensor")
    check = check_outputs(out, case.reference(world_size, device, rank), case, exact=exact)
    return CaseResult(case.label(), check, shared_digest(out, case))
