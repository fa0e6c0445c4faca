"""H2 Lennard-Jones toy example of the paper, end to end in one command:

    python examples/h2_lj/run.py [--out DIR] [--shared DIR] [--epochs N]

1. generate the data: a dimer with ASE's LennardJones (epsilon = 1 eV, sigma = 1 A, rc = 3 sigma,
   the ASE defaults, which are also what ../shared/data/h2_lj holds), 7 training bond lengths
   1.0-2.0 A and 200 test bond lengths 0.95-2.05 A (``--shared DIR`` reads DIR/{train,test}/*.xsf
   instead);
2. write them as distmlip HDF5 data sets;
3. train energy-only (Chebyshev descriptor Rc 8.0 A, N_r 10; the angular part is empty for a
   dimer: N_a = 0 with a short angular cutoff, i.e. one constant zero feature);
4. evaluate on the 200 test points, print the MAE table and plot E(r) (``curve.png``).
"""
from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))


def dimer(r: float):
    from ase import Atoms
    from ase.calculators.lj import LennardJones

    a = Atoms("H2", positions=[[-r / 2, 0, 0], [r / 2, 0, 0]], pbc=False)
    a.calc = LennardJones(epsilon=1.0, sigma=1.0)  # rc = 3 sigma, energy shifted to 0 at rc
    return a


def generate(rs, tag):
    from distmlip.data.structure import Structure

    out = []
    for k, r in enumerate(rs):
        a = dimer(float(r))
        out.append(Structure(a.numbers.copy(), a.positions.copy(), np.zeros((3, 3)), np.zeros(3, bool),
                             energy=a.get_potential_energy(), forces=a.get_forces().copy(),
                             source=f"{tag}_lj", source_index=k))
    return out


def read_shared(d: Path, part: str):
    from distmlip.data.readers import read_xsf

    files = sorted(glob.glob(str(d / part / "*.xsf")))
    if not files:
        raise SystemExit(f"no XSF files in {d / part}")
    return [s for f in files for s in read_xsf(f)]


CONFIG = """\
data: {{train: [{train}], fractions: [1.0, 0.0, 0.0]}}
descriptor: {{rc_radial: 8.0, n_radial: 10, rc_angular: 1.5, n_angular: 0, backend: auto}}
model: {{hidden: [10, 10], activation: tanh, dtype: float64}}
training:
  mode: energy
  epochs: {epochs}
  batch_atoms: 64
  lr: 0.01
  scheduler: plateau
  plateau_patience: 200
  plateau_factor: 0.5
  min_lr: 1.0e-5
  seed: 0
  checkpoint_every: 0
  log_every: {log_every}
  progress_bar: 'off'
  output: {out}
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("h2_lj_output"))
    ap.add_argument("--shared", type=Path, default=None, help="read DIR/{train,test}/*.xsf instead of generating")
    ap.add_argument("--epochs", type=int, default=1500)
    args = ap.parse_args(argv)
    t0 = time.time()
    from distmlip.cli import main as cli
    from distmlip.data.h5store import write_dataset

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.shared:
        train, test = read_shared(args.shared, "train"), read_shared(args.shared, "test")
    else:
        train = generate(np.linspace(1.0, 2.0, 7), "train")
        test = generate(np.linspace(0.95, 2.05, 200), "test")
    write_dataset(out / "train.h5", train)
    write_dataset(out / "test.h5", test)
    print(f"data: {len(train)} training and {len(test)} test dimers -> {out}/train.h5, {out}/test.h5")
    cfg = out / "train.yaml"
    cfg.write_text(CONFIG.format(train=out / "train.h5", epochs=args.epochs, log_every=max(args.epochs // 10, 1),
                                 out=out / "run"))
    rc = cli(["train", str(cfg)])
    if rc:
        return rc
    rc = cli(["evaluate", str(out / "run" / "model.pt"), str(out / "test.h5"), "-o", str(out / "eval"),
              "--device", "cpu"])
    if rc:
        return rc
    plot_curve(out, train, test)
    print(f"total time {time.time() - t0:.1f} s")
    return 0


def plot_curve(out: Path, train, test) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distmlip.calculator import DistmlipCalculator

    calc = DistmlipCalculator(out / "run" / "model.pt")
    r_t = np.array([np.linalg.norm(s.positions[1] - s.positions[0]) for s in test])
    e_t = np.array([s.energy for s in test])
    e_p = []
    for s in test:
        a = s.to_ase()
        a.calc = calc
        e_p.append(a.get_potential_energy())
    r_tr = np.array([np.linalg.norm(s.positions[1] - s.positions[0]) for s in train])
    e_tr = np.array([s.energy for s in train])
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    ax.plot(r_t, e_t, "k-", lw=1, label="Lennard-Jones")
    ax.plot(r_t, e_p, "C0--", lw=1.2, label="ANN (energy only)")
    ax.plot(r_tr, e_tr, "C3o", ms=5, label="training points")
    ax.set_ylim(min(e_t.min(), min(e_p)) - 0.1, 0.5)
    ax.set_xlabel("H-H distance (A)")
    ax.set_ylabel("energy (eV)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curve.png")
    plt.close(fig)
    print(f"wrote {out / 'curve.png'}")


if __name__ == "__main__":
    sys.exit(main())
