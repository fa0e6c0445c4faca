"""Data-parallel training under real `mpirun -n 2`: 1 rank == 2 ranks on the same global batches
(energy and force mode; plain SGD, so an error in the gradient scale would show) and a rank raising
inside `distmlip train` ending the job.  SIGTERM mid-epoch + resume == uninterrupted run, and the
refusal of a 2-rank checkpoint on 1 rank, are in tests/faults/."""
import time

import numpy as np

import torch

from helpers import REPO, mpirun

EQUIV = str(REPO / "tests" / "mpi_scripts" / "train_equiv.py")
CLI = str(REPO / "tests" / "mpi_scripts" / "train_cli.py")




def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def test_one_rank_equals_two_ranks_on_the_same_global_batches(tmp_path, emt_h5):
    import subprocess
    import sys
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for k in [k for k in env if k.startswith(("OMPI_", "PMI", "PMIX_", "SLURM_"))]:
        del env[k]
    res = subprocess.run([sys.executable, EQUIV, str(emt_h5), str(tmp_path), "energy", "force"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    mpirun(2, [EQUIV, str(emt_h5), str(tmp_path), "energy", "force"], timeout=300)
    for mode in ("energy", "force"):
        w1 = torch.load(tmp_path / f"{mode}_w1.pt", weights_only=True)
        w2 = torch.load(tmp_path / f"{mode}_w2.pt", weights_only=True)
        init = torch.load(tmp_path / f"{mode}_w1_init.pt", weights_only=True)
        moved = max_diff(w1, init)
        assert moved > 1e-4, f"{mode}: the 20 steps hardly changed the weights ({moved})"
        assert max_diff(init, torch.load(tmp_path / f"{mode}_w2_init.pt", weights_only=True)) < 1e-12
        d = max_diff(w1, w2)
        assert d < 1e-10, f"{mode}: 1 rank vs 2 ranks differ by {d}"


def write_cfg(path, h5, out, epochs=3):
    path.write_text(f"""
data: {{train: [{h5}], fractions: [0.75, 0.25, 0.0]}}
descriptor: {{rc_radial: 4.0, n_radial: 4, rc_angular: 3.0, n_angular: 2, backend: reference}}
model: {{hidden: [6, 6]}}
training: {{mode: force, alpha: 0.2, epochs: {epochs}, batch_atoms: 16, lr: 0.01, output: {out},
           progress_bar: 'off', scheduler: none}}
""")
    return path


def test_rank_raising_in_train_step_ends_the_job(tmp_path, emt_h5):
    cfg = write_cfg(tmp_path / "c.yaml", emt_h5, tmp_path / "out", epochs=50)
    t0 = time.time()
    res = mpirun(2, [CLI, "train", str(cfg)], env={"DISTMLIP_TEST_RAISE": "1:3"}, timeout=120, check=False)
    elapsed = time.time() - t0
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert elapsed < 60, elapsed
    assert "injected failure in step 3 on rank 1" in out, out


def test_one_rank_equals_two_ranks_with_force_outliers_left_out(tmp_path, emt_h5):
    """Structures with a force outlier leave the force loss (training.force_outliers: exclude):
    every rank must leave out the same ones, so 1 rank == 2 ranks still holds."""
    import dataclasses
    import os
    import subprocess
    import sys

    from distmlip.data.h5store import H5Dataset, write_dataset
    from distmlip.training.config import load_train_config
    from distmlip.training.trainer import Trainer

    ds = H5Dataset(emt_h5)
    S = ds.read(range(ds.n_structures))
    z = np.bincount(np.concatenate([s.numbers for s in S])).argmax()     # an element with a median
    for k in (0, 1, 2):
        f = S[k].forces.copy()
        f[int(np.flatnonzero(S[k].numbers == z)[0])] = [500.0, 0.0, 0.0]
        S[k] = dataclasses.replace(S[k], forces=f)
    bad = tmp_path / "bad.h5"
    write_dataset(bad, S)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for k in [k for k in env if k.startswith(("OMPI_", "PMI", "PMIX_", "SLURM_"))]:
        del env[k]
    res = subprocess.run([sys.executable, EQUIV, str(bad), str(tmp_path), "force"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    mpirun(2, [EQUIV, str(bad), str(tmp_path), "force"], timeout=300)
    tr = Trainer(load_train_config(tmp_path / "cfg_force_w1_r0.yaml"), quiet=True)
    ex = tr._force_excluded()
    assert set(np.flatnonzero(ex)) == {0, 1, 2} & set(tr.train_idx.tolist()) != set()
    d = max_diff(torch.load(tmp_path / "force_w1.pt", weights_only=True),
                 torch.load(tmp_path / "force_w2.pt", weights_only=True))
    assert d < 1e-10, f"1 rank vs 2 ranks differ by {d}"


def test_max_minutes_stops_every_rank_at_the_same_epoch(tmp_path, emt_h5):
    """Rank 0's clock decides for both ranks: the job ends (exit 0, no hang) with one checkpoint
    epoch and the models written."""
    cfg = write_cfg(tmp_path / "c.yaml", emt_h5, tmp_path / "out", epochs=100000)
    cfg.write_text(cfg.read_text().replace("scheduler: none", "scheduler: none, max_minutes: 0.05"))
    res = mpirun(2, [CLI, "train", str(cfg)], timeout=180)
    assert "training finished: time_limit" in res.stdout + res.stderr
    st = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)
    assert 1 <= st["epoch"] < 100000
    assert (tmp_path / "out" / "model.pt").is_file()
