"""ASE calculator: forces = -dE/dR, molecules and periodic cells, NVE MD energy conservation
with a model trained on EMT data, and an ASE optimiser run."""
import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

from distmlip.calculator import DistmlipCalculator
from distmlip.data.h5store import write_dataset
from distmlip.data.structure import Structure
from distmlip.descriptors.spec import DescriptorSpec
from distmlip.training.config import TrainConfig, DataConfig, DescriptorConfig, ModelConfig, TrainingConfig
from distmlip.training.trainer import Trainer


@pytest.fixture(scope="module")
def emt_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("calc")
    rng = np.random.default_rng(1)
    structs = []
    for k in range(30):
        a = bulk("Cu", "fcc", a=3.61, cubic=True)
        a.symbols[0] = "Au"
        a.set_cell(a.cell[:] * (1 + rng.normal(0, 0.01)), scale_atoms=True)
        a.positions += rng.normal(0, 0.1, a.positions.shape)
        a.calc = EMT()
        structs.append(Structure(a.numbers.copy(), a.positions.copy(), np.array(a.cell), a.pbc.copy(),
                                 energy=a.get_potential_energy(), forces=a.get_forces().copy(),
                                 source="emt", source_index=k))
    write_dataset(d / "emt.h5", structs)
    cfg = TrainConfig(
        data=DataConfig(train=[str(d / "emt.h5")], fractions=[0.8, 0.2, 0.0]),
        descriptor=DescriptorConfig(DescriptorSpec(rc_radial=4.5, n_radial=6, rc_angular=3.5, n_angular=3),
                                    backend="reference"),
        model=ModelConfig(hidden=[8, 8]),
        training=TrainingConfig(mode="force", alpha=0.5, epochs=8, batch_atoms=40, lr=0.01,
                                output=str(d / "run"), progress_bar="off"))
    Trainer(cfg, quiet=True).fit()
    return d / "run" / "model.pt"


def test_calculator_forces_finite_difference(emt_model):
    a = bulk("Cu", "fcc", a=3.61, cubic=True)
    a.symbols[0] = "Au"
    a.positions += np.random.default_rng(2).normal(0, 0.05, a.positions.shape)
    a.calc = DistmlipCalculator(emt_model)
    F = a.get_forces()
    h = 1e-5
    for i, c in [(0, 0), (2, 1), (3, 2)]:
        e = []
        for s in (1, -1):
            b = a.copy()
            b.calc = a.calc
            b.positions[i, c] += s * h
            e.append(b.get_potential_energy())
        assert abs(-(e[0] - e[1]) / (2 * h) - F[i, c]) < 1e-6
    assert np.isclose(a.get_potential_energy(), a.calc.results["energies"].sum())


def test_calculator_molecule_and_translation_invariance(emt_model):
    from ase import Atoms

    m = Atoms("Cu2Au", positions=[[0, 0, 0], [2.5, 0, 0], [1.2, 2.1, 0.3]])
    m.calc = DistmlipCalculator(emt_model)
    e0, f0 = m.get_potential_energy(), m.get_forces()
    assert np.abs(f0.sum(0)).max() < 1e-10  # no external force on a free molecule
    m.positions += [3.0, -1.0, 7.0]
    assert np.isclose(m.get_potential_energy(), e0, atol=1e-10)


def test_calculator_mixed_periodicity_and_its_stress(emt_model):
    """A wire periodic along z, with its atoms across the cell boundary, equals the same wire in a
    box wider than the cutoff; the stress of a wire with zero non-periodic cell vectors (no volume)
    is refused saying why (sweep 18: ASE's bare "stress not present in this calculation")."""
    from ase.calculators.calculator import PropertyNotImplementedError

    w = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 1))
    w.symbols[0] = "Au"
    w.positions += np.random.default_rng(4).normal(0, 0.05, w.positions.shape)
    w.positions[:, 2] += 2.5
    w.set_cell([[20, 0, 0], [0, 20, 0], [0, 0, 3.61]])
    w.pbc = [False, False, True]
    w.calc = DistmlipCalculator(emt_model)
    box = w.copy()
    box.pbc = True
    box.set_cell([[30, 0, 0], [0, 30, 0], [0, 0, 3.61]])
    box.calc = w.calc
    assert abs(w.get_potential_energy() - box.get_potential_energy()) < 1e-10
    assert np.abs(w.get_forces() - box.get_forces()).max() < 1e-10
    assert np.abs(w.get_stress() * w.get_volume() - box.get_stress() * box.get_volume()).max() < 1e-10
    z = w.copy()
    z.set_cell([[0, 0, 0], [0, 0, 0], [0, 0, 3.61]])
    z.calc = w.calc
    assert abs(z.get_potential_energy() - w.get_potential_energy()) < 1e-10
    with pytest.raises(PropertyNotImplementedError, match="no stress for .*cell has no volume"):
        z.get_stress()


def test_calculator_refuses_empty_and_non_finite(emt_model):
    """Coincident atoms (ZBL's 1/r) give an error naming the pair, not E = inf and NaN forces
    that an optimiser or MD would carry on; an empty structure says so."""
    from ase import Atoms

    from distmlip.errors import InputError, NonFiniteError

    a = Atoms("Cu2Au", positions=[[0, 0, 0], [0, 0, 0], [2.5, 0, 0]])
    a.calc = DistmlipCalculator(emt_model)
    with pytest.raises(NonFiniteError, match=r"non-finite .* for AuCu2 \(3 atoms\); its shortest pair is atoms [01] and [01] at 0 A"):
        a.get_potential_energy()
    e = Atoms()
    e.calc = DistmlipCalculator(emt_model)
    with pytest.raises(InputError, match="no atoms"):
        e.get_potential_energy()


def test_md_energy_conservation_and_optimiser(emt_model, capsys):
    a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    a.symbols[0] = "Au"
    a.symbols[5] = "Au"
    a.calc = DistmlipCalculator(emt_model)
    thermalize_momenta(a, 300, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(a, timestep=1.0 * units.fs)
    etot = [a.get_total_energy()]
    for _ in range(100):
        dyn.run(1)
        etot.append(a.get_total_energy())
    etot = np.array(etot)
    n = len(a)
    drift = (etot.max() - etot.min()) / n
    with capsys.disabled():
        print(f"\n[MD NVE, {n} atoms, 100 x 1 fs, 300 K] total energy max-min {1e3 * drift:.4f} meV/atom, "
              f"end-start {1e3 * (etot[-1] - etot[0]) / n:.4f} meV/atom")
    assert drift < 1e-3  # eV/atom (1 meV/atom) over 100 fs
    # an optimiser runs and lowers the energy
    b = a.copy()
    b.calc = DistmlipCalculator(emt_model)
    b.positions += np.random.default_rng(3).normal(0, 0.05, b.positions.shape)
    e0 = b.get_potential_energy()
    BFGS(b, logfile=None).run(fmax=0.05, steps=50)
    assert b.get_potential_energy() < e0
