"""Run under Triton's interpreter (TRITON_INTERPRET=1, set by tests/test_kernels_interpreted.py
before triton is imported): the one-shot and two-shot kernels themselves on the CPU, one
process per rank (forked, so one shared buffer sits at the same address in every rank),
one program per rank, every rank with its own residual, gamma and weight_bias. Prints one
JSON line per case: world size, strategy, dtype, pattern, tokens, and per rank whether
its outputs match arfusion.reference built from its own tensors (testing.check_outputs),
the error word and the call counter after the call.

What the interpreter cannot run is replaced here, not in the kernels: the PTX of
`max_bits` and `globaltimer` (an unsigned maximum; a clock that never passes the
deadline), and a poll without the header returns zeros as tensors (the interpreter
keeps the constant 0 a Python int, where compiled code has an i32)."""

from __future__ import annotations

import json
import multiprocessing as mp

import torch
import triton
import triton.language as tl

from arfusion.kernels import protocol as P

_header_status = P.header_status


@triton.jit
def _max_bits(a, b):
    if a.dtype.primitive_bitwidth == 32:
        m = tl.maximum(a.to(tl.uint32, bitcast=True), b.to(tl.uint32, bitcast=True))
    else:
        m = tl.maximum(a.to(tl.uint16, bitcast=True), b.to(tl.uint16, bitcast=True))
    return m.to(a.dtype, bitcast=True)


@triton.jit
def _globaltimer():
    return tl.full([], 0, tl.int64)


@triton.jit
def _header_poll(rot_ptr, sig, HEADER: tl.constexpr, WORLD: tl.constexpr):
    if HEADER:
        return _header_status(rot_ptr, sig, WORLD)
    return tl.zeros([], tl.int32), tl.zeros([], tl.int32)


P.max_bits, P.globaltimer, P.header_poll = _max_bits, _globaltimer, _header_poll

from arfusion import sizing  # noqa: E402
from arfusion.kernels.oneshot import oneshot_kernel  # noqa: E402
from arfusion.kernels.twoshot import twoshot_kernel  # noqa: E402
from arfusion.patterns import PATTERNS  # noqa: E402
from arfusion.signature import encode_misc  # noqa: E402
from arfusion.testing import Case, case_kwargs, case_outputs, check_outputs  # noqa: E402

BITS = {2: torch.int16, 4: torch.int32}
H = 40


def _rank(r, world, big, rotation, case, oneshot, results):
    traits, dtype, t = PATTERNS[case.pattern], case.dtype, case.num_tokens
    try:
        buf = big[r * 3 * rotation:(r + 1) * 3 * rotation]
        deltas = torch.tensor([(p - r) * 3 * rotation for p in range(world)], dtype=torch.int64)
        state = torch.zeros(P.STATE_SIZE, dtype=torch.int64)
        err = torch.zeros(P.error_words(world), dtype=torch.int32)
        x = case.input(r)
        out = case_outputs(case, "cpu", with_output=True)
        kw = case_kwargs(case, "cpu", r)
        unused = torch.zeros(1, dtype=torch.uint8)
        block = max(64, triton.next_power_of_2(H))
        stride = sizing.round_up(t * H, 16) if oneshot else sizing.chunk_elements(t * H, world)
        kernel = oneshot_kernel if oneshot else twoshot_kernel
        kernel[(1,)](
            buf, deltas, state, err.data_ptr(), r, rotation, 10**6, x.view(BITS[dtype.itemsize]),
            out["output"], kw.get("residual_in", x), out.get("residual_out", x),
            kw.get("rms_gamma", x), out.get("norm_out", x), unused, unused, torch.ones(1), 1.0,
            1e-6, case.weight_bias, t, H, stride, NORM=traits.norm, WRITE_OUTPUT=True,
            WRITE_NORM=traits.norm_out, QUANT=0, LAYOUT=0, SCALE_FROM_PTR=False, BLOCK=block,
            NUM_CHUNKS=1, PUSH_BLOCK=block, CANON=P.CANONICAL_NAN_BITS[dtype.itemsize],
            USE_PDL=False, TRIGGER_AT_END=True, WORLD=world,
            SIG_MISC=encode_misc(case.pattern, dtype, oneshot, H))
        chk = check_outputs(out, case.reference(world, "cpu", r), case)
        results.put((r, [chk.ok, int(err[0]), int(state[0])]))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        results.put((r, [False, repr(e)[-300:], -1]))


def run(world, oneshot, dtype, pattern, t):
    rotation = sizing.rotation_elements(world, t * H, t * H)
    big = torch.full((world * 3 * rotation,), -1, dtype=BITS[dtype.itemsize]).share_memory_()
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, big, rotation,
                                             Case(pattern, t, H, dtype, seed=7 * world + t,
                                                  weight_bias=float(r % 2)), oneshot, results))
             for r in range(world)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(10)
    return [got[r] for r in range(world)]


if __name__ == "__main__":
    for world in (2, 3, 4):
        for oneshot in (True, False):
            for dtype in (torch.float16, torch.float32):  # the interpreter rounds bf16 apart
                for pattern in (0, 1):
                    for t in (1, 3, 5):
                        print(json.dumps([world, oneshot, str(dtype), pattern, t,
                                          run(world, oneshot, dtype, pattern, t)]), flush=True)
