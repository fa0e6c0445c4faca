"""`distmlip evaluate`: JSON/CSV/PNG outputs, metrics equal to a direct numpy computation from an
independent prediction (ASE calculator per structure)."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.calculators.emt import EMT

from distmlip.calculator import DistmlipCalculator
from distmlip.data.h5store import H5Dataset, write_dataset
from distmlip.data.structure import Structure
from distmlip.evaluation.evaluate import add_arguments, run
from distmlip.evaluation.metrics import force_metrics
from distmlip.models.bpnn import BPNN
from helpers import tmpfs


def _data(path):
    rng = np.random.default_rng(5)
    out = []
    for k in range(6):
        a = bulk("Cu", "fcc", a=3.6, cubic=True)
        a.symbols[k % 4] = "Au"
        a.positions += rng.normal(0, 0.1, a.positions.shape)
        out.append(a)
    for k in range(4):
        m = molecule("CH4")
        m.set_chemical_symbols(["Cu", "Au", "Cu", "Cu", "Au"])
        m.positions = m.positions * 2.2 + rng.normal(0, 0.05, (5, 3))
        m.cell = np.zeros((3, 3))
        m.pbc = False
        out.append(m)
    structs = []
    for k, a in enumerate(out):
        a.calc = EMT()
        structs.append(Structure(a.numbers.copy(), a.positions.copy(), np.array(a.cell[:]), a.pbc.copy(),
                                 energy=a.get_potential_energy(), forces=a.get_forces().copy(),
                                 source="emt.extxyz", source_index=k))
    write_dataset(path, structs)
    return out


def test_evaluate_outputs_match_numpy(tmp_path):
    _data(tmp_path / "d.h5")
    torch.manual_seed(0)
    m = BPNN(["Cu", "Au"], {"rc_radial": 4.0, "n_radial": 4, "rc_angular": 3.0, "n_angular": 2,
                            "backend": "reference"}, hidden=[5])
    ds = H5Dataset(tmp_path / "d.h5")
    from distmlip.descriptors.batch import collate

    m.fit_normalization([collate(ds.read(range(ds.n_structures)), m.species, m.cutoff)])
    m.save(tmp_path / "m.pt")

    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([str(tmp_path / "m.pt"), str(tmp_path / "d.h5"), "-o", str(tmp_path / "ev"),
                         "--batch-atoms", "9"])
    assert run(args) == 0
    out = tmp_path / "ev"
    for f in ("metrics.json", "structures.csv", "parity_energy.png", "parity_forces.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0
    assert (out / "parity_energy.png").read_bytes()[:4] == b"\x89PNG"
    res = json.loads((out / "metrics.json").read_text())["metrics"]

    # independent prediction: calculator, one structure at a time
    calc = DistmlipCalculator(tmp_path / "m.pt")
    Ep, Er, nat, Fp, Fr = [], [], [], [], []
    for st in ds.read(range(ds.n_structures)):
        a = st.to_ase()
        Er.append(st.energy)
        Fr.append(st.forces)
        a.calc = calc
        Ep.append(a.get_potential_energy())
        Fp.append(a.get_forces())
        nat.append(st.natoms)
    Ep, Er, nat = np.array(Ep), np.array(Er), np.array(nat)
    Fp, Fr = np.concatenate(Fp), np.concatenate(Fr)
    da = (Ep - Er) / nat
    ov = res["overall"]
    assert ov["n_structures"] == 10
    assert np.isclose(ov["E_mae_meV_atom"], 1e3 * np.abs(da).mean(), rtol=1e-9)
    assert np.isclose(ov["E_rmse_meV_atom"], 1e3 * np.sqrt((da ** 2).mean()), rtol=1e-9)
    assert np.isclose(ov["E_mae_meV_struct"], 1e3 * np.abs(Ep - Er).mean(), rtol=1e-9)
    assert np.isclose(ov["F_mae"], np.abs(Fp - Fr).mean(), rtol=1e-9)
    assert np.isclose(ov["F_rmse"], np.sqrt(((Fp - Fr) ** 2).mean()), rtol=1e-9)
    mag = np.abs(np.linalg.norm(Fp, axis=1) - np.linalg.norm(Fr, axis=1)).mean()
    assert np.isclose(ov["F_magnitude_mae"], mag, rtol=1e-9)
    cos = (Fp * Fr).sum(1) / np.linalg.norm(Fp, axis=1) / np.linalg.norm(Fr, axis=1)
    assert np.isclose(ov["F_direction_deg"], np.degrees(np.arccos(np.clip(cos, -1, 1))).mean(), rtol=1e-9)
    # two subsets (bulk Cu3Au in 4 atom orders + cluster) -> per-subset entries cover all structures
    subs = [k for k in res if k != "overall"]
    assert len(subs) >= 2 and sum(res[k]["n_structures"] for k in subs) == 10
    rows = list(csv.DictReader(open(out / "structures.csv")))
    assert len(rows) == 10
    assert np.allclose([float(r["E_pred_eV"]) for r in rows], Ep, rtol=0, atol=1e-8)


def test_force_metrics_direction_simple():
    ref = np.array([[1.0, 0, 0], [0, 2.0, 0]])
    pred = np.array([[0, 1.0, 0], [0, 2.0, 0]])
    m = force_metrics(pred, ref)
    assert np.isclose(m["F_direction_deg"], 45.0)
    assert np.isclose(m["F_magnitude_mae"], 0.0)


def test_unwritable_output_is_an_error_before_the_work(tmp_path, capsys):
    """An output folder that cannot be written (here: below a regular file; a read-only mount
    behaves alike) is a clear error naming it, raised before any prediction, MD or GPR fit."""
    from distmlip.cli import main as cli_main

    _data(tmp_path / "d.h5")
    m = BPNN(["Cu", "Au"], {"rc_radial": 4.0, "n_radial": 4, "rc_angular": 3.0, "n_angular": 2,
                            "backend": "reference"}, hidden=[5])
    m.save(tmp_path / "m.pt")
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "out"
    from ase.io import write
    write(str(tmp_path / "start.extxyz"), bulk("Cu", "fcc", a=3.6, cubic=True))
    for argv in (["evaluate", str(tmp_path / "m.pt"), str(tmp_path / "d.h5"), "-o", str(bad)],
                 ["md-check", str(tmp_path / "m.pt"), str(tmp_path / "start.extxyz"), "-o", str(bad)],
                 ["gpr", "predict", str(tmp_path), str(tmp_path / "d.h5"), "-o", str(bad / "p.npz")]):
        capsys.readouterr()
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"cannot write to the output folder {bad}" in err and "Traceback" not in err, err


def test_evaluate_names_compositions_absent_from_training(tmp_path, capsys):
    _data(tmp_path / "d.h5")
    m = BPNN(["Cu", "Au"], {"rc_radial": 4.0, "n_radial": 4, "rc_angular": 3.0, "n_angular": 2,
                            "backend": "reference"}, hidden=[5])
    m.training_record = {"energy_per_atom_min": {"AuCu3": 0.0}}      # trained on the bulk cells only
    m.save(tmp_path / "m.pt")
    from distmlip.cli import main as cli_main

    assert cli_main(["evaluate", str(tmp_path / "m.pt"), str(tmp_path / "d.h5"), "-o", str(tmp_path / "ev"),
                     "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "4 structure(s) have compositions absent from the model's training data (Au2Cu3: 4)" in err


def test_evaluate_names_elements_without_training_atoms(tmp_path, capsys):
    """Structures with an element the training data lacked were reported as 'compositions absent
    ... errors measure transfer to new compositions': the element, whose network is untrained,
    was not named."""
    _data(tmp_path / "d.h5")
    m = BPNN(["Cu", "Au"], {"rc_radial": 4.0, "n_radial": 4, "rc_angular": 3.0, "n_angular": 2,
                            "backend": "reference"}, hidden=[5])
    m.training_record = {"energy_per_atom_min": {"Cu": 0.0}}         # trained on pure Cu only
    m.save(tmp_path / "m.pt")
    from distmlip.cli import main as cli_main

    assert cli_main(["evaluate", str(tmp_path / "m.pt"), str(tmp_path / "d.h5"), "-o", str(tmp_path / "ev"),
                     "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "contain elements with no atoms in the model's training data: Au (in " in err
    assert "networks are untrained" in err and "transfer to new compositions" not in err


def test_evaluate_leaves_gpr_copies_out_unless_asked(tmp_path, capsys):
    """An augmented data set's synthetic copies carry GPR labels, not reference data: evaluate
    scores the references by default and says how many copies it left out."""
    import dataclasses

    from distmlip.cli import main as cli_main

    _data(tmp_path / "d.h5")
    ds = H5Dataset(tmp_path / "d.h5")
    S = ds.read(range(ds.n_structures))
    copies = [dataclasses.replace(s, synthetic=True, parent=k, energy=s.energy + 5.0, forces=None)
              for k, s in enumerate(S[:6])]
    write_dataset(tmp_path / "aug.h5", S + copies)
    m = BPNN(["Cu", "Au"], {"rc_radial": 4.0, "n_radial": 4, "rc_angular": 3.0, "n_angular": 2,
                            "backend": "reference"}, hidden=[5])
    m.save(tmp_path / "m.pt")
    res = {}
    for mode in ("exclude", "include", "only"):
        capsys.readouterr()
        assert cli_main(["evaluate", str(tmp_path / "m.pt"), str(tmp_path / "aug.h5"), "-o", str(tmp_path / mode),
                         "--no-plots", "--synthetic", mode]) == 0
        res[mode] = json.loads((tmp_path / mode / "metrics.json").read_text())["metrics"]["overall"]
        if mode == "exclude":
            assert "6 GPR-labelled copies left out" in capsys.readouterr().out
    assert (res["exclude"]["n_structures"], res["include"]["n_structures"], res["only"]["n_structures"]) == (10, 16, 6)
    assert cli_main(["evaluate", str(tmp_path / "m.pt"), str(tmp_path / "d.h5"), "-o", str(tmp_path / "ref"),
                     "--no-plots"]) == 0
    ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())["metrics"]["overall"]
    assert res["exclude"]["E_mae_meV_atom"] == ref["E_mae_meV_atom"]


def test_evaluate_with_a_non_finite_model_fails_and_writes_nothing(tmp_path, capsys):
    from distmlip.cli import main as cli_main

    _data(tmp_path / "d.h5")
    m = BPNN(["Cu", "Au"], {"rc_radial": 4.0, "n_radial": 4, "rc_angular": 3.0, "n_angular": 2,
                            "backend": "reference"}, hidden=[5])
    with torch.no_grad():
        next(m.parameters()).view(-1)[0] = float("nan")
    m.save(tmp_path / "m.pt")
    assert cli_main(["evaluate", str(tmp_path / "m.pt"), str(tmp_path / "d.h5"), "-o", str(tmp_path / "ev")]) == 2
    assert "predicts non-finite energies or forces for 10 of 10 structures" in capsys.readouterr().err
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_evaluate_folder_holds_one_run(tmp_path):
    """Outputs are staged and moved in together: a second evaluation into the same folder
    leaves no file of the first (here the force plot, which --no-forces does not write)."""
    from distmlip.cli import main as cli_main

    _data(tmp_path / "d.h5")
    m = BPNN(["Cu", "Au"], {"rc_radial": 4.0, "n_radial": 4, "rc_angular": 3.0, "n_angular": 2,
                            "backend": "reference"}, hidden=[5])
    m.save(tmp_path / "m.pt")
    ev = tmp_path / "ev"
    assert cli_main(["evaluate", str(tmp_path / "m.pt"), str(tmp_path / "d.h5"), "-o", str(ev)]) == 0
    assert (ev / "parity_forces.png").is_file()
    assert cli_main(["evaluate", str(tmp_path / "m.pt"), str(tmp_path / "d.h5"), "-o", str(ev), "--no-forces"]) == 0
    assert not (ev / "parity_forces.png").exists() and (ev / "parity_energy.png").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ev.")]       # no staging left


def test_evaluate_split_is_the_runs_split(tmp_path, capsys, emt_h5):
    """`evaluate --split val` scored the hash split with evaluate's own defaults: a run trained
    with `data.by_subset: false` (or other fractions) had its 'validation' score taken on another
    set of structures, training structures included (sweep 7).  The run's config.yaml beside the
    model now sets the split; the command line overrides it."""
    from distmlip.cli import main as cli_main
    from distmlip.training.config import load_train_config
    from distmlip.training.trainer import Trainer

    (tmp_path / "c.yaml").write_text(f"""
