"""Refitting the normalisation of a trained model on new data while keeping its energies and
forces (what explore does before each warm start): the buffers change, the function does not."""
import numpy as np
import pytest
import torch

from distmlip.data.examples import rattled_cu_au
from distmlip.descriptors.batch import collate
from distmlip.models.bpnn import BPNN

DESC = {"rc_radial": 4.0, "n_radial": 4, "rc_angular": 3.0, "n_angular": 2, "backend": "reference"}


@pytest.mark.parametrize("hidden,dtype,zbl", [([6, 5], "float64", None), ([], "float64", {}), ([4], "float32", {})])
def test_refit_keeps_energies_and_forces(hidden, dtype, zbl):
    torch.manual_seed(0)
    old = rattled_cu_au(8, seed=1)
    new = rattled_cu_au(8, seed=2)
    for s in new:                      # new data: hotter and higher in energy than the old
        s.positions = s.positions + np.random.default_rng(3).normal(0, 0.2, s.positions.shape)
        s.energy = s.energy + 0.5 * len(s.numbers)
    m = BPNN(["Cu", "Au"], DESC, hidden, "tanh", dtype, zbl=zbl)
    m.fit_normalization([collate(old, m.species, cutoff=m.cutoff)])
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    probe = collate(new + old[:2], m.species, cutoff=m.cutoff)
    E0, F0 = m.energy_and_forces(probe)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    summ = m.refit_normalization_keeping_function([collate(new, m.species, cutoff=m.cutoff)])
    assert summ["kept_function"] and summ["n_structures"] == 8
    after = m.state_dict()
    for k in ("ann.feature_mean", "ann.feature_std", "ann.energy_shift", "ann.energy_scale"):
        assert not torch.equal(before[k], after[k]), k       # the normalisation did change
    probe = collate(new + old[:2], m.species, cutoff=m.cutoff)
    E1, F1 = m.energy_and_forces(probe)
    tol = 1e-9 if dtype == "float64" else 2e-3
    torch.testing.assert_close(E1, E0, rtol=0, atol=tol * 20)
    torch.testing.assert_close(F1, F0, rtol=0, atol=tol * 20)
    # and a plain fit (what a new model gets) would not keep them
    m2 = BPNN(["Cu", "Au"], DESC, hidden, "tanh", dtype, zbl=zbl)
    m2.load_state_dict(before)
    m2.fit_normalization([collate(new, m.species, cutoff=m.cutoff)])
    E2, _ = m2.energy_and_forces(collate(new + old[:2], m.species, cutoff=m.cutoff))
    assert float((E2 - E0).abs().max()) > 0.1


def _train_old(tmp_path, epochs: int):
    """A small energy model trained on tmp_path/old.h5 (config tmp_path/c.yaml, output r1)."""
    from distmlip.training.config import load_train_config
    from distmlip.training.trainer import Trainer

    (tmp_path / "c.yaml").write_text(f"""
data: {{train: [{tmp_path / 'old.h5'}], fractions: [1.0, 0.0, 0.0]}}
descriptor: {{rc_radial: 4.0, n_radial: 4, rc_angular: 3.0, n_angular: 2, backend: reference}}
model: {{hidden: [5]}}
training: {{mode: energy, epochs: {epochs}, batch_atoms: 40, lr: 1.0e-2, output: {tmp_path / 'r1'}, progress_bar: 'off'}}
""")
    Trainer(load_train_config(tmp_path / "c.yaml"), quiet=True).fit()
    return BPNN.load(tmp_path / "r1" / "model.pt")


def test_warm_start_refit_keeps_the_function_and_absent_elements(tmp_path):
    """A warm start with ``refit_normalization: true`` (sweep 7): on data without Au, the plain fit
    set Au's feature statistics to mean 0 / std 1 and its energy shift to the Cu mean (energy
    MAE on the old data 20 -> 109 meV/atom, exit 0); on data with every element the networks were
    reused under the new statistics (20 -> 37 meV/atom before any step).  Now the refit keeps the
    model's energies and Au's statistics."""
    from distmlip.data.h5store import write_dataset
    from distmlip.training.config import load_train_config
    from distmlip.training.trainer import Trainer

    old = rattled_cu_au(12, seed=1)
    cu = [s for s in rattled_cu_au(40, seed=5) if set(s.numbers.tolist()) == {29}]
    assert len(cu) >= 2
    for s in cu:
        s.energy += 0.3 * len(s.numbers)                     # the new data sit higher
    write_dataset(tmp_path / "old.h5", old)
    write_dataset(tmp_path / "cu.h5", cu)
    m0 = _train_old(tmp_path, epochs=3)
    probe = collate(old, m0.species, cutoff=m0.cutoff)
    with torch.no_grad():
        E0 = m0(probe)
    for data, tag in (([tmp_path / "cu.h5"], "cu"), ([tmp_path / "cu.h5", tmp_path / "old.h5"], "all")):
        ov = {"data.train": [str(p) for p in data], "training.warm_start": str(tmp_path / "r1" / "model.pt"),
              "training.refit_normalization": True,
              "training.output": str(tmp_path / tag)}
        tr = Trainer(load_train_config(tmp_path / "c.yaml", ov), quiet=True)
        with torch.no_grad():
            E1 = tr.model.to("cpu")(collate(old, m0.species, cutoff=m0.cutoff))
        torch.testing.assert_close(E1, E0, rtol=0, atol=1e-9)
        sd0, sd1 = m0.state_dict(), tr.model.state_dict()
        if tag == "cu":      # Au has no atoms there: its statistics and shift stay the model's
            au = m0.species.index("Au")
            assert torch.equal(sd1["ann.feature_mean"][au], sd0["ann.feature_mean"][au])
            assert torch.equal(sd1["ann.feature_std"][au], sd0["ann.feature_std"][au])
            assert sd1["ann.energy_shift"][au] == sd0["ann.energy_shift"][au]
        else:
            assert not torch.equal(sd1["ann.feature_mean"], sd0["ann.feature_mean"])


