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

SPEC = {"type": "chebyshev", "rc_radial": 4.6, "n_radial": 5, "rc_angular": 3.8, "n_angular": 3}


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
    # the virial frames repeat the first two: kept on purpose here
    convert(ConvertConfig(inputs=[str(tmp_path / "s.extxyz"), str(tmp_path / "v.extxyz")], output=str(out),
                          keep_duplicates=True))
    ds = H5Dataset(out)
    assert ds.n_structures == len(frames) + 2
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
    # a slab whose vacuum vector is zero: no volume to divide the virial by, so the model's
    # stress is 0 and the label was trained and evaluated against it (sweep 18)
    s.cell = a.cell[:].copy()
    s.cell[2] = 0.0
    s.pbc = np.array([True, True, False])
    with pytest.raises(InputError, match=r"field 'stress': stress on a structure whose cell has no volume"):
        validate([s])
    s.cell[2] = [0.0, 0.0, 20.0]                              # the same slab with its vacuum vector
    assert validate([s])[0] == [s]


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


# ------------------------------------------------------------------------------------ training
def _labelled_batch(m, seed=0):
    """Three periodic triclinic structures (2, 4 and 8 atoms) with random labels, one without
    stress, and a molecule."""
    from ase.build import molecule

    rng = np.random.default_rng(seed)
    ats = [_triclinic((1, 1, 2), seed=1), _triclinic((1, 1, 1), seed=2, cubic=True),
           _triclinic((2, 1, 1), seed=3, cubic=True)]
    ats[0].numbers[0] = 79
    ats[2].numbers[[1, 5]] = 79
    mol = molecule("H2O")
    mol.numbers[:] = [29, 79, 29]
    mol.positions *= 2.0
    structs = []
    for k, a in enumerate(ats + [mol]):
        s = _struct(a)
        s.energy = float(rng.normal(0, 1))
        s.forces = rng.normal(0, 1, (len(a), 3))
        if k in (0, 2):
            x = rng.normal(0, 0.01, (3, 3))
            s.stress = x + x.T
        s.index = k
        structs.append(s)
    b = collate(structs, m.species, m.cutoff)
    b.weight = torch.tensor([1.0, 0.5, 2.0, 1.0], dtype=torch.float64)
    return b


@pytest.mark.parametrize("per_atom", [True, False])
def test_stress_loss_matches_the_written_out_loss(per_atom):
    from distmlip.training import losses

    m = _model("reference", zbl=False)
    b = _labelled_batch(m)
    sel = torch.tensor([True, True, False, True])
    ssel = torch.tensor([True, True, True, False])
    mask = losses.force_atom_mask(b, sel)
    smask = losses.stress_structure_mask(b, ssel)
    assert smask.tolist() == [True, False, True, False]
    counts = losses.local_counts(b, sel, True, ssel, True) * 1.5
    g = torch.Generator().manual_seed(0)
    E0 = b.energy + torch.randn(4, dtype=torch.float64, generator=g)
    F0 = b.forces + torch.randn(b.n_atoms, 3, dtype=torch.float64, generator=g)
    S0 = b.stress + 0.01 * torch.randn(4, 3, 3, dtype=torch.float64, generator=g)
    alpha, beta = 0.3, 0.2
    E, F, S = (x.clone().requires_grad_() for x in (E0, F0, S0))
    loss = losses.energy_force_loss(E, b, counts, per_atom=per_atom, alpha=alpha, F=F, mask=mask, compiled=True,
                                    beta=beta, S=S, smask=smask)
    loss.backward()
    E2, F2, S2 = (x.clone().requires_grad_() for x in (E0, F0, S0))
    n = b.natoms.double() if per_atom else torch.ones(4, dtype=torch.float64)
    L_E = (b.weight * ((E2 - b.energy) / n) ** 2).sum() / counts[0]
    wa = b.weight[b.structure] * mask.double()
    L_F = (wa[:, None] * (F2 - b.forces) ** 2).sum() / counts[1]
    V = torch.linalg.det(b.cell).abs()
    v = (S2 - b.stress) * (V / n)[:, None, None]
    L_S = ((b.weight * smask.double())[:, None, None] * v * v).sum() / counts[2]
    ref = (1 - alpha - beta) * L_E + alpha * L_F + beta * L_S
    ref.backward()
    assert torch.allclose(loss.detach(), ref.detach(), rtol=1e-13, atol=0)
    for a, r in ((E.grad, E2.grad), (F.grad, F2.grad), (S.grad, S2.grad)):
        assert torch.allclose(a, r, rtol=1e-12, atol=1e-16)
    assert float(S.grad.abs().max()) > 0
    # the closed-form stress term (one-node step) against autograd through stress = sym(W) / V
    from distmlip.descriptors.batch import stress_from_virial

    W = (S0 * torch.linalg.det(b.cell).abs()[:, None, None]).clone().requires_grad_()
    ls, gW, S_w = losses.stress_term_and_gradient(W.detach(), b, counts, per_atom=per_atom, beta=beta, smask=smask)
    ref_s = beta * ((b.weight * smask.double())[:, None, None]
                    * ((stress_from_virial(W, b) - b.stress) * (V / n)[:, None, None]) ** 2).sum() / counts[2]
    ref_s.backward()
    assert torch.allclose(ls, ref_s.detach(), rtol=1e-13, atol=0) and float(ls) > 0
    assert torch.allclose(gW, W.grad, rtol=1e-12, atol=1e-18) and float(gW.abs().max()) > 0
    own = losses.local_counts(b, sel, True, ssel, True)
    sums = losses.loss_sums(E0, b, per_atom=per_atom, F=F0, mask=mask, S=S0, smask=smask)
    torch.testing.assert_close(sums[[1, 3, 5]], own, rtol=1e-15, atol=0)
    whole = losses.energy_force_loss(E0, b, own, per_atom=per_atom, alpha=alpha, F=F0, mask=mask, beta=beta,
                                     S=S0, smask=smask)
    assert abs(losses.loss_from_sums(sums, alpha=alpha, force_mode=True, beta=beta) - float(whole)) \
        < 1e-13 * float(whole)


