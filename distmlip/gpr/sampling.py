"""Displaced copies of reference structures, and the first-order Taylor labels.

:func:`displace` draws Gaussian displacements (standard deviation ``delta`` on every Cartesian
component of every free atom), removes the net translation of the free atoms, and redraws a copy
whose minimum interatomic distance (minimum image for periodic cells) falls below
``min_distance``.  The generator is seeded per subset by ``(seed, subset name)`` so the copies do
not depend on how subsets are spread over MPI ranks.

The guard looks only at the parent's pairs closer than ``min_distance + CLOSE_PAIR_MARGIN``: a copy
whose atoms all moved less than half the margin cannot bring any other pair below the bound.  A
neighbour list built anew for every copy of a periodic cell had cost minutes per subset, silently,
before the labelling began (30,720 copies of a 64-atom cell).
"""
from __future__ import annotations

import hashlib

import numpy as np

from ..errors import InputError

__all__ = ["subset_rng", "displace", "taylor_energy", "min_distance"]

CLOSE_PAIR_MARGIN = 1.0   # A


def subset_rng(seed: int, name: str) -> np.random.Generator:
    """Generator seeded by (seed, subset name) through a stable hash (not Python's hash())."""
    h = hashlib.sha256(f"{int(seed)}\x00{name}".encode()).digest()
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int.from_bytes(h[:8], "little")])


def min_distance(positions, cell=None, pbc=None, cutoff: float = 3.0) -> float:
    """Smallest interatomic distance (minimum image for periodic directions); ``inf`` when no
    pair is closer than ``cutoff``."""
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if len(pos) < 2:
        return float("inf")
    pbc = np.zeros(3, bool) if pbc is None else np.asarray(pbc, bool)
    if not pbc.any():
        d = pos[:, None, :] - pos[None, :, :]
        r2 = (d * d).sum(-1)
        np.fill_diagonal(r2, np.inf)
        return float(np.sqrt(r2.min()))
    from ase.neighborlist import neighbor_list

    from ase import Atoms

    a = Atoms(positions=pos, cell=cell, pbc=pbc)
    d = neighbor_list("d", a, cutoff)
    return float(d.min()) if len(d) else float("inf")


def _close_pairs(pos, cell, pbc, cutoff: float):
    """(i, j, r_j + shift - r_i) of the pairs closer than ``cutoff`` (each pair once per image)."""
    pbc = np.zeros(3, bool) if pbc is None else np.asarray(pbc, bool)
    if not pbc.any():
        iu, ju = np.triu_indices(len(pos), 1)
        v = pos[ju] - pos[iu]
        keep = (v * v).sum(1) < cutoff * cutoff
        return iu[keep], ju[keep], v[keep]
    from ase.neighborlist import neighbor_list

    from ase import Atoms

    i, j, D = neighbor_list("ijD", Atoms(positions=pos, cell=cell, pbc=pbc), cutoff)
    return i, j, D


def displace(positions, n_copies: int, delta: float, rng: np.random.Generator, *,
             fixed=None, cell=None, pbc=None, min_dist: float = 0.5, max_tries: int = 1000,
             where: str = "") -> np.ndarray:
    """``n_copies`` displacement arrays [M, natoms, 3] for one structure.

    Fixed atoms (indices in ``fixed``) do not move; the mean displacement of the free atoms is
    subtracted (no net translation); a draw that brings two atoms closer than ``min_dist`` is
    redrawn (the parent itself must respect the bound, otherwise an InputError names it)."""
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    n = len(pos)
    free = np.ones(n, bool)
    if fixed is not None and len(fixed):
        fx = np.asarray(fixed, dtype=np.int64)
        if fx.min() < 0 or fx.max() >= n:
            raise InputError(f"{where}: fixed atom index out of range 0..{n - 1}: {fixed}")
        free[fx] = False
    nfree = int(free.sum())
    out = np.zeros((n_copies, n, 3))
    if n_copies == 0 or nfree == 0 or delta == 0.0:
        return out
    parent_min = min_distance(pos, cell, pbc, cutoff=max(min_dist, 1e-6) * 1.01)
    if parent_min < min_dist:
        raise InputError(f"{where}: the reference structure already has atoms {parent_min:.3f} A apart "
                         f"(< min_distance {min_dist} A); lower 'min_distance'")
    pi, pj, pv = _close_pairs(pos, cell, pbc, min_dist + CLOSE_PAIR_MARGIN)

    def far_enough(d) -> bool:
        if 2.0 * float(np.sqrt((d * d).sum(1).max())) >= CLOSE_PAIR_MARGIN:
            return min_distance(pos + d, cell, pbc, cutoff=min_dist * 1.01) >= min_dist
        if not len(pi):
            return True
        v = pv + d[pj] - d[pi]
        return float((v * v).sum(1).min()) >= min_dist * min_dist

    for m in range(n_copies):
        for _ in range(max_tries):
            d = np.zeros((n, 3))
            d[free] = rng.normal(0.0, delta, size=(nfree, 3))
            if nfree > 1:
                d[free] -= d[free].mean(0)
            if far_enough(d):
                out[m] = d
                break
        else:
            raise InputError(f"{where}: no displaced copy with all distances >= {min_dist} A after "
                             f"{max_tries} draws (delta {delta} A too large?)")
    return out


def taylor_energy(energy: float, forces, displacement) -> np.ndarray:
    """First-order Taylor labels E(R + d) = E(R) - F . d for displacements [M, natoms, 3]."""
    F = np.asarray(forces, dtype=np.float64).reshape(1, -1)
    d = np.asarray(displacement, dtype=np.float64).reshape(len(displacement), -1)
    return float(energy) - (d * F).sum(1)
