"""The training-data record (models/data_record.py): shortest distance per element pair and lowest
energy per atom of the training structures, computed by the trainer, stored in the model file,
identical on 1 and 2 ranks, and used by the calculator to warn below the shortest distances."""
import json

import numpy as np
import pytest
from ase.build import bulk
from ase.neighborlist import neighbor_list

from distmlip.calculator import DistmlipCalculator
from distmlip.data.h5store import H5Dataset
from distmlip.data.split import get_split
from distmlip.descriptors.spec import DescriptorSpec
from distmlip.models.bpnn import BPNN
from distmlip.models.data_record import merge_records, pairs_below, record_from_structures, reduced_formula
from distmlip.training.config import DataConfig, DescriptorConfig, ModelConfig, TrainConfig, TrainingConfig
from distmlip.training.trainer import Trainer
from helpers import mpirun, rattled_copies

SPEC = DescriptorSpec(rc_radial=4.0, n_radial=4, rc_angular=3.0, n_angular=2)


def _brute(structures, cutoff):
    """Shortest distance per pair (ASE's neighbour list) and lowest energy per atom per formula."""
    pairs, emin = {}, {}
    for s in structures:
        a = s.to_ase()
        i, j, d = neighbor_list("ijd", a, cutoff)
        sym = a.get_chemical_symbols()
        for x, y, r in zip(i, j, d):
            k = "-".join(sorted((sym[x], sym[y])))
            pairs[k] = min(pairs.get(k, 9.9), r)
        f = reduced_formula(s.numbers)
        emin[f] = min(emin.get(f, 1e9), s.energy / len(s.numbers))
    return pairs, emin


def _cfg(h5, out, epochs=1):
    return TrainConfig(data=DataConfig(train=[str(h5)], fractions=[0.8, 0.2, 0.0]),
                       descriptor=DescriptorConfig(SPEC, backend="reference"), model=ModelConfig(hidden=[4]),
                       training=TrainingConfig(mode="energy", epochs=epochs, batch_atoms=40, lr=0.01,
                                               output=str(out), progress_bar="off"))


def test_record_of_training_set_saved_and_loaded(emt_h5, tmp_path):
    Trainer(_cfg(emt_h5, tmp_path / "run"), quiet=True).fit()
    m = BPNN.load(tmp_path / "run" / "model.pt")
    rec = m.training_record
    ds = H5Dataset(emt_h5)
    train = np.flatnonzero(np.asarray(get_split(ds, 0, (0.8, 0.2, 0.0), per_subset=True)) == 0)
    pairs, emin = _brute(ds.read(train), SPEC.cutoff)
    assert rec["n_structures"] == len(train) < ds.n_structures        # the training split only
    assert set(rec["pair_min_distance_A"]) == {"Au-Au", "Au-Cu", "Cu-Cu"}
    for k, v in pairs.items():
        assert rec["pair_min_distance_A"][k] == pytest.approx(v, abs=1e-12)
    assert {k for k, v in rec["pair_min_distance_A"].items() if v is None} == {"Au-Au"} - set(pairs)
    assert rec["energy_per_atom_min"] == pytest.approx(emin, abs=1e-12)
    # the metadata round trip is plain JSON
    assert json.loads(json.dumps(m.metadata["training_data"])) == rec


def test_merge_and_pairs_below():
    a = {"n_structures": 2, "cutoff_A": 4.0, "pair_min_distance_A": {"Cu-Cu": 2.3, "Au-Cu": None},
         "energy_per_atom_min": {"Cu": -3.0}}
    b = {"n_structures": 1, "cutoff_A": 4.0, "pair_min_distance_A": {"Cu-Cu": 2.5, "Au-Cu": 2.6},
         "energy_per_atom_min": {"Cu": -3.1, "AuCu3": -2.0}}
    m = merge_records([a, b])
    assert m == {"n_structures": 3, "cutoff_A": 4.0, "pair_min_distance_A": {"Cu-Cu": 2.3, "Au-Cu": 2.6},
                 "energy_per_atom_min": {"Cu": -3.1, "AuCu3": -2.0}}
    numbers = np.array([29, 29, 79])
    i, j, d = np.array([0, 0]), np.array([1, 2]), np.array([2.2, 2.7])
    assert pairs_below(m, numbers, i, j, d) == {"Cu-Cu": 2.2}
    assert pairs_below(a, numbers, i, j, d) == {"Cu-Cu": 2.2, "Au-Cu": 2.7}   # never seen within 4 A
    assert reduced_formula([29, 29, 29, 79]) == "AuCu3" and reduced_formula([1, 1, 8]) == "H2O"
    assert record_from_structures([], ["Cu"], 3.0)["pair_min_distance_A"] == {"Cu-Cu": None}


