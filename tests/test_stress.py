"""Stress and virial end to end: read and store (convert, HDF5), predict (both descriptor
backends, the calculator), train (the stress term of the loss)."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from distmlip.data.convert import ConvertConfig, convert
from distmlip.data.h5store import H5Dataset, write_dataset
from distmlip.data.structure import Structure
from distmlip.data.validate import validate
from distmlip.descriptors.batch import collate
from distmlip.errors import InputError
from distmlip.models.bpnn import BPNN

SPEC = dict(type="chebyshev", rc_radial=4.6, n_radial=5, rc_angular=3.8, n_angular=3)


def _struct(a) -> Structure:
    return Structure(numbers=np.asarray(a.numbers), positions=a.positions.copy(), cell=a.cell[:].copy(),
                     pbc=np.asarray(a.pbc))


def _triclinic(n_repeat=(1, 1, 1), seed=2, cubic=False):
    from ase.build import bulk

    a = bulk("Cu", "fcc", a=3.6, cubic=cubic).repeat(n_repeat)
    a.set_cell(a.cell[:] @ (np.eye(3) + np.array([[0.01, 0.05, 0.0], [0.0, -0.02, 0.03], [0.04, 0.0, 0.02]])),
               scale_atoms=True)
    a.rattle(0.05, seed=seed)
    return a


def _model(backend, zbl=True, seed=0):
    torch.manual_seed(seed)
    m = BPNN(["Cu", "Au"], SPEC, hidden=[5, 5], backend=backend, zbl={} if zbl else None)
    for p in m.parameters():
        p.data.normal_(0.0, 0.5)
    return m


def _energy(m, a) -> float:
    with torch.no_grad():
        return float(m(collate([_struct(a)], m.species, m.cutoff))[0])


def _fd_stress(m, a, h=1e-5) -> np.ndarray:
    """(1/V) dE/d(eps) by central differences of symmetric strains."""
    V = abs(np.linalg.det(a.cell[:]))
    fd = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            e = []
            for sg in (1, -1):
                eps = np.zeros((3, 3))
                eps[i, j] = sg * h
                eps = 0.5 * (eps + eps.T)
                b = a.copy()
                b.set_cell(a.cell[:] @ (np.eye(3) + eps), scale_atoms=True)
                e.append(_energy(m, b))
            fd[i, j] = (e[0] - e[1]) / (2 * h) / V
    return fd


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_stress_is_strain_derivative(backend):
    """Triclinic cells of 2 atoms (dozens of images of every atom within the cutoff) and 8 atoms,
    two species, ZBL on: the stress equals the finite-difference strain derivative of the energy;
    a molecule in the same batch gets zero stress and does not change the others'."""
    from ase.build import molecule

    if backend == "fused":
        from distmlip._ext import has_kernel

        if not has_kernel("chebyshev_forward", "cpu"):
            pytest.skip("no compiled kernels")
    m = _model(backend)
    small = _triclinic((1, 1, 2))
    small.numbers[0] = 79
    big = _triclinic((2, 1, 1), seed=3, cubic=True)
    big.numbers[[1, 4]] = 79
    mol = molecule("H2O")
    mol.numbers[:] = [29, 79, 29]
    mol.positions *= 2.0
    batch = collate([_struct(small), _struct(mol), _struct(big)], m.species, m.cutoff)
    E, F, S = m.energy_forces_stress(batch)
    assert torch.all(S[1] == 0)
    E2, F2 = m.energy_and_forces(collate([_struct(small), _struct(mol), _struct(big)], m.species, m.cutoff))
    assert torch.allclose(E, E2, rtol=0, atol=1e-10) and torch.allclose(F, F2, rtol=0, atol=1e-10)
    for k, a in ((0, small), (2, big)):
        fd = _fd_stress(m, a)
        s = S[k].numpy()
        assert np.abs(s).max() > 1e-3
        assert np.abs(fd - s).max() < 1e-8, (k, np.abs(fd - s).max())


def test_stress_backends_agree():
    from distmlip._ext import has_kernel

    if not has_kernel("chebyshev_forward", "cpu"):
        pytest.skip("no compiled kernels")
    a = _triclinic((1, 2, 1), seed=5, cubic=True)
    a.numbers[2] = 79
    out = []
    for backend in ("reference", "fused"):
        m = _model(backend, seed=1)
        out.append(m.energy_forces_stress(collate([_struct(a)], m.species, m.cutoff))[2])
    assert torch.allclose(out[0], out[1], rtol=0, atol=1e-12)


