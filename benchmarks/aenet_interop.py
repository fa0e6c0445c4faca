"""distmlip against aenet 2.0.4 on the whole EC-dimer set (the figures of docs/aenet.md).

  1. generate.x descriptors of the 250 training structures vs distmlip's (reference, fused);
  2. a distmlip model (``--model``, default: trained here with `distmlip train`, energy mode,
     30 epochs) exported with `distmlip export --format aenet` and run by predict.x on the 750
     test structures: energies and forces vs distmlip's;
  3. a train.x potential (10-10 tanh, BFGS) imported with `distmlip import-aenet`: distmlip's
     energies and forces vs predict.x's on the 750 test structures;
  4. the exported model restarted by train.x on generate.x's training set of the same 250
     structures: train.x's epoch-0 RMSE vs distmlip's.

    python benchmarks/aenet_interop.py [--model run/model.pt] [--work DIR]

Needs the aenet programs (DISTMLIP_AENET_BIN, default ../shared/peers/aenet-2.0.4/bin) and the
shared data (DISTMLIP_SHARED_DATA).  Uses the helpers of tests/aenet_peers.py.
"""
from __future__ import annotations

import argparse
import glob
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import aenet_peers as AP  # noqa: E402
from helpers import shared_data_dir  # noqa: E402

DESC = {"rc_radial": 6.5, "n_radial": 12, "rc_angular": 4.0, "n_angular": 4}
SPECIES = ["H", "C", "O"]


def cli(*args, cwd=None):
    subprocess.run([sys.executable, "-m", "distmlip", *map(str, args)], check=True, cwd=cwd,
                   env={**__import__("os").environ, "PYTHONPATH": str(REPO)})


def energies_forces(model, structs, chunk=50):
    from distmlip.descriptors.batch import collate

    E, F = [], []
    for a in range(0, len(structs), chunk):
        part = structs[a:a + chunk]
        b = collate(part, species=model.species, cutoff=model.cutoff, dtype=torch.float64)
        b.positions.requires_grad_(True)
        e, f = model.energy_and_forces(b)
        f = f.detach().numpy()
        off = np.concatenate([[0], np.cumsum(b.natoms.numpy())])
        E += list(e.detach().numpy())
        F += [f[off[k]:off[k + 1]] for k in range(len(part))]
    return np.array(E), F


