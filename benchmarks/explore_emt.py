"""``distmlip explore`` with EMT as the labeller, under ``mpirun -n 2``: from a committee trained on
30 structures to a potential whose MD survives 1000 K, with the test force MAE per iteration.

System: an Au4 cluster adsorbed on Cu(111) (31 atoms; distmlip.data.examples.slab_adsorbate_atoms).
Initial data: 30 snapshots of EMT Langevin MD at 300 K only (seed 1).  Test set: 60 snapshots
of independent EMT MD at 300, 600 and 1000 K (20 each, seed 2), never used for training.

1. train a committee of K = 3 force-mode models (5.0/8 radial, 3.5/4 angular, 16-16 tanh,
   alpha 0.3, 100 epochs, ZBL off: the loop, not the repulsion, has to make MD survive),
   ``mpirun -n 2 distmlip train``;
2. ``mpirun -n 2 distmlip explore explore.yaml --label-with ase:EMT``: rungs 300, 600, 1000 K,
   2 trajectories of 1 ps per rung and iteration (one per rank), committee threshold
   ``--threshold`` eV/A, up to 20 frames per iteration by farthest-point sampling, retraining
   (warm start) 60 epochs, at most ``--iterations`` iterations; the test set is evaluated with
   the model of every iteration.

Prints explore's table (OUT/explore/table.txt).  Rerun to continue a stopped run.

Usage: python benchmarks/explore_emt.py [--out /tmp/explore_emt] [--np 2] [--iterations 10]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TRAIN = """data: {{train: [{data}], fractions: [0.9, 0.1, 0.0]}}
descriptor: {{rc_radial: 5.0, n_radial: 8, rc_angular: 3.5, n_angular: 4}}
model: {{hidden: [16, 16], activation: tanh}}
training: {{mode: force, alpha: 0.3, epochs: {epochs}, batch_atoms: 300, lr: 3.0e-3, output: {out},
           progress_bar: 'off', log_every: 50}}
committee: {{K: 3}}
zbl: {{enabled: false}}
"""

EXPLORE = """model: {model}
train_config: {train}
structures: [{start}]
output: {out}
iterations: {iterations}
test_data: [{test}]
md: {{temperatures: [300, 600, 1000], steps: {steps}, timestep: 1.0, interval: 10, replicas: 2, seed: 0}}
uncertainty: {{kind: committee, threshold: {threshold}}}
select: {{max_per_iteration: 20, min_new: 1}}
targets: {{failure_ratio: 0.0, flagged_fraction: {flagged}}}
retrain: {{training.epochs: {retrain_epochs}}}
"""


def dm(args, np_, cwd, log):
    cmd = [sys.executable, "-m", "distmlip"] + [str(a) for a in args]
    if np_ > 1:
        cmd = [shutil.which("mpirun"), "-n", str(np_), "--oversubscribe"] \
            + (["--allow-run-as-root"] if os.geteuid() == 0 else []) + ["-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS"] + cmd
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        r = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/explore_emt")
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--threshold", type=float, default=0.2)
    ap.add_argument("--flagged", type=float, default=0.05)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--retrain-epochs", type=int, default=60)
    args = ap.parse_args()
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "run.log"
    t0 = time.time()
    from ase.io import write

    from distmlip.data.examples import slab_adsorbate_atoms, slab_adsorbate_md
    from distmlip.data.h5store import write_dataset

    if not (out / "train.h5").is_file():
        write_dataset(out / "train.h5", slab_adsorbate_md(30, seed=1, temperatures=(300.0,)))
        write_dataset(out / "test.h5", slab_adsorbate_md(60, seed=2, temperatures=(300.0, 600.0, 1000.0)))
        write(str(out / "start.extxyz"), slab_adsorbate_atoms())
    print(f"[{time.time() - t0:5.0f} s] data: 30 training (300 K), 60 test (300/600/1000 K) structures", flush=True)
    (out / "train.yaml").write_text(TRAIN.format(data=out / "train.h5", epochs=args.epochs, out=out / "run"))
    if not (out / "run" / "committee.pt").is_file():
        dm(["train", out / "train.yaml", "--resume", "auto"], args.np, out, log)
    print(f"[{time.time() - t0:5.0f} s] committee of 3 trained", flush=True)
    (out / "explore.yaml").write_text(EXPLORE.format(
        model=out / "run" / "committee.pt", train=out / "train.yaml", start=out / "start.extxyz",
        out=out / "explore", iterations=args.iterations, test=out / "test.h5", steps=args.steps,
        threshold=args.threshold, flagged=args.flagged, retrain_epochs=args.retrain_epochs))
    dm(["explore", out / "explore.yaml", "--label-with", "ase:EMT"], args.np, out, log)
    print(f"[{time.time() - t0:5.0f} s] explore finished", flush=True)
    print((out / "explore" / "table.txt").read_text())


if __name__ == "__main__":
    main()
