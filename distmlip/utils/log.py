"""Rank-aware logging: progress goes to stdout on rank 0 only, warnings to stderr."""
from __future__ import annotations

import sys

from .launch import placement


def log(msg: str, *, all_ranks: bool = False) -> None:
    where = placement()
    if where.rank == 0 or all_ranks:
        prefix = f"[rank {where.rank}] " if all_ranks and where.world_size > 1 else ""
        print(prefix + msg, flush=True)


def warn(msg: str) -> None:
    where = placement()
    prefix = f"[rank {where.rank}] " if where.world_size > 1 else ""
    print(f"{prefix}distmlip warning: {msg}", file=sys.stderr, flush=True)
