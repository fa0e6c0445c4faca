"""MD stability check demonstration (one command; ~4 min on 2 idle cores, ~15 min on a loaded machine):

    .venv/bin/python examples/md_check/run.py [--out examples/md_check/out] [--temperature 2500]

1. labels 16 rattled fcc Cu supercells (32 atoms, nearest neighbours >= ~2.2 A) with ASE EMT;
2. trains two force-mode potentials on them, identical except that the second has the ZBL
   short-range repulsion (``zbl: {enabled: true}``);
3. runs ``distmlip md-check`` on both at a high temperature and prints the comparison,
   including an EMT run of the same protocol as the reference.

Nothing here is tuned to make one of the two fail: what is printed is what happened.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CONFIG = """
data: {{train: [{data}], fractions: [0.85, 0.15, 0.0], split_seed: 0}}
descriptor: {{rc_radial: 5.0, n_radial: 8, rc_angular: 3.5, n_angular: 3, backend: auto}}
model: {{hidden: [16, 16], activation: tanh}}
training: {{mode: force, alpha: 0.5, epochs: {epochs}, batch_atoms: 128, lr: 5.0e-3, output: {out},
           scheduler: plateau, plateau_patience: 15, seed: 1, progress_bar: "off", log_every: 50}}
zbl: {{enabled: {zbl}}}
"""


def make_data(path: Path, n: int, seed: int = 0):
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from distmlip.data.h5store import write_dataset
    from distmlip.data.structure import Structure

    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        a = bulk("Cu", "fcc", a=3.61 * rng.uniform(0.98, 1.03), cubic=True).repeat((2, 2, 2))
        a.rattle(stdev=float(rng.uniform(0.03, 0.12)), seed=int(rng.integers(1 << 30)))
        a.calc = EMT()
        out.append(Structure(numbers=a.numbers.copy(), positions=a.positions.copy(), cell=np.array(a.cell[:]),
                             pbc=a.pbc.copy(), energy=float(a.get_potential_energy()),
                             forces=a.get_forces().copy(), source="emt_cu", source_index=k))
    write_dataset(path, out)
    d = []
    from ase.neighborlist import neighbor_list
    for s in out:
        from ase import Atoms
        d.append(neighbor_list("d", Atoms(s.numbers, s.positions, cell=s.cell, pbc=True), 3.0).min())
    return float(min(d))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "examples/md_check/out"))
    ap.add_argument("--structures", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--temperature", type=float, default=2500.0)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--timestep", type=float, default=2.0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    py = sys.executable
    t0 = time.time()
    data = out / "cu_emt.h5"
    dmin = make_data(data, args.structures) if not data.is_file() else float("nan")
    print(f"[demo] {args.structures} EMT Cu structures -> {data}; shortest distance in the data {dmin:.3f} A")
    from ase.build import bulk
    from ase.io import write

    start = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    write(str(out / "start.extxyz"), start)
    results = {}
    for name, zbl in (("no_zbl", "false"), ("zbl", "true")):
        cfg = out / f"train_{name}.yaml"
        cfg.write_text(CONFIG.format(data=data, epochs=args.epochs, out=out / name, zbl=zbl))
        # a rerun reuses finished steps; a stopped training (SIGTERM) is resumed from its checkpoint
        for attempt in range(3):
            if (out / name / "model.pt").is_file():
                break
            print(f"[demo] training {name} ...", flush=True)
            subprocess.run([py, "-m", "distmlip", "train", str(cfg), "--resume", "auto"], check=True, env=env,
                           cwd=ROOT)
        if (out / f"md_{name}" / "summary.json").is_file():
            print(f"[demo] md-check {name}: reusing {out / f'md_{name}' / 'summary.json'}")
        else:
            print(f"[demo] md-check {name} at {args.temperature:g} K ...", flush=True)
            subprocess.run([py, "-m", "distmlip", "md-check", str(out / name / "model.pt"),
                            str(out / "start.extxyz"), "-T", str(args.temperature), "--steps", str(args.steps),
                            "--timestep", str(args.timestep), "--interval", "10", "--nve-steps", "100",
                            "-o", str(out / f"md_{name}")], check=True, env=env, cwd=ROOT)
        results[name] = json.loads((out / f"md_{name}" / "summary.json").read_text())["runs"][0]
    # EMT reference run of the same protocol
    from ase.calculators.emt import EMT

    from distmlip.evaluation.mdcheck import run_one, threshold_matrix

    ref = run_one(start, EMT(), args.temperature, args.steps, args.timestep, 0.02,
                  threshold_matrix(start.numbers, 0.6), 10, 100, 6.0, 0, out / "md_emt", 200, label="EMT ")
    results["EMT (reference)"] = ref
    print()
    print(f"MD stability at {args.temperature:g} K, {args.steps} x {args.timestep:g} fs, 32 Cu atoms; failure = any "
          f"pair < 0.6 x (2 r_cov) = {0.6 * 2 * 1.32:.3f} A")
    print(f"{'potential':>16} {'frames':>7} {'failed':>7} {'fail ratio':>10} {'d_min (A)':>10} "
          f"{'NVE drift eV/atom':>18}  verdict")
    for name, r in results.items():
        drift = "n/a" if r["nve_drift_eV_atom"] is None else f"{r['nve_drift_eV_atom']:.2e}"
        print(f"{name:>16} {r['frames']:7d} {r['failed_frames']:7d} {r['failure_ratio']:10.3f} "
              f"{r['min_dist_A']:10.3f} {drift:>18}  {r['verdict']}")
    nz, z = results["no_zbl"], results["zbl"]
    print()
    if nz["failure_ratio"] > 0 and z["failure_ratio"] == 0:
        print("Outcome: the potential without ZBL fails (unphysically close pairs), the ZBL hybrid does not.")
    elif nz["failure_ratio"] == 0 and z["failure_ratio"] == 0:
        print("Outcome: neither potential failed in this run (no close approaches below the threshold).")
    else:
        print(f"Outcome: failure ratio without ZBL {nz['failure_ratio']:.3f}, with ZBL {z['failure_ratio']:.3f}.")
    (out / "comparison.json").write_text(json.dumps(results, indent=1))
    print(f"[demo] done in {time.time() - t0:.0f} s; outputs in {out}")


if __name__ == "__main__":
    main()
