"""distmlip against TorchANI 2.9 on one force-training step and one force-training epoch (issue
"Time to accuracy": "also against TorchANI 2.9 (PyPI) on one step and one epoch, for the record").

Data: the 250 EC dimers of the paper ($DISTMLIP_SHARED_DATA/ec_dimer/train, 20 atoms, H C O).
Both sides: float64, one thread, per-element networks 36-10-10-1 tanh, Adam lr 1e-3, loss
(1 - alpha) MSE(E per atom) + alpha MSE(F components) with alpha 0.1, batches of 32 structures.
Descriptors of equal size (36 per atom):
  distmlip  aenet's Chebyshev descriptor, Rc 6.5 / 4.0 A, orders 12 / 4 (with typespin: 2 x 18)
  TorchANI  its AEV, Rc 6.5 / 4.0 A, 6 radial shifts x 3 species + 3 angular shifts x 1 section
            x 6 species pairs (AEVComputer.from_constants, the 'pyaev' strategy: the CUDA
            extensions do not run on a CPU)
Each side does what its user does: distmlip's Trainer (force mode, the fused kernels, fixed
batches prepared once) and TorchANI's documented training loop (padded tensors prepared once,
forces by autograd with create_graph).

  step   median wall time of a training step on the same 32 dimers (forward, forces, loss,
         backward, optimizer update); distmlip: the Trainer's compute timer per step
  epoch  median wall time of an epoch over the 250 dimers (8 steps, reshuffled), epochs 2..N

The two sides run as separate processes, alternately, ``--repeat`` times each (TorchANI from
``--peer-python``, a venv with ``pip install torchani==2.9.0``; never the project's venv).
Prints the medians and the ratios distmlip / TorchANI.  Skips (exit 0) when the data or the
peer are missing.

    python benchmarks/torchani_compare.py [--peer-python /tmp/peers/bin/python] [--repeat 3]
                                          [--epochs 6] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DISTMLIP_SHARED_DATA", REPO.parent / "shared" / "data"))
ALPHA, LR, BATCH = 0.1, 1.0e-3, 32


# ------------------------------------------------------------------------------ TorchANI side
def torchani_worker(npz: str, epochs: int, steps: int) -> dict:
    import time

    import numpy as np
    import torch
    import torchani
    from torchani.aev import AEVComputer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    d = np.load(npz)
    Z = d["numbers"]                     # [S, 20], the same atom order in every dimer
    elems = [1, 6, 8]
    idx = torch.as_tensor(np.searchsorted(elems, Z), dtype=torch.long)
    coords = torch.as_tensor(d["positions"], dtype=torch.float64)
    E = torch.as_tensor(d["energy"], dtype=torch.float64)
    F = torch.as_tensor(d["forces"], dtype=torch.float64)
    n_at = Z.shape[1]
    aevc = AEVComputer.from_constants(
        radial_cutoff=6.5, angular_cutoff=4.0, radial_eta=16.0,
        radial_shifts=torch.linspace(0.9, 6.0, 6).tolist(), angular_eta=8.0, angular_zeta=32.0,
        angular_shifts=torch.linspace(0.9, 3.5, 3).tolist(), sections=[0.0], num_species=3).double()
    nets = torchani.nn.ANINetworks({s: torchani.nn.AtomicNetwork([36, 10, 10, 1], activation=torch.nn.Tanh(),
                                                                 bias=True) for s in ("H", "C", "O")}).double()
    # energies relative to the mean per atom, as distmlip's shift does
    shift = float((E / n_at).mean())
    opt = torch.optim.Adam(nets.parameters(), lr=LR)

    def step(b):
        x = coords[b].clone().requires_grad_(True)
        s = idx[b]
        aev = aevc(s, x)
        e = nets(s, aev) + shift * n_at
        f = -torch.autograd.grad(e.sum(), x, create_graph=True)[0]
        loss = (1 - ALPHA) * (((e - E[b]) / n_at) ** 2).mean() + ALPHA * ((f - F[b]) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    fixed = torch.arange(BATCH)
    for _ in range(3):
        step(fixed)
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(fixed)
        ts.append(time.perf_counter() - t0)
    g = torch.Generator().manual_seed(1)
    te = []
    for ep in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(E), generator=g)
        for k in range(0, len(E), BATCH):
            step(perm[k:k + BATCH])
        te.append(time.perf_counter() - t0)
    return {"step_s": float(np.median(ts)), "epoch_s": float(np.median(te[1:])), "epochs": epochs,
            "version": torchani.__version__, "torch": torch.__version__, "descriptor_dim": int(aev_dim(aevc))}


def aev_dim(aevc) -> int:
    import torch
    s = torch.zeros(1, 2, dtype=torch.long)
    x = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]], dtype=torch.float64)
    return aevc(s, x).shape[-1]


# ------------------------------------------------------------------------------ distmlip side
def distmlip_worker(h5: str, epochs: int, work: str) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO))
    torch.set_num_threads(1)
    from distmlip.training.config import load_train_config
    from distmlip.training.trainer import Trainer

    cfg_path = Path(work) / "dm.yaml"
    cfg_path.write_text(f"""data: {{train: [{h5}], fractions: [1.0, 0.0, 0.0]}}
