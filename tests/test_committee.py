"""Committees: a 2-member committee trained by 2 rank groups under real mpirun equals the same
members trained one after the other in one process; a committee trained by ONE group of 2 ranks
has member 0 equal to a plain 2-rank run; stop + resume == uninterrupted; committee metrics vs a
direct numpy computation; calculator mean/std vs the members one by one; load_models."""
import numpy as np
import pytest
import torch

from distmlip.data.h5store import H5Dataset
from distmlip.distributed import init_distributed
from distmlip.models.bpnn import BPNN, load_models
from distmlip.training.committee import n_groups, train_committee
from distmlip.training.config import load_train_config
from helpers import REPO, mpirun

RUNS = str(REPO / "tests" / "mpi_scripts" / "committee_runs.py")




def cfg_for(tmp_path, h5, out, epochs=2, extra="committee: {K: 2}"):
    y = tmp_path / f"{out.name}.yaml"
    y.write_text(f"""
data: {{train: [{h5}], fractions: [0.75, 0.25, 0.0], prefetch: false}}
descriptor: {{rc_radial: 4.0, n_radial: 4, rc_angular: 3.0, n_angular: 2, backend: reference, cache: off}}
model: {{hidden: [6, 6]}}
training: {{epochs: {epochs}, batch_atoms: 16, lr: 0.01, optimizer: adam, output: {out},
           progress_bar: 'off', seed: 5}}
{extra}
""")
    return load_train_config(y)


def members(path):
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == "distmlip-committee"
    return [m["state_dict"] for m in obj["members"]]


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def test_group_rule():
    assert n_groups(10, 1) == 1 and n_groups(10, 2) == 2 and n_groups(2, 4) == 2
    assert n_groups(3, 4) == 2 and n_groups(2, 3) == 1 and n_groups(10, 16) == 8 and n_groups(4, 4, 2) == 2


def test_mpi_committee_equals_sequential(tmp_path, emt_h5):
    ctx = init_distributed("cpu")
    status = train_committee(cfg_for(tmp_path, emt_h5, tmp_path / "w1_auto"), ctx, quiet=True)
    assert status == "done"
    mpirun(2, [RUNS, str(emt_h5), str(tmp_path)], timeout=300)
    seq, par = members(tmp_path / "w1_auto" / "committee.pt"), members(tmp_path / "w2_auto" / "committee.pt")
    assert len(seq) == len(par) == 2
    assert max_diff(seq[0], seq[1]) > 1e-3, "members with different seeds must differ"
    for k in range(2):
        d = max_diff(seq[k], par[k])
        assert d < 1e-10, f"member {k}: 2 groups under mpirun vs sequential differ by {d}"
    # one group of two ranks (data parallel inside the group) == a plain 2-rank run for member 0
    one, plain = members(tmp_path / "w2_one" / "committee.pt"), BPNN.load(tmp_path / "w2_plain" / "model.pt")
    d = max_diff(one[0], plain.state_dict())
    assert d < 1e-10, f"group all-reduce differs from the world all-reduce by {d}"
    assert (tmp_path / "w2_auto" / "member_01" / "log.csv").is_file()


def test_resume_after_stop_equals_uninterrupted(tmp_path, emt_h5):
    ctx = init_distributed("cpu")
    ref = tmp_path / "ref"
    train_committee(cfg_for(tmp_path, emt_h5, ref, extra="committee: {K: 2, bootstrap: true}"), ctx, quiet=True)
    run = tmp_path / "run"
    cfg = cfg_for(tmp_path, emt_h5, run, extra="committee: {K: 2, bootstrap: true}")
    # stop member 1 in the middle of its first epoch
    st = train_committee(cfg, ctx, quiet=True, step_callback=lambda tr, k: k == 1 and tr.global_step == 2)
    assert st == "stopped" and not (run / "committee.pt").exists()
    assert (run / "member_00" / "done.json").is_file() and (run / "member_01" / "checkpoint.pt").is_file()
    st = train_committee(cfg_for(tmp_path, emt_h5, run, extra="committee: {K: 2, bootstrap: true}"), ctx,
                         resume=True, quiet=True)
    assert st == "done"
    a, b = members(ref / "committee.pt"), members(run / "committee.pt")
    for k in range(2):
        assert max_diff(a[k], b[k]) == 0.0, f"member {k}: resumed != uninterrupted"
    # bootstrap: members see different resamples
    assert max_diff(a[0], a[1]) > 1e-3


@pytest.fixture(scope="module")
def committee_file(tmp_path_factory, emt_h5):
    tmp = tmp_path_factory.mktemp("cfile")
    out = tmp / "c3"
    train_committee(cfg_for(tmp, emt_h5, out, epochs=1, extra="committee: {K: 3}"), init_distributed("cpu"),
                    quiet=True)
    return out / "committee.pt"


def angles(a, b):
    out = []
    for x, y in zip(a, b):
        c = np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y))
        out.append(np.degrees(np.arccos(min(1.0, max(-1.0, c)))))
    return np.array(out)


