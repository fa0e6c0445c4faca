"""Neighbour-list benchmark: atoms/s of each backend of distmlip.descriptors.neighbors.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/neighbors.py [--min-time 0.5]

Systems: the EC dimer of the shared DFT data (a synthetic C/H/O cluster if the data are absent),
DFT-sized cells (fcc Cu 2x2x2 = 32 atoms and 3x3x3 = 108 atoms, a 36-atom Pt(111) slab with
vacuum), fcc Cu 4x4x4 (256 atoms, dense bulk) at Rc 6.5 and 10.5 A, the same 8x8x8 (2048 atoms)
at 6.5 A (linear scaling), and a 2-atom triclinic primitive cell much smaller than the cutoff
(Rc 6.5 A: many periodic images).  Columns: each backend, and "auto" (what every stage uses:
the compiled pair search up to its candidate limit, the cell list beyond).  Every call includes the canonical (i, j, shift) sort that collate uses.
Each backend is checked against the brute-force reference before it is timed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distmlip.descriptors import neighbors as nl  # noqa: E402


def systems():
    from ase.build import bulk

    out = []
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from helpers import shared_data_dir  # noqa: E402
        from ase.io import read

        f = shared_data_dir() / "ec_dimer" / "train" / "file_0000.xsf"
        at = read(f)
        out.append(("EC dimer (20 atoms, molecule)", at.positions, np.array(at.cell), at.pbc, 6.5))
    except Exception:
        rng = np.random.default_rng(0)
        pos = rng.normal(size=(20, 3)) * 2.0
        out.append(("C/H/O cluster (20 atoms, synthetic)", pos, np.zeros((3, 3)), np.zeros(3, bool), 6.5))
    from ase.build import fcc111

    for rep in ((2, 2, 2), (3, 3, 3)):
        c = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(rep)
        c.rattle(0.05, seed=3)
        out.append((f"Cu fcc bulk {len(c)} atoms, Rc 6.5", c.positions, np.array(c.cell), c.pbc, 6.5))
    slab = fcc111("Pt", size=(3, 3, 4), vacuum=8.0)
    slab.rattle(0.05, seed=4)
    out.append(("Pt(111) slab 36 atoms, vacuum, Rc 6.5", slab.positions, np.array(slab.cell),
                np.array([True, True, False]), 6.5))
    cu = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((4, 4, 4))
    cu.rattle(0.05, seed=1)
    out.append(("Cu fcc bulk 256 atoms, Rc 6.5", cu.positions, np.array(cu.cell), cu.pbc, 6.5))
    out.append(("Cu fcc bulk 256 atoms, Rc 10.5", cu.positions, np.array(cu.cell), cu.pbc, 10.5))
    big = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((8, 8, 8))
    big.rattle(0.05, seed=2)
    out.append(("Cu fcc bulk 2048 atoms, Rc 6.5", big.positions, np.array(big.cell), big.pbc, 6.5))
    si = bulk("Si", "diamond", a=5.43)       # 2-atom primitive (triclinic) cell, faces 3.1 A apart
    out.append(("Si primitive 2 atoms (cell < Rc), Rc 6.5", si.positions, np.array(si.cell), si.pbc, 6.5))
    return out


def timeit(fn, min_time):
    fn()
    n, t0 = 0, time.perf_counter()
    best = float("inf")
    while True:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        n += 1
        if time.perf_counter() - t0 > min_time and n >= 3:
            return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement")
    args = ap.parse_args(argv)
    backends = [b for b in ("auto", "compiled", "vesin", "matscipy", "numpy", "ase")
                if b in ("auto", "matscipy") or b in nl.available_backends()]
    try:
        import matscipy.neighbours  # noqa: F401
    except Exception:
        backends.remove("matscipy")
    print(f"auto: the compiled search up to {nl._COMPILED_CANDIDATES} candidates"
          if "compiled" in backends else f"auto: {'vesin' if nl._have_vesin() else 'numpy'} (no compiled extension)")
    head = f"{'system':44s} {'pairs':>9s} " + " ".join(f"{b + ' atoms/s':>16s}" for b in backends)
    print(head)
    print("-" * len(head))
    for name, pos, cell, pbc, rc in systems():
        ref = np.column_stack(nl.neighbor_list(pos, cell, pbc, rc, backend="brute")) if len(pos) <= 256 else None
        row = []
        npairs = None
        for b in backends:
            res = np.column_stack(nl.neighbor_list(pos, cell, pbc, rc, backend=b))
            npairs = len(res)
            if ref is not None and not (res.shape == ref.shape and (res == ref).all()):
                row.append(f"{'WRONG':>16s}")
                continue
            t = timeit(lambda: nl.neighbor_list(pos, cell, pbc, rc, backend=b), args.min_time)
            row.append(f"{len(pos) / t:16.4g}")
        print(f"{name:44s} {npairs:9d} " + " ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
