"""From a validated call to a kernel launch: which kernel, block sizes, grid, arguments.

World size 1 runs `local.local_kernel` (no exchange); N > 1 the one-shot or
two-shot Lamport kernel.

Hot path: the first call of a (signature, strategy, pointer alignment) has Triton's
JIT compile the variant (or find it in its disk cache) and load it, without
launching; it is kept in the plan with its grid and constants. Every launch, the
first included, goes directly through Triton's driver launcher (its C function
where `launch_entry` allows) with raw pointers: no argument specialisation, no
allocation, no synchronisation. The key holds everything Triton specialises on
(dtypes and shapes through the validation plan, the 16-byte alignment of every
pointer), so the direct path always runs the kernel the JIT would have picked.

`Launcher.compile_only` builds the variant a call needs and launches nothing (ranks
that share a GPU compile everything first: see arfusion.testing;
`workspace.precompile` uses it too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton

from ..patterns import Quant
from ..signature import encode_misc
from ..sizing import chunk_elements, round_up
from ..validation import FusionCall
from .local import local_kernel
from .oneshot import oneshot_kernel
from .protocol import CANONICAL_NAN_BITS, NO_SIGNATURE, STATE_SIZE, error_words
from .twoshot import twoshot_kernel

__all__ = ["BITS", "STATE_SIZE", "Launcher", "Resources", "error_words"]

MAX_BLOCK = 8192  # widest row chunk held in registers
# World size 1, patterns that keep the normalised row and its quantisation live together
# (NVFP4, or FP8 next to norm_out): an 8192-wide chunk takes 73-106 registers a thread at
# 16 warps (Triton 3.6, scripts/compile_check.py), so one program per SM; two chunks of
# 4096 take 40-55 (the row goes through residual_out and is re-read from L2), two
# programs per SM: faster when there are more rows than programs fit at once, slower
# below, so only then. (The N-rank kernels hold one program per SM either way.)
MAX_QUANT_BLOCK = 4096
# World size 1, more rows than programs fit at once: three 16-warp programs share an SM
# with at most 40 registers a thread (65536 / 1536, allocated in eights). The compiler
# takes more for some quant patterns at 4096 columns (dynamic FP8's quotients side by
# side: epilogue.divide_by), two programs an SM, which is slower. Capped only where
# the cap costs no spills (checked on the compiled kernel).
ROWS_MAXNREG = 40
BITS = {2: torch.int16, 4: torch.int32}
MAX_TIMEOUT_US = 2**31 - 1  # keeps the argument an i32 whatever the timeout
_raw_stream = torch._C._cuda_getCurrentRawStream  # what Triton's own launches use


@dataclass
class Resources:
    """What a rank's kernels need besides the call: its memory and protocol state."""

    buf: torch.Tensor  # this rank's symmetric buffer, as 16/32-bit integers
    deltas: torch.Tensor  # int64 [N]: element distance from buf to each rank's buffer
    state: torch.Tensor  # int64 protocol state (protocol.py)
    err_addr: int  # host-visible int32 error array (pinned; layout in protocol.py)
    rank: int
    world_size: int
    buf_stride: int  # elements per rotation
    max_programs: int  # programs that can be resident at once for this rank
    dummy: dict[torch.dtype, torch.Tensor]  # stand-ins for pointers a pattern never uses


@dataclass(frozen=True, slots=True)
class Prepared:
    """A compiled variant and what its launches share."""

    launch: Callable  # launch(*front, stream, *head, *static, *ptrs, *scalars, *back)
    head: tuple  # what `launch` takes between the stream and the kernel's arguments
    front: tuple  # the grid: (programs, 1, 1)
    back: tuple  # T, H, (N > 1) the slot / chunk stride, then the constexprs in order


