"""Neighbour lists: all pairs (i, j, image shift) with |r_j + S.cell - r_i| < cutoff.

``neighbor_list(positions, cell, pbc, cutoff) -> (i, j, shifts)`` returns numpy arrays
``i, j`` [P] int64 and ``shifts`` [P, 3] int64 (integer cell translations, so that the pair
vector is ``positions[j] - positions[i] + shifts @ cell``).  Both directions of every pair are
present, ``i == j`` appears only for periodic images of an atom (non-zero shift), and the pairs
are sorted by ``i`` (then ``j``, then the shift), so that a CSR offset array can be built with
:func:`pair_offsets`.

Any cell shape is handled, including cells thinner than the cutoff (several images per direction)
and free molecules (``pbc`` False in every direction; the cell may then be zero).  Mixed
boundaries (slabs, wires) work too.

The default was chosen by measurement (benchmarks/neighbors.py): the compiled pair search of
the extension (csrc/neighbors_cpu.cpp: every candidate image of every atom pair, written in the
canonical order, so no sort) for structures of up to 2^20 (atom, atom, image) candidates
(DFT-sized cells, molecules), and beyond it vesin (C++ cell list), the fastest on large dense
bulk, 2x matscipy and 5-15x the numpy cell list; the numpy cell list is the fallback when
neither is there.

Backends (``backend=`` argument or the ``DISTMLIP_NEIGHBORS`` environment variable):
``"auto"`` (default, as above), ``"compiled"`` (the pair search at any size), ``"vesin"``,
``"matscipy"``, ``"numpy"`` (cell list written here, linear scaling, no dependency), ``"ase"``
(``ase.neighborlist.primitive_neighbor_list``) and ``"brute"`` (O(N^2 x images) reference, for
tests).  Whatever the backend, the output is post-processed into the same canonical order.
"""
from __future__ import annotations

import math
import os

import numpy as np

from ..data.structure import complete_cell as _complete_cell

__all__ = ["neighbor_list", "pair_offsets", "available_backends", "default_backend"]

MAX_PAIRS = 1e8          # refuse inputs that would need more pairs than this (memory guard)
_BACKENDS = ("auto", "compiled", "vesin", "matscipy", "numpy", "ase", "brute")
# "auto" takes the compiled pair search (csrc/neighbors_cpu.cpp, O(n^2 x images), canonical order
# without a sort) up to this many (atom, atom, image) candidates, beyond it the cell list
_COMPILED_CANDIDATES = 1 << 20


# --------------------------------------------------------------------------------------------
# geometry helpers
# --------------------------------------------------------------------------------------------

def _prepare(positions, cell, pbc, cutoff):
    pos = np.ascontiguousarray(np.asarray(positions, dtype=np.float64).reshape(-1, 3))
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy()
    cutoff = float(cutoff)
    if not (cutoff > 0.0 and math.isfinite(cutoff)):
        raise ValueError(f"neighbor_list: cutoff must be a positive finite number, got {cutoff}")
    if not np.all(np.isfinite(pos)):
        raise ValueError("neighbor_list: positions contain non-finite values")
    for d in range(3):
        if pbc[d] and np.linalg.norm(cell[d]) < 1e-12:
            raise ValueError(f"neighbor_list: periodic direction {d} has a zero cell vector")
    full = face = None
    if pbc.any():
        full = _complete_cell(cell, pbc)
        if abs(np.linalg.det(full)) < 1e-12:
            raise ValueError("neighbor_list: the periodic cell vectors are linearly dependent")
        face = _face_distances(full)
        n = len(pos)
        if pbc.all():
            est = n * n / abs(np.linalg.det(full)) * 4.0 / 3.0 * math.pi * cutoff ** 3
        else:
            est = n * n * float(np.prod(np.where(pbc, 2.0 * cutoff / face + 1.0, 1.0))) * math.pi / 6.0
        if est > MAX_PAIRS:
            raise ValueError(f"neighbor_list: about {est:.3g} pairs expected (limit {MAX_PAIRS:.0e}): "
                             f"the cell (face distances {np.round(face, 3).tolist()} A) is far too small "
                             f"for the cutoff {cutoff} A with {n} atoms")
    return pos, cell, pbc, cutoff, full, face


