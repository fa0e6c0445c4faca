"""Energies and forces as one autograd node (distmlip/models/forces_op.py, operators
bpnn_energy_forces{,_backward}) against the general closed-form path (descriptor VJP through
autograd), and the flat parameters of the optimiser (distmlip/training/flat.py)."""
import contextlib

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

from distmlip._ext import has_kernel  # noqa: E402

if not has_kernel("bpnn_energy_forces", "cpu"):
    pytest.skip("compiled extension missing", allow_module_level=True)

from distmlip.data.structure import Structure  # noqa: E402
from distmlip.descriptors.batch import collate  # noqa: E402
from distmlip.models import forces_op  # noqa: E402
from distmlip.models.bpnn import BPNN  # noqa: E402
from distmlip.training.flat import FlatParameters  # noqa: E402

DESC = {"rc_radial": 4.5, "n_radial": 6, "rc_angular": 3.5, "n_angular": 4, "backend": "fused"}


def _structures(seed=0):
    rng = np.random.default_rng(seed)
    a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    a.symbols[1] = "Au"
    a.symbols[5] = "H"
    a.positions += rng.normal(0, 0.1, a.positions.shape)
    m = molecule("CH4")
    m.set_chemical_symbols(["Au", "Cu", "Cu", "Au", "Cu"])
    m.positions *= 1.6
    m.positions += rng.normal(0, 0.05, m.positions.shape)
    lone = molecule("H2")                 # atoms with no neighbour within the cutoffs
    lone.positions = [[0, 0, 0], [0, 0, 9.0]]
    lone.set_chemical_symbols(["Cu", "Au"])
    out = []
    for at, e in ((a, -1.0), (m, -2.0), (lone, -0.5)):
        cell = np.array(at.cell) if at.pbc.any() else np.zeros((3, 3))
        out.append(Structure(at.numbers.copy(), at.positions.copy(), cell, at.pbc.copy(), energy=e))
    return out


def _model(dtype="float64", act="tanh", zbl=None, seed=0):
    torch.manual_seed(seed)
    m = BPNN(["Cu", "Au", "H", "O"], DESC, hidden=[7, 5], activation=act, dtype=dtype, zbl=zbl)
    with torch.no_grad():
        m.ann.feature_mean.uniform_(-0.5, 0.5)
        m.ann.feature_std.uniform_(0.5, 2.0)
        m.ann.energy_shift.copy_(torch.tensor([-3.5, -2.1, -1.0, -4.0], dtype=torch.float64))
        m.ann.reference_energy.copy_(torch.tensor([-100.0, -2000.0, -13.6, -430.0], dtype=torch.float64))
        m.ann.energy_scale.fill_(0.3)
        for p in m.parameters():
            p.mul_(3.0)
    return m


def _step(m, structs, one_node, full_backward=False, flat=None):
    """E, F, parameter gradients (and the positions' gradient with ``full_backward``) of a
    force + energy loss.  With ``flat``: inside its routing context (as the trainer's step), the
    gradients read off the parameters (views of the flat gradient) after sync."""
    m.set_plan(forces="one-node" if one_node else "closed-form")
    b = collate(structs, species=m.species, cutoff=m.cutoff)
    if flat is not None:
        flat.zero_grad()
    else:
        for p in m.parameters():
            p.grad = None
    with (flat.routing() if flat is not None else contextlib.nullcontext()):
        E, F = m.energy_and_forces(b, create_graph=True)
        target = torch.linspace(-1, 1, F.numel(), dtype=torch.float64).reshape(F.shape)
        loss = ((E - torch.arange(len(E), dtype=torch.float64)) ** 2).sum() * 1e-2 + ((F - target) ** 2).sum()
        if full_backward:
            loss.backward()
        else:
            loss.backward(inputs=(flat.grad_inputs if flat is not None else list(m.parameters())))
    if flat is not None:
        flat.sync()
    grads = [p.grad.clone() for p in m.parameters()]
    pos_grad = b.positions.grad.clone() if full_backward else None
    return E.detach(), F.detach(), grads, pos_grad


