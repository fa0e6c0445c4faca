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

Backends (``backend=`` argument or the ``DISTMLIP_NEIGHBORS`` environment variable):
``"auto"`` (default: vesin when installed, else the numpy cell list), ``"vesin"``,
``"numpy"`` (cell list written here, linear scaling, no dependency), ``"ase"``
(``ase.neighborlist.primitive_neighbor_list``) and ``"brute"`` (O(N^2 x images) reference, for
tests).  Whatever the backend, the output is post-processed into the same canonical order.
"""
from __future__ import annotations

import math
import os

import numpy as np

__all__ = ["neighbor_list", "pair_offsets", "available_backends", "default_backend"]

_BACKENDS = ("auto", "vesin", "numpy", "ase", "brute")


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
    if pbc.any() and abs(np.linalg.det(_complete_cell(cell, pbc))) < 1e-12:
        raise ValueError("neighbor_list: the periodic cell vectors are linearly dependent")
    return pos, cell, pbc, cutoff


def _complete_cell(cell, pbc):
    """A non-singular 3x3 matrix whose periodic rows are the cell's and whose other rows are
    the given cell vectors when they keep the matrix regular, else unit vectors orthogonal to
    the periodic ones.  Only the periodic rows carry meaning (image translations); the others
    just define a frame for binning."""
    full = cell.copy()
    if abs(np.linalg.det(full)) > 1e-9 * max(1.0, np.abs(full).max() ** 3):
        return full
    # Gram-Schmidt: keep periodic rows (they must be independent), fill in the rest.
    basis = []
    for d in range(3):
        if pbc[d]:
            basis.append(cell[d] / np.linalg.norm(cell[d]))
    ortho = []
    for v in basis:
        w = v - sum(np.dot(v, u) * u for u in ortho)
        n = np.linalg.norm(w)
        if n > 1e-12:
            ortho.append(w / n)
    fill = []
    for e in np.eye(3):
        w = e - sum(np.dot(e, u) * u for u in ortho + fill)
        n = np.linalg.norm(w)
        if n > 1e-6:
            fill.append(w / n)
    k = 0
    for d in range(3):
        if not pbc[d]:
            full[d] = fill[k]
            k += 1
    return full


def _face_distances(full):
    """Distance between opposite faces of the parallelepiped spanned by the rows of ``full``."""
    inv = np.linalg.inv(full)          # columns are reciprocal vectors (without 2 pi)
    return 1.0 / np.linalg.norm(inv, axis=0)


def _canonical(i, j, S):
    """Sort pairs by (i, j, shift) and return contiguous int64 arrays."""
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    S = np.asarray(S, dtype=np.int64).reshape(-1, 3)
    if len(i) > 1:
        order = np.lexsort((S[:, 2], S[:, 1], S[:, 0], j, i))
        i, j, S = i[order], j[order], S[order]
    return np.ascontiguousarray(i), np.ascontiguousarray(j), np.ascontiguousarray(S)


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

def _numpy_cell_list(pos, cell, pbc, cutoff, bin_factor=1.0):
    """Linear-scaling cell list in the (possibly triclinic) frame of the cell.

    Atoms are binned in fractional coordinates; a bin is at least ``cutoff * bin_factor`` wide
    (face to face).  For each bin offset d in [-m, m]^3 (m = ceil(1 / bin_factor) or more when
    the cell is thinner than the cutoff, i.e. several periodic images) all atom pairs between a
    bin and its offset bin are distance-checked at once with numpy."""
    n = len(pos)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.int64))
    if n == 0:
        return empty
    full = _complete_cell(cell, pbc)
    inv = np.linalg.inv(full)
    frac = pos @ inv
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
    nbins = np.maximum(1, np.floor(extent / width)).astype(np.int64)
    nbins = np.where(pbc, nbins, np.maximum(1, np.floor(extent / width) + 1).astype(np.int64))
    bin_w = np.where(pbc, extent / nbins, width)     # physical width of a bin
    # bin index of every atom
    rel = (frac - lo) * face / np.where(bin_w > 0, bin_w, 1.0)
    b3 = np.minimum(np.floor(rel).astype(np.int64), nbins - 1)
    b3 = np.maximum(b3, 0)
    # reach in bins: enough bins to cover the cutoff
    reach = np.ceil(cutoff / np.where(bin_w > 0, bin_w, np.inf)).astype(np.int64)
    reach = np.where(pbc, reach, np.minimum(reach, nbins - 1))
    flat = (b3[:, 0] * nbins[1] + b3[:, 1]) * nbins[2] + b3[:, 2]
    order = np.argsort(flat, kind="stable")
    nb_total = int(np.prod(nbins))
    counts = np.bincount(flat, minlength=nb_total)
    start = np.cumsum(counts) - counts
    fpos = frac @ full                                 # wrapped Cartesian positions
    sorted_atoms = order
    atom_bin = b3[order]                               # bins in sorted order
    cut2 = cutoff * cutoff
    out_i, out_j, out_s = [], [], []
    rng = [np.arange(-reach[d], reach[d] + 1) for d in range(3)]
    for dx in rng[0]:
        for dy in rng[1]:
            for dz in rng[2]:
                d = np.array([dx, dy, dz], dtype=np.int64)
                tgt = atom_bin + d                     # [n, 3] target bin (unwrapped)
                shift = np.floor_divide(tgt, nbins)    # image index of the target bin
                tgt = tgt - shift * nbins
                ok = np.ones(n, dtype=bool)
                for a in range(3):
                    if not pbc[a]:
                        ok &= shift[:, a] == 0
                if not ok.any():
                    continue
                src = np.nonzero(ok)[0]
                tflat = (tgt[src, 0] * nbins[1] + tgt[src, 1]) * nbins[2] + tgt[src, 2]
                cnt = counts[tflat]
                if cnt.sum() == 0:
                    continue
                ii = np.repeat(sorted_atoms[src], cnt)
                jj = sorted_atoms[np.repeat(start[tflat], cnt) + _ragged_arange(cnt)]
                ss = np.repeat(shift[src], cnt, axis=0)
                vec = fpos[jj] - fpos[ii] + (ss @ full)
                dist2 = np.einsum("ij,ij->i", vec, vec)
                keep = dist2 < cut2
                if not keep.any():
                    continue
                ii, jj, ss = ii[keep], jj[keep], ss[keep]
                self_ = (ii == jj) & ~ss.any(axis=1)
                if self_.any():
                    ii, jj, ss = ii[~self_], jj[~self_], ss[~self_]
                out_i.append(ii)
                out_j.append(jj)
                out_s.append(ss)
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

    if not pbc.any():
        box = np.zeros((3, 3))
        periodic = False
    elif pbc.all():
        box = cell
        periodic = True
    else:
        raise NotImplementedError("mixed pbc")
    nl = vesin.NeighborList(cutoff=cutoff, full_list=True)
    i, j, S = nl.compute(points=pos, box=box, periodic=periodic, quantities="ijS", copy=True)
    return i, j, S


def _ase(pos, cell, pbc, cutoff):
    from ase.neighborlist import primitive_neighbor_list

    full = _complete_cell(cell, pbc) if not pbc.all() else cell
    i, j, S = primitive_neighbor_list("ijS", pbc, full, pos, cutoff, self_interaction=False,
                                      use_scaled_positions=False)
    return i, j, S


def available_backends() -> list[str]:
    out = ["numpy", "ase", "brute"]
    if _have_vesin():
        out.insert(0, "vesin")
    return out


def default_backend() -> str:
    env = os.environ.get("DISTMLIP_NEIGHBORS", "auto").strip().lower() or "auto"
    if env not in _BACKENDS:
        raise ValueError(f"DISTMLIP_NEIGHBORS={env!r}: valid values are {', '.join(_BACKENDS)}")
    return env


def neighbor_list(positions, cell, pbc, cutoff, backend: str | None = None):
    """All neighbour pairs within ``cutoff`` (strictly less).  See the module docstring.

    Returns numpy int64 arrays ``i [P]``, ``j [P]``, ``shifts [P, 3]`` sorted by (i, j, shift)."""
    pos, cell, pbc, cutoff = _prepare(positions, cell, pbc, cutoff)
    backend = (backend or default_backend()).lower()
    if backend not in _BACKENDS:
        raise ValueError(f"neighbor_list: unknown backend {backend!r}; valid: {', '.join(_BACKENDS)}")
    if backend == "auto":
        backend = "vesin" if (_have_vesin() and (pbc.all() or not pbc.any())) else "numpy"
    if backend == "vesin":
        if pbc.any() and not pbc.all():
            i, j, S = _numpy_cell_list(pos, cell, pbc, cutoff)   # vesin: all-or-nothing pbc
        else:
            i, j, S = _vesin(pos, cell, pbc, cutoff)
    elif backend == "numpy":
        i, j, S = _numpy_cell_list(pos, cell, pbc, cutoff)
    elif backend == "ase":
        i, j, S = _ase(pos, cell, pbc, cutoff)
    else:
        i, j, S = _brute(pos, cell, pbc, cutoff)
    return _canonical(i, j, S)