def test_calculator_warns_below_training_distances(emt_h5, tmp_path, capsys):
    Trainer(_cfg(emt_h5, tmp_path / "run"), quiet=True).fit()
    calc = DistmlipCalculator(tmp_path / "run" / "model.pt")
    lim = calc.training_record["pair_min_distance_A"]["Cu-Cu"]
    a = bulk("Cu", "fcc", a=3.61, cubic=True)
    a.calc = calc
    a.get_potential_energy()
    assert a.calc.results["below_training_pairs"] == {}
    assert "shorter than the shortest" not in capsys.readouterr().err
    b = a.copy()
    b.positions[1] = b.positions[0] + [0.8 * lim, 0.0, 0.0]
    b.calc = calc
    b.get_potential_energy()
    assert b.calc.results["below_training_pairs"]["Cu-Cu"] == pytest.approx(0.8 * lim)
    err = capsys.readouterr().err
    assert "a Cu-Cu pair at" in err and "shorter than the shortest Cu-Cu distance" in err
    b.positions[1, 0] -= 0.01      # a little closer: no second warning
    b.get_potential_energy()
    assert "shorter than" not in capsys.readouterr().err


def test_record_identical_on_two_ranks(emt_h5, tmp_path):
    import yaml

    cfgs = {}
    for n in (1, 2):
        out = tmp_path / f"run{n}"
        cfg = {"data": {"train": [str(emt_h5)], "fractions": [0.8, 0.2, 0.0]},
               "descriptor": {"rc_radial": 4.0, "n_radial": 4, "rc_angular": 3.0, "n_angular": 2,
                              "backend": "reference"},
               "model": {"hidden": [4]},
               "training": {"mode": "energy", "epochs": 1, "batch_atoms": 40, "output": str(out),
                            "progress_bar": "off"}}
        p = tmp_path / f"t{n}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        cfgs[n] = (p, out)
    mpirun(1, ["-m", "distmlip", "train", str(cfgs[1][0])])
    res = mpirun(2, ["-m", "distmlip", "train", str(cfgs[2][0])])
    assert "training data (" in res.stdout and "shortest distances" in res.stdout
    r1 = BPNN.load(cfgs[1][1] / "model.pt").training_record
    r2 = BPNN.load(cfgs[2][1] / "model.pt").training_record
    assert r1 == r2 and r1["n_structures"] > 0


def test_per_structure_minima_in_blocks():
    """``minima``: one float32 row per structure (blocks of 4096 concatenated in order), each
    at most the structure's true shortest distance per pair and within float32 rounding of it,
    inf where a pair is absent."""
    from distmlip.data.structure import Structure

    rng = np.random.default_rng(3)
    d = rng.uniform(0.7, 3.0, size=4100)
    structures = [Structure(numbers=np.array([1, 8] if k % 3 else [1, 1]), positions=np.array([[0.0, 0, 0], [0, 0, x]]),
                            cell=np.zeros((3, 3)), pbc=np.zeros(3, bool), energy=0.0) for k, x in enumerate(d)]
    minima: list = []
    rec = record_from_structures(structures, ["H", "O"], 4.0, minima)
    rows = np.concatenate(minima)
    assert len(minima) == 2 and rows.shape == (4100, 3)       # pairs H-H, H-O, O-O
    col = {k: c for c, k in enumerate(rec["pair_min_distance_A"])}
    for k, x in enumerate(d):
        key = "H-O" if k % 3 else "H-H"
        got = rows[k, col[key]]
        assert got <= x and x - got < 1e-6 * x
        assert np.isinf(np.delete(rows[k], col[key])).all()


def test_merge_counts_each_data_set_once():
    from distmlip.models.data_record import merge_records

    a = {"n_structures": 25, "cutoff_A": 5.0, "pair_min_distance_A": {"Cu-Cu": 2.2}, "energy_per_atom_min": {},
         "data": ["A"]}
    b = {"n_structures": 10, "cutoff_A": 5.0, "pair_min_distance_A": {"Cu-Cu": 2.1}, "energy_per_atom_min": {},
         "data": ["B"]}
    assert merge_records([a, dict(a)])["n_structures"] == 25            # fine-tuned on its own data
    m = merge_records([a, b])
    assert m["n_structures"] == 35 and m["data"] == ["A", "B"] and m["pair_min_distance_A"]["Cu-Cu"] == 2.1
    assert merge_records([{**a, "data": None}, {**a, "data": None}])["n_structures"] == 50   # per-rank parts


