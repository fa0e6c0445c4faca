"""Fused C++ Chebyshev descriptor kernels (distmlip.descriptors.fused) against the pure-PyTorch
reference (distmlip.descriptors.chebyshev.chebyshev_reference) and against finite differences
(torch.autograd.gradcheck / gradgradcheck, float64).

Tolerances: float64 - descriptors, forces, force-loss weight gradients and positions.grad agree
with the reference to 1e-10 (relative to the largest entry, and absolute 1e-10).  float32 - the
kernels accumulate in float64 and round once, so they are compared with the float64 reference at
rtol 2e-5 (G, relative to its largest entry), 1e-4 (forces) and 1e-3 (force-loss weight
gradients, which amplify the float32 rounding of the positions).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from distmlip.descriptors.batch import collate
from distmlip.descriptors.chebyshev import ChebyshevDescriptor, chebyshev_reference, typespin

from distmlip._ext import has_kernel  # noqa: E402
from distmlip.descriptors import fused  # noqa: E402

if not has_kernel("chebyshev_forward", "cpu"):
    pytest.skip("compiled extension missing", allow_module_level=True)

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------
# structures
# ------------------------------------------------------------------------------------------

def _periodic_random(seed=0, n=9, species=("C", "H", "O")):
    rng = np.random.default_rng(seed)
    cell = np.diag([4.6, 5.0, 4.2]) + rng.normal(0, 0.35, (3, 3))   # triclinic
    frac = rng.uniform(0, 1, (n, 3))
    numbers = [Atoms(s).numbers[0] for s in rng.choice(list(species), n)]
    return Atoms(numbers=numbers, scaled_positions=frac, cell=cell, pbc=True)


def _molecule_pair():
    a = molecule("CH3CH2OH")
    b = molecule("H2O")
    b.translate([3.1, 0.4, 0.3])
    m = a + b
    m.positions += np.random.default_rng(3).normal(0, 0.05, m.positions.shape)
    m.cell = np.zeros((3, 3))
    m.pbc = False
    return m


def _isolated_atom():
    m = molecule("H2O")
    m += Atoms("C", positions=[[30.0, 0.0, 0.0]])     # no neighbours at all
    m.pbc = False
    return m


def _tiny_cell():
    # 2-atom cell much smaller than the cutoff: many periodic images, self-images of each atom
    a = Atoms("CO", scaled_positions=[[0, 0, 0], [0.45, 0.55, 0.5]],
              cell=[[2.3, 0.1, 0.0], [0.2, 2.5, 0.1], [0.0, 0.3, 2.4]], pbc=True)
    a.positions += np.random.default_rng(5).normal(0, 0.05, a.positions.shape)
    return a


def _four_species(seed=7):
    return _periodic_random(seed, n=10, species=("Li", "C", "H", "O"))


def _single_species():
    a = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 1))
    a.positions += np.random.default_rng(2).normal(0, 0.08, a.positions.shape)
    return a


def _batch(structs, species, cutoff, dtype=torch.float64):
    return collate(structs, species, cutoff=cutoff, dtype=dtype)


CASES = {
    # name: (structures, species, rc_r, n_r, rc_a, n_a)
    "periodic3": ([_periodic_random(0), _periodic_random(1, n=7)], ["C", "H", "O"], 4.5, 6, 3.5, 4),
    "molecule": ([_molecule_pair()], ["C", "H", "O"], 4.0, 5, 3.0, 3),
    "isolated_atom": ([_isolated_atom()], ["C", "H", "O"], 3.0, 4, 2.5, 2),
    "tiny_cell_self_images": ([_tiny_cell()], ["C", "O"], 5.0, 5, 3.5, 4),
    "four_species": ([_four_species()], ["Li", "C", "H", "O"], 4.2, 4, 3.6, 5),
    "single_species": ([_single_species()], ["Cu"], 5.0, 6, 4.0, 4),
    "high_angular_order": ([_periodic_random(4, n=6)], ["C", "H", "O"], 4.0, 12, 3.8, 11),
    "order_zero": ([_periodic_random(6, n=6)], ["C", "H", "O"], 3.8, 0, 3.2, 0),
    # angular cutoff beyond the radial one (pairs with only angular terms), radial order 1
    "angular_beyond_radial": ([_periodic_random(8, n=8)], ["C", "H", "O"], 3.0, 1, 4.5, 3),
}


def _inputs(name, dtype=torch.float64):
    structs, species, rc_r, n_r, rc_a, n_a = CASES[name]
    b = _batch(structs, species, max(rc_r, rc_a), dtype)
    ts = torch.tensor(typespin(len(species)), dtype=torch.float64)
    params = dict(rc_radial=rc_r, n_radial=n_r, rc_angular=rc_a, n_angular=n_a)
    return b, ts, params, len(species)


def _ref(b, ts, params, positions=None):
    pos = b.positions if positions is None else positions
    return chebyshev_reference(pos, b.species, b.pair_i, b.pair_j, b.pair_shift, ts,
                               params["rc_radial"], params["n_radial"], params["rc_angular"],
                               params["n_angular"])


def _fused(b, ts, params, positions=None, **kw):
    pos = b.positions if positions is None else positions
    return fused.chebyshev(pos, b.species, b.pair_i, b.pair_j, b.pair_shift, typespin=ts, **params, **kw)


class _ElementMLP(torch.nn.Module):
    """Per-element tanh network D-8-6-1 (the BPNN shape), energies summed."""

    def __init__(self, n_species, dim, dtype, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.nets = torch.nn.ModuleList()
        for _ in range(n_species):
            net = torch.nn.Sequential(torch.nn.Linear(dim, 8), torch.nn.Tanh(), torch.nn.Linear(8, 6),
                                      torch.nn.Tanh(), torch.nn.Linear(6, 1)).to(dtype)
            with torch.no_grad():
                for p in net.parameters():
                    p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
            self.nets.append(net)

    def forward(self, G, species):
        E = G.new_zeros(())
        for t, net in enumerate(self.nets):
            sel = species == t
            if bool(sel.any()):
                E = E + net(G[sel]).sum()
        return E


def _force_training_grads(descriptor_fn, b, mlp, positions, target_F, alpha=0.7, inputs=None):
    """Energy + force loss, returns (E, F, dict of weight grads, positions.grad)."""
    mlp.zero_grad(set_to_none=True)
    positions.grad = None
    G = descriptor_fn(positions)
    E = mlp(G, b.species)
    F = -torch.autograd.grad(E, positions, create_graph=True)[0]
    loss = (1 - alpha) * E ** 2 + alpha * ((F - target_F) ** 2).sum()
    if inputs is None:
        loss.backward()
    else:
        loss.backward(inputs=inputs)
    grads = {n: p.grad.detach().clone() for n, p in mlp.named_parameters()}
    pg = None if positions.grad is None else positions.grad.detach().clone()
    return E.detach(), F.detach(), grads, pg


def _close(a, b, tol, what):
    a, b = a.detach(), b.detach()
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    err = float((a.double() - b.double()).abs().max()) if b.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} x scale {scale:.3e}"


# ------------------------------------------------------------------------------------------
# equality with the reference, float64
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_forward_forces_and_weight_grads_match_reference_float64(name):
    b, ts, params, T = _inputs(name)
    G_ref = _ref(b, ts, params)
    G_fus = _fused(b, ts, params)
    assert G_fus.shape == G_ref.shape == (b.n_atoms, ((params["n_radial"] + params["n_angular"] + 2)
                                                      * (2 if T > 1 else 1)))
    _close(G_fus, G_ref, 1e-10, "G")
    if name == "isolated_atom":
        assert float(G_fus[-1].abs().max()) == 0.0          # the lone atom sees nothing
    mlp = _ElementMLP(T, G_ref.shape[1], torch.float64)
    target = torch.randn(b.n_atoms, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    p1 = b.positions.clone().requires_grad_()
    p2 = b.positions.clone().requires_grad_()
    E1, F1, g1, pg1 = _force_training_grads(lambda x: _ref(b, ts, params, x), b, mlp, p1, target)
    E2, F2, g2, pg2 = _force_training_grads(lambda x: _fused(b, ts, params, x), b, mlp, p2, target)
    _close(E2, E1, 1e-10, "E")
    _close(F2, F1, 1e-10, "forces")
    for n in g1:
        _close(g2[n], g1[n], 1e-10, f"weight grad {n}")
    # positions.grad includes the position-Hessian term of the fused double backward
    _close(pg2, pg1, 1e-10, "positions.grad")


def test_descriptor_module_fused_backend_matches_reference():
    b, ts, params, T = _inputs("periodic3")
    species = CASES["periodic3"][1]
    ref = ChebyshevDescriptor(species, **params, kernels="reference")
    fus = ChebyshevDescriptor(species, **params, kernels="fused")
    x = b.positions.clone().requires_grad_()
    G1 = ref(x, b.species, b.pair_i, b.pair_j, b.pair_shift)
    G2 = fus(x, b.species, b.pair_i, b.pair_j, b.pair_shift)
    _close(G2, G1, 1e-10, "G via ChebyshevDescriptor")
    assert type(G2.grad_fn).__name__ == "_ChebyshevGBackward"   # really the kernels


def test_unsorted_pairs_and_explicit_pair_ptr():
    b, ts, params, _ = _inputs("periodic3")
    G = _fused(b, ts, params)
    G_ptr = _fused(b, ts, params, pair_ptr=b.pair_ptr)
    assert torch.equal(G, G_ptr)
    perm = torch.randperm(b.n_pairs, generator=torch.Generator().manual_seed(0))
    G_perm = fused.chebyshev(b.positions, b.species, b.pair_i[perm], b.pair_j[perm], b.pair_shift[perm],
                             typespin=ts, **params)
    # the angular sum runs over pairs in list order; a stable sort restores the same terms
    _close(G_perm, _ref(b, ts, params), 1e-10, "G from shuffled pairs")


def test_empty_pair_list():
    a = Atoms("CO", positions=[[0, 0, 0], [20, 0, 0]], pbc=False)
    b = _batch([a], ["C", "O"], 4.0)
    assert b.n_pairs == 0
    ts = torch.tensor(typespin(2), dtype=torch.float64)
    x = b.positions.clone().requires_grad_()
    G = fused.chebyshev(x, b.species, b.pair_i, b.pair_j, b.pair_shift, typespin=ts,
                        rc_radial=4.0, n_radial=3, rc_angular=3.0, n_angular=2)
    assert G.shape == (2, 14) and float(G.detach().abs().max()) == 0.0
    (g,) = torch.autograd.grad(G.sum(), x)
    assert float(g.abs().max()) == 0.0


# ------------------------------------------------------------------------------------------
# finite differences
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["periodic3", "molecule", "tiny_cell_self_images", "four_species",
                                  "high_angular_order"])
def test_gradcheck_and_gradgradcheck(name):
    b, ts, params, _ = _inputs(name)
    if b.n_atoms > 12:        # keep the numerical Jacobians small: first structure only
        b = _batch(CASES[name][0][:1], CASES[name][1], max(params["rc_radial"], params["rc_angular"]))
    x = b.positions.clone().requires_grad_()

    def f(pos):
        return _fused(b, ts, params, pos)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-6)
    # second order: derivatives of the VJP w.r.t. positions (Hessian term) and w.r.t. dE/dG (JVP)
    assert torch.autograd.gradgradcheck(f, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_of_the_vjp_operator_itself():
    """(dE/dG, R) -> dE/dR: its derivatives are the JVP (w.r.t. dE/dG) and the HVP (w.r.t. R)."""
    b, ts, params, _ = _inputs("tiny_cell_self_images")
    x = b.positions.clone().requires_grad_()
    G = _fused(b, ts, params)
    g = torch.randn(G.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    ptr = b.pair_ptr

    def vjp(gg, pos):
        return fused._ChebyshevVJP.apply(gg, pos, b.species, ptr, b.pair_j, b.pair_shift, ts,
                                         params["rc_radial"], params["n_radial"],
                                         params["rc_angular"], params["n_angular"])

    assert torch.autograd.gradcheck(vjp, (g, x), eps=1e-6, atol=1e-7, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# float32
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["periodic3", "molecule", "four_species"])
def test_float32_against_float64_reference(name):
    b64, ts, params, T = _inputs(name, torch.float64)
    b32, _, _, _ = _inputs(name, torch.float32)
    G_ref = _ref(b64, ts, params)
    G32 = _fused(b32, ts, params)
    assert G32.dtype == torch.float32
    _close(G32, G_ref, 2e-5, "G float32")
    mlp64 = _ElementMLP(T, G_ref.shape[1], torch.float64)
    mlp32 = copy.deepcopy(mlp64).float()
    target = torch.randn(b64.n_atoms, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    p64 = b64.positions.clone().requires_grad_()
    p32 = b32.positions.clone().requires_grad_()
    _, F1, g1, _ = _force_training_grads(lambda x: _ref(b64, ts, params, x), b64, mlp64, p64, target)
    _, F2, g2, _ = _force_training_grads(lambda x: _fused(b32, ts, params, x), b32, mlp32, p32,
                                         target.float())
    assert F2.dtype == torch.float32
    _close(F2, F1, 1e-4, "forces float32")
    for n in g1:
        _close(g2[n], g1[n], 1e-3, f"weight grad float32 {n}")


# ------------------------------------------------------------------------------------------
# the position Hessian where it is used, instruction sets, threads
# ------------------------------------------------------------------------------------------

def test_hessian_term_skipped_only_where_unused():
    b, ts, params, T = _inputs("periodic3")
    mlp = _ElementMLP(T, 24, torch.float64)
    target = torch.zeros(b.n_atoms, 3, dtype=torch.float64)
    x = b.positions.clone().requires_grad_()
    _, _, g_full, pg_full = _force_training_grads(lambda p: _fused(b, ts, params, p), b, mlp, x, target)
    # backward(inputs=params): identical weight gradients, positions untouched
    _, _, g_in, pg_in = _force_training_grads(lambda p: _fused(b, ts, params, p), b, mlp, x, target,
                                              inputs=list(mlp.parameters()))
    assert pg_in is None
    for n in g_full:
        _close(g_in[n], g_full[n], 1e-13, f"weight grad with inputs=params {n}")
    # the complete positions.grad is the reference's (autograd through every intermediate)
    y = b.positions.clone().requires_grad_()
    _, _, _, pg_ref = _force_training_grads(lambda p: _ref(b, ts, params, p), b, mlp, y, target)
    _close(pg_full, pg_ref, 1e-10, "positions.grad with Hessian")


def test_third_derivative_raises_clearly():
    b, ts, params, _ = _inputs("periodic3")
    x = b.positions.clone().requires_grad_()
    G = _fused(b, ts, params, x)
    (g1,) = torch.autograd.grad((G ** 2).sum(), x, create_graph=True)
    (g2,) = torch.autograd.grad((g1 ** 2).sum(), x, create_graph=True)
    w = torch.arange(g2.numel(), dtype=g2.dtype).reshape(g2.shape)
    with pytest.raises(RuntimeError, match="third derivatives are not supported"):
        torch.autograd.grad((g2 * w).sum(), x)


@pytest.mark.parametrize("angular", ["triplets", "moments"])
def test_generic_and_avx2_code_agree(monkeypatch, angular):
    monkeypatch.setenv("DISTMLIP_CHEB_ANGULAR", angular)
    b, ts, params, T = _inputs("four_species")
    results = {}
    for isa in ("generic", "auto"):
        if isa == "generic":
            monkeypatch.setenv("DISTMLIP_CPU_ISA", "generic")
            assert torch.ops.distmlip.chebyshev_cpu_isa() == 0
        else:
            monkeypatch.delenv("DISTMLIP_CPU_ISA", raising=False)
        mlp = _ElementMLP(T, 2 * (params["n_radial"] + params["n_angular"] + 2), torch.float64)
        x = b.positions.clone().requires_grad_()
        target = torch.zeros(b.n_atoms, 3, dtype=torch.float64)
        results[isa] = _force_training_grads(lambda p: _fused(b, ts, params, p), b, mlp, x, target)
    a, c = results["generic"], results["auto"]
    _close(a[1], c[1], 1e-12, "forces generic vs auto")
    for n in a[2]:
        _close(a[2][n], c[2][n], 1e-12, f"weight grad generic vs auto {n}")
    _close(a[3], c[3], 1e-12, "positions.grad generic vs auto")


def test_thread_count_does_not_change_results():
    b, ts, params, T = _inputs("periodic3")
    out = []
    old = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            mlp = _ElementMLP(T, 24, torch.float64)
            x = b.positions.clone().requires_grad_()
            target = torch.zeros(b.n_atoms, 3, dtype=torch.float64)
            out.append(_force_training_grads(lambda p: _fused(b, ts, params, p), b, mlp, x, target))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out[0][1], out[1][1])             # bitwise: no atomics, fixed sum order
    assert torch.equal(out[0][3], out[1][3])
    for n in out[0][2]:
        assert torch.equal(out[0][2][n], out[1][2][n])


def test_chunked_backward_is_bitwise_identical(monkeypatch):
    """The CPU backward kernels process the pair gradients in bounded chunks; any chunk size
    (here down to a single centre per chunk) gives the same bits, and matches the reference."""
    b, ts, params, T = _inputs("four_species")
    out = {}
    for chunk in (None, "1", "37"):
        if chunk is None:
            monkeypatch.delenv("DISTMLIP_CHEB_CHUNK_PAIRS", raising=False)
        else:
            monkeypatch.setenv("DISTMLIP_CHEB_CHUNK_PAIRS", chunk)
        mlp = _ElementMLP(T, 2 * (params["n_radial"] + params["n_angular"] + 2), torch.float64)
        x = b.positions.clone().requires_grad_()
        target = torch.ones(b.n_atoms, 3, dtype=torch.float64)
        out[chunk] = _force_training_grads(lambda p: _fused(b, ts, params, p), b, mlp, x, target)
    for chunk in ("1", "37"):
        assert torch.equal(out[chunk][1], out[None][1])
        assert torch.equal(out[chunk][3], out[None][3])
        for n in out[None][2]:
            assert torch.equal(out[chunk][2][n], out[None][2][n])
    mlp = _ElementMLP(T, 2 * (params["n_radial"] + params["n_angular"] + 2), torch.float64)
    y = b.positions.clone().requires_grad_()
    ref = _force_training_grads(lambda p: _ref(b, ts, params, p), b, mlp, y,
                                torch.ones(b.n_atoms, 3, dtype=torch.float64))
    _close(out["1"][1], ref[1], 1e-10, "forces, chunked")
    _close(out["1"][3], ref[3], 1e-10, "positions.grad, chunked")


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------

def test_bad_inputs_give_clear_errors():
    b, ts, params, _ = _inputs("periodic3")
    ops = torch.ops.distmlip
    args = (b.species, b.pair_ptr, b.pair_j, b.pair_shift, ts, 4.5, 6, 3.5, 4)
    bad_species = b.species.clone()
    bad_species[0] = 7
    with pytest.raises(RuntimeError, match="species index 7 of atom 0"):
        ops.chebyshev_forward(b.positions, bad_species, *args[1:])
    bad_ptr = b.pair_ptr.clone()
    bad_ptr[-1] += 1
    with pytest.raises(RuntimeError, match="pair_ptr"):
        ops.chebyshev_forward(b.positions, b.species, bad_ptr, *args[2:])
    bad_j = b.pair_j.clone()
    bad_j[3] = b.n_atoms
    with pytest.raises(RuntimeError, match=r"pair_j\[3\]"):
        ops.chebyshev_forward(b.positions, b.species, b.pair_ptr, bad_j, *args[3:])
    with pytest.raises(ValueError, match="orders"):
        fused.chebyshev(b.positions, b.species, b.pair_i, b.pair_j, b.pair_shift, typespin=ts,
                        rc_radial=4.5, n_radial=40, rc_angular=3.5, n_angular=4)
    # a differentiable pair_shift runs on image atoms (the stress; tests/test_stress.py): the same
    # values up to the rounding of R_j + S - R_i in another order
    G1 = fused.chebyshev(b.positions, b.species, b.pair_i, b.pair_j, b.pair_shift.clone().requires_grad_(),
                         typespin=ts, **params)
    G0 = fused.chebyshev(b.positions, b.species, b.pair_i, b.pair_j, b.pair_shift, typespin=ts, **params)
    assert G1.shape == G0.shape and torch.allclose(G1.detach(), G0, rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="grad_G must be"):
        ops.chebyshev_backward(torch.zeros(3, 3, dtype=torch.float64), b.positions, *args)


# ------------------------------------------------------------------------------------------
# angular sums: triplet loop and moment form (linear in the neighbours)
# ------------------------------------------------------------------------------------------

def _dense_alloy():
    a = bulk("Cu", "fcc", a=3.6, cubic=True)            # 4 atoms, ~150 neighbours within 7.5 A
    a.numbers[[1, 3]] = Atoms("Au").numbers[0]
    a.positions += np.random.default_rng(8).normal(0, 0.06, a.positions.shape)
    return a


CASES_ANGULAR = {
    "periodic3": CASES["periodic3"],
    "four_species": CASES["four_species"],
    "single_species": CASES["single_species"],
    "order_zero": CASES["order_zero"],
    "angular_order_8": ([_periodic_random(9, n=7)], ["C", "H", "O"], 4.0, 4, 3.9, 8),
    # dense enough (>= 128 neighbours within rc_a) for the default choice to use moments
    "dense_alloy": ([_dense_alloy()], ["Cu", "Au"], 7.5, 6, 7.5, 4),
}


@pytest.mark.parametrize("mode", ["moments", "triplets", "auto"])
@pytest.mark.parametrize("name", list(CASES_ANGULAR))
def test_angular_moment_form_matches_reference(monkeypatch, name, mode):
    if mode == "auto" and name != "dense_alloy":
        pytest.skip("auto = triplets on sparse structures")
    monkeypatch.setenv("DISTMLIP_CHEB_ANGULAR", mode)
    structs, species, rc_r, n_r, rc_a, n_a = CASES_ANGULAR[name]
    b = _batch(structs, species, max(rc_r, rc_a))
    ts = torch.tensor(typespin(len(species)), dtype=torch.float64)
    params = dict(rc_radial=rc_r, n_radial=n_r, rc_angular=rc_a, n_angular=n_a)
    if name == "dense_alloy":
        per_atom = torch.bincount(b.pair_i, minlength=b.n_atoms)
        assert int(per_atom.min()) >= 128
    _close(_fused(b, ts, params), _ref(b, ts, params), 1e-10, "G")
    mlp = _ElementMLP(len(species), _ref(b, ts, params).shape[1], torch.float64)
    target = torch.randn(b.n_atoms, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    p1 = b.positions.clone().requires_grad_()
    p2 = b.positions.clone().requires_grad_()
    params_list = list(mlp.parameters())
    # backward(inputs=weights): the training case, where the JVP runs without the Hessian term
    E1, F1, g1, _ = _force_training_grads(lambda x: _ref(b, ts, params, x), b, mlp, p1, target,
                                          inputs=params_list)
    E2, F2, g2, _ = _force_training_grads(lambda x: _fused(b, ts, params, x), b, mlp, p2, target,
                                          inputs=params_list)
    _close(E2, E1, 1e-10, "E")
    _close(F2, F1, 1e-10, "forces")
    for n in g1:
        _close(g2[n], g1[n], 1e-10, f"weight grad {n}")
