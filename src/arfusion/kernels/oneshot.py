"""One-shot all-reduce + epilogue: every rank pushes its whole input to every rank.

Protocol of call k on rank r of N (see protocol.py for sentinels, signatures,
rotations and why clearing is race-free). b = k % 3, E = T*H, S = E rounded up
to 16 (`slot_stride`); rotation b of every buffer holds the header (N slots of
16 elements), then N data slots of S elements, slot q for rank q's input.

1. Push: the programs split the input into PUSH_BLOCK pieces, each stored,
   sanitised, into data slot r of rotation b of every rank's buffer
   (`buf + delta[p] + b*buf_stride + N*16 + r*S + e`), this rank's own included;
   program 0 writes this call's signature into header slot r of rotation b of
   every rank right after its first piece.
2. Clear: the part of rotation (k-1)%3 of this rank's buffer that call k-1 used
   is reset to the sentinel.
3. Reduce: program i takes rows i, i+P, ...; for each row chunk it loads the
   residual, then polls data slots 0..N-1 of rotation b in its own buffer
   together (the first chunk also the N signatures, all equal to its own) until
   no element is the sentinel, sums them in rank order in fp32 and runs the
   epilogue. Every element peers wrote is polled here, so nothing is in flight
   when the next call clears.
4. End: N*16 + N*S is recorded as rotation b's footprint; the last program bumps
   the epoch. With PDL the grid first waits for the previous kernel
   (griddepcontrol.wait) and releases its dependents after step 2 or at the end.

A program may wait for a piece another program of the same rank pushes, so the
host keeps the grid small enough for all programs (of every rank sharing the
GPU) to be resident at once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .epilogue import load_residual, process_rows, quant_scale, residual_add
from .protocol import (
    HDR_SLOT,
    call_begin,
    call_end,
    clear_stale,
    lane_picks,
    peer_deltas,
    publish_signature,
    sanitize,
    store_to_peers,
    sum_slots,
)
from .ptx import release_dependents, wait_for_previous_grid


@triton.jit
def reduce_chunk(rot_ptr, slot_stride, row, cols, cm, H, check, sig, rank, deadline,
                 state_ptr, err_addr, out_ptr, residual_in_ptr, residual_out_ptr,
                 NORM: tl.constexpr, WRITE_OUTPUT: tl.constexpr, WORLD: tl.constexpr):
    """Wait for every rank's copy of this row chunk, sum, add the residual."""
    r = load_residual(row, cols, cm, H, residual_in_ptr, NORM)
    s = sum_slots(rot_ptr, row * H + cols, cm, slot_stride, sig, check, rank, deadline,
                  state_ptr, err_addr, WORLD, out_ptr.dtype.element_ty)
    return residual_add(s, r, row, cols, cm, H, out_ptr, residual_out_ptr, NORM,
                        WRITE_OUTPUT)


@triton.jit(do_not_specialize=["scale_value", "eps", "weight_bias", "T", "rank",
                               "timeout_us"])
def oneshot_kernel(buf_ptr, deltas_ptr, state_ptr, err_addr, rank, buf_stride, timeout_us,
                   x_bits_ptr, out_ptr, residual_in_ptr, residual_out_ptr, gamma_ptr,
                   norm_out_ptr, quant_ptr, scale_out_ptr, scale_ptr, scale_value, eps,
                   weight_bias, T, H, slot_stride,
                   NORM: tl.constexpr, WRITE_OUTPUT: tl.constexpr, WRITE_NORM: tl.constexpr,
                   QUANT: tl.constexpr, LAYOUT: tl.constexpr, SCALE_FROM_PTR: tl.constexpr,
                   BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr, PUSH_BLOCK: tl.constexpr,
                   CANON: tl.constexpr, USE_PDL: tl.constexpr, TRIGGER_AT_END: tl.constexpr,
                   WORLD: tl.constexpr, SIG_MISC: tl.constexpr):
    wait_for_previous_grid(USE_PDL)
    n = T * H
    step = tl.num_programs(0) * PUSH_BLOCK
    first = tl.program_id(0) * PUSH_BLOCK + tl.arange(0, PUSH_BLOCK)
    # The first piece and the peer offsets load with the state: one round trip for all.
    first_bits = tl.load(x_bits_ptr + first, mask=first < n)
    ds = peer_deltas(deltas_ptr, WORLD)
    epoch, go, stale, deadline = call_begin(state_ptr, timeout_us, ds, rank, WORLD)
    if go:
        rot_off = (epoch % 3) * buf_stride
        sig = (T, H, epoch, tl.full([], SIG_MISC, tl.int64))  # protocol.signature_words
        mine = rot_off + WORLD * HDR_SLOT + rank * slot_stride
        store_to_peers(sanitize(first_bits, CANON), mine + first, first < n, buf_ptr, ds,
                       WORLD)
        publish_signature(sig, rot_off, rank, buf_ptr, lane_picks(ds, WORLD), WORLD)
        for start in range(tl.program_id(0) * PUSH_BLOCK + step, n, step):
            offs = start + tl.arange(0, PUSH_BLOCK)
            m = offs < n
            bits = sanitize(tl.load(x_bits_ptr + offs, mask=m), CANON)
            store_to_peers(bits, mine + offs, m, buf_ptr, ds, WORLD)
        clear_stale(buf_ptr, stale, epoch, buf_stride, PUSH_BLOCK)
        if not TRIGGER_AT_END:
            release_dependents(USE_PDL)
        scale = quant_scale(scale_ptr, scale_value, QUANT, SCALE_FROM_PTR)
        process_rows(reduce_chunk, buf_ptr + rot_off, slot_stride, T, H, sig, rank, deadline,
                     state_ptr, err_addr, out_ptr, residual_in_ptr, residual_out_ptr, gamma_ptr,
                     norm_out_ptr, quant_ptr, scale_out_ptr, eps, weight_bias, scale, NORM,
                     WRITE_OUTPUT, WRITE_NORM, QUANT, LAYOUT, BLOCK, NUM_CHUNKS, WORLD)
        call_end(state_ptr, epoch, WORLD * HDR_SLOT + WORLD * slot_stride)
    if TRIGGER_AT_END:
        release_dependents(USE_PDL)
