"""distmlip against aenet's own trainer (train.x of aenet 2.0.4) at one wall-time budget.

    python benchmarks/aenet_train.py ptO|nipd|mol|cuco [--budget 60] [--repeats 1] [--out DIR]
                                     [--methods aenet_bfgs,energy,force] [--hidden 16,16]
    python benchmarks/aenet_train.py files --train TRAIN --test TEST [--descriptor 5.0,8,3.5,4]

What an aenet user meets when moving to distmlip: the same networks (tanh, ``--hidden``) on the
same Chebyshev descriptor (aenet's generate.x for aenet, distmlip's own for distmlip; they agree to
1e-13, docs/aenet.md), the same training structures with 10 % held out for validation by each
program, the same wall-time budget for the training stage, one core each (aenet's serial build,
distmlip with OMP_NUM_THREADS=1), and one test set scored by ``distmlip evaluate`` (aenet's
potential imported with ``distmlip import-aenet``, which reproduces predict.x to 5e-9 eV).

Methods:
  aenet_bfgs   train.x, METHOD bfgs (aenet's default, full-batch L-BFGS on energies), per-element
               reference energies from a least-squares fit to the training energies; stopped by
               aenet's own STOP file when the budget has passed; the epoch with the lowest
               validation RMSE is kept (train.x writes every epoch's networks)
  aenet_lm     train.x, METHOD lm (Levenberg-Marquardt), the same otherwise
  aenet_adam   train.x, METHOD adam (its defaults: mu 0.001, batch 1), the same otherwise
  aenet_pytorch  aenet-PyTorch (the GPR-ANN paper's force-training code, from its tarball beside
               the aenet programs) as its README runs it: generate.x with the forces,
               trainbin2ASCII.x, Adam lr 1e-3, batch 32, force weight alpha 0.1, 10 % validation;
               the epochs that fit the budget from a 6-epoch calibration run; its last model
  energy       distmlip train, energy mode, every other setting at its default
  force        distmlip train, force mode (forces of every structure), defaults otherwise
  energy_lbfgs, force_adamw, ...  the same with training.optimizer set to the suffix
Both distmlip runs stop through ``training.max_minutes`` and keep their best-on-validation model.

Data sets (EMT, generated here; 120 (``--n-train``) training / 60 test structures, none used to
tune distmlip):
``ptO`` Pt(111) 3x3x3 slab with two O adatoms on random sites (29 atoms, vacuum along z);
``nipd`` fcc Ni/Pd 2x2x2 cells with 12 Pd and one vacancy (31 atoms), strained and rattled;
``mol`` six small molecules in vacuum (CH3OH, H2O, C2H6, CH3CHO, NH3, CH4; non-periodic);
``cuco`` Cu(100) slab with CO (29 atoms); ``files`` your own data (anything ``distmlip convert``
reads, or its HDF5).  ``--repeats R`` runs every method R times, the order of the methods reversed
on every other repeat (the two programs alternate) and distmlip's training.seed set to the repeat
(train.x seeds its weights and its validation split from the clock), and prints every run and the
medians.

Needs the aenet programs (DISTMLIP_AENET_BIN, default ../shared/peers/aenet-2.0.4/bin).  No
assertions: the figures go to docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import aenet_peers as AP  # noqa: E402  (generate.x's inputs, as the aenet tests write them)
AENET = AP.aenet_bin_dir()
DESC = {"rc_radial": 5.0, "n_radial": 8, "rc_angular": 3.5, "n_angular": 4}
ENV1 = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
            PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


# ------------------------------------------------------------------------------------ data
def _labelled(a):
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    a.calc = EMT()
    e, f = a.get_potential_energy(), a.get_forces()
    a.calc = SinglePointCalculator(a, energy=e, forces=f)
    return a


def _pt_o(rng):
    from ase.build import add_adsorbate, fcc111

    s = fcc111("Pt", (3, 3, 3), vacuum=7.0)
    for site in rng.choice(["fcc", "hcp", "ontop"], size=2, replace=False):
        add_adsorbate(s, "O", 1.9 + rng.uniform(0, 0.3), site, offset=tuple(int(v) for v in rng.integers(0, 3, 2)))
    s.info.pop("adsorbate_info", None)
    s.positions[9:] += rng.normal(0, rng.uniform(0.03, 0.1), s.positions[9:].shape)
    return s


def _ni_pd(rng):
    from ase.build import bulk

    b = bulk("Ni", "fcc", a=3.60, cubic=True).repeat((2, 2, 2))
    sym = np.array(b.get_chemical_symbols())
    sym[rng.choice(32, 12, replace=False)] = "Pd"
    b.set_chemical_symbols(list(sym))
    del b[int(rng.integers(32))]
    b.set_cell(b.cell * (1 + rng.uniform(-0.02, 0.03)), scale_atoms=True)
    b.positions += rng.normal(0, rng.uniform(0.04, 0.12), b.positions.shape)
    return b


def _molecule(rng):
    from ase.build import molecule

    m = molecule(str(rng.choice(["CH3OH", "H2O", "C2H6", "CH3CHO", "NH3", "CH4"])))
    m.center(vacuum=6.0)
    m.pbc = False
    m.positions += rng.normal(0, rng.uniform(0.02, 0.08), m.positions.shape)
    return m


def _cu_co(rng):
    from ase import Atoms
    from ase.build import add_adsorbate, fcc100

    s = fcc100("Cu", size=(3, 3, 3), vacuum=6.0)
    add_adsorbate(s, Atoms("CO", positions=[(0, 0, 0), (0, 0, 1.15)]), 1.9, "ontop")
    s.info.pop("adsorbate_info", None)
    s.positions += rng.normal(0.0, 0.08, s.positions.shape)
    return s


SETS = {"ptO": _pt_o, "nipd": _ni_pd, "mol": _molecule, "cuco": _cu_co}


def dm(*args, log=None):
    with open(log or os.devnull, "w") as fh:
        subprocess.run([sys.executable, "-m", "distmlip", *map(str, args)], check=True, env=ENV1,
                       stdout=fh, stderr=subprocess.STDOUT)


def prepare(kind: str, out: Path, files=None, n_train: int = 120):
    from ase.io import write

    out.mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(("train", "test")):
        dst = out / f"{part}.h5"
        if dst.exists():
            continue
        if kind == "files":
            src = Path(files[k]).resolve()
            if src.suffix in (".h5", ".hdf5"):
                dst.symlink_to(src)
            else:
                dm("convert", src, "-o", dst)
            continue
        rng = np.random.default_rng(1 + k)
        raw = out / f"{part}.extxyz"
        write(raw, [_labelled(SETS[kind](rng)) for _ in range((n_train, 60)[k])], format="extxyz")
        dm("convert", raw, "-o", dst)


# ------------------------------------------------------------------------------------ aenet
def _stop_after(folder: Path, seconds: float, done: threading.Event):
    """aenet's own stop request: train.x ends after the epoch in which a file STOP appears."""
    if not done.wait(seconds):
        (folder / "STOP").touch()


