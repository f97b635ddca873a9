"""What the `trtllm` and `mnnvl` workspaces share: Lamport buffers over symmetric memory.

Footprint per rank: `sizing.buffer_bytes` of symmetric memory (three rotations,
each big enough for a one-shot call of E1 elements or a two-shot call of
E = max_token_num * hidden_dim elements), plus 64 bytes of protocol state on the
device and 4 * (N + 1) bytes of pinned host memory. Subclasses choose the
transport and the one-shot capacity E1 they ask for; one-shot is then allowed for
every call the rotations hold (`sizing.oneshot_fit`), which can be more.

World size 1 runs the local kernel (kernels/local.py): no Lamport traffic, no
protocol state; the transport still provides a token buffer.

destroy(): this rank's kernels finish first (every wait in them is bounded by
`timeout_s`), then the ranks meet for at most `timeout_s`. If all arrive, the
buffer is freed as usual; if not, the transport frees only what no peer can
still write (`memory.SymmetricBuffer.close`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch

from .. import heuristics, signature, sizing
from ..comm import BoundedSteps, CommBackend, set_up
from ..memory import SymmetricBuffer, ranks_on_my_gpu
from ..patterns import KERNEL_PATTERNS
from ..validation import FusionCall
from ..workspace import AllReduceFusionWorkspace


def load_kernels():
    """The kernel launcher (imports triton, hence lazily)."""
    try:
        from ..kernels import launch
    except ImportError as e:
        raise ImportError(
            "the trtllm and mnnvl backends need triton: pip install 'arfusion[cuda]'"
        ) from e
    return launch


class SymmetricWorkspace(AllReduceFusionWorkspace):
    served_patterns = KERNEL_PATTERNS
    def __init__(
        self,
        world_size: int,
        rank: int,
        max_token_num: int,
        hidden_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        oneshot_elements: int,
        comm: CommBackend,
        buffer_factory: Callable[[int, BoundedSteps], SymmetricBuffer],
        timeout_s: float | None = None,
    ):
        super().__init__(world_size, rank, max_token_num, hidden_dim, dtype, device)
        launch = load_kernels()
        elems = max_token_num * hidden_dim
        self.buf_stride = sizing.rotation_elements(world_size, elems, oneshot_elements)
        self.oneshot_elements = elems if world_size == 1 else min(
            elems, sizing.oneshot_fit(world_size, self.buf_stride))
        nbytes = sizing.buffer_bytes(world_size, elems, oneshot_elements, dtype)
        self.timeout_s = timeout_s
        setup = set_up(comm, self.timeout_s)  # every set-up exchange bounded
        self._buffer: SymmetricBuffer = buffer_factory(nbytes, setup)
        buf = self._buffer
        try:
            buf.local.fill_(0xFF)  # every element starts as the sentinel
            deltas = [p - buf.peer_ptrs[rank] for p in buf.peer_ptrs]
            if any(d % (16 * dtype.itemsize) for d in deltas):
                raise RuntimeError("peer buffers are not 16-element aligned")
            self._state = torch.zeros(launch.STATE_SIZE, dtype=torch.int64, device=device)
            self._err = torch.zeros(launch.error_words(world_size), dtype=torch.int32,
                                    pin_memory=True)
            self._err_np: np.ndarray = self._err.numpy()
            sharing = ranks_on_my_gpu(setup, device)
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            self._res = launch.Resources(
                buf=buf.local.view(launch.BITS[dtype.itemsize]),
                deltas=torch.tensor([d // dtype.itemsize for d in deltas], dtype=torch.int64,
                                    device=device),
                state=self._state,
                err_addr=self._err.data_ptr(),
                rank=rank,
                world_size=world_size,
                buf_stride=self.buf_stride,
                max_programs=max(1, sms // sharing),
                dummy={d: torch.zeros(1, dtype=d, device=device)
                       for d in (torch.uint8, torch.float32)},
            )
            self._launch = launch.Launcher(self._res, self.picks_oneshot)
            self._unsigned_plans: dict = {}  # without_signature's plans, kept apart
            self.footprint_bytes = nbytes
            torch.cuda.synchronize(device)
            setup.barrier("last barrier")  # buffers initialised
        except BaseException:
            buf.abandon()  # a peer may hold our buffer
            raise
        self._mark_ready()

    def capacity(self, use_oneshot: bool | None = None) -> int:
        return sizing.capacity(self.max_token_num * self.hidden_dim, self.oneshot_elements,
                               use_oneshot)

    def failed_ranks(self) -> list[int]:
        err, n = self._err_np, self.world_size
        if not err[0]:
            return []
        if sigs := self._mismatch():
            return [r for r, sig in sigs.items() if sig != sigs[self.rank]]
        return [r for r in range(n) if err[1 + r]]

    def _mismatch(self) -> dict[int, tuple]:
        """The signatures a kernel saw differ (rank -> fields), or {} (protocol.py: the
        error array's layout)."""
        err, n = self._err_np, self.world_size
        if not err[1 + n]:
            return {}
        lanes = err[2 + n:].reshape(n, sizing.HEADER_SLOT)[:, :signature.SIG_LEN]
        return {q: signature.decode(lanes[q]) for q in range(n) if (lanes[q] != -1).all()}

    def check(self) -> None:
        if not self._err_np[0]:  # every call asks: one read of pinned memory
            return
        if sigs := self._mismatch():
            raise RuntimeError(signature.mismatch_message(
                self.rank, sigs, signature.FIELDS,
                "that call's outputs are undefined and this workspace is unusable: destroy it "
                "and create a new one on every rank"))
        super().check()

    def picks_oneshot(self, num_elements: int, use_oneshot: bool | None = None) -> bool:
        """The strategy a call of `num_elements` per rank runs with."""
        if use_oneshot is not None:
            return use_oneshot
        return num_elements <= self.oneshot_elements and heuristics.choose_oneshot(
            self.world_size, num_elements, self.dtype)

    def run(self, call: FusionCall) -> None:
        self._launch(call, self._timeout_s)

    @contextlib.contextmanager
    def compile_only(self) -> Iterator[None]:
        """Within this block, calls compile and load the kernel variant they need but
        launch nothing (no peer needed, no protocol state touched, outputs untouched):
        a rank can build every variant before any rank's kernel waits for a peer."""
        self._launch.compile_only = True
        try:
            yield
        finally:
            self._launch.compile_only = False

    @contextlib.contextmanager
    def without_signature(self) -> Iterator[None]:
        """Timing only (the bench's signature cost): calls within this block neither
        write nor check the call signature, so ranks' mismatched calls go undetected;
        every rank must make the same calls in it. Their plans (unsigned launches) are
        kept apart from the signed ones, so both kinds of call can take turns on one
        workspace: an A/B on the same buffers, which differs in nothing else."""
        if not self._launch.signed:  # nested: the outer block restores
            yield
            return
        self._launch.signed = False
        self.plans, self._unsigned_plans = self._unsigned_plans, self.plans
        try:
            yield
        finally:
            self._launch.signed = True
            self.plans, self._unsigned_plans = self._unsigned_plans, self.plans

    @property
    def comm(self) -> CommBackend:
        return self._buffer.comm

    def precompile(self, **variants) -> int:
        from ..precompile import precompile

        variants.setdefault("tokens", self._launch.example_tokens(self.max_token_num))
        return precompile(self, **variants)

    def _release(self) -> None:
        self._buffer.close(self.timeout_s)
