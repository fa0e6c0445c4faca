"""Quick checks of the paper-reproduction examples (the full runs are documented in docs/results.md).

* examples/paper_h2: the generated H2 Lennard-Jones data (ASE LennardJones(epsilon=1, sigma=1)) equal
  the shared XSF files energy for energy and force for force (skip when ../shared/data is absent), and
  the bond-axis force helper equals -dE/dr by finite differences;
* both scripts parse their options (--help) and the EC script refuses a missing data folder.
"""
from __future__ import annotations

import glob
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import require_shared

ROOT = Path(__file__).resolve().parents[1]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_h2_generated_data_match_shared(tmp_path):
    shared = require_shared("h2_lj")
    from ase.io import read

    from distmlip.data.readers import read_xsf

    h2 = _load("paper_h2_run", ROOT / "examples" / "paper_h2" / "run.py")
    h2.write_generated(tmp_path)
    for part, n in (("train", 7), ("test", 200)):
        gen = read(tmp_path / part / f"h2_{part}.extxyz", index=":")
        ref = [s for f in sorted(glob.glob(str(Path(shared) / part / "*.xsf"))) for s in read_xsf(f)]
        assert len(gen) == len(ref) == n
        r_gen = sorted((float(a.get_distance(0, 1)), a.get_potential_energy(), h2.bond_quantities(a.positions, a.get_forces())[1])
                       for a in gen)
        r_ref = sorted((float(np.linalg.norm(s.positions[1] - s.positions[0])), s.energy,
                        h2.bond_quantities(s.positions, s.forces)[1]) for s in ref)
        np.testing.assert_allclose(np.array(r_gen), np.array(r_ref), rtol=1e-7, atol=1e-7)  # extxyz stores 8 decimals


def test_h2_bond_force_is_minus_dE_dr():
    from ase import Atoms
    from ase.calculators.lj import LennardJones

    h2 = _load("paper_h2_run", ROOT / "examples" / "paper_h2" / "run.py")

    def energy(r):
        a = Atoms("H2", positions=[[0, 0, 0], [r * 0.6, r * 0.8, 0]])
        a.calc = LennardJones(epsilon=1.0, sigma=1.0)
        return a

    r, h = 1.3, 1e-5
    a = energy(r)
    _, fb = h2.bond_quantities(a.positions, a.get_forces())
    fd = -(energy(r + h).get_potential_energy() - energy(r - h).get_potential_energy()) / (2 * h)
    assert abs(fb - fd) < 1e-6 * max(1.0, abs(fd))


@pytest.mark.parametrize("script", ["paper_h2", "paper_ec_dimer"])
def test_example_help(script):
    p = subprocess.run([sys.executable, str(ROOT / "examples" / script / "run.py"), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "--out" in p.stdout


def test_ec_missing_data_is_a_clear_error(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "paper_ec_dimer" / "run.py"), "--data",
                        str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode != 0
    assert "nowhere" in (p.stderr + p.stdout) and "not a folder" in (p.stderr + p.stdout)