@pytest.mark.parametrize("act", ["tanh", ["sigmoid", "softplus"], ["silu", "linear"]])
def test_one_node_matches_general_path_float64(act):
    m = _model(act=act)
    structs = _structures(1)
    E1, F1, g1, x1 = _step(m, structs, True, full_backward=True)
    E2, F2, g2, x2 = _step(m, structs, False, full_backward=True)
    assert torch.allclose(E1, E2, rtol=0, atol=1e-10), (E1 - E2).abs().max()
    assert abs(float(E1[0])) > 100       # the reference energies are in
    assert torch.allclose(F1, F2, rtol=0, atol=1e-11), (F1 - F2).abs().max()
    for a, c in zip(g1, g2):
        assert torch.allclose(a, c, rtol=1e-10, atol=1e-10 * max(1.0, float(c.abs().max()))), (a - c).abs().max()
    # the positions' gradient includes the descriptor's Hessian term and the networks' xbar
    assert torch.allclose(x1, x2, rtol=1e-10, atol=1e-10 * float(x2.abs().max())), (x1 - x2).abs().max()
    assert float(x1.abs().max()) > 1e-3


def test_one_node_float32_networks():
    m = _model(dtype="float32")
    structs = _structures(2)
    E1, F1, g1, _ = _step(m, structs, True)
    E2, F2, g2, _ = _step(m, structs, False)
    assert torch.allclose(E1, E2, rtol=0, atol=1e-3)      # energies ~1e3 eV, networks in float32
    assert torch.allclose(F1, F2, rtol=0, atol=1e-4), (F1 - F2).abs().max()
    for a, c in zip(g1, g2):
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-4 * max(1.0, float(c.abs().max())))


def test_one_node_with_zbl_and_without_graph():
    m = _model(zbl={})
    structs = _structures(3)
    E1, F1, g1, _ = _step(m, structs, True)
    E2, F2, g2, _ = _step(m, structs, False)
    assert torch.allclose(E1, E2, rtol=0, atol=1e-10)
    assert torch.allclose(F1, F2, rtol=0, atol=1e-10)
    for a, c in zip(g1, g2):
        assert torch.allclose(a, c, rtol=1e-10, atol=1e-10 * max(1.0, float(c.abs().max())))
    # evaluation (no create_graph): detached, same values
    m.set_plan(forces="one-node")
    b = collate(structs, species=m.species, cutoff=m.cutoff)
    E3, F3 = m.energy_and_forces(b)
    assert not E3.requires_grad and not F3.requires_grad
    assert torch.allclose(E3, E1, rtol=0, atol=1e-10) and torch.allclose(F3, F1, rtol=0, atol=1e-10)


def test_forces_match_finite_differences():
    m = _model()
    structs = _structures(4)[:2]
    b = collate(structs, species=m.species, cutoff=m.cutoff)
    _, F = m.energy_and_forces(b)
    pos0 = b.positions.detach().clone()
    h = 1e-5
    for atom, comp in [(0, 0), (3, 2), (b.n_atoms - 1, 1)]:
        vals = []
        for sgn in (1, -1):
            p = pos0.clone()
            p[atom, comp] += sgn * h
            b.positions = p
            with torch.no_grad():
                vals.append(float(m(b).sum()))
        fd = -(vals[0] - vals[1]) / (2 * h)
        assert abs(fd - float(F[atom, comp])) < 1e-6 * max(1.0, abs(fd)), (atom, comp, fd, float(F[atom, comp]))


