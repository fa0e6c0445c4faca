"""Dynamic sharing of independent units of work (augment's subsets) between ranks.

Why: a static assignment by estimated cost leaves ranks idle whenever the estimate is off, and
the cost of a GPR fit depends on more than its size (elements, hyperparameter iterations).  On a
heterogeneous set of 55 subsets one rank of two finished at 64 s and the other at 128 s
(docs/results.md, "Twenty-fourth session").  Here every rank walks the same largest-first list
and takes the next unit nobody has taken, so no rank waits while units remain.

Why files: the ranks of a job already share a folder (augment's shard folder), and creating a
file with O_EXCL is atomic on local and cluster file systems (NFS v3 and later, Lustre, GPFS).
MPI one-sided atomics would need the owner of the counter to make progress while it computes,
which Open MPI does not promise on every transport.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from ..errors import StorageError

PREFIX = "claims."


def new_claims_folder(workdir: Path) -> Path:
    """A fresh folder for one run's claims (rank 0, holding the work folder's lock), after
    removing those of earlier runs: a claim means 'taken in this run', never 'done' (done is the
    shard's own key)."""
    workdir = Path(workdir)
    for old in workdir.glob(PREFIX + "*"):
        shutil.rmtree(old, ignore_errors=True)
    folder = workdir / f"{PREFIX}{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    return folder


def claim(folder: Path, name: str) -> bool:
    """Take the unit ``name`` for this process: True for exactly one of all callers."""
    path = Path(folder) / name
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as exc:
        raise StorageError(f"{path}: cannot create the claim file of a unit of work ({exc.strerror}); the "
                         f"ranks share work through this folder, which must be writable by all") from exc
    os.close(fd)
    return True


def claimed(folder: Path, prefix: str = "") -> set[str]:
    """The names taken so far (by any rank) that start with ``prefix``."""
    try:
        return {p.name for p in Path(folder).iterdir() if p.name.startswith(prefix)}
    except OSError:
        return set()


def remove_claims_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
