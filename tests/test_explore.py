"""distmlip explore: farthest-point sampling, the selection is the same for a seed and on 1 and 2
ranks (real mpirun), labels from a file continue a waiting iteration, a run killed during
retraining resumes to the same result as an uninterrupted one, and so does a run stopped during
its MD (SIGTERM, on one and two ranks)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from ase.io import read, write

from distmlip.active.explore import farthest_point_sampling
from helpers import REPO, distmlip_cli, mpirun

TRAIN = """
data: {{train: [{data}], fractions: [0.9, 0.1, 0.0]}}
descriptor: {{rc_radial: 4.0, n_radial: 5, rc_angular: 3.0, n_angular: 2, backend: auto}}
model: {{hidden: [8, 8], activation: tanh}}
training: {{mode: force, alpha: 0.3, epochs: {epochs}, lr: 5.0e-3, batch_atoms: 64, output: {out},
           progress_bar: 'off', log_every: 100, ema: 0}}
committee: {{K: 2}}
zbl: {{enabled: false}}
"""

EXPLORE = """
model: {model}
train_config: {train}
structures: [{start}]
output: {out}
iterations: {iterations}
md: {{temperatures: [[600, 1200]], steps: 200, interval: 10, seed: 0}}
uncertainty: {{kind: committee, threshold: 0.3}}
select: {{max_per_iteration: 6}}
retrain: {{training.epochs: {epochs}}}
"""


@pytest.fixture(scope="module")
def committee(tmp_path_factory):
    """A committee of two force-mode models trained on 16 rattled 8-atom EMT Cu cells, no ZBL:
    at 1200 K its MD collapses (pairs below 0.6 x the covalent-radius sum).  Its 20 steps per
    member train the last step's weights (ema: 0): with two validation structures the choice of
    the moving average was a coin toss, and an average of so few steps lags them (its forces were
    half the raw weights', which the label-unit test's guess of the unit depends on)."""
    from ase.build import bulk

    from distmlip.data.examples import _label
    from distmlip.data.h5store import write_dataset

    d = tmp_path_factory.mktemp("explore")
    rng = np.random.default_rng(0)
    data = []
    for k in range(16):
        a = bulk("Cu", "fcc", a=3.61 * rng.uniform(0.99, 1.02), cubic=True).repeat((2, 1, 1))
        a.rattle(0.06, seed=k)
        data.append(_label(a, source="cu8", index=k))
    write_dataset(d / "train.h5", data)
    write(str(d / "start.extxyz"), bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2)))
    (d / "train.yaml").write_text(TRAIN.format(data=d / "train.h5", epochs=10, out=d / "run"))
    distmlip_cli(["train", str(d / "train.yaml")])
    return d


def _explore_cfg(d, name, iterations=1, epochs=10):
    p = d / f"{name}.yaml"
    p.write_text(EXPLORE.format(model=d / "run" / "committee.pt", train=d / "train.yaml", start=d / "start.extxyz",
                                out=d / name, iterations=iterations, epochs=epochs))
    return p


def _candidates(d):
    frames = read(str(d / "iter_001" / "candidates.extxyz"), index=":")
    return frames, json.loads((d / "iter_001" / "selection.json").read_text())


def test_farthest_point_sampling():
    X = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.1, 0.0], [5.0, 5.0]])
    assert farthest_point_sampling(X, 0, 3) == [0, 4, 2]
    assert farthest_point_sampling(X, 0, 10) == [0, 4, 2, 1, 3]
    assert farthest_point_sampling(X, 0, 10, min_distance=0.5) == [0, 4, 2, 1]     # 3 is 0.1 from 0
    # ties go to the lowest index; duplicates are never chosen twice
    assert farthest_point_sampling(np.array([[0.0], [1.0], [-1.0], [1.0]]), 0, 4) == [0, 1, 2]
    assert farthest_point_sampling(np.zeros((0, 2)), 0, 3) == []


def test_selection_same_for_a_seed_and_on_one_and_two_ranks(committee):
    d = committee
    one = distmlip_cli(["explore", str(_explore_cfg(d, "one"))])
    assert "candidates for reference calculations" in one.stdout
    two = mpirun(2, ["-m", "distmlip", "explore", str(_explore_cfg(d, "two"))])
    assert "on 2 rank(s)" in two.stdout
    f1, s1 = _candidates(d / "one")
    f2, s2 = _candidates(d / "two")
    assert s1["selected"] == len(f1) > 0 and s1["chosen"] == s2["chosen"]
    for a, b in zip(f1, f2):
        assert np.array_equal(a.positions, b.positions) and a.info == b.info
    # the two tasks ran on different ranks in the second run, with the same trajectories
    t1 = [json.loads((d / "one" / "iter_001" / "md" / f"task_00{k}.json").read_text()) for k in (0, 1)]
    t2 = [json.loads((d / "two" / "iter_001" / "md" / f"task_00{k}.json").read_text()) for k in (0, 1)]
    assert t1 == t2 and any(t["failed"] > 0 for t in t1)        # the 1200 K run collapses
    # another seed: other trajectories, another selection
    distmlip_cli(["explore", str(_explore_cfg(d, "seed1")), "--set", "md.seed=1"])
    f3, s3 = _candidates(d / "seed1")
    assert s3["chosen"] != s1["chosen"]
    # candidates carry what the DFT user needs to know
    for key in ("uncertainty", "temperature_K", "time_fs", "min_dist", "selected_because"):
        assert key in f1[0].info
    # labels from a file continue the waiting iteration: convert, retrain, next row
    write(str(d / "dft.extxyz"), _emt_labels(f1))
    distmlip_cli(["explore", str(_explore_cfg(d, "one")), "--labelled", str(d / "dft.extxyz")])
    st = json.loads((d / "one" / "state.json").read_text())
    assert st["iteration"] == 1 and st["rows"][0]["updated"] and st["rows"][0]["sampled"] == len(f1)
    assert st["model"].endswith("iter_001/train/committee.pt") and os.path.isfile(st["model"])
    from distmlip.data.h5store import H5Dataset

    assert H5Dataset(d / "one" / "iter_001" / "new.h5").n_structures == len(f1)


def _params(path):
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    return [m["state_dict"] for m in obj["members"]]


def test_killed_iteration_resumes(committee):
    d = committee
    ref = _explore_cfg(d, "ref", iterations=2, epochs=12)
    distmlip_cli(["explore", str(ref), "--label-with", "ase:EMT"])
    cfg = _explore_cfg(d, "killed", iterations=2, epochs=12)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "distmlip", "explore", str(cfg), "--label-with", "ase:EMT"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = d / "killed" / "iter_001" / "train" / "member_00" / "checkpoint.pt"
    t0 = time.time()
    while not ck.is_file() and proc.poll() is None and time.time() - t0 < 240:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL             # killed in the middle of retraining
    assert not (d / "killed" / "iter_001" / "done.json").exists()
    res = distmlip_cli(["explore", str(cfg), "--label-with", "ase:EMT"])
    assert "iter_001/new.h5" not in res.stdout and "iter_002/new.h5" in res.stdout   # iteration 1 reused
    a = json.loads((d / "ref" / "state.json").read_text())
    b = json.loads((d / "killed" / "state.json").read_text())
    strip = [{k: v for k, v in r.items() if k not in ("wall_s", "model", "note")} for r in a["rows"]]
    assert strip == [{k: v for k, v in r.items() if k not in ("wall_s", "model", "note")} for r in b["rows"]]
    assert a["iteration"] == b["iteration"] == 2 and all(r["updated"] for r in a["rows"])
    pa, pb = _params(a["model"]), _params(b["model"])
    for x, y in zip(pa, pb):
        assert all(np.array_equal(x[k].numpy(), y[k].numpy()) for k in x)
    # the labeller's stress of the periodic frames is kept (sweep 8: dropped)
    from distmlip.data.h5store import H5Dataset
    new = H5Dataset(d / "ref" / "iter_001" / "new.h5")
    assert np.asarray(new.column("has_stress"), bool).all()
    # a run that ended on its iteration count continues when the count is raised
    res = distmlip_cli(["explore", str(ref), "--label-with", "ase:EMT", "--set", "iterations=3"])
    assert "continuing after iteration 2" in res.stdout
    assert json.loads((d / "ref" / "state.json").read_text())["iteration"] == 3


def test_gpr_uncertainty_route(committee):
    """One GPR-ANN-like model: the uncertainty is the GPR energy sigma on the start's atom sequence
    (a GPR fitted on the training structures of that sequence), higher for hot frames."""
    from distmlip.data.h5store import H5Dataset

    d = committee
    write(str(d / "start8.extxyz"), H5Dataset(d / "train.h5")[0].to_ase())
    (d / "train1.yaml").write_text((d / "train.yaml").read_text().replace("K: 2", "K: 1"))
    cfg = d / "gpr.yaml"
    cfg.write_text(f"""