def test_flat_parameters_give_the_same_gradients_and_updates():
    structs = _structures(5)
    m1, m2 = _model(seed=7), _model(seed=7)
    flat = FlatParameters(m1)
    assert len(flat.tensors) == 1 and flat.tensors[0].numel() == sum(p.numel() for p in m1.parameters())
    E1, F1, g1, _ = _step(m1, structs, True, flat=flat)
    E2, F2, g2, _ = _step(m2, structs, True)
    for a, c in zip(g1, g2):
        assert torch.allclose(a, c, rtol=1e-12, atol=1e-12 * max(1.0, float(c.abs().max())))
    # the flat gradient is the parameters' gradients, in order
    assert torch.equal(flat.tensors[0].grad, torch.cat([g.reshape(-1) for g in g1]))
    # one optimiser step on the flat tensor = one step on the parameters
    o1 = torch.optim.Adam(flat.tensors, lr=1e-2)
    o2 = torch.optim.Adam(list(m2.parameters()), lr=1e-2)
    o1.step()
    o2.step()
    for a, c in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(a, c, rtol=0, atol=1e-14)
    # the module path (energy loss through the modules) reaches the flat gradient via the views
    b = collate(structs, species=m1.species, cutoff=m1.cutoff)
    flat.zero_grad()
    m1(b).sum().backward(inputs=flat.grad_inputs)
    flat.sync()
    assert float(flat.tensors[0].grad.abs().sum()) > 0


def test_flat_parameters_outside_routing_fill_the_parameters_grads():
    """Outside the trainer's routing context a flattened model behaves as usual:
    model.zero_grad(); loss.backward() fills p.grad (the fused operator's gradient goes to the
    parameters, not to the flat tensor)."""
    structs = _structures(10)
    m1, m2 = _model(seed=11), _model(seed=11)
    FlatParameters(m1)
    _, _, g1, _ = _step(m1, structs, True)
    _, _, g2, _ = _step(m2, structs, True)
    for a, c in zip(g1, g2):
        assert torch.allclose(a, c, rtol=1e-12, atol=1e-14)


def test_flat_parameters_repair_and_refuse():
    m = _model()
    flat = FlatParameters(m)
    p0 = next(m.parameters())
    p0.grad = None                          # e.g. model.zero_grad()
    b = collate(_structures(6), species=m.species, cutoff=m.cutoff)
    m(b).sum().backward()
    assert p0.grad is not None
    g = p0.grad.clone()
    flat.sync()                             # the stray gradient is moved into the flat one
    assert torch.equal(flat.tensors[0].grad[:p0.numel()], g.reshape(-1))
    p0.data = p0.data.clone()               # storage replaced after flattening
    with pytest.raises(RuntimeError, match="storage was replaced"):
        flat.check_storage()
    with pytest.raises(RuntimeError, match="storage was replaced"):
        for _ in range(32):                 # sync checks every 32nd call
            flat.sync()


def test_optimizer_state_of_unflattened_checkpoints_is_converted():
    structs = _structures(7)
    m1, m2 = _model(seed=9), _model(seed=9)
    o2 = torch.optim.Adam(list(m2.parameters()), lr=1e-2)
    for _ in range(2):
        _, _, _, _ = _step(m2, structs, True)
        o2.step()
    old_state = o2.state_dict()
    m1.load_state_dict(m2.state_dict())
    flat = FlatParameters(m1)
    o1 = torch.optim.Adam(flat.tensors, lr=1e-2)
    o1.load_state_dict(flat.optimizer_state(old_state, o1))
    _step(m1, structs, True, flat=flat)
    _step(m2, structs, True)
    o1.step()
    o2.step()
    for a, c in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(a, c, rtol=0, atol=1e-12)


def test_backward_of_the_node_is_not_differentiable():
    m = _model()
    b = collate(_structures(8), species=m.species, cutoff=m.cutoff)
    E, F = m.energy_and_forces(b, create_graph=True)
    w = list(m.parameters())[0]
    (gw,) = torch.autograd.grad((F ** 2).sum(), w, create_graph=True)
    with pytest.raises(RuntimeError):
        gw.sum().backward()


