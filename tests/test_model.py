"""BPNN: save/load round trip, forces = -dE/dR (finite differences), float64 energy sums,
normalisation fit, format checks."""
import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

from distmlip.data.structure import Structure
from distmlip.descriptors.batch import collate
from distmlip._ext import has_kernel
from distmlip.errors import ConfigError, DataFormatError
from distmlip.models.bpnn import BPNN

DESC = {"rc_radial": 4.0, "n_radial": 5, "rc_angular": 3.0, "n_angular": 3, "backend": "reference"}


def _structures(seed=0):
    rng = np.random.default_rng(seed)
    out = []
    a = bulk("Cu", "fcc", a=3.61, cubic=True)
    a.symbols[1] = "Au"
    a.positions += rng.normal(0, 0.1, a.positions.shape)
    out.append(Structure(a.numbers.copy(), a.positions.copy(), np.array(a.cell), a.pbc.copy(), energy=-1.0))
    m = molecule("CH4")
    m.set_chemical_symbols(["Au", "Cu", "Cu", "Au", "Cu"])
    m.positions *= 1.6
    m.positions += rng.normal(0, 0.05, m.positions.shape)
    out.append(Structure(m.numbers.copy(), m.positions.copy(), np.zeros((3, 3)), np.zeros(3, bool), energy=-2.0))
    return out


def _model(dtype="float64", act="tanh", seed=0):
    torch.manual_seed(seed)
    m = BPNN(["Cu", "Au", "H"], DESC, hidden=[6, 5], activation=act, dtype=dtype)
    with torch.no_grad():  # non-trivial normalisation buffers
        m.ann.feature_mean.uniform_(-0.5, 0.5)
        m.ann.feature_std.uniform_(0.5, 2.0)
        m.ann.energy_shift.copy_(torch.tensor([-3.5, -2.1, -1.0], dtype=torch.float64))
        m.ann.energy_scale.fill_(0.3)
    return m


def _batch(m, structs):
    return collate(structs, species=m.species, cutoff=m.cutoff)


def test_save_load_round_trip(tmp_path):
    m = _model(act=["softplus", "silu"], dtype="float32")
    m.ann.reference_energy[1] = -0.25
    p = tmp_path / "m.pt"
    m.save(p, metadata={"note": "x"})
    m2 = BPNN.load(p, backend="reference")     # the kernels are chosen at load, not stored
    s = _structures()
    e1, f1 = m.energy_and_forces(_batch(m, s))
    e2, f2 = m2.energy_and_forces(_batch(m2, s))
    assert torch.equal(e1, e2) and torch.equal(f1, f2)
    assert m2.config() == m.config() and m2.metadata["note"] == "x"
    assert e1.dtype == torch.float64


def test_load_refuses_other_files(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"format": "something-else", "version": 1}, p)
    with pytest.raises(DataFormatError, match="not a distmlip model"):
        BPNN.load(p)
    m = _model()
    pay = m.payload()
    pay["version"] = 99
    torch.save(pay, p)
    with pytest.raises(DataFormatError, match="version 99"):
        BPNN.load(p)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(DataFormatError, match="junk.pt"):
        BPNN.load(tmp_path / "junk.pt")


def test_bad_config_errors():
    with pytest.raises(ConfigError, match="activation"):
        BPNN(["Cu"], DESC, hidden=[4], activation="relu6")
    with pytest.raises(ConfigError, match="dtype"):
        BPNN(["Cu"], DESC, dtype="float16")


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "softplus", "silu", "linear"])
def test_forces_are_minus_gradient_finite_differences(act):
    m = _model(act=act)
    s = _structures(1)
    b = _batch(m, s)
    E, F = m.energy_and_forces(b)
    pos0 = b.positions.detach().clone()
    h = 1e-5
    rng = np.random.default_rng(0)
    for a in rng.choice(len(pos0), 4, replace=False):
        for c in range(3):
            vals = []
            for sgn in (1, -1):
                p = pos0.clone()
                p[a, c] += sgn * h
                b.positions = p
                with torch.no_grad():
                    vals.append(m(b).sum().item())
            fd = -(vals[0] - vals[1]) / (2 * h)
            assert abs(fd - F[a, c].item()) < 1e-7 * max(1.0, abs(fd)), (a, c, fd, F[a, c].item())