model: {d / 'run' / 'member_00' / 'model.pt'}
train_config: {d / 'train1.yaml'}
structures: [{d / 'start8.extxyz'}]
output: {d / 'gpr'}
iterations: 1
md: {{temperatures: [[100, 1500]], steps: 100, interval: 10, seed: 0}}
uncertainty: {{kind: gpr, threshold: 0.05, gpr: {{fit_restarts: 1}}}}
targets: {{flagged_fraction: 1.0, failure_ratio: 1.0}}
""")
    res = distmlip_cli(["explore", str(cfg)])
    assert "uncertainty gpr" in res.stdout and "GPR uncertainty: inverse" not in res.stdout
    t = [json.loads((d / "gpr" / "iter_001" / "md" / f"task_00{k}.json").read_text()) for k in (0, 1)]
    assert t[0]["T"] == 100.0 and t[1]["T"] == 1500.0
    assert 0.0 < t[0]["max_uncertainty"] < t[1]["max_uncertainty"]
    frames = read(str(d / "gpr" / "iter_001" / "md" / "task_001.extxyz"), index=":")
    assert frames[0].info["uncertainty_kind"] == "gpr"
    # targets met (generous): converged at the last rung, nothing selected, model kept
    st = json.loads((d / "gpr" / "state.json").read_text())
    assert st["finished"] == "converged" and st["rows"][0]["updated"] is False


def _explore_until_stopped(cfg, labelled):
    """``distmlip explore CFG [--labelled FILE]`` stopped by SIGTERM once the retraining prints its
    first line; returns its output."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "distmlip", "explore", str(cfg)] + (["--labelled", str(labelled)] if labelled else [])
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, sent = [], False
    for line in proc.stdout:
        lines.append(line)
        if "[member 00]" in line and not sent:
            proc.send_signal(signal.SIGTERM)
            sent = True
    proc.wait(timeout=240)
    return "".join(lines)