def test_calculator_stress():
    from distmlip.calculator import DistmlipCalculator

    m = _model("auto", zbl=False)
    a = _triclinic((1, 1, 2))
    a.calc = DistmlipCalculator(m)
    s = a.get_stress(voigt=False)
    fd = _fd_stress(m, a)
    assert np.abs(s - fd).max() < 1e-8
    from ase.build import molecule
    from ase.calculators.calculator import PropertyNotImplementedError

    mol = molecule("H2O")
    mol.numbers[:] = 29
    mol.positions *= 2.0
    mol.calc = DistmlipCalculator(m)
    with pytest.raises(PropertyNotImplementedError):
        mol.get_stress()


# ---------------------------------------------------------------------------------------- data
def _emt_frames(n=6, seed=0):
    from ase.build import bulk
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        a = bulk("Cu", "fcc", a=3.61 * (1 + rng.uniform(-0.03, 0.03)), cubic=True)
        a.set_cell(a.cell[:] @ (np.eye(3) + rng.normal(0, 0.02, (3, 3))), scale_atoms=True)
        a.rattle(0.05, seed=k)
        a.calc = EMT()
        a.get_potential_energy()
        a.get_forces()
        a.get_stress()
        out.append(a)
    return out


def test_convert_round_trip_extxyz_stress(tmp_path):
    """EMT-labelled frames written by ASE with their stress, and frames carrying a virial
    instead (the GAP/NEP extxyz convention W = -V stress): convert keeps the stress in ASE's sign
    and Voigt order, ``info`` reports it."""
    from ase.io import write

    from distmlip.data.info import format_summary, summarize

    frames = _emt_frames()
    ref = [a.get_stress(voigt=False) for a in frames]
    write(tmp_path / "s.extxyz", frames)
    vir = []
    for a in frames[:2]:
        b = a.copy()
        b.calc = None
        b.info["energy"] = a.get_potential_energy()
        b.arrays["forces"] = a.get_forces()
        b.info["virial"] = -a.get_volume() * a.get_stress(voigt=False)
        vir.append(b)
    write(tmp_path / "v.extxyz", vir)
    out = tmp_path / "d.h5"
    convert(ConvertConfig(inputs=[str(tmp_path / "s.extxyz"), str(tmp_path / "v.extxyz")], output=str(out)))
    ds = H5Dataset(out)
    got = ds.read(range(ds.n_structures))
    assert all(s.has_stress for s in got)
    for s, r in zip(got[:len(frames)], ref):
        assert np.abs(s.stress - r).max() < 1e-12
    for s, r in zip(got[len(frames):], ref[:2]):
        assert np.abs(s.stress - r).max() < 1e-12
    assert ds.column("has_stress").all()
    text = format_summary(summarize(ds))
    assert "stress        : mean |s_ij|" in text
    # the batch carries it
    b = collate(got, ["Cu"], 4.0)
    assert b.has_stress.all() and torch.allclose(b.stress[0], torch.as_tensor(ref[0]))
    # ASE round trip of a Structure
    a2 = got[0].to_ase()
    assert np.abs(a2.get_stress(voigt=False) - ref[0]).max() < 1e-12


def test_stress_validation_names_field(tmp_path):
    a = _emt_frames(1)[0]
    s = Structure(numbers=a.numbers, positions=a.positions, cell=a.cell[:], pbc=a.pbc, energy=1.0,
                  stress=np.full((3, 3), np.nan), source="x.extxyz", source_index=3)
    with pytest.raises(InputError, match=r"x.extxyz: structure 3: field 'stress': non-finite"):
        validate([s])
    s.stress = np.zeros((3, 3))
    s.pbc = np.zeros(3, bool)
    s.cell = np.zeros((3, 3))
    with pytest.raises(InputError, match=r"field 'stress': stress on a non-periodic structure"):
        validate([s])


def test_version_1_files_read_without_stress(tmp_path):
    """A data set of format version 1 (no stress fields) is read: no structure has stress."""
    a = _emt_frames(2)
    structs = [Structure(numbers=x.numbers, positions=x.positions, cell=x.cell[:], pbc=x.pbc,
                         energy=x.get_potential_energy(), forces=x.get_forces(), source="f", source_index=k,
                         stress=x.get_stress(voigt=False)) for k, x in enumerate(a)]
    p = tmp_path / "v1.h5"
    write_dataset(p, structs)
    with h5py.File(p, "a") as f:
        del f["structures/stress"], f["structures/has_stress"]
        del f.attrs["content_sha256"]
        f.attrs["version"] = 1
    ds = H5Dataset(p)
    got = ds.read([0, 1])
    assert not any(s.has_stress for s in got)
    assert not ds.column("has_stress").any()
    assert np.allclose(got[1].energy, structs[1].energy)
    assert len(ds.content_id) == 64
