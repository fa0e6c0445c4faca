"""TorchScript export: loaded in a fresh interpreter whose PYTHONPATH has no distmlip (torch only),
energies and forces equal the model's (periodic, small periodic cell with self-images, molecule,
unwrapped coordinates, a slab whose third cell vector is zero), ZBL included."""
import json
import os
import subprocess
import sys

import numpy as np
import torch

from distmlip.models.bpnn import BPNN
from helpers import tmpfs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESC = {"rc_radial": 4.0, "n_radial": 5, "rc_angular": 3.2, "n_angular": 3, "backend": "reference"}

RUNNER = r"""
import json, sys
sys.path = [p for p in sys.path if p.rstrip("/") != sys.argv[1] and p != ""]
sys.modules["distmlip"] = None          # any import of distmlip now raises ImportError
import torch
structs = json.load(open(sys.argv[2]))
res = {}
with torch.jit.optimized_execution(False):  # skip the profiling executor's warm-up re-compilations
    for path in sys.argv[4:]:
        m = torch.jit.load(path)
        res[path] = []
        for s in structs:
            e, f = m(torch.tensor(s["positions"], dtype=torch.float64), torch.tensor(s["numbers"]),
                     torch.tensor(s["cell"], dtype=torch.float64), torch.tensor(s["pbc"]))
            res[path].append({"energy": float(e), "forces": f.tolist()})
json.dump(res, open(sys.argv[3], "w"))
"""


def _model(zbl):
    torch.manual_seed(3)
    m = BPNN(["Cu", "Au"], DESC, [8, 6], ["tanh", "silu"], reference_energies={"Cu": -1.0, "Au": -2.0},
             zbl=zbl)
    for p in m.parameters():
        p.data.normal_(0.0, 0.3)
    g = torch.Generator().manual_seed(1)
    m.ann.feature_mean.copy_(torch.randn(m.ann.feature_mean.shape, generator=g, dtype=torch.float64))
    m.ann.feature_std.copy_(torch.rand(m.ann.feature_std.shape, generator=g, dtype=torch.float64) + 0.3)
    m.ann.energy_shift.copy_(torch.tensor([0.3, -0.2], dtype=torch.float64))
    m.ann.energy_scale.fill_(0.5)
    return m


def _structures():
    from ase import Atoms
    from ase.build import bulk

    rng = np.random.default_rng(0)
    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    a.numbers[[1, 2]] = 79
    a.rattle(0.2, seed=1)
    a.positions[1] = a.positions[0] + [0.9, 0.5, 0.0]        # a close pair: ZBL active
    b = bulk("Au", "fcc", a=3.0)                             # 1-atom cell: many self-images
    b.rattle(0.05, seed=2)
    c = Atoms("Cu3Au2", positions=rng.uniform(0, 3.0, (5, 3)))  # molecule
    tri = bulk("Cu", "hcp", a=2.6, c=4.1)                     # non-orthogonal cell
    tri.numbers[1] = 79
    tri.rattle(0.05, seed=3)
    un = (a * (2, 1, 1)).copy()                               # unwrapped: atoms moved by lattice vectors
    un.positions[2] += 2 * un.cell[0]
    un.positions[5] -= un.cell[1] + 3 * un.cell[2]
    slab = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 1)   # slab with a zero third cell vector
    slab.rattle(0.05, seed=4)
    slab.set_cell([slab.cell[0], slab.cell[1], [0.0, 0.0, 0.0]])
    slab.pbc = (True, True, False)
    return [a, b, c, tri, un, slab]


def test_torchscript_export_runs_without_distmlip(tmp_path):
    from distmlip.cli import main
    from distmlip.evaluation.calculator import DistmlipCalculator

    structs = _structures()
    sj = tmp_path / "s.json"
    sj.write_text(json.dumps([{"positions": a.positions.tolist(), "numbers": a.numbers.tolist(),
                               "cell": np.array(a.cell[:]).tolist(), "pbc": a.pbc.tolist()} for a in structs]))
    files, models = [], []
    for zbl in (None, {}):
        mp = tmp_path / f"model_{zbl is not None}.pt"
        _model(zbl).save(mp)
        ts = tmp_path / f"ts_{zbl is not None}.pt"
        assert main(["export", "--format", "torchscript", str(mp), "-o", str(ts)]) == 0
        files.append(str(ts))
        models.append(mp)
    (tmp_path / "runner.py").write_text(RUNNER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    res = tmp_path / "r.json"
    subprocess.run([sys.executable, "-I", str(tmp_path / "runner.py"), ROOT, str(sj), str(res)] + files,
                   check=True, env=env, cwd=str(tmp_path))
    out = json.loads(res.read_text())
    energies = []
    for ts, mp in zip(files, models):
        calc = DistmlipCalculator(BPNN.load(mp))
        es = []
        for a, o in zip(structs, out[ts]):
            a = a.copy()
            a.calc = calc
            es.append(a.get_potential_energy())
            np.testing.assert_allclose(o["energy"], es[-1], rtol=1e-12, atol=1e-10)
            np.testing.assert_allclose(np.array(o["forces"]), a.get_forces(), rtol=1e-9, atol=1e-9)
        energies.append(es)
    assert energies[1][0] - energies[0][0] > 1.0          # the close pair: ZBL really is in both
    assert abs(energies[1][1] - energies[0][1]) < 1e-12   # no pair inside the ZBL radii


def test_torchscript_export_to_a_full_disk_is_one_clear_error(tmp_path):
    """torch's TorchScript writer met a full disk with a C++ exception: the process aborted
    (exit 134, a page of C++ frames) and left its temporary file (sweep 20, a 200 KiB tmpfs)."""
    from helpers import distmlip_cli

    model = tmp_path / "model.pt"
    _model({}).save(model)
    mnt = tmp_path / "small"
    mnt.mkdir()
    with tmpfs(mnt, "64k"):
        (mnt / "filler").write_bytes(b"\0" * 60_000)
        res = distmlip_cli(["export", "--format", "torchscript", str(model), "-o", str(mnt / "ts.pt")], check=False)
        text = res.stdout + res.stderr
        assert res.returncode == 2 and "no space left" in text and str(mnt / "ts.pt") in text, text
        assert sorted(p.name for p in mnt.iterdir()) == ["filler"]
