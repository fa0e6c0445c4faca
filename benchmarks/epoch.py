"""Where an epoch's time goes: the share spent in the training step, side by side with the data
path the trainer had before (neighbour lists rebuilt for every batch), in one run.

For force and energy mode (energy: descriptors from the cache) on three data sets -- the 250 EC
dimers (read from $DISTMLIP_SHARED_DATA/ec_dimer/train, skipped when absent), the demo's EMT set
(bulk, alloys, slabs, adatoms, clusters: examples/demo/make_emt_data.py) and a dense periodic set
(32 rattled 108-atom fcc Cu/Au cells, EMT) -- a real Trainer runs N epochs (one rank, one
thread, batches of 32 structures, 10-10 tanh, the default settings otherwise) and reports, over
epochs 2..N (the first epoch fills the caches):

  step %     share of the epoch's wall time in the training step (loss, gradients, optimizer)
  collate %  batch assembly;   reduce %  the step's all-reduce;   val %  validation;
  other %    everything else (logging, checkpoints, the data stream)

and the same for ``data.neighbor_cache_mb: 0`` (every batch prepared anew, as before).
Targets (issue "Time to accuracy"): step share >= 80 % in force mode, >= 70 % in energy mode.

On a GPU machine, ``--devices cpu,cuda --once`` puts the same epochs on the CPU (one thread)
and the GPU side by side (benchmarks/gpu_check.sh runs that): what a user of ``training.device:
cuda`` gains per epoch, not per kernel.

Usage: python benchmarks/epoch.py [--epochs 21] [--sets ec,demo,dense] [--devices cpu] [--once]
                                  [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def _dense_set(path: Path, n: int = 32) -> None:
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from distmlip.data.h5store import write_dataset
    from distmlip.data.structure import Structure

    rng = np.random.default_rng(5)
    out = []
    for k in range(n):
        a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
        sym = a.get_chemical_symbols()
        for i in rng.choice(len(sym), size=len(sym) // 4, replace=False):
            sym[i] = "Au"
        a.set_chemical_symbols(sym)
        a.positions += rng.normal(0, 0.08, a.positions.shape)
        a.calc = EMT()
        out.append(Structure(a.numbers.copy(), a.positions.copy(), np.array(a.cell), a.pbc.copy(),
                             energy=a.get_potential_energy(), forces=a.get_forces().copy(), source="dense",
                             source_index=k))
    write_dataset(path, out)


def prepare(sets, work: Path) -> dict:
    from distmlip.data.convert import ConvertConfig, convert

    data = {}
    if "ec" in sets:
        ec = Path(os.environ.get("DISTMLIP_SHARED_DATA", REPO.parent / "shared" / "data")) / "ec_dimer" / "train"
        if ec.is_dir():
            convert(ConvertConfig(inputs=[str(ec)], output=str(work / "ec.h5")))
            data["ec"] = (work / "ec.h5", {"rc_radial": 6.5, "n_radial": 12, "rc_angular": 4.0, "n_angular": 4})
        else:
            print(f"# EC dimers not found at {ec}: skipped")
    if "demo" in sets:
        subprocess.run([sys.executable, str(REPO / "examples" / "demo" / "make_emt_data.py"), str(work / "raw"),
                        "--n-per-subset", "24", "--seed", "1"], check=True, capture_output=True)
        convert(ConvertConfig(inputs=[str(work / "raw")], output=str(work / "demo.h5")))
        data["demo"] = (work / "demo.h5", {"rc_radial": 5.0, "n_radial": 8, "rc_angular": 3.5, "n_angular": 3})
    if "dense" in sets:
        _dense_set(work / "dense.h5")
        data["dense"] = (work / "dense.h5", {"rc_radial": 6.5, "n_radial": 12, "rc_angular": 4.0, "n_angular": 4})
    return data


def run(h5, desc, mode, epochs, work, neighbor_cache_mb, device="cpu") -> dict:
    from distmlip.training.config import load_train_config
    from distmlip.training.trainer import Trainer

    out = work / f"run_{h5.stem}_{mode}_{neighbor_cache_mb}_{device}"
    y = work / "c.yaml"
    d = ", ".join(f"{k}: {v}" for k, v in desc.items())
    cache = "on" if mode == "energy" else "off"
    y.write_text(f"""
