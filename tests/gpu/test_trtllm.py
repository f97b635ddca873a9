"""The kernels on a GPU over both backends' transports (trtllm: direct pointers between
threads, CUDA IPC, symmetric memory; mnnvl: cuMem), N ranks as threads of one process
(one stream each).

Every call's outputs are poisoned first and compared with arfusion.reference built
from every rank's input and the rank's own residual and gamma (each rank draws its
own, except in `replicated` cases); output and residual_out must be bit-exact,
norm_out within 1 ulp, and every rank must get the same bits where all ranks pass
the same tensors (output always).
"""

from __future__ import annotations

import contextlib
import random
import subprocess
import sys
import time

import pytest
import torch

from arfusion import (
    AllReduceFusionPattern,
    allreduce_fusion,
    create_allreduce_fusion_workspace,
    reference,
)
from arfusion.comm import TorchDistBackend, set_up
from arfusion.patterns import KERNEL_PATTERNS, PATTERNS, Quant
from arfusion.testing import (
    Case,
    capture_graph,
    case_kwargs,
    case_outputs,
    check_outputs,
    precompile_cases,
    replay_graph,
    run_case,
    run_processes,
    run_ranks,
)

pytestmark = pytest.mark.gpu

P = AllReduceFusionPattern
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
HIDDEN = [1, 7, 64, 2880, 5120, 7168, 16384]
MAX_TOKENS = 300
MAX_HIDDEN = max(HIDDEN)
CUDA = "cuda:0"


BACKENDS = ["trtllm", "mnnvl"]  # the same kernels over two transports


def make_workspace(ctx, dtype, max_tokens=MAX_TOKENS, hidden=MAX_HIDDEN, backend="trtllm"):
    """A workspace for every strategy at every size (mnnvl: force_oneshot_support)."""
    return create_allreduce_fusion_workspace(
        backend, world_size=ctx.world_size, rank=ctx.rank, max_token_num=max_tokens,
        hidden_dim=hidden, dtype=dtype, comm_backend=ctx.comm,
        force_oneshot_support=backend == "mnnvl")


FLAGS = [  # (with_output, launch kwargs): cycled over (hidden, pattern, strategy)
    (False, dict(launch_with_pdl=False)),
    (True, dict(launch_with_pdl=True)),
    (False, dict(launch_with_pdl=True, trigger_completion_at_end=False)),
    (True, dict(launch_with_pdl=False)),
    (False, dict(launch_with_pdl=True)),
    (True, dict(launch_with_pdl=True, trigger_completion_at_end=False)),
]


def plan(world_size: int, dtype: torch.dtype, seed: int) -> list[tuple[Case, dict]]:
    """Random shapes covering 1 token, T < N and every hidden size; both strategies,
    with and without the raw `output`, PDL on and off. Which flags go with which
    (hidden, pattern, strategy) does not depend on the world size, so the kernel
    variants are the same at every world size."""
    rng = random.Random(seed)
    cases = []
    for hi, h in enumerate(HIDDEN):
        tokens = {1, max(1, world_size - 1), rng.randint(2, MAX_TOKENS if h <= 8192 else 40)}
        for pattern in (P.kAllReduce, P.kARResidualRMSNorm):
            for oneshot in (True, False):
                with_output, launch = FLAGS[(hi + 2 * pattern + oneshot) % len(FLAGS)]
                for t in sorted(tokens):
                    i = len(cases)
                    case = Case(pattern, t, h, dtype, seed=seed * 100_003 + i,
                                weight_bias=float(i % 2), rms_eps=1e-5 if i % 3 else 1e-6,
                                replicated=i % 3 == 0)
                    cases.append((case, dict(use_oneshot=oneshot, with_output=with_output,
                                             **launch)))
    return cases


