"""distmlip md-check: committee of two models on a small Cu cell; minimum distances against ASE's
brute-force distances, failure detection against the covalent-radius threshold, outputs."""
import json

import numpy as np
import torch
from ase.build import bulk
from ase.io import read, write

from distmlip.cli import main
from distmlip.models.bpnn import BPNN

DESC = {"rc_radial": 3.0, "n_radial": 3, "rc_angular": 2.8, "n_angular": 2, "backend": "reference"}


def _models(tmp_path):
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = BPNN(["Cu"], DESC, [4], "tanh", zbl={})
        for p in m.parameters():
            p.data.normal_(0.0, 0.05)
        m.ann.energy_scale.fill_(0.05)
        path = tmp_path / f"m{seed}.pt"
        m.save(path)
        paths.append(str(path))
    return paths


def test_md_check_committee_outputs_and_failures(tmp_path):
    models = _models(tmp_path)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.rattle(0.05, seed=0)
    s = tmp_path / "start.extxyz"
    write(str(s), atoms)
    out = tmp_path / "out"
    assert main(["md-check", *models, str(s), "-T", "300", "900", "--steps", "10", "--interval", "5",
                 "--timestep", "1", "--nve-steps", "5", "-o", str(out)]) == 0
    summ = json.loads((out / "summary.json").read_text())
    assert summ["committee_size"] == 2 and len(summ["runs"]) == 2
    atoms = read(str(s))    # positions as stored in the file
    d_ref = atoms.get_all_distances(mic=True)[np.triu_indices(len(atoms), 1)].min()
    for r in summ["runs"]:
        assert r["frames"] == 3 and r["status"] == "ok"
        np.testing.assert_allclose(r["min_dist_first_A"], d_ref, rtol=1e-12)
        assert r["failed_frames"] == 0 and r["failure_ratio"] == 0.0     # 0.6 x 2.64 A = 1.58 A
        assert r["max_force_deviation"] > 0.0                           # two different members
        assert r["nve_drift_eV_atom"] is not None
        assert (out / f"pdf_T{r['temperature_K']:g}.png").stat().st_size > 1000
    # a threshold above the nearest-neighbour distance: every frame fails and is written out
    out2 = tmp_path / "out2"
    assert main(["md-check", models[0], str(s), "-T", "300", "--steps", "10", "--interval", "5",
                 "--nve-steps", "0", "--threshold-factor", "1.2", "-o", str(out2)]) == 0
    r = json.loads((out2 / "summary.json").read_text())["runs"][0]
    assert r["failed_frames"] == r["frames"] == 3 and r["failure_ratio"] == 1.0
    assert r["max_force_deviation"] == 0.0 and r["nve_drift_eV_atom"] is None
    frames = read(r["failed_frames_file"], index=":")
    assert len(frames) == 3 and frames[0].info["md_step"] == 0
    # bad input: unknown element, missing file
    au = tmp_path / "au.xyz"
    write(str(au), bulk("Au", "fcc", a=4.08))
    assert main(["md-check", models[0], str(au), "--steps", "1", "-o", str(tmp_path / "x")]) == 2
    assert main(["md-check", models[0], str(tmp_path / "nope.xyz"), "-o", str(tmp_path / "x")]) == 2
