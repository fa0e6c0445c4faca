"""Training checkpoints: model, optimizer, scheduler, RNG states and position, written atomically.

A checkpoint is a plain ``torch.save`` dict readable with ``weights_only=True`` (no pickled
classes), independent of the number of ranks that wrote it."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..errors import DataFormatError
from ..utils.io import atomic_torch_save, load_torch_file

FORMAT = "distmlip-checkpoint"
VERSION = 1


def rng_state() -> dict:
    np_state = np.random.get_state()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except Exception:  # different number of devices: not fatal
            pass


def save_checkpoint(path, **content) -> None:
    obj = {"format": FORMAT, "version": VERSION, "rng": rng_state()}
    obj.update(content)
    atomic_torch_save(obj, path)


def load_checkpoint(path) -> dict:
    path = Path(path)
    obj = load_torch_file(path, "checkpoint")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise DataFormatError(f"{path}: not a distmlip training checkpoint")
    if obj.get("version") != VERSION:
        raise DataFormatError(f"{path}: checkpoint version {obj.get('version')!r} is not supported "
                              f"(expected {VERSION})")
    return obj
