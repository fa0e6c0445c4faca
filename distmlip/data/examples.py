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


def slab_adsorbate_atoms():
    """Cu(111) slab (3 x 3 x 3, 7 A vacuum each side) with an Au4 tetrahedron on an fcc hollow
    site: an interface with a cluster adsorbed on a metal surface (31 atoms, periodic in x and y),
    the EMT stand-in for a molecule on an electrode slab.  EMT keeps it intact at 300-1000 K."""
    from ase import Atoms
    from ase.build import add_adsorbate, fcc111

    slab = fcc111("Cu", size=(3, 3, 3), vacuum=7.0)
    d = 2.75
    tet = Atoms("Au4", positions=[[0, 0, 0], [d, 0, 0], [d / 2, d * np.sqrt(3) / 2, 0],
                                  [d / 2, d * np.sqrt(3) / 6, d * np.sqrt(2 / 3)]])
    add_adsorbate(slab, tet, 2.2, "fcc")
    slab.info.pop("adsorbate_info", None)
    return slab


def slab_adsorbate_md(n: int, seed: int = 0, temperatures=(300.0, 600.0, 900.0), every_fs: float = 40.0,
                      equilibrate_fs: float = 100.0) -> list[Structure]:
    """``n`` EMT-labelled snapshots of Langevin MD (1 fs, friction 0.02/fs) of
    :func:`slab_adsorbate_atoms` at the given temperatures in turn (``n / len(temperatures)`` each,
    one every ``every_fs`` after ``equilibrate_fs``): thermal configurations as an ab initio MD
    data set of an interface would have them (deterministic for a seed)."""
    from ase import units
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary, thermalize_momenta
    from ase.parallel import DummyMPI

    out = []
    per = [n // len(temperatures) + (1 if k < n % len(temperatures) else 0) for k in range(len(temperatures))]
    for kT, (T, m) in enumerate(zip(temperatures, per)):
        a = slab_adsorbate_atoms()
        a.calc = EMT()
        rng = np.random.default_rng([seed, kT])
        thermalize_momenta(a, T, comm=DummyMPI(), rng=rng)
        Stationary(a)
        dyn = Langevin(a, units.fs, temperature_K=T, friction=0.02 / units.fs, fixcm=False,
                       rng=np.random.default_rng([seed, kT, 1]), comm=DummyMPI())
        dyn.run(int(equilibrate_fs))
        for k in range(m):
            dyn.run(int(every_fs))
            s = _label(a.copy(), source=f"emt_slab_au4_T{T:g}", index=len(out))
            out.append(s)
    return out