def test_energy_sum_float64_with_large_shift():
    """Total energies ~1e4 eV: meV differences between structures survive, also with a float32 net."""
    for dtype in ("float64", "float32"):
        m = _model(dtype=dtype)
        s = _structures(2)
        b = _batch(m, s)
        with torch.no_grad():
            e0 = m(b)
            m.ann.energy_shift += 1e4 / 4.0  # ~ +1e4 eV per 4-atom structure
            e1 = m(b)
        n = b.natoms.to(torch.float64)
        shift = 1e4 / 4.0 * n
        assert e1.dtype == torch.float64
        # the shift is exact up to float64 round-off (~1e-12 relative), far below 1 meV
        assert torch.allclose(e1 - shift, e0, atol=1e-9, rtol=0)
        d0 = (e0[0] - e0[1]).item()
        d1 = (e1[0] - e1[1] - (shift[0] - shift[1])).item()
        assert abs(d0 - d1) < 1e-9


def test_float32_network_matches_float64_at_mev_level():
    m64 = _model("float64")
    m32 = _model("float32")
    m32.load_state_dict({k: v.to(m32.state_dict()[k].dtype) for k, v in m64.state_dict().items()})
    s = _structures(3)
    with torch.no_grad():
        e64, e32 = m64(_batch(m64, s)), m32(_batch(m32, s))
    assert e32.dtype == torch.float64
    assert (e64 - e32).abs().max().item() < 1e-4  # eV


def test_fit_normalization_guards_and_shift():
    m = BPNN(["Cu", "Au", "H"], DESC, hidden=[4])
    s = _structures(4)
    # per-atom energies known: Cu -3, Au -2 per atom, then energies consistent with that
    for st in s:
        nCu = int((st.numbers == 29).sum())
        nAu = int((st.numbers == 79).sum())
        st.energy = -3.0 * nCu - 2.0 * nAu
    summary = m.fit_normalization([_batch(m, s)])
    assert summary["n_structures"] == 2
    assert torch.allclose(m.ann.energy_shift[:2], torch.tensor([-3.0, -2.0], dtype=torch.float64), atol=1e-9)
    # H absent: mean/std untouched, std guarded (no zeros anywhere)
    assert (m.ann.feature_std > 0).all() and torch.isfinite(m.ann.feature_std).all()
    assert torch.all(m.ann.feature_std[2] == 1.0) and torch.all(m.ann.feature_mean[2] == 0.0)
    assert float(m.ann.energy_scale) == 1.0  # residual zero -> guarded scale
    G = m.ann.descriptors(_batch(m, s), m.plan())
    cu = _batch(m, s).species == 0
    assert torch.allclose(m.ann.feature_mean[0], G[cu].mean(0), atol=1e-12)


def _per_species_energies(m, G, species):
    """Independent reference of the network part: one network call per species."""
    out = torch.zeros(G.shape[0], dtype=torch.float64)
    for t in range(len(m.species)):
        idx = torch.nonzero(species == t).reshape(-1)
        if idx.numel() == 0:
            continue
        x = (G[idx] - m.ann.feature_mean[t]) / m.ann.feature_std[t]
        y = m.ann.nets[t](x.to(m.ann.net_dtype)).reshape(-1).to(torch.float64)
        out = out.index_put((idx,), m.ann.reference_energy[t] + m.ann.energy_shift[t] + m.ann.energy_scale * y)
    return out


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("which", ["both", "cu_only"])
def test_stacked_networks_match_per_species_loop(dtype, which):
    """All species in one batched product per layer (padded layout) = one call per species:
    energies, forces and the weight gradients of a force loss (double backward), with the
    species H absent from the batch and, in 'cu_only', only one species present."""
    m = _model(dtype=dtype, act=["tanh", "softplus"])
    m.ann.reference_energy[0] = -0.7
    structs = _structures()
    if which == "cu_only":
        for s in structs:
            s.numbers[:] = 29
    b = _batch(m, structs)
    results = []
    for mode in ("stacked", "loop"):
        x = b.positions.detach().clone().requires_grad_()
        G = m.descriptor(x, b.species, b.pair_i, b.pair_j, b.pair_shift)
        e = (m.ann.atomic_energies_from_features(G, b.species, m.plan()) if mode == "stacked"
             else _per_species_energies(m, G, b.species))
        E = torch.zeros(b.n_structures, dtype=torch.float64).index_add(0, b.structure, e)
        (g,) = torch.autograd.grad(E.sum(), x, create_graph=True)
        target = torch.linspace(-1, 1, g.numel(), dtype=torch.float64).reshape(g.shape)
        loss = (E ** 2).sum() * 1e-3 + ((-g - target) ** 2).sum()
        params = list(m.parameters())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if d is None else d for p, d in zip(params, grads)]
        results.append((e.detach(), g.detach(), grads))
    tol = 1e-12 if dtype == "float64" else 1e-5
    (e1, g1, w1), (e2, g2, w2) = results
    assert torch.allclose(e1, e2, rtol=0, atol=tol * 10)
    assert torch.allclose(g1, g2, rtol=0, atol=tol)
    for a, c in zip(w1, w2):
        assert torch.allclose(a, c, rtol=tol * 10, atol=tol), (a - c).abs().max()