def test_stopped_retraining_resumes_and_takes_corrected_labels(committee):
    """Sweep 14: after a stop during the retraining of labels given with --labelled, (a) the command
    the stop message advises ('distmlip explore CONFIG') asked for labels again instead of resuming,
    and (b) --labelled with corrected labels was ignored: new.h5 of the first labels was kept and the
    committee retrained on them.  Corrected labels are converted again and the iteration's retraining
    starts from scratch on them; labels given when no iteration waits for them are refused."""
    import torch
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    from distmlip.data.h5store import H5Dataset

    d = committee
    long = _explore_cfg(d, "relabel", iterations=1, epochs=3000)
    assert "candidates for reference calculations" in distmlip_cli(["explore", str(long)]).stdout
    frames, _ = _candidates(d / "relabel")
    right, wrong = [], []
    for a in frames:
        b = a.copy()
        b.calc = EMT()
        e, f = b.get_potential_energy(), b.get_forces()
        for lst, shift in ((right, 0.0), (wrong, 8.0)):
            c = a.copy()
            c.calc = SinglePointCalculator(c, energy=e + shift, forces=f)
            lst.append(c)
    write(str(d / "right.extxyz"), right)
    write(str(d / "wrong.extxyz"), wrong)
    it = d / "relabel" / "iter_001"
    out = _explore_until_stopped(long, d / "wrong.extxyz")
    assert "stop requested during retraining of iteration 1" in out
    e_wrong = H5Dataset(it / "new.h5").column("energy")
    assert np.allclose(sorted(e_wrong), sorted(a.get_potential_energy() for a in wrong))
    # (a) the advised command resumes the retraining on the labels given (stopped again here)
    out = _explore_until_stopped(long, None)
    assert "candidates for reference calculations" not in out, out
    assert "stop requested during retraining of iteration 1" in out, out
    # the same labels again: resumed too, nothing converted again
    out = _explore_until_stopped(long, d / "wrong.extxyz")
    assert "from scratch" not in out and "stop requested during retraining of iteration 1" in out, out
    # (b) corrected labels: new.h5 is converted again, the retraining starts from scratch on it
    short = _explore_cfg(d, "relabel", iterations=1, epochs=4)
    res = distmlip_cli(["explore", str(short), "--labelled", str(d / "right.extxyz")])
    assert "right.extxyz" in res.stdout and "from scratch" in res.stdout, res.stdout
    new = H5Dataset(it / "new.h5")
    assert np.allclose(sorted(new.column("energy")), sorted(a.get_potential_energy() for a in right))
    assert new.provenance[0]["inputs"] == [str(d / "right.extxyz")]
    st = json.loads((d / "relabel" / "state.json").read_text())
    assert st["iteration"] == 1 and st["rows"][0]["updated"]
    trained_on = H5Dataset([d / "train.h5", it / "new.h5"]).content_id
    for k in range(2):
        ck = torch.load(it / "train" / f"member_{k:02d}" / "checkpoint.pt", map_location="cpu", weights_only=False)
        assert ck["data"]["train"] == trained_on and ck["epoch"] == 4
    # labels when no iteration waits for them: refused (they were ignored without a word)
    res = distmlip_cli(["explore", str(short), "--labelled", str(d / "wrong.extxyz")], check=False)
    assert res.returncode == 2 and "no iteration of" in res.stderr and "is waiting for labels" in res.stderr, res.stderr
    assert "iteration 1 was trained on " + str(d / "right.extxyz") in res.stderr


