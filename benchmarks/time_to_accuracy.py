"""Accuracy reached per wall time: distmlip force training against aenet-PyTorch (the GPR-ANN
paper's own force-training code) on the 250 EC dimers, side by side in one run.

Both programs train the same networks on the same data: 10-10 tanh per element, aenet's Chebyshev
descriptor 6.5/12 radial, 4.0/4 angular, Adam lr 1e-3, batch 32, force weight alpha 0.1 on every
structure, one thread each, one process.  aenet-PyTorch reads the descriptors and their
derivatives that aenet's ``generate.x`` writes (prepared once under --work, like its README
says); that preparation is not counted in its time.  distmlip starts from the HDF5 data set.

Runs, alternating the programs (``--reps`` rounds):

  aenet-PyTorch   ``--epochs`` epochs; the wall time of every epoch row it prints is recorded
  distmlip        ``mpirun -n 1 distmlip train`` for the same epochs
  distmlip, equal wall time: as many epochs as fit in aenet-PyTorch's wall time (from the first
                  distmlip run's start-up and epoch time)

Every final model is evaluated on the 750 held-out EC dimers (aenet-PyTorch's through
``distmlip import-aenet``, which reproduces aenet's predict.x to 5e-9 eV).  Printed:

  * wall time of each run (process start to exit: imports, data, training, writing the model);
  * final training and test RMSEs (energy meV/atom, force per component eV/A);
  * time to accuracy: the first point of distmlip's training curve (epoch end, counted from the
    process start) where both its energy and force training RMSE are at or below aenet-PyTorch's
    final ones, as a fraction of aenet-PyTorch's wall time (target <= 1/3);
  * the test RMSEs at equal wall time (target: distmlip's lower).

    python benchmarks/time_to_accuracy.py [--epochs 100] [--reps 1] [--work /tmp/distmlip-tta]
                                          [--shared ../shared] [--json out.json] [--lbfgs]

``--lbfgs`` adds distmlip with ``training.optimizer: lbfgs`` for the iterations that fit
aenet-PyTorch's wall time (from a 30-iteration calibration run).

Needs ../shared/data/ec_dimer and ../shared/peers (aenet-2.0.4 binaries, the aenet-PyTorch
tarball); skips (exit 0) with a message when they are absent.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
ELEMENTS = ("H", "C", "O")
STP = ("DESCR\n check\nEND DESCR\n\nATOM {el}\n\nENV 3\nH\nC\nO\n\nRMIN 0.5d0\n\nBASIS type=Chebyshev\n"
       "radial_Rc = 6.5  radial_N = 12 angular_Rc = 4.0  angular_N = 4\n")
APT_IN = ("TRAININGSET ec.train.ascii\nTESTPERCENT 0\nITERATIONS  {epochs}\nITERWRITE   1\nBATCHSIZE   32\n\n"
          "NPSEED 1\nPHSEED 2\n\nFORCES\nalpha=0.1\n\nMEMORY_MODE cpu\n\nREGULARIZATION 0.0\n\nMETHOD\n"
          "method=adam   lr=0.001\n\nNETWORKS\n" + "".join(f"  {el}  {el}.pytorch.nn  2  10:tanh  10:tanh\n"
                                                          for el in ELEMENTS))
DM_YAML = """data: {{train: [{train}], fractions: [1.0, 0.0, 0.0]}}
descriptor: {{rc_radial: 6.5, n_radial: 12, rc_angular: 4.0, n_angular: 4}}
model: {{hidden: [10, 10], activation: tanh}}
training: {{mode: force, alpha: 0.1, force_fraction: 1.0, epochs: {epochs}, batch_structures: 32,
           batch_atoms: 100000, optimizer: adam, lr: 1.0e-3, scheduler: none, output: {out},
           progress_bar: 'off', log_every: 1000}}
