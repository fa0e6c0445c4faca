"""Contract tests that every descriptor implementation and every energy term must pass (in the
style of nequip's basic model tests): forces are minus the energy gradient (finite differences),
gradcheck of the positions' derivatives, invariance under translation and permutation of atoms,
(E, F) consistent with the per-atom energies, and every fast path equal to the reference.

A new descriptor type or energy term is added to the parameter lists below."""
import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

from distmlip._ext import has_kernel
from distmlip.data.structure import Structure
from distmlip.descriptors.batch import collate
from distmlip.descriptors.spec import DescriptorSpec
from distmlip.models.bpnn import BPNN

SPEC = DescriptorSpec(rc_radial=3.6, n_radial=4, rc_angular=3.0, n_angular=3)
SPECIES = ["Cu", "Au", "H"]
FUSED = has_kernel("chebyshev_forward", "cpu")
ONE_NODE = has_kernel("bpnn_energy_forces", "cpu")

# descriptor kernels (by name of the implementation)
DESCRIPTOR_KERNELS = ["reference"] + (["fused"] if FUSED else [])
# plans of the networks term: (backend request, pinned paths)
ANN_PLANS = {
    "reference": ("reference", {}),
    "autograd": ("reference", {"forces": "autograd"}),
}
if FUSED:
    ANN_PLANS["fused-closed-form"] = ("fused", {"forces": "closed-form"})
    ANN_PLANS["fused-torch-networks"] = ("fused", {"forces": "closed-form", "networks": "torch"})
if ONE_NODE:
    ANN_PLANS["one-node"] = ("fused", {"forces": "one-node"})


def _structures(seed=0):
    rng = np.random.default_rng(seed)
    a = bulk("Cu", "fcc", a=3.7, cubic=True)
    a.symbols[1] = "Au"
    a.symbols[2] = "H"
    a.positions += rng.normal(0, 0.12, a.positions.shape)
    m = molecule("CH4")
    m.set_chemical_symbols(["Au", "Cu", "H", "Au", "H"])
    m.positions *= 1.5
    m.positions += rng.normal(0, 0.05, m.positions.shape)
    # a compressed cluster: pairs inside the ZBL radii (Cu-Au 1.5 A, H-Cu 0.9 A)
    c = molecule("H2O")
    c.set_chemical_symbols(["Cu", "Au", "H"])
    c.positions = np.array([[0.0, 0.0, 0.0], [1.5, 0.1, 0.0], [0.2, 0.88, 0.1]]) + rng.normal(0, 0.02, (3, 3))
    out = []
    for at, e in ((a, -1.0), (m, -2.0), (c, -0.5)):
        cell = np.array(at.cell) if at.pbc.any() else np.zeros((3, 3))
        out.append(Structure(at.numbers.copy(), at.positions.copy(), cell, at.pbc.copy(), energy=e))
    return out


def _model(zbl=None, seed=0):
    torch.manual_seed(seed)
    m = BPNN(SPECIES, SPEC, hidden=[6, 5], activation=["tanh", "softplus"], zbl=zbl)
    with torch.no_grad():
        m.ann.feature_mean.uniform_(-0.5, 0.5)
        m.ann.feature_std.uniform_(0.5, 2.0)
        m.ann.energy_shift.copy_(torch.tensor([-3.5, -2.1, -1.0], dtype=torch.float64))
        m.ann.energy_scale.fill_(0.3)
        for p in m.parameters():
            p.mul_(2.0)
    return m


def _batch(model, structs):
    return collate(structs, species=model.species, cutoff=model.cutoff)