class Launcher:
    """Launches validated calls for one rank (one per workspace). `picks_oneshot(n,
    use_oneshot)` is the workspace's strategy rule, asked once per plan. Compiled
    variants are kept in each plan's `launches`, by the call's pointer alignment."""

    def __init__(self, res: Resources, picks_oneshot: Callable[[int, bool | None], bool]):
        self.res = res
        self.compile_only = False
        self.signed = True  # False only to time what the signature costs (the bench)
        self._picks_oneshot = picks_oneshot
        self._device = res.buf.device.index
        self._u8 = res.dummy[torch.uint8]
        self._f32 = res.dummy[torch.float32]
        self._timeout_s: float | None = None
        self._static: tuple = ()  # the kernels' leading arguments: the rank's own (N > 1)

    def example_tokens(self, max_token_num: int) -> tuple[int, ...]:
        """Token counts whose calls need different variants (precompile builds each):
        at world size 1, more rows than programs fit at once may take narrower chunks."""
        if self.res.world_size == 1 and max_token_num > self.res.max_programs:
            return (1, self.res.max_programs + 1)
        return (1,)

    def _tensors(self, call: FusionCall) -> list[torch.Tensor]:
        """The pointer arguments every kernel takes after the input."""
        x, traits = call.input, call.traits
        sf = call.scale_factor
        return [
            call.output if call.output is not None else call.residual_out,
            call.residual_in if traits.norm else x,
            call.residual_out if traits.norm else x,
            call.rms_gamma if traits.norm else x,
            call.norm_out if traits.norm_out else x,
            call.quant_out if call.quant_out is not None else self._u8,
            call.scale_out if call.scale_out is not None else self._u8,
            sf if isinstance(sf, torch.Tensor) else self._f32,
        ]

    def _set_timeout(self, timeout_s: float) -> None:
        """The leading arguments for this wait bound (microseconds, an i32 whatever the
        bound): the rank's buffer, deltas, state, error array, rank, rotation stride."""
        res = self.res
        self._timeout_s = timeout_s
        if res.world_size > 1:
            self._static = (res.buf.data_ptr(), res.deltas.data_ptr(), res.state.data_ptr(),
                            res.err_addr, res.rank, res.buf_stride,
                            min(int(timeout_s * 1e6), MAX_TIMEOUT_US))

    def __call__(self, call: FusionCall, timeout_s: float) -> None:
        plan = call.plan
        prep = plan.launches.get(call.align)
        if prep is None or self.compile_only:
            oneshot = self._picks_oneshot(plan.num_tokens * plan.hidden_dim, plan.use_oneshot)
            plan.launches[call.align] = prep = self._build(call, oneshot, timeout_s)
            if self.compile_only:
                return
        if timeout_s is not self._timeout_s:  # the workspace passes the same float object
            self._set_timeout(timeout_s)
        sf = call.scale_factor
        # Pointers the pattern never reads are 0: its constexprs skip them.
        prep.launch(*prep.front, _raw_stream(self._device), *prep.head, *self._static,
                    *call.ptrs, sf if sf.__class__ is float else 1.0, call.rms_eps,
                    call.weight_bias, *prep.back)

    def _build(self, call: FusionCall, oneshot: bool, timeout_s: float) -> Prepared:
        """Through Triton's JIT: compile (or find on disk) and load the variant a call
        needs. Returns what its launches share."""
        res, x, traits = self.res, call.input, call.traits
        t, h = call.num_tokens, call.hidden_dim
        n = t * h
        many_live = traits.quant == Quant.NVFP4 or (traits.quant != Quant.NONE and traits.norm_out)
        # One-shot at 8+ ranks with a residual polls 8+ slots of a chunk at once: 8192
        # columns spilled there, 4096 did not and is faster; kAllReduce keeps 8192.
        narrow = oneshot and res.world_size >= 8 and traits.norm
        widest = (MAX_QUANT_BLOCK if narrow or many_live and res.world_size == 1
                  and t > res.max_programs else MAX_BLOCK)
        block = max(64, min(triton.next_power_of_2(h), widest))
        # At least two elements per thread: no lane holds a replicated copy of another's.
        num_warps = min(16, max(1, block // 256))
        sf = call.scale_factor
        scalars = [sf if sf.__class__ is float else 1.0, call.rms_eps, call.weight_bias, t, h]
        consts = dict(
            NORM=traits.norm, WRITE_OUTPUT=call.plan.write_output, WRITE_NORM=traits.norm_out,
            QUANT=int(traits.quant), LAYOUT=call.layout_code if traits.quant == Quant.NVFP4
            else 0, SCALE_FROM_PTR=isinstance(sf, torch.Tensor), BLOCK=block,
            NUM_CHUNKS=triton.cdiv(h, block))
        if res.world_size == 1:
            kernel, stride, grid = local_kernel, 0, t
            args = [x, *self._tensors(call), *scalars]
        else:
            push_block = num_warps * 32 * (16 // x.element_size())
            if oneshot:
                kernel, stride = oneshot_kernel, round_up(n, 16)
                pieces = triton.cdiv(n, push_block)
            else:
                kernel, stride = twoshot_kernel, chunk_elements(n, res.world_size)
                pieces = triton.cdiv(stride, push_block)
            grid = min(res.max_programs, max(t, pieces))
            args = [res.buf, res.deltas, res.state, res.err_addr, res.rank, res.buf_stride,
                    min(int(timeout_s * 1e6), MAX_TIMEOUT_US), x.view(BITS[x.element_size()]),
                    *self._tensors(call), *scalars, stride]
            consts.update(PUSH_BLOCK=push_block, CANON=CANONICAL_NAN_BITS[x.element_size()],
                          WORLD=res.world_size,
                          SIG_MISC=encode_misc(call.pattern, x.dtype, oneshot, h)
                          if self.signed else NO_SIGNATURE.value)
        consts.update(USE_PDL=call.launch_with_pdl,
                      TRIGGER_AT_END=call.trigger_completion_at_end or not call.launch_with_pdl)
        options = dict(num_warps=num_warps, launch_pdl=call.launch_with_pdl,
                       enable_fp_fusion=False)
        compiled = None
        if res.world_size == 1 and t > res.max_programs and num_warps == 16:
            compiled = kernel.warmup(*args, grid=(grid,), **consts, **options,
                                     maxnreg=ROWS_MAXNREG)
            compiled._init_handles()
            if compiled.n_spills:
                compiled = None
        if compiled is None:
            compiled = kernel.warmup(*args, grid=(grid,), **consts, **options)
            compiled._init_handles()  # load the module now, not during a launch
        consts = tuple(consts[name] for name in kernel.arg_names if name in consts)
        return Prepared(*launch_entry(compiled), (grid, 1, 1),
                        (t, h, *consts) if res.world_size == 1 else (t, h, stride, *consts))


def launch_entry(compiled: Any) -> tuple[Callable, tuple]:
    """How later calls launch `compiled` (a loaded triton CompiledKernel): with Triton
    3.6, whose launcher this layout was read from, straight into its C launch function
    with what its Python wrapper (CudaLauncher.__call__) would add (about a microsecond
    less per call), unless the kernel needs scratch memory, which that wrapper allocates
    per call; otherwise through the wrapper, as Triton's own launches go."""
    launcher = compiled.run
    if (triton.__version__.startswith("3.6.") and not launcher.global_scratch_size
            and not launcher.profile_scratch_size):
        return launcher.launch, (compiled.function, launcher.launch_cooperative_grid,
                                 launcher.launch_pdl, None, None, compiled.packed_metadata,
                                 None, None, None)
    return launcher, (compiled.function, compiled.packed_metadata, None, None, None)
