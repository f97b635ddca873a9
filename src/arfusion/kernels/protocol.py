"""The Lamport protocol both strategies share: sentinels, signatures, pushes, bounded
polls, rotation.

Memory. Each rank's symmetric buffer holds three equal *rotations* of
`buf_stride` elements (16 or 32 bits, the input's width). Call k uses rotation
`k % 3`. A peer's rotation is reached as `buf + delta[p]`, where `delta[p]` is the
element distance from this rank's buffer to peer p's, as mapped in this process.
A rotation starts with a header of N slots of `HDR_SLOT` elements; the
strategy's data follows at element `N * HDR_SLOT`.

Sentinel. An element that holds the all-ones bit pattern (-1 as an integer, a
NaN that no arithmetic result has: GPU NaNs are canonical) has not been written
yet in this call. Writers send every value as it is, except that an input
element with that exact NaN pattern is sent as the canonical NaN; so a reader
knows an element has arrived when it no longer reads the sentinel, one element
at a time, with no flags and no fences. Unlike a -0.0 sentinel this lets
finished values that are -0.0 (a tiny negative sum rounded to fp16) travel
bit-exact.

Signature. In call k, program 0 of rank r writes the call's signature
(`arfusion.signature`: tokens, hidden size, dtype, pattern, strategy, k) into
header slot r of rotation k % 3 of every rank: one-shot right after its first
data piece (written before it, the signature cost about twice as much at 1 token;
written after its whole share, it held every reader back until program 0 had pushed
all of it), two-shot before its scatter. Five
16-bit fields of 15 bits (so a written field never has the sentinel's top bit) in
two 64-bit words, written to every rank by one store (two lanes per rank); slot q
starts at byte 32 q whatever the element width.
A program's first poll (`check`, uniform in the program) loads all N slots' words
after its data in every spin (two lanes per rank: their reduction stays within a
warp up to 16 ranks) and uses no value before every slot has arrived equal to its
own signature; the fields of a word may land apart, so a word counts as arrived
once none of its fields has the top bit. Its other polls branch to a spin with no
header code at all: faster than one spin for both with the header masked off, and
than loading the header before the data.
A launch with SIG_MISC = NO_SIGNATURE neither writes nor reads the header (the
bench's timing-only variant, which measures what the signature costs).
A slot that arrives different stops the program at once: the signatures it saw
go to the host-visible error array and the workspace is aborted, so no rank
computes with a mismatched peer (the header sits at the same place whatever the
call's shape, so it is read correctly even when the data is not).

Polls. A poll loads every element it waits for, all slots together (one round trip
per spin), and counts in one block reduction per spin the elements where a slot
still holds the sentinel (the slots' unsigned maximum is all ones there: two 16-bit
lanes per instruction); data that has already arrived costs one pass. The header's
state (each warp loads it for itself) travels in the same reduction as thread 0 saw
it, and whether to give up (deadline, abort flag) is read after a spin and travels
in the next spin's reduction, so every warp leaves at the same pass (warps that left
at different passes would pair the wrong barriers); a poll that gives up with
everything arrived (the deadline passed in the last spin) reports nothing.

Rotation. During call k every rank clears (sets to the sentinel) the part of
its own rotation `(k - 1) % 3` that call k-1 used, header included. That is
race-free with three rotations: every element a peer writes into a rank's
buffer during a call is one that rank waits for during that same call, so by
the time it clears the rotation nothing more is in flight to it; and no peer
can write that rotation again before call k+2, which it can only start after it
received this rank's data of call k+1, which this rank sends after finishing
call k, clearing included. Hence consecutive calls need no barrier and no host
synchronisation.

State (local device memory, int64): STATE_EPOCH (the call counter k),
STATE_DONE (programs finished in this call), STATE_USED + r (what rotation r
used, in 16-element units, cleared one call later), STATE_ABORT (set once a
wait failed). A call reads all of them in one round trip. The last program to
finish a call bumps the epoch, so every program of a call reads the same k
however the grid is scheduled, and a CUDA graph replay advances it on the device.

Bounded waits. A poll gives up at a deadline (globaltimer) or once another
program has aborted; the ranks it was still waiting for are written to the
host-visible error array (int32: [0] failed, [1 + r] rank r missing,
[1 + N] signatures differed, [2 + N + 16 q + j] element j of rank q's
signature), which the host checks before the next call. An aborted workspace
does nothing on later calls.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..signature import SIG_LEN
from ..sizing import HEADER_SLOT
from .ptx import globaltimer, load_volatile, max_bits

STATE_EPOCH = tl.constexpr(0)
STATE_DONE = tl.constexpr(1)
STATE_USED = tl.constexpr(2)  # three entries, one per rotation
STATE_ABORT = tl.constexpr(5)
STATE_SIZE = 8  # int64 entries (host side)

ROTATIONS = 3
SENTINEL = -1  # all-ones bits
CANONICAL_NAN_BITS = {2: 0x7FFF, 4: 0x7FFFFFFF}  # by element size
HDR_SLOT = tl.constexpr(HEADER_SLOT)
SIG_ELEMS = tl.constexpr(SIG_LEN)
SIG_MASK = tl.constexpr(0x7FFF)
STOP_BIT = tl.constexpr(1 << 24)  # poll_status: unwritten + STOP_BIT * stop
DIFFER_BIT = tl.constexpr(1 << 25)  # + DIFFER_BIT * (a header slot differs)
SIG_WORDS = tl.constexpr(2)  # 64-bit header words a signature fills (SIG_ELEMS 16-bit fields)
SLOT_WORDS = tl.constexpr(4)  # 64-bit words between header slots: 32 bytes, any element width
FIELD_TOPS_W0 = tl.constexpr(0x1000100010001)  # a word >> 15: its four fields' top bits
HDR_DIFFER = tl.constexpr(1 << 16)  # header_status: unwritten + HDR_DIFFER * differing words
NO_SIGNATURE = tl.constexpr(-1)  # SIG_MISC of a launch that skips the header (timing only)


def error_words(world_size: int) -> int:
    """int32 entries of the host-visible error array (host side)."""
    return 2 + world_size + world_size * HDR_SLOT.value


@triton.jit
def sanitize(bits, CANON: tl.constexpr):
    """Bits to send: the sentinel pattern (a NaN) becomes the canonical NaN `CANON`
    (0x7FFF or 0x7FFFFFFF), so only "not yet written" ever reads as the sentinel."""
    return tl.where(bits == -1, CANON, bits)


@triton.jit
def signature_words(sig, WORLD: tl.constexpr):
    """The header words of the call's signature `sig` = (T, H, call counter, SIG_MISC)
    for every header lane: lane l stands for word l % SIG_WORDS of rank
    l // SIG_WORDS's slot. Word 0 holds fields e0..e3, word 1 e4 and three sentinel
    fields (arfusion.signature; field i at bits 16i of its word). Expanded only where
    used: its parts are live anyway (kernel arguments, constants, the call counter), so
    the signature holds no registers while rows are processed."""
    t = sig[0].to(tl.int64)
    h = t * 0 + sig[1]  # H may be a constexpr (hidden size 1)
    w0 = (t & SIG_MASK) | (((t >> 15) & SIG_MASK) << 16) | ((h & SIG_MASK) << 32) \
        | sig[3] << 48
    w1 = (sig[2].to(tl.int64) & SIG_MASK) - 65536  # e4, then all-ones fields
    w = header_lanes(WORLD) % SIG_WORDS
    return tl.where(w == 0, w0, w1)


@triton.jit
def header_words(buf_ptr):
    """The header of the rotation at `buf_ptr` as 64-bit words (slot q: SLOT_WORDS * q)."""
    return buf_ptr.to(tl.pointer_type(tl.int64))


@triton.jit
def header_lanes(WORLD: tl.constexpr):
    """The header's lanes: lane l stands for word l % SIG_WORDS of rank l // SIG_WORDS."""
    return tl.arange(0, triton.next_power_of_2(WORLD) * SIG_WORDS)