def _waiting_for_labels(d, name, iterations, epochs, min_frames):
    """An explore run stopped for external labels: (its config, EMT labels of its candidates)."""
    cfg = _explore_cfg(d, name, iterations=iterations, epochs=epochs)
    assert "candidates for reference calculations" in distmlip_cli(["explore", str(cfg)]).stdout
    cand, _ = _candidates(d / name)
    lab = _emt_labels(cand)
    assert len(lab) >= min_frames
    return cfg, lab


def _emt_labels(frames):
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    out = []
    for a in frames:
        b = a.copy()
        b.calc = EMT()
        e, f = b.get_potential_energy(), b.get_forces()
        b.calc = SinglePointCalculator(b, energy=e, forces=f)
        out.append(b)
    return out


def test_labels_must_be_this_iterations_candidates(committee):
    """Sweep 16: --labelled accepted frames that were not the waiting iteration's candidates
    (another iteration's, a foreign frame, another atom count, a frame twice) and the table
    counted the candidates, not the frames trained on.  Each is refused naming file and frame,
    before anything is converted; a subset (order free, wrapped positions) trains on what is
    labelled, warns how many candidates lack labels, and N_samp counts the labelled ones."""
    from ase.build import bulk

    from distmlip.data.h5store import H5Dataset

    d = committee
    cfg, lab = _waiting_for_labels(d, "stale", 2, 4, min_frames=3)
    foreign = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    foreign.rattle(0.3, seed=5)
    small = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    for name, frames, bad in (("extra", lab + _emt_labels([foreign]), len(lab)),
                              ("natoms", lab[:-1] + _emt_labels([small]), len(lab) - 1)):
        write(str(d / f"{name}.extxyz"), frames)
        res = distmlip_cli(["explore", str(cfg), "--labelled", str(d / f"{name}.extxyz")], check=False)
        assert res.returncode == 2, res.stdout + res.stderr
        assert f"{d / f'{name}.extxyz'} frame {bad}" in res.stderr and "is not a candidate of iter_001" in res.stderr
    write(str(d / "twice.extxyz"), lab + lab[:1])
    res = distmlip_cli(["explore", str(cfg), "--labelled", str(d / "twice.extxyz")], check=False)
    assert res.returncode == 2 and f"frame {len(lab)} labels candidate 0" in res.stderr, res.stderr
    assert not (d / "stale" / "iter_001" / "new.h5").exists()
    # all but two, reversed, wrapped into the cell: trained on, two unlabelled named in a warning
    part = lab[2:][::-1]
    for a in part:
        a.positions += a.cell[0]
        a.wrap()
    write(str(d / "part.extxyz"), part)
    res = distmlip_cli(["explore", str(cfg), "--labelled", str(d / "part.extxyz")])
    assert f"2 of the {len(lab)} candidates" in res.stderr, res.stderr
    st = json.loads((d / "stale" / "state.json").read_text())
    assert st["rows"][0]["sampled"] == len(lab) - 2 == H5Dataset(d / "stale" / "iter_001" / "new.h5").n_structures
    assert st["waiting"].endswith("iter_002/candidates.extxyz")
    # iteration 1's labels for iteration 2: refused, iteration 2 not trained
    res = distmlip_cli(["explore", str(cfg), "--labelled", str(d / "part.extxyz")], check=False)
    assert res.returncode == 2 and "frame 0" in res.stderr and "is not a candidate of iter_002" in res.stderr
    assert not (d / "stale" / "iter_002" / "new.h5").exists()


