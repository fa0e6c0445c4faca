"""Rank-aware logging: progress goes to stdout on rank 0 only, warnings to stderr."""
from __future__ import annotations

import os
import sys


def rank_and_size() -> tuple[int, int]:
    """Rank and world size from torch.distributed if initialised, else MPI environment variables."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    for r, s in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
                 ("SLURM_PROCID", "SLURM_NTASKS")):
        if r in os.environ and s in os.environ:
            return int(os.environ[r]), int(os.environ[s])
    return 0, 1


def log(msg: str, *, all_ranks: bool = False) -> None:
    rank, size = rank_and_size()
    if rank == 0 or all_ranks:
        prefix = f"[rank {rank}] " if all_ranks and size > 1 else ""
        print(prefix + msg, flush=True)


def warn(msg: str) -> None:
    rank, size = rank_and_size()
    prefix = f"[rank {rank}] " if size > 1 else ""
    print(f"{prefix}distmlip warning: {msg}", file=sys.stderr, flush=True)
