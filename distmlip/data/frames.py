"""Frames of input files: which frames a file holds (a small index), and reading a range of
them in bounded chunks.

Why: large DFT collections often come as ONE big extended-XYZ file.  ``convert`` splits the
frames of all its inputs (not just the files) over the MPI ranks, and every rank must read only
its own frames without ever holding a whole file.  Per file kind:

* ``extxyz``: ``scan_extxyz`` finds the byte offset of every frame by a fast scan (newlines
  located with numpy in 16 MiB blocks, only the atom-count lines looked at, the frame rules of
  ASE's own reader: a blank line ends the file, ``VEC`` lines belong to the frame before).  A
  rank then seeks to its first frame and parses chunks of consecutive frames with ASE's extxyz
  reader (so the values are exactly what ``ase.io.read`` gives for the whole file).
* ASE databases (``db``, ``json``) and trajectories (``traj``): the frame count is cheap; a
  rank reads its frame-index range with ``ase.io.read(path, index=slice)`` per chunk.
* aenet XSF: one frame per file.
* any other ASE format: the frame count is not known without parsing the whole file, so the
  file is one indivisible unit; its frames are streamed with ``ase.io.iread``.

Weights (for balancing ranks) are bytes: a frame's bytes in an extxyz file, the file size
spread evenly over the frames otherwise.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from ..errors import InputError
from .readers import XSF_FORMATS, LabelKeys, _from_ase, read_xsf
from .structure import Structure

SCAN_BLOCK = 1 << 24          # bytes read per step of the extxyz scan (16 MiB)
CHUNK_BYTES = 4 << 20         # text parsed per ASE call (bounded memory, few calls)
CHUNK_FRAMES = 1024           # frames per chunk for the formats read by frame index
RANDOM_ACCESS = ("db", "json", "traj")


@dataclass
class FileFrames:
    """Index of one input file.  kind: xsf | extxyz | indexed (db/json/traj) | stream (other
    ASE formats: one unit).  ``offsets`` [n + 1] int64: byte offsets of the frames (extxyz; the
    last entry is where the frames end), else None.  ``n`` frames (stream: 1 unit)."""
    path: str
    kind: str
    format: Optional[str]
    n: int
    size: int
    offsets: Optional[np.ndarray] = None

    def weights(self) -> np.ndarray:
        if self.offsets is not None:
            return np.diff(self.offsets).astype(np.float64)
        return np.full(self.n, max(self.size, 1) / max(self.n, 1), dtype=np.float64)


# --------------------------------------------------------------------------------- extxyz scan
class _Lines:
    """Line cursor over a binary file in blocks: line k of the current buffer spans
    buf[start(k):nl[k]]; only the lines asked for are decoded."""

    def __init__(self, fh, block: int):
        self.fh, self.block = fh, block
        self.buf = b""
        self.base = 0            # file offset of buf[0]
        self.line_base = 0       # number of file lines before buf[0]
        self.nl = np.zeros(0, dtype=np.int64)
        self.k = 0
        self.eof = False

    def _start(self, k: int) -> int:
        return int(self.nl[k - 1]) + 1 if k > 0 else 0

    def _refill(self) -> bool:
        if self.eof:
            return False
        m = len(self.nl)
        if self.k <= m:
            keep, drop_lines, newk = self._start(self.k), self.k, 0
        else:   # skipped past the buffered lines: the unterminated tail is line m
            keep, drop_lines, newk = self._start(m), m, self.k - m
        data = self.fh.read(self.block)
        self.base += keep
        self.line_base += drop_lines
        self.buf = self.buf[keep:] + data
        self.k = newk
        if not data:
            self.eof = True
        arr = np.frombuffer(self.buf, dtype=np.uint8)
        self.nl = np.flatnonzero(arr == 10).astype(np.int64)
        if self.eof and len(self.buf) and self.buf[-1:] != b"\n":
            self.nl = np.append(self.nl, len(self.buf))    # last line without a newline
        return True

    def line(self) -> Optional[bytes]:
        """The current line (without its newline), None at the end of the file."""
        while self.k >= len(self.nl):
            if not self._refill():
                return None
        return self.buf[self._start(self.k):int(self.nl[self.k])]

    def offset(self) -> int:
        """File offset of the current line (the end of the file past the last line)."""
        while self.k > len(self.nl) or (self.k == len(self.nl) and not self.eof):
            if not self._refill():
                break
        if self.k < len(self.nl):
            return self.base + self._start(self.k)
        return self.base + len(self.buf)

    def lineno(self) -> int:
        return self.line_base + self.k + 1

    def available(self, n: int) -> bool:
        """Whether lines k .. k+n-1 exist (reads on as needed)."""
        while self.k + n > len(self.nl):
            if not self._refill():
                return False
        return True


def scan_extxyz(path, block: int = SCAN_BLOCK) -> np.ndarray:
    """Byte offsets of the frames of an extended-XYZ file, plus the end of the last frame
    ([n + 1] int64).  Frame rules as ASE's reader: an atom-count line (a blank line ends the
    frames), a comment line, the atom lines, then up to 3 ``VEC`` lines.  InputError (naming the
    file, frame and line) for a malformed count or a file that ends inside a frame."""
    path = str(path)
    offs: list[int] = []
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    with fh:
        cur = _Lines(fh, block)
        prev = None          # (line, atom count) of the previous frame's count line
        blank = None         # (line, frames before it) of the first blank line between frames
        while True:
            head = cur.line()
            if head is not None and not head.strip():
                # ASE's reader stops at a blank line; files joined with `cat` from files that end
                # in an empty line have one between frames, and every frame after it was lost
                # without a word: read on, and say so
                at = (cur.lineno(), len(offs))
                while head is not None and not head.strip():
                    cur.k += 1
                    head = cur.line()
                if head is not None and blank is None:
                    blank = at
            if head is None:
                break
            frame = len(offs)
            try:
                natoms = int(head)
            except ValueError:
                text = head[:60].decode("utf-8", "replace")
                # a wrong count makes the PREVIOUS frame swallow or leave lines: name it too
                hint = (f" (or frame {frame - 1}, whose count line {prev[0]} announces {prev[1]} atoms, has "
                        f"another number of atom lines)" if prev is not None else "")
                raise InputError(f"{path}:{cur.lineno()}: frame {frame}: expected the atom count of an "
                                 f"extended-XYZ frame, got {text!r}{hint}") from None
            if natoms < 0:
                raise InputError(f"{path}:{cur.lineno()}: frame {frame}: negative atom count {natoms}")
            offs.append(cur.offset())
            prev = (cur.lineno(), natoms)
            if not cur.available(2 + natoms):
                raise InputError(f"{path}: frame {frame}: file ends inside the frame (it announces "
                                 f"{natoms} atoms at line {cur.lineno()})")
            cur.k += 2 + natoms
            for _ in range(3):
                ln = cur.line()
                if ln is not None and ln.lstrip().startswith(b"VEC"):
                    cur.k += 1
                else:
                    break
        end = cur.offset() if offs else 0
    if blank is not None and offs:
        from ..utils.log import warn

        warn(f"{path}:{blank[0]}: a blank line after frame {blank[1] - 1} (ASE's reader stops there); the "
             f"frames after it are read too ({len(offs)} frames in all)")
    if not offs:
        raise InputError(f"{path}: no structures in file" if os.path.getsize(path) else f"{path}: empty file")
    return np.array(offs + [end], dtype=np.int64)


# --------------------------------------------------------------------------------- file kinds
def file_kind(path: str, format: Optional[str]) -> tuple[str, Optional[str]]:
    """(kind, ASE format name or None)."""
    fmt = (format or "").lower() or None
    if fmt in XSF_FORMATS or (fmt is None and path.lower().endswith(".xsf")):
        return "xsf", None
    if fmt is None:
        from ase.io.formats import filetype

        try:
            fmt = filetype(path)
        except Exception:   # unknown or unreadable: ASE's reader will name the problem
            return "stream", None
    if fmt == "extxyz":
        return "extxyz", fmt
    if fmt in RANDOM_ACCESS:
        return "indexed", fmt
    return "stream", format


def _db_rows(path: str, fmt: str, a: int, b: int) -> list:
    """Rows a..b-1 of an ASE database as Atoms whose ``info`` also holds the row's key-value
    pairs and data (ase.io.read drops them, so labels stored as ``dft_energy=...`` could not be
    named with --energy-key)."""
    import ase.db

    out = []
    with ase.db.connect(path, type=fmt, serial=True) as db:
        for row in db.select(offset=a, limit=b - a):
            x = row.toatoms()
            for k, v in dict(row.get("key_value_pairs", {}) or {}).items():
                x.info.setdefault(k, v)
            data = row.get("data") or {}
            for k, v in dict(data).items():
                arr = np.asarray(v) if not isinstance(v, (str, bytes)) else None
                if arr is not None and arr.ndim == 2 and arr.shape == (len(x), 3):
                    x.arrays.setdefault(k, arr)       # per-atom (forces stored as data)
                else:
                    x.info.setdefault(k, v)
            out.append(x)
    return out


def index_file(path: str, format: Optional[str] = None) -> FileFrames:
    """The frame index of one input file (cheap: see the module doc)."""
    path = str(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    kind, fmt = file_kind(path, format)
    if kind == "xsf":
        return FileFrames(path, kind, None, 1, size)
    if size == 0:
        raise InputError(f"{path}: empty file")
    if kind == "extxyz":
        offs = scan_extxyz(path)
        return FileFrames(path, kind, fmt, len(offs) - 1, size, offs)
    if kind == "indexed":
        try:
            if fmt == "traj":
                from ase.io.trajectory import Trajectory

                with Trajectory(path) as t:
                    n = len(t)
            else:
                import ase.db

                with ase.db.connect(path, type=fmt, serial=True) as db:
                    n = db.count()
        except Exception as exc:
            raise InputError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
        if n == 0:
            raise InputError(f"{path}: no structures in file")
        return FileFrames(path, kind, fmt, int(n), size)
    return FileFrames(path, "stream", fmt, 1, size)


# --------------------------------------------------------------------------------- reading
def _ase_chunk(path, text: str, first: int, count: int, keys: Optional[LabelKeys], raw: bytes,
               rel) -> list[Structure]:
    """Parse ``count`` extxyz frames (global indices first..) from their text; on failure parse
    them one by one so the error names the frame (cut at ``rel``, the frames' byte offsets in
    ``raw``: the scan's own frame boundaries, which also pass blank lines between frames).
    parallel=False everywhere: under MPI, ASE's default reads on rank 0 and broadcasts, which
    hands every rank rank 0's frames."""
    import ase.io

    try:
        atoms = ase.io.read(io.StringIO(text), index=":", format="extxyz", parallel=False)
        if len(atoms) == count:
            return [_from_ase(a, path, first + k, keys) for k, a in enumerate(atoms)]
    except InputError:
        raise
    except Exception:
        pass
    # locate the bad frame (rare path: the cost does not matter)
    frames = [raw[int(rel[k]):int(rel[k + 1])].decode("utf-8") for k in range(count)]
    out = []
    for k, t in enumerate(frames):
        try:
            a = ase.io.read(io.StringIO(t), index=":", format="extxyz", parallel=False)
            if len(a) != 1:
                raise ValueError(f"{len(a)} frames parsed")
        except Exception as exc:
            raise InputError(f"{path}: frame {first + k}: cannot read ({type(exc).__name__}: {exc})") from None
        out.append(_from_ase(a[0], path, first + k, keys))
    return out


def iter_frames(ff: FileFrames, lo: int, hi: int, chunk_bytes: int = CHUNK_BYTES,
                chunk_frames: int = CHUNK_FRAMES, keys: Optional[LabelKeys] = None
                ) -> Iterator[tuple[list[Structure], int]]:
    """Yield (structures, bytes consumed) for frames [lo, hi) of a file, in bounded chunks, in
    file order; source_index is the frame's index in the file; ``keys``: where the labels are."""
    path = ff.path
    if ff.kind == "xsf":
        yield read_xsf(path), ff.size
        return
    if ff.kind == "extxyz":
        offs = ff.offsets
        with open(path, "rb") as fh:
            a = lo
            while a < hi:
                # as many frames as fit in chunk_bytes (at least one)
                b = int(np.searchsorted(offs, offs[a] + chunk_bytes, side="right")) - 1
                b = min(max(b, a + 1), hi)
                fh.seek(int(offs[a]))
                raw = fh.read(int(offs[b] - offs[a]))
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    k = int(np.searchsorted(offs, offs[a] + exc.start, side="right")) - 1
                    raise InputError(f"{path}: frame {k}: not UTF-8 text (byte {int(offs[a]) + exc.start})") from None
                yield _ase_chunk(path, text, a, b - a, keys, raw, offs[a:b + 1] - offs[a]), len(raw)
                a = b
        return
    import ase.io

    if ff.kind == "indexed":
        for a in range(lo, hi, chunk_frames):
            b = min(a + chunk_frames, hi)
            try:
                if ff.format == "traj":
                    atoms = ase.io.read(path, index=slice(a, b), format=ff.format, parallel=False)
                else:
                    atoms = _db_rows(path, ff.format, a, b)
            except Exception as exc:
                raise InputError(f"{path}: frames {a}..{b - 1}: cannot read ({type(exc).__name__}: {exc})") from None
            yield [_from_ase(x, path, a + k, keys) for k, x in enumerate(atoms)], int(ff.size * (b - a) / ff.n)
        return
    # stream: the whole file, frame by frame through ASE's iterator
    buf, k = [], 0
    try:
        it = ase.io.iread(path, index=":", format=ff.format, parallel=False)
        for x in it:
            buf.append(_from_ase(x, path, k, keys))
            k += 1
            if len(buf) >= chunk_frames:
                yield buf, 0
                buf = []
    except InputError:
        raise
    except Exception as exc:  # ASE raises many types for malformed input
        raise InputError(f"{path}: frame {k}: cannot read ({type(exc).__name__}: {exc})") from None
    if k == 0:
        raise InputError(f"{path}: no structures in file")
    yield buf, ff.size


# --------------------------------------------------------------------------------- splitting
def split_frames(indexes: list[FileFrames], size: int) -> list[list[tuple[int, int, int]]]:
    """Cut the frames of all files (in input order) into ``size`` contiguous pieces balanced by
    weight: per rank a list of (file number, first frame, end frame).  Deterministic (every rank
    computes the same from the same indexes)."""
    counts = np.array([ff.n for ff in indexes], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    total_frames = int(starts[-1])
    csum = np.empty(total_frames, dtype=np.float64)
    for k, ff in enumerate(indexes):
        csum[starts[k]:starts[k + 1]] = ff.weights()
    np.cumsum(csum, out=csum)
    total = csum[-1] if total_frames else 0.0
    cuts = [0]
    for r in range(1, size):
        target = total * r / size
        c = int(np.searchsorted(csum, target))          # frames before the cut: c or c + 1
        lo = csum[c - 1] if c >= 1 else 0.0
        hi = csum[c] if c < total_frames else total
        pos = c if abs(lo - target) <= abs(hi - target) else c + 1
        cuts.append(min(max(pos, cuts[-1]), total_frames))
    cuts.append(total_frames)
    del csum
    out = []
    for r in range(size):
        a, b = cuts[r], cuts[r + 1]
        segs = []
        if b > a:
            f0 = int(np.searchsorted(starts, a, side="right")) - 1
            f1 = int(np.searchsorted(starts, b - 1, side="right")) - 1
            for f in range(f0, f1 + 1):
                lo = max(a, int(starts[f])) - int(starts[f])
                hi = min(b, int(starts[f + 1])) - int(starts[f])
                if hi > lo:
                    segs.append((f, lo, hi))
        out.append(segs)
    return out
