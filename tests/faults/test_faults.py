"""Fault injection with real mpirun jobs and real files: every fault of the "no silent wrong
results" list ends in a clear error (file, structure, field or job named; exit code non-zero,
no traceback) or in the exact result, and never corrupts, loses or silently reuses data.

The numbered cases follow the issue: 1 non-finite values, 2 augment reruns on changed data,
3 descriptor-cache races and staleness, 4 exact multi-rank resume, 5 full disks, 6 frozen ranks,
7 the rendezvous, 8 temporary files of dead writers, 9 two jobs on one output folder, 10 resume
with another configuration or rank count, 11 nonsense configuration values."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from distmlip.data.examples import rattled_cu_au
from distmlip.data.h5store import H5Dataset, write_dataset
from helpers import REPO, distmlip_cli, mpirun, mpirun_exe, tmpfs

CLI = str(REPO / "tests" / "mpi_scripts" / "train_cli.py")
DESC = "{rc_radial: 4.0, n_radial: 4, rc_angular: 3.0, n_angular: 2, cache: off}"


def _cfg(path: Path, data, out, extra: str = "", model: str = "{hidden: [6, 6]}", desc: str = DESC,
         data_extra: str = "fractions: [0.75, 0.25, 0.0]") -> Path:
    path.write_text(f"""