def _featurize(out: Path, work: Path, desc, forces: bool = False) -> tuple[list, float]:
    """generate.x's training set of the training structures in ``work`` (with the forces for
    aenet-PyTorch): (species, seconds of generate.x with its inputs)."""
    from ase.data import chemical_symbols

    from distmlip.data.h5store import H5Dataset
    from distmlip.data.readers import write_xsf

    if work.exists():
        shutil.rmtree(work)
    (work / "xsf").mkdir(parents=True)
    ds = H5Dataset([out / "train.h5"])
    structs = [ds[i] for i in range(len(ds))]
    ds.close()
    symbols = [[chemical_symbols[int(z)] for z in s.numbers] for s in structs]
    species = sorted({el for sy in symbols for el in sy})
    files = []
    for k, s in enumerate(structs):
        files.append(work / "xsf" / f"s{k:05d}.xsf")
        write_xsf(str(files[-1]), s)
    # per-element reference energies by least squares: what an aenet user would set by hand from
    # isolated-atom energies; a constant composition leaves the fit its minimum-norm solution
    X = np.array([[sy.count(el) for el in species] for sy in symbols], float)
    y = np.array([s.energy for s in structs])
    ref = dict(zip(species, map(float, np.linalg.lstsq(X, y, rcond=None)[0])))
    t0 = time.perf_counter()
    AP.generate(work, files, species, ref, desc, output="set.train", forces=forces)
    return species, time.perf_counter() - t0


