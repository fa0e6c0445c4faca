"""The torch.export deployment format: loaded in a fresh interpreter in which distmlip cannot be
imported (torch and ASE's neighbour list only), the program's energies and forces equal the
model's on periodic cells (with atoms seeing their own images), a triclinic cell and a molecule,
ZBL included; the AOTInductor package (DISTMLIP_TEST_AOTI=1: its C++ compilation takes minutes)
gives the same."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from distmlip.models.bpnn import BPNN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESC = {"rc_radial": 4.0, "n_radial": 5, "rc_angular": 3.2, "n_angular": 3, "backend": "reference"}

RUNNER = r"""
import json, sys
sys.path = [p for p in sys.path if p.rstrip("/") != sys.argv[1] and p != ""]
sys.modules["distmlip"] = None          # any import of distmlip now raises ImportError
import numpy as np
import torch
from ase import Atoms
from ase.neighborlist import neighbor_list
structs = json.load(open(sys.argv[2]))
res = {}
for path in sys.argv[4:]:
    if path.endswith(".aoti.pt2"):
        f = torch._inductor.aoti_load_package(path)
    else:
        f = torch.export.load(path).module()
    meta = json.load(open(path.replace(".aoti.pt2", ".pt2") + ".json"))
    res[path] = []
    for s in structs:
        a = Atoms(numbers=s["numbers"], positions=s["positions"], cell=s["cell"], pbc=s["pbc"])
        i, j, S = neighbor_list("ijS", a, meta["cutoff"])
        e, F = f(torch.tensor(a.positions), torch.tensor(a.numbers, dtype=torch.long),
                 torch.tensor(np.array(a.cell)), torch.as_tensor(i, dtype=torch.long),
                 torch.as_tensor(j, dtype=torch.long), torch.as_tensor(S, dtype=torch.float64))
        res[path].append({"energy": float(e), "forces": F.tolist()})
json.dump(res, open(sys.argv[3], "w"))
"""


def _model(zbl, species=("Cu", "Au"), acts=("tanh", "silu"), dtype="float64"):
    torch.manual_seed(3)
    m = BPNN(list(species), DESC, [8, 6], list(acts), dtype, reference_energies={"Cu": -1.0, "Au": -2.0},
             zbl=zbl)
    for p in m.parameters():
        p.data.normal_(0.0, 0.3)
    g = torch.Generator().manual_seed(1)
    m.ann.feature_mean.copy_(torch.randn(m.ann.feature_mean.shape, generator=g, dtype=torch.float64))
    m.ann.feature_std.copy_(torch.rand(m.ann.feature_std.shape, generator=g, dtype=torch.float64) + 0.3)
    m.ann.energy_shift.copy_(torch.linspace(0.3, -0.2, len(species), dtype=torch.float64))
    m.ann.energy_scale.fill_(0.5)
    return m


def _structures():
    from ase import Atoms
    from ase.build import bulk

    rng = np.random.default_rng(0)
    a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    a.numbers[[1, 2, 6]] = 79
    a.rattle(0.2, seed=1)
    a.positions[1] = a.positions[0] + [0.9, 0.5, 0.0]        # a close pair: ZBL active
    b = bulk("Au", "fcc", a=3.0)                             # 1-atom cell: many self-images
    b.rattle(0.05, seed=2)
    c = Atoms("Cu3Au2", positions=rng.uniform(0, 3.0, (5, 3)))  # molecule
    tri = bulk("Cu", "hcp", a=2.6, c=4.1)                     # non-orthogonal cell
    tri.numbers[1] = 79
    tri.set_cell(tri.cell[:] @ (np.eye(3) + rng.normal(0, 0.03, (3, 3))), scale_atoms=True)
    tri.rattle(0.05, seed=3)
    return [a, b, c, tri]


def _run_fresh(tmp_path, files, structs):
    sj = tmp_path / "s.json"
    sj.write_text(json.dumps([{"positions": a.positions.tolist(), "numbers": a.numbers.tolist(),
                               "cell": np.array(a.cell[:]).tolist(), "pbc": a.pbc.tolist()} for a in structs]))
    (tmp_path / "runner.py").write_text(RUNNER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    res = tmp_path / "r.json"
    subprocess.run([sys.executable, "-I", "-W", "error::DeprecationWarning", str(tmp_path / "runner.py"), ROOT,
                    str(sj), str(res)] + [str(f) for f in files], check=True, env=env, cwd=str(tmp_path))
    return json.loads(res.read_text())


def _compare(model, structs, results):
    from distmlip.evaluation.calculator import DistmlipCalculator

    calc = DistmlipCalculator(model)
    es = []
    for a, o in zip(structs, results):
        a = a.copy()
        a.calc = calc
        es.append(a.get_potential_energy())
        np.testing.assert_allclose(o["energy"], es[-1], rtol=1e-12, atol=1e-10)
        np.testing.assert_allclose(np.array(o["forces"]), a.get_forces(), rtol=1e-9, atol=1e-9)
    return es


def test_exported_program_runs_without_distmlip(tmp_path):
    from distmlip.cli import main

    structs = _structures()
    files, models = [], []
    for k, (zbl, acts, dtype) in enumerate([({}, ("tanh", "silu"), "float64"), (None, ("sigmoid", "tanh"), "float32")]):
        mp = tmp_path / f"model_{k}.pt"
        _model(zbl, acts=acts, dtype=dtype).save(mp)
        out = tmp_path / f"prog_{k}.pt2"
        assert main(["export", "--format", "exported-program", str(mp), "-o", str(out)]) == 0
        meta = json.loads((tmp_path / f"prog_{k}.pt2.json").read_text())
        assert meta["species"] == ["Cu", "Au"] and meta["zbl"] == (zbl is not None)
        files.append(out)
        models.append(BPNN.load(mp))
    out = _run_fresh(tmp_path, files, structs)
    energies = [_compare(m, structs, out[str(f)]) for m, f in zip(models, files)]
    zbl_model = _model({}, acts=("tanh", "silu"))
    plain = _model(None, acts=("tanh", "silu"))
    from distmlip.evaluation.calculator import DistmlipCalculator

    a = structs[0].copy()
    a.calc = DistmlipCalculator(zbl_model)
    e_zbl = a.get_potential_energy()
    a.calc = DistmlipCalculator(plain)
    assert e_zbl - a.get_potential_energy() > 1.0 and abs(energies[0][0] - e_zbl) < 1e-9  # ZBL is in
    # an element the model lacks (Ni): NaN energy and forces, not a finite number of another species
    ni = structs[0].copy()
    ni.numbers[3] = 28
    res = _run_fresh(tmp_path, files[:1], [ni])[str(files[0])][0]
    assert np.isnan(res["energy"]) and np.isnan(np.array(res["forces"])).all()


@pytest.mark.skipif(os.environ.get("DISTMLIP_TEST_AOTI") != "1",
                    reason="AOTInductor compilation takes minutes; set DISTMLIP_TEST_AOTI=1")
def test_aoti_package_runs_without_distmlip(tmp_path):
    from distmlip.evaluation.export_program import write_exported_program

    m = _model({})
    paths = write_exported_program(m, tmp_path / "prog.pt2", aoti=True)
    aoti = [p for p in paths if p.name.endswith(".aoti.pt2")][0]
    structs = _structures()
    out = _run_fresh(tmp_path, [aoti], structs)
    _compare(m, structs, out[str(aoti)])
