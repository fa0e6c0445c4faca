"""distmlip md-check: verdicts from every sign of failure and the exit status.

A committee of two small models on a Cu cell (stable over a few steps; minimum distances against
ASE's brute-force distances); a model built to collapse (its energy falls as atoms approach);
EMT itself as the reference (stable); every criterion of ``judge`` on constructed trajectories;
a stop request (SIGTERM, Ctrl-C) in the middle of the MD (1 and 2 ranks)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.io import read, write

from distmlip.cli import main
from distmlip.evaluation.mdcheck import EXIT_UNSTABLE, Criteria, judge, summary_line, verdict_of
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


def collapsing_model(path, k=3.0):
    """E_i = -k sum_j fc(r_ij): every approach lowers the energy, nothing repels (what a potential
    trained without short-range data can look like), so atoms fall onto each other."""
    m = BPNN(["Cu"], {**DESC, "backend": "auto"}, [1], "linear")
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.ann.nets[0][0].weight[0, 0] = 1.0       # radial T_0 = sum_j fc(r_ij)
        m.ann.nets[0][-1].weight[0, 0] = -k
    m.save(path)
    return str(path)


def _start(tmp_path, name="start.extxyz", repeat=1):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((repeat, repeat, repeat))
    atoms.rattle(0.05, seed=0)
    s = tmp_path / name
    write(str(s), atoms)
    return s


def test_md_check_committee_stable_and_columns(tmp_path, capsys):
    models = _models(tmp_path)
    s = _start(tmp_path)
    out = tmp_path / "out"
    assert main(["md-check", *models, str(s), "-T", "300", "900", "--steps", "10", "--interval", "5",
                 "--timestep", "1", "--nve-steps", "5", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    summ = json.loads((out / "summary.json").read_text())
    assert summ["committee_size"] == 2 and len(summ["runs"]) == 2 and summ["all_stable"]
    atoms = read(str(s))    # positions as stored in the file
    d_ref = atoms.get_all_distances(mic=True)[np.triu_indices(len(atoms), 1)].min()
    for r in summ["runs"]:
        assert r["frames"] == 3 and r["verdict"] == "stable" and r["events"] == []
        np.testing.assert_allclose(r["min_dist_first_A"], d_ref, rtol=1e-12)
        assert r["failed_frames"] == 0 and r["failure_ratio"] == 0.0     # 0.6 x 2.64 A = 1.58 A
        assert r["max_force_deviation"] > 0.0                           # two different members
        assert r["nve_drift_eV_atom"] is not None
        assert (out / f"pdf_T{r['temperature_K']:g}.png").stat().st_size > 1000
    assert "max dF (eV/A)" in text                                       # committee: deviation column
    assert "md-check result: stable (2 runs: 2 stable, 0 unstable, 0 aborted)" in text
    # one model: no deviation column, no deviation figure
    out1 = tmp_path / "out1"
    assert main(["md-check", models[0], str(s), "-T", "300", "--steps", "10", "--interval", "5",
                 "--nve-steps", "0", "-o", str(out1)]) == 0
    text = capsys.readouterr().out
    assert "max dF" not in text
    assert json.loads((out1 / "summary.json").read_text())["runs"][0]["max_force_deviation"] is None


def test_md_check_every_frame_fails_is_unstable_and_exits_nonzero(tmp_path, capsys):
    models = _models(tmp_path)
    s = _start(tmp_path)
    out = tmp_path / "out2"
    # a threshold above the nearest-neighbour distance: every frame fails and is written out
    args = ["md-check", models[0], str(s), "-T", "300", "--steps", "10", "--interval", "5",
            "--nve-steps", "0", "--threshold-factor", "1.2", "-o", str(out)]
    assert main(args) == EXIT_UNSTABLE
    text = capsys.readouterr().out
    r = json.loads((out / "summary.json").read_text())["runs"][0]
    assert r["failed_frames"] == r["frames"] == 3 and r["failure_ratio"] == 1.0
    assert r["verdict"].startswith("unstable: close pairs, first at 0 fs, Cu-Cu ")
    assert "failure ratio 1.000" in r["verdict"]
    assert "md-check result: unstable (1 runs: 0 stable, 1 unstable, 0 aborted; first: T=300 K close pairs at 0 fs)" in text
    # the table line of the run carries the verdict, never "ok"
    table = text.split("fail ratio")[1].splitlines()[1:4]
    assert not any(" ok" in line for line in table)
    frames = read(r["failed_frames_file"], index=":")
    assert len(frames) == 3 and frames[0].info["md_step"] == 0
    # --report-only: the same verdict, exit 0
    assert main(args + ["--report-only"]) == 0
    # bad input: unknown element, missing file
    au = tmp_path / "au.xyz"
    write(str(au), bulk("Au", "fcc", a=4.08))
    assert main(["md-check", models[0], str(au), "--steps", "1", "-o", str(tmp_path / "x")]) == 2
    assert main(["md-check", models[0], str(tmp_path / "nope.xyz"), "-o", str(tmp_path / "x")]) == 2


def test_md_check_collapsing_model_and_emt_reference(tmp_path, capsys):
    """The model that collapses is unstable (its temperature runs away within the thermostat's
    warm-up, then pairs close) and md-check exits non-zero; EMT on the same start is
    stable and exits 0."""
    s = _start(tmp_path, repeat=2)                     # 32 atoms
    bad = collapsing_model(tmp_path / "collapse.pt")
    out = tmp_path / "collapse"
    rc = main(["md-check", bad, str(s), "-T", "300", "--steps", "300", "--interval", "10",
               "--nve-steps", "50", "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == EXIT_UNSTABLE
    r = json.loads((out / "summary.json").read_text())["runs"][0]
    crits = [e["criterion"] for e in r["events"]]
    assert r["verdict"].startswith("unstable: temperature") and "close pairs" in crits, r["verdict"]
    assert "before the thermostat's warm-up" in r["verdict"]
    assert r["failure_ratio"] > 0.3 and r["min_dist_A"] < 0.8 and r["final_T_K"] > 1000
    assert "md-check result: unstable" in text
    # EMT, the potential the data would come from: stable, also against an EMT training record
    from distmlip.data.examples import rattled_cu_au
    from distmlip.data.h5store import write_dataset

    h5 = tmp_path / "emt.h5"
    write_dataset(h5, [x for x in rattled_cu_au(12) if 79 not in x.numbers])
    out = tmp_path / "emt"
    rc = main(["md-check", "ase:EMT", str(s), "-T", "300", "--steps", "300", "--interval", "10",
               "--nve-steps", "50", "--training-data", str(h5), "-o", str(out)])
    text = capsys.readouterr().out
    r = json.loads((out / "summary.json").read_text())["runs"][0]
    assert rc == 0 and r["verdict"] == "stable", r["verdict"]
    assert r["training_epot_min_eV_atom"] is not None and r["min_dist_A"] > 2.0
    assert "md-check result: stable (1 runs" in text


def test_energy_below_training_flags_a_run(tmp_path, capsys):
    """EMT on a record whose lowest energy is 1 eV/atom above EMT's: unstable, 'energy below training'.
    A start of a composition the record lacks cannot be judged so: said, not skipped silently."""
    from distmlip.data.examples import rattled_cu_au
    from distmlip.data.h5store import write_dataset

    data = [x for x in rattled_cu_au(6) if 79 not in x.numbers]
    for x in data:
        x.energy += 1.0 * len(x.numbers)
    h5 = tmp_path / "shifted.h5"
    write_dataset(h5, data)
    s = _start(tmp_path)
    out = tmp_path / "e"
    assert main(["md-check", "ase:EMT", str(s), "-T", "300", "--steps", "20", "--interval", "10",
                 "--nve-steps", "0", "--training-data", str(h5), "-o", str(out)]) == EXIT_UNSTABLE
    r = json.loads((out / "summary.json").read_text())["runs"][0]
    assert r["verdict"].startswith("unstable: energy below training, first at 0 fs"), r["verdict"]
    assert "criterion is not applied" not in capsys.readouterr().err
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.numbers[0] = 79
    write(str(tmp_path / "aucu3.extxyz"), atoms)
    main(["md-check", "ase:EMT", str(tmp_path / "aucu3.extxyz"), "-T", "300", "--steps", "20", "--interval", "10",
          "--nve-steps", "0", "--training-data", str(h5), "-o", str(tmp_path / "e2")])
    err = capsys.readouterr().err
    assert "no structure of the start's composition AuCu3" in err and "criterion is not applied" in err
    r = json.loads((tmp_path / "e2" / "summary.json").read_text())["runs"][0]
    assert r["training_epot_min_eV_atom"] is None and "energy below training" not in r["verdict"]


def _traj(T=300.0, temps=None, epot=None, fdev=None, n=30, dt=10.0, gpr=None):
    t = np.arange(n) * dt
    return {"step": list(range(n)), "t_fs": list(t), "min_dist": [2.5] * n, "failed": [False] * n,
            "worst": [("Cu-Cu", 2.5, 1.58)] * n, "epot": list(epot if epot is not None else [-3.0] * n),
            "etot": [-3.0] * n, "temp": list(temps if temps is not None else [T] * n),
            "fdev": list(fdev if fdev is not None else [0.0] * n), "gpr_sigma": list(gpr or [None] * n),
            "below": [{}] * n, "n_missing": 0, "steps_done": n - 1, "timestep_fs": 1.0, "aborted": False,
            "abort_reason": None, "abort_t_fs": None}


def test_judge_each_criterion():
    c = Criteria()
    # a quiet run: nothing
    assert judge(_traj(), 300.0, 32, 0.02, c) == []
    # heating: windowed mean leaves 300 +- 150 K after the warm-up (150 fs) + window (100 fs)
    temps = [300.0] * 20 + [900.0] * 10
    ev = judge(_traj(temps=temps), 300.0, 32, 0.02, c)
    assert [e["criterion"] for e in ev] == ["temperature"] and 200.0 <= ev[0]["t_fs"] <= 290.0
    # the same excursion in a 4-atom system is within its natural fluctuation (3 sqrt(2/12) = 1.22)
    assert judge(_traj(temps=[300.0] * 20 + [600.0] * 10), 300.0, 4, 0.02, c) == []
    # before the warm-up nothing is judged, but a runaway (10 x T) is
    assert judge(_traj(temps=[900.0] * 20, n=20), 300.0, 32, 0.02, c) == []
    ev = judge(_traj(temps=[300.0] * 5 + [185000.0] * 15, n=20), 300.0, 32, 0.02, c)
    assert [e["criterion"] for e in ev] == ["temperature"] and ev[0]["t_fs"] == 50.0
    assert "185000 K, a runaway (above 10 x 300 K and 300 + 3000 K) before the thermostat's warm-up" in ev[0]["detail"]
    # a cold run's warm-up from an unrelaxed start: 10 x T but not T + 3000 K
    assert judge(_traj(T=10.0, temps=[10.0] * 5 + [400.0] * 15, n=20), 10.0, 32, 0.02, c) == []
    assert judge(_traj(temps=[900.0] * 30), 300.0, 32, 0.02, c) != []
    assert judge(_traj(temps=[900.0] * 24, n=24), 300.0, 32, 0.002, c) == []   # warm-up 1500 fs
    # energy below the training minimum by more than the margin
    ep = [-3.0] * 10 + [-3.2] * 20
    ev = judge(_traj(epot=ep), 300.0, 32, 0.02, c, emin=-3.05)
    assert [e["criterion"] for e in ev] == ["energy below training"] and ev[0]["t_fs"] == 100.0
    assert judge(_traj(epot=ep), 300.0, 32, 0.02, c, emin=-3.15) == []
    # pairs far below the training data's shortest distance of their element pair (a flat,
    # under-trained model lets atoms collapse: Cu-Cu 1.958 A against 2.385 A, 0.82 x, measured)
    below = [{}] * 3 + [{"Cu-Cu": 2.20}] * 3 + [{"Cu-Cu": 1.958, "C-O": 1.0}] + [{}] * 23
    tr = _traj(); tr["below"] = below
    pm = {"Cu-Cu": 2.385, "C-O": 1.079}
    ev = judge(tr, 300.0, 32, 0.02, c, pair_min=pm)
    assert [e["criterion"] for e in ev] == ["beyond training"] and ev[0]["t_fs"] == 60.0
    assert "Cu-Cu 1.958 A = 0.821 x" in ev[0]["detail"]
    assert judge(tr, 300.0, 32, 0.02, c) == []                                     # no record: off
    assert judge(tr, 300.0, 32, 0.02, Criteria(extrapolation_factor=0.8), pair_min=pm) == []
    assert judge(tr, 300.0, 32, 0.02, Criteria(extrapolation_factor=0.0), pair_min=pm) == []
    # committee deviation only counts for committees
    fd = [0.1] * 5 + [0.8] * 25
    assert judge(_traj(fdev=fd), 300.0, 32, 0.02, c) == []
    ev = judge(_traj(fdev=fd), 300.0, 32, 0.02, c, committee=True)
    assert [e["criterion"] for e in ev] == ["committee deviation"] and ev[0]["t_fs"] == 50.0
    # GPR sigma
    ev = judge(_traj(gpr=[0.01] * 7 + [0.3] * 23), 300.0, 32, 0.02, c)
    assert [e["criterion"] for e in ev] == ["GPR sigma"] and ev[0]["t_fs"] == 70.0
    # NVE drift: time counted from the end of the NVT run
    nve = np.array([-3.0, -3.0, -2.995, -2.98, -2.97])
    ev = judge(_traj(), 300.0, 32, 0.02, c, nve=nve)
    assert [e["criterion"] for e in ev] == ["NVE drift"] and ev[0]["t_fs"] == 29.0 + 3.0
    assert judge(_traj(), 300.0, 32, 0.02, c, nve=nve[:3]) == []
    # the verdict names the first event and lists the others; aborted runs say so
    tr = _traj(temps=temps, epot=ep)
    ev = judge(tr, 300.0, 32, 0.02, c, emin=-3.05)
    v = verdict_of(ev, tr)
    assert v.startswith("unstable: energy below training, first at 100 fs") and v.endswith("(also: temperature)")
    tr["aborted"], tr["abort_reason"], tr["abort_t_fs"] = True, "non-finite energy", 290.0
    assert verdict_of(ev, tr).startswith("aborted: non-finite energy at 290 fs (before: energy below training")
    runs = [{"temperature_K": 300.0, "aborted": False, "stable": True, "events": [], "verdict": "stable"},
            {"temperature_K": 900.0, "aborted": True, "stable": False, "events": ev, "verdict": verdict_of(ev, tr)}]
    assert summary_line(runs) == ("md-check result: aborted (2 runs: 1 stable, 0 unstable, 1 aborted; "
                                  "first: T=900 K aborted: non-finite energy at 290 fs)")


@pytest.mark.parametrize("spec,ok", [("ase:EMT", True), ("ase:NoSuchCalc", False),
                                     ("ase.calculators.lj:LennardJones", True), ("math:nope", False)])
def test_calculator_names(spec, ok):
    from distmlip.errors import ConfigError
    from distmlip.evaluation.labelling import is_calculator_name, make_calculator

    assert is_calculator_name(spec)
    assert not is_calculator_name("run/model.pt") and not is_calculator_name("model.pt")
    if ok:
        assert hasattr(make_calculator(spec), "get_potential_energy")
    else:
        with pytest.raises(ConfigError):
            make_calculator(spec)


def test_md_check_npt(tmp_path, capsys):
    """--ensemble npt: EMT (which gives a stress) and a committee of models (their stress from the
    calculator) run MTK NPT; the volume moves and is recorded; a cell that collapses under a
    large pressure is unstable on the cell-volume criterion; a molecule is refused."""
    s = _start(tmp_path, repeat=2)
    out = tmp_path / "npt"
    assert main(["md-check", "ase:EMT", str(s), "-T", "300", "--steps", "200", "--interval", "10",
                 "--nve-steps", "0", "--ensemble", "npt", "--barostat-time", "100", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    summ = json.loads((out / "summary.json").read_text())
    r = summ["runs"][0]
    assert summ["ensemble"]["kind"] == "npt" and r["ensemble"] == "npt" and r["verdict"] == "stable"
    lo, hi = r["volume_ratio_range"]
    assert lo < 1.0 - 1e-4 and hi < 1.05          # EMT's cell (a 3.59 A) is smaller than the start's (3.61)
    assert "npt at 0 GPa" in text and "V/V0" in text
    # 30 GPa on EMT copper squeezes the cell beyond 5 %: the cell-volume criterion fires
    out = tmp_path / "npt_squeeze"
    rc = main(["md-check", "ase:EMT", str(s), "-T", "300", "--steps", "200", "--interval", "10",
               "--nve-steps", "0", "--ensemble", "npt-cell", "--pressure", "30", "--barostat-time", "50",
               "--max-volume-change", "0.05", "-o", str(out)])
    r = json.loads((out / "summary.json").read_text())["runs"][0]
    assert rc == EXIT_UNSTABLE and r["verdict"].startswith("unstable: cell volume"), r["verdict"]
    # the models' stress drives the barostat (a committee of two)
    models = _models(tmp_path)
    out = tmp_path / "npt_models"
    assert main(["md-check", *models, str(s), "-T", "300", "--steps", "10", "--interval", "5", "--nve-steps", "0",
                 "--ensemble", "npt", "--barostat-time", "50", "--report-only", "-o", str(out)]) == 0
    r = json.loads((out / "summary.json").read_text())["runs"][0]
    assert r["volume_ratio_range"][0] != r["volume_ratio_range"][1]
    # no periodic cell: refused with exit 2
    from ase.build import molecule

    mol = tmp_path / "mol.xyz"
    write(str(mol), molecule("H2O"))
    assert main(["md-check", "ase:EMT", str(mol), "--ensemble", "npt", "--steps", "1", "-o", str(tmp_path / "x")]) == 2
    assert "periodic in all three directions" in capsys.readouterr().err


def test_judge_cell_volume():
    c = Criteria(max_volume_change=0.2)
    tr = _traj()
    tr["volume"] = [100.0] * 10 + [70.0] * 20
    assert judge(tr, 300.0, 32, 0.02, c) == []          # NVT trajectories are not judged on volume
    tr["ensemble"] = "npt"
    ev = judge(tr, 300.0, 32, 0.02, c)
    assert [e["criterion"] for e in ev] == ["cell volume"] and ev[0]["t_fs"] == 100.0
    assert "V/V0 = 0.700" in ev[0]["detail"]


def test_one_atom_is_refused_and_result_files_are_strict_json(tmp_path, capsys):
    """A 1-atom cell 'aborted: non-finite energy' (its temperature is 0 / 0 once the centre of
    mass is fixed) and summary.json held bare NaN, which strict JSON readers reject (sweep 7)."""
    models = _models(tmp_path)
    one = tmp_path / "one.extxyz"
    write(str(one), bulk("Cu", "fcc", a=3.61))
    assert main(["md-check", models[0], str(one), "--steps", "2", "-o", str(tmp_path / "o1")]) == 2
    assert "has 1 atom(s); MD with the centre of mass fixed needs at least 2" in capsys.readouterr().err
    from distmlip.utils.io import json_text

    text = json_text({"a": float("nan"), "b": [1.0, float("inf")], "c": np.float64("nan"), "d": np.arange(2)})

    def strict(name):
        raise ValueError(name)
    assert json.loads(text, parse_constant=strict) == {"a": None, "b": [1.0, None], "c": None, "d": [0, 1]}


def test_pdf_independent_of_cell_size():
    """md-check's g(r) of one perfect fcc crystal in 4-, 32- and 256-atom cells: the same curve,
    and coordination numbers 12, 6, 24 of the first three shells (a 4-atom cell gave 16, 16, 32:
    an atom's images of itself counted twice and like pairs normalised by na (na - 1) / 2)."""
    from ase.build import bulk

    from distmlip.evaluation.mdcheck import PDFAccumulator, frame_distances

    curves = []
    for rep in ((1, 1, 1), (2, 2, 2), (4, 4, 4)):
        a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(rep)
        acc = PDFAccumulator(a.numbers, 4.6, nbins=23)
        acc.add(a, *frame_distances(a, 4.6))
        r, g, periodic = acc.curves()
        assert periodic
        cn = g[(29, 29)] * 4 * np.pi * r ** 2 * np.diff(acc.edges) * len(a) / a.get_volume()
        assert np.round(cn[cn > 0], 6).tolist() == [12.0, 6.0, 24.0]
        curves.append(g[(29, 29)])
    np.testing.assert_allclose(curves[0], curves[2], rtol=1e-12)
    np.testing.assert_allclose(curves[1], curves[2], rtol=1e-12)


SIGNAL_IN_MD = '''
"""distmlip md-check with a signal to this process from inside the MD, as a batch system (or a
terminal) sends it: in the N-th run (temperature), at its K-th force call (SIGNAL_AT="SIG,N,K");
every force call after it is counted in SIGNAL_LOG."""
import os
import signal
import sys

from distmlip.cli import main
from distmlip.evaluation import mdcheck

NAME, NTH, AFTER = os.environ["SIGNAL_AT"].split(",")
NTH, AFTER = int(NTH), int(AFTER)
# Ctrl-C as in a terminal, also in a process started in the background (SIGINT ignored there)
signal.signal(signal.SIGINT, signal.default_int_handler)
_simulate, _seen = mdcheck.simulate, [0]


def simulate(atoms0, calc, *args, **kwargs):
    _seen[0] += 1
    if _seen[0] == NTH:      # the calculator stays wrapped: later runs' force calls count too
        inner, calls = calc.calculate, [0]

        def calculate(*a, **k):
            calls[0] += 1
            if calls[0] == AFTER:
                os.kill(os.getpid(), getattr(signal, NAME))
            elif calls[0] > AFTER:
                with open(os.environ["SIGNAL_LOG"], "a") as f:
                    f.write("call\\n")
            return inner(*a, **k)

        calc.calculate = calculate
    return _simulate(atoms0, calc, *args, **kwargs)


mdcheck.simulate = simulate
sys.argv = ["distmlip"] + sys.argv[1:]
sys.exit(main())
'''


@pytest.mark.parametrize("ranks,sig", [(1, "SIGTERM"), (2, "SIGTERM"), (1, "SIGINT")])
def test_stop_during_md_reports_the_finished_runs_and_exits_nonzero(tmp_path, ranks, sig):
    """md-check ignored stop requests: SIGTERM (what a batch system sends before its time limit)
    killed it at once (exit -15) and the verdicts of the runs already finished were lost.  A
    signal in the middle of the second of three runs now ends the MD within a step: summary.json
    and the table hold the first run's verdict, the second marked interrupted (never stable), the
    third not run; the summary line says 'interrupted', a message says what happened and how to
    continue, and the exit status is 128 + the signal (143; 130 for Ctrl-C), with --report-only
    too (2 ranks: md-check runs on rank 0 only, mpirun passes the status on)."""
    from helpers import REPO, mpirun

    models = _models(tmp_path)
    s = _start(tmp_path)
    out = tmp_path / "out"
    (tmp_path / "signal_in_md.py").write_text(SIGNAL_IN_MD)
    env = {"SIGNAL_AT": f"{sig},2,20", "SIGNAL_LOG": str(tmp_path / "after.log"), "OMP_NUM_THREADS": "1"}
    args = [str(tmp_path / "signal_in_md.py"), "md-check", models[0], str(s), "-T", "300", "900", "1500",
            "--steps", "60", "--interval", "10", "--nve-steps", "10", "-o", str(out)]
    if ranks == 1:
        e = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
        res = subprocess.run([sys.executable] + args, capture_output=True, text=True, timeout=300, env=e)
    else:
        res = mpirun(2, args + ["--report-only"], env=env, check=False)
    text = res.stdout + res.stderr
    assert res.returncode == (143 if sig == "SIGTERM" else 130), text[-3000:]
    after = (tmp_path / "after.log").read_text().split() if (tmp_path / "after.log").exists() else []
    assert len(after) <= 1, f"{len(after)} force calls after the {sig}"      # the step it arrived in
    summ = json.loads((out / "summary.json").read_text())
    first, cut, left = summ["runs"]
    assert first["status"] == "done" and first["verdict"] == "stable" and first["nve_drift_eV_atom"] is not None
    assert cut["status"] == "interrupted" and not cut["stable"] and left["status"] == "not run" and not left["stable"]
    assert not summ["all_stable"] and "md-check result: stable" not in text
    if sig == "SIGTERM":
        why = "SIGTERM on rank 0"
        assert "distmlip: SIGTERM received on rank 0: stopping at the next step boundary" in res.stderr
        assert 0 < cut["steps_done"] < 60 and cut["frames"] == cut["steps_done"] // 10 + 1, cut
        assert cut["verdict"].startswith(f"interrupted: {why} at {cut['steps_done']:g} fs of 60 fs of NVT (not judged")
        assert cut["failed_frames"] == 0 and cut["nve_drift_eV_atom"] is None     # the frames not run are not failures
        assert f"md-check: stopped by {why}: the check is incomplete (900 K interrupted, 1500 K not run); the " \
               f"verdicts of the runs that finished (300 K) are in {out / 'summary.json'}; run the same command " \
               "again to finish the check (the finished runs are reused; exit status 143)" in res.stdout, text[-3000:]
        assert summ["stop"] == {"reason": why, "finished_K": [300.0], "interrupted_K": [900.0], "not_run_K": [1500.0]}
        if ranks == 2:
            assert "rank 1 of this mpirun has nothing to do" in res.stderr
    else:
        why = "SIGINT (Ctrl-C)"
        assert cut["verdict"] == f"interrupted: {why} (its trajectory is not kept)"
        assert "distmlip md-check: interrupted" in res.stderr
        assert summ["stop"]["reason"] == why and summ["stop"]["not_run_K"] == [1500.0]
    assert left["verdict"] == f"not run: {why} before it started"
    assert ("md-check result: interrupted (3 runs: 1 stable, 0 unstable, 0 aborted, 1 interrupted, 1 not run; "
            f"T=900 K interrupted: {why}") in res.stdout, text[-3000:]
    assert summ["result"] in res.stdout


def test_stop_exit_status():
    """The exit status of a command that a stop left incomplete: 128 + the signal (the stop file
    requests a stop like SIGUSR1); describe_stop names the same stop code."""
    from distmlip.distributed.signals import describe_stop, stop_exit_status

    assert stop_exit_status(0) == 0
    assert stop_exit_status(1000 + signal.SIGTERM) == 143 and describe_stop(1000 + signal.SIGTERM) == "SIGTERM on rank 0"
    assert stop_exit_status(2000 + signal.SIGUSR1) == 128 + signal.SIGUSR1
    assert stop_exit_status(1999) == 128 + signal.SIGUSR1


class _StopAfter:
    """A context whose stop check says yes from its n-th call on (DistContext's interface)."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def stop_requested(self):
        self.calls += 1
        return self.calls >= self.n

    def stop_reason(self):
        return "SIGTERM on rank 0" if self.calls >= self.n else None


def test_stop_in_the_nve_continuation_and_before_the_first_run(tmp_path):
    """A stop in the NVE continuation interrupts the run there (the NVT part ran whole, the drift
    is not judged); a stop before the first run leaves every temperature 'not run'.  Neither is
    ever stable, and the summary line says 'interrupted'."""
    from distmlip.evaluation.mdcheck import md_check

    s = _start(tmp_path)
    # one check before the first run, 20 in its NVT, then the 6th of the NVE continuation
    summ = md_check(["ase:EMT"], s, temperatures=[300.0, 600.0], steps=20, interval=10, nve_steps=20,
                    output=str(tmp_path / "nve"), ctx=_StopAfter(1 + 20 + 6))
    r, left = summ["runs"]
    assert r["status"] == "interrupted" and r["steps_done"] == 20 and r["frames"] == 3 and not r["stable"]
    assert r["verdict"] == "interrupted: SIGTERM on rank 0 at 25 fs, in the NVE continuation (not judged)", r["verdict"]
    assert r["nve_drift_eV_atom"] is None and left["status"] == "not run"
    assert summ["result"].startswith("md-check result: interrupted (2 runs: 0 stable, 0 unstable, 0 aborted, "
                                     "1 interrupted, 1 not run; T=300 K interrupted: SIGTERM on rank 0 at 25 fs")
    summ = md_check(["ase:EMT"], s, temperatures=[300.0, 600.0], steps=20, interval=10, nve_steps=20,
                    output=str(tmp_path / "before"), ctx=_StopAfter(1))
    assert [r["verdict"] for r in summ["runs"]] == ["not run: SIGTERM on rank 0 before it started"] * 2
    assert summ["stop"]["not_run_K"] == [300.0, 600.0] and not summ["all_stable"]
    assert not (tmp_path / "before" / "pdf_T300.png").exists()


def test_a_rerun_reuses_the_finished_runs_of_the_same_check_only(tmp_path, capsys):
    """A batch job's md-check stopped at its time limit reran every temperature when started
    again.  The same command now reuses the runs that finished (the same run dict as before), runs
    the others, and reuses nothing when the models' content, a setting or the temperature at a
    position differ, or with --fresh."""
    models = _models(tmp_path)
    s = _start(tmp_path)
    out = tmp_path / "out"
    args = [models[0], str(s), "--steps", "10", "--interval", "5", "--nve-steps", "5", "-o", str(out)]

    def check(extra, temps=("300", "900")):
        assert main(["md-check", *args, "-T", *temps, *extra]) == 0
        text = capsys.readouterr().out
        return text, json.loads((out / "summary.json").read_text())

    text, first = check([])
    assert "reused" not in text and first["identity"]
    text, again = check([])
    assert text.count("reused, finished by an earlier md-check") == 2 and again["runs"] == first["runs"]
    # what a stop leaves: the second run interrupted; only the first is reused
    first["runs"][1]["status"] = "interrupted"
    (out / "summary.json").write_text(json.dumps(first))
    text, after = check([])
    assert "T=300 K: reused" in text and "T=900 K: reused" not in text
    assert after["runs"][0] == first["runs"][0] and after["runs"][1]["status"] == "done"
    # another temperature at a position: that position runs
    text, _ = check([], temps=("300", "1200"))
    assert "T=300 K: reused" in text and "T=1200 K: reused" not in text
    # another setting, --fresh, another model in the same file: nothing reused
    for extra in (["--nve-steps", "6"], ["--fresh"]):
        text, _ = check(extra)
        assert "reused" not in text, extra
    check([])
    Path(models[0]).write_bytes(Path(models[1]).read_bytes())
    text, _ = check([])
    assert "reused" not in text and "is from other models, structure, settings or version" in text


def test_checks_without_output_keep_one_folder_per_model(tmp_path, capsys, monkeypatch):
    """Every md-check without -o wrote md_check/, each replacing the report before it (left by
    sweep 20); a run's model now defaults to md_check_<run folder>, a calculator to
    md_check_<its name>, as evaluate does."""
    models = _models(tmp_path)
    s = _start(tmp_path)
    monkeypatch.chdir(tmp_path)
    for folder, m in (("run_a", models[0]), ("run_b", models[1])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "model.pt").write_bytes(Path(m).read_bytes())
        assert main(["md-check", f"{folder}/model.pt", str(s), "-T", "300", "--steps", "5", "--interval", "5",
                     "--nve-steps", "0"]) == 0
    assert main(["md-check", "ase:EMT", str(s), "-T", "300", "--steps", "5", "--interval", "5", "--nve-steps", "0"]) == 0
    capsys.readouterr()
    for name, model in (("md_check_run_a", "run_a/model.pt"), ("md_check_run_b", "run_b/model.pt"),
                        ("md_check_EMT", "ase:EMT")):
        assert json.loads((tmp_path / name / "summary.json").read_text())["models"] == [model]
    assert not (tmp_path / "md_check").exists()