data: {{train: [{h5}], fractions: [0.9, 0.1, 0.0], neighbor_cache_mb: {neighbor_cache_mb}}}
descriptor: {{{d}, cache: {cache}, cache_file: {work / (h5.stem + '.desc.h5')}}}
model: {{hidden: [10, 10]}}
training: {{mode: {mode}, epochs: {epochs}, batch_structures: 32, batch_atoms: 1000000, output: {out},
           progress_bar: 'off', device: {device}}}
""")
    snap = {}

    class Timed(Trainer):
        def _end_epoch(self, epoch, acc, t0):
            super()._end_epoch(epoch, acc, t0)
            if epoch == 0:
                snap.update(self.timers, epoch=time.time() - t0)

    tr = Timed(load_train_config(y), quiet=True)
    tr.fit()
    t = {k: tr.timers[k] - snap.get(k, 0.0) for k in tr.timers}
    ep = t["epoch"]
    res = {k: 100.0 * t[k] / ep for k in ("compute", "collate", "reduce", "validation")}
    res["other"] = 100.0 - sum(res.values())
    res["epoch_ms"] = 1e3 * ep / (epochs - 1)
    res["step_ms"] = 1e3 * t["compute"] / max(t["steps"], 1)
    res["steps_per_epoch"] = t["steps"] / (epochs - 1)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 21: the end-of-run checkpoint and model files are charged to 20 epochs, not 5 (a real run
    # spreads them over hundreds)
    ap.add_argument("--epochs", type=int, default=21)
    ap.add_argument("--sets", default="ec,demo,dense")
    ap.add_argument("--devices", default="cpu", help="training.device values to alternate, e.g. cpu,cuda")
    ap.add_argument("--once", action="store_true",
                    help="only the prepared-once data path, once per device (the GPU check's short form)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    devices = args.devices.split(",")
    work = Path(tempfile.mkdtemp(prefix="distmlip-epoch-"))
    data = prepare(args.sets.split(","), work)
    rows = []
    print(f"# one rank, one thread, batches of 32 structures, epochs 2..{args.epochs}; load {os.getloadavg()[0]:.1f}")
    print("| set | mode | data path | device | step % | collate % | reduce % | val % | other % | epoch ms | step ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (h5, desc) in data.items():
        for mode in ("force", "energy"):
            # alternate: prepared once (now) and prepared every batch (before), twice each
            plan = (("prepared once", 2048),) if args.once else \
                (("prepared once", 2048), ("every batch", 0), ("prepared once", 2048), ("every batch", 0))
            for (label, mb), device in ((p, d) for p in plan for d in devices):
                if mode == "energy" and mb == 0:
                    continue          # energy mode reads cached descriptors either way
                r = run(h5, desc, mode, args.epochs, work, mb, device)
                rows.append({"set": name, "mode": mode, "path": label, "device": device, **r})
                print(f"| {name} | {mode} | {label} | {device} | {r['compute']:.1f} | {r['collate']:.1f} | {r['reduce']:.1f} | "
                      f"{r['validation']:.1f} | {r['other']:.1f} | {r['epoch_ms']:.1f} | {r['step_ms']:.2f} |",
                      flush=True)
    print("targets: step share >= 80 % (force), >= 70 % (energy, cached descriptors)")
    for name in data:
        for mode, target in (("force", 80.0), ("energy", 70.0)):
            got = [r["compute"] for r in rows if r["set"] == name and r["mode"] == mode
                   and r["path"] == "prepared once" and r["device"] == "cpu"]
            if got:
                best = max(got)
                print(f"  {name:6s} {mode:6s}: step share {best:.1f} % (best of {len(got)}) -> "
                      f"{'holds' if best >= target else 'MISSED'}")
    for name in data:
        for mode in ("force", "energy"):
            ms = {d: [r["epoch_ms"] for r in rows if r["set"] == name and r["mode"] == mode
                      and r["path"] == "prepared once" and r["device"] == d] for d in devices}
            if len(devices) > 1 and all(ms.values()):
                base = min(ms[devices[0]])
                print(f"  {name:6s} {mode:6s}: epoch ms " + ", ".join(f"{d} {min(v):.1f}" for d, v in ms.items())
                      + "; " + ", ".join(f"{devices[0]}/{d} {base / min(v):.2f}x" for d, v in ms.items() if d != devices[0]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