# ------------------------------------------------------------------------------------------
# descriptor implementations
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernels", DESCRIPTOR_KERNELS)
def test_descriptor_contract(kernels):
    desc = SPEC.build(SPECIES)
    structs = _structures(1)
    b = collate(structs, SPECIES, desc.cutoff)
    args = (b.species, b.pair_i, b.pair_j, b.pair_shift)
    G_ref = desc(b.positions, *args, kernels="reference")
    G = desc(b.positions, *args, pair_ptr=b.pair_ptr, kernels=kernels)
    assert G.shape == (b.n_atoms, SPEC.dim(len(SPECIES)))
    torch.testing.assert_close(G, G_ref, rtol=1e-12, atol=1e-12)
    # first and second derivatives in the positions against finite differences
    small = collate([structs[1]], SPECIES, desc.cutoff)
    sargs = (small.species, small.pair_i, small.pair_j, small.pair_shift)
    w = torch.linspace(-1, 1, desc.dim, dtype=torch.float64)
    f = lambda x: (torch.tanh(desc(x, *sargs, kernels=kernels)) * w).sum(1)  # noqa: E731
    x = small.positions.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)
    assert torch.autograd.gradgradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)
    # translation invariance and permutation equivariance
    shifted = desc(b.positions + torch.tensor([0.3, -1.1, 2.0], dtype=torch.float64), *args, kernels=kernels)
    torch.testing.assert_close(shifted, G, rtol=1e-10, atol=1e-10)
    perm = np.random.default_rng(2).permutation(len(structs[0].numbers))
    s0 = structs[0]
    sp = Structure(s0.numbers[perm], s0.positions[perm], s0.cell, s0.pbc, energy=s0.energy)
    bp = collate([sp], SPECIES, desc.cutoff)
    Gp = desc(bp.positions, bp.species, bp.pair_i, bp.pair_j, bp.pair_shift, kernels=kernels)
    torch.testing.assert_close(Gp, G[:len(perm)][torch.as_tensor(perm)], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------
# energy terms
# ------------------------------------------------------------------------------------------

def _terms():
    """(name, model, term index) of every energy term under every plan it runs on."""
    out = []
    for plan, (backend, pinned) in ANN_PLANS.items():
        out.append((f"ann-{plan}", backend, pinned, None, 0))
    out.append(("zbl", "reference", {}, {}, 1))
    return out


@pytest.mark.parametrize("name,backend,pinned,zbl,term", _terms(), ids=[t[0] for t in _terms()])
def test_energy_term_contract(name, backend, pinned, zbl, term):
    m = _model(zbl=zbl)
    m.set_plan(backend, **pinned)
    t = m.terms[term]
    structs = _structures(3)
    b = _batch(m, structs)
    b.positions.requires_grad_(True)
    plan = m.plan()
    E, F = t.energy_and_forces(b, plan, create_graph=False)
    e = t.atomic_energies(b, plan)
    Ea = torch.zeros(b.n_structures, dtype=torch.float64).index_add(0, b.structure, e)
    torch.testing.assert_close(E, Ea.detach(), rtol=1e-12, atol=1e-10)
    assert E.dtype == torch.float64 and F.shape == b.positions.shape
    assert float(F.abs().max()) > 1e-6          # the test structures put atoms inside the term's range
    # forces = -dE/dR by central differences
    pos0 = b.positions.detach().clone()
    h = 1e-5
    for atom, comp in [(0, 0), (2, 1), (b.n_atoms - 1, 2), (5, 2)]:
        vals = []
        for sgn in (1, -1):
            p = pos0.clone()
            p[atom, comp] += sgn * h
            b.positions = p
            with torch.no_grad():
                vals.append(float(t.atomic_energies(b, plan).sum()))
        fd = -(vals[0] - vals[1]) / (2 * h)
        assert abs(fd - float(F[atom, comp])) < 1e-6 * max(1.0, abs(fd)), (atom, comp, fd, float(F[atom, comp]))
    # translation invariance, and the sum of forces of each structure vanishes
    b.positions = (pos0 + torch.tensor([0.7, -0.2, 1.3], dtype=torch.float64)).requires_grad_()
    E2, F2 = t.energy_and_forces(b, plan, create_graph=False)
    torch.testing.assert_close(E2, E, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(F2, F, rtol=1e-9, atol=1e-9)
    net = torch.zeros(b.n_structures, 3, dtype=torch.float64).index_add(0, b.structure, F)
    assert float(net.abs().max()) < 1e-9 * max(1.0, float(F.abs().max()))
    # gradcheck of the term's energy in the positions (the molecule)
    mb = _batch(m, structs[1:])
    def f(x):
        mb.positions = x
        return t.atomic_energies(mb, plan).sum()
    x = mb.positions.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("plan", [p for p in ANN_PLANS if p != "reference"])
def test_fast_paths_equal_the_reference_in_force_training(plan):
    """E, F, the weight gradients of a force + energy loss and the positions' gradient (plain
    backward) of every plan equal the pure-PyTorch reference's, ZBL included."""
    out = {}
    for name in ("reference", plan):
        m = _model(zbl={}, seed=4)
        backend, pinned = ANN_PLANS[name]
        m.set_plan(backend, **pinned)
        b = _batch(m, _structures(5))
        E, F = m.energy_and_forces(b, create_graph=True)
        target = torch.linspace(-1, 1, F.numel(), dtype=torch.float64).reshape(F.shape)
        loss = (E ** 2).sum() * 1e-2 + ((F - target) ** 2).sum()
        m.zero_grad(set_to_none=True)
        loss.backward()
        w = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in m.parameters()]
        out[name] = (E.detach(), F.detach(), w, b.positions.grad.clone())
    (E1, F1, w1, x1), (E2, F2, w2, x2) = out["reference"], out[plan]
    torch.testing.assert_close(E2, E1, rtol=0, atol=1e-10)
    torch.testing.assert_close(F2, F1, rtol=0, atol=1e-10)
    for a, c in zip(w2, w1):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9 * max(1.0, float(c.abs().max())))
    torch.testing.assert_close(x2, x1, rtol=1e-9, atol=1e-9 * max(1.0, float(x1.abs().max())))
