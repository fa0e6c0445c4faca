"""The metatomic export (needs the optional metatomic-torch and metatomic-ase packages; skipped
without them): loaded by metatomic-ase in a fresh interpreter in which distmlip cannot be
imported, energies and forces equal the model's (periodic cells, a triclinic cell, a molecule,
ZBL included), and the stress the engine derives equals the strain derivative of the energy."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("metatomic.torch", reason="metatomic-torch is not installed (optional: pip install "
                    "metatomic-torch metatomic-ase)")
pytest.importorskip("metatomic_ase", reason="metatomic-ase is not installed")

from test_export_program import ROOT, _model, _structures  # noqa: E402

RUNNER = r"""
import json, sys
sys.path = [p for p in sys.path if p.rstrip("/") != sys.argv[1] and p != ""]
sys.modules["distmlip"] = None
import numpy as np
from ase import Atoms
from metatomic_ase import MetatomicCalculator
structs = json.load(open(sys.argv[2]))
calc = MetatomicCalculator(sys.argv[4])
res = []
for s in structs:
    a = Atoms(numbers=s["numbers"], positions=s["positions"], cell=s["cell"], pbc=s["pbc"])
    a.calc = calc
    r = {"energy": a.get_potential_energy(), "forces": a.get_forces().tolist()}
    if a.pbc.all():
        r["stress"] = a.get_stress().tolist()
        eps = 1e-5
        fd = []
        for k in range(3):
            e = []
            for d in (eps, -eps):
                b = a.copy(); b.calc = calc
                strain = np.eye(3); strain[k, k] += d
                b.set_cell(a.cell[:] @ strain, scale_atoms=True)
                e.append(b.get_potential_energy())
            fd.append((e[0] - e[1]) / (2 * eps) / a.get_volume())
        r["stress_fd"] = fd
    res.append(r)
json.dump(res, open(sys.argv[3], "w"))
"""


def test_metatomic_export_runs_in_ase_without_distmlip(tmp_path):
    from distmlip.cli import main
    from distmlip.evaluation.calculator import DistmlipCalculator
    from distmlip.models.bpnn import BPNN

    mp = tmp_path / "model.pt"
    _model({}).save(mp)
    out = tmp_path / "mta.pt"
    assert main(["export", "--format", "metatomic", str(mp), "-o", str(out)]) == 0
    structs = _structures()
    sj = tmp_path / "s.json"
    sj.write_text(json.dumps([{"positions": a.positions.tolist(), "numbers": a.numbers.tolist(),
                               "cell": np.array(a.cell[:]).tolist(), "pbc": a.pbc.tolist()} for a in structs]))
    (tmp_path / "runner.py").write_text(RUNNER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    subprocess.run([sys.executable, "-I", str(tmp_path / "runner.py"), ROOT, str(sj), str(tmp_path / "r.json"),
                    str(out)], check=True, env=env, cwd=str(tmp_path))
    res = json.loads((tmp_path / "r.json").read_text())
    calc = DistmlipCalculator(BPNN.load(mp))
    for a, o in zip(structs, res):
        a = a.copy()
        a.calc = calc
        np.testing.assert_allclose(o["energy"], a.get_potential_energy(), rtol=1e-12, atol=1e-10)
        np.testing.assert_allclose(np.array(o["forces"]), a.get_forces(), rtol=1e-9, atol=1e-9)
        if "stress" in o:
            np.testing.assert_allclose(np.array(o["stress"])[:3], o["stress_fd"], rtol=1e-5, atol=1e-6)
