"""Atomic writes: write to a temporary file in the destination folder, then rename.

A killed process therefore never leaves a half-written file under the final name, and an
existing file under that name stays intact until the new one is complete."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final, suffix: str = ".tmp"):
    """Yield a temporary path next to ``final``; rename it onto ``final`` on success.

    On an exception the temporary file is removed and ``final`` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
    os.close(fd)
    os.unlink(tmp)  # writers (h5py, torch.save) create the file themselves
    tmp = Path(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"atomic write of {final}: nothing was written to {tmp}")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(final, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text)


def atomic_torch_save(obj, final) -> None:
    import torch

    with atomic_path(final) as tmp:
        torch.save(obj, tmp)


def load_torch_file(path, what: str = "file"):
    """torch.load (weights only, to CPU) with a clear DataFormatError for a missing, truncated or
    foreign file: ``what`` names the kind of file in the message (model file, checkpoint, ...)."""
    import torch

    from ..errors import DataFormatError

    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataFormatError(f"{path}: cannot read {what} ({type(exc).__name__}: {exc})") from None