data: {{train: [{data}], {data_extra}}}
descriptor: {desc}
model: {model}
training: {{batch_atoms: 16, lr: 0.01, output: {out}, progress_bar: 'off', scheduler: none{', ' + extra if extra else ''}}}
""")
    return path


def _model_values(path) -> list:
    obj = torch.load(path, weights_only=True)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    return [v for v in sd.values() if torch.is_tensor(v) and v.is_floating_point()]


def _no_traceback(res):
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out[-3000:]
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    write_dataset(d / "emt.h5", rattled_cu_au(24))
    return d


# ------------------------------------------------------------------------------------------
# 1. non-finite values
# ------------------------------------------------------------------------------------------

def test_01_diverging_run_stops_keeps_the_good_checkpoint_and_resumes_with_a_lower_lr(tmp_path, data):
    out = tmp_path / "run"
    good = _cfg(tmp_path / "good.yaml", data / "emt.h5", out, "epochs: 2, optimizer: sgd, mode: force",
                model="{hidden: [8, 8], activation: linear}")
    mpirun(2, [CLI, "train", str(good)], timeout=240)
    ck_before = torch.load(out / "checkpoint.pt", weights_only=True)
    # the same run continued with a learning rate that makes it diverge (the changed lr is applied)
    res = mpirun(2, [CLI, "train", str(good), "--resume", str(out / "checkpoint.pt"), "--set",
                     "training.lr=10.0", "--set", "training.epochs=4"], check=False, timeout=240)
    text = _no_traceback(res)
    assert res.returncode != 0, text
    assert "training.lr changed from 0.01 to 10.0 (applied)" in text, text
    assert "not finite" in text or "non-finite" in text, text
    assert "epoch" in text and "lower learning rate" in text, text
    # no model or checkpoint holds a non-finite value, and the checkpoint is the last good one
    for f in out.glob("*.pt"):
        assert all(bool(torch.isfinite(v).all()) for v in _model_values(f)), f
    ck_after = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck_after["epoch"] >= ck_before["epoch"]
    assert all(bool(torch.isfinite(v).all()) for v in ck_after["model"]["state_dict"].values()
               if v.is_floating_point())
    # resuming from it with a lower learning rate works and ends with finite weights
    res = mpirun(2, [CLI, "train", str(good), "--resume", str(out / "checkpoint.pt"), "--set",
                     "training.lr=0.001", "--set", "training.epochs=4"], timeout=240)
    assert all(bool(torch.isfinite(v).all()) for v in _model_values(out / "model.pt"))
    assert torch.load(out / "last_model.pt", weights_only=True)["metadata"]["epoch"] == 4


def test_01_nan_in_a_data_file_is_named_by_training_and_info(tmp_path, data):
    bad = tmp_path / "bad.h5"
    shutil.copy(data / "emt.h5", bad)
    with h5py.File(bad, "r+") as f:          # as another tool could have written it
        e = f["structures/energy"][...]
        e[5] = np.nan
        f["structures/energy"][...] = e
        p = f["atoms/positions"][...]
        p[41, 1] = np.inf
        f["atoms/positions"][...] = p
    res = distmlip_cli(["train", str(_cfg(tmp_path / "c.yaml", bad, tmp_path / "run", "epochs: 2"))], check=False)
    text = _no_traceback(res)
    assert res.returncode == 2, text
    assert str(bad) in text and "structure " in text and "not finite" in text, text
    assert not (tmp_path / "run" / "model.pt").exists()
    res = distmlip_cli(["info", str(bad)], check=False)
    assert res.returncode == 1
    assert "NON-FINITE" in res.stdout and "energy: 1 entry (first in structure 5)" in res.stdout, res.stdout
    assert "positions: 1 entry (first in structure 10)" in res.stdout, res.stdout


# ------------------------------------------------------------------------------------------
# 2. augment reruns after the input changed
# ------------------------------------------------------------------------------------------

def test_02_augment_rerun_on_reconverted_data_recomputes(tmp_path):
    inp = tmp_path / "train.h5"
    write_dataset(inp, rattled_cu_au(8, seed=1))
    cfg = tmp_path / "aug.yaml"
    cfg.write_text(f"input: {inp}\noutput: {tmp_path / 'aug.h5'}\nmethod: taylor\ncopies: 2\ndelta: 0.02\n")
    first = distmlip_cli(["augment", str(cfg)])
    assert "finished earlier" not in first.stdout
    again = distmlip_cli(["augment", str(cfg)])
    assert "finished earlier, skipped" in again.stdout         # same content: reused
    write_dataset(inp, rattled_cu_au(8, seed=2))                # reconverted with other structures
    res = distmlip_cli(["augment", str(cfg)])
    assert "finished earlier" not in res.stdout, res.stdout
    ds = H5Dataset(tmp_path / "aug.h5")
    s = ds.read(range(ds.n_structures))
    for c in (x for x in s if x.synthetic):                     # every copy close to its parent
        p = s[c.parent]
        rms = float(np.sqrt(((c.positions - p.positions) ** 2).mean()))
        assert rms < 0.1, (c.index, c.parent, rms)


# ------------------------------------------------------------------------------------------
# 3. descriptor caches: two settings on one data file, replaced data
# ------------------------------------------------------------------------------------------

def test_03_two_jobs_with_other_cutoffs_share_a_data_file_without_mixing_caches(tmp_path, data):
    h5 = tmp_path / "emt.h5"
    shutil.copy(data / "emt.h5", h5)
    runs = {}
    for rc in ("4.0", "3.6"):
        desc = f"{{rc_radial: {rc}, n_radial: 4, rc_angular: 3.0, n_angular: 2, cache: on}}"
        cfg = _cfg(tmp_path / f"c{rc}.yaml", h5, tmp_path / f"run{rc}", "epochs: 2", desc=desc)
        runs[rc] = subprocess.Popen([sys.executable, "-m", "distmlip", "train", str(cfg)], cwd=tmp_path,
                                    env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
    outs = {rc: p.communicate(timeout=240)[0] for rc, p in runs.items()}
    assert all(p.returncode == 0 for p in runs.values()), outs
    caches = sorted(tmp_path.glob("emt.h5.desc-*.h5"))
    assert len(caches) == 2, caches                             # one file per descriptor spec
    # each cache holds the descriptors of its own settings (computed here independently)
    from distmlip.descriptors.batch import collate
    from distmlip.descriptors.featurize import FeatureCache
    from distmlip.descriptors.spec import DescriptorSpec

    ds = H5Dataset(h5)
    for rc in (4.0, 3.6):
        spec = DescriptorSpec(rc_radial=rc, n_radial=4, rc_angular=3.0, n_angular=2)
        path = next(p for p in caches if _cache_key(p)["rc_radial"] == rc)
        b = collate(ds.read(range(ds.n_structures)), ds.species, cutoff=spec.cutoff)
        G = spec.build(ds.species)(b.positions, b.species, b.pair_i, b.pair_j, b.pair_shift).numpy()
        got = FeatureCache(path, ds, ds.species, spec).features(np.arange(ds.n_structures))
        assert np.abs(got - G).max() < 1e-12, (rc, path)
    # the data file replaced by another one with its time stamp preserved (cp -p, rsync -a)
    st = os.stat(h5)
    write_dataset(h5, rattled_cu_au(24, seed=9))
    os.utime(h5, ns=(st.st_atime_ns, st.st_mtime_ns))
    res = distmlip_cli(["train", str(_cfg(tmp_path / "c4.0.yaml", h5, tmp_path / "again", "epochs: 1",
                                          desc="{rc_radial: 4.0, n_radial: 4, rc_angular: 3.0, n_angular: 2, "
                                               "cache: auto}"))])
    assert "stale descriptor cache" in res.stderr and "rebuilding" in res.stderr, res.stderr


def _cache_key(path) -> dict:
    import json

    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["key"])


# ------------------------------------------------------------------------------------------
# 4. exact 2-rank resume after SIGTERM, with and without a validation split
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fractions", ["[0.75, 0.25, 0.0]", "[1.0, 0.0, 0.0]"], ids=["val", "noval"])
def test_04_two_rank_sigterm_resume_is_bit_identical(tmp_path, data, fractions):
    cfg = lambda name: _cfg(tmp_path / f"{name}.yaml", data / "emt.h5", tmp_path / name,  # noqa: E731
                            "epochs: 4, mode: force, alpha: 0.2, scheduler: plateau, plateau_patience: 0",
                            data_extra=f"fractions: {fractions}")
    mpirun(2, [CLI, "train", str(cfg("ref"))], timeout=300)
    res = mpirun(2, [CLI, "train", str(cfg("run"))], env={"DISTMLIP_TEST_SIGNAL": "1:4:SIGTERM"}, timeout=300)
    assert "stop requested" in res.stdout
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["step"] > 0                                        # stopped in the middle of an epoch
    mpirun(2, [CLI, "train", str(cfg("run")), "--resume", "auto"], timeout=300)
    a = _model_values(tmp_path / "ref" / "last_model.pt")
    b = _model_values(tmp_path / "run" / "last_model.pt")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # and the log of the interrupted epoch equals the uninterrupted run's
    la = (tmp_path / "ref" / "log.csv").read_text().splitlines()
    lb = (tmp_path / "run" / "log.csv").read_text().splitlines()
    col = lambda lines, n: [r.split(",")[lines[0].split(",").index(n)] for r in lines[1:]]  # noqa: E731
    for name in ("train_loss", "lr", "train_F_rmse"):
        assert col(la, name) == col(lb, name), (name, col(la, name), col(lb, name))


# ------------------------------------------------------------------------------------------
# 5. full disks
# ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _tmpfs(mnt: Path, size: str):
    """A tmpfs of ``size`` at ``mnt`` (a skip where mounting is not allowed)."""
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({res.stderr.decode().strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture()
def small_disk(tmp_path):
    with _tmpfs(tmp_path / "small", "96k") as mnt:
        yield mnt


def test_05_full_disk_in_convert_and_train_is_one_clear_error(tmp_path, data, small_disk):
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    atoms = []
    for s in rattled_cu_au(300, seed=4):
        a = Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
        a.calc = SinglePointCalculator(a, energy=s.energy, forces=s.forces)
        atoms.append(a)
    write(tmp_path / "big.extxyz", atoms)
    for n in (1, 2):
        if n == 1:
            res = distmlip_cli(["convert", str(tmp_path / "big.extxyz"), "-o", str(small_disk / "out.h5")], check=False)
        else:
            res = mpirun(2, ["-m", "distmlip", "convert", str(tmp_path / "big.extxyz"), "-o",
                             str(small_disk / "out.h5")], check=False)
        text = _no_traceback(res)
        assert res.returncode not in (0, 139, -11), (n, res.returncode, text)
        assert "no space left" in text and "out.h5" in text, text
        assert list(small_disk.iterdir()) == [], list(small_disk.iterdir())   # nothing left behind
    # training: the disk fills while the run writes its checkpoint
    (small_disk / "filler").write_bytes(os.urandom(60_000))
    res = distmlip_cli(["train", str(_cfg(tmp_path / "t.yaml", data / "emt.h5", small_disk / "run", "epochs: 3",
                                          model="{hidden: [40, 40]}"))], check=False)
    text = _no_traceback(res)
    assert res.returncode == 2 and "no space left" in text and str(small_disk / "run") in text, text
    assert not [p for p in (small_disk / "run").iterdir() if p.name.endswith(".tmp")]


def test_05_full_disk_while_logging_is_one_error_and_no_cut_row(tmp_path, data):
    """The disk fills just before log.csv is appended: one StorageError naming the file, and
    the file keeps its whole rows (chained OSError tracebacks and a cut last row before)."""
    from distmlip.errors import StorageError
    from distmlip.training.config import load_train_config
    from distmlip.training.trainer import Trainer

    with _tmpfs(tmp_path / "disk", "2m") as mnt:
        tr = Trainer(load_train_config(_cfg(tmp_path / "t.yaml", data / "emt.h5", mnt / "run", "epochs: 1")),
                     quiet=True)
        tr.fit()
        log = mnt / "run" / "log.csv"
        before = log.read_bytes()
        st = os.statvfs(mnt)
        (mnt / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize))
        import csv as _csv

        row = next(_csv.DictReader(before.decode().splitlines()))
        tr._csv_rows = [dict(row, epoch="2")] * 400
        with pytest.raises(StorageError, match="no space left") as err:
            tr._flush_csv()
        assert str(log) in str(err.value) and log.read_bytes() == before
        tr._flush_csv()                                  # nothing left to write twice


def test_05_read_only_output_is_refused_before_any_work(tmp_path, data):
    ro = tmp_path / "ro"
    ro.mkdir()
    with tmpfs(ro, "64k", read_only=True):
        res = distmlip_cli(["train", str(_cfg(tmp_path / "c.yaml", data / "emt.h5", ro / "run", "epochs: 1"))],
                           check=False)
        text = _no_traceback(res)
        assert res.returncode == 2 and str(ro / "run") in text and "read-only" in text, text
        assert "normalisation" not in text               # refused before the data were touched


# ------------------------------------------------------------------------------------------
# 6. a frozen rank
# ------------------------------------------------------------------------------------------

def test_06_frozen_rank_ends_the_job_within_the_timeout(tmp_path, data):
    piddir = tmp_path / "pids"
    piddir.mkdir()
    cfg = _cfg(tmp_path / "c.yaml", data / "emt.h5", tmp_path / "run", "epochs: 1000")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DISTMLIP_DIST_TIMEOUT="10",
               DISTMLIP_TEST_PIDDIR=str(piddir), DISTMLIP_TEST_SLEEP="0.02")
    cmd = [mpirun_exe(), "-n", "2", "--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    for k in ("PYTHONPATH", "OMP_NUM_THREADS", "DISTMLIP_DIST_TIMEOUT", "DISTMLIP_TEST_PIDDIR", "DISTMLIP_TEST_SLEEP"):
        cmd += ["-x", k]
    p = subprocess.Popen(cmd + [sys.executable, CLI, "train", str(cfg)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        t_end = time.time() + 120
        while not (piddir / "pid.1").exists() and time.time() < t_end:
            time.sleep(0.2)
        time.sleep(1.0)
        os.kill(int((piddir / "pid.1").read_text()), signal.SIGSTOP)
        t0 = time.time()
        out, err = p.communicate(timeout=90)
        elapsed = time.time() - t0
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0
    assert elapsed < 10 + 20, elapsed
    assert "no partner within 10 s" in err, err[-2000:]


def _run_frozen(tmp_path, args, freeze: str, timeout_s: int = 6):
    """``distmlip ARGS`` under mpirun -n 2 whose rank 1 stops itself (SIGSTOP) at ``freeze``
    (tests/mpi_scripts/train_cli.py); returns (rc, stdout, stderr, seconds)."""
    piddir = tmp_path / "pids"
    piddir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DISTMLIP_DIST_TIMEOUT=str(timeout_s),
               DISTMLIP_TEST_PIDDIR=str(piddir), DISTMLIP_TEST_FREEZE=freeze)
    cmd = [mpirun_exe(), "-n", "2", "--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    for k in ("PYTHONPATH", "OMP_NUM_THREADS", "DISTMLIP_DIST_TIMEOUT", "DISTMLIP_TEST_PIDDIR", "DISTMLIP_TEST_FREEZE"):
        cmd += ["-x", k]
    p = subprocess.Popen(cmd + [sys.executable, CLI] + args, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    try:
        out, err = p.communicate(timeout=150)
    finally:
        if p.poll() is None:
            p.kill()
        if (piddir / "pid.1").exists():          # never leave a stopped process behind
            try:
                os.kill(int((piddir / "pid.1").read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
    assert (piddir / "pid.1").exists(), ("rank 1 never reached the freeze point", out, err)
    return p.returncode, out, err, time.time() - t0


def test_06b_frozen_rank_ends_augment_whose_waits_have_no_deadline(tmp_path):
    """augment's ranks wait for each other without a deadline (GPR fits take hours); a partner
    whose heartbeat stops ends the job with its rank named, and the finished shard is kept."""
    inp = tmp_path / "train.h5"
    write_dataset(inp, rattled_cu_au(8, seed=1))            # two subsets: one per rank
    cfg = tmp_path / "aug.yaml"
    cfg.write_text(f"input: {inp}\noutput: {tmp_path / 'aug.h5'}\nmethod: taylor\ncopies: 2\ndelta: 0.02\n")
    rc, out, err, seconds = _run_frozen(tmp_path, ["augment", str(cfg)], "1:augment")
    assert rc != 0 and seconds < 100, (rc, seconds)
    assert "rank 1" in err and "no sign of life" in err and "DISTMLIP_DIST_TIMEOUT=6" in err, err[-2000:]
    assert not (tmp_path / "aug.h5").exists()
    assert list((tmp_path / "aug.h5.shards").glob("subset_*.npz")), "rank 0's finished shard was lost"


def test_06c_frozen_rank_while_the_descriptor_cache_is_built_ends_the_job(tmp_path, data):
    desc = DESC.replace("cache: off", "cache: on")
    cfg = _cfg(tmp_path / "c.yaml", data / "emt.h5", tmp_path / "run", "epochs: 1", desc=desc)
    rc, out, err, seconds = _run_frozen(tmp_path, ["train", str(cfg)], "1:featurize")
    assert rc != 0 and seconds < 100, (rc, seconds)
    assert "no partner within 6 s" in err, err[-2000:]
    assert not (tmp_path / "run" / "model.pt").exists()


def test_06d_frozen_rank_during_convert_ends_the_job_and_leaves_nothing(tmp_path):
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    frames = []
    for k in range(16):
        a = bulk("Cu", "fcc", a=3.61, cubic=True)
        a.rattle(0.05, seed=k)
        a.calc = EMT()
        e, f = a.get_potential_energy(), a.get_forces()
        a.calc = SinglePointCalculator(a, energy=e, forces=f)
        frames.append(a)
    write(tmp_path / "in.extxyz", frames)
    out = tmp_path / "out" / "d.h5"
    rc, _, err, seconds = _run_frozen(tmp_path, ["convert", str(tmp_path / "in.extxyz"), "-o", str(out)],
                                      "1:convert")
    assert rc != 0 and seconds < 100, (rc, seconds)
    assert "rank 1" in err and "no sign of life" in err and str(out) in err, err[-2000:]
    assert not out.exists() and not [p for p in out.parent.iterdir() if "shards" in p.name], \
        list(out.parent.iterdir())


def test_06e_frozen_group_of_a_committee_ends_the_job(tmp_path, data):
    """Committee groups finish hours apart, so their final wait has no deadline: a group whose
    rank stops beating ends it; the finished member is kept."""
    cfg = _cfg(tmp_path / "c.yaml", data / "emt.h5", tmp_path / "run", "epochs: 2")
    cfg.write_text(cfg.read_text() + "committee: {K: 2}\n")          # two groups of one rank
    rc, _, err, seconds = _run_frozen(tmp_path, ["train", str(cfg)], "1:train")
    assert rc != 0 and seconds < 100, (rc, seconds)
    assert "rank 1" in err and "no sign of life" in err and "--resume auto" in err, err[-2000:]
    assert (tmp_path / "run" / "member_00" / "done.json").exists()
    assert not (tmp_path / "run" / "committee.pt").exists()


# ------------------------------------------------------------------------------------------
# 7. the rendezvous listens on no network interface (one node)
# ------------------------------------------------------------------------------------------

def test_07_one_node_job_listens_on_loopback_only(tmp_path):
    script = tmp_path / "listen.py"
    script.write_text('''
import json, os, stat
import torch
from mpi4py import MPI          # MPI's own listeners (Open MPI's TCP transport) exist from here on

def listeners():
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    out = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(name).read().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:          # LISTEN sockets of this process
                out.add(f[1])
    return out

before = listeners()
from distmlip.distributed import init_distributed, shutdown
ctx = init_distributed("cpu")
t = torch.ones(1); ctx.all_reduce_sum(t)
listening = sorted(listeners() - before)       # what the rendezvous and gloo opened
mode = None
if ctx.rendezvous.startswith("file:"):
    d = os.path.dirname(ctx.rendezvous[5:])
    mode = stat.S_IMODE(os.stat(d).st_mode) if os.path.exists(d) else None
print("RESULT", json.dumps({"rank": ctx.rank, "sum": float(t), "rendezvous": ctx.rendezvous,
                            "listening": listening, "mode": mode}), flush=True)
shutdown()
''')
    # the rendezvous and gloo's sockets exist where a torch group is started (GPU jobs; a CPU job
    # under MPI starts none): DISTMLIP_GLOO=1 starts one here
    res = mpirun(2, [str(script)], timeout=120, env={"DISTMLIP_GLOO": "1"})
    import json

    rows = [json.loads(x.split("RESULT ", 1)[1]) for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    assert len(rows) == 2 and all(r["sum"] == 2.0 for r in rows)
    for r in rows:
        assert r["rendezvous"].startswith("file:"), r
        for addr in r["listening"]:
            ip = addr.split(":")[0]
            assert ip in ("0100007F", "00000000000000000000000001000000"), (r["rank"], addr)   # 127.0.0.1, ::1
    rank0 = next(r for r in rows if r["rank"] == 0)
    assert rank0["mode"] in (None, 0o700), rank0


# ------------------------------------------------------------------------------------------
# 8. temporary files of dead writers
# ------------------------------------------------------------------------------------------

def test_08_leftovers_of_dead_writers_are_removed_live_ones_kept(tmp_path, data):
    out = tmp_path / "run"
    out.mkdir()
    host = socket.gethostname().split(".")[0]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [out / f".model.pt.{host}.{dead.pid}.0123abcd.tmp", out / f".data.h5.{host}.{dead.pid}.0badf00d.shards"]
    stale[0].write_bytes(b"half a model")
    stale[1].mkdir()
    (stale[1] / "shard00001.h5").write_bytes(b"x" * 1000)
    live = out / f".other.pt.{host}.{os.getpid()}.feedbeef.tmp"       # this test process is alive
    foreign = out / ".x.pt.otherhost.12345.deadbeef.tmp"
    live.write_bytes(b"in use")
    foreign.write_bytes(b"another node's")
    res = distmlip_cli(["train", str(_cfg(tmp_path / "c.yaml", data / "emt.h5", out, "epochs: 1"))])
    assert "removed 2 temporary file(s) of dead writers" in res.stdout, res.stdout
    assert not any(p.exists() for p in stale)
    assert live.exists() and foreign.exists()


# ------------------------------------------------------------------------------------------
# 9. two jobs, one output folder
# ------------------------------------------------------------------------------------------

def test_09_second_job_on_a_busy_output_folder_is_refused(tmp_path, data):
    out = tmp_path / "run"
    cfg = _cfg(tmp_path / "c.yaml", data / "emt.h5", out, "epochs: 400")
    env = dict(os.environ, PYTHONPATH=str(REPO), DISTMLIP_TEST_SLEEP="0.05", SLURM_JOB_ID="4242")
    first = subprocess.Popen([sys.executable, CLI, "train", str(cfg)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        t_end = time.time() + 60
        while not (out / "log.csv").exists() and time.time() < t_end:
            time.sleep(0.2)
        rows_before = (out / "log.csv").read_text()
        second = distmlip_cli(["train", str(cfg)], check=False)
        text = _no_traceback(second)
        assert second.returncode == 2, text
        assert f"pid {first.pid}" in text and "SLURM_JOB_ID=4242" in text and "in use by another job" in text, text
        assert first.poll() is None                                  # the first job runs on untouched
        assert (out / "log.csv").read_text().startswith(rows_before)
        # the same batch job id (two srun steps of one allocation) does not take over from a
        # live process on this host (both wrote one log.csv before)
        same = subprocess.run([sys.executable, CLI, "train", str(cfg)], env=env, capture_output=True, text=True,
                              timeout=120)
        assert same.returncode == 2 and "in use by another job" in same.stderr, same.stdout + same.stderr
        assert first.poll() is None and (out / "log.csv").read_text().startswith(rows_before)
    finally:
        first.kill()
        first.wait()
    # the holder is gone: the next run takes the folder over and says so
    res = distmlip_cli(["train", str(_cfg(tmp_path / "c2.yaml", data / "emt.h5", out, "epochs: 1"))])
    assert "taking over the lock" in res.stdout and "its process is gone" in res.stdout, res.stdout


# ------------------------------------------------------------------------------------------
# 10. resume with another configuration or rank count
# ------------------------------------------------------------------------------------------

def test_10_resume_refuses_changed_model_and_rank_count_applies_schedule(tmp_path, data, capsys):
    out = tmp_path / "run"
    cfg = _cfg(tmp_path / "c.yaml", data / "emt.h5", out, "epochs: 2")
    mpirun(2, [CLI, "train", str(cfg)], timeout=240)
    ck = str(out / "checkpoint.pt")
    from distmlip.cli import main       # the refusals come before any work: in this process

    for over, expect in ((["model.hidden=[7, 7]", "training.seed=5"], ["model.hidden: [6, 6] -> [7, 7]",
                                                                       "training.seed: 0 -> 5"]),
                         (["training.epochs=3"], ["written by a run on 2 rank(s)"])):
        rc = main(["train", str(cfg), "--resume", ck] + [x for o in over for x in ("--set", o)])
        err = capsys.readouterr().err
        assert rc == 2 and all(e in err for e in expect) and "Traceback" not in err, err
    # a checkpoint of an older version: energy_scale spelled True, no data.batches (its runs
    # formed new batches every epoch): the old spelling is the same setting, the batches are not
    import torch

    st = torch.load(ck, map_location="cpu", weights_only=False)
    st["config"]["model"]["energy_scale"] = True
    st["config"]["data"].pop("batches", None)
    old_ck = str(out / "old_checkpoint.pt")
    torch.save(st, old_ck)
    for over, expect in ((["training.epochs=3"], "data.batches: 'reshuffled' -> 'fixed'"),
                         (["training.epochs=3", "data.batches=reshuffled"], "written by a run on 2 rank(s)")):
        rc = main(["train", str(cfg), "--resume", old_ck] + [x for o in over for x in ("--set", o)])
        err = capsys.readouterr().err
        assert rc == 2 and expect in err and "energy_scale" not in err, err
    res = mpirun(2, [CLI, "train", str(cfg), "--resume", ck, "--set", "training.epochs=3", "--set",
                     "training.lr=0.002"], timeout=240)
    assert "training.epochs changed from 2 to 3 (applied)" in res.stdout
    assert "training.lr changed from 0.01 to 0.002 (applied)" in res.stdout
    last = (out / "log.csv").read_text().splitlines()[-1].split(",")
    assert last[0] == "3" and float(last[2]) == 0.002


# ------------------------------------------------------------------------------------------
# 11. nonsense configuration values
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("section,value,expect", [
    ("training", 'epochs: "5"', "expected an integer"),
    ("training", "epochs: 0", "must be >= 1"),
    ("training", "lr: .nan", "finite"),
    ("training", "lr: 1.0e+300", "must be <= 10"),
    ("training", "checkpoint_every: -1", "must be >= 0"),
    ("training", "batch_atoms: 0", "must be >= 1"),
    ("training", "alpha: 1.5", "must be <= 1"),
    ("model", "hidden: [0]", "must be >= 1"),
    ("descriptor", "n_radial: 0", "n_radial"),
    ("descriptor", "rc_angular: 7.0", "rc_angular"),
])
def test_11_nonsense_config_values_are_refused(tmp_path, data, section, value, expect, capsys):
    base = {"training": f"output: {tmp_path / 'run'}, progress_bar: 'off'", "model": "hidden: [4]",
            "descriptor": "rc_radial: 4.0, n_radial: 4, rc_angular: 3.0, n_angular: 2"}
    base[section] = base[section] + ", " + value if section != "descriptor" else \
        ", ".join(x for x in base[section].split(", ") if x.split(":")[0] != value.split(":")[0]) + ", " + value
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{train: [{data / 'emt.h5'}]}}\n" + "".join(f"{k}: {{{v}}}\n" for k, v in base.items()))
    from distmlip.cli import main       # in this process: the refusal comes before any work

    rc = main(["train", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "model.pt").exists()