def run_plan(ctx, dtype, seed, backend="trtllm"):
    """Every case of `plan`, after building every kernel variant it needs (the N-rank
    runs must not compile while a peer's kernel waits: see arfusion.testing)."""
    cases = plan(ctx.world_size, dtype, seed)
    with make_workspace(ctx, dtype, backend=backend) as ws:
        precompile_cases(ws, cases, ctx.rank, ctx.device, ctx.comm)
        return [run_case(ws, case, ctx.rank, ctx.world_size, ctx.device, comm=ctx.comm, **kw)
                for case, kw in cases]


def compile_first(ctx, ws, step):
    """Build what `step` launches (nothing runs), rank 0 first; then meet."""
    for turn in (0, 1):
        if (ctx.rank == 0) == (turn == 0):
            with ws.compile_only():
                step()
        ctx.comm.barrier()


def assert_all_good(results_by_rank):
    failures = []
    for i, r0 in enumerate(results_by_rank[0]):
        digests = {res[i].digest for res in results_by_rank}
        for rank, res in enumerate(results_by_rank):
            if not res[i].check.ok:
                failures.append(f"rank {rank} {res[i].label}: {res[i].check.problems}")
        if len(digests) > 1:
            failures.append(f"{r0.label}: ranks got different bits")
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_world_size_1_compiles_and_matches(dtype, backend):
    """World size 1: the local kernel (no exchange), the same epilogue."""
    assert_all_good(run_ranks(1, run_plan, dtype, 2, backend, device=CUDA))


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_match_reference(world_size, dtype, backend):
    assert_all_good(run_ranks(world_size, run_plan, dtype, world_size, backend, device=CUDA))


def _own_tensors_plan(rank: int, world_size: int) -> list[tuple[Case, dict]]:
    """Every pattern, both strategies, 1 token, fewer tokens than ranks and many; each
    rank its own residual, gamma (negative values too), weight_bias and scale."""
    cases = []
    for i, pattern in enumerate(KERNEL_PATTERNS):
        base = {Quant.FP8: 0.05, Quant.NVFP4: 200.0}.get(PATTERNS[pattern].quant, 1.0)
        for oneshot in (True, False):
            for t in sorted({1, max(1, world_size - 1), 37}):
                case = Case(pattern, t, 2880, torch.bfloat16, seed=100 * i + t,
                            layout_code=i % 3, scale_factor=base * (1 + rank / 4),
                            weight_bias=float(rank % 2), scale_as_tensor=bool(i % 2))
                cases.append((case, dict(use_oneshot=oneshot, with_output=oneshot)))
    return cases


def _own_tensors_rank(ctx, backend):
    cases = _own_tensors_plan(ctx.rank, ctx.world_size)
    with make_workspace(ctx, torch.bfloat16, 64, 2880, backend) as ws:
        precompile_cases(ws, cases, ctx.rank, ctx.device, ctx.comm)
        return [run_case(ws, case, ctx.rank, ctx.world_size, ctx.device, comm=ctx.comm, **kw)
                for case, kw in cases]


@pytest.mark.parametrize("world_size", [2, 4, 8])
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_rank_finishes_its_rows_with_its_own_tensors(world_size, backend):
    """Two-shot all-gathers the sum, never a peer's residual: each rank's residual_out,
    norm_out and quantised outputs follow from its own tensors (the reference built
    from them), for both strategies; output (cast(s)) is the same on every rank."""
    assert_all_good(run_ranks(world_size, _own_tensors_rank, backend, device=CUDA))


def _special_inputs(rank: int, dtype: torch.dtype, shape) -> torch.Tensor:
    """-0.0 everywhere, negative subnormals, or a mix, by rank."""
    bits = {2: torch.int16, 4: torch.int32}[dtype.itemsize]
    n = shape[0] * shape[1]
    neg_zero = torch.full((n,), -(2 ** (8 * dtype.itemsize - 1)), dtype=torch.int64)
    smallest = {torch.float16: 0x3FF, torch.bfloat16: 0x7F, torch.float32: 0x7FFFFF}[dtype]
    subnormal = neg_zero + 1 + torch.arange(n) % smallest
    x = [neg_zero, subnormal, torch.where(torch.arange(n) % 2 == 0, neg_zero, subnormal)]
    return x[rank % 3].to(bits).view(dtype).reshape(shape).to(CUDA)