def compare(model, nn_files, test_files, work):
    from distmlip.data.readers import read_xsf

    t0 = time.time()
    Ea, Fa = AP.predict(work, nn_files, test_files)
    t_pred = time.time() - t0
    E, F = energies_forces(model, [s for f in test_files for s in read_xsf(f)])
    return float(np.abs(Ea - E).max()), float(max(np.abs(a - b).max() for a, b in zip(Fa, F))), t_pred


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="distmlip model trained on the EC-dimer training set (default: train one)")
    p.add_argument("--work", help="work folder (default: a temporary one, removed)")
    args = p.parse_args()
    from distmlip._ext import has_kernel
    from distmlip.data.readers import read_xsf
    from distmlip.descriptors.batch import collate
    from distmlip.descriptors.chebyshev import ChebyshevDescriptor
    from distmlip.models.bpnn import BPNN

    data = shared_data_dir() / "ec_dimer"
    train_files = sorted(glob.glob(str(data / "train" / "*.xsf")))
    test_files = sorted(glob.glob(str(data / "test" / "*.xsf")))
    work = Path(args.work or tempfile.mkdtemp(prefix="aenet_interop_"))
    work.mkdir(parents=True, exist_ok=True)
    ref = {"H": -13.6, "C": -1029.5, "O": -2041.0}
    rows = []

    # 1. descriptors
    ts = AP.generate(work / "gen", train_files, SPECIES, ref, DESC, output="ec.train")
    G_aenet = np.concatenate(AP.raw_features(work / "gen", ts))
    structs = [s for f in train_files for s in read_xsf(f)]
    d = ChebyshevDescriptor(SPECIES, **DESC)
    b = collate(structs, species=SPECIES, cutoff=d.cutoff, dtype=torch.float64)
    for kern in ["reference"] + (["fused"] if has_kernel("chebyshev_forward", "cpu") else []):
        G = d(b.positions, b.species, b.pair_i, b.pair_j, b.pair_shift, pair_ptr=getattr(b, "pair_ptr", None),
              kernels=kern).detach().numpy()
        rows.append((f"generate.x vs descriptor ({kern}), {len(train_files)} structures",
                     f"max |dG| {np.abs(G - G_aenet).max():.1e}, relative {(np.abs(G - G_aenet) / np.maximum(np.abs(G_aenet), 1)).max():.1e}"))

    # 2. export -> predict.x
    model_path = args.model
    if model_path is None:
        cli("convert", data / "train", "-o", work / "ec.h5")
        (work / "t.yaml").write_text(f"""data: {{train: [{work / 'ec.h5'}], fractions: [1.0, 0.0, 0.0]}}
descriptor: {{rc_radial: 6.5, n_radial: 12, rc_angular: 4.0, n_angular: 4}}
model: {{hidden: [10, 10], activation: tanh, reference_energies: {{H: -13.6, C: -1029.5, O: -2041.0}}}}
training: {{mode: energy, epochs: 30, lr: 3.0e-3, output: {work / 'run'}, progress_bar: "off"}}
""")
        cli("train", work / "t.yaml")
        model_path = work / "run" / "model.pt"
    model = BPNN.load(model_path)
    cli("export", "--format", "aenet", model_path, "-o", work / "nn")
    nn = {p.name.split(".")[0]: p for p in (work / "nn").glob("*.nn")}
    dE, dF, t = compare(model, nn, test_files, work / "pred1")
    rows.append((f"export -> predict.x, {len(test_files)} test structures",
                 f"max |dE| {dE:.1e} eV, max |dF| {dF:.1e} eV/A (predict.x {t:.1f} s)"))

    # 4. train.x restart from the export (training set: the same 250 structures, same atomic energies)
    rs = work / "restart"
    rs.mkdir(exist_ok=True)
    shutil.copyfile(ts, rs / "ec.train")
    for p in nn.values():
        shutil.copyfile(p, rs / p.name)
    arch = "  ".join(f"{h}:{a}" for h, a in zip(model.ann.hidden, model.ann.activations))
    (rs / "train.in").write_text("TRAININGSET ec.train\nTESTPERCENT 0\nITERATIONS 1\n\nMETHOD\nbfgs\n\nNETWORKS\n"
                                 + "".join(f"  {el} {nn[el].name} {len(model.ann.hidden)} {arch}\n" for el in SPECIES))
    out = AP.run("train.x", "train.in", rs)
    first = [ln.split() for ln in out.splitlines() if ln.strip().startswith("0 ")][0]
    E, _ = energies_forces(model, structs)
    n = np.array([len(s.numbers) for s in structs])
    rmse = float(np.sqrt(np.mean(((E - np.array([s.energy for s in structs])) / n) ** 2)))
    rows.append(("train.x restarted from the export: epoch-0 training RMSE",
                 f"train.x {float(first[2]) * 1000:.4f} meV/atom, distmlip {rmse * 1000:.4f} meV/atom"))

    # 3. train.x potential -> import
    tr = work / "gen"
    (tr / "train.in").write_text("TRAININGSET ec.train\nTESTPERCENT 10\nITERATIONS 20\n\nMETHOD\nbfgs\n\nNETWORKS\n"
                                 + "".join(f"  {el} {el}.nn 2 10:tanh 10:tanh\n" for el in SPECIES))
    AP.run("train.x", "train.in", tr)
    cli("import-aenet", *[tr / f"{el}.nn" for el in SPECIES], "-o", work / "imported.pt")
    imp = BPNN.load(work / "imported.pt")
    dE, dF, t = compare(imp, {el: tr / f"{el}.nn" for el in SPECIES}, test_files, work / "pred2")
    rows.append((f"train.x potential imported, {len(test_files)} test structures",
                 f"max |dE| {dE:.1e} eV, max |dF| {dF:.1e} eV/A"))

    w = max(len(r[0]) for r in rows)
    for a, b_ in rows:
        print(f"{a:<{w}}  {b_}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
