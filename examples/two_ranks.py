"""arfusion on two ranks, one process each, run either way:

    python examples/two_ranks.py                     # starts its own 2 processes
    torchrun --standalone --nproc-per-node 2 examples/two_ranks.py

With a GPU per rank it uses backend "auto" (trtllm over PyTorch symmetric memory,
NCCL process group); otherwise the portable "torch" backend over gloo. Each rank
all-reduces its partial sums, adds the residual and RMS-normalises in one call, and
checks the result against arfusion.reference. Every wait (creation included) gives up
after ARFUSION_TIMEOUT_S seconds (default 30) if a peer never comes.
"""

import os
import socket

import torch
import torch.distributed as dist

from arfusion import (
    AllReduceFusionPattern,
    allreduce_fusion,
    create_allreduce_fusion_workspace,
    reference,
)

TOKENS, HIDDEN, DTYPE = 16, 4096, torch.bfloat16


def partial_sums(rank: int, device: torch.device) -> torch.Tensor:
    """What rank `rank`'s row-parallel layer would produce (seeded, so every rank can
    rebuild every other rank's input for the check)."""
    g = torch.Generator().manual_seed(rank + 1)
    return torch.randn(TOKENS, HIDDEN, generator=g).to(DTYPE).to(device)


def main() -> None:
    """One rank; torchrun (or `spawn` below) has set RANK, WORLD_SIZE and the rendezvous."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= world:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device("cuda") if gpus >= world else torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    workspace = create_allreduce_fusion_workspace(
        "auto" if device.type == "cuda" else "torch", world_size=world, rank=rank,
        max_token_num=TOKENS, hidden_dim=HIDDEN, dtype=DTYPE)
    g = torch.Generator().manual_seed(0)
    residual = torch.randn(TOKENS, HIDDEN, generator=g).to(DTYPE).to(device)
    gamma = (torch.rand(HIDDEN, generator=g) + 0.5).to(DTYPE).to(device)
    residual_out = torch.empty_like(residual)
    normed = allreduce_fusion(partial_sums(rank, device), workspace,
                              AllReduceFusionPattern.kARResidualRMSNorm,
                              residual_out=residual_out, residual_in=residual, rms_gamma=gamma)

    want = reference.reference_allreduce_fusion(
        [partial_sums(r, device) for r in range(world)],
        AllReduceFusionPattern.kARResidualRMSNorm, residual_in=residual, rms_gamma=gamma)
    exact = torch.equal(residual_out.view(torch.int16), want["residual_out"].view(torch.int16))
    ulps = (normed.float() - want["norm_out"].float()).abs().max().item()
    print(f"rank {rank}/{world}: backend {workspace.backend}, residual_out bit-exact: {exact}, "
          f"max |norm_out - reference| {ulps:.3g}")
    workspace.destroy()
    dist.destroy_process_group()
    if not exact:
        raise SystemExit(1)


def _spawned(rank: int, world: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    main()


def spawn(world: int = 2) -> None:
    """Start `world` processes on this machine, as torchrun would."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.multiprocessing.spawn(_spawned, args=(world,), nprocs=world)


if __name__ == "__main__":
    main() if "RANK" in os.environ else spawn()
