"""Run under Triton's interpreter (TRITON_INTERPRET=1, set by tests/test_header.py before
triton is imported): publishes call signatures into a header with the kernels' own
`publish_signature` and reads it back with `header_status`, printing one JSON line per case:
what the header shows as (unwritten words, differing words)."""

from __future__ import annotations

import json

import torch
import triton
import triton.language as tl

from arfusion.kernels import protocol as P
from arfusion.signature import SIG_LEN
from arfusion.sizing import HEADER_SLOT

T, H, MISC, EPOCH = 4, 256, 17, 5


@triton.jit
def _publish(buf_ptr, deltas_ptr, rank, T, H, epoch_ptr, WORLD: tl.constexpr,
             SIG_MISC: tl.constexpr, PICK: tl.constexpr = False):
    sig = (T, H, tl.load(epoch_ptr), tl.full([], SIG_MISC, tl.int64))
    if PICK:  # one-shot's lane offsets
        lane_ds = P.lane_picks(P.peer_deltas(deltas_ptr, WORLD), WORLD)
    else:  # two-shot's
        lane_ds = P.lane_deltas(deltas_ptr, WORLD)
    P.publish_signature(sig, 0, rank, buf_ptr, lane_ds, WORLD)


@triton.jit
def _status(buf_ptr, out_ptr, T, H, epoch_ptr, WORLD: tl.constexpr, SIG_MISC: tl.constexpr):
    sig = (T, H, tl.load(epoch_ptr), tl.full([], SIG_MISC, tl.int64))
    unwritten, differ = P.header_status(buf_ptr, sig, WORLD)
    tl.store(out_ptr, unwritten)
    tl.store(out_ptr + 1, differ)


def header(n: int, dtype: torch.dtype, writers, tokens: dict | None = None,
           misc: int = MISC) -> torch.Tensor:
    """A cleared header of n slots with the signatures of `writers` published (rank ->
    its own num_tokens in `tokens`, default T)."""
    buf = torch.full((n * HEADER_SLOT,), -1, dtype=dtype)
    deltas = torch.zeros(n, dtype=torch.int64)
    for r in writers:
        _publish[(1,)](buf, deltas, r, (tokens or {}).get(r, T), H, torch.tensor([EPOCH]),
                       WORLD=n, SIG_MISC=misc)
    return buf


def spread(n: int, pick: bool) -> list:
    """Every rank publishing into n header regions of one allocation (rank p's buffer at
    region p, reached through its peer offsets as in a kernel); each region's header."""
    size = n * HEADER_SLOT
    buf = torch.full((n * size,), -1, dtype=torch.int16)
    for r in range(n):
        deltas = torch.tensor([(p - r) * size for p in range(n)], dtype=torch.int64)
        _publish[(1,)](buf[r * size:], deltas, r, T, H, torch.tensor([EPOCH]), WORLD=n,
                       SIG_MISC=MISC, PICK=pick)
    return [buf[q * size:(q + 1) * size] for q in range(n)]


def status(buf: torch.Tensor, n: int, misc: int = MISC) -> list[int]:
    out = torch.zeros(2, dtype=torch.int32)
    _status[(1,)](buf, out, T, H, torch.tensor([EPOCH]), WORLD=n, SIG_MISC=misc)
    return out.tolist()


def main() -> None:
    for n in (2, 3, 8, 16):
        for dtype in (torch.int16, torch.int32):
            name = f"{n}-{str(dtype)[6:]}"
            cases = dict(all=header(n, dtype, range(n)), none=header(n, dtype, []),
                         even=header(n, dtype, range(0, n, 2)),
                         other_tokens=header(n, dtype, range(n), {n - 1: T + 1}))
            for case, buf in cases.items():
                print(json.dumps([name, case, status(buf, n)]))
    for n in (2, 3, 8):  # both ways to the peers' headers: each region complete, the same
        picked, loaded = spread(n, True), spread(n, False)
        print(json.dumps([f"{n}-int16", "spread", [[status(h, n) for h in picked],
                          all(torch.equal(a, b) for a, b in zip(picked, loaded, strict=True))]]))
    fields = header(2, torch.int16, [1]).view(torch.int16)[16:24].tolist()
    print(json.dumps(["2-int16", "fields", fields]))
    for f in range(SIG_LEN):  # one field of a written word not landed yet
        buf = header(4, torch.int16, range(4))
        buf[16 + f] = -1
        print(json.dumps(["4-int16", f"torn{f}", status(buf, 4)]))
    # The bench's timing-only launches: nothing written, nothing waited for.
    buf = header(4, torch.int16, range(4), misc=P.NO_SIGNATURE.value)
    print(json.dumps(["4-int16", "unsigned_writes", int((buf != -1).sum())]))
    print(json.dumps(["4-int16", "unsigned_waits", status(buf, 4, P.NO_SIGNATURE.value)]))


if __name__ == "__main__":
    main()