def _special_rank(ctx, dtype, backend):
    shape = (5, 2880)
    inputs = [_special_inputs(r, dtype, shape) for r in range(ctx.world_size)]
    residual = _special_inputs(0, dtype, shape)  # all -0.0
    gamma = torch.ones(shape[1], dtype=dtype, device=CUDA)
    out = []
    with make_workspace(ctx, dtype, 8, shape[1], backend) as ws:
        for oneshot in (True, False):
            res_out = torch.empty(shape, dtype=dtype, device=CUDA)
            raw = torch.empty(shape, dtype=dtype, device=CUDA)

            def step(oneshot=oneshot, raw=raw, res_out=res_out):
                allreduce_fusion(inputs[ctx.rank], ws, P.kARResidualRMSNorm, output=raw,
                                 residual_out=res_out, residual_in=residual, rms_gamma=gamma,
                                 use_oneshot=oneshot)

            compile_first(ctx, ws, step)
            step()
            ctx.stream.synchronize()
            ref = reference.reference_allreduce_fusion(
                inputs, P.kARResidualRMSNorm, residual_in=residual, rms_gamma=gamma)
            out.append((torch.equal(raw.view(torch.uint8), ref["output"].view(torch.uint8)),
                        torch.equal(res_out.view(torch.uint8),
                                    ref["residual_out"].view(torch.uint8))))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [1, 3])
def test_negative_zero_and_negative_subnormals_are_exact(dtype, backend, world_size):
    for rank_result in run_ranks(world_size, _special_rank, dtype, backend, device=CUDA):
        assert rank_result == [(True, True), (True, True)]


MANY_HIDDEN = [1, 5, 16, 100, 1024]
MANY_COMBOS = [(h, p, o) for h in MANY_HIDDEN for p in (P.kAllReduce, P.kARResidualRMSNorm)
               for o in (True, False)]


def _many_calls_rank(ctx, calls, batch, backend):
    """`calls` calls with changing shapes, patterns and strategies, issued `batch` at a
    time back to back with no host synchronisation in between; all checked."""
    rng = random.Random(1234)  # same sequence on every rank
    bad = []
    with make_workspace(ctx, torch.bfloat16, 64, 1024, backend) as ws:
        precompile_cases(ws, [(Case(p, 3, h, torch.bfloat16), dict(use_oneshot=o))
                              for h, p, o in MANY_COMBOS], ctx.rank, CUDA, ctx.comm)
        for first in range(0, calls, batch):
            work = []
            for i in range(first, min(first + batch, calls)):
                h, pattern, oneshot = rng.choice(MANY_COMBOS)
                case = Case(pattern, rng.randint(1, 64), h, torch.bfloat16, seed=i)
                work.append((case, case.input(ctx.rank, CUDA), case_outputs(case, CUDA),
                             case_kwargs(case, CUDA, ctx.rank), oneshot))
            ctx.comm.barrier()
            for case, x, out, kw, oneshot in work:
                allreduce_fusion(x, ws, case.pattern, use_oneshot=oneshot, **out, **kw)
            ctx.stream.synchronize()
            for case, _, out, _, _ in work:
                check = check_outputs(out, case.reference(ctx.world_size, CUDA, ctx.rank), case)
                if not check.ok:
                    bad.append((case.label(), check.problems))
    return bad


@pytest.mark.parametrize("backend", BACKENDS)
def test_1000_consecutive_calls_with_changing_shapes(backend):
    for bad in run_ranks(4, _many_calls_rank, 1000, 50, backend, device=CUDA):
        assert bad == []