def test_species_layout_slots():
    from distmlip.models.networks import species_layout

    sp = torch.tensor([2, 0, 2, 2, 1, 0])
    slot, src, rows = species_layout(sp, 4)
    assert rows == 3
    # species 0 -> rows 0.., species 1 -> rows 3.., species 2 -> rows 6.., in atom order
    assert slot.tolist() == [6, 0, 7, 8, 3, 1]
    assert src.tolist() == [1, 5, 6, 4, 6, 6, 0, 2, 3, 6, 6, 6]   # 6 = N: padding row


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("dtype,act", [("float64", "tanh"), ("float64", ["sigmoid", "softplus"]),
                                       ("float64", ["silu", "linear"]), ("float32", "tanh"),
                                       ("float64", ["tanh", "silu", "softplus"])])
def test_closed_form_force_gradient_matches_autograd(backend, dtype, act):
    """Force training with the networks' gradient in closed form (models.networks) = autograd through
    the networks: energies, forces, weight gradients of a force + energy loss and (plain
    backward) the positions' gradient, with ZBL, an absent species and non-trivial
    normalisation."""
    if backend == "fused" and not has_kernel("chebyshev_forward", "cpu"):
        pytest.skip("compiled extension missing")
    torch.manual_seed(3)
    hidden = [6, 5, 4] if isinstance(act, list) and len(act) == 3 else [6, 5]
    desc = dict(DESC, backend=backend)
    m = BPNN(["Cu", "Au", "H"], desc, hidden=hidden, activation=act, dtype=dtype, zbl={})
    with torch.no_grad():
        m.ann.feature_mean.uniform_(-0.5, 0.5)
        m.ann.feature_std.uniform_(0.5, 2.0)
        m.ann.energy_shift.copy_(torch.tensor([-3.5, -2.1, -1.0], dtype=torch.float64))
        m.ann.energy_scale.fill_(0.3)
        for p in m.parameters():   # large enough weights to reach the curved parts (and softplus' linear branch)
            p.mul_(4.0)
    structs = _structures(seed=5)
    out = {}
    for closed in (True, False):
        m.set_plan(forces="closed-form" if closed else "autograd", networks=None if closed else "torch")
        b = _batch(m, structs)
        E, F = m.energy_and_forces(b, create_graph=True)
        target = torch.linspace(-1, 1, F.numel(), dtype=torch.float64).reshape(F.shape)
        loss = (E ** 2).sum() * 1e-2 + ((F - target) ** 2).sum()
        m.zero_grad(set_to_none=True)
        loss.backward()
        w = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in m.parameters()]
        out[closed] = (E.detach(), F.detach(), w, b.positions.grad.clone())
    tol = 1e-11 if dtype == "float64" else 2e-4
    (E1, F1, w1, x1), (E2, F2, w2, x2) = out[True], out[False]
    assert torch.allclose(E1, E2, rtol=0, atol=tol), (E1 - E2).abs().max()
    assert torch.allclose(F1, F2, rtol=0, atol=tol), (F1 - F2).abs().max()
    for a, c in zip(w1, w2):
        assert torch.allclose(a, c, rtol=tol, atol=tol * max(1.0, float(c.abs().max()))), (a - c).abs().max()
    assert torch.allclose(x1, x2, rtol=tol, atol=tol * max(1.0, float(x2.abs().max()))), (x1 - x2).abs().max()
