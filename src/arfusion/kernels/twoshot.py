"""Two-shot all-reduce + epilogue: reduce-scatter by element chunks, all-gather, finish rows.

Protocol of call k on rank r of N (see protocol.py for sentinels, signatures,
rotations and why clearing is race-free). b = k % 3, E = T*H, C = ceil(E/N)
rounded up to 16 (`chunk`); rank p owns elements [p*C, min((p+1)*C, E)).
Rotation b of every buffer holds the header (N slots of 16 elements), then, at
offsets from the end of the header:

- scatter, N slots of C elements at [q*C]: sender q's copy of this rank's chunk;
- gather, E elements at [N*C]: the all-reduced sum cast(s), in the input dtype, at
  its global element index.

1. Scatter: program 0 writes this call's signature into header slot r of
   rotation b of every rank; for each owner p, this rank stores its elements of
   chunk p, sanitised, into scatter slot r of rotation b of p's buffer.
2. Clear: the part of rotation (k-1)%3 of this rank's buffer that call k-1 used
   is reset to the sentinel.
3. Reduce: the programs split this rank's chunk; each piece is polled in slots
   0..N-1 together (a program's first piece also the N signatures, all equal to
   its own) until written, summed in rank order in fp32, and cast(s) stored to the
   gather region of every rank.
4. Finish: program i takes rows i, i+P, ...; it loads its own residual, polls the
   row in the gather region (its first row also the signatures), writes output and
   residual_out = cast(cast(s) + residual_in) and runs RMSNorm + quantisation on the
   whole row locally with its own gamma. Every rank finishes its rows from the same
   cast(s) with its own tensors, exactly as one-shot does (the all-gather moves only
   the sum, never a peer's residual or the larger set of finished outputs).
5. End: N*16 + 2*N*C is recorded as rotation b's footprint; the last program bumps
   the epoch.

Splitting by elements rather than token rows keeps every rank busy for any
T >= 1, T < N included. Steps 3 and 4 wait on pieces other programs of the same
rank produce, so the host keeps every program resident at once.
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
    lane_deltas,
    peer_deltas,
    publish_signature,
    sanitize,
    store_to_peers,
    sum_slots,
    wait_filled,
)
from .ptx import release_dependents, wait_for_previous_grid


@triton.jit
def gathered_chunk(rot_ptr, chunk, row, cols, cm, H, check, sig, rank, deadline, state_ptr,
                   err_addr, out_ptr, residual_in_ptr, residual_out_ptr, NORM: tl.constexpr,
                   WRITE_OUTPUT: tl.constexpr, WORLD: tl.constexpr):
    """Wait for this row chunk's cast(s) in the gather region, add this rank's own
    residual."""
    e = row * H + cols
    r = load_residual(row, cols, cm, H, residual_in_ptr, NORM)
    s = wait_filled(rot_ptr, WORLD * chunk + e, cm, e // chunk, sig, check, rank, deadline,
                    state_ptr, err_addr, WORLD).to(out_ptr.dtype.element_ty, bitcast=True)
    return residual_add(s, r, row, cols, cm, H, out_ptr, residual_out_ptr, NORM,
                        WRITE_OUTPUT)


@triton.jit(do_not_specialize=["scale_value", "eps", "weight_bias", "T", "rank",
                               "timeout_us"])
def twoshot_kernel(buf_ptr, deltas_ptr, state_ptr, err_addr, rank, buf_stride, timeout_us,
                   x_bits_ptr, out_ptr, residual_in_ptr, residual_out_ptr, gamma_ptr,
                   norm_out_ptr, quant_ptr, scale_out_ptr, scale_ptr, scale_value, eps,
                   weight_bias, T, H, chunk,
                   NORM: tl.constexpr, WRITE_OUTPUT: tl.constexpr, WRITE_NORM: tl.constexpr,
                   QUANT: tl.constexpr, LAYOUT: tl.constexpr, SCALE_FROM_PTR: tl.constexpr,
                   BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr, PUSH_BLOCK: tl.constexpr,
                   CANON: tl.constexpr, USE_PDL: tl.constexpr, TRIGGER_AT_END: tl.constexpr,
                   WORLD: tl.constexpr, SIG_MISC: tl.constexpr):
    wait_for_previous_grid(USE_PDL)
    ds = peer_deltas(deltas_ptr, WORLD)
    lane_ds = lane_deltas(deltas_ptr, WORLD)
    epoch, go, stale, deadline = call_begin(state_ptr, timeout_us, ds, rank, WORLD)
    if go:
        DT = out_ptr.dtype.element_ty
        IT = buf_ptr.dtype.element_ty
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        rot_off = (epoch % 3) * buf_stride
        data_off = rot_off + WORLD * HDR_SLOT
        n = T * H
        sig = (T, H, epoch, tl.full([], SIG_MISC, tl.int64))  # protocol.signature_words
        publish_signature(sig, rot_off, rank, buf_ptr, lane_ds, WORLD)
        # 1. Scatter this rank's piece of every owner's chunk.
        for p in tl.static_range(WORLD):
            lo = p * chunk
            length = tl.minimum(tl.maximum(n - lo, 0), chunk)
            for start in range(pid * PUSH_BLOCK, length, nprog * PUSH_BLOCK):
                offs = start + tl.arange(0, PUSH_BLOCK)
                m = offs < length
                bits = sanitize(tl.load(x_bits_ptr + lo + offs, mask=m), CANON)
                tl.store(buf_ptr + ds[p] + data_off + rank * chunk + offs, bits, mask=m)
        clear_stale(buf_ptr, stale, epoch, buf_stride, PUSH_BLOCK)
        if not TRIGGER_AT_END:
            release_dependents(USE_PDL)
        # 3. Reduce the owned chunk and all-gather cast(s).
        lo = rank * chunk
        length = tl.minimum(tl.maximum(n - lo, 0), chunk)
        for start in range(pid * PUSH_BLOCK, length, nprog * PUSH_BLOCK):
            offs = start + tl.arange(0, PUSH_BLOCK)
            m = offs < length
            s = sum_slots(buf_ptr + rot_off, offs, m, chunk, sig, start == pid * PUSH_BLOCK,
                          rank, deadline, state_ptr, err_addr, WORLD, DT)
            store_to_peers(sanitize(s.to(DT).to(IT, bitcast=True), CANON),
                           data_off + WORLD * chunk + lo + offs, m, buf_ptr, ds, WORLD)
        # 4. Finish whole rows from the gathered sum and this rank's own tensors.
        scale = quant_scale(scale_ptr, scale_value, QUANT, SCALE_FROM_PTR)
        process_rows(gathered_chunk, buf_ptr + rot_off, chunk, T, H, sig, rank, deadline,
                     state_ptr, err_addr, out_ptr, residual_in_ptr, residual_out_ptr, gamma_ptr,
                     norm_out_ptr, quant_ptr, scale_out_ptr, eps, weight_bias, scale, NORM,
                     WRITE_OUTPUT, WRITE_NORM, QUANT, LAYOUT, BLOCK, NUM_CHUNKS, WORLD)
        call_end(state_ptr, epoch, WORLD * HDR_SLOT + 2 * WORLD * chunk)
    if TRIGGER_AT_END:
        release_dependents(USE_PDL)