def _graph_rank(ctx, replays, backend):
    dtype = torch.bfloat16
    cases = [Case(P.kARResidualRMSNorm, 7, 2880, dtype, seed=0),
             Case(P.kAllReduce, 40, 4096, dtype, seed=0)]
    with make_workspace(ctx, dtype, 64, 4096, backend) as ws:
        static = []
        for case in cases:
            x = case.input(ctx.rank, CUDA)
            static.append((x, case_outputs(case, CUDA), case_kwargs(case, CUDA, ctx.rank)))

        def step():
            for (x, out, kw), case, oneshot in zip(static, cases, (True, False), strict=True):
                allreduce_fusion(x, ws, case.pattern, use_oneshot=oneshot, **out, **kw)

        compile_first(ctx, ws, step)
        graph = capture_graph(ctx, step)
        bad = 0
        for i in range(replays):
            for (x, out, _), case in zip(static, cases, strict=True):
                case.seed = i + 1
                x.copy_(case.input(ctx.rank, CUDA))
                for t in out.values():
                    t.view(torch.uint8).fill_(0xFF)
            replay_graph(ctx, graph)
            for (_, out, _), case in zip(static, cases, strict=True):
                # residual_in and gamma stay those captured (seed 0); only x changes.
                ref_case = Case(case.pattern, case.num_tokens, case.hidden_dim, dtype, seed=0)
                inputs = [Case(case.pattern, case.num_tokens, case.hidden_dim, dtype,
                               seed=i + 1).input(r, CUDA) for r in range(ctx.world_size)]
                kw = case_kwargs(ref_case, CUDA, ctx.rank)
                ref = reference.reference_allreduce_fusion(inputs, case.pattern, **kw)
                bad += not check_outputs(out, ref, ref_case).ok
        return bad


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_100_replays_on_new_data(backend):
    assert run_ranks(4, _graph_rank, 100, backend, device=CUDA) == [0, 0, 0, 0]


def _timeout_rank(ctx, backend):
    case = Case(P.kAllReduce, 4, 256, torch.float16)
    with make_workspace(ctx, torch.float16, 4, 256, backend) as ws:
        if ctx.rank == 1:
            return None  # never calls; destroy below still meets rank 0
        ws.timeout_s = 2.0
        start = time.monotonic()
        allreduce_fusion(case.input(0, CUDA), ws, P.kAllReduce)
        torch.cuda.current_stream().synchronize()
        elapsed = time.monotonic() - start
        with pytest.raises(RuntimeError, match=r"ranks \[1\] did not arrive"):
            ws.check()
        with pytest.raises(RuntimeError, match=r"ranks \[1\]"):
            allreduce_fusion(case.input(0, CUDA), ws, P.kAllReduce)
        return elapsed


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rank_failing_after_the_creation_meeting_is_named(backend, monkeypatch):
    """Rank 1 meets its peers, then fails allocating its buffer: it raises its own error,
    and rank 0 a RuntimeError naming it and the set-up step it never reached, within
    the wait bound (issue 28 item 1), not a hang."""
    from arfusion.memory.cumem import CuMemBuffer
    from arfusion.memory.in_process import InProcessBuffer

    cls = InProcessBuffer if backend == "trtllm" else CuMemBuffer
    real = cls.__init__

    def fails_on_rank_1(self, setup, nbytes, device):
        if setup.Get_rank() == 1:
            raise RuntimeError("injected: out of memory")
        real(self, setup, nbytes, device)

    monkeypatch.setattr(cls, "__init__", fails_on_rank_1)
    monkeypatch.setenv("ARFUSION_TIMEOUT_S", "3")

    def rank_fn(ctx):
        start = time.monotonic()
        try:
            make_workspace(ctx, torch.bfloat16, 8, 256, backend).destroy()
            return "created", time.monotonic() - start
        except RuntimeError as e:
            return str(e), time.monotonic() - start

    (msg0, took0), (msg1, _) = run_ranks(2, rank_fn, device=CUDA)
    assert msg1 == "injected: out of memory"
    step = "buffer exchange" if backend == "trtllm" else "device census"
    assert msg0.startswith(f"rank 0: ranks [1] did not reach the workspace set-up's {step}"), msg0
    assert took0 < 10.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_rank_times_out_and_is_named(backend):
    elapsed, _ = run_ranks(2, _timeout_rank, backend, device=CUDA)
    assert 1.5 < elapsed < 10.0


