"""The in-memory record of one structure, shared by every pipeline stage."""
from __future__ import annotations

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


def minimum_image(d, cell, pbc) -> np.ndarray:
    """Shortest periodic image of the difference vectors ``d`` [..., 3] in the periodic directions
    ``pbc`` of ``cell`` (rows = lattice vectors, non-singular where periodic).  Rounding the
    fractional coordinates gives the shortest image in orthogonal cells; for skewed ones the
    neighbouring images are tried too."""
    pbc = np.asarray(pbc, bool)
    d = np.asarray(d, dtype=np.float64)
    if not pbc.any():
        return d
    cell = np.asarray(cell, dtype=np.float64)
    frac = d @ np.linalg.inv(cell)
    frac[..., pbc] -= np.round(frac[..., pbc])
    d = frac @ cell
    rng = [(-1, 0, 1) if p else (0,) for p in pbc]
    shifts = np.array([[a, b, c] for a in rng[0] for b in rng[1] for c in rng[2]], float) @ cell
    cand = d[..., None, :] + shifts                                  # [..., S, 3]
    best = np.argmin((cand * cand).sum(-1), axis=-1)
    return np.take_along_axis(cand, best[..., None, None], axis=-2)[..., 0, :]