def _with_close_pair(seed=6):
    """A periodic Cu/Au cell with one pair inside ZBL's outer radius (Cu-Cu 1.98 A)."""
    a = _triclinic((2, 1, 1), seed=seed, cubic=True)
    a.numbers[3] = 79
    d = a.positions[1] - a.positions[0]
    a.positions[1] = a.positions[0] + 1.6 * d / np.linalg.norm(d)
    return a


def test_virial_operator_equals_autograd():
    """The one-node operator's virial (summed per centre from the VJP's pair gradients, ZBL's from
    its pair gradients) equals autograd through the strained batch to 1e-12, with a molecule (zero
    stress) and a ZBL pair in the batch; both bitwise unchanged for 1 and 2 threads."""
    from distmlip._ext import has_kernel
    from distmlip.models import forces_op

    if not has_kernel("bpnn_energy_forces_virial", "cpu"):
        pytest.skip("no compiled kernels")
    from ase.build import molecule

    m = _model("fused", zbl=True, seed=2)
    mol = molecule("H2O")
    mol.numbers[:] = [29, 79, 29]
    mol.positions *= 2.0
    structs = [_struct(_triclinic((1, 1, 2), seed=1)), _struct(mol), _struct(_with_close_pair())]
    b = collate(structs, m.species, m.cutoff)
    assert m.plan().forces == "one-node" and forces_op.virial_supported(m.ann, b)
    E, F, S = m.energy_forces_stress(b)
    E2, F2, S2 = (x.detach() for x in m.energy_forces_stress(collate(structs, m.species, m.cutoff),
                                                               create_graph=True))
    assert float(m.zbl.energy_forces_virial(b)[2][2].abs().max()) > 1e-3     # ZBL carries a virial there
    assert torch.all(S[1] == 0) and float(S.abs().max()) > 1e-3
    for a, r in ((E, E2), (F, F2), (S, S2)):
        assert torch.allclose(a, r, rtol=0, atol=1e-12), (a - r).abs().max()
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = m.energy_forces_stress(collate(structs, m.species, m.cutoff))[2]
        torch.set_num_threads(2)
        two = m.energy_forces_stress(collate(structs, m.species, m.cutoff))[2]
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)


@pytest.mark.parametrize("alpha,beta", [(0.3, 0.4), (0.0, 0.6)])
def test_stress_loss_weight_gradients_equal_the_reference(alpha, beta):
    """The trainer's stress step (the one-node operator: virial from the VJP, the strain direction
    in the JVP) gives the weight gradients of autograd through the pure-PyTorch descriptor, to
    1e-10, also without a force term."""
    from distmlip._ext import has_kernel
    from distmlip.training.flat import FlatParameters
    from distmlip.training.force_step import force_stress_loss_and_gradients
    from distmlip.training.losses import (
        force_atom_mask,
        local_counts,
        stress_structure_mask,
    )

    from distmlip.models import forces_op

    out = []
    for backend in ("fused" if has_kernel("chebyshev_forward", "cpu") else "auto", "reference"):
        m = _model(backend, zbl=True, seed=4)
        b = _labelled_batch(m, seed=1)
        if backend == "fused":     # the engine-free path, not the autograd fallback
            assert m.plan().forces == "one-node" and forces_op.virial_supported(m.ann, b)
        mask, smask = force_atom_mask(b, None), stress_structure_mask(b, None)
        counts = local_counts(b, None, True, None, True) * 1.2
        if backend == "reference":      # autograd through the reference descriptor, written out
            E, F, S = m.energy_forces_stress(b, create_graph=True)
            from distmlip.training.losses import energy_force_loss

            loss = energy_force_loss(E, b, counts, per_atom=True, alpha=alpha, F=F, mask=mask, beta=beta, S=S,
                                     smask=smask)
            grads = torch.autograd.grad(loss, list(m.parameters()))
            out.append((loss.detach(), torch.cat([x.reshape(-1) for x in grads])))
            continue
        flat = FlatParameters(m)
        flat.zero_grad()
        loss, E, F, S = force_stress_loss_and_gradients(m, flat, b, counts, per_atom=True, alpha=alpha,
                                                        mask=mask, beta=beta, smask=smask)
        flat.sync()
        assert S is not None and not loss.requires_grad
        out.append((loss, flat.tensors[0].grad.clone()))
    (l1, g1), (l2, g2) = out
    assert torch.allclose(l1, l2, rtol=1e-12, atol=0)
    assert float(g2.abs().max()) > 0
    assert float((g1 - g2).abs().max()) < 1e-10 * max(1.0, float(g2.abs().max())), (g1 - g2).abs().max()