# What rank 1 changes in its call, and what every rank's error must say.
MISMATCHES = {
    "num_tokens": (dict(t=5), "num_tokens: rank 0 4, rank 1 5"),
    "hidden_dim": (dict(h=272), "hidden_dim: rank 0 256, rank 1 272"),
    "dtype": (dict(dtype=torch.float16), "dtype: rank 0 torch.bfloat16, rank 1 torch.float16"),
    "pattern": (dict(pattern=P.kAllReduce), "pattern: rank 0 1, rank 1 0"),
    "strategy": (dict(oneshot=False), "strategy: rank 0 oneshot, rank 1 twoshot"),
}


def _mismatch_rank(ctx, backend, change, oneshot):
    mine = dict(t=4, h=256, dtype=torch.bfloat16, pattern=P.kARResidualRMSNorm,
                oneshot=oneshot)
    if ctx.rank == 1:
        mine.update(MISMATCHES[change][0])
    case = Case(mine["pattern"], mine["t"], mine["h"], mine["dtype"], seed=3)
    kw = dict(use_oneshot=mine["oneshot"])
    with make_workspace(ctx, torch.bfloat16, 8, 512, backend) as ws:
        ws.timeout_s = 20.0
        precompile_cases(ws, [(case, kw)], ctx.rank, CUDA, ctx.comm)
        start = time.monotonic()
        allreduce_fusion(case.input(ctx.rank, CUDA), ws, case.pattern,
                         **case_outputs(case, CUDA), **case_kwargs(case, CUDA, ctx.rank), **kw)
        torch.cuda.current_stream().synchronize()
        elapsed = time.monotonic() - start
        with pytest.raises(RuntimeError) as raised:
            ws.check()
        with pytest.raises(RuntimeError, match="mismatched"):  # and every later call
            allreduce_fusion(case.input(ctx.rank, CUDA), ws, case.pattern,
                             **case_outputs(case, CUDA), **case_kwargs(case, CUDA, ctx.rank), **kw)
        return elapsed, str(raised.value), ws.failed_ranks()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change,oneshot", [(c, o) for c in MISMATCHES for o in (True, False)
                                            if c != "strategy" or o])
def test_mismatched_calls_are_named_on_every_rank_at_once(backend, change, oneshot):
    """The call signature travels with the data: each rank stops at the first poll and
    names what differed, long before the 20 s wait bound."""
    for rank, (elapsed, message, failed) in enumerate(
            run_ranks(2, _mismatch_rank, backend, change, oneshot, device=CUDA)):
        assert elapsed < 5.0, (rank, elapsed)
        assert f"rank {rank}: ranks issued mismatched" in message, message
        assert MISMATCHES[change][1] in message, message
        assert failed == [1 - rank]


def _with_and_without_signature_rank(ctx):
    """Calls with the signature and without it (timing only, one block or two nested)
    taking turns on one workspace, both strategies, as the bench's signature rows make
    them; then a mismatched signed call, which must still be named."""
    cases = [(Case(P.kARResidualRMSNorm, t, 512, torch.bfloat16, seed=t),
              dict(use_oneshot=o)) for t in (1, 5) for o in (True, False)]
    with make_workspace(ctx, torch.bfloat16, 8, 512) as ws:
        ws.timeout_s = 20.0
        precompile_cases(ws, cases, ctx.rank, CUDA, ctx.comm)
        with ws.without_signature():
            precompile_cases(ws, cases, ctx.rank, CUDA, ctx.comm)
        ok = []
        for turn in ("with", "without", "with", "nested"):
            for case, kw in cases:
                with contextlib.ExitStack() as stack:
                    for _ in range({"with": 0, "without": 1, "nested": 2}[turn]):
                        stack.enter_context(ws.without_signature())
                    ok.append(run_case(ws, case, ctx.rank, ctx.world_size, CUDA,
                                       comm=ctx.comm, **kw).check.ok)
        ws.check()
        case = cases[0 if ctx.rank == 0 else 2][0]  # 1 token on rank 0, 5 on the others
        ctx.comm.barrier()
        allreduce_fusion(case.input(ctx.rank, CUDA), ws, case.pattern,
                         **case_outputs(case, CUDA), **case_kwargs(case, CUDA, ctx.rank),
                         use_oneshot=True)
        torch.cuda.current_stream().synchronize()
        with pytest.raises(RuntimeError, match="mismatched"):
            ws.check()
        return ok