def _face_distances(full):
    """Distance between opposite faces of the parallelepiped spanned by the rows of ``full``."""
    inv = np.linalg.inv(full)          # columns are reciprocal vectors (without 2 pi)
    return 1.0 / np.linalg.norm(inv, axis=0)


def _canonical(i, j, S, n_atoms=None):
    """Sort pairs by (i, j, shift) and return contiguous int64 arrays.

    The order is a pure function of the pair set, so every backend gives identical output
    (and the descriptor sums in the same order, bit for bit)."""
    i = np.ascontiguousarray(i, dtype=np.int64)
    j = np.ascontiguousarray(j, dtype=np.int64)
    S = np.ascontiguousarray(S, dtype=np.int64).reshape(-1, 3)
    if len(i) > 1:
        n = int(n_atoms) if n_atoms is not None else int(max(i.max(), j.max())) + 1
        smin = S.min(axis=0)
        span = S.max(axis=0) - smin + 1
        if float(n) * n * float(np.prod(span)) < 2.0 ** 62:
            s = S - smin
            key = (((i * n + j) * span[0] + s[:, 0]) * span[1] + s[:, 1]) * span[2] + s[:, 2]
            order = np.argsort(key, kind="stable")
        else:
            order = np.lexsort((S[:, 2], S[:, 1], S[:, 0], j, i))
        i, j, S = i[order], j[order], S[order]
    return i, j, S