def test_a_new_models_absent_species_still_get_the_neutral_statistics():
    m = BPNN(["Cu", "Au"], DESC, [4], "tanh", "float64")
    cu = [s for s in rattled_cu_au(40, seed=5) if set(s.numbers.tolist()) == {29}]
    summ = m.fit_normalization([collate(cu, m.species, cutoff=m.cutoff)])
    assert summ["absent_species"] == ["Au"]
    assert torch.equal(m.ann.feature_std[1], torch.ones_like(m.ann.feature_std[1]))
    assert abs(float(m.ann.energy_shift[1]) - float(m.ann.energy_shift[0])) < 1e-12


def test_warm_start_adopts_declared_reference_energies_and_warns_on_a_moved_zero(tmp_path, capsys):
    """New DFT data with another energy zero (sweep 14: every energy -3.5 eV/atom, declared with
    convert --reference-energies): the warm start kept the model's references silently and its
    networks had to learn the offset (2.5 eV/atom error after 40 epochs, exit 0).  Now the declared
    references are adopted (the model's energies move by them, the networks are kept), the first
    data's record moves with them, and an undeclared move of eV per atom is warned about."""
    from distmlip.data.h5store import write_dataset
    from distmlip.errors import ConfigError
    from distmlip.training.config import load_train_config
    from distmlip.training.trainer import Trainer

    old = rattled_cu_au(12, seed=1)
    write_dataset(tmp_path / "old.h5", old)
    new = rattled_cu_au(12, seed=1)
    for s in new:
        s.energy += (-3.5 + 0.2) * len(s.numbers)           # another zero, and sampled 0.2 eV/atom higher
    write_dataset(tmp_path / "new_ref.h5", new, reference_energies={"Cu": -3.5, "Au": -3.5})
    write_dataset(tmp_path / "new_bare.h5", new)
    m0 = _train_old(tmp_path, epochs=2)
    probe = collate(old, m0.species, cutoff=m0.cutoff)
    n_atoms = torch.tensor([len(s.numbers) for s in old], dtype=torch.float64)
    with torch.no_grad():
        E0 = m0(probe)
    ws = {"training.warm_start": str(tmp_path / "r1" / "model.pt"), "training.output": str(tmp_path / "w")}
    tr = Trainer(load_train_config(tmp_path / "c.yaml", {**ws, "data.train": [str(tmp_path / "new_ref.h5")]}),
                 quiet=True)
    with torch.no_grad():
        E1 = tr.model.to("cpu")(collate(old, m0.species, cutoff=m0.cutoff))
    torch.testing.assert_close(E1, E0 - 3.5 * n_atoms, rtol=0, atol=1e-9)
    assert tr.model.ann.reference_energies() == {"Cu": -3.5, "Au": -3.5}
    lowest_old = m0.training_record["energy_per_atom_min"]
    lowest = tr.model.training_record["energy_per_atom_min"]
    for k, v in lowest_old.items():      # the first data, in the new zero, are the lowest
        assert abs(lowest[k] - (v - 3.5)) < 1e-9, (k, lowest[k], v)
    capsys.readouterr()
    Trainer(load_train_config(tmp_path / "c.yaml", {**ws, "data.train": [str(tmp_path / "new_bare.h5")],
                                                    "training.output": str(tmp_path / "w2")}), quiet=False)
    err = capsys.readouterr().err
    assert "another DFT code" in err and "-3.3 eV/atom" in err, err[-2000:]
    with pytest.raises(ConfigError, match="not species of the warm-start model"):
        Trainer(load_train_config(tmp_path / "c.yaml", {**ws, "data.train": [str(tmp_path / "new_ref.h5")],
                                                        "model.reference_energies": {"Ni": -1.0},
                                                        "training.output": str(tmp_path / "w3")}), quiet=True)
