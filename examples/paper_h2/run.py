"""Reproduce the H2 Lennard-Jones comparison of the GPR-ANN paper (Yeu et al., npj Comput. Mater.
2025, Fig. 2) with the distmlip command-line stages, exactly as a user would run them:

    python examples/paper_h2/run.py [--data DIR] [--out DIR] [--np 2] [--epochs N] [--gpr-deltas ...] [--taylor-deltas ...]

Stages (parallel ones under ``mpirun -n NP``):
  1. data:     DIR/{train,test}/*.xsf (default ../shared/data/h2_lj when present), else generated
               with ASE LennardJones(epsilon=1, sigma=1) (identical to the shared files): 7 training
               bond lengths 1.0-2.0 A, 200 test bond lengths 0.95-2.05 A, written as extended XYZ;
  2. convert:  ``distmlip convert`` train and test into HDF5;
  3. augment:  ``distmlip augment`` Taylor and GPR, M = 2 copies per structure (7 + 14 = 21 energies,
               as in the paper) for every delta of the sweep;
  4. train:    ``distmlip train`` committees of K = 10 (seeds 0..9): energy-only, direct force
               training (alpha 0.3), Taylor-ANN and GPR-ANN (energy-only training on the augmented
               sets).  Descriptor Rc 8.0 A, radial order 10, no angular term (order 0, 0.5 A cutoff:
               a dimer has no triplets), networks 1-5-5-1 style (hidden [5, 5], tanh), AdamW;
  5. evaluate: ``distmlip evaluate`` each committee on the 200 test points (metrics.json), plus the
               bond-axis force and the committee curves for the table and the Fig. 2-like figure.

Outputs in --out: data, configs, runs, eval folders, ``results.json``, ``table.md``,
``fig2_h2.png``, ``timings.json``.  Finished stages are reused on a rerun (delete --out to redo).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

PAPER = {  # Fig. 2e-h / text: MAE and MSD, energy (meV) and force (eV/A)
    "energy-only": dict(E_mae=105, F_mae=3.10, E_msd=22, F_msd=0.52),
    "direct force": dict(E_mae=23, F_mae=1.22, E_msd=9, F_msd=0.30),
    "GPR-ANN": dict(E_mae=3, F_mae=0.21, E_msd=2, F_msd=0.08),
}

TRAIN_YAML = """\
data: {{train: [{train}], fractions: [1.0, 0.0, 0.0]}}
descriptor: {{rc_radial: 8.0, n_radial: 10, rc_angular: 0.5, n_angular: 0, backend: auto}}
model: {{hidden: [5, 5], activation: tanh, dtype: float64}}
training:
  mode: {mode}
  alpha: {alpha}
  energy_loss: {energy_loss}
  epochs: {epochs}
  batch_atoms: 1000
  optimizer: adamw
  lr: {lr}
  weight_decay: {wd}
  scheduler: {scheduler}
  seed: 0
  checkpoint_every: 0
  log_every: {log_every}
  progress_bar: 'off'
  output: {output}