def test_md_tasks_rerun_or_refused_when_settings_changed(committee):
    """Sweep 16: after a stop, task_XXX.json of the waiting iteration were reused when md.steps or
    md.temperatures had changed, and the table showed the new settings over the old trajectories.
    The settings are stored with each task: once the candidates were selected from them, other
    settings are refused (the user's labels of those candidates stay valid); before the selection
    the changed tasks run again and the row reports what ran."""
    d = committee
    cfg = _explore_cfg(d, "chg", iterations=1, epochs=4)
    assert "candidates for reference calculations" in distmlip_cli(["explore", str(cfg)]).stdout
    md = d / "chg" / "iter_001" / "md"
    assert json.loads((md / "task_000.json").read_text())["settings"]["md.steps"] == 200
    res = distmlip_cli(["explore", str(cfg), "--set", "md.steps=100"], check=False)
    assert res.returncode == 2 and f"{md / 'task_000.json'} ran with md.steps 200 (now 100)" in res.stderr, res.stderr
    # a rung with a temperature less: task 0 is the same, but the selection saw task 1 too
    res = distmlip_cli(["explore", str(cfg), "--set", "md.temperatures=[[600]]"], check=False)
    assert res.returncode == 2 and "were selected from the 2 MD task(s)" in res.stderr, res.stderr
    # killed after the MD, before the selection: the tasks run again with the new settings
    (d / "chg" / "iter_001" / "selection.json").unlink()
    (d / "chg" / "iter_001" / "candidates.extxyz").unlink()
    res = distmlip_cli(["explore", str(cfg), "--set", "md.steps=100", "--set", "md.temperatures=[[300]]",
                        "--label-with", "ase:EMT"])
    assert "task 0 ran with md.temperatures 600.0 (now 300.0), md.steps 200 (now 100): running it again" \
        in res.stdout, res.stdout
    t0 = json.loads((md / "task_000.json").read_text())
    assert t0["T"] == 300.0 and t0["settings"]["md.steps"] == 100
    row = json.loads((d / "chg" / "state.json").read_text())["rows"][0]
    assert row["temperatures_K"] == [300.0] and row["ps"] == 0.1 and row["frames"] == t0["frames"]


def test_temperature_ladder_changed_after_a_run(committee):
    """Sweep 16: a rung added after 'converged' was ignored, and a ladder shortened below the rung
    reached ended in an IndexError.  The added rung reopens the run (found by the converged rung's
    temperatures); the shortened ladder is refused naming state.json's rung."""
    d = committee
    cfg = _explore_cfg(d, "rung", iterations=3, epochs=4)
    easy = ["--set", "targets.failure_ratio=1.0", "--set", "targets.flagged_fraction=1.0", "--set", "md.steps=20"]
    distmlip_cli(["explore", str(cfg), "--set", "md.temperatures=[300]"] + easy)
    assert json.loads((d / "rung" / "state.json").read_text())["finished"] == "converged"
    res = distmlip_cli(["explore", str(cfg), "--set", "md.temperatures=[300, 500]"] + easy)
    assert "continuing at rung 2 [500.0] K" in res.stdout, res.stdout
    st = json.loads((d / "rung" / "state.json").read_text())
    assert st["finished"] == "converged" and [r["temperatures_K"] for r in st["rows"]] == [[300.0], [500.0]]
    # shortened below the rung reached (iterations exhausted at rung 2, continued with more iterations)
    distmlip_cli(["explore", str(_explore_cfg(d, "rung3", iterations=1, epochs=4)),
                  "--set", "md.temperatures=[300, 500, 700]"] + easy)
    res = distmlip_cli(["explore", str(d / "rung3.yaml"), "--set", "md.temperatures=[300]", "--iterations", "3"]
                       + easy, check=False)
    assert res.returncode == 2 and "state.json: 'rung' is 1 (counted from 0: the run climbed to rung 2)" in res.stderr and "has only 1 rung(s)" in res.stderr, \
        res.stderr


FLAKY = '''
import os
from ase.calculators.emt import EMT


class Flaky(EMT):
    """EMT that fails on every second frame while FLAKY_FAIL names an existing file, and counts
    its calculations in FLAKY_LOG."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        with open(os.environ["FLAKY_LOG"], "a") as f:
            f.write("call\\n")
        if os.path.exists(os.environ["FLAKY_FAIL"]) and int(abs(atoms.positions[0, 0]) * 1e4) % 2 == 0:
            raise RuntimeError("SCF did not converge")
        super().calculate(atoms, properties, system_changes or ["positions"])
'''