"""


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
             OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONPATH=str(REPO))
    e["PATH"] = str(Path(PY).parent) + os.pathsep + e.get("PATH", "")
    return e


def run(cmd, cwd, log) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        res = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env())
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed (exit {res.returncode}); see {log}")
    return time.perf_counter() - t0


def prepare_peer(work: Path, shared: Path) -> Path:
    """aenet-PyTorch's inputs: the descriptors and derivatives of generate.x, its ASCII form."""
    p = work / "peer"
    if (p / "ec.train.ascii").is_file() and (p / "ec.train.forces").is_file():
        return p
    p.mkdir(parents=True, exist_ok=True)
    bins = shared / "peers" / "aenet-2.0.4" / "bin"
    subprocess.run(["tar", "xzf", str(shared / "peers" / "aenet-pytorch-c1cf315.tar.gz")], cwd=p, check=True)
    for el in ELEMENTS:
        (p / f"{el}.stp").write_text(STP.format(el=el))
    files = sorted((shared / "data" / "ec_dimer" / "train").glob("*.xsf"))
    (p / "generate.in").write_text("OUTPUT ec.train\n\nTYPES\n3\nH 0.0\nC 0.0\nO 0.0\n\nSETUPS\n"
                                   + "".join(f"{el} {el}.stp\n" for el in ELEMENTS)
                                   + f"\nFORCES\nFORCESPERCENT 100\n\nFILES\n{len(files)}\n"
                                   + "".join(f"{f}\n" for f in files))
    run([str(bins / "generate.x"), "generate.in"], p, p / "generate.out")
    run([str(bins / "trainbin2ASCII.x"), "ec.train", "ec.train.ascii"], p, p / "t2a.log")
    return p


def aenet_pytorch(peer: Path, d: Path, epochs: int):
    """Run aenet-PyTorch in ``d``; returns (wall s, [(t, E_rmse meV/atom, F_rmse per component)])."""
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    for name in ("ec.train.ascii", "ec.train.forces"):
        os.symlink(peer / name, d / name)
    os.symlink(peer / "ec.train.forces", d / "ec.train.ascii.forces")
    (d / "train.in").write_text(APT_IN.format(epochs=epochs))
    curve = []
    row = re.compile(r"\s*(\d+)\s*:")
    t0 = time.perf_counter()
    with open(d / "train.out", "w") as log:
        proc = subprocess.Popen([PY, str(peer / "src" / "aenet_pytorch.py"), "train.in"], cwd=d, env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            if row.match(line):
                v = line.split()
                # columns: epoch : loss_trn loss_tst | E_trn E_tst | F_trn F_tst (eV/atom; |F| RMSE)
                curve.append((time.perf_counter() - t0, float(v[5]) * 1e3, float(v[8]) / math.sqrt(3)))
        rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"aenet-PyTorch failed (exit {rc}); see {d / 'train.out'}")
    return wall, curve


def distmlip_train(train_h5: Path, d: Path, epochs: int, optimizer: str = "adam"):
    """Run ``mpirun -n 1 distmlip train`` in ``d``; returns (wall s, [(t, E_rmse, F_rmse)]) with
    the epoch ends placed after the measured start-up (wall - sum of epoch times)."""
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    (d / "train.yaml").write_text(DM_YAML.format(train=train_h5, epochs=epochs, out="run")
                                  .replace("optimizer: adam", f"optimizer: {optimizer}"))
    mpirun = shutil.which("mpirun", path=env()["PATH"]) or "mpirun"
    wall = run([mpirun, "-n", "1", PY, "-m", "distmlip", "train", "train.yaml"], d, d / "train.log")
    rows = list(csv.DictReader(open(d / "run" / "log.csv")))
    times = [float(r["time_s"]) for r in rows]
    start = wall - sum(times)
    curve, t = [], start
    for r, dt in zip(rows, times):
        t += dt
        curve.append((t, float(r["train_E_rmse_meV_atom"]), float(r["train_F_rmse"])))
    return wall, curve