data: {{train: [{emt_h5}], fractions: [0.7, 0.3, 0.0], by_subset: false, split_seed: 3}}
descriptor: {{rc_radial: 4.0, n_radial: 4, rc_angular: 3.0, n_angular: 2, backend: reference}}
model: {{hidden: [4]}}
training: {{epochs: 1, batch_atoms: 40, output: {tmp_path / 'run'}, progress_bar: 'off'}}
""")
    tr = Trainer(load_train_config(tmp_path / "c.yaml"), quiet=True)
    tr.fit()
    want = sorted(int(i) for i in tr.val_idx)
    assert 0 < len(want) < 24

    def scored(*extra):
        out = tmp_path / f"ev{len(extra)}"
        assert cli_main(["evaluate", str(tmp_path / "run" / "model.pt"), str(emt_h5), "--split", "val",
                         "-o", str(out), "--no-plots", *extra]) == 0
        with open(out / "structures.csv") as f:
            return sorted(int(r["index"]) for r in csv.DictReader(f))

    assert scored() == want
    assert f"by the settings of {tmp_path / 'run' / 'config.yaml'}" in capsys.readouterr().out
    other = scored("--by-subset", "on", "--split-seed", "0", "--fractions", "0.9", "0.1", "0.0")
    assert other != want and "the command line" in capsys.readouterr().out


def test_evaluate_split_is_the_runs_split_from_another_directory(tmp_path, capsys, emt_h5, monkeypatch):
    """The run's config.yaml holds data.train as given, relative to the training's working
    directory: evaluate started from another directory (a batch script's cd) did not recognise the
    evaluated file as the training data and scored the split of its own defaults, training
    structures included (sweep 20).  The model's record names its data by content."""
    import shutil

    from distmlip.cli import main as cli_main
    from distmlip.training.config import load_train_config
    from distmlip.training.trainer import Trainer

    (tmp_path / "job").mkdir()
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(emt_h5, tmp_path / "job" / "d.h5")
    (tmp_path / "job" / "c.yaml").write_text("""
data: {train: [d.h5], fractions: [0.6, 0.4, 0.0], by_subset: false, split_seed: 3}
descriptor: {rc_radial: 4.0, n_radial: 4, rc_angular: 3.0, n_angular: 2, backend: reference}
model: {hidden: [4]}
training: {epochs: 1, batch_atoms: 40, output: run, progress_bar: 'off'}
""")
    monkeypatch.chdir(tmp_path / "job")
    tr = Trainer(load_train_config("c.yaml"), quiet=True)
    tr.fit()
    want = sorted(int(i) for i in tr.val_idx)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert cli_main(["evaluate", "../job/run/model.pt", "../job/d.h5", "--split", "val", "-o", "ev",
                     "--no-plots"]) == 0
    with open(tmp_path / "elsewhere" / "ev" / "structures.csv") as f:
        got = sorted(int(r["index"]) for r in csv.DictReader(f))
    assert got == want
    assert "by the settings of ../job/run/config.yaml" in capsys.readouterr().out


def test_evaluate_model_in_a_folder_whose_name_holds_a_comma(tmp_path, emt_h5):
    """A run folder named like its settings ('lr=1e-3,bs=64'): the model argument was split at the
    comma (the committee syntax) and 'model file .../lr=1e-3 does not exist' (sweep 20)."""
    from distmlip.cli import main as cli_main

    run = tmp_path / "lr=1e-3,bs=64"
    run.mkdir()
    BPNN(["Cu", "Au"], {"rc_radial": 4.0, "n_radial": 4, "rc_angular": 3.0, "n_angular": 2,
                        "backend": "reference"}, hidden=[5]).save(run / "model.pt")
    assert cli_main(["evaluate", str(run / "model.pt"), str(emt_h5), "-o", str(tmp_path / "ev"), "--no-plots"]) == 0
    assert (tmp_path / "ev" / "metrics.json").is_file()


def test_evaluate_storage_error_names_the_output_folder(tmp_path, emt_h5, monkeypatch):
    """A full disk while the evaluation was staged named the staging folder's file
    (.ev.RANDOM.tmp/parity_energy.png), which the user never sees (sweep 20, a 200 KiB tmpfs);
    the error names the output folder's file."""
    from distmlip.data.h5store import H5Dataset
    from distmlip.errors import StorageError
    from distmlip.evaluation import plots
    from distmlip.evaluation.evaluate import evaluate

    def full(x, y, path, *a, **k):
        raise StorageError(f"cannot write {path}: no space left on the device (disk full) [ENOSPC]")

    monkeypatch.setattr(plots, "parity_plot", full)
    m = BPNN(["Cu", "Au"], {"rc_radial": 4.0, "n_radial": 4, "rc_angular": 3.0, "n_angular": 2,
                            "backend": "reference"}, hidden=[5])
    with pytest.raises(StorageError) as err:
        evaluate([m], H5Dataset([emt_h5]), output=tmp_path / "ev")
    assert str(tmp_path / "ev" / "parity_energy.png") in str(err.value) and ".tmp" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev"] and not list((tmp_path / "ev").iterdir())


def test_a_killed_evaluates_staging_folder_is_removed_by_the_next(tmp_path, emt_h5):
    """A killed evaluate left its hidden staging folder (.ev.RANDOM.tmp) beside the output for
    good: its random name was not one the stale-file cleaner knows (sweep 20).  Staging folders
    are now named like every temporary file (host, pid), and the next evaluate there removes the
    one of a dead process, not that of a live one."""
    import subprocess

    from distmlip.data.h5store import H5Dataset
    from distmlip.evaluation.evaluate import evaluate
    from distmlip.utils.io import temp_path

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = temp_path(tmp_path / "ev")
    stale = stale.with_name(stale.name.replace(f".{os.getpid()}.", f".{dead.pid}."))
    stale.mkdir()
    (stale / "metrics.json").write_text("{}")
    live = temp_path(tmp_path / "other")          # this process's: a writer still running
    live.mkdir()
    m = BPNN(["Cu", "Au"], {"rc_radial": 4.0, "n_radial": 4, "rc_angular": 3.0, "n_angular": 2,
                            "backend": "reference"}, hidden=[5])
    evaluate([m], H5Dataset([emt_h5]), output=tmp_path / "ev", plots=False)
    assert not stale.exists() and live.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ev", live.name])


def test_evaluate_into_a_folder_linked_to_another_file_system(tmp_path, emt_h5):
    """An output folder that is a link to another file system (ln -s $SCRATCH/eval eval): the
    files were staged beside the link and moved across devices, OSError EXDEV, a traceback and
    nothing written (sweep 20)."""
    from distmlip.cli import main as cli_main

    other = tmp_path / "other"
    other.mkdir()
    with tmpfs(other, "4m"):
        (other / "ev").mkdir()
        (tmp_path / "ev").symlink_to(other / "ev", target_is_directory=True)
        m = BPNN(["Cu", "Au"], {"rc_radial": 4.0, "n_radial": 4, "rc_angular": 3.0, "n_angular": 2,
                                "backend": "reference"}, hidden=[5])
        m.save(tmp_path / "m.pt")
        assert cli_main(["evaluate", str(tmp_path / "m.pt"), str(emt_h5), "-o", str(tmp_path / "ev"), "--no-plots"]) == 0
        assert sorted(p.name for p in (other / "ev").iterdir()) == ["metrics.json", "structures.csv"]
        assert (tmp_path / "ev").is_symlink() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_evaluate_two_runs_without_output_keep_both(tmp_path, emt_h5, monkeypatch):
    """'distmlip evaluate run_a/model.pt ...' then 'run_b/model.pt ...' from one directory without
    -o both wrote eval_model/: the second replaced the first's results without a word (sweep 20).
    A run's own file names are told apart by the run folder."""
    from distmlip.cli import main as cli_main

    monkeypatch.chdir(tmp_path)
    for folder, h in (("run_a", 4), ("run_b", 6)):
        (tmp_path / folder).mkdir()
        BPNN(["Cu", "Au"], {"rc_radial": 4.0, "n_radial": 4, "rc_angular": 3.0, "n_angular": 2,
                            "backend": "reference"}, hidden=[h]).save(tmp_path / folder / "model.pt")
        assert cli_main(["evaluate", f"{folder}/model.pt", str(emt_h5), "--no-plots"]) == 0
    a = json.loads((tmp_path / "eval_run_a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "eval_run_b" / "metrics.json").read_text())
    assert a["metrics"] != b["metrics"]
    (tmp_path / "pot.pt").write_bytes((tmp_path / "run_a" / "model.pt").read_bytes())
    assert cli_main(["evaluate", "pot.pt", str(emt_h5), "--no-plots"]) == 0
    assert (tmp_path / "eval_pot" / "metrics.json").is_file()


def test_evaluate_names_atoms_on_top_of_each_other(tmp_path, capsys):
    """A structure with two atoms at one position (convert --min-distance 0 lets it through)
    makes the descriptors NaN: evaluate names the pair and its distance, not the model."""
    from distmlip.cli import main as cli_main
    from distmlip.data.h5store import write_dataset
    from distmlip.data.structure import Structure

    pos = np.array([[0.0, 0, 0], [0.0, 0, 0], [1.8, 1.8, 0.0]])
    write_dataset(tmp_path / "d.h5", [Structure(numbers=np.array([29, 29, 79]), positions=pos, energy=-1.0)])
    m = BPNN(["Cu", "Au"], {"rc_radial": 4.0, "n_radial": 4, "rc_angular": 3.0, "n_angular": 2,
                            "backend": "reference"}, hidden=[5])
    m.save(tmp_path / "m.pt")
    assert cli_main(["evaluate", str(tmp_path / "m.pt"), str(tmp_path / "d.h5"), "-o", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "structure 0 of" in err and "a Cu-Cu pair at 0 A (atoms on top of each other" in err
    assert not (tmp_path / "ev" / "metrics.json").exists()