def run_aenet(out: Path, method: str, budget: float, hidden, desc, tag: str) -> dict:
    work = out / f"aenet_{method}_{tag}"
    species, t_gen = _featurize(out, work, desc)
    arch = " ".join(f"{h}:tanh" for h in hidden)
    (work / "train.in").write_text(
        "TRAININGSET set.train\nTESTPERCENT 10\nITERATIONS 1000000\n\nMETHOD\n" + method + "\n\nNETWORKS\n"
        + "".join(f"  {el} {el}.nn {len(hidden)} {arch}\n" for el in species))
    done = threading.Event()
    timer = threading.Thread(target=_stop_after, args=(work, budget, done), daemon=True)
    t0 = time.perf_counter()
    timer.start()
    with open(work / "train.out", "w") as fh:
        res = subprocess.run([str(AENET / "train.x"), "train.in"], cwd=work, stdout=fh, stderr=subprocess.STDOUT)
    done.set()
    t_train = time.perf_counter() - t0
    text = (work / "train.out").read_text()
    if res.returncode != 0 or "Fortran runtime error" in text:
        raise SystemExit(f"train.x failed in {work}:\n{text[-2000:]}")
    rows = [ln.split() for ln in text.splitlines() if re.match(r"\s*\d+(\s+\S+E[-+]\d+){4}\s*<", ln)]
    rows = [r for r in rows if int(r[0]) >= 1]          # networks are written from epoch 1 on
    best = min(rows, key=lambda r: float(r[4]))
    ep = int(best[0])
    nn = [work / f"{el}.nn-{ep:05d}" for el in species]
    keep = work / "best"
    keep.mkdir()
    for el, f in zip(species, nn):
        shutil.copyfile(f, keep / f"{el}.nn")
    for f in work.glob("*.nn-*"):                     # one file per element and epoch
        f.unlink()
    dm("import-aenet", *[keep / f"{el}.nn" for el in species], "-o", work / "model.pt")
    m = evaluate(work / "model.pt", out / "test.h5", work / "eval")
    curve = [1000.0 * float(r[4]) for r in rows]          # validation RMSE per epoch, meV/atom
    return dict(m, method=f"aenet_{method}", epochs=len(rows), best_epoch=ep, featurize_s=t_gen, train_s=t_train,
                val_curve=curve)


def _aenet_pytorch_once(work: Path, species, hidden, epochs: int, seed: int) -> list:
    """One aenet-PyTorch run of ``epochs`` epochs in ``work``; returns the seconds since its start
    at every epoch row it printed."""
    arch = " ".join(f"{h}:tanh" for h in hidden)
    (work / "train.in").write_text(
        f"TRAININGSET set.train.ascii\nTESTPERCENT 10\nITERATIONS {epochs}\nITERWRITE 1\nBATCHSIZE 32\n\n"
        f"NPSEED {seed + 1}\nPHSEED {seed + 2}\n\nFORCES\nalpha=0.1\n\nMEMORY_MODE cpu\n\nREGULARIZATION 0.0\n\n"
        "METHOD\nmethod=adam   lr=0.001\n\nNETWORKS\n"
        + "".join(f"  {el}  {el}.pytorch.nn  {len(hidden)}  {arch}\n" for el in species))
    stamps = []
    t0 = time.perf_counter()
    with open(work / "train.out", "w") as log:
        proc = subprocess.Popen([sys.executable, str(work.parent / "aenet_pytorch_src" / "src" / "aenet_pytorch.py"),
                                 "train.in"], cwd=work, env=ENV1, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            if re.match(r"\s*\d+\s*:", line):
                stamps.append(time.perf_counter() - t0)
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"aenet-PyTorch failed (exit {rc}); see {work / 'train.out'}")
    return stamps