def test_rmse(model: Path, test_h5: Path, out: Path) -> tuple[float, float]:
    run([PY, "-m", "distmlip", "evaluate", str(model), str(test_h5), "-o", str(out), "--no-plots"], out.parent,
        out.parent / f"{out.name}.log")
    m = json.loads((out / "metrics.json").read_text())["metrics"]["overall"]
    return m["E_rmse_meV_atom"], m["F_rmse"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--work", default="/tmp/distmlip-tta")
    ap.add_argument("--shared", default=os.environ.get("DISTMLIP_SHARED", str(REPO.parent / "shared")))
    ap.add_argument("--json")
    ap.add_argument("--lbfgs", action="store_true",
                    help="also distmlip with training.optimizer: lbfgs (full batch) at aenet-PyTorch's wall time")
    args = ap.parse_args()
    shared, work = Path(args.shared).resolve(), Path(args.work)
    need = [shared / "data" / "ec_dimer" / "train", shared / "data" / "ec_dimer" / "test",
            shared / "peers" / "aenet-2.0.4" / "bin" / "generate.x", shared / "peers" / "aenet-pytorch-c1cf315.tar.gz"]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        print(f"time_to_accuracy: skipped, missing {', '.join(missing)}")
        return 0
    work.mkdir(parents=True, exist_ok=True)
    peer = prepare_peer(work, shared)
    data = {}
    for split in ("train", "test"):
        data[split] = work / f"ec_{split}.h5"
        if not data[split].is_file():
            run([PY, "-m", "distmlip", "convert", str(shared / "data" / "ec_dimer" / split), "-o", str(data[split])],
                work, work / f"convert_{split}.log")
    print(f"EC dimers: 250 training, 750 test structures; {args.epochs} epochs; load average "
          f"{os.getloadavg()[0]:.2f} at the start", flush=True)
    results = []
    for rep in range(args.reps):
        apt_wall, apt_curve = aenet_pytorch(peer, work / f"apt_{rep}", args.epochs)
        print(f"[{rep}] aenet-PyTorch  {apt_wall:7.1f} s", flush=True)
        dm_wall, dm_curve = distmlip_train(data["train"], work / f"dm_{rep}", args.epochs)
        print(f"[{rep}] distmlip       {dm_wall:7.1f} s", flush=True)
        startup = dm_curve[0][0] - (dm_curve[1][0] - dm_curve[0][0]) if len(dm_curve) > 1 else 0.0
        per_epoch = (dm_curve[-1][0] - dm_curve[0][0]) / max(len(dm_curve) - 1, 1)
        eq_epochs = max(args.epochs, int((apt_wall - startup) / per_epoch))
        eq_wall, eq_curve = distmlip_train(data["train"], work / f"dm_eq_{rep}", eq_epochs)
        print(f"[{rep}] distmlip equal wall time: {eq_epochs} epochs, {eq_wall:7.1f} s", flush=True)
        run([PY, "-m", "distmlip", "import-aenet", *[str(work / f"apt_{rep}" / f"{el}.pytorch.nn.ascii")
                                                     for el in ELEMENTS], "-o", str(work / f"apt_{rep}" / "model.pt")],
            work, work / f"import_{rep}.log")
        apt_test = test_rmse(work / f"apt_{rep}" / "model.pt", data["test"], work / f"eval_apt_{rep}")
        dm_test = test_rmse(work / f"dm_{rep}" / "run" / "model.pt", data["test"], work / f"eval_dm_{rep}")
        eq_test = test_rmse(work / f"dm_eq_{rep}" / "run" / "model.pt", data["test"], work / f"eval_dm_eq_{rep}")
        lb = None
        if args.lbfgs:
            # its iteration time from a short run, then the iterations that fit aenet-PyTorch's wall time
            _, cal = distmlip_train(data["train"], work / f"dm_lbfgs_cal_{rep}", 30, "lbfgs")
            it_s = (cal[-1][0] - cal[0][0]) / max(len(cal) - 1, 1)
            lb_epochs = max(30, int((apt_wall - cal[0][0]) / it_s))
            lb_wall, lb_curve = distmlip_train(data["train"], work / f"dm_lbfgs_{rep}", lb_epochs, "lbfgs")
            print(f"[{rep}] distmlip L-BFGS equal wall time: {lb_epochs} iterations, {lb_wall:7.1f} s", flush=True)
            lb = dict(epochs=lb_epochs, wall=lb_wall, train=lb_curve[-1][1:],
                      test=test_rmse(work / f"dm_lbfgs_{rep}" / "run" / "model.pt", data["test"], work / f"eval_lbfgs_{rep}"),
                      reach_s=next((t for t, e, f in lb_curve if e <= apt_curve[-1][1] and f <= apt_curve[-1][2]), None))
        e_apt, f_apt = apt_curve[-1][1], apt_curve[-1][2]
        # the equal-wall run follows the same trajectory as the first (same seed) for longer
        reach = next((t for t, e, f in eq_curve if e <= e_apt and f <= f_apt), None)
        results.append(dict(rep=rep, epochs=args.epochs, apt_wall=apt_wall, dm_wall=dm_wall, eq_epochs=eq_epochs,
                            eq_wall=eq_wall, apt_train=apt_curve[-1][1:], dm_train=dm_curve[-1][1:],
                            eq_train=eq_curve[-1][1:], apt_test=apt_test, dm_test=dm_test, eq_test=eq_test,
                            reach_s=reach, reach_ratio=None if reach is None else reach / apt_wall,
                            dm_startup_s=startup, dm_epoch_s=per_epoch,
                            apt_epoch_s=(apt_curve[-1][0] - apt_curve[0][0]) / max(len(apt_curve) - 1, 1),
                            lbfgs=lb))
    print()
    print(f"{'run':34s} {'wall s':>8s} {'train E':>8s} {'train F':>8s} {'test E':>8s} {'test F':>8s}")
    for r in results:
        for name, w, tr, te in ((f"aenet-PyTorch, {r['epochs']} epochs", r["apt_wall"], r["apt_train"], r["apt_test"]),
                                (f"distmlip, {r['epochs']} epochs", r["dm_wall"], r["dm_train"], r["dm_test"]),
                                (f"distmlip, {r['eq_epochs']} epochs (equal wall)", r["eq_wall"], r["eq_train"],
                                 r["eq_test"])) + ((
                                (f"distmlip L-BFGS, {r['lbfgs']['epochs']} it. (eq. wall)", r["lbfgs"]["wall"],
                                 r["lbfgs"]["train"], r["lbfgs"]["test"]),) if r["lbfgs"] else ()):
            print(f"{name:34s} {w:8.1f} {tr[0]:8.3f} {tr[1]:8.4f} {te[0]:8.3f} {te[1]:8.4f}")
        print("  (E: RMSE meV/atom, F: RMSE per component eV/A; test = the 750 held-out dimers)")
        print(f"  per epoch: aenet-PyTorch {r['apt_epoch_s'] * 1e3:.1f} ms, distmlip {r['dm_epoch_s'] * 1e3:.1f} ms "
              f"(ratio {r['dm_epoch_s'] / r['apt_epoch_s']:.3f}); distmlip start-up {r['dm_startup_s']:.2f} s")
        if r["reach_ratio"] is None:
            print("  time to accuracy: distmlip did not reach aenet-PyTorch's final training RMSEs")
        else:
            print(f"  time to accuracy: distmlip reaches aenet-PyTorch's final training RMSEs after {r['reach_s']:.1f} s "
                  f"= {r['reach_ratio']:.3f} of aenet-PyTorch's wall time (target <= 0.333: "
                  f"{'holds' if r['reach_ratio'] <= 1 / 3 else 'MISSED'})")
        if r["lbfgs"] and r["lbfgs"]["reach_s"] is not None:
            print(f"  time to accuracy, L-BFGS: {r['lbfgs']['reach_s']:.1f} s = "
                  f"{r['lbfgs']['reach_s'] / r['apt_wall']:.3f} of aenet-PyTorch's wall time")
        better = r["eq_test"][0] <= r["apt_test"][0] and r["eq_test"][1] <= r["apt_test"][1]
        print(f"  equal wall time, test RMSE: distmlip E {r['eq_test'][0]:.3f} / F {r['eq_test'][1]:.4f} vs aenet-PyTorch "
              f"E {r['apt_test'][0]:.3f} / F {r['apt_test'][1]:.4f} ({'lower: holds' if better else 'MISSED'})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