committee: {{K: {K}}}
"""

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import AUG_YAML, mpi_cmd, prepare_run, sh  # noqa: E402  (examples/common.py)


def write_generated(raw: Path) -> None:
    from ase import Atoms
    from ase.calculators.lj import LennardJones
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    for part, rs in (("train", np.linspace(1.0, 2.0, 7)), ("test", np.linspace(0.95, 2.05, 200))):
        frames = []
        for r in rs:
            a = Atoms("H2", positions=[[-r / 2, 0, 0], [r / 2, 0, 0]], pbc=False)
            a.calc = LennardJones(epsilon=1.0, sigma=1.0)
            e, f = a.get_potential_energy(), a.get_forces()
            a.calc = SinglePointCalculator(a, energy=e, forces=f)
            frames.append(a)
        (raw / part).mkdir(parents=True, exist_ok=True)
        write(raw / part / f"h2_{part}.extxyz", frames, format="extxyz")


def bond_quantities(positions: np.ndarray, forces: np.ndarray):
    """bond length r and the force on atom 2 along the unit vector from atom 1 to atom 2 (= -dE/dr)"""
    d = positions[1] - positions[0]
    r = float(np.linalg.norm(d))
    return r, forces[..., 1, :] @ (d / r)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = ROOT.parent / "shared" / "data" / "h2_lj"
    ap.add_argument("--data", type=Path, default=default_data if default_data.is_dir() else None,
                    help="folder with train/*.xsf and test/*.xsf (default ../shared/data/h2_lj if present, "
                         "else generated with ASE LJ)")
    ap.add_argument("--generate", action="store_true", help="generate the data even when --data exists")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--np", type=int, default=2, help="MPI ranks for every parallel stage")
    ap.add_argument("--K", type=int, default=10, help="committee size")
    ap.add_argument("--epochs", type=int, default=500)
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--weight-decay", type=float, default=1e-3)
    ap.add_argument("--scheduler", default="cosine")
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--force-energy-loss", default="per_structure", choices=["per_structure", "per_atom"],
                    help="energy term of the direct force loss (paper Eq. 2: total energies, per_structure)")
    ap.add_argument("--copies", type=int, default=2, help="M synthetic copies per structure (paper: 14 = 7 x 2)")
    ap.add_argument("--gpr-deltas", type=float, nargs="*", default=[0.008, 0.02, 0.034, 0.055])
    ap.add_argument("--taylor-deltas", type=float, nargs="*", default=[0.008, 0.034])
    ap.add_argument("--methods", nargs="+", default=["energy", "force", "taylor", "gpr"])
    args = ap.parse_args(argv)
    out, logs, tfile, timings = prepare_run(args.out, ROOT)
    MPI = mpi_cmd(args.np)
    DM = [sys.executable, "-m", "distmlip"]
    T0 = time.time()

    def stage(name, cmd, done: Path):
        if done.exists():
            print(f"[{time.time() - T0:7.1f} s] {name}: reused {done.relative_to(out)}")
            return
        dt = sh(cmd, logs / f"{name}.log")
        timings[name] = round(dt, 1)
        tfile.write_text(json.dumps(timings, indent=1))
        print(f"[{time.time() - T0:7.1f} s] {name}: {dt:.1f} s")

    # 1-2. data and convert
    if args.data is not None and not args.generate:
        src = {p: [str(args.data / p)] for p in ("train", "test")}
        print(f"data: {args.data}")
    else:
        raw = out / "raw"
        if not (raw / "test").exists():
            write_generated(raw)
        src = {p: [str(raw / p)] for p in ("train", "test")}
        print(f"data: generated with ASE LennardJones(epsilon=1, sigma=1) in {raw}")
    for part in ("train", "test"):
        stage(f"convert_{part}", MPI + ["convert", *src[part], "-o", str(out / f"{part}.h5")], out / f"{part}.h5")

    # 3. augmentation
    runs = {}  # name -> (train files, mode)
    if "energy" in args.methods:
        runs["energy-only"] = (out / "train.h5", "energy", None)
    if "force" in args.methods:
        runs["direct force"] = (out / "train.h5", "force", None)
    for method, label, deltas in (("taylor", "Taylor-ANN", args.taylor_deltas), ("gpr", "GPR-ANN", args.gpr_deltas)):
        if method not in args.methods:
            continue
        for d in deltas:
            tag = f"{method}_d{d:g}"
            aug = out / f"train_{tag}.h5"
            cfg = out / f"augment_{tag}.yaml"
            cfg.write_text(AUG_YAML.format(input=out / "train.h5", output=aug, method=method,
                                           copies=args.copies, delta=d))
            stage(f"augment_{tag}", MPI + ["augment", str(cfg)], aug)
            runs[f"{label} d={d:g}"] = (aug, "energy", d)

    # 4. training (committees) and 5. evaluation
    for name, (train, mode, _) in runs.items():
        tag = name.replace(" ", "_").replace("=", "").replace("-", "")
        cfg = out / f"train_{tag}.yaml"
        cfg.write_text(TRAIN_YAML.format(train=train, mode=mode, alpha=args.alpha, epochs=args.epochs,
                                         energy_loss=args.force_energy_loss if mode == "force" else "per_atom",
                                         lr=args.lr, wd=args.weight_decay, scheduler=args.scheduler,
                                         log_every=max(args.epochs // 10, 1), output=out / f"run_{tag}",
                                         K=args.K))
        stage(f"train_{tag}", MPI + ["train", str(cfg)], out / f"run_{tag}" / "committee.pt")
        stage(f"evaluate_{tag}", DM + ["evaluate", str(out / f"run_{tag}" / "committee.pt"), str(out / "test.h5"),
                                      "-o", str(out / f"eval_{tag}"), "--device", "cpu"],
              out / f"eval_{tag}" / "metrics.json")
        runs[name] = runs[name] + (tag,)

    results = analyse(out, runs, args)
    results["timings_s"] = timings
    results["total_wall_s"] = round(time.time() - T0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"total wall {time.time() - T0:.1f} s; outputs in {out}")
    return 0


def analyse(out: Path, runs: dict, args) -> dict:
    from distmlip.data.h5store import H5Dataset
    from distmlip.evaluation.metrics import predict
    from distmlip.models.bpnn import load_models

    test = H5Dataset(str(out / "test.h5"))
    train = H5Dataset(str(out / "train.h5"))
    ts = test.read(np.arange(test.n_structures))
    r_test = np.array([bond_quantities(s.positions, s.forces)[0] for s in ts])
    order = np.argsort(r_test)
    r_test = r_test[order]
    f_ref = np.array([bond_quantities(s.positions, s.forces)[1] for s in ts])[order]
    e_ref = np.array([s.energy for s in ts])[order]
    res = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "methods": {}}
    curves = {}
    for name, (trainf, mode, delta, tag) in runs.items():
        models = load_models(str(out / f"run_{tag}" / "committee.pt"))
        pred = predict(models, ts)
        E = pred.energies[:, order]                               # [K, S]
        F = pred.forces.reshape(len(models), len(ts), 2, 3)       # [K, S, 2, 3]
        Fb = np.stack([[bond_quantities(s.positions, F[k, j])[1] for j, s in enumerate(ts)]
                       for k in range(len(models))])[:, order]    # [K, S] bond-axis force on atom 2
        m = json.loads((out / f"eval_{tag}" / "metrics.json").read_text())
        ov = m.get("metrics", m).get("overall", m)
        row = dict(
            E_mae=1e3 * float(np.abs(E.mean(0) - e_ref).mean()),
            E_msd=1e3 * float(E.std(0, ddof=1).mean()),
            F_mae=float(np.abs(Fb.mean(0) - f_ref).mean()),
            F_msd=float(Fb.std(0, ddof=1).mean()),
            evaluate_E_mae_meV_struct=ov.get("E_mae_meV_struct"),
            evaluate_E_msd_meV_struct=ov.get("E_msd_meV_struct"),
            evaluate_F_magnitude_mae=ov.get("F_magnitude_mae"),
            evaluate_F_magnitude_msd=ov.get("F_magnitude_msd"),
            delta=delta, K=len(models),
        )
        if delta is not None:  # accuracy of the synthetic labels against the exact LJ energy
            from ase.calculators.lj import LennardJones

            aug = H5Dataset(str(trainf))
            err = []
            for s in aug.read(np.arange(aug.n_structures)):
                if s.synthetic:
                    a = s.to_ase()
                    a.calc = LennardJones(epsilon=1.0, sigma=1.0)
                    err.append(s.energy - a.get_potential_energy())
            row["label_mae_meV"] = 1e3 * float(np.mean(np.abs(err)))
        res["methods"][name] = row
        curves[name] = (E, Fb, trainf, delta)
    # synthetic points of the augmented sets (for the figure)
    table = ["| method | E MAE (meV) | E MSD (meV) | F MAE (eV/A) | F MSD (eV/A) | synthetic label MAE (meV) | paper E MAE / MSD (meV) | paper F MAE / MSD (eV/A) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in res["methods"].items():
        base = name.split(" d=")[0]
        p = PAPER.get(base) if (base != "GPR-ANN" or row["delta"] == 0.055) else None  # paper: GPR-ANN at 0.055
        pe = f"{p['E_mae']} / {p['E_msd']}" if p else "-"
        pf = f"{p['F_mae']:.2f} / {p['F_msd']:.2f}" if p else "-"
        table.append(f"| {name} | {row['E_mae']:.1f} | {row['E_msd']:.1f} | {row['F_mae']:.3f} | {row['F_msd']:.3f} | {row['label_mae_meV']:.1f} | {pe} | {pf} |" if "label_mae_meV" in row else
                     f"| {name} | {row['E_mae']:.1f} | {row['E_msd']:.1f} | {row['F_mae']:.3f} | {row['F_msd']:.3f} | - | {pe} | {pf} |")
    text = "\n".join(table)
    print(text)
    (out / "table.md").write_text(text + "\n")
    plot(out, r_test, e_ref, f_ref, train, curves, res)
    return res


def plot(out, r_test, e_ref, f_ref, train, curves, res) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distmlip.data.h5store import H5Dataset

    trs = train.read(np.arange(train.n_structures))
    r_tr = np.array([bond_quantities(s.positions, s.forces)[0] for s in trs])
    e_tr = np.array([s.energy for s in trs])
    f_tr = np.array([bond_quantities(s.positions, s.forces)[1] for s in trs])

    def best(prefix):
        cands = [n for n in curves if n.startswith(prefix)]
        if not cands:
            return None
        return min(cands, key=lambda n: res["methods"][n]["E_mae"])

    panels = [n for n in ("energy-only", best("Taylor-ANN"), best("GPR-ANN"), "direct force") if n in curves]
    z = 2.576  # 99% normal interval of the committee
    fig, axes = plt.subplots(2, len(panels), figsize=(3.3 * len(panels), 5.6), dpi=90, sharex=True, squeeze=False)
    for c, name in enumerate(panels):
        E, Fb, trainf, delta = curves[name]
        for row, (Y, ref, ytr, lab) in enumerate(((E, e_ref, e_tr, "energy (eV)"), (Fb, f_ref, f_tr, "force (eV/A)"))):
            ax = axes[row, c]
            mu, sd = Y.mean(0), Y.std(0, ddof=1)
            ax.plot(r_test, ref, "k--", lw=1, label="LJ")
            ax.plot(r_test, mu, "C0-", lw=1.2, label="committee mean")
            ax.fill_between(r_test, mu - z * sd, mu + z * sd, color="C0", alpha=0.3, lw=0, label="99% CI")
            ax.plot(r_tr, ytr, "ko", ms=4, label="reference")
            if row == 0 and delta is not None:
                aug = H5Dataset(str(trainf))
                ss = [s for s in aug.read(np.arange(aug.n_structures)) if s.synthetic]
                rs = [bond_quantities(s.positions, np.zeros((2, 3)))[0] for s in ss]
                ax.plot(rs, [s.energy for s in ss], "r^" if "GPR" in name else "gs", ms=3.5, label="synthetic")
            if row == 0:
                ax.set_ylim(-1.2, 1.0)
                ax.set_title(name, fontsize=9)
            else:
                ax.set_ylim(-30, 30)
                ax.set_xlabel("H-H distance (A)")
            if c == 0:
                ax.set_ylabel(lab)
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "fig2_h2.png")
    plt.close(fig)

    # sweep panel like Fig. 2e-h
    fig, axes = plt.subplots(1, 4, figsize=(13, 3), dpi=90)
    keys = (("E_mae", "energy MAE (meV)"), ("E_msd", "energy MSD (meV)"), ("F_mae", "force MAE (eV/A)"),
            ("F_msd", "force MSD (eV/A)"))
    for ax, (k, lab) in zip(axes, keys):
        for prefix, sty in (("Taylor-ANN", "gs-"), ("GPR-ANN", "r^-")):
            pts = sorted((v["delta"], v[k]) for n, v in res["methods"].items() if n.startswith(prefix))
            if pts:
                ax.plot(*zip(*pts), sty, label=prefix)
        for base, sty in (("energy-only", "m--"), ("direct force", "b--")):
            if base in res["methods"]:
                ax.axhline(res["methods"][base][k], color=sty[0], ls="--", label=base)
        ax.set_yscale("log")
        ax.set_xlabel("delta (A)")
        ax.set_ylabel(lab)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fig2_h2_sweep.png")
    plt.close(fig)
    print(f"wrote {out / 'fig2_h2.png'}, {out / 'fig2_h2_sweep.png'}")


if __name__ == "__main__":
    sys.exit(main())
