"""GPR-ANN against energy-only and direct force training (and the hybrid) at one wall-time budget.

    python benchmarks/gpr_ann.py demo|slab|ec [--budget 120] [--copies auto] [--auto-pool 1] [--pool 80] [--delta 0.03]
                                 [--fingerprint auto] [--np 1] [--out runs/gpr_ann] [--reuse-augment]
                                 [--gpr-load DIR]
                                 [--scheduler plateau|cosine] [--optimizer auto|adamw|lbfgs]
                                 [--methods energy,force,...] [--seeds 0,1]
    python benchmarks/gpr_ann.py files --train TRAIN --test TEST [--descriptor 5.0,8,3.5,4]
                                 [--hidden 16,16] [--batch-atoms 1200] [...]

Data sets: ``demo`` the EMT set of ``make demo`` (24 training / 12 test structures per subset);
``slab`` a periodic Cu(100) 3x3x3 slab with a CO molecule on top (EMT; 40 training / 40 test
rattled structures, one subset); ``ec`` the EC dimers (250 / 750, HSE06, shared data); ``files``
your own training and test data (``--train``/``--test``: a distmlip HDF5 data set, or anything
``distmlip convert`` reads), with ``--descriptor`` and ``--hidden`` for its descriptor and networks.
Methods, each trained with the same wall-time budget per run (``--budget`` seconds: the epochs
are set from the median epoch time of a 3-epoch calibration run, start-up excluded):
  energy   energy-only on the reference structures
  force    direct force training (alpha 0.3, all forces)
  gpr_ann  energy training on the GPR-augmented set (copies weighted by their variance) with the
           copy-difference term (training.difference_weight, default 0.05; training/losses.py); with
           --copies auto (the default) augment labels a pool of 3M copies per structure and training
           draws M of them anew every epoch (augment pool: auto, training.copies_per_epoch: auto;
           docs/gpr.md); --auto-pool 1 makes M fixed copies
  gpr_ann_paper  the same with the paper's plain energy loss (difference_weight 0)
  hybrid   force mode on the augmented set: GPR energies + reference forces
  gpr_ann_pool  (with ``--pool P``) gpr_ann on a pool of P copies per structure labelled by the
           same GPR fit, of which M (``--copies``) are drawn anew every epoch
           (training.copies_per_epoch): M copies' cost per epoch, P directions over the run
Prints E MAE (meV/atom), F MAE (eV/A) and force angle on the test set per method and the
augment (GPR fit) time.  No assertions: the numbers go to docs/results.md.
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

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DISTMLIP_SHARED_DATA", REPO.parent / "shared" / "data"))
MODEL = {"hidden": [16, 16], "activation": "tanh"}
DESC = {"rc_radial": 5.0, "n_radial": 8, "rc_angular": 3.5, "n_angular": 4}


def dm(*args, np_=1, log=None):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "distmlip", *map(str, args)]
    if np_ > 1:
        cmd = ["mpirun", "-n", str(np_), "--oversubscribe", "--bind-to", "none", "-x", "PYTHONPATH",
               "-x", "OMP_NUM_THREADS"] + (["--allow-run-as-root"] if os.geteuid() == 0 else []) + cmd
    with open(log or os.devnull, "w") as fh:
        subprocess.run(cmd, check=True, env=env, stdout=fh, stderr=subprocess.STDOUT)


def make_slab(out: Path, n: int, seed: int):
    from ase import Atoms
    from ase.build import add_adsorbate, fcc100
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    slab = fcc100("Cu", size=(3, 3, 3), vacuum=6.0)
    add_adsorbate(slab, Atoms("CO", positions=[(0, 0, 0), (0, 0, 1.15)]), 1.9, "ontop")
    slab.info.pop("adsorbate_info", None)
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        a = slab.copy()
        a.positions += rng.normal(0.0, 0.08, a.positions.shape)
        a.calc = EMT()
        e, f = a.get_potential_energy(), a.get_forces()
        a.calc = SinglePointCalculator(a, energy=e, forces=f)
        frames.append(a)
    out.mkdir(parents=True, exist_ok=True)
    write(out / "cu_slab_co.extxyz", frames, format="extxyz")


def prepare(kind: str, out: Path, np_: int, files=None):
    raw = out / "raw"
    if kind == "files":
        for part, src in zip(("train", "test"), files):
            src = Path(src).resolve()
            dst = out / f"{part}.h5"
            if src.suffix in (".h5", ".hdf5"):
                if not dst.exists():
                    dst.symlink_to(src)
            elif not dst.exists():
                dm("convert", src, "-o", dst, np_=np_)
        return
    if kind == "demo":
        for part, n, seed in (("train", 24, 1), ("test", 12, 2)):
            subprocess.run([sys.executable, str(REPO / "examples/demo/make_emt_data.py"), str(raw / part),
                            "--n-per-subset", str(n), "--seed", str(seed)], check=True, stdout=subprocess.DEVNULL)
    elif kind == "slab":
        make_slab(raw / "train", 40, 1)
        make_slab(raw / "test", 40, 2)
    else:
        for part in ("train", "test"):
            (raw / part).mkdir(parents=True, exist_ok=True)
            src = SHARED / "ec_dimer" / part
            for f in src.glob("*.xsf"):
                dst = raw / part / f.name
                if not dst.exists():
                    dst.symlink_to(f)
    for part in ("train", "test"):
        if not (out / f"{part}.h5").exists():
            dm("convert", raw / part, "-o", out / f"{part}.h5", np_=np_)


def train_yaml(out: Path, name: str, data: str, mode: str, epochs: int, batch_atoms: int,
               extra: dict | None = None) -> Path:
    import yaml

    cfg = {"data": {"train": [data], "fractions": [0.9, 0.1, 0.0]}, "descriptor": DESC, "model": MODEL,
           "training": {"mode": mode, "epochs": int(epochs), "batch_atoms": batch_atoms, "lr": 3.0e-3,
                        "output": str(out / f"run_{name}"), "progress_bar": "off"}}
    if mode == "force":
        cfg["training"].update(alpha=0.3, force_fraction=1.0)
    cfg["training"].update(extra or {})
    p = out / f"train_{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def run_method(out, name, data, mode, budget, batch_atoms, np_, extra=None, seeds=(0,)):
    """One row per training seed: the epochs from one calibration (the first seed's), so every
    seed trains the same epochs and the rows differ by the seed alone."""
    import csv

    cal = train_yaml(out, name + "_cal", data, mode, 3, batch_atoms, extra)
    dm("train", cal, np_=np_, log=out / f"{name}_cal.log")
    # the epochs' own times (the log's time_s), not the start-up: the budget is training time
    rows = list(csv.DictReader(open(out / f"run_{name}_cal" / "log.csv")))
    per_epoch = float(np.median([float(r["time_s"]) for r in rows]))
    epochs = max(2, int(budget / max(per_epoch, 1e-3)))
    res = []
    for seed in seeds:
        tag = name if seed == seeds[0] else f"{name}_s{seed}"
        t0 = time.perf_counter()
        dm("train", train_yaml(out, tag, data, mode, epochs, batch_atoms, dict(extra or {}, seed=seed)), np_=np_,
           log=out / f"{tag}.log")
        t_train = time.perf_counter() - t0
        dm("evaluate", out / f"run_{tag}" / "model.pt", out / "test.h5", "-o", out / f"eval_{tag}",
           log=out / f"eval_{tag}.log")
        m = json.loads((out / f"eval_{tag}" / "metrics.json").read_text())
        o = m.get("metrics", m).get("overall", m)
        res.append(dict(method=name, seed=seed, epochs=epochs, train_s=t_train, E=o["E_mae_meV_atom"],
                        F=o["F_mae"], angle=o["F_direction_deg"]))
    return res


def _auto(tp):
    def conv(v):
        return v if v == "auto" else tp(v)
    conv.__name__ = tp.__name__ + " or auto"
    return conv


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("set", choices=["demo", "slab", "ec", "files"])
    ap.add_argument("--train", help="files: the training data (HDF5, or any input of distmlip convert)")
    ap.add_argument("--test", help="files: the test data")
    ap.add_argument("--descriptor", default=None,
                    help="rc_radial,n_radial,rc_angular,n_angular (default 5.0,8,3.5,4)")
    ap.add_argument("--hidden", default=None, help="hidden layer sizes, e.g. 16,16 (default)")
    ap.add_argument("--batch-atoms", type=int, default=None,
                    help="atoms per batch of the reference-structure methods (default 300; ec and files 1200); "
                         "augmented sets take 4x")
    ap.add_argument("--budget", type=float, default=120.0, help="training wall time per method (s)")
    ap.add_argument("--copies", type=_auto(int), default=None,
                    help="copies per structure, or auto (per subset from the GPR's leave-one-out errors, docs/gpr.md); "
                         "default: auto, as augment's default (20 with --pool)")
    ap.add_argument("--pool", type=int, default=0, help="copies per structure of the gpr_ann_pool method's pool")
    ap.add_argument("--auto-pool", type=int, default=None,
                    help="augment's pool with --copies auto: a pool of this many times M copies per structure, of "
                         "which gpr_ann draws M per epoch (default: augment's, 3 with copies auto; 1: M fixed copies)")
    ap.add_argument("--delta", type=_auto(float), default=0.03, help="copies' displacement (A), or auto")
    ap.add_argument("--gpr-load", type=Path, default=None,
                    help="label with the GPR fits saved by an earlier run (its gpr_fits folder) instead of fitting")
    ap.add_argument("--fingerprint", default="auto")
    ap.add_argument("--np", type=int, default=1, dest="np_")
    ap.add_argument("--methods", default="energy,force,gpr_ann,gpr_ann_paper,hybrid")
    ap.add_argument("--seeds", default="0",
                    help="training seeds, e.g. 0,1,2: each method trains once per seed (same epochs); the "
                         "ratios are printed per seed and for the means (seed-to-seed scatter of 5-10 %% "
                         "measured on the EC dimers)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reuse-augment", action="store_true",
                    help="rerun augment without --fresh: its restart shards are reused where their settings and "
                         "input match (other copies, delta or fits are recomputed)")
    ap.add_argument("--scheduler", default=None, choices=["plateau", "cosine"],
                    help="training.scheduler for every method (default: the config default)")
    ap.add_argument("--optimizer", default=None, choices=["auto", "adamw", "lbfgs"],
                    help="training.optimizer for every method (default: the config default)")
    ap.add_argument("--ema", type=float, default=None,
                    help="training.ema for every method (default: the config default)")
    a = ap.parse_args()
    if a.set == "files" and not (a.train and a.test):
        ap.error("files needs --train and --test")
    if a.copies is None:
        a.copies = 20 if a.pool else "auto"
    if a.pool and a.copies == "auto":
        ap.error("--pool draws --copies copies per epoch: give a number with --pool")
    if a.auto_pool is not None and a.auto_pool > 1 and a.copies != "auto":
        ap.error("--auto-pool multiplies the M of --copies auto")
    if a.descriptor:
        rr, nr, ra, na = a.descriptor.split(",")
        DESC.update(rc_radial=float(rr), n_radial=int(nr), rc_angular=float(ra), n_angular=int(na))
    if a.hidden:
        MODEL["hidden"] = [int(x) for x in a.hidden.split(",")]
    out = (a.out or REPO / "runs" / f"gpr_ann_{a.set}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    prepare(a.set, out, a.np_, (a.train, a.test))
    import yaml

    aug = {"input": str(out / "train.h5"), "output": str(out / "train_aug.h5"), "method": "gpr",
           "copies": a.copies, "delta": a.delta, "seed": 0, **({"pool": a.auto_pool} if a.auto_pool is not None else {}),
           "gpr": {"fingerprint": a.fingerprint, "save": str(out / "gpr_fits")} if a.gpr_load is None else
           {"fingerprint": a.fingerprint, "load": str(a.gpr_load.resolve())}}
    (out / "augment.yaml").write_text(yaml.safe_dump(aug))
    t0 = time.perf_counter()
    # --reuse-augment: augment's own restart (shards keyed by settings and input) decides what is
    # reused; the output was reused blindly before, whatever copies or delta it had been made with
    dm("augment", out / "augment.yaml", *([] if a.reuse_augment else ["--fresh"]), np_=a.np_,
       log=out / "augment.log")
    t_aug = time.perf_counter() - t0
    rep = json.loads((out / "train_aug.report.json").read_text())
    if a.reuse_augment:      # the shards' own times (GPR fit + labels when they were made)
        t_aug = sum(r.get("time_total_s", 0.0) for r in rep["subsets"])
    if a.pool:
        # the pool: the same saved GPR fits label P copies per structure (no second fit)
        pool = dict(aug, copies=a.pool, output=str(out / "train_pool.h5"),
                    gpr={"fingerprint": a.fingerprint, "load": str(a.gpr_load.resolve() if a.gpr_load else out / "gpr_fits")})
        (out / "augment_pool.yaml").write_text(yaml.safe_dump(pool))
        t1 = time.perf_counter()
        dm("augment", out / "augment_pool.yaml", *([] if a.reuse_augment else ["--fresh"]), np_=a.np_,
           log=out / "augment_pool.log")
        print(f"pool of {a.pool} copies per structure labelled in {time.perf_counter() - t1:.0f} s")
    batch = a.batch_atoms or (1200 if a.set in ("ec", "files") else 300)
    plan = {"energy": ("train.h5", "energy", batch), "force": ("train.h5", "force", batch),
            "gpr_ann": ("train_aug.h5", "energy", 4 * batch),
            "gpr_ann_paper": ("train_aug.h5", "energy", 4 * batch, {"difference_weight": 0.0}),
            "hybrid": ("train_aug.h5", "force", batch),
            "gpr_ann_pool": ("train_pool.h5", "energy", 4 * batch, {"copies_per_epoch": a.copies})}
    methods = a.methods.split(",") + (["gpr_ann_pool"] if a.pool and "gpr_ann_pool" not in a.methods else [])
    common = {"scheduler": a.scheduler} if a.scheduler else {}
    if a.optimizer:
        common["optimizer"] = a.optimizer
    if a.ema is not None:
        common["ema"] = a.ema
    seeds = tuple(int(x) for x in a.seeds.split(","))
    rows = [r for m in methods
            for r in run_method(out, m, str(out / plan[m][0]), plan[m][1], a.budget, plan[m][2], a.np_,
                                dict(common, **(plan[m][3] if len(plan[m]) > 3 else {})), seeds)]
    load = os.getloadavg()[0]
    print(f"\n{a.set}: M = {a.copies}, delta = {a.delta} A, fingerprint {a.fingerprint}, budget {a.budget:.0f} s "
          f"per method, scheduler {a.scheduler or 'default'}, optimizer {a.optimizer or 'default'}, ema {'default' if a.ema is None else a.ema}, augment (GPR fit + labels) {t_aug:.0f} s, load {load:.1f}")
    for r in rep["subsets"]:
        print(f"  {r['subset']}: fingerprint {r.get('fingerprint', {}).get('kind')}, choice "
              f"{r.get('fingerprint_choice')}, M {r.get('copies_per_structure')}"
              f"{' (pool; ' + str(r['copies_per_epoch']) + ' per epoch)' if r.get('copies_per_epoch') else ''}, "
              f"delta {r.get('delta_A')}"
              f"{' (' + r['auto_choice']['reason'] + ')' if r.get('auto_choice') else ''}, sigma mean {r.get('uncertainty_eV', {}).get('mean', 0):.4f} eV, "
              f"label - parent {r.get('label_minus_parent_eV', {}).get('mean', 0):+.4f} eV")
    print(f"{'method':<14} {'seed':>4} {'epochs':>6} {'train s':>8} {'E MAE meV/at':>13} {'F MAE eV/A':>11} "
          f"{'angle':>7}")
    for r in rows:
        print(f"{r['method']:<14} {r['seed']:>4} {r['epochs']:>6} {r['train_s']:>8.0f} {r['E']:>13.3f} "
              f"{r['F']:>11.4f} {r['angle']:>7.1f}")
    by = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    mean = {m: {k: float(np.mean([r[k] for r in rs])) for k in ("E", "F")} for m, rs in by.items()}
    if len(seeds) > 1:
        print(f"means over seeds {a.seeds}:")
        for m, rs in by.items():
            print(f"  {m:<14} E {mean[m]['E']:.3f} (range {min(r['E'] for r in rs):.3f}-{max(r['E'] for r in rs):.3f}) "
                  f"F {mean[m]['F']:.4f} (range {min(r['F'] for r in rs):.4f}-{max(r['F'] for r in rs):.4f})")

    def ratio(m, ref):
        per = [(x["E"] / y["E"], x["F"] / y["F"]) for x, y in zip(by[m], by[ref])]
        spread = "" if len(per) < 2 else (f" (per seed E {min(p[0] for p in per):.2f}-{max(p[0] for p in per):.2f}x, "
                                          f"F {min(p[1] for p in per):.2f}-{max(p[1] for p in per):.2f}x)")
        return (f"E MAE {mean[m]['E'] / mean[ref]['E']:.2f}x, F MAE {mean[m]['F'] / mean[ref]['F']:.2f}x"
                + spread)
    if "force" in by:
        for m in ("gpr_ann", "gpr_ann_paper", "hybrid", "gpr_ann_pool"):
            if m in by:
                print(f"{m} / direct force: {ratio(m, 'force')}")
    if "energy" in by and "gpr_ann" in by:
        print(f"gpr_ann / energy-only: {ratio('gpr_ann', 'energy')}")
    (out / "summary.json").write_text(json.dumps(dict(rows=rows, augment_s=t_aug, load=load), indent=1))


if __name__ == "__main__":
    main()