def test_labeller_failing_on_some_frames_keeps_the_others(committee, tmp_path, monkeypatch):
    """A labeller that fails on some candidates (a DFT code whose SCF does not converge): every
    label of the iteration was thrown away and each rerun recomputed them all (sweep 16).  Now the
    error names the failed frames, the others are kept, and the rerun labels only the missing
    ones; the labels equal EMT's."""
    from ase.calculators.emt import EMT

    d = committee
    (tmp_path / "flakycalc.py").write_text(FLAKY)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("FLAKY_LOG", str(tmp_path / "calls.log"))
    monkeypatch.setenv("FLAKY_FAIL", str(tmp_path / "fail"))
    (tmp_path / "fail").write_text("")
    cfg = _explore_cfg(d, "flaky")
    res = distmlip_cli(["explore", str(cfg), "--label-with", "flakycalc:Flaky"], check=False)
    assert res.returncode != 0 and "SCF did not converge" in res.stdout + res.stderr
    msg = res.stdout + res.stderr
    assert "the labels of the other frames are kept" in msg, msg[-2000:]
    frames = read(str(d / "flaky" / "iter_001" / "candidates.extxyz"), index=":")
    first = len((tmp_path / "calls.log").read_text().split())
    kept = len(list((d / "flaky" / "iter_001" / "labels_partial").glob("frame_*.npz")))
    assert 0 < kept < len(frames) and first == len(frames)
    (tmp_path / "fail").unlink()
    distmlip_cli(["explore", str(cfg), "--label-with", "flakycalc:Flaky"])
    again = len((tmp_path / "calls.log").read_text().split()) - first
    assert again == len(frames) - kept                  # only the missing frames were labelled
    lab = read(str(d / "flaky" / "iter_001" / "labelled.extxyz"), index=":")
    for a, b in zip(frames, lab):
        c = a.copy()
        c.calc = EMT()
        assert abs(c.get_potential_energy() - b.get_potential_energy()) < 1e-9
        assert np.allclose(c.get_forces(), b.get_forces(), atol=1e-9)


def test_second_explore_on_a_live_folder_is_refused(committee):
    """Two explore jobs on one folder (sweep 16: the second removed the first's live retraining
    folders): while a live process holds the folder's lock (as a running explore does), explore
    is refused naming it; once that process is gone its lock is taken over and the run goes on."""
    d = committee
    cfg = _explore_cfg(d, "locked")
    (d / "locked").mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from distmlip.utils.io import OutputLock; "
                               "OutputLock(sys.argv[1], what='explore folder').acquire(); print('held', flush=True); "
                               "time.sleep(600)", str(d / "locked")], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = distmlip_cli(["explore", str(cfg), "--label-with", "ase:EMT"], check=False)
        out = res.stdout + res.stderr
        assert res.returncode != 0 and "explore folder" in out and "in use by another job" in out, out[-2000:]
        assert not (d / "locked" / "iter_001").exists()          # nothing was run
    finally:
        holder.kill()
        holder.wait()
    res = distmlip_cli(["explore", str(cfg), "--label-with", "ase:EMT"])
    assert "taking over the lock" in res.stdout + res.stderr
    assert not (d / "locked" / ".distmlip.lock").exists()       # released at the end