def test_net_parameters_cache_sees_replaced_layers_and_parameters():
    from distmlip.models.networks import net_parameters

    m = _model()
    p1 = net_parameters(m.ann.nets)
    assert len(p1) == 24 and all(a is b for a, b in zip(p1, m.parameters()))
    assert net_parameters(m.ann.nets) is p1                      # cached
    old = m.ann.nets[1][0]
    m.ann.nets[1][0] = torch.nn.Linear(old.in_features, old.out_features, dtype=torch.float64)
    p2 = net_parameters(m.ann.nets)
    assert p2[6] is m.ann.nets[1][0].weight and p2[7] is m.ann.nets[1][0].bias
    m.ann.nets[0][2].bias = torch.nn.Parameter(torch.zeros(m.ann.nets[0][2].out_features, dtype=torch.float64))
    p3 = net_parameters(m.ann.nets)
    assert p3[3] is m.ann.nets[0][2].bias
    assert all(a is b for a, b in zip(p3, m.parameters()))


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_direct_fused_optimizer_step_equals_step(kind):
    from distmlip.training.flat import optimizer_step

    torch.manual_seed(0)
    p1 = torch.randn(50, dtype=torch.float64, requires_grad=True)
    p2 = p1.detach().clone().requires_grad_()
    cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    o1 = cls([p1], lr=3e-3, weight_decay=0.01, fused=True)
    o2 = cls([p2], lr=3e-3, weight_decay=0.01, fused=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(o1, T_max=5)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(o2, T_max=5)
    for k in range(6):
        g = torch.randn(50, dtype=torch.float64)
        p1.grad, p2.grad = g.clone(), g.clone()
        optimizer_step(o1)
        o2.step()
        sched.step()
        sched2.step()
        assert torch.equal(p1, p2), k
        assert torch.equal(o1.state[p1]["exp_avg_sq"], o2.state[p2]["exp_avg_sq"])
        assert float(o1.state[p1]["step"]) == k + 1


def test_cached_normalisation_follows_in_place_changes():
    """The one-node path caches 1/std and the energy constants per model: an in-place change of a
    buffer (fit_normalization copies into them) must be seen."""
    m = _model()
    structs = _structures(12)
    E1, F1, _, _ = _step(m, structs, True)
    with torch.no_grad():
        m.ann.feature_std.mul_(1.5)
        m.ann.energy_shift.add_(0.25)
        m.ann.energy_scale.fill_(0.7)
    E2, F2, _, _ = _step(m, structs, True)
    E3, F3, _, _ = _step(m, structs, False)
    assert not torch.allclose(E1, E2)
    assert torch.allclose(E2, E3, rtol=0, atol=1e-10) and torch.allclose(F2, F3, rtol=0, atol=1e-11)


@pytest.mark.parametrize("per_atom", [True, False])
def test_direct_force_step_equals_autograd_step(per_atom):
    """The trainer's force step without the autograd engine (three operators, gradient added to
    the flat buffer) = the autograd path through the general closed-form forces."""
    from distmlip.training.losses import force_atom_mask, local_counts
    from distmlip.training.force_step import force_loss_and_gradients

    structs = _structures(13)
    rng = np.random.default_rng(1)
    for s in structs:
        s.forces = rng.normal(0, 1, (len(s.numbers), 3))
    out = []
    for one_node in (True, False):
        m = _model(seed=21)
        m.set_plan(forces="one-node" if one_node else "closed-form")
        flat = FlatParameters(m)
        b = collate(structs, species=m.species, cutoff=m.cutoff)
        b.weight = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
        sel = torch.tensor([True, True, False])
        counts = local_counts(b, sel, True) * 1.3
        flat.zero_grad()
        loss, E, F = force_loss_and_gradients(m, flat, b, counts, per_atom=per_atom, alpha=0.4,
                                              mask=force_atom_mask(b, sel))
        flat.sync()
        assert not loss.requires_grad
        out.append((loss, E, F, flat.tensors[0].grad.clone()))
    (l1, E1, F1, g1), (l2, E2, F2, g2) = out
    assert torch.allclose(l1, l2, rtol=1e-12, atol=0)
    assert torch.allclose(E1, E2, rtol=0, atol=1e-10) and torch.allclose(F1, F2, rtol=0, atol=1e-11)
    assert float(g1.abs().max()) > 0
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-12 * float(g2.abs().max())), (g1 - g2).abs().max()