def pair_offsets(pair_i, n_atoms: int) -> np.ndarray:
    """CSR offsets [n_atoms + 1] of a pair list sorted by centre ``pair_i``."""
    counts = np.bincount(np.asarray(pair_i, dtype=np.int64), minlength=n_atoms)
    ptr = np.zeros(n_atoms + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return ptr


def _ragged_arange(counts):
    """Concatenation of arange(c) for c in counts."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.cumsum(counts) - counts
    return np.arange(total, dtype=np.int64) - np.repeat(starts, counts)


# --------------------------------------------------------------------------------------------
# numpy cell list
# --------------------------------------------------------------------------------------------

def _numpy_cell_list(pos, cell, pbc, cutoff, bin_factor=0.5, chunk_candidates=1 << 18):
    """Linear-scaling cell list in the (possibly triclinic) frame of the cell.

    Atoms are binned in fractional coordinates, each bin at least ``cutoff * bin_factor`` wide
    (face to face).  For every atom and every bin offset d in [-m, m]^3 (m bins cover the
    cutoff; m > 1 when the cell is thinner than the cutoff, i.e. several periodic images) the
    atoms of the offset bin are candidates; candidates are generated and distance-checked with
    vectorised numpy in chunks of about ``chunk_candidates``."""
    n = len(pos)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.int64))
    if n == 0:
        return empty
    full = _complete_cell(cell, pbc)
    frac = pos @ np.linalg.inv(full)
    wrap = np.zeros((n, 3), dtype=np.int64)
    if pbc.any():
        wrap[:, pbc] = np.floor(frac[:, pbc]).astype(np.int64)
        frac = frac - wrap
        frac[:, pbc] = np.clip(frac[:, pbc], 0.0, np.nextafter(1.0, 0.0))
    lo = np.where(pbc, 0.0, frac.min(axis=0))
    hi = np.where(pbc, 1.0, frac.max(axis=0))
    face = _face_distances(full)
    extent = (hi - lo) * face                       # physical face-to-face extent per direction
    width = cutoff * bin_factor
    nbins = np.where(pbc, np.maximum(1, np.floor(extent / width)),
                     np.floor(extent / width) + 1).astype(np.int64)
    nbins = np.minimum(nbins, max(1, int(round(n ** (1.0 / 3.0))) * 2))   # no more bins than atoms need
    bin_w = np.where(pbc, extent / nbins, np.maximum(width, extent / nbins))
    b3 = np.floor((frac - lo) * face / bin_w).astype(np.int64)
    b3 = np.clip(b3, 0, nbins - 1)
    # bins to reach in each direction: (|db| - 1) * bin_w < cutoff
    reach = np.ceil(cutoff / bin_w).astype(np.int64)
    reach = np.where(pbc, reach, np.minimum(reach, nbins - 1))
    flat = (b3[:, 0] * nbins[1] + b3[:, 1]) * nbins[2] + b3[:, 2]
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=int(np.prod(nbins)))
    start = np.cumsum(counts) - counts
    fpos = frac @ full                              # wrapped Cartesian positions
    grids = np.meshgrid(*[np.arange(-reach[d], reach[d] + 1) for d in range(3)], indexing="ij")
    D = np.stack([g.ravel() for g in grids], axis=1)           # [K, 3] bin offsets
    K = len(D)
    cut2 = cutoff * cutoff
    mean_cnt = n / max(1, int((counts > 0).sum()))
    chunk = max(1, int(chunk_candidates // max(1.0, K * mean_cnt)))
    out_i, out_j, out_s = [], [], []
    for c0 in range(0, n, chunk):
        atoms = np.arange(c0, min(n, c0 + chunk))
        tgt = b3[atoms][:, None, :] + D[None, :, :]            # [a, K, 3]
        shift = np.floor_divide(tgt, nbins)
        tgt -= shift * nbins
        ok = np.all((shift == 0) | pbc, axis=2)                 # [a, K]
        src_atom = np.broadcast_to(atoms[:, None], ok.shape)[ok]
        tgt, shift = tgt[ok], shift[ok]
        tflat = (tgt[:, 0] * nbins[1] + tgt[:, 1]) * nbins[2] + tgt[:, 2]
        cnt = counts[tflat]
        if cnt.sum() == 0:
            continue
        ii = np.repeat(src_atom, cnt)
        jj = order[np.repeat(start[tflat], cnt) + _ragged_arange(cnt)]
        ss = np.repeat(shift, cnt, axis=0)
        vec = fpos[jj] - fpos[ii] + ss @ full
        keep = np.einsum("ij,ij->i", vec, vec) < cut2
        keep &= (ii != jj) | ss.any(axis=1)
        out_i.append(ii[keep])
        out_j.append(jj[keep])
        out_s.append(ss[keep])
    if not out_i:
        return empty
    i = np.concatenate(out_i)
    j = np.concatenate(out_j)
    S = np.concatenate(out_s)
    # undo the wrapping: r_ij = pos_w[j] - pos_w[i] + S.cell = pos[j] - pos[i] + (S - w_j + w_i).cell
    S = S - wrap[j] + wrap[i]
    return i, j, S


# --------------------------------------------------------------------------------------------
# brute force (reference for tests)
# --------------------------------------------------------------------------------------------

def _brute(pos, cell, pbc, cutoff):
    n = len(pos)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.int64)
    full = _complete_cell(cell, pbc)
    face = _face_distances(full)
    # images needed: positions are not wrapped, so add the spread of fractional coordinates
    frac = pos @ np.linalg.inv(full)
    spread = np.ceil(frac.max(axis=0) - frac.min(axis=0)).astype(np.int64)
    nimg = np.where(pbc, np.ceil(cutoff / face).astype(np.int64) + spread, 0)
    grids = np.meshgrid(*[np.arange(-k, k + 1) for k in nimg], indexing="ij")
    shifts = np.stack([g.ravel() for g in grids], axis=1)
    out_i, out_j, out_s = [], [], []
    for S in shifts:
        vec = pos[None, :, :] - pos[:, None, :] + (S @ cell)
        d2 = np.einsum("ijk,ijk->ij", vec, vec)
        mask = d2 < cutoff * cutoff
        if not S.any():
            np.fill_diagonal(mask, False)
        ii, jj = np.nonzero(mask)
        out_i.append(ii)
        out_j.append(jj)
        out_s.append(np.repeat(S[None], len(ii), axis=0))
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


# --------------------------------------------------------------------------------------------
# library backends
# --------------------------------------------------------------------------------------------

def _have_vesin() -> bool:
    try:
        import vesin  # noqa: F401
        return True
    except Exception:
        return False


def _vesin(pos, cell, pbc, cutoff):
    import vesin

    box = cell if pbc.all() else _complete_cell(cell, pbc)
    nl = vesin.NeighborList(cutoff=cutoff, full_list=True)
    i, j, S = nl.compute(points=pos, box=box, periodic=[bool(x) for x in pbc], quantities="ijS", copy=True)
    return i, j, S


def _compiled_frame(pos, pbc, cutoff, full, face, limit):
    """The completed cell the compiled search takes, or None when the extension is missing or the
    structure has more than ``limit`` (atom, atom, image) candidates (``full``, ``face``:
    :func:`_prepare`'s completed cell and its lattice-plane spacings)."""
    from .._ext import load_extension

    if not load_extension(warn_if_missing=False):
        return None
    images = 1.0 if full is None else float(np.prod(np.where(pbc, np.floor(2.0 * cutoff / face) + 1.0, 1.0)))
    if limit is not None and float(len(pos)) ** 2 * images > limit:
        return None
    return np.eye(3) if full is None else np.ascontiguousarray(full)   # a free structure: any frame


def _geometry(pos, cell, pbc, full) -> tuple:
    """The leading arguments of the compiled search's operators."""
    import torch

    return (torch.from_numpy(pos), torch.from_numpy(full), torch.from_numpy(np.ascontiguousarray(cell)),
            [int(x) for x in pbc])


def _compiled(pos, cell, pbc, cutoff, full, face, limit):
    """The pairs from the compiled search (csrc/neighbors_cpu.cpp) in the canonical order, or None
    where it does not apply (:func:`_compiled_frame`)."""
    import torch

    full = _compiled_frame(pos, pbc, cutoff, full, face, limit)
    if full is None:
        return None
    i, j, S = torch.ops.distmlip.neighbor_pairs(*_geometry(pos, cell, pbc, full), cutoff)
    return i.numpy(), j.numpy(), S.numpy()


def type_minima(positions, cell, pbc, cutoff, types, n_types: int):
    """[n_types, n_types] shortest distance per pair of atom types of one structure (periodic
    images included; inf where no pair is closer than ``cutoff``), from the compiled search
    without writing the pair list, or None where that search does not apply (then take
    :func:`neighbor_list`).  ``types``: [n] integers in [0, n_types)."""
    pos, cell, pbc, cutoff, full, face = _prepare(positions, cell, pbc, cutoff)
    import torch

    full = _compiled_frame(pos, pbc, cutoff, full, face, _COMPILED_CANDIDATES)
    if full is None:
        return None
    d2 = torch.ops.distmlip.neighbor_type_minima(*_geometry(pos, cell, pbc, full), cutoff,
                                                 torch.from_numpy(np.ascontiguousarray(types, dtype=np.int64)),
                                                 int(n_types))
    return np.sqrt(d2.numpy())


def _matscipy(pos, cell, pbc, cutoff):
    from matscipy.neighbours import neighbour_list

    full = cell if pbc.all() else _complete_cell(cell, pbc)
    i, j, S = neighbour_list("ijS", positions=pos, cell=full, pbc=pbc, cutoff=cutoff)
    return i, j, S


def _ase(pos, cell, pbc, cutoff):
    from ase.neighborlist import primitive_neighbor_list

    full = _complete_cell(cell, pbc) if not pbc.all() else cell
    i, j, S = primitive_neighbor_list("ijS", pbc, full, pos, cutoff, self_interaction=False,
                                      use_scaled_positions=False)
    return i, j, S


def available_backends() -> list[str]:
    from .._ext import load_extension

    out = ["numpy", "ase", "brute"]
    if _have_vesin():
        out.insert(0, "vesin")
    if load_extension(warn_if_missing=False):
        out.insert(0, "compiled")
    return out


def default_backend() -> str:
    env = os.environ.get("DISTMLIP_NEIGHBORS", "auto").strip().lower() or "auto"
    if env not in _BACKENDS:
        raise ValueError(f"DISTMLIP_NEIGHBORS={env!r}: valid values are {', '.join(_BACKENDS)}")
    return env


# --------------------------------------------------------------------------------------------
# many small structures at once
# --------------------------------------------------------------------------------------------

# distances evaluated at once by the dense path (float64 temporaries of a few times this size)
_DENSE_ELEMENTS = 1 << 18
# the dense path takes structures with at most this many (image, atom, atom) candidates, where it
# was faster than one neighbour list per structure (docs/results.md): free molecules up to 128
# atoms, periodic cells of a few atoms; the rest take the neighbour list
_DENSE_FREE = 1 << 14
_DENSE_PERIODIC = 1 << 12
# with the compiled pair search there, periodic cells beyond this many candidates are faster one
# at a time (the demo's 16- and 29-atom cells: 200-220 against 250-500 us per structure)
_DENSE_PERIODIC_COMPILED = 1 << 10


def _dense_distances(group, cutoff: float):
    """Squared distances of every candidate (atom i, atom j, image S) of structures with the same
    atom count and periodicity (``group``: objects with ``positions, cell, pbc``), chunk by chunk
    and image by image: yields (first structure, image number q of Q, d2 [b, n, n], S [b, n, n, 3]
    float or None for free structures), an atom's zero image of itself at inf; the images of
    each (i, j) come in lexicographic order of S.  Yields nothing and returns False when the
    group does not suit the dense path (too many candidates, a singular or non-finite cell,
    non-finite positions: the neighbour list then names the problem).  Why: one neighbour list
    per structure costs 0.3-1.6 ms in Python, minutes for 10^5-10^6 small structures.

    Periodic images: an image of atom j closer than the cutoff has, along each periodic axis k,
    |f_j - f_i + S_k| < cutoff / h_k (f fractional coordinates, h_k the spacing of the cell's
    lattice planes), so only the floor(2 cutoff / h_k) + 1 integers S_k from
    ceil(f_i - f_j - cutoff / h_k) can count, per pair; positions need not be wrapped."""
    n = len(group[0].positions)
    pbc = np.broadcast_to(np.asarray(group[0].pbc, dtype=bool), (3,)).copy()
    P = np.stack([np.asarray(s.positions, dtype=np.float64).reshape(n, 3) for s in group])
    if not np.isfinite(P).all():
        return False
    if pbc.any():
        C = np.stack([np.asarray(s.cell, dtype=np.float64).reshape(3, 3) for s in group])
        if not np.isfinite(C).all() or (np.linalg.norm(C, axis=2)[:, pbc] < 1e-12).any():
            return False
        full = C.copy()
        det = np.linalg.det(full)
        for b in np.flatnonzero(np.abs(det) <= 1e-9 * np.maximum(1.0, np.abs(full).max(axis=(1, 2)) ** 3)):
            full[b] = _complete_cell(full[b], pbc)
            if abs(np.linalg.det(full[b])) < 1e-12:
                return False
        inv = np.linalg.inv(full)
        reach = cutoff * np.linalg.norm(inv, axis=1)            # cutoff / h_k, [B, 3]
        counts = np.where(pbc, np.floor(2.0 * reach.max(axis=0)) + 1, 1).astype(np.int64)
        frac = np.einsum("bnd,bdk->bnk", P, inv)
    else:
        counts = np.ones(3, dtype=np.int64)
    Q = np.stack(np.meshgrid(*[np.arange(k) for k in counts], indexing="ij"), axis=-1).reshape(-1, 3)
    per = len(Q) * n * n
    if pbc.any():
        from .._ext import load_extension

        limit = _DENSE_PERIODIC_COMPILED if load_extension(warn_if_missing=False) else _DENSE_PERIODIC
    else:
        limit = _DENSE_FREE
    if per > limit:
        return False
    ar = np.arange(n)
    step = max(1, _DENSE_ELEMENTS // (n * n))
    for a in range(0, len(P), step):
        p = P[a:a + step]
        diff = p[:, None, :, :] - p[:, :, None, :]             # [b, i, j, 3]: r_j - r_i
        if not pbc.any():
            d2 = diff[..., 0] * diff[..., 0] + diff[..., 1] * diff[..., 1] + diff[..., 2] * diff[..., 2]
            d2[:, ar, ar] = np.inf
            yield a, 0, d2, None
            continue
        lo = np.where(pbc, np.ceil(frac[a:a + step, :, None, :] - frac[a:a + step, None, :, :]
                                   - reach[a:a + step, None, None, :]), 0.0)
        c = C[a:a + step, None, None]                                   # [b, 1, 1, 3, 3]
        for q, off in enumerate(Q):
            S = lo + off.astype(np.float64)
            # written out, not einsum: the same sums whatever the chunk (1 and 2 ranks agree)
            v = diff + S[..., 0:1] * c[..., 0, :] + S[..., 1:2] * c[..., 1, :] + S[..., 2:3] * c[..., 2, :]
            d2 = v[..., 0] * v[..., 0] + v[..., 1] * v[..., 1] + v[..., 2] * v[..., 2]
            own = (S[:, ar, ar] == 0).all(axis=-1)                      # [b, n]: i's zero image
            d2[:, ar, ar] = np.where(own, np.inf, d2[:, ar, ar])
            yield a, q, d2, S
    return True


def _drain(gen, each) -> bool:
    """Feed every item of a :func:`_dense_distances` generator to ``each``; its return value."""
    while True:
        try:
            each(*next(gen))
        except StopIteration as stop:
            return stop.value is not False


def dense_pair_minima(group, cutoff: float):
    """[B, n, n] squared shortest distance per atom pair (any image; inf at or beyond
    ``cutoff``) of a group as in :func:`_dense_distances`, or None where it does not apply."""
    n = len(group[0].positions)
    out = np.full((len(group), n, n), np.inf)

    def each(a, q, d2, S):
        np.minimum(out[a:a + len(d2)], d2, out=out[a:a + len(d2)])

    if not _drain(_dense_distances(group, cutoff), each):
        return None
    out[out >= cutoff * cutoff] = np.inf
    return out


def dense_neighbor_lists(group, cutoff: float):
    """The :func:`neighbor_list` of every structure of a group as in :func:`_dense_distances`
    (the same pairs in the same order), or None where it does not apply."""
    hits: dict = {}                 # first structure of a chunk -> [(b, i, j, q, S)]
    sizes: dict = {}                # first structure of a chunk -> its structure count

    def each(a, q, d2, S):
        b, i, j = np.nonzero(d2 < cutoff * cutoff)
        sizes[a] = len(d2)
        hits.setdefault(a, []).append((b, i, j, np.full(len(b), q),
                                       np.zeros((len(b), 3)) if S is None else S[b, i, j]))

    if not _drain(_dense_distances(group, cutoff), each):
        return None
    out = []
    for a in sorted(hits):
        b, i, j, q, S = (np.concatenate(x) for x in zip(*hits[a]))
        # (structure, i, j, image number): each structure's pairs in the order of _canonical
        order = np.lexsort((q, j, i, b))
        b, i, j, S = b[order], i[order], j[order], S[order].astype(np.int64)
        ends = np.searchsorted(b, np.arange(sizes[a] + 1))
        out += [(i[x:y].astype(np.int64), j[x:y].astype(np.int64), S[x:y]) for x, y in zip(ends[:-1], ends[1:])]
    return out


def neighbor_list(positions, cell, pbc, cutoff, backend: str | None = None, sort: bool = True):
    """All neighbour pairs within ``cutoff`` (strictly less).  See the module docstring.

    Returns numpy int64 arrays ``i [P]``, ``j [P]``, ``shifts [P, 3]`` sorted by (i, j, shift);
    ``sort=False``: in the backend's order (for callers that only reduce over the pairs)."""
    pos, cell, pbc, cutoff, full, face = _prepare(positions, cell, pbc, cutoff)
    backend = (backend or default_backend()).lower()
    if backend not in _BACKENDS:
        raise ValueError(f"neighbor_list: unknown backend {backend!r}; valid: {', '.join(_BACKENDS)}")
    if backend in ("auto", "compiled"):
        found = _compiled(pos, cell, pbc, cutoff, full, face, None if backend == "compiled" else _COMPILED_CANDIDATES)
        if found is not None:
            return found            # already in the canonical order
        if backend == "compiled":
            raise ValueError("neighbor_list: backend 'compiled' needs the compiled extension distmlip._C")
        backend = "vesin" if _have_vesin() else "numpy"
    if backend == "vesin":
        i, j, S = _vesin(pos, cell, pbc, cutoff)
    elif backend == "matscipy":
        i, j, S = _matscipy(pos, cell, pbc, cutoff)
    elif backend == "numpy":
        i, j, S = _numpy_cell_list(pos, cell, pbc, cutoff)
    elif backend == "ase":
        i, j, S = _ase(pos, cell, pbc, cutoff)
    else:
        i, j, S = _brute(pos, cell, pbc, cutoff)
    return _canonical(i, j, S, len(pos)) if sort else (i, j, S)
