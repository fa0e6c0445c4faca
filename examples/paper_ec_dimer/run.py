"""Reproduce the ethylene-carbonate (EC) dimer comparison of the GPR-ANN paper (Yeu et al., npj
Comput. Mater. 2025, Fig. 3) with the distmlip command-line stages, exactly as a user would run them:

    python examples/paper_ec_dimer/run.py [--data DIR] [--out DIR] [--np 2] [--quick | --full]

DIR holds the HSE06 data: DIR/train/*.xsf (250 structures) and DIR/test/*.xsf (750); the default is
../shared/data/ec_dimer.  The data are read in place, never copied.

Stages (parallel ones under ``mpirun -n NP``, every stage timed, finished stages reused on rerun):
  1. convert:  ``distmlip convert DIR/train -o train.h5`` and the same for test (two converts, so
               that augmentation only ever sees the training structures);
  2. augment:  ``distmlip augment`` once per (method, delta): Taylor (E - F.d) and GPR (energies and
               forces of the 250 structures, hyperparameters by the library's default selection),
               M copies per structure; each augmented set is shared by all committee members;
  3. train:    ``distmlip train`` committees of K = 10 (seeds 0..9, two rank groups of one rank):
               networks 36-10-10-1 tanh for C, H, O, Chebyshev orders 12/4, cutoffs 6.5/4.0 A, AdamW:
               energy-only (descriptor cache), direct force training with 10 % and 100 % of the
               forces (alpha 0.3, fused kernels), Taylor-ANN and GPR-ANN (energy-only on the
               augmented sets, descriptor cache);
  4. evaluate: ``distmlip evaluate committee.pt test.h5`` on the 750 test structures: energy MAE/MSD,
               force magnitude MAE/MSD, force direction MAE/MSD (the paper's metrics).

Presets (every value can be overridden by the options below):
  --quick (default): budget of about 20-30 minutes wall on 2 cores: fewer epochs (600 energy-only,
                     180 force, 60 augmented; ~2400/1440/5000 steps), lr 5e-3 with a cosine schedule,
                     M = 16, GPR deltas 0.003/0.008/0.021/0.044, Taylor 0.003/0.021;
  --full:            the paper's settings for a bigger machine: AdamW lr 1e-4, weight decay 1e-3,
                     batch 32 structures (energy-only, force) and 256 (augmented), M = 64, deltas
                     0.003 0.005 0.008 0.013 0.021 0.034 0.044 for Taylor and GPR, 5000 epochs (the
                     paper's epoch count for its Li/EC training; not stated for the dimers).

Outputs in --out: train.h5, test.h5, train_<method>_d<delta>.h5 (+ GPR reports), run_*/ (committee
folders), eval_*/ (metrics.json, structures.csv, parity plots), results.json, table.md,
fig3_ec_dimer.png, timings.json, logs/.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

PRESETS = {
    "quick": dict(K=10, copies=16, gpr_deltas=[0.003, 0.008, 0.021, 0.044], taylor_deltas=[0.003, 0.021],
                  lr=5e-3, weight_decay=1e-3,
                  # three times the epochs of the first preset (200 / 60 / 20), since trainings got
                  # about ten times faster; 20 augmented epochs left GPR-ANN short of converged
                  epochs_energy=600, epochs_force=180, epochs_aug=60,
                  batch_energy=64, batch_force=32, batch_aug=64),
    "full": dict(K=10, copies=64, gpr_deltas=[0.003, 0.005, 0.008, 0.013, 0.021, 0.034, 0.044],
                 taylor_deltas=[0.003, 0.005, 0.008, 0.013, 0.021, 0.034, 0.044],
                 lr=1e-4, weight_decay=1e-3,
                 epochs_energy=5000, epochs_force=5000, epochs_aug=5000,
                 batch_energy=32, batch_force=32, batch_aug=256),
}

TRAIN_YAML = """\
data: {{train: [{train}], fractions: [1.0, 0.0, 0.0]}}
descriptor: {{rc_radial: 6.5, n_radial: 12, rc_angular: 4.0, n_angular: 4, backend: auto}}
model: {{hidden: [10, 10], activation: tanh, dtype: float64}}
training:
  mode: {mode}
  alpha: {alpha}
  force_fraction: {force_fraction}
  energy_loss: {energy_loss}
  epochs: {epochs}
  batch_atoms: 100000000
  batch_structures: {batch}
  optimizer: adamw
  lr: {lr}
  weight_decay: {wd}
  scheduler: {scheduler}
  seed: 0
  checkpoint_every: {ckpt}
  log_every: {log_every}
  progress_bar: 'off'
  output: {output}