def _separate_operators(m, b):
    """E, F, x, g, moments of bpnn_energy_forces composed from the separate operators (descriptor
    forward with moments, normalisation, networks, descriptor VJP): the unpipelined order."""
    ops = torch.ops.distmlip
    params, (dparams, codes, mean, inv_std, base, scale, _), args = forces_op.operator_inputs(
        m.ann, b, b.positions.detach())
    pos, species, ptr, pj, shift, ts = args
    G, mom = ops.chebyshev_forward_moments(pos, species, ptr, pj, shift, ts, *dparams)
    x = (G - mean[species]) * inv_std[species]
    y, dydx = ops.bpnn_nets_forward(x, species, params, list(codes), True)
    g = dydx * inv_std[species] * scale
    F = -ops.chebyshev_backward(g, pos, species, ptr, pj, shift, ts, *dparams, mom)
    e = base[species] + scale * y
    E = torch.zeros(int(b.n_structures), dtype=torch.float64).index_add_(0, b.structure, e)
    return E, F, x, g, mom


def _one_operator(m, b):
    params, (dparams, codes, mean, inv_std, base, scale, _), args = forces_op.operator_inputs(
        m.ann, b, b.positions.detach())
    pos, species, ptr, pj, shift, ts = args
    with torch.no_grad():
        return torch.ops.distmlip.bpnn_energy_forces(pos, species, ptr, pj, shift, ts, *dparams, mean, inv_std,
                                                     base, scale, b.structure, int(b.n_structures), params,
                                                     list(codes))


@pytest.mark.parametrize("act", ["tanh", ["sigmoid", "softplus"]])
def test_pipelined_forward_equals_the_separate_operators(act, monkeypatch):
    """The float64 force operator runs descriptor, networks and VJP block of centres by block
    (one pair pass per centre for forward and VJP): the values of the separate operators (bitwise
    with tanh), bitwise the same for 1 and 2 threads and when the pair gradients are cut into
    many chunks (blocks never cross a chunk), on molecules (triplet form of the angular sums), dense bulk (moment form) and
    isolated atoms."""
    m = _model(act=act)
    structs = _structures(2)
    rng = np.random.default_rng(5)
    dense = bulk("Cu", "fcc", a=3.0, cubic=True).repeat((2, 2, 2))
    dense.positions += rng.normal(0, 0.05, dense.positions.shape)
    dense.numbers = rng.choice([29, 79, 1, 8], len(dense))
    structs.append(Structure(dense.numbers.copy(), dense.positions.copy(), np.array(dense.cell), dense.pbc.copy(),
                             energy=-3.0))
    b = collate(structs, species=m.species, cutoff=m.cutoff)
    ref = _separate_operators(m, b)
    n_threads = torch.get_num_threads()
    first = None
    try:
        for threads, chunk in ((1, None), (2, None), (1, "37"), (2, "37"), (2, "1")):
            torch.set_num_threads(threads)
            if chunk is None:
                monkeypatch.delenv("DISTMLIP_CHEB_CHUNK_PAIRS", raising=False)
            else:
                monkeypatch.setenv("DISTMLIP_CHEB_CHUNK_PAIRS", chunk)
            E, F, x, g, mom, saved = _one_operator(m, b)
            # the same blocks whatever the threads and chunks: bitwise reproducible
            first = first or (E, F, g, saved)
            for a, c in zip((E, F, g, saved), first):
                assert torch.equal(a, c), (threads, chunk)
            assert torch.equal(x, ref[2]), (threads, chunk)
            if act == "tanh":
                assert torch.equal(g, ref[3]), (threads, chunk)
                assert torch.equal(F, ref[1]), (threads, chunk, (F - ref[1]).abs().max())
            else:
                # sigmoid and softplus go through torch's vectorised kernels, whose last bits can
                # depend on the length of the block they are given (networks on blocks of 8-64 atoms
                # here, of 128 in the separate operator)
                assert torch.allclose(g, ref[3], rtol=1e-14, atol=0), (g - ref[3]).abs().max()
                assert torch.allclose(F, ref[1], rtol=1e-13, atol=1e-15), (F - ref[1]).abs().max()
            # moments rows: a flag, then the moments where the flag is 1 (the rest is not read)
            used = ref[4][:, 0] == 1.0
            assert torch.equal(mom[:, 0], ref[4][:, 0]) and torch.equal(mom[used], ref[4][used])
            assert 0 < int(used.sum()) < b.n_atoms         # both forms of the angular sums ran
            assert torch.allclose(E, ref[0], rtol=0, atol=1e-10), (E - ref[0]).abs().max()
            assert saved.shape[0] == b.n_atoms and float(F.abs().max()) > 1e-2
    finally:
        torch.set_num_threads(n_threads)