def test_labels_in_other_units_than_the_model_are_refused(committee):
    """An iteration's few labels are too few for the data sets' unit check (30 partner pairs), so
    labels in Hartree/Bohr, kcal/mol or with the forces' sign flipped were trained into the next
    model with exit 0.  They are now compared with the predictions of the model that found the
    frames: each slip is refused naming the field and the likely unit, before anything is
    converted; the same labels in eV and eV/A pass (the ratios are logged)."""
    from distmlip.data.validate import BOHR, HARTREE, KCAL_MOL

    d = committee
    cfg, lab = _waiting_for_labels(d, "units", 1, 2, min_frames=5)
    from ase.calculators.singlepoint import SinglePointCalculator

    def relabel(name, e_factor, f_factor):
        out = []
        for a in lab:
            b = a.copy()
            b.calc = SinglePointCalculator(b, energy=a.get_potential_energy() * e_factor,
                                           forces=a.get_forces() * f_factor)
            out.append(b)
        write(str(d / f"{name}.extxyz"), out)
        return d / f"{name}.extxyz"

    # (EMT energies lie near zero: the energy check does not judge them, see the test below)
    for name, ef, ff, field, likely in (("ha_bohr", 1 / HARTREE, BOHR / HARTREE, "forces", "Hartree/Bohr"),
                                        ("sign", 1.0, -1.0, "forces", "wrong sign"),
                                        ("kcal", 1 / KCAL_MOL, 1 / KCAL_MOL, "forces", "kcal/mol")):
        res = distmlip_cli(["explore", str(cfg), "--labelled", str(relabel(name, ef, ff))], check=False)
        assert res.returncode == 2, res.stdout + res.stderr
        assert f"field '{field}'" in res.stderr and likely in res.stderr, res.stderr
        assert not (d / "units" / "iter_001" / "new.h5").exists()
    res = distmlip_cli(["explore", str(cfg), "--labelled", str(relabel("right", 1.0, 1.0))])
    assert "labels / the model's predictions of the same frames: forces" in res.stdout + res.stderr
    assert (d / "units" / "iter_001" / "new.h5").exists()


def test_labels_against_model_finds_each_slip_and_passes_a_rough_model():
    from distmlip.data.validate import (BOHR, ENERGY_LABEL_FACTORS, FORCE_LABEL_FACTORS, HARTREE,
                                        labels_against_model)

    rng = np.random.default_rng(3)
    pred_f = [rng.normal(size=(20, 3)) for _ in range(10)]
    pred_e = [-4.5 * 20 + rng.normal() for _ in range(10)]                 # DFT-like totals, eV
    # a poor model: forces 30 % off and noisy, ten atoms badly wrong, energies 0.4 eV/atom off
    lab_f = [f * 1.3 + rng.normal(scale=0.8, size=f.shape) for f in pred_f]
    lab_f[0][:10] *= 20.0
    lab_e = [e + 0.4 * 20 for e in pred_e]
    preds = [(e, f, 20) for e, f in zip(pred_e, pred_f)]

    def check(ef=1.0, ff=1.0):
        return {u.field: u for u in labels_against_model([(e * ef, f * ff, 20) for e, f in zip(lab_e, lab_f)], preds)}

    u = check()
    assert not any(x.suspect for x in u.values()) and 0.8 < u["forces"].ratio < 1.8, u
    for f, text in FORCE_LABEL_FACTORS:
        x = check(ff=f)["forces"]
        assert x.suspect and x.likely().startswith(text), (f, x)
        assert text in x.describe() and "field 'forces'" in x.describe()
    for f, text in ENERGY_LABEL_FACTORS:
        x = check(ef=f)["energy"]
        assert x.suspect and x.likely().startswith(text), (f, x)
    assert "Hartree/Bohr" in check(ff=BOHR / HARTREE)["forces"].likely()
    # energies near zero (cohesive, EMT) are not judged; five atoms are too few for the forces
    near_zero = [(e / 100.0, f, 20) for e, f in zip(pred_e, pred_f)]
    assert [u.field for u in labels_against_model([(e / HARTREE, f, 20) for e, f, _ in near_zero], near_zero)] == ["forces"]
    few = labels_against_model([(np.nan, pred_f[0][:5] * 0.01, 5)], [(np.nan, pred_f[0][:5], 5)])
    assert len(few) == 1 and not few[0].suspect


SIGTERM_IN_MD = '''
"""distmlip explore with a SIGTERM to this process from inside the MD, as a batch system sends it:
on rank R, in the N-th trajectory the rank runs, at its K-th force call (STOP_AT="R,N,K"); every
force call after it is counted in STOP_LOG."""
import os
import signal
import sys

from distmlip.cli import main
from distmlip.evaluation import mdcheck
from distmlip.utils.launch import placement

RANK, NTH, AFTER = (int(x) for x in os.environ["STOP_AT"].split(","))
_simulate, _seen = mdcheck.simulate, [0]


def simulate(atoms0, calc, *args, **kwargs):
    _seen[0] += 1
    if placement().rank != RANK or _seen[0] != NTH:
        return _simulate(atoms0, calc, *args, **kwargs)
    inner, calls = calc.calculate, [0]

    def calculate(*a, **k):
        calls[0] += 1
        if calls[0] == AFTER:
            os.kill(os.getpid(), signal.SIGTERM)
        elif calls[0] > AFTER:
            with open(os.environ["STOP_LOG"], "a") as f:
                f.write("call\\n")
        return inner(*a, **k)

    calc.calculate = calculate
    try:
        return _simulate(atoms0, calc, *args, **kwargs)
    finally:
        del calc.calculate


mdcheck.simulate = simulate
sys.argv = ["distmlip"] + sys.argv[1:]
sys.exit(main())
'''

