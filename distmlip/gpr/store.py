"""Saved GPR fits: one file per subset, ``<dir>/<subset>.gpr.pt``.

A file holds the fitted objects themselves (fingerprint with its scale, the LocalGPR with its
factorised kernels and hyperparameters), pickled by torch.save, with a format version and the
atom sequence it was fitted on; loading checks both.  It is meant for reuse on the same machine
and distmlip version (another delta or M, another data set of the same subset, ``gpr test``),
not as an archival format."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ..utils.io import atomic_path

FORMAT = 1


def fit_path(directory, subset: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in subset)
    return Path(directory) / f"{safe}.gpr.pt"


def _strip(model):
    """Drop what must not be pickled or saved: progress callbacks and scratch buffers."""
    objs = [model] + list(getattr(model, "models", []))
    for o in objs:
        for cb in ("progress", "assembly_progress"):
            if hasattr(o, cb):
                setattr(o, cb, None)
        if hasattr(o, "_workspace"):
            o._workspace = None


def save_fit(path, fit: dict, numbers) -> Path:
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _strip(fit["model"])
    payload = {"format": FORMAT, "kind": fit["kind"], "fingerprint": fit["fingerprint"], "model": fit["model"],
               "choice": fit.get("choice"), "numbers": np.asarray(numbers, dtype=np.int64)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_fit(path, numbers=None) -> dict:
    import torch

    d = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise InputError(f"{path}: not a distmlip GPR fit of format {FORMAT}")
    if numbers is not None and not np.array_equal(np.asarray(numbers), d["numbers"]):
        raise InputError(f"{path}: the saved GPR was fitted on another atom sequence than this subset's")
    return {"kind": d["kind"], "fingerprint": d["fingerprint"], "model": d["model"], "choice": d.get("choice")}
