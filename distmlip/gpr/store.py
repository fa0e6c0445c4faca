"""Saved GPR fits: one file per subset, ``<dir>/<subset>.gpr.pt``.

A file holds the fitted objects themselves (fingerprint with its scale, the LocalGPR with its
factorised kernels and hyperparameters), pickled by torch.save, with a format version, the atom
sequence it was fitted on and a digest of its training structures' content; loading checks the
first two, augment also the digest (labels from a GPR that has not seen the subset's reference
structures would not reproduce them).  It is meant for reuse on the same machine and distmlip
version (another delta or M; ``gpr test`` and ``gpr predict`` on other data), not as an archival
format."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError, InputError
from ..utils.io import atomic_path

FORMAT = 2


def structures_digest(structs) -> str:
    """Digest of what a GPR learns from its training structures: atoms, positions, cell, pbc,
    energy and forces of each, in order."""
    import hashlib

    h = hashlib.sha256()
    for s in structs:
        for a in (s.numbers, s.positions, s.cell, s.pbc, s.energy, s.forces):
            h.update(b"-" if a is None else np.ascontiguousarray(np.asarray(a, dtype=np.float64)).tobytes())
    return h.hexdigest()[:32]


def file_digest(path, chunk: int = 1 << 24) -> str:
    """Digest of a file's bytes (an augment shard made with a loaded fit depends on its content,
    not its name)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()[:32]


def check_load_folder(directory) -> None:
    """``gpr.load`` (or ``--load``) names a folder that holds saved fits.  A missing or empty one
    (a typo, the wrong job's folder) made every subset warn and refit, hours on large sets; a
    folder that lacks some subsets' fits is normal (the data grew) and those are fitted."""
    if directory is None:
        return
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"gpr.load: {d} is not a folder (saved fits come from 'distmlip gpr fit CONFIG --out "
                          f"FOLDER' or gpr.save); drop gpr.load to fit every subset")
    if not any(d.glob("*.gpr.pt")):
        raise ConfigError(f"gpr.load: {d} holds no saved fits (*.gpr.pt; written by 'distmlip gpr fit CONFIG "
                          f"--out FOLDER' or gpr.save); drop gpr.load to fit every subset")


def fit_path(directory, subset: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in subset)
    return Path(directory) / f"{safe}.gpr.pt"


def _strip(model):
    """Drop what must not be pickled or saved: progress callbacks and scratch buffers."""
    objs = [model] + list(getattr(model, "models", []))
    for o in objs:
        for cb in ("progress", "assembly_progress", "stage"):
            if hasattr(o, cb):
                setattr(o, cb, None)
        if hasattr(o, "_workspace"):
            o._workspace = None


def save_fit(path, fit: dict, numbers, structs=None) -> Path:
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _strip(fit["model"])
    payload = {"format": FORMAT, "kind": fit["kind"], "fingerprint": fit["fingerprint"], "model": fit["model"],
               "choice": fit.get("choice"), "numbers": np.asarray(numbers, dtype=np.int64),
               "data": None if structs is None else structures_digest(structs),
               "n_structures": None if structs is None else len(structs)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_fit(path, numbers=None) -> dict:
    import torch

    from ..utils.io import check_zip_crcs

    try:
        check_zip_crcs(path, "saved GPR fit")
    except Exception as exc:
        raise InputError(str(exc)) from None
    try:
        d = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:          # truncated or damaged file: name it, no reader traceback
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise InputError(f"{path}: cannot read the saved GPR fit ({type(exc).__name__}: {msg}); a truncated or "
                         f"damaged file: fit it again (distmlip gpr fit, or augment with gpr.save)") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise InputError(f"{path}: not a distmlip GPR fit of format {FORMAT} (one saved by another "
                         f"distmlip version: fit it again)")
    if numbers is not None and not np.array_equal(np.asarray(numbers), d["numbers"]):
        raise InputError(f"{path}: the saved GPR was fitted on another atom sequence than this subset's")
    return {"kind": d["kind"], "fingerprint": d["fingerprint"], "model": d["model"], "choice": d.get("choice"),
            "data": d.get("data"), "n_structures": d.get("n_structures"), "numbers": d["numbers"]}