def test_pipelined_saved_intermediates_give_the_recomputed_backward():
    """The networks' intermediates saved by the pipelined forward (per-atom rows, written block by
    small block) give the backward of the networks that recomputes them."""
    m = _model()
    b = collate(_structures(3), species=m.species, cutoff=m.cutoff)
    params, consts, args = forces_op.operator_inputs(m.ann, b, b.positions.detach())
    E, F, x, g, mom, saved = _one_operator(m, b)
    species = args[1]
    codes = list(consts[1])
    # a force cotangent (not a uniform one: J maps translations to zero)
    v = torch.randn(F.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = torch.ops.distmlip.bpnn_energy_forces_backward(
            None, -v, *args, *consts[0], x, g, mom, saved, consts[3], consts[5], b.structure, params,
            codes, True, False, False)
        # the force cotangent enters through the JVP: compare the weight gradients of the
        # networks' backward fed with that JVP (recomputed) against the operator's (loaded)
        jv, _ = torch.ops.distmlip.chebyshev_double_backward(g, v, *args, *consts[0], True, False, mom)
        ub = jv * consts[3][species] * consts[5]
        want = torch.ops.distmlip.bpnn_nets_backward(x, species, params, codes, None, ub, False)
    for a, c in zip(got[:-1], want[:-1]):
        assert torch.allclose(a, c, rtol=1e-12, atol=1e-12 * float(c.abs().max())), (a - c).abs().max()
    assert any(float(c.abs().max()) > 0 for c in want[:-1])


def test_force_operator_names_bad_indices():
    """Out-of-range species or structure indices and bad descriptor orders are refused with the
    atom and the value named (float64: the pipelined path; float32 networks: the other one)."""
    for dtype in ("float64", "float32"):
        m = _model(dtype=dtype)
        b = collate(_structures(4), species=m.species, cutoff=m.cutoff)
        params, (dparams, codes, mean, inv_std, base, scale, _), args = forces_op.operator_inputs(
            m.ann, b, b.positions.detach())
        pos, species, ptr, pj, shift, ts = args

        def call(species=species, structure=b.structure, dparams=dparams):
            with torch.no_grad():
                return torch.ops.distmlip.bpnn_energy_forces(pos, species, ptr, pj, shift, ts, *dparams, mean,
                                                             inv_std, base, scale, structure,
                                                             int(b.n_structures), params, list(codes))

        bad = species.clone()
        bad[3] = 7
        with pytest.raises(RuntimeError, match="species index 7"):
            call(species=bad)
        bad = b.structure.clone()
        bad[5] = int(b.n_structures)
        with pytest.raises(RuntimeError, match=r"atom 5 has structure index"):
            call(structure=bad)
        with pytest.raises(RuntimeError, match="orders must be in"):
            call(dparams=(dparams[0], 99, dparams[2], dparams[3]))
