"""Compile every kernel variant for sm_90 without a GPU (needs only triton installed).

    python scripts/compile_check.py [--quick]

Catches Triton front-end and PTX errors on a CPU-only machine; prints registers and
local-memory bytes (ptxas spills) per variant. Use the Triton version the GPUs run
(the device image has 3.6): register allocation differs between versions.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
import triton.language.target_info as target_info
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, "src")
from arfusion.kernels.local import local_kernel  # noqa: E402
from arfusion.kernels.oneshot import oneshot_kernel  # noqa: E402
from arfusion.kernels.protocol import CANONICAL_NAN_BITS  # noqa: E402
from arfusion.kernels.twoshot import twoshot_kernel  # noqa: E402
from arfusion.patterns import PATTERNS, Quant  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_target() -> GPUTarget:
    return TARGET


# Kernels ask which arch they compile for (kernels/ptx.py: cuda_capability_geq), which
# Triton asks of the active driver; a machine without a GPU has none: answer for TARGET.
compile_target.__triton_builtin__ = True  # as Triton marks the one it replaces
target_info.current_target = compile_target
DT = {"bf16": ("bf16", "i16", 2), "fp16": ("fp16", "i16", 2), "fp32": ("fp32", "i32", 4)}


def signature(dt: str, quant: Quant, scale_from_ptr: bool) -> dict[str, str]:
    fdt, idt, _ = DT[dt]
    qdt = {Quant.FP8: "fp8e4nv", Quant.DYNAMIC_FP8: "fp8e4nv"}.get(quant, "u8")
    sdt = "fp32" if quant == Quant.DYNAMIC_FP8 else "u8"
    return {
        "x_ptr": f"*{fdt}", "x_bits_ptr": f"*{idt}", "buf_ptr": f"*{idt}", "deltas_ptr": "*i64",
        "state_ptr": "*i64", "err_addr": "i64", "out_ptr": f"*{fdt}",
        "residual_in_ptr": f"*{fdt}", "residual_out_ptr": f"*{fdt}", "gamma_ptr": f"*{fdt}",
        "norm_out_ptr": f"*{fdt}", "quant_ptr": f"*{qdt}", "scale_out_ptr": f"*{sdt}",
        "scale_ptr": "*fp32", "scale_value": "fp32", "eps": "fp32", "weight_bias": "fp32",
        "T": "i32", "H": "i32", "rank": "i32", "buf_stride": "i32",
        "slot_stride": "i32", "chunk": "i32", "timeout_us": "i32",
    }


def compile_one(kernel, dt, pattern, write_output, layout, block, chunks, pdl, trigger,
                hidden_one=False, world=4):
    traits = PATTERNS[pattern]
    generic = signature(dt, traits.quant, False)
    # What Triton's launcher specialises for real tensors: 16-byte aligned pointers and
    # 16-divisible strides (and H, for the wide blocks that stand for real hidden sizes).
    sig = {name: generic[name] for name in kernel.arg_names if name in generic}
    aligned = [i for i, name in enumerate(sig) if generic[name].startswith("*")
               or name in ("buf_stride", "slot_stride", "chunk") or (name == "H" and block >= 4096)]
    warps = min(16, max(1, block // 256))
    const = dict(NORM=traits.norm, WRITE_OUTPUT=traits.norm and write_output,
                 WRITE_NORM=traits.norm_out, QUANT=int(traits.quant), LAYOUT=layout,
                 SCALE_FROM_PTR=False, BLOCK=block, NUM_CHUNKS=chunks,
                 PUSH_BLOCK=warps * 32 * (16 // DT[dt][2]), CANON=CANONICAL_NAN_BITS[DT[dt][2]],
                 USE_PDL=pdl, TRIGGER_AT_END=trigger, WORLD=world, SIG_MISC=pattern)
    if kernel is local_kernel:
        for name in ("PUSH_BLOCK", "CANON", "WORLD", "SIG_MISC"):
            del const[name]
    if hidden_one:  # Triton turns an int argument equal to 1 into a constant
        const["H"] = 1
    for k in const:
        sig[k] = "constexpr"
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    src = ASTSource(kernel, sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=TARGET,
                          options={"num_warps": warps, "enable_fp_fusion": False})


def resources(ptx: str) -> tuple[int, int]:
    """Registers per thread and bytes spilled to local memory, from `ptxas -v` (the one
    Triton ships) on the kernel's PTX: ptxas spills, which the PTX itself cannot show."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([tool, "-arch=sm_90a", "-v", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spilled = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spilled


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--patterns", default=",".join(str(p) for p in PATTERNS))
    ap.add_argument("--ptx", metavar="DIR", help="also write each variant's PTX here")
    ap.add_argument("--world", type=int, default=4, help="world size of the Lamport kernels")
    args = ap.parse_args()
    patterns = [int(p) for p in args.patterns.split(",")]
    blocks = [(64, 1), (8192, 2)] if args.quick else [(64, 1), (4096, 1), (8192, 1), (8192, 2)]
    blocks.append((64, 0))  # H == 1
    failures = spills = 0
    for kernel, dt, pattern, (block, chunks) in itertools.product(
            (local_kernel, oneshot_kernel, twoshot_kernel), DT, patterns, blocks):
        if PATTERNS[pattern].quant == Quant.NVFP4 and dt == "fp32":
            continue
        start = time.time()
        try:
            k = compile_one(kernel, dt, pattern, True, 0, block, max(chunks, 1), True, False,
                            hidden_one=chunks == 0, world=args.world)
            ptx = k.asm["ptx"]
            if args.ptx:
                name = f"{kernel.fn.__name__}-{dt}-p{pattern}-{block}x{chunks}.ptx"
                with open(f"{args.ptx}/{name}", "w") as f:
                    f.write(ptx)
            regs, spilled = resources(ptx)
            spills += bool(spilled)
            print(f"ok   {kernel.fn.__name__:15s} {dt} p{pattern:<2d} block {block:5d}x{chunks} "
                  f"registers {regs}, spilled {spilled} B ({time.time() - start:.1f}s)")
        except Exception as e:  # noqa: BLE001 - report and go on
            failures += 1
            print(f"FAIL {kernel.fn.__name__} {dt} p{pattern} block {block}x{chunks}: {e}")
    print(f"{failures} failed, {spills} spill registers to local memory")  # not an error
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
