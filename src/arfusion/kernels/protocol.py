"""The Lamport protocol both strategies share: sentinels, pushes, bounded polls, rotation.

Memory. Each rank's symmetric buffer holds three equal *rotations* of
`buf_stride` elements (16 or 32 bits, the input's width). Call k uses rotation
`k % 3`. A peer's rotation is reached as `buf + delta[p]`, where `delta[p]` is the
element distance from this rank's buffer to peer p's, as mapped in this process.

Sentinel. An element that holds the all-ones bit pattern (-1 as an integer, a
NaN that no arithmetic result has: GPU NaNs are canonical) has not been written
yet in this call. Writers send every value as it is, except that an input
element with that exact NaN pattern is sent as the canonical NaN; so a reader
knows an element has arrived when it no longer reads the sentinel, one element
at a time, with no flags and no fences. Unlike a -0.0 sentinel this lets
finished values that are -0.0 (a tiny negative sum rounded to fp16) travel
bit-exact.

Rotation. During call k every rank clears (sets to the sentinel) the part of
its own rotation `(k - 1) % 3` that call k-1 used. That is race-free with three
rotations: every element a peer writes into a rank's buffer during a call is
one that rank waits for during that same call, so by the time it clears the
rotation nothing more is in flight to it; and no peer can write that rotation
again before call k+2, which it can only start after it received this rank's
data of call k+1, which this rank sends after finishing call k, clearing
included. Hence consecutive calls need no barrier and no host synchronisation.

State (local device memory, int64): STATE_EPOCH (the call counter k),
STATE_DONE (programs finished in this call), STATE_USED + r (elements used in
rotation r, cleared one call later), STATE_ABORT (set once a wait timed out).
The last program to finish a call bumps the epoch, so every program of a call
reads the same k however the grid is scheduled, and a CUDA graph replay
advances it on the device.

Bounded waits. A poll gives up at a deadline (globaltimer) or once another
program has aborted; the ranks it was still waiting for are written to the
host-visible error array (`err[0] = 1`, `err[1 + r] = 1`), which the host checks
before the next call. An aborted workspace does nothing on later calls.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .ptx import globaltimer, load_volatile

STATE_EPOCH = tl.constexpr(0)
STATE_DONE = tl.constexpr(1)
STATE_USED = tl.constexpr(2)  # three entries, one per rotation
STATE_ABORT = tl.constexpr(5)
STATE_SIZE = 8  # int64 entries (host side)

ROTATIONS = 3
SENTINEL = -1  # all-ones bits
CANONICAL_NAN_BITS = {2: 0x7FFF, 4: 0x7FFFFFFF}  # by element size


@triton.jit
def sanitize(bits, CANON: tl.constexpr):
    """Bits to send: the sentinel pattern (a NaN) becomes the canonical NaN `CANON`
    (0x7FFF or 0x7FFFFFFF), so only "not yet written" ever reads as the sentinel."""
    return tl.where(bits == -1, CANON, bits)


@triton.jit
def report_missing(state_ptr, err_addr, peer, mask):
    """Mark the workspace aborted and tell the host which ranks never arrived
    (`peer` is a rank or, with `mask`, a rank per lane)."""
    tl.atomic_xchg(state_ptr + STATE_ABORT, 1)
    err = err_addr.to(tl.pointer_type(tl.int32))
    tl.store(err, 1)
    tl.store(err + 1 + (peer + tl.zeros(mask.shape, tl.int32)), 1, mask=mask)


@triton.jit
def wait_filled(ptr, mask, peer, deadline, state_ptr, err_addr):
    """Poll `ptr[mask]` until no element holds the sentinel; return the bits.

    Gives up at `deadline` (ns of globaltimer) or when the workspace was aborted
    by another program, then reports the rank (`peer`, scalar or per lane) of
    every element still unwritten. Masked-off lanes read 0.
    """
    v = load_volatile(ptr, mask)
    pending = tl.sum((v == -1).to(tl.int32), axis=0)
    give_up = pending * 0
    while (pending > 0) & (give_up == 0):
        v = load_volatile(ptr, mask)
        pending = tl.sum((v == -1).to(tl.int32), axis=0)
        if globaltimer() > deadline:
            give_up = 1
        if tl.load(state_ptr + STATE_ABORT, volatile=True) != 0:
            give_up = 1
    if pending > 0:
        report_missing(state_ptr, err_addr, peer, (v == -1) & mask)
    return v


@triton.jit
def sum_slots(rot_ptr, offs, mask, slot_stride, world_size, deadline, state_ptr, err_addr,
              DT: tl.constexpr):
    """fp32 sum over slots 0..N-1 (`rot_ptr + q * slot_stride + offs`), in rank order,
    from +0.0, each slot waited for. Masked lanes sum to 0."""
    s = tl.zeros(offs.shape, tl.float32)
    for q in range(world_size):
        bits = wait_filled(rot_ptr + q * slot_stride + offs, mask, q, deadline, state_ptr,
                           err_addr)
        s += bits.to(DT, bitcast=True).to(tl.float32)
    return s


@triton.jit
def store_to_peers(bits, offs, mask, buf_ptr, deltas_ptr, world_size):
    """Store `bits` at element `offs` of every rank's buffer (this rank's too)."""
    for p in range(world_size):
        d = tl.multiple_of(tl.load(deltas_ptr + p), 16)
        tl.store(buf_ptr + d + offs, bits, mask=mask)


@triton.jit
def call_begin(state_ptr, timeout_us):
    """Read the call counter and abort flag; start the wait deadline (the timeout
    travels in microseconds, an i32 for any bound up to 35 minutes)."""
    epoch = tl.load(state_ptr + STATE_EPOCH)
    aborted = tl.load(state_ptr + STATE_ABORT)
    deadline = globaltimer() + timeout_us.to(tl.int64) * 1000
    return epoch, aborted, deadline


@triton.jit
def clear_stale(buf_ptr, state_ptr, epoch, buf_stride, BLOCK: tl.constexpr):
    """Reset to the sentinel what the previous call used of its rotation (this rank's)."""
    prev = (epoch + 2) % 3
    # Footprints are whole 16-element slots: the hint lets the masked stores be
    # 16 bytes wide (a bound loaded at run time is otherwise of unknown alignment).
    used = tl.multiple_of(tl.load(state_ptr + STATE_USED + prev), 16)
    base = buf_ptr + prev * buf_stride
    sentinel = tl.full([BLOCK], -1, dtype=buf_ptr.dtype.element_ty)
    for start in range(tl.program_id(0) * BLOCK, used, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(base + offs, sentinel, mask=offs < used)


@triton.jit
def call_end(state_ptr, epoch, used):
    """Record this call's footprint; the last program to finish bumps the epoch."""
    if tl.program_id(0) == 0:
        tl.store(state_ptr + STATE_USED + epoch % 3, used)
    done = tl.atomic_add(state_ptr + STATE_DONE, 1, sem="acq_rel")
    if done == tl.num_programs(0) - 1:
        tl.store(state_ptr + STATE_DONE, 0)
        tl.store(state_ptr + STATE_EPOCH, epoch + 1)