committee: {{K: {K}}}
"""

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import AUG_YAML, mpi_cmd, prepare_run, sh  # noqa: E402  (examples/common.py)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ec_dimer",
                    help="folder with train/*.xsf and test/*.xsf (default ../shared/data/ec_dimer)")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--np", type=int, default=2, help="MPI ranks of every parallel stage")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="preset", action="store_const", const="quick", default="quick")
    g.add_argument("--full", dest="preset", action="store_const", const="full")
    ap.add_argument("--K", type=int)
    ap.add_argument("--copies", type=int, help="M synthetic copies per training structure")
    ap.add_argument("--gpr-deltas", type=float, nargs="*")
    ap.add_argument("--taylor-deltas", type=float, nargs="*")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--weight-decay", type=float)
    ap.add_argument("--epochs-energy", type=int)
    ap.add_argument("--epochs-force", type=int)
    ap.add_argument("--epochs-aug", type=int)
    ap.add_argument("--batch-energy", type=int, help="structures per step, energy-only")
    ap.add_argument("--batch-force", type=int, help="structures per step, force training")
    ap.add_argument("--batch-aug", type=int, help="structures per step, Taylor-/GPR-ANN")
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--scheduler", default="cosine")
    ap.add_argument("--no-reuse-hyper", dest="reuse_hyper", action="store_false",
                    help="fit the GPR hyperparameters again for every delta (default: fit once, for the first)")
    ap.add_argument("--methods", nargs="+", default=["energy", "force10", "force100", "taylor", "gpr"])
    args = ap.parse_args(argv)
    P = dict(PRESETS[args.preset])
    for k in P:
        v = getattr(args, k, None)
        if v is not None:
            P[k] = v
    data = args.data.resolve()
    for part in ("train", "test"):
        if not (data / part).is_dir():
            raise SystemExit(f"{data / part}: not a folder (give --data DIR with train/ and test/ of XSF files)")
    out, logs, tfile, timings = prepare_run(args.out, ROOT)
    MPI = mpi_cmd(args.np)
    DM = [sys.executable, "-m", "distmlip"]
    T0 = time.time()
    print(f"preset {args.preset}: {json.dumps(P)}")

    def stage(name, cmd, done: Path):
        if done.exists():
            print(f"[{time.time() - T0:7.1f} s] {name}: reused {done.name}", flush=True)
            return
        dt = sh(cmd, logs / f"{name}.log")
        timings[name] = round(dt, 1)
        tfile.write_text(json.dumps(timings, indent=1))
        print(f"[{time.time() - T0:7.1f} s] {name}: {dt:.1f} s", flush=True)

    # 1. convert
    for part in ("train", "test"):
        stage(f"convert_{part}", MPI + ["convert", str(data / part), "-o", str(out / f"{part}.h5")],
              out / f"{part}.h5")

    # 2. augment, 3. train, 4. evaluate: one method at a time (augment -> train -> evaluate), cheapest and
    # most informative first, so that an interrupted quick run still has the key comparison; the table,
    # results.json and the figure are rewritten after every evaluation
    runs = []  # (label, method, delta, mode, force_fraction, epochs, batch)
    if "energy" in args.methods:
        runs.append(("energy-only", "energy", None, "energy", 1.0, P["epochs_energy"], P["batch_energy"]))
    if "force100" in args.methods:
        runs.append(("direct force 100%", "force100", None, "force", 1.0, P["epochs_force"], P["batch_force"]))
    gd = list(P["gpr_deltas"]) if "gpr" in args.methods else []
    td = list(P["taylor_deltas"]) if "taylor" in args.methods else []
    # GPR delta closest to 0.021 (the paper's optimum) first, then Taylor, then the other deltas
    gd.sort(key=lambda d: abs(d - 0.021))
    if gd:
        runs.append((f"GPR-ANN d={gd[0]:g}", "gpr", gd[0], "energy", 1.0, P["epochs_aug"], P["batch_aug"]))
    if "force10" in args.methods:
        runs.append(("direct force 10%", "force10", None, "force", 0.1, P["epochs_force"], P["batch_force"]))
    for d in td:
        runs.append((f"Taylor-ANN d={d:g}", "taylor", d, "energy", 1.0, P["epochs_aug"], P["batch_aug"]))
    for d in gd[1:]:
        runs.append((f"GPR-ANN d={d:g}", "gpr", d, "energy", 1.0, P["epochs_aug"], P["batch_aug"]))

    results = {"preset": args.preset, "settings": P, "data": str(data), "np": args.np, "methods": {}}
    first_gpr_report = None
    for label, method, delta, mode, ff, epochs, batch in runs:
        tag = f"{method}" + (f"_M{P['copies']}_d{delta:g}" if delta is not None else "")
        train = out / "train.h5"
        if delta is not None:
            train = out / f"train_{tag}.h5"
            acfg = out / f"augment_{tag}.yaml"
            acfg.write_text(AUG_YAML.format(input=out / "train.h5", output=train, method=method, copies=P["copies"],
                                            delta=delta))
            extra = []
            if method == "gpr" and args.reuse_hyper and first_gpr_report is not None:
                # one GPR model for every delta, as in the paper: the hyperparameters fitted (maximum
                # LML, the library default) for the first delta are given to the later ones, which then
                # skip the fit (same standardisation: it depends on the training data only)
                g = json.loads(first_gpr_report.read_text())["subsets"][0]["gpr"]
                for k in ("weight", "length_scale", "noise_energy", "noise_force"):
                    extra += ["--set", f"gpr.{k}={g[k]!r}"]
            stage(f"augment_{tag}", MPI + ["augment", str(acfg), *extra], train)
            if method == "gpr" and first_gpr_report is None:
                first_gpr_report = train.with_suffix(".report.json")
        run_dir = out / f"run_{tag}"
        cfg = out / f"train_{tag}.yaml"
        cfg.write_text(TRAIN_YAML.format(train=train, mode=mode, alpha=args.alpha, force_fraction=ff, epochs=epochs,
                                         energy_loss="per_structure" if mode == "force" else "per_atom",
                                         batch=batch, lr=P["lr"], wd=P["weight_decay"], scheduler=args.scheduler,
                                         ckpt=max(epochs // 5, 1), log_every=max(epochs // 10, 1),
                                         output=run_dir, K=P["K"]))
        stage(f"train_{tag}", MPI + ["train", str(cfg)], run_dir / "committee.pt")
        ev = out / f"eval_{tag}"
        stage(f"evaluate_{tag}", DM + ["evaluate", str(run_dir / "committee.pt"), str(out / "test.h5"), "-o", str(ev),
                                      "--device", "cpu"], ev / "metrics.json")
        m = json.loads((ev / "metrics.json").read_text())
        ov = m.get("metrics", m).get("overall", m)
        row = {k: ov.get(k) for k in ("E_mae_meV_atom", "E_msd_meV_atom", "E_mae_meV_struct", "E_msd_meV_struct",
                                      "F_magnitude_mae", "F_magnitude_msd", "F_direction_deg", "F_direction_msd_deg",
                                      "F_mae", "F_rmse")}
        row.update(delta=delta, method=method, epochs=epochs, batch_structures=batch,
                   train_s=timings.get(f"train_{tag}"), augment_s=timings.get(f"augment_{tag}"),
                   evaluate_s=timings.get(f"evaluate_{tag}"))
        results["methods"][label] = row
        report(out, results, timings, T0)
    print(f"total wall {time.time() - T0:.1f} s (this invocation); stage times in {tfile}")
    return 0


def report(out: Path, results: dict, timings: dict, T0: float) -> None:
    table = ["| method | E MAE (meV/atom) | E MSD (meV/atom) | \\|F\\| MAE (eV/A) | \\|F\\| MSD (eV/A) | "
             "angle MAE (deg) | angle MSD (deg) | augment (s) | train (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    for label, r in results["methods"].items():
        table.append(f"| {label} | {f(r['E_mae_meV_atom'], '.2f')} | {f(r['E_msd_meV_atom'], '.2f')} | "
                     f"{f(r['F_magnitude_mae'], '.3f')} | {f(r['F_magnitude_msd'], '.3f')} | "
                     f"{f(r['F_direction_deg'], '.1f')} | {f(r['F_direction_msd_deg'], '.1f')} | "
                     f"{f(r['augment_s'], '.0f')} | {f(r['train_s'], '.0f')} |")
    text = "\n".join(table)
    print(text, flush=True)
    (out / "table.md").write_text(text + "\n")
    results["timings_s"] = timings
    results["wall_s_this_invocation"] = round(time.time() - T0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(out, results)


def plot(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    M = results["methods"]
    panels = (("E_mae_meV_atom", "E_msd_meV_atom", "energy (meV/atom)"),
              ("F_magnitude_mae", "F_magnitude_msd", "|F| (eV/A)"),
              ("F_direction_deg", "F_direction_msd_deg", "force direction (deg)"))
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.5), dpi=90, sharex=True)
    for c, (kmae, kmsd, lab) in enumerate(panels):
        for r, (k, what) in enumerate(((kmae, "MAE"), (kmsd, "MSD"))):
            ax = axes[r, c]
            for method, sty, name in (("taylor", "s-", "Taylor-ANN"), ("gpr", "^-", "GPR-ANN")):
                pts = sorted((v["delta"], v[k]) for v in M.values() if v["method"] == method and v[k] is not None)
                if pts:
                    ax.plot(*zip(*pts), sty, color="C1" if method == "gpr" else "g", label=name)
            for label, color in (("energy-only", "purple"), ("direct force 10%", "lightskyblue"),
                                 ("direct force 100%", "darkblue")):
                if label in M and M[label][k] is not None:
                    ax.axhline(M[label][k], color=color, ls="--", label=label)
            ax.set_yscale("log")
            ax.set_ylabel(f"{what} {lab}", fontsize=8)
            if r == 1:
                ax.set_xlabel("delta (A)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"EC dimer, committees of {results['settings']['K']}, 750 test structures "
                 f"(preset {results['preset']}, M = {results['settings']['copies']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "fig3_ec_dimer.png")
    plt.close(fig)
    print(f"wrote {out / 'fig3_ec_dimer.png'}")


if __name__ == "__main__":
    sys.exit(main())
