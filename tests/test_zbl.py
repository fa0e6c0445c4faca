"""ZBL repulsion: against an independent loop implementation, finite differences, C2 switching."""
import types

import numpy as np
import torch

from distmlip.models.zbl import ZBL, smoothstep, zbl_energy_reference


def _pairs(n):
    i, j = np.where(~np.eye(n, dtype=bool))
    return torch.as_tensor(i), torch.as_tensor(j)


def _cluster(seed=0):
    rng = np.random.default_rng(seed)
    species = ["H", "C", "O"]
    numbers = [1, 6, 8, 6, 1]
    pos = rng.uniform(0.0, 1.6, (5, 3))
    return species, numbers, pos


def _zbl_energy(model, species, numbers, pos):
    sidx = torch.tensor([species.index({1: "H", 6: "C", 8: "O"}[z]) for z in numbers])
    pi, pj = _pairs(len(numbers))
    p = torch.tensor(pos, dtype=torch.float64, requires_grad=True)
    batch = types.SimpleNamespace(positions=p, species=sidx, pair_i=pi, pair_j=pj,
                                  pair_shift=torch.zeros(len(pi), 3, dtype=torch.float64),
                                  structure=torch.zeros(len(numbers), dtype=torch.long), n_structures=1)
    e = model.atomic_energies(batch).sum()
    return e, p


def test_zbl_matches_independent_loop_implementation():
    species, numbers, pos = _cluster()
    model = ZBL(species)
    e, _ = _zbl_energy(model, species, numbers, pos)
    ref = zbl_energy_reference(pos.tolist(), numbers)
    assert ref > 0
    np.testing.assert_allclose(e.item(), ref, rtol=1e-12)


def test_zbl_forces_match_finite_differences():
    species, numbers, pos = _cluster(1)
    model = ZBL(species)
    e, p = _zbl_energy(model, species, numbers, pos)
    (g,) = torch.autograd.grad(e.sum(), p)
    h = 1e-6
    fd = np.zeros_like(pos)
    for a in range(len(numbers)):
        for k in range(3):
            pp, pm = pos.copy(), pos.copy()
            pp[a, k] += h
            pm[a, k] -= h
            fd[a, k] = (zbl_energy_reference(pp.tolist(), numbers) - zbl_energy_reference(pm.tolist(), numbers)) / (2 * h)
    np.testing.assert_allclose(g.numpy(), fd, rtol=1e-6, atol=1e-6 * np.abs(fd).max())


def test_switching_is_c2_at_both_radii():
    t = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    s = smoothstep(t)
    (d1,) = torch.autograd.grad(s.sum(), t, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), t)
    assert torch.allclose(s.detach(), torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert d1.abs().max() < 1e-12 and d2.abs().max() < 1e-12
    # first and second derivatives of the switched pair energy are continuous across each radius
    model = ZBL(["Cu"])

    def derivs(r):
        rr = torch.tensor([r], dtype=torch.float64, requires_grad=True)
        e = model.pair_energies(rr, torch.tensor([0]), torch.tensor([0]))
        (g1,) = torch.autograd.grad(e.sum(), rr, create_graph=True)
        (g2,) = torch.autograd.grad(g1.sum(), rr)
        return g1.item(), g2.item()

    for r0 in (float(model.r_in[0, 0]), float(model.r_out[0, 0])):
        eps = 1e-7
        (a1, a2), (b1, b2) = derivs(r0 - eps), derivs(r0 + eps)
        assert abs(a1 - b1) < 1e-4 * (abs(a1) + 1.0)
        assert abs(a2 - b2) < 1e-3 * (abs(a2) + 1.0)
    # and the switch does matter: without it the second derivative would jump at r_out
    rr = torch.tensor([float(model.r_out[0, 0]) - 1e-7], dtype=torch.float64)
    assert model.pair_energies(rr, torch.tensor([0]), torch.tensor([0])).item() < 1e-6


def test_zbl_is_zero_beyond_outer_radius_and_repulsive_inside():
    model = ZBL(["H", "O"], radii={"H-O": (0.4, 0.7)})
    r = torch.tensor([0.3, 0.5, 0.69, 0.71, 2.0], dtype=torch.float64)
    e = model.pair_energies(r, torch.tensor([0] * 5), torch.tensor([1] * 5))
    assert (e[:3] > 0).all() and (e[3:] == 0).all()
    assert (torch.diff(e[:3]) < 0).all()