# three tasks: rank 0 of two runs 0 (600 K) and 2 (700 K), rank 1 runs 1 (1200 K), which collapses
# early: when task 2 is stopped, rank 1 has been idle for a while
_MD3 = ["--set", "md.temperatures=[[600, 1200, 700]]"]


@pytest.fixture(scope="module")
def md3_reference(committee):
    """The uninterrupted run of the three tasks (iteration 1 then waits for labels)."""
    d = committee
    cfg = _explore_cfg(d, "md3ref")
    distmlip_cli(["explore", str(cfg)] + _MD3)
    return d / "md3ref"


def _same_md_result(ref, out):
    """The MD, the selection and the candidates of iteration 1 of ``out`` are those of ``ref``."""
    a, b = ref / "iter_001", out / "iter_001"
    for k in range(3):
        assert json.loads((a / "md" / f"task_{k:03d}.json").read_text()) == \
            json.loads((b / "md" / f"task_{k:03d}.json").read_text())
        za, zb = np.load(a / "md" / f"task_{k:03d}.npz"), np.load(b / "md" / f"task_{k:03d}.npz")
        assert all(np.array_equal(za[x], zb[x]) for x in ("features", "uncertainty"))
    assert json.loads((a / "selection.json").read_text())["chosen"] == \
        json.loads((b / "selection.json").read_text())["chosen"]
    fa, fb = read(str(a / "candidates.extxyz"), index=":"), read(str(b / "candidates.extxyz"), index=":")
    assert len(fa) == len(fb) > 0
    assert all(np.array_equal(x.positions, y.positions) and x.info == y.info for x, y in zip(fa, fb))


@pytest.mark.parametrize("ranks", [1, 2])
def test_stop_during_md_ends_it_and_the_rerun_completes_it(committee, md3_reference, tmp_path, ranks):
    """A stop during the MD waited until every trajectory of the iteration had ended (a job
    killed after the batch system's grace period).  SIGTERM on rank 0 in the middle of task 2 now
    ends the MD within a stop check's steps on every rank (on two ranks, rank 1, idle, hears of it
    from rank 0): tasks 0 and 1 are kept, task 2 leaves no file, explore says how to continue and
    exits 0; the rerun runs only task 2 and gives the uninterrupted run's MD, selection and
    candidates."""
    d = committee
    cfg = _explore_cfg(d, f"md3stop{ranks}")
    (tmp_path / "sigterm_in_md.py").write_text(SIGTERM_IN_MD)
    # task 2 is rank 0's second trajectory on two ranks, its third on one; SIGTERM at its 20th force call
    env = {"STOP_AT": f"0,{2 if ranks == 2 else 3},20", "STOP_LOG": str(tmp_path / "after.log"),
           "OMP_NUM_THREADS": "1"}
    args = [str(tmp_path / "sigterm_in_md.py"), "explore", str(cfg)] + _MD3
    if ranks == 1:
        e = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
        res = subprocess.run([sys.executable] + args, capture_output=True, text=True, timeout=300, env=e)
    else:
        res = mpirun(2, args, env=env, check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "stop requested during the MD of iteration 1" in res.stdout, out[-3000:]
    from distmlip.active.explore import _MD_STOP_EVERY

    after = len((tmp_path / "after.log").read_text().split())
    assert after <= _MD_STOP_EVERY, f"{after} force calls of task 2 after the SIGTERM"
    md = d / f"md3stop{ranks}" / "iter_001" / "md"
    assert sorted(p.name for p in md.iterdir()) == [f"task_{k:03d}.{x}" for k in (0, 1) for x in ("extxyz", "json", "npz")]
    assert not (md.parent / "selection.json").exists()
    # the command the message advises runs only the task that was stopped
    if ranks == 1:
        res = distmlip_cli(["explore", str(cfg)] + _MD3)
    else:
        res = mpirun(2, ["-m", "distmlip", "explore", str(cfg)] + _MD3)
    assert "iteration 1 task 2:" in res.stdout and "task 0:" not in res.stdout and "task 1:" not in res.stdout, \
        res.stdout
    assert "candidates for reference calculations" in res.stdout
    _same_md_result(md3_reference, d / f"md3stop{ranks}")