def run_aenet_pytorch(out: Path, budget: float, hidden, desc, tag: str, seed: int = 0) -> dict:
    """aenet-PyTorch (the GPR-ANN paper's force-training code) as its README runs it: generate.x
    with the forces, trainbin2ASCII.x, then Adam (lr 1e-3, batch 32, alpha 0.1) on energies and
    forces.  It has no stop request and writes only its last model, so the epochs that fit the
    budget come from a 5-epoch calibration run."""
    src = out / "aenet_pytorch_src"
    if not (src / "src" / "aenet_pytorch.py").is_file():
        src.mkdir(exist_ok=True)
        tarball = AENET.parents[1] / "aenet-pytorch-c1cf315.tar.gz"
        if not tarball.is_file():
            raise SystemExit(f"aenet-PyTorch's source {tarball} not found")
        subprocess.run(["tar", "xzf", str(tarball)], cwd=src, check=True)
    work = out / f"aenet_pytorch_{tag}"
    species, t_gen = _featurize(out, work, desc, forces=True)
    with open(work / "t2a.log", "w") as fh:
        subprocess.run([str(AENET / "trainbin2ASCII.x"), "set.train", "set.train.ascii"], cwd=work, check=True,
                       stdout=fh, stderr=subprocess.STDOUT)
    os.symlink(work / "set.train.forces", work / "set.train.ascii.forces")
    cal = _aenet_pytorch_once(work, species, hidden, 6, seed)
    per_epoch = (cal[-1] - cal[0]) / max(len(cal) - 1, 1)
    epochs = max(6, int((budget - cal[0]) / per_epoch))
    t0 = time.perf_counter()
    _aenet_pytorch_once(work, species, hidden, epochs, seed)
    t_train = time.perf_counter() - t0
    dm("import-aenet", *[work / f"{el}.pytorch.nn.ascii" for el in species], "-o", work / "model.pt")
    m = evaluate(work / "model.pt", out / "test.h5", work / "eval")
    return dict(m, method="aenet_pytorch", epochs=epochs, best_epoch=None, featurize_s=t_gen, train_s=t_train,
                val_curve=[])