def test_dense_minima_equal_neighbour_lists():
    """Structures of one subset are measured together (``dense_pair_minima``): free molecules,
    periodic cells of a few atoms (skewed, unwrapped positions, a cutoff beyond half the cell),
    a slab and a wire with a zero cell vector give the per-structure neighbour list's shortest
    distances (rows within float32 rounding and never above; the record in float64)."""
    from ase.build import bulk, fcc111, molecule

    from distmlip.data.structure import Structure
    from distmlip.descriptors.neighbors import dense_pair_minima
    from distmlip.models import data_record as R

    rng = np.random.default_rng(0)

    def rattled(a, count, skew=0.0, unwrap=False):
        return rattled_copies(a, count, rng, skew, unwrap)

    wire = [Structure(numbers=np.array([29] * 3 + [79] * 3), positions=rng.normal(0, 1.5, (6, 3)),
                      cell=np.diag([2.5 + rng.random(), 0, 0]), pbc=np.array([True, False, False]), energy=1.0)
            for _ in range(20)]
    cases = [(rattled(molecule("CH3CH2OH"), 60), ["C", "H", "O"]),
             (rattled(bulk("Cu", "fcc", a=3.6), 30, skew=0.15, unwrap=True), ["Cu"]),
             (rattled(bulk("Mg", "hcp", a=3.2), 30, skew=0.15, unwrap=True), ["Mg"]),
             (rattled(fcc111("Cu", (2, 2, 3), vacuum=5.0), 20, unwrap=True), ["Cu"]),
             (wire, ["Au", "Cu"])]
    mixed = cases[1][0] + rattled(bulk("Cu", "fcc", a=3.6, cubic=True), 15)
    mixed = [mixed[k] for k in rng.permutation(len(mixed))]    # a rank's shuffled share: short runs
    cases.append((mixed, ["Cu"]))
    dense = 0
    for structures, species in cases:
        for cutoff in (3.0, 6.5):
            if structures is not mixed:             # one group: the dense path itself
                dense += dense_pair_minima(structures, cutoff) is not None
            minima: list = []
            rec = R.record_from_structures(structures, species, cutoff, minima)
            rows = np.concatenate(minima).astype(np.float64)
            cols = {k: c for c, k in enumerate(rec["pair_min_distance_A"])}
            ref = np.full(rows.shape, np.inf)
            for r, s in enumerate(structures):
                for k, d in R.structure_pair_minima(s.numbers, s.positions, s.cell, s.pbc, cutoff).items():
                    ref[r, cols[k]] = d
            fin = np.isfinite(ref)
            assert (np.isfinite(rows) == fin).all()
            assert (rows[fin] <= ref[fin]).all() and np.allclose(rows[fin], ref[fin], rtol=2e-7, atol=0)
            for k, c in cols.items():
                want = ref[:, c].min()
                got = rec["pair_min_distance_A"][k]
                assert (got is None) if not np.isfinite(want) else got == pytest.approx(want, rel=1e-12)
    assert dense >= 8          # the dense path ran (not only the fallback)


def test_resumed_in_place_warm_start_keeps_the_first_datas_record(emt_h5, tmp_path):
    """A warm start into the folder of its own model (output: run, warm_start: run/model.pt),
    stopped and resumed: the resume read the record from the warm-start file, which the first part
    had moved to run/previous-*, and the model lost the first data's record (sweep 14).  The
    checkpoint keeps the record the run started with; the resumed run stays bit-identical to an
    uninterrupted one."""
    import shutil

    import torch

    from distmlip.data.examples import rattled_cu_au
    from distmlip.data.h5store import write_dataset

    Trainer(_cfg(emt_h5, tmp_path / "run"), quiet=True).fit()
    first = BPNN.load(tmp_path / "run" / "model.pt").training_record
    new = tmp_path / "new.h5"
    write_dataset(new, rattled_cu_au(10, seed=7))
    shutil.copytree(tmp_path / "run", tmp_path / "u0")

    def fine(out, warm):
        cfg = _cfg(new, out, epochs=3)
        cfg.training.warm_start = str(warm)
        return cfg

    Trainer(fine(tmp_path / "u", tmp_path / "u0" / "model.pt"), quiet=True).fit()      # uninterrupted
    cfg = fine(tmp_path / "run", tmp_path / "run" / "model.pt")
    assert Trainer(cfg, quiet=True).fit(step_callback=lambda t: t.global_step >= 2) == "stopped"
    assert not (tmp_path / "run" / "model.pt").is_file()          # moved to previous-*
    assert Trainer(cfg, quiet=True, resume=str(tmp_path / "run" / "checkpoint.pt")).fit() == "done"
    ref = BPNN.load(tmp_path / "u" / "last_model.pt").training_record
    got = BPNN.load(tmp_path / "run" / "last_model.pt").training_record
    assert ref["n_structures"] > first["n_structures"] and first["data"][0] in ref["data"]
    assert got == ref
    a = torch.load(tmp_path / "u" / "last_model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "run" / "last_model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
