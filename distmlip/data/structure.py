"""The in-memory record of one structure, shared by every pipeline stage."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Structure:
    """One atomic structure with its labels.  Units: eV, Angstrom, eV/Angstrom.

    ``forces`` is None (or ``has_forces`` False) when the source had no forces.
    ``stress`` is None when the source had none, else the 3x3 stress tensor in eV/Angstrom^3 in
    ASE's sign convention (``stress = (1/V) dE/d(strain)``: negative under compression), see
    docs/data_format.md; only periodic structures carry one.
    ``index`` is the structure's position in its data set (-1 when not from one)."""

    numbers: np.ndarray                 # [n] int, atomic numbers
    positions: np.ndarray               # [n, 3] float64
    cell: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))  # [3, 3], rows are lattice vectors
    pbc: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=bool))
    energy: float = float("nan")        # total energy, float64
    forces: np.ndarray | None = None    # [n, 3] float64
    subset: int = -1
    synthetic: bool = False
    parent: int = -1                    # data-set index of the source structure of a synthetic one
    uncertainty: float = 0.0            # GPR standard deviation of a synthetic energy (eV); 0 for reference data
    weight: float = 1.0
    source: str = ""                    # file name the structure came from
    source_index: int = 0               # frame index inside that file
    index: int = -1
    stress: np.ndarray | None = None    # [3, 3] float64, eV/Angstrom^3, ASE sign

    @property
    def natoms(self) -> int:
        return int(len(self.numbers))

    @property
    def has_forces(self) -> bool:
        return self.forces is not None

    @property
    def has_stress(self) -> bool:
        return self.stress is not None

    def to_ase(self):
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator

        atoms = Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)
        kw = {}
        if np.isfinite(self.energy):
            kw["energy"] = float(self.energy)
        if self.forces is not None:
            kw["forces"] = np.asarray(self.forces)
        if self.stress is not None:
            from ase.stress import full_3x3_to_voigt_6_stress

            kw["stress"] = full_3x3_to_voigt_6_stress(np.asarray(self.stress, dtype=np.float64))
        if kw:
            atoms.calc = SinglePointCalculator(atoms, **kw)
        return atoms


def complete_cell(cell, pbc):
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


def _pairwise_reduced(B: np.ndarray) -> np.ndarray:
    """The same lattice with each basis vector shortened by integer multiples of the others
    until no such step shortens it (|b_i . b_j| <= |b_j|^2 / 2): keeps the image search of
    :func:`minimum_image` small for cells written in a needlessly skewed form."""
    B = np.array(B, dtype=np.float64)
    for _ in range(100):
        changed = False
        for i in range(len(B)):
            for j in range(len(B)):
                if i != j:
                    m = np.round(B[i] @ B[j] / (B[j] @ B[j]))
                    if m != 0:
                        B[i] -= m * B[j]
                        changed = True
        if not changed:
            break
    return B


def minimum_images(d, cells, pbcs) -> np.ndarray:
    """:func:`minimum_image` of many sets at once: ``d`` [P, n, 3] with set p in cell ``cells[p]``
    and periodicity ``pbcs[p]``.  A set whose every vector is shorter than half of its cell's
    smallest lattice-plane spacing h is its own minimum image (a nonzero lattice vector is at
    least h long, so any other image is longer): such sets (a copy's small displacement from
    its parent) are returned as given without a per-set search; the others take
    :func:`minimum_image`."""
    d = np.asarray(d, dtype=np.float64)
    cells = np.asarray(cells, dtype=np.float64).reshape(-1, 3, 3)
    pbcs = np.asarray(pbcs, dtype=bool).reshape(-1, 3)
    out = d.copy()
    longest = np.sqrt((d * d).sum(-1)).max(axis=-1) if d.shape[1] else np.zeros(len(d))
    for pattern in np.unique(pbcs, axis=0):
        if not pattern.any():
            continue
        rows = np.flatnonzero((pbcs == pattern).all(axis=1))
        G = np.linalg.pinv(cells[rows][:, pattern, :])                         # [r, 3, k]
        h = 1.0 / np.linalg.norm(G, axis=1).max(axis=1)                         # smallest spacing
        for p in rows[~(longest[rows] < 0.5 * h)]:
            out[p] = minimum_image(d[p], cells[p], pattern)
    return out


@functools.lru_cache(maxsize=256)
def _lattice(cell_bytes: bytes, pbc_bytes: bytes):
    """(reduced periodic vectors [k, 3], their pseudo-inverse [3, k], lattice-plane spacings [k])
    of a cell, cached: a data set's copies share their parent's cell."""
    pbc = np.frombuffer(pbc_bytes, dtype=bool)
    B = _pairwise_reduced(np.frombuffer(cell_bytes, dtype=np.float64).reshape(3, 3)[pbc])
    G = np.linalg.pinv(B)
    return B, G, 1.0 / np.linalg.norm(G, axis=0)


@functools.lru_cache(maxsize=64)
def _shift_grid(n: tuple) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(-k, k + 1) for k in n], indexing="ij")
    return np.stack([g.ravel() for g in grids], axis=-1).astype(np.float64)


def minimum_image(d, cell, pbc) -> np.ndarray:
    """Shortest periodic image of the difference vectors ``d`` [..., 3] in the periodic directions
    ``pbc`` of ``cell`` (rows = lattice vectors; the periodic ones independent), exact for any
    cell: any cell, however skewed or non-reduced, as written.  The periodic vectors are
    reduced first (:func:`_pairwise_reduced`), the fractional coordinates rounded, and every
    image that could still be shorter is tried: along the periodic direction k an image at
    distance r from the origin has |f_k + S_k| h_k <= r (h_k the spacing of the lattice planes),
    so |S_k| <= r / h_k + 1/2 (sweep 13: rounding plus the +-1 images missed the shortest image
    of 45-96 % of the vectors in non-reduced cells)."""
    pbc = np.broadcast_to(np.asarray(pbc, bool), (3,))
    d = np.asarray(d, dtype=np.float64)
    if not pbc.any():
        return d
    B, G, spacing = _lattice(np.asarray(cell, dtype=np.float64).reshape(3, 3).tobytes(), pbc.tobytes())
    flat = d.reshape(-1, 3)
    d0 = flat - np.round(flat @ G) @ B
    if len(d0) == 0:
        return d.copy()
    r = float(np.sqrt((d0 * d0).sum(-1)).max())
    shifts = _shift_grid(tuple(int(k) for k in np.floor(r / spacing + 0.5))) @ B   # [S, 3]
    out = np.empty_like(d0)
    step = max(1, (1 << 22) // len(shifts))
    for a in range(0, len(d0), step):
        cand = d0[a:a + step, None, :] + shifts                                # [c, S, 3]
        best = np.argmin((cand * cand).sum(-1), axis=-1)
        out[a:a + step] = cand[np.arange(len(cand)), best]
    return out.reshape(d.shape)