# ------------------------------------------------------------------------------------ distmlip
def run_distmlip(out: Path, method: str, budget: float, hidden, desc, tag: str, seed: int = 0) -> dict:
    import yaml

    mode, _, optimizer = method.partition("_")
    run = out / f"dm_{method}_{tag}"
    if run.exists():
        shutil.rmtree(run)
    cfg = {"data": {"train": [str(out / "train.h5")], "fractions": [0.9, 0.1, 0.0]}, "descriptor": desc,
           "model": {"hidden": list(hidden), "activation": "tanh"},
           "training": {"mode": mode, "epochs": 1000000, "max_minutes": budget / 60.0, "output": str(run), "seed": seed,
                        "progress_bar": "off"}}
    if optimizer:
        cfg["training"]["optimizer"] = optimizer
    y = out / f"dm_{method}_{tag}.yaml"
    y.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    dm("train", y, log=out / f"dm_{method}_{tag}.log")
    t_train = time.perf_counter() - t0
    import csv

    with open(run / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    curve = [float(r["val_E_rmse_meV_atom"]) if r["val_E_rmse_meV_atom"] else float("nan") for r in rows]
    m = evaluate(run / "model.pt", out / "test.h5", run / "eval")
    return dict(m, method=method, epochs=len(rows), best_epoch=None, featurize_s=0.0, train_s=t_train,
                val_curve=curve)


def time_to(res: dict, target: float) -> float:
    """Seconds until the run's validation energy RMSE first reached ``target`` (meV/atom), the
    epochs taken as evenly spaced over the training time (inf: never)."""
    c = np.asarray(res["val_curve"], float)
    hit = np.flatnonzero(c <= target)
    return float("inf") if len(hit) == 0 else res["train_s"] * (hit[0] + 1) / len(c)


def evaluate(model, test, dest) -> dict:
    dm("evaluate", model, test, "-o", dest)
    o = json.loads((Path(dest) / "metrics.json").read_text())["metrics"]["overall"]
    return {"E_mae": o["E_mae_meV_atom"], "F_mae": o["F_mae"], "angle": o["F_direction_deg"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("set", choices=sorted(SETS) + ["files"])
    ap.add_argument("--train")
    ap.add_argument("--test")
    ap.add_argument("--n-train", type=int, default=120, help="generated sets: training structures")
    ap.add_argument("--budget", type=float, default=60.0, help="training wall time per run (s)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--methods", default="aenet_bfgs,energy,force")
    ap.add_argument("--hidden", default="16,16")
    ap.add_argument("--descriptor", default=None, help="rc_radial,n_radial,rc_angular,n_angular")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if not (AENET / "train.x").is_file():
        print(f"aenet's train.x not found in {AENET} (set DISTMLIP_AENET_BIN): nothing to compare")
        return 0
    if a.set == "files" and not (a.train and a.test):
        ap.error("files needs --train and --test")
    hidden = [int(v) for v in a.hidden.split(",")]
    desc = dict(DESC)
    if a.descriptor:
        v = a.descriptor.split(",")
        desc = {"rc_radial": float(v[0]), "n_radial": int(v[1]), "rc_angular": float(v[2]), "n_angular": int(v[3])}
    out = (a.out or REPO / "runs" / f"aenet_train_{a.set}").resolve()
    prepare(a.set, out, (a.train, a.test), a.n_train)
    methods = a.methods.split(",")
    known = {"aenet_bfgs", "aenet_lm", "aenet_adam", "aenet_pytorch"}
    bad = [m for m in methods if not (m in known or m.partition("_")[0] in ("energy", "force"))]
    if bad:
        ap.error(f"unknown methods {bad}: aenet_bfgs, aenet_lm, aenet_adam, aenet_pytorch, energy[_OPT], force[_OPT]")
    results = []
    for r in range(a.repeats):
        for m in (methods if r % 2 == 0 else methods[::-1]):
            t = f"r{r}"
            if m == "aenet_pytorch":
                res = run_aenet_pytorch(out, a.budget, hidden, desc, t, seed=r)
            elif m.startswith("aenet_"):
                res = run_aenet(out, m.split("_", 1)[1], a.budget, hidden, desc, t)
            else:
                res = run_distmlip(out, m, a.budget, hidden, desc, t, seed=r)
            res["repeat"] = r
            results.append(res)
            print(f"  {res['method']:<11} repeat {r}: {res['epochs']:>7} epochs {res['train_s']:7.1f} s  "
                  f"E {res['E_mae']:8.3f} meV/atom  F {res['F_mae']:.4f} eV/A  {res['angle']:5.1f} deg", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n{a.set}: budget {a.budget:.0f} s per training, {a.repeats} repeat(s), networks {a.hidden} tanh, "
          f"descriptor {desc}, one core each; test set scored by distmlip evaluate (medians over repeats)")
    print(f"{'method':<12}{'epochs':>9}{'train s':>9}{'E MAE meV/at':>14}{'F MAE eV/A':>12}{'angle deg':>11}")
    med = {}
    for m in methods:
        rs = [x for x in results if x["method"] == m]
        if not rs:
            continue
        med[m] = {k: float(np.median([x[k] for x in rs])) for k in ("epochs", "train_s", "E_mae", "F_mae", "angle")}
        d = med[m]
        print(f"{m:<12}{d['epochs']:>9.0f}{d['train_s']:>9.1f}{d['E_mae']:>14.3f}{d['F_mae']:>12.4f}{d['angle']:>11.1f}")
    peers = [m for m in med if m.startswith("aenet_")]
    for p in peers:
        if p == "aenet_pytorch" and "force" in med:
            print(f"aenet_pytorch / distmlip force: test E {med[p]['E_mae'] / med['force']['E_mae']:.2f}x, "
                  f"F {med[p]['F_mae'] / med['force']['F_mae']:.2f}x (above 1: distmlip more accurate)")
    peers = [m for m in peers if m != "aenet_pytorch"]
    for p in peers:
        # time to accuracy: aenet's best validation energy RMSE (median over its runs), and when
        # each distmlip run's validation RMSE first reached it (each program's own 10 % split)
        target = float(np.median([min(x["val_curve"]) for x in results if x["method"] == p]))
        for m in med:
            if m.startswith("aenet_"):
                continue
            tt = np.median([time_to(x, target) for x in results if x["method"] == m])
            tp = np.median([time_to(x, target) for x in results if x["method"] == p])
            when = lambda t: f"at {t:.1f} s" if np.isfinite(t) else "not within the budget"  # noqa: E731
            print(f"{p} / distmlip {m}: test E {med[p]['E_mae'] / med[m]['E_mae']:.2f}x, "
                  f"F {med[p]['F_mae'] / med[m]['F_mae']:.2f}x (above 1: distmlip more accurate); "
                  f"{p}'s best validation E RMSE {target:.3f} meV/atom reached by {p} {when(tp)}, "
                  f"by distmlip {m} {when(tt)} (each on its own 10 % split: few structures, "
                  "so compare the test columns first)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