def test_calls_with_and_without_signature_take_turns_on_one_workspace():
    for ok in run_ranks(3, _with_and_without_signature_rank, device=CUDA):
        assert ok == [True] * 16


def _precompiled_rank(ctx, backend):
    """Create with precompile (PDL variants of two patterns), then real calls of other
    token counts, strategies, triggers and scale kinds: none may compile anything."""
    import triton

    h = 512
    with create_allreduce_fusion_workspace(
            backend, world_size=ctx.world_size, rank=ctx.rank, max_token_num=64,
            hidden_dim=h, dtype=torch.bfloat16, comm_backend=ctx.comm,
            force_oneshot_support=True) as ws:
        variants = ws.precompile(patterns=[P.kARResidualRMSNorm, P.kARResidualRMSNormFP4Quant],
                                 launch_with_pdl=(True,))
        misses = []
        ctx.comm.barrier()
        if ctx.rank == 0:  # Triton's hook on every in-memory cache miss (a compile or load)
            assert hasattr(triton.knobs.runtime, "jit_cache_hook")
            triton.knobs.runtime.jit_cache_hook = \
                lambda *a, **k: misses.append(str(k.get("repr", k))[:300]) and False
        ctx.comm.barrier()
        ok = []
        try:
            for i, (t, oneshot, trigger, tensor_scale) in enumerate(
                    [(1, None, True, False), (5, True, False, True), (64, False, True, True),
                     (33, None, False, False)]):
                for pattern in (P.kARResidualRMSNorm, P.kARResidualRMSNormFP4Quant):
                    case = Case(pattern, t, h, torch.bfloat16, seed=i,
                                scale_as_tensor=tensor_scale)
                    ok.append(run_case(ws, case, ctx.rank, ctx.world_size, CUDA,
                                       with_output=False, comm=ctx.comm, use_oneshot=oneshot,
                                       launch_with_pdl=True,
                                       trigger_completion_at_end=trigger).check.ok)
            hot_path_misses = list(misses)
            if ctx.rank == 0:  # the hook does see a variant no test has built (one per
                with ws.compile_only():  # backend: both share the kernels' cache)
                    allreduce_fusion(torch.zeros(1, h, dtype=torch.float16, device=CUDA), ws,
                                     P.kAllReduce, launch_with_pdl=True,
                                     trigger_completion_at_end=False,
                                     use_oneshot=backend == "mnnvl")
        finally:
            ctx.comm.barrier()
            if ctx.rank == 0:
                triton.knobs.runtime.jit_cache_hook = None
        return variants, ok, hot_path_misses, len(misses) - len(hot_path_misses)


@pytest.mark.parametrize("backend", BACKENDS)
def test_precompile_leaves_nothing_to_compile(backend):
    results = run_ranks(2, _precompiled_rank, backend, device=CUDA)
    for variants, ok, misses, _ in results:
        assert variants == 2 * 2 + 2 * 2 * 2  # strategies x triggers (x scale kinds)
        assert all(ok) and len(ok) == 8
        assert misses == []
    assert results[0][3] >= 1  # the control: a new variant is seen by the hook


