"""Generate a heterogeneous demo data set with ASE's EMT calculator.

Subsets (each homogeneous: same composition, atom count and atom order):
  - rattled fcc Cu bulk (periodic, 32 atoms)
  - rattled fcc Cu-Au bulk alloy (periodic, 32 atoms)
  - Cu(100) slab (periodic in x/y, vacuum in z)
  - Cu(100) slab with an O-free adsorbate pair (Au adatoms; EMT knows Cu, Au, Ag, Ni, Pd, Pt, Al, H, C, N, O)
  - small Cu/Au clusters (free molecules, no PBC)
Energies and forces come from EMT; each structure is a random distortion of its prototype
(Gaussian displacements, plus a small random strain for bulk), written as extended XYZ files,
one file per subset, and a handful of aenet XSF files to exercise that reader too.

Usage: python make_emt_data.py OUTDIR [--n-per-subset 40] [--seed 0]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc100
from ase.calculators.emt import EMT
from ase.cluster import Octahedron
from ase.io import write


def _label(atoms: Atoms) -> Atoms:
    atoms = atoms.copy()
    atoms.calc = EMT()
    e = atoms.get_potential_energy()
    f = atoms.get_forces()
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f)
    return atoms


def prototypes() -> dict[str, Atoms]:
    cu = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    alloy = cu.copy()
    sym = alloy.get_chemical_symbols()
    for k in range(0, len(sym), 4):
        sym[k] = "Au"
    alloy.set_chemical_symbols(sym)
    slab = fcc100("Cu", size=(2, 2, 4), vacuum=6.0)
    slab.info.pop("adsorbate_info", None)
    ads = fcc100("Cu", size=(3, 3, 3), vacuum=6.0)
    add_adsorbate(ads, "Au", 1.9, "hollow")
    a0 = ads.cell[0, 0] / 3.0
    add_adsorbate(ads, "Au", 2.1, position=(1.5 * a0 + a0, 1.5 * a0 + a0))
    ads.info.pop("adsorbate_info", None)
    cluster = Octahedron("Cu", 3, cutoff=1)  # 13 atoms (cuboctahedral-like)
    cl = Atoms(cluster.get_chemical_symbols(), positions=cluster.get_positions())
    sym = cl.get_chemical_symbols()
    sym[0] = "Au"
    cl.set_chemical_symbols(sym)
    cl.center(vacuum=0.0)
    cl.pbc = False
    cl.cell = np.zeros((3, 3))
    return {"cu_bulk": cu, "cuau_bulk": alloy, "cu_slab": slab, "cu_slab_au": ads, "cuau_cluster": cl}


def generate(outdir: Path, n_per_subset: int = 40, seed: int = 0, rattle: float = 0.08) -> list[Path]:
    rng = np.random.default_rng(seed)
    outdir.mkdir(parents=True, exist_ok=True)
    files = []
    for name, proto in prototypes().items():
        frames = []
        for _ in range(n_per_subset):
            a = proto.copy()
            if a.pbc.all():
                strain = np.eye(3) + rng.normal(0.0, 0.01, (3, 3))
                a.set_cell(a.cell[:] @ strain, scale_atoms=True)
            a.positions += rng.normal(0.0, rattle, a.positions.shape)
            frames.append(_label(a))
        path = outdir / f"{name}.extxyz"
        write(path, frames, format="extxyz")
        files.append(path)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--n-per-subset", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    files = generate(args.outdir, args.n_per_subset, args.seed)
    for f in files:
        print(f"wrote {f}")


if __name__ == "__main__":
    main()
