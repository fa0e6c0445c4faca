"""Example data labelled with ASE's EMT potential (for tests, the demo and benchmarks):
rattled bulk crystals and alloys, slabs and clusters of different sizes."""
from __future__ import annotations

import numpy as np

from .structure import Structure

EMT_METALS = ("Cu", "Al", "Ni", "Pd", "Ag", "Pt", "Au")


def _label(atoms, source="", index=0, with_forces=True) -> Structure:
    from ase.calculators.emt import EMT

    atoms.calc = EMT()
    e = float(atoms.get_potential_energy())
    f = np.array(atoms.get_forces(), dtype=np.float64) if with_forces else None
    return Structure(numbers=np.array(atoms.numbers, dtype=np.int64), positions=np.array(atoms.positions),
                     cell=np.array(atoms.cell.array), pbc=np.array(atoms.pbc, dtype=bool), energy=e,
                     forces=f, source=source, source_index=index)


def emt_atoms(kind: str, rng: np.random.Generator, size: int = 1, elements=("Cu", "Ni")):
    """One unlabelled ASE Atoms of ``kind`` in {'bulk', 'alloy', 'slab', 'cluster'}."""
    from ase.build import bulk, fcc111
    from ase.cluster import Icosahedron

    el = list(elements)
    if kind == "bulk":
        a = bulk(el[0], "fcc", cubic=True).repeat((size, 1, 1))
    elif kind == "alloy":
        a = bulk(el[0], "fcc", cubic=True).repeat((size, 1, 1))
        sym = a.get_chemical_symbols()
        for i in range(0, len(sym), 2):
            sym[i] = el[1 % len(el)]
        a.set_chemical_symbols(sym)
    elif kind == "slab":
        a = fcc111(el[0], size=(2, 2, 1 + size), vacuum=4.0)
    elif kind == "cluster":
        a = Icosahedron(el[0], noshells=2 if size < 3 else 3)
        a.center(vacuum=3.0)
        a.pbc = False
        a.cell = np.zeros((3, 3))
    else:
        raise ValueError(kind)
    a.rattle(stdev=0.05, seed=int(rng.integers(1 << 30)))
    return a


def emt_structures(n: int, seed: int = 0, kinds=("bulk", "alloy", "slab", "cluster"), max_size: int = 3,
                   elements=EMT_METALS) -> list[Structure]:
    """``n`` EMT-labelled structures of mixed kinds and sizes (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        kind = kinds[k % len(kinds)]
        els = rng.choice(list(elements), size=2, replace=False)
        size = int(rng.integers(1, max_size + 1))
        out.append(_label(emt_atoms(kind, rng, size, els), source=f"emt_{kind}", index=k))
    return out


def rattled_cu_au(n: int = 24, seed: int = 0) -> list[Structure]:
    """``n`` EMT-labelled 4-atom cubic Cu cells (every second one with an Au atom), strained by
    about 1 % and rattled by 0.08 A (deterministic for a seed): a small data set that trains in
    seconds."""
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        a = bulk("Cu", "fcc", a=3.61, cubic=True)
        if k % 2:
            a.symbols[0] = "Au"
        a.set_cell(a.cell[:] * (1 + rng.normal(0, 0.01)), scale_atoms=True)
        a.positions += rng.normal(0, 0.08, a.positions.shape)
        out.append(_label(a, source="emt.extxyz", index=k))
    return out
