"""What ZBL costs a training epoch: the same Trainer runs with ``zbl.enabled`` false and true in
alternation (energy mode with the descriptor cache, and force mode), and the median epoch time of
each is printed (one process, one thread; epochs after the first).

Data: an HDF5 data set given on the command line (e.g. the slab set written by
benchmarks/md_stability.py), 5.0/8 radial, 3.5/4 angular, 16-16 tanh, batch_atoms 300.

Usage: python benchmarks/zbl_cost.py DATA.h5 [--epochs 6] [--repeats 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import csv

    import torch

    from distmlip.training.config import load_train_config
    from distmlip.training.trainer import Trainer

    torch.set_num_threads(1)
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for mode in ("energy", "force"):
                for zbl in (False, True):
                    out = Path(tmp) / f"{mode}_{zbl}_{rep}"
                    y = Path(tmp) / "t.yaml"
                    y.write_text(f"""
data: {{train: [{Path(args.data).absolute()}], fractions: [0.9, 0.1, 0.0]}}
descriptor: {{rc_radial: 5.0, n_radial: 8, rc_angular: 3.5, n_angular: 4, cache: auto}}
model: {{hidden: [16, 16], activation: tanh}}
training: {{mode: {mode}, alpha: 0.3, epochs: {args.epochs}, batch_atoms: 300, output: {out}, progress_bar: 'off'}}
zbl: {{enabled: {str(zbl).lower()}}}
""")
                    Trainer(load_train_config(y), quiet=True).fit()
                    rows = list(csv.DictReader(open(out / "log.csv")))
                    times.setdefault((mode, zbl), []).extend(float(r["time_s"]) for r in rows[1:])
    print(f"{'mode':>7} {'ZBL':>4} {'median epoch s':>15} {'epochs':>7}")
    for (mode, zbl), t in times.items():
        print(f"{mode:>7} {('on' if zbl else 'off'):>4} {statistics.median(t):15.3f} {len(t):7d}")
    for mode in ("energy", "force"):
        r = statistics.median(times[(mode, True)]) / statistics.median(times[(mode, False)])
        print(f"{mode}: epoch with ZBL / without = {r:.2f}")


if __name__ == "__main__":
    main()
