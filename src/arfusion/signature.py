"""Call signatures: what every rank's call must agree on, and the error when they do not.

Every backend compares, before any value is used, a small signature of each call
on every rank: the call's index in the workspace's sequence, num_tokens,
hidden_dim, the input dtype, the pattern and (Lamport kernels) the strategy.
The torch backend exchanges it first as a tuple; the Lamport kernels carry it in
the buffer (kernels/protocol.py) as `SIG_LEN` 16-bit fields of 15 bits each (so
never the sentinel's top bit), whatever the element width:

    e0 = T & 0x7FFF        e1 = (T >> 15) & 0x7FFF     e2 = H & 0x7FFF
    e3 = pattern | dtype << 4 | oneshot << 6 | ((H >> 15) & 0xFF) << 7
    e4 = call index & 0x7FFF

This module encodes the constant part (e3), decodes what a kernel reports, and
words the error every backend raises.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SIG_LEN = 5
FIELDS = ("call", "num_tokens", "hidden_dim", "dtype", "pattern", "strategy")
DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_DTYPES = {code: str(dt) for dt, code in DTYPE_CODES.items()}
_MASK = 0x7FFF


def encode_misc(pattern: int, dtype: torch.dtype, oneshot: bool, hidden_dim: int) -> int:
    """e3: the pattern, dtype, strategy and the high bits of hidden_dim."""
    return (pattern | DTYPE_CODES[dtype] << 4 | int(oneshot) << 6
            | ((hidden_dim >> 15) & 0xFF) << 7)


def decode(lanes: Sequence[int]) -> tuple:
    """The FIELDS of a signature from its SIG_LEN elements (the call index modulo 2^15)."""
    e0, e1, e2, e3, e4 = (int(v) for v in lanes[:SIG_LEN])
    return (e4, e0 | e1 << 15, e2 | ((e3 >> 7) & 0xFF) << 15,
            _DTYPES.get((e3 >> 4) & 3, "?"), e3 & 15, "oneshot" if (e3 >> 6) & 1 else "twoshot")


def mismatch_message(rank: int, sigs: dict[int, tuple], fields: Sequence[str],
                     consequence: str) -> str:
    """The RuntimeError text: which ranks issued which values for each field that
    differs (`sigs`: rank -> values in `fields` order)."""
    differ = [i for i in range(len(fields)) if len({s[i] for s in sigs.values()}) > 1]
    detail = "; ".join(
        f"{fields[i]}: " + ", ".join(f"rank {r} {sigs[r][i]}" for r in sorted(sigs))
        for i in differ)
    return (f"rank {rank}: ranks issued mismatched allreduce_fusion calls ({detail}); "
            f"{consequence}")