@triton.jit
def lane_deltas(deltas_ptr, WORLD: tl.constexpr):
    """peer_deltas for every header lane, loaded (two-shot; ptxas issues this load only
    once the peer offsets have arrived, but picking them (`lane_picks`) made the
    two-shot kernel spill in its polls: 360 B at BLOCK 8192, 4 ranks)."""
    lanes = header_lanes(WORLD)
    return tl.load(deltas_ptr + lanes // SIG_WORDS, mask=lanes < WORLD * SIG_WORDS, other=0)


@triton.jit
def pick_delta(ds, q, WORLD: tl.constexpr):
    """`ds[q]` (ds: peer_deltas) for a rank q known only at run time, a scalar or a
    tensor of ranks: selects, no load (ds[0] where q is no rank)."""
    d = ds[0] + (q * 0).to(tl.int64)
    for p in tl.static_range(1, WORLD):
        d = tl.where(q == p, ds[p], d)
    return d


@triton.jit
def lane_picks(ds, WORLD: tl.constexpr):
    """peer_deltas for every header lane, picked from `ds` (peer_deltas): no load, so
    the one-shot header goes out right after the data instead of a round trip later."""
    return pick_delta(ds, header_lanes(WORLD) // SIG_WORDS, WORLD)


@triton.jit
def publish_signature(sig, rot_off, rank, buf_ptr, lane_ds, WORLD: tl.constexpr):
    """Program 0: this rank's signature words into its header slot of every rank's
    rotation, all ranks in one store (`lane_ds`: lane_picks or lane_deltas; lane l
    writes word l % SIG_WORDS to rank l // SIG_WORDS). Nothing with NO_SIGNATURE."""
    if (tl.program_id(0) == 0) & (sig[3] != NO_SIGNATURE):
        words = signature_words(sig, WORLD)
        lanes = tl.arange(0, words.shape[0])
        tl.store(header_words(buf_ptr + rot_off + lane_ds) + rank * SLOT_WORDS
                 + lanes % SIG_WORDS, words, mask=lanes < WORLD * SIG_WORDS)


@triton.jit
def header_status(rot_ptr, sig, WORLD: tl.constexpr):
    """As this warp sees them: how many header words are unwritten, how many differ
    from `sig`. A word is unwritten while one of its signature fields still has the
    sentinel's top bit (a written field has 15 bits): the fields of a word may land
    apart. At most 16 lanes up to 8 ranks, so the one reduction stays in a warp.
    Nothing to wait for with NO_SIGNATURE (a constant: the loads compile away)."""
    words = signature_words(sig, WORLD)
    lanes = tl.arange(0, words.shape[0])
    w = lanes % SIG_WORDS
    signed = (sig[3] + lanes * 0) != NO_SIGNATURE  # per lane: the interpreter's & of a
    hm = (lanes < WORLD * SIG_WORDS) & signed  # scalar bool gives ints
    hv = load_volatile(header_words(rot_ptr) + (lanes // SIG_WORDS) * SLOT_WORDS + w, hm)
    tops = (hv >> 15) & tl.where(w == 0, FIELD_TOPS_W0, 1)  # bits 15, 31, 47, 63 of word 0
    code = tl.where(tops != 0, 1, tl.where(hv != words, HDR_DIFFER, 0))
    total = tl.sum(tl.where(hm, code, 0), axis=0)
    return total % HDR_DIFFER, total // HDR_DIFFER


@triton.jit
def report_missing(state_ptr, err_addr, peer, mask):
    """Mark the workspace aborted and tell the host which ranks never arrived
    (`peer` is a rank or, with `mask`, a rank per lane)."""
    tl.atomic_xchg(state_ptr + STATE_ABORT, 1)
    err = err_addr.to(tl.pointer_type(tl.int32))
    tl.store(err, 1)
    tl.store(err + 1 + (peer + tl.zeros(mask.shape, tl.int32)), 1, mask=mask)


@triton.jit
def report_header(rot_ptr, sig, differ, check, rank, state_ptr, err_addr,
                  WORLD: tl.constexpr):
    """After giving up: the signatures seen if one differed, else the ranks whose
    header never arrived. The header is loaded once more, field by field: the warps'
    own views of the last spin may lag the one the decision was taken on
    (poll_status)."""
    words = signature_words(sig, WORLD)
    lanes = tl.arange(0, words.shape[0] * (HDR_SLOT // SIG_WORDS))  # 16 per slot
    q = lanes // HDR_SLOT
    j = lanes % HDR_SLOT
    hm = (j < SIG_ELEMS) & (q < WORLD) & (check != 0)
    fields = header_words(rot_ptr).to(tl.pointer_type(tl.int16))
    hv = load_volatile(fields + q * (SLOT_WORDS * 4) + j, hm).to(tl.int32)
    if differ > 0:
        tl.atomic_xchg(state_ptr + STATE_ABORT, 1)
        w = tl.arange(0, words.shape[0])
        mine = tl.where(j < 4, tl.sum(tl.where(w == 0, words, 0), axis=0),
                        tl.sum(tl.where(w == 1, words, 0), axis=0))
        mine = ((mine >> (16 * (j % 4))) & 0xFFFF).to(tl.int32)
        err = err_addr.to(tl.pointer_type(tl.int32))
        tl.store(err + 2 + WORLD + lanes, tl.where(q == rank, mine, hv), mask=hm)
        tl.store(err + 1 + WORLD, 1)
        tl.store(err, 1)
    else:
        report_missing(state_ptr, err_addr, q, (hv == -1) & hm)


@triton.jit
def stop_requested(deadline, state_ptr):
    """1 past the deadline or once any program aborted the workspace, as this thread
    sees it: act on it only through `poll_status`."""
    late = globaltimer() > deadline
    return (late | (tl.load(state_ptr + STATE_ABORT, volatile=True) != 0)).to(tl.int32)


@triton.jit
def poll_status(unwritten, h_unwritten, differ, stop):
    """One block reduction: the elements still unwritten (`unwritten` per lane, fewer
    than STOP_BIT in all) and thread 0's view of the rest: header lanes unwritten,
    whether one differs (`header_status`), `stop`. Returns (unwritten, stop, differ),
    the same in every warp. So all warps leave a spin at the same pass: a flag each
    warp read for itself (the header, which each warp loads on its own, or the
    deadline) could let warps leave at different passes and the next barrier pair
    the wrong ones."""
    lane0 = tl.arange(0, unwritten.shape[0]) == 0
    rest = h_unwritten + stop * STOP_BIT + (differ > 0).to(tl.int32) * DIFFER_BIT
    total = tl.sum(unwritten + tl.where(lane0, rest, 0), axis=0)
    return total % STOP_BIT, (total // STOP_BIT) % 2, total // DIFFER_BIT


@triton.jit
def load_slots(data_ptr, offs, mask, slot_stride, WORLD: tl.constexpr, DT: tl.constexpr):
    """One pass over slots 0..N-1: their fp32 sum in rank order from +0.0, and per lane
    whether one of them still holds the sentinel (1 or 0)."""
    s = tl.zeros(offs.shape, tl.float32)
    top = tl.zeros(offs.shape, data_ptr.dtype.element_ty)
    for q in tl.static_range(WORLD):
        v = load_volatile(data_ptr + q * slot_stride + offs, mask)
        top = max_bits(top, v)
        s += v.to(DT, bitcast=True).to(tl.float32)
    return s, (top == -1).to(tl.int32)


@triton.jit
def header_poll(rot_ptr, sig, HEADER: tl.constexpr, WORLD: tl.constexpr):
    """header_status in a spin that checks the header; nothing at all in one that does
    not (see Signature)."""
    if HEADER:
        return header_status(rot_ptr, sig, WORLD)
    return 0, 0


@triton.jit
def spin_sum(rot_ptr, offs, mask, slot_stride, sig, rank, deadline, state_ptr, err_addr,
             HEADER: tl.constexpr, WORLD: tl.constexpr, DT: tl.constexpr):
    """sum_slots, the header checked (HEADER) or not: a spin loads the data, then the
    header words, and reduces both together."""
    data = rot_ptr + WORLD * HDR_SLOT
    s, unwritten = load_slots(data, offs, mask, slot_stride, WORLD, DT)
    h_unwritten, differ = header_poll(rot_ptr, sig, HEADER, WORLD)
    pending, stop, differ = poll_status(unwritten, h_unwritten, differ, 0)
    late = 0
    while (pending > 0) & (differ == 0) & (stop == 0):
        s, unwritten = load_slots(data, offs, mask, slot_stride, WORLD, DT)
        h_unwritten, differ = header_poll(rot_ptr, sig, HEADER, WORLD)
        pending, stop, differ = poll_status(unwritten, h_unwritten, differ, late)
        late = stop_requested(deadline, state_ptr)  # acted on at the next pass
    if (pending > 0) | (differ > 0):
        report_header(rot_ptr, sig, differ, HEADER, rank, state_ptr, err_addr, WORLD)
        for q in tl.static_range(WORLD):
            v = load_volatile(data + q * slot_stride + offs, mask)
            report_missing(state_ptr, err_addr, q, (v == -1) & mask & (differ == 0))
    return s


@triton.jit
def sum_slots(rot_ptr, offs, mask, slot_stride, sig, check, rank, deadline, state_ptr,
              err_addr, WORLD: tl.constexpr, DT: tl.constexpr):
    """fp32 sum over the data slots q = 0..N-1 (`rot_ptr + N*HDR_SLOT + q*slot_stride +
    offs`) in rank order from +0.0, once every element has arrived; if `check` (the same
    in the whole program), the header too (see Signature). Masked lanes sum to 0."""
    if check != 0:
        s = spin_sum(rot_ptr, offs, mask, slot_stride, sig, rank, deadline, state_ptr,
                     err_addr, True, WORLD, DT)
    else:
        s = spin_sum(rot_ptr, offs, mask, slot_stride, sig, rank, deadline, state_ptr,
                     err_addr, False, WORLD, DT)
    return s


@triton.jit
def spin_filled(rot_ptr, offs, mask, owner, sig, rank, deadline, state_ptr, err_addr,
                HEADER: tl.constexpr, WORLD: tl.constexpr):
    """wait_filled, the header checked (HEADER) or not, as in spin_sum."""
    ptr = rot_ptr + WORLD * HDR_SLOT + offs
    v = load_volatile(ptr, mask)
    h_unwritten, differ = header_poll(rot_ptr, sig, HEADER, WORLD)
    pending, stop, differ = poll_status((v == -1).to(tl.int32), h_unwritten, differ, 0)
    late = 0
    while (pending > 0) & (differ == 0) & (stop == 0):
        v = load_volatile(ptr, mask)
        h_unwritten, differ = header_poll(rot_ptr, sig, HEADER, WORLD)
        pending, stop, differ = poll_status((v == -1).to(tl.int32), h_unwritten, differ, late)
        late = stop_requested(deadline, state_ptr)  # acted on at the next pass
    if (pending > 0) | (differ > 0):
        report_header(rot_ptr, sig, differ, HEADER, rank, state_ptr, err_addr, WORLD)
        report_missing(state_ptr, err_addr, owner, (v == -1) & mask & (differ == 0))
    return v


@triton.jit
def wait_filled(rot_ptr, offs, mask, owner, sig, check, rank, deadline, state_ptr, err_addr,
                WORLD: tl.constexpr):
    """The bits at data element `offs` (`rot_ptr + N*HDR_SLOT + offs`) once none is the
    sentinel; if `check` (the same in the whole program), the header too. `owner`: the
    rank (per lane) that writes each element, reported if it never does. Masked-off lanes
    read 0."""
    if check != 0:
        v = spin_filled(rot_ptr, offs, mask, owner, sig, rank, deadline, state_ptr, err_addr,
                        True, WORLD)
    else:
        v = spin_filled(rot_ptr, offs, mask, owner, sig, rank, deadline, state_ptr, err_addr,
                        False, WORLD)
    return v


@triton.jit
def peer_deltas(deltas_ptr, WORLD: tl.constexpr):
    """The element distance to every rank's buffer, a tuple: loaded once per call, with
    the call's first loads (call_begin keeps them there)."""
    ds = ()
    for p in tl.static_range(WORLD):
        ds = ds + (tl.multiple_of(tl.load(deltas_ptr + p), 16),)
    return ds


@triton.jit
def store_to_peers(bits, offs, mask, buf_ptr, ds, WORLD: tl.constexpr):
    """Store `bits` at element `offs` of every rank's buffer (this rank's too); `ds`:
    peer_deltas."""
    for p in tl.static_range(WORLD):
        tl.store(buf_ptr + ds[p] + offs, bits, mask=mask)


@triton.jit
def call_begin(state_ptr, timeout_us, ds, rank, WORLD: tl.constexpr):
    """The call counter, whether the call goes on, the previous call's footprint
    (16-element units), read in one round trip with the peer offsets `ds`
    (peer_deltas); the wait deadline (the timeout travels in microseconds, an i32 for
    any bound up to 35 minutes).

    A call goes on when the workspace is not aborted and its state is sane: counter
    and footprint not negative, this rank's own offset 0. Those always hold; the test
    reads every first load, so ptxas issues them all before the branch (it sinks a
    load used only past a branch below it: the counter, footprints and peer offsets
    went out one round trip after the abort flag; ld.volatile, which keeps loads in
    place, is slower)."""
    epoch = tl.load(state_ptr + STATE_EPOCH)
    aborted = tl.load(state_ptr + STATE_ABORT)
    u0 = tl.load(state_ptr + STATE_USED)
    u1 = tl.load(state_ptr + STATE_USED + 1)
    u2 = tl.load(state_ptr + STATE_USED + 2)
    prev = (epoch + 2) % 3
    stale = tl.where(prev == 0, u0, tl.where(prev == 1, u1, u2))
    deadline = globaltimer() + timeout_us.to(tl.int64) * 1000
    go = (aborted == 0) & (epoch >= 0) & (stale >= 0) & (pick_delta(ds, rank, WORLD) == 0)
    return epoch, go, stale, deadline


@triton.jit
def clear_stale(buf_ptr, stale, epoch, buf_stride, BLOCK: tl.constexpr):
    """Reset to the sentinel what the previous call used of its rotation (this rank's):
    `stale` 16-element units."""
    # The bound is a product with 16, so Triton knows every 16-element group is wholly
    # in or out and stores 16 bytes at a time (with the bound as loaded, even marked
    # tl.multiple_of after a select, the SASS stored 2 bytes at a time).
    used = stale.to(tl.int32) * 16
    base = buf_ptr + ((epoch + 2) % 3) * buf_stride
    sentinel = tl.full([BLOCK], -1, dtype=buf_ptr.dtype.element_ty)
    for start in range(tl.program_id(0) * BLOCK, used, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(base + offs, sentinel, mask=offs < used)


@triton.jit
def call_end(state_ptr, epoch, used):
    """Record this call's footprint (`used` elements, whole 16-element slots); the last
    program to finish bumps the epoch."""
    if tl.program_id(0) == 0:
        tl.store(state_ptr + STATE_USED + epoch % 3, used // 16)
    # Relaxed: the counter only elects the last program (read-modify-writes of one
    # address are totally ordered); nothing else need be visible before the kernel
    # ends, which makes all of it visible to the next call. acq_rel fenced every
    # program's outstanding stores first (MEMBAR.ALL.GPU in the SASS).
    done = tl.atomic_add(state_ptr + STATE_DONE, 1, sem="relaxed")
    if done == tl.num_programs(0) - 1:
        tl.store(state_ptr + STATE_DONE, 0)
        tl.store(state_ptr + STATE_EPOCH, epoch + 1)