descriptor: {{rc_radial: 6.5, n_radial: 12, rc_angular: 4.0, n_angular: 4}}
model: {{hidden: [10, 10], activation: tanh}}
training: {{mode: force, alpha: {ALPHA}, epochs: {epochs}, batch_structures: {BATCH}, batch_atoms: 100000,
           optimizer: adam, lr: {LR}, scheduler: none, output: {work}/run, progress_bar: "off",
           checkpoint_minutes: 0}}
""")
    tr = Trainer(load_train_config(cfg_path), quiet=True)
    per_epoch, snap = [], {}
    base = Trainer._end_epoch

    def _end_epoch(self, epoch, acc, t0):
        out = base(self, epoch, acc, t0)
        t = dict(self.timers)
        per_epoch.append({k: t[k] - snap.get(k, 0.0) for k in ("compute", "epoch", "steps")})
        snap.update(t)
        return out
    Trainer._end_epoch = _end_epoch
    try:
        tr.fit()
    finally:
        Trainer._end_epoch = base
    rows = per_epoch[1:]
    return {"step_s": float(np.median([r["compute"] / max(r["steps"], 1) for r in rows])),
            "epoch_s": float(np.median([r["epoch"] for r in rows])), "epochs": epochs,
            "descriptor_dim": int(tr.model.ann.dim) if hasattr(tr.model, "ann") else None}


# ------------------------------------------------------------------------------ driver
def prepare(work: Path) -> tuple[Path, Path]:
    """ec.h5 (distmlip convert of the dimers) and ec.npz (the same structures as arrays, read
    back from ec.h5, for the TorchANI side: both sides see identical data)."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from distmlip.data.h5store import H5Dataset

    src = SHARED / "ec_dimer" / "train"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "distmlip", "convert", str(src), "-o", str(work / "ec.h5")],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    ds = H5Dataset(work / "ec.h5")
    S = ds.read(np.arange(ds.n_structures))
    if len({tuple(s.numbers) for s in S}) != 1:
        raise SystemExit("the TorchANI side expects one atom order for all dimers")
    np.savez(work / "ec.npz", numbers=np.stack([s.numbers for s in S]), positions=np.stack([s.positions for s in S]),
             energy=np.array([s.energy for s in S]), forces=np.stack([s.forces for s in S]))
    return work / "ec.npz", work / "ec.h5"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-python", default=os.environ.get("DISTMLIP_PEER_PYTHON", "/tmp/peers/bin/python"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--json")
    ap.add_argument("--worker", choices=["torchani", "distmlip"], help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker == "torchani":
        print(json.dumps(torchani_worker(a.input, a.epochs, a.steps)))
        return 0
    if a.worker == "distmlip":
        print(json.dumps(distmlip_worker(a.input, a.epochs, a.work)))
        return 0
    if not (SHARED / "ec_dimer" / "train").is_dir():
        print(f"skipped: no EC dimer data in {SHARED}")
        return 0
    peer = Path(a.peer_python)
    ok = peer.is_file() and subprocess.run([str(peer), "-c", "import torchani"], capture_output=True,
                                           env=dict(os.environ, TORCHANI_NO_WARN_EXTENSIONS="1")).returncode == 0
    if not ok:
        print(f"skipped: {peer} cannot import torchani (make a venv: pip install torch==2.13.0 torchani==2.9.0)")
        return 0
    work = Path(tempfile.mkdtemp(prefix="dm-torchani-"))
    npz, h5 = prepare(work)
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHANI_NO_WARN_EXTENSIONS="1")
    res = {"torchani": [], "distmlip": []}
    for r in range(a.repeat):
        for side, py, inp in (("torchani", str(peer), npz), ("distmlip", sys.executable, h5)):
            wd = work / f"{side}_{r}"
            wd.mkdir()
            out = subprocess.run([py, str(Path(__file__).resolve()), "--worker", side, "--input", str(inp),
                                  "--work", str(wd), "--epochs", str(a.epochs), "--steps", str(a.steps)],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(out.stdout[-2000:], out.stderr[-3000:])
                return 1
            res[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"repeat {r + 1} {side:9s} step {1e3 * res[side][-1]['step_s']:8.2f} ms  "
                  f"epoch {1e3 * res[side][-1]['epoch_s']:8.1f} ms", flush=True)
    import numpy as np
    med = {s: {k: float(np.median([x[k] for x in v])) for k in ("step_s", "epoch_s")} for s, v in res.items()}
    t, d = med["torchani"], med["distmlip"]
    print(f"\nEC dimers, force training, batches of {BATCH}, float64, one thread; TorchANI "
          f"{res['torchani'][0]['version']} (descriptor {res['torchani'][0]['descriptor_dim']}), "
          f"torch {res['torchani'][0]['torch']}")
    print(f"{'':10s} {'TorchANI':>12s} {'distmlip':>12s} {'distmlip / TorchANI':>20s}")
    print(f"{'step ms':10s} {1e3 * t['step_s']:12.2f} {1e3 * d['step_s']:12.2f} {d['step_s'] / t['step_s']:20.3f}")
    print(f"{'epoch ms':10s} {1e3 * t['epoch_s']:12.1f} {1e3 * d['epoch_s']:12.1f} {d['epoch_s'] / t['epoch_s']:20.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": res, "median": med}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