def test_committee_and_single_run_in_one_folder_keep_each_others_files_apart(tmp_path, emt_h5):
    """A committee trained into a folder that held a single run left that run's model.pt,
    checkpoint.pt and log.csv beside committee.pt, under the committee's config.yaml (a model
    file and a config that do not belong together); a single run into a committee's folder left
    committee.pt and member_XX/ beside its model.pt; a committee of K = 2 into one of K = 3 left
    member_02/ (sweep 20).  The earlier run's files now move to previous-<time>/."""
    from distmlip.training.trainer import Trainer

    out = tmp_path / "run"
    ctx = init_distributed("cpu")
    single = cfg_for(tmp_path, emt_h5, out, epochs=1, extra="")
    Trainer(single, quiet=True).fit()
    assert train_committee(cfg_for(tmp_path, emt_h5, out, epochs=1, extra="committee: {K: 3}"), ctx, quiet=True) == "done"
    top = sorted(p.name for p in out.iterdir() if not p.name.startswith("previous-"))
    assert top == ["committee.json", "committee.pt", "config.yaml", "member_00", "member_01", "member_02"], top
    prev = sorted(out.glob("previous-*"))
    assert len(prev) == 1 and (prev[0] / "model.pt").is_file() and (prev[0] / "checkpoint.pt").is_file()
    assert train_committee(cfg_for(tmp_path, emt_h5, out, epochs=1), ctx, quiet=True) == "done"
    top = sorted(p.name for p in out.iterdir() if not p.name.startswith("previous-"))
    assert top == ["committee.json", "committee.pt", "config.yaml", "member_00", "member_01"], top
    assert len(members(out / "committee.pt")) == 2
    Trainer(single, quiet=True).fit()
    top = sorted(p.name for p in out.iterdir() if not p.name.startswith("previous-"))
    assert top == ["best_model.pt", "checkpoint.pt", "config.yaml", "last_model.pt", "log.csv", "model.pt"], top
    last = sorted(out.glob("previous-*"), key=lambda p: p.stat().st_mtime)[-1]
    assert (last / "committee.pt").is_file() and (last / "member_00" / "model.pt").is_file()


def test_committee_metrics_vs_numpy(committee_file, emt_h5, tmp_path):
    from distmlip.evaluation.evaluate import evaluate, load_models as eval_load

    ms = eval_load(str(committee_file))
    assert len(ms) == 3 and len(load_models(committee_file)) == 3
    ds = H5Dataset(emt_h5)
    res = evaluate(ms, ds, output=tmp_path / "ev", plots=False)
    m = res["metrics"]["overall"]
    # direct numpy: each member on each structure
    structs = ds.read(np.arange(ds.n_structures))
    from ase import Atoms

    from distmlip.calculator import DistmlipCalculator

    calcs = [DistmlipCalculator(mm) for mm in ms]
    E = np.zeros((3, len(structs)))
    F = []
    for s_i, st in enumerate(structs):
        at = Atoms(numbers=st.numbers, positions=st.positions, cell=st.cell, pbc=st.pbc)
        fs = []
        for k, c in enumerate(calcs):
            at.calc = c
            E[k, s_i] = at.get_potential_energy()
            fs.append(at.get_forces())
        F.append(np.stack(fs))
    F = np.concatenate(F, axis=1)                       # [K, N, 3]
    Fref = np.concatenate([st.forces for st in structs])
    Eref = np.array([st.energy for st in structs])
    nat = np.array([len(st.numbers) for st in structs])
    Em = E.mean(0)
    sdE = np.array([np.sqrt(np.sum((E[:, s] - Em[s]) ** 2) / 2) for s in range(len(Em))])
    assert m["E_mae_meV_struct"] == pytest.approx(1e3 * np.mean(np.abs(Em - Eref)), rel=1e-9)
    assert m["E_msd_meV_struct"] == pytest.approx(1e3 * np.mean(sdE), rel=1e-9)
    assert m["E_msd_meV_atom"] == pytest.approx(1e3 * np.mean(sdE / nat), rel=1e-9)
    Fm = F.mean(0)
    mag = np.linalg.norm(F, axis=2)
    assert m["F_magnitude_mae"] == pytest.approx(np.mean(np.abs(np.linalg.norm(Fm, axis=1)
                                                                - np.linalg.norm(Fref, axis=1))), rel=1e-8)
    assert m["F_magnitude_msd"] == pytest.approx(np.mean([np.std(mag[:, i], ddof=1) for i in range(mag.shape[1])]),
                                                 rel=1e-8)
    assert m["F_direction_deg"] == pytest.approx(np.mean(angles(Fm, Fref)), rel=1e-7)
    th = np.stack([angles(F[k], Fref) for k in range(3)])
    assert m["F_direction_msd_deg"] == pytest.approx(np.mean(np.std(th, axis=0, ddof=1)), rel=1e-7)
    import json

    js = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert js["K"] == 3 and "F_direction_msd_deg" in js["metrics"]["overall"]
    from distmlip.evaluation.evaluate import format_table

    assert "angle MSD deg" in format_table(res["metrics"])


def test_calculator_committee_std(committee_file):
    from ase.build import bulk

    from distmlip.calculator import DistmlipCalculator

    a = bulk("Cu", "fcc", a=3.61, cubic=True)
    a.symbols[0] = "Au"
    a.rattle(0.05, seed=3)
    c = DistmlipCalculator(str(committee_file))
    assert c.K == 3
    a.calc = c
    e = a.get_potential_energy()
    f = a.get_forces()
    Es, Fs = [], []
    for m in load_models(committee_file):
        b = a.copy()
        b.calc = DistmlipCalculator(m)
        Es.append(b.get_potential_energy())
        Fs.append(b.get_forces())
    Es, Fs = np.array(Es), np.stack(Fs)
    assert e == pytest.approx(Es.mean(), abs=1e-12)
    np.testing.assert_allclose(f, Fs.mean(0), atol=1e-12)
    assert c.results["energy_std"] == pytest.approx(np.std(Es, ddof=1), rel=1e-10)
    assert c.results["energy_std"] > 0
    np.testing.assert_allclose(c.results["forces_std"], Fs.std(0, ddof=1), rtol=1e-9, atol=1e-14)
    assert c.results["forces_std"].shape == (len(a), 3)
