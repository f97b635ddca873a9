"""Where one eager call's host time goes (world size 1, 8 x 4096 kARResidualRMSNorm, as the
bench's host probe), next to a torch.add_ in the same process. Needs a GPU.

    PYTHONPATH=src python3 scripts/host_split.py

Parts, each timed on its own (`bench.timing.host_us`, three runs): the whole call;
`validate_call` alone; the workspace's launch of an already validated call; Triton's C
launch function alone with the arguments prepared; the raw-stream lookup.
"""

from __future__ import annotations

import torch

from arfusion import allreduce_fusion
from arfusion.bench.runs import host_probe
from arfusion.bench.timing import host_us
from arfusion.kernels import launch as L
from arfusion.validation import CALL_ARGUMENTS, validate_call


def main() -> None:
    dtype = torch.bfloat16
    with host_probe(dtype) as (ws, x, outs, kw):
        allreduce_fusion(x, ws, 1, **outs, **kw)
        passed = {**outs, **kw}
        defaults = dict(launch_with_pdl=False, trigger_completion_at_end=True, rms_eps=1e-6,
                        weight_bias=0.0)
        args = [passed.get(name, defaults.get(name)) for name in CALL_ARGUMENTS[2:]]
        call = validate_call(ws, True, x, 1, *args)
        launcher = ws._launch
        prep = call.plan.launches[call.align]
        stream = L._raw_stream(launcher._device)
        raw = (*prep.front, stream, *prep.head, *launcher._static, *call.ptrs, 1.0,
               call.rms_eps, call.weight_bias, *prep.back)
        a = torch.ones(8, 4096, dtype=dtype, device="cuda")
        for _ in range(3):
            print({name: round(us, 2) for name, us in host_us(dict(
                call=lambda: allreduce_fusion(x, ws, 1, **outs, **kw),
                validate_call=lambda: validate_call(ws, True, x, 1, *args),
                launch=lambda: ws.run(call),
                c_launch=lambda: prep.launch(*raw),
                raw_stream=lambda: L._raw_stream(launcher._device),
                torch_add_=lambda: a.add_(a))).items()})


if __name__ == "__main__":
    main()
