"""The `mnnvl` backend: not implemented yet (its issue: cuMem buffers with fabric handles).

The class exists so that the public API is complete and `isinstance` checks work;
`create_allreduce_fusion_workspace` rejects the backend with a clear reason.
"""

from __future__ import annotations

from ..workspace import AllReduceFusionWorkspace


class MNNVLAllReduceFusionWorkspace(AllReduceFusionWorkspace):
    backend = "mnnvl"

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(
            "the mnnvl backend is not implemented in this version of arfusion; "
            "use backend='trtllm' within a node"
        )

    def run(self, call) -> None:  # pragma: no cover - never constructed
        raise NotImplementedError
