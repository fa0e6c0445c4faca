"""MD stability and accuracy of energy-only, direct-force and GPR-ANN potentials, each with and
without the ZBL short-range repulsion (the measurement behind ZBL being on by default).

Data sets (generated here with ASE's EMT, except the EC dimers):

* ``demo``: the demo's five subsets (examples/demo/make_emt_data.py: Cu32 bulk, Au8Cu24 alloy,
  Cu16 slab, Cu27 slab with two Au adatoms, AuCu12 cluster; rattled 0.08 A), 24 training and 12
  test structures per subset (seeds 1 and 2, as ``make demo``); MD starts from the Au8Cu24 alloy;
* ``slab``: an Au4 cluster adsorbed on Cu(111) (3 x 3 x 3 slab, 31 atoms;
  distmlip.data.examples.slab_adsorbate_md): 100 training snapshots of EMT Langevin MD at
  300/600/900 K and 50 test snapshots of an independent run; MD starts from the unrelaxed slab;
* ``ec``: the EC dimers of ../shared/data/ec_dimer (250 training, 750 test; accuracy only: free
  molecules, the data set of the GPR-ANN paper).

Per set and model: training wall time, test energy MAE (meV/atom) and force MAE (eV/A) against
the reference, and for demo and slab ``distmlip md-check`` at 300 and 1000 K (Langevin, 1 fs,
friction 0.02/fs, 2000 steps = 2 ps, NVE continuation 200 steps): failure ratio, minimum distance,
final temperature and verdict; EMT itself is run through the same md-check as the reference.

Training settings are the demo's (examples/demo/train_*.yaml: 5.0/8 radial, 3.5/4 angular, 16-16
tanh; energy 400 epochs, force 150 epochs with alpha 0.3, GPR-ANN 150 epochs on 10 GPR copies per
structure at delta 0.03 A); the EC dimers use 6.5/12 and 4.0/4 with 10-10 tanh, energy 300 and
force 100 epochs.  ZBL uses the default per-pair radii (0.5 / 0.75 x the covalent-radius sum).

Every step is skipped when its output exists (rerun to resume).  Results: OUT/results.json and the
tables on stdout (quoted in docs/results.md).

Usage: python benchmarks/md_stability.py [--out benchmarks/out/md_stability] [--sets demo slab ec]
       [--np 1] [--steps 2000] [--temperatures 300 1000] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DESC_EMT = "descriptor: {rc_radial: 5.0, n_radial: 8, rc_angular: 3.5, n_angular: 4}\nmodel: {hidden: [16, 16], activation: tanh}\n"
DESC_EC = "descriptor: {rc_radial: 6.5, n_radial: 12, rc_angular: 4.0, n_angular: 4}\nmodel: {hidden: [10, 10], activation: tanh}\n"
MODES = {  # name -> (training mode, epochs EMT, epochs EC, batch_atoms, data)
    "energy": ("energy", 400, 300, 300, "train.h5"),
    "force": ("force", 150, 100, 300, "train.h5"),
    "gpr_ann": ("energy", 150, 150, 1000, "train_aug.h5"),
}


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def dm(args, np_=1, cwd=None, check=True, log=None):
    cmd = [sys.executable, "-m", "distmlip"] + [str(a) for a in args]
    if np_ > 1:
        mp = shutil.which("mpirun")
        cmd = [mp, "-n", str(np_), "--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else []) \
            + ["-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS"] + cmd
    with open(log, "w") if log else open(os.devnull, "w") as fh:
        r = subprocess.run(cmd, cwd=cwd, env=env(), stdout=fh, stderr=subprocess.STDOUT)
    if check and r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")
    return r.returncode


def make_data(name: str, d: Path, quick: bool):
    from ase.io import write

    from distmlip.data.h5store import write_dataset

    d.mkdir(parents=True, exist_ok=True)
    if (d / "train.h5").is_file() and (d / "test.h5").is_file():
        return
    if name == "demo":
        sys.path.insert(0, str(REPO / "examples" / "demo"))
        import make_emt_data as med

        n_tr, n_te = (8, 4) if quick else (24, 12)
        med.generate(d / "raw_train", n_tr, 1)
        med.generate(d / "raw_test", n_te, 2)
        dm(["convert", d / "raw_train", "-o", d / "train.h5"], log=d / "convert_train.log")
        dm(["convert", d / "raw_test", "-o", d / "test.h5"], log=d / "convert_test.log")
        write(str(d / "start.extxyz"), med.prototypes()["cuau_bulk"])
    elif name == "slab":
        from distmlip.data.examples import slab_adsorbate_atoms, slab_adsorbate_md

        n_tr, n_te = (30, 15) if quick else (100, 50)
        write_dataset(d / "train.h5", slab_adsorbate_md(n_tr, seed=1))
        write_dataset(d / "test.h5", slab_adsorbate_md(n_te, seed=2))
        write(str(d / "start.extxyz"), slab_adsorbate_atoms())
    elif name == "ec":
        ec = Path(os.environ.get("DISTMLIP_SHARED_DATA", REPO.parent / "shared" / "data")) / "ec_dimer"
        dm(["convert", ec / "train", "-o", d / "train.h5"], log=d / "convert_train.log")
        dm(["convert", ec / "test", "-o", d / "test.h5"], log=d / "convert_test.log")


def augment(d: Path, np_: int):
    if (d / "train_aug.h5").is_file():
        return
    (d / "augment.yaml").write_text("input: train.h5\noutput: train_aug.h5\nmethod: gpr\ncopies: 10\n"
                                    "delta: 0.03\nseed: 0\ngpr: {fingerprint: cartesian}\n")
    dm(["augment", "augment.yaml"], np_=np_, cwd=d, log=d / "augment.log")


def train(set_name: str, d: Path, mode: str, zbl: bool, np_: int, quick: bool) -> dict:
    tmode, ep_emt, ep_ec, batch, data = MODES[mode]
    epochs = ep_ec if set_name == "ec" else ep_emt
    if quick:
        epochs = max(10, epochs // 10)
    name = f"{mode}_{'zbl' if zbl else 'nozbl'}"
    run = d / name
    info = run / "bench.json"
    if info.is_file():
        return json.loads(info.read_text())
    cfg = (f"data: {{train: [{data}], fractions: [0.9, 0.1, 0.0]}}\n"
           + (DESC_EC if set_name == "ec" else DESC_EMT)
           + f"training: {{mode: {tmode}, alpha: 0.3, epochs: {epochs}, batch_atoms: {batch}, lr: 3.0e-3, "
             f"output: {name}, progress_bar: 'off', log_every: 50}}\n"
           + f"zbl: {{enabled: {'true' if zbl else 'false'}}}\n")
    (d / f"{name}.yaml").write_text(cfg)
    t0 = time.time()
    dm(["train", f"{name}.yaml", "--resume", "auto"], np_=np_, cwd=d, log=d / f"{name}.train.log")
    wall = time.time() - t0
    from distmlip.data.h5store import H5Dataset
    from distmlip.evaluation.metrics import metrics, predict
    from distmlip.models.bpnn import load_models

    models = load_models(run / "model.pt")
    pred = predict(models, H5Dataset(d / "test.h5"), forces=True)
    ov = metrics(pred)
    res = {"set": set_name, "mode": mode, "zbl": zbl, "epochs": epochs, "train_wall_s": wall,
           "test_E_mae_meV_atom": ov["E_mae_meV_atom"], "test_F_mae": ov.get("F_mae")}
    info.write_text(json.dumps(res))
    return res


def md(d: Path, model: str, tag: str, temps, steps: int) -> list:
    out = d / f"md_{tag}"
    summ = out / "summary.json"
    if not summ.is_file():
        dm(["md-check", model, d / "start.extxyz", "-T", *temps, "--steps", steps, "--interval", 10,
            "--nve-steps", 200, "--report-only", "-o", out], log=d / f"md_{tag}.log")
    runs = json.loads(summ.read_text())["runs"]
    return [{"T": r["temperature_K"], "failure_ratio": r["failure_ratio"], "min_dist_A": r["min_dist_A"],
             "final_T_K": r["final_T_K"], "verdict": r["verdict"]} for r in runs]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "md_stability"))
    ap.add_argument("--sets", nargs="+", default=["demo", "slab", "ec"], choices=["demo", "slab", "ec"])
    ap.add_argument("--np", type=int, default=1, help="ranks for augment and train (mpirun when > 1)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--temperatures", nargs="+", default=["300", "1000"])
    ap.add_argument("--quick", action="store_true", help="small data and 10x fewer epochs (a smoke run)")
    args = ap.parse_args()
    out = Path(args.out)
    results = {"accuracy": [], "stability": []}
    t0 = time.time()
    for s in args.sets:
        d = out / s
        print(f"[{time.time() - t0:6.0f} s] {s}: data", flush=True)
        make_data(s, d, args.quick)
        modes = ["energy", "force"] if s == "ec" else ["energy", "force", "gpr_ann"]
        if "gpr_ann" in modes:
            print(f"[{time.time() - t0:6.0f} s] {s}: GPR augmentation", flush=True)
            augment(d, args.np)
        for mode in modes:
            for zbl in (False, True):
                print(f"[{time.time() - t0:6.0f} s] {s}: train {mode} zbl={zbl}", flush=True)
                r = train(s, d, mode, zbl, args.np, args.quick)
                results["accuracy"].append(r)
                if s != "ec":
                    tag = f"{mode}_{'zbl' if zbl else 'nozbl'}"
                    print(f"[{time.time() - t0:6.0f} s] {s}: md-check {tag}", flush=True)
                    for row in md(d, str(d / tag / "model.pt"), tag, args.temperatures, args.steps):
                        results["stability"].append({"set": s, "mode": mode, "zbl": zbl, **row})
        if s != "ec":
            print(f"[{time.time() - t0:6.0f} s] {s}: md-check EMT", flush=True)
            for row in md(d, "ase:EMT", "emt", args.temperatures, args.steps):
                results["stability"].append({"set": s, "mode": "EMT (reference)", "zbl": None, **row})
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print()
    print("Accuracy on the test sets (training wall time on this machine)")
    print(f"{'set':>5} {'model':>8} {'ZBL':>4} {'epochs':>6} {'E MAE meV/atom':>15} {'F MAE eV/A':>11} {'train s':>8}")
    for r in results["accuracy"]:
        f = "n/a" if r["test_F_mae"] is None else f"{r['test_F_mae']:.4f}"
        print(f"{r['set']:>5} {r['mode']:>8} {('on' if r['zbl'] else 'off'):>4} {r['epochs']:6d} "
              f"{r['test_E_mae_meV_atom']:15.3f} {f:>11} {r['train_wall_s']:8.0f}")
    print()
    print(f"MD stability ({args.steps} x 1 fs Langevin; failure = a pair < 0.6 x covalent-radius sum)")
    print(f"{'set':>5} {'model':>16} {'ZBL':>4} {'T (K)':>6} {'fail ratio':>10} {'d_min A':>8} {'final T K':>9}  verdict")
    for r in results["stability"]:
        z = "" if r["zbl"] is None else ("on" if r["zbl"] else "off")
        print(f"{r['set']:>5} {r['mode']:>16} {z:>4} {r['T']:6.0f} {r['failure_ratio']:10.3f} "
              f"{r['min_dist_A']:8.3f} {r['final_T_K']:9.0f}  {r['verdict'][:110]}")
    print(f"\ndone in {time.time() - t0:.0f} s; {out / 'results.json'}")


if __name__ == "__main__":
    main()
