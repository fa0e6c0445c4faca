"""The augment stage with more ranks than subsets: idle ranks lending their cores, or waiting.

A batch script launches every stage with the same ``mpirun -n R`` and one thread per rank.  A data
set with fewer subsets than R (the EC dimers are one subset) left R - 1 ranks waiting while one
rank fitted and labelled on its one core.  ``lend_cores: true`` (the default) gives the working
rank the cores and threads of the idle ranks of its node for as long as they wait.  This script
runs the whole stage (``distmlip augment --fresh``) under ``mpirun -n R --bind-to core`` with
OMP_NUM_THREADS=1, alternating ``lend_cores`` true and false, and prints the wall times, their
ratio and the largest label difference between the two (rounding: more threads add differently).

    python benchmarks/augment_ranks.py ec --structures 120 --repeat 2 --ranks 2

``ec``: the first N training EC dimers of the shared data (DISTMLIP_SHARED_DATA or
../shared/data; skips when absent); ``slab``: N EMT Cu(100) slabs with CO (generated).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpr_ann import SHARED, dm, make_slab  # noqa: E402


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["OMP_NUM_THREADS"] = "1"
    return env


def prepare(kind: str, out: Path, n: int) -> Path:
    raw = out / "raw"
    h5 = out / "train.h5"
    if h5.exists():
        return h5
    raw.mkdir(parents=True, exist_ok=True)
    if kind == "ec":
        src = SHARED / "ec_dimer" / "train"
        files = sorted(src.glob("*.xsf"))
        if not files:
            print(f"skip: no EC dimers under {src} (set DISTMLIP_SHARED_DATA)")
            sys.exit(0)
        for f in files[:n]:
            (raw / f.name).symlink_to(f)
    else:
        make_slab(raw, n, 1)
    dm("convert", raw, "-o", h5)
    return h5


def energies(path: Path) -> np.ndarray:
    from distmlip.data.h5store import H5Dataset

    ds = H5Dataset(str(path))
    return np.array([s.energy for s in ds.read(np.arange(ds.n_structures))])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["ec", "slab"])
    ap.add_argument("--structures", type=int, default=120)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default="/tmp/distmlip_augment_ranks")
    a = ap.parse_args()
    out = Path(a.out) / f"{a.which}_{a.structures}"
    out.mkdir(parents=True, exist_ok=True)
    h5 = prepare(a.which, out, a.structures)
    import yaml

    times = {True: [], False: []}
    for r in range(a.repeat):
        for lend in ((True, False) if r % 2 == 0 else (False, True)):
            name = f"lend_{str(lend).lower()}"
            cfg = out / f"{name}.yaml"
            cfg.write_text(yaml.safe_dump({"input": str(h5), "output": str(out / f"{name}.h5"), "lend_cores": lend}))
            cmd = ["mpirun", "-n", str(a.ranks), "--bind-to", "core", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS"] \
                + (["--allow-run-as-root"] if os.geteuid() == 0 else []) \
                + [sys.executable, "-m", "distmlip", "augment", str(cfg), "--fresh"]
            t0 = time.perf_counter()
            with open(out / f"{name}_{r}.log", "w") as fh:
                subprocess.run(cmd, check=True, env=_env(), stdout=fh, stderr=subprocess.STDOUT)
            dt = time.perf_counter() - t0
            times[lend].append(dt)
            print(f"round {r}: lend_cores {str(lend).lower():<5} {dt:7.1f} s", flush=True)
    e1, e0 = energies(out / "lend_true.h5"), energies(out / "lend_false.h5")
    t1, t0 = statistics.median(times[True]), statistics.median(times[False])
    print(f"{a.which}, {a.structures} structures, mpirun -n {a.ranks} --bind-to core, OMP_NUM_THREADS=1: "
          f"lend_cores true {t1:.1f} s, false {t0:.1f} s (medians of {a.repeat}): "
          f"lent / waiting = {t1 / t0:.2f}; largest label difference {np.abs(e1 - e0).max():.2e} eV "
          f"over {len(e1)} structures")


if __name__ == "__main__":
    main()