def test_torch_compile_and_custom_op():
    from arfusion.comm import InProcessGroup

    comm = InProcessGroup(1).backends()[0]
    ws = create_allreduce_fusion_workspace("trtllm", world_size=1, rank=0, max_token_num=16,
                                           hidden_dim=256, dtype=torch.bfloat16,
                                           comm_backend=comm)
    case = Case(P.kARResidualRMSNorm, 16, 256, torch.bfloat16)
    kw = case_kwargs(case, CUDA, 0)

    def fused(x, residual, gamma):
        return allreduce_fusion(x, ws, P.kARResidualRMSNorm, residual_in=residual,
                                rms_gamma=gamma, weight_bias=kw["weight_bias"])

    x = case.input(0, CUDA)
    compiled = torch.compile(fused)
    got = compiled(x, kw["residual_in"], kw["rms_gamma"])
    want = fused(x, kw["residual_in"], kw["rms_gamma"])
    assert torch.equal(got, want)
    torch.library.opcheck(
        torch.ops.arfusion.allreduce_fusion_.default,
        (x, id(ws), 0, False, True, torch.empty_like(x), None, None, None, None, None, None,
         1e-6, None, -1.0, 0, -1, 0.0, -1, None, -1, None, None, None, None, None),
        test_utils=("test_schema", "test_faketensor"))
    ws.destroy()


def _symm_world1(rank, world_size):
    from arfusion.memory.torch_symm import TorchSymmBuffer

    ws = create_allreduce_fusion_workspace("trtllm", world_size=1, rank=0, max_token_num=16,
                                           hidden_dim=2880, dtype=torch.bfloat16)
    transport = type(ws._buffer).__name__
    results = [run_case(ws, Case(p, 16, 2880, torch.bfloat16, seed=p), 0, 1, CUDA,
                        use_oneshot=o).check.ok
               for p in (P.kAllReduce, P.kARResidualRMSNorm) for o in (True, False)]
    ws.destroy()
    return transport == TorchSymmBuffer.__name__, results


def test_symmetric_memory_transport_world_size_1():
    is_symm, results = run_processes(1, _symm_world1, backend="nccl")[0]
    assert is_symm and all(results)


def _ipc_rank(rank, world_size):
    from arfusion.memory import wrap_pointer
    from arfusion.memory.cuda_ipc import CudaIpcBuffer

    device = torch.device(CUDA)
    comm = TorchDistBackend()
    ok = []
    free_before = None
    for i in range(21):
        if i == 1:  # after one round: the CUDA runtime's own start-up memory is in use
            torch.cuda.synchronize()
            free_before = torch.cuda.mem_get_info(device)[0]
        buf = CudaIpcBuffer(set_up(comm, 30.0), 4 << 20, device)
        buf.local.fill_(rank + 1)
        torch.cuda.synchronize()
        comm.barrier()
        peer = wrap_pointer(buf.peer_ptrs[1 - rank], buf.nbytes, device)
        ok.append(bool((peer == 2 - rank).all()))  # read the peer's buffer
        peer[rank * 64:(rank + 1) * 64].fill_(100 + rank)  # write into it
        torch.cuda.synchronize()
        comm.barrier()
        mine = buf.local[(1 - rank) * 64:(2 - rank) * 64]
        ok.append(bool((mine == 101 - rank).all()))
        del peer, mine
        buf.close(30.0)
    torch.cuda.synchronize()
    comm.barrier()
    free_after = torch.cuda.mem_get_info(device)[0]
    return ok, free_before - free_after


def test_cuda_ipc_between_two_processes_on_one_gpu():
    for ok, leaked in run_processes(2, _ipc_rank, backend="gloo"):
        assert all(ok) and len(ok) == 42
        assert leaked < (4 << 20)  # 20 buffers of 4 MiB created and freed


def test_auto_picks_trtllm_for_ranks_in_one_process():
    def rank_fn(ctx):
        with create_allreduce_fusion_workspace(
                "auto", world_size=4, rank=ctx.rank, max_token_num=8, hidden_dim=64,
                dtype=torch.bfloat16, comm_backend=ctx.comm) as ws:
            return ws.backend
    assert run_ranks(4, rank_fn, device=CUDA) == ["trtllm"] * 4


def test_demo_on_one_gpu():
    proc = subprocess.run([sys.executable, "-m", "arfusion", "demo", "--world-size", "4",
                           "--dtype", "bf16", "--patterns", "0,1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "emulation" in proc.stdout and " 0 failed" in proc.stdout
