"""Pure-PyTorch aenet Chebyshev descriptor: hand-computed values (dimer, trimer, a lone atom
seeing its own periodic images), finite-difference gradients, second-order autograd,
invariances, dimension formula and triplet construction."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from distmlip.data.structure import Structure
from distmlip.descriptors.batch import collate
from distmlip.descriptors.chebyshev import (ChebyshevDescriptor, build_triplets, descriptor_dim,
                                            typespin)


def fc(r, rc):
    return 0.5 * (math.cos(math.pi * r / rc) + 1.0) if r < rc else 0.0


def cheb(n, x):
    """T_n(x) = cos(n arccos x) (closed form, independent of the recurrence)."""
    return math.cos(n * math.acos(max(-1.0, min(1.0, x))))


def describe(desc, structures, skin=0.0, dtype=torch.float64):
    b = collate(structures, desc.species, desc.cutoff + skin, dtype=dtype)
    return b, desc(b.positions, b.species, b.pair_i, b.pair_j, b.pair_shift)


def mol(symbols_z, pos, cell=None, pbc=False):
    return Structure(numbers=np.asarray(symbols_z), positions=np.asarray(pos, float),
                     cell=np.zeros((3, 3)) if cell is None else np.asarray(cell, float),
                     pbc=np.broadcast_to(np.asarray(pbc, bool), (3,)).copy())


# ------------------------------------------------------------------------------- conventions

@pytest.mark.parametrize("T,expected", [(1, [0.0]), (2, [-1.0, 1.0]), (3, [-1.0, 0.0, 1.0]),
                                        (4, [-2.0, -1.0, 1.0, 2.0]), (5, [-2.0, -1.0, 0.0, 1.0, 2.0])])
def test_typespin(T, expected):
    assert typespin(T) == expected


@pytest.mark.parametrize("species", [["C"], ["C", "H"], ["C", "H", "O"], ["Li", "C", "H", "O"]])
def test_dimension_formula(species):
    nr, na = 12, 4
    d = ChebyshevDescriptor(species, 6.5, nr, 4.0, na)
    expected = (nr + na + 2) * (2 if len(species) > 1 else 1)
    assert d.dim == expected == descriptor_dim(len(species), nr, na)
    if species == ["C", "H", "O"]:
        assert d.dim == 36
    assert torch.equal(d.typespin, torch.tensor(typespin(len(species)), dtype=torch.float64))
    # an actual evaluation has that width
    rng = np.random.default_rng(0)
    z = {"C": 6, "H": 1, "O": 8, "Li": 3}
    nums = [z[species[k % len(species)]] for k in range(5)]
    _, G = describe(d, [mol(nums, rng.normal(size=(5, 3)) * 1.5)])
    assert G.shape == (5, expected)


def test_spec_roundtrip_and_species_numbers():
    from distmlip.descriptors.spec import DescriptorSpec
    from distmlip.errors import ConfigError

    d = ChebyshevDescriptor([6, 1, 8], 6.5, 12, 4.0, 4)
    assert d.species == ["C", "H", "O"] and d.dim == 36 and d.cutoff == 6.5
    spec = DescriptorSpec.from_dict(d.spec.to_dict())
    assert spec == d.spec and hash(spec) == hash(d.spec) and spec.dim(3) == 36
    assert spec.build(["C", "H", "O"]).dim == 36
    assert DescriptorSpec.from_dict({"rc_radial": 6.5, "n_radial": 12, "backend": "fused"}) == DescriptorSpec()
    assert DescriptorSpec(rc_radial=6) != DescriptorSpec(rc_radial=6.5)
    with pytest.raises(ValueError):
        ChebyshevDescriptor(["C"], 6.5, -1, 4.0, 4)
    with pytest.raises(ValueError):
        ChebyshevDescriptor(["C"], 6.5, 3, 4.0, 4, kernels="magic")
    with pytest.raises(ConfigError, match="rc_radial"):
        DescriptorSpec(rc_radial=float("nan"))
    with pytest.raises(ConfigError, match="type"):
        DescriptorSpec(type="behler")
    with pytest.raises(ConfigError, match="unknown key"):
        DescriptorSpec.from_dict({"rc_radiall": 5.0})


# ------------------------------------------------------------------------ hand-computed values

def test_dimer_values():
    rc_r, nr, rc_a, na = 5.0, 6, 3.5, 3
    d = ChebyshevDescriptor(["C", "H"], rc_r, nr, rc_a, na)      # typespin C -1, H +1
    r = 1.37
    _, G = describe(d, [mol([6, 1], [[0.1, 0.2, 0.3], [0.1 + r * 0.6, 0.2 + r * 0.8, 0.3]])])
    x = 2 * r / rc_r - 1
    rad = [cheb(n, x) * fc(r, rc_r) for n in range(nr + 1)]
    zeros = [0.0] * (na + 1)
    exp_C = rad + zeros + [+1.0 * v for v in rad] + zeros     # neighbour of C is H (s = +1)
    exp_H = rad + zeros + [-1.0 * v for v in rad] + zeros     # neighbour of H is C (s = -1)
    np.testing.assert_allclose(G[0].numpy(), exp_C, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(G[1].numpy(), exp_H, rtol=1e-13, atol=1e-14)
    # one species: no weighted copy
    d1 = ChebyshevDescriptor(["C"], rc_r, nr, rc_a, na)
    _, G1 = describe(d1, [mol([6, 6], [[0, 0, 0], [r, 0, 0]])])
    np.testing.assert_allclose(G1[0].numpy(), rad + zeros, rtol=1e-13, atol=1e-14)
    # beyond the cutoff: nothing
    _, G2 = describe(d, [mol([6, 1], [[0, 0, 0], [rc_r + 0.01, 0, 0]])])
    assert torch.all(G2 == 0)


def test_trimer_values():
    """O at the origin, H and C around it; species list order H, C, O -> typespin -1, 0, +1."""
    rc_r, nr, rc_a, na = 4.5, 5, 3.0, 4
    species = ["H", "C", "O"]
    s = {"H": -1.0, "C": 0.0, "O": 1.0}
    d = ChebyshevDescriptor(species, rc_r, nr, rc_a, na)
    r1, r2, theta = 1.1, 1.6, math.radians(104.0)
    pos = np.array([[0.0, 0.0, 0.0], [r1, 0.0, 0.0], [r2 * math.cos(theta), r2 * math.sin(theta), 0.0]])
    # random rigid motion so that no coordinate is special
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    pos = pos @ q.T + np.array([0.3, -1.2, 2.0])
    elems = ["O", "H", "C"]
    _, G = describe(d, [mol([8, 1, 6], pos)])

    def dist(a, b):
        return float(np.linalg.norm(pos[a] - pos[b]))

    def angle(c, a, b):        # angle at c between a and b, from the law of cosines
        x, y, z = dist(c, a), dist(c, b), dist(a, b)
        return math.acos((x * x + y * y - z * z) / (2 * x * y))

    for i in range(3):
        j, k = [a for a in range(3) if a != i]
        rad = [0.0] * (nr + 1)
        radw = [0.0] * (nr + 1)
        for nb in (j, k):
            r = dist(i, nb)
            for n in range(nr + 1):
                v = cheb(n, 2 * r / rc_r - 1) * fc(r, rc_r)
                rad[n] += v
                radw[n] += s[elems[nb]] * v
        th = angle(i, j, k)
        w = fc(dist(i, j), rc_a) * fc(dist(i, k), rc_a)
        ang = [math.cos(n * th) * w for n in range(na + 1)]            # T_n(cos t) = cos(n t)
        angw = [s[elems[j]] * s[elems[k]] * v for v in ang]
        np.testing.assert_allclose(G[i].numpy(), rad + ang + radw + angw, rtol=1e-12, atol=1e-13,
                                   err_msg=f"atom {i} ({elems[i]})")
    # the C-H distance (2.2 A) is beyond rc_a? make sure the test exercises a non-trivial angle
    assert dist(1, 2) > 1.5 and all(dist(0, a) < rc_a for a in (1, 2))


def test_lone_atom_sees_its_periodic_images():
    """One atom in a triclinic cell smaller than the cutoff: its neighbours are its own images,
    enumerated here directly from lattice translations."""
    cell = np.array([[2.3, 0.0, 0.0], [0.6, 2.5, 0.0], [-0.4, 0.3, 2.7]])
    rc_r, nr, rc_a, na = 5.2, 4, 3.4, 3
    d = ChebyshevDescriptor(["Cu"], rc_r, nr, rc_a, na)
    _, G = describe(d, [mol([29], [[0.4, 0.2, 0.1]], cell, True)])
    vecs = []
    for t in itertools.product(range(-6, 7), repeat=3):
        if any(t):
            v = np.asarray(t, float) @ cell
            if np.linalg.norm(v) < rc_r:
                vecs.append(v)
    rad = [sum(cheb(n, 2 * np.linalg.norm(v) / rc_r - 1) * fc(np.linalg.norm(v), rc_r) for v in vecs)
           for n in range(nr + 1)]
    av = [v for v in vecs if np.linalg.norm(v) < rc_a]
    ang = [0.0] * (na + 1)
    for a, b in itertools.combinations(range(len(av)), 2):
        ra, rb = np.linalg.norm(av[a]), np.linalg.norm(av[b])
        c = float(np.dot(av[a], av[b]) / (ra * rb))
        for n in range(na + 1):
            ang[n] += cheb(n, c) * fc(ra, rc_a) * fc(rb, rc_a)
    assert len(av) > 6
    np.testing.assert_allclose(G[0].numpy(), rad + ang, rtol=1e-11, atol=1e-11)


# ------------------------------------------------------------------------------- derivatives

def _random_periodic(rng, n=6, species=(1, 6, 8)):
    cell = np.array([[3.1, 0.0, 0.0], [0.9, 3.3, 0.0], [-0.6, 0.7, 3.6]])      # faces < cutoff
    frac = rng.random((n, 3))
    pos = frac @ cell
    nums = [species[k % len(species)] for k in range(n)]
    return mol(nums, pos, cell, True)


def _random_molecule(rng, n=7, species=(1, 6, 8)):
    # a compact cluster with no two atoms closer than 0.9 A
    pos = []
    while len(pos) < n:
        p = rng.normal(size=3) * 1.4
        if all(np.linalg.norm(p - q) > 0.9 for q in pos):
            pos.append(p)
    nums = [species[k % len(species)] for k in range(n)]
    return mol(nums, np.array(pos))


def _fd_check(desc, struct, rng, h=1e-5):
    """Full Jacobian dG/dR by autograd vs central finite differences (pair list fixed, built with
    a 0.5 A skin so pairs crossing a cutoff are handled by the descriptor)."""
    b = collate([struct], desc.species, desc.cutoff + 0.5)
    args = (b.species, b.pair_i, b.pair_j, b.pair_shift)
    x0 = b.positions.detach().clone()
    f = lambda x: desc(x, *args)  # noqa: E731
    J = torch.autograd.functional.jacobian(f, x0)                      # [N, D, N, 3]
    N = x0.shape[0]
    Jfd = torch.zeros_like(J)
    for a in range(N):
        for c in range(3):
            xp, xm = x0.clone(), x0.clone()
            xp[a, c] += h
            xm[a, c] -= h
            Jfd[:, :, a, c] = (f(xp) - f(xm)) / (2 * h)
    scale = J.abs().max()
    assert scale > 0
    err = (J - Jfd).abs().max() / scale
    assert err < 1e-6, f"max relative Jacobian error {err:.3e}"
    # and the gradient of a scalar of all components
    w = torch.from_numpy(rng.normal(size=tuple(J.shape[:2])))
    x = x0.clone().requires_grad_()
    g, = torch.autograd.grad((f(x) * w).sum(), x)
    gfd = torch.einsum("nd,ndac->ac", w, Jfd)
    assert ((g - gfd).abs().max() / g.abs().max()) < 1e-6
    return err


@pytest.mark.parametrize("maker", [_random_periodic, _random_molecule])
def test_finite_difference_jacobian(maker):
    rng = np.random.default_rng(7)
    desc = ChebyshevDescriptor(["H", "C", "O"], 4.2, 8, 3.3, 5)
    for _ in range(2):
        _fd_check(desc, maker(rng), rng)


def test_finite_difference_single_species_small_cell():
    rng = np.random.default_rng(8)
    cell = np.array([[2.6, 0.0, 0.0], [0.5, 2.4, 0.0], [0.3, -0.2, 2.8]])
    s = mol([14, 14], rng.random((2, 3)) @ cell, cell, True)
    _fd_check(ChebyshevDescriptor(["Si"], 4.0, 6, 3.0, 4), s, rng)


def test_gradgradcheck_second_order():
    rng = np.random.default_rng(9)
    desc = ChebyshevDescriptor(["H", "O"], 3.5, 4, 3.0, 3)
    cell = np.array([[2.8, 0.0, 0.0], [0.4, 2.9, 0.0], [0.2, 0.3, 3.0]])
    s = mol([1, 8, 1], rng.random((3, 3)) @ cell, cell, True)
    b = collate([s], desc.species, desc.cutoff)
    x = b.positions.detach().clone().requires_grad_()
    f = lambda x: desc(x, b.species, b.pair_i, b.pair_j, b.pair_shift)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-6)
    assert torch.autograd.gradgradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_force_training_double_backward():
    """dE/dR with create_graph, then a loss on it backpropagates to weights (what force training
    does); compared against finite differences of the force loss in the weight."""
    rng = np.random.default_rng(10)
    desc = ChebyshevDescriptor(["H", "C", "O"], 4.0, 5, 3.0, 3)
    b = collate([_random_molecule(rng, 5)], desc.species, desc.cutoff)
    W = torch.from_numpy(rng.normal(size=(desc.dim,))).requires_grad_()

    def loss(W):
        x = b.positions.detach().clone().requires_grad_()
        E = torch.tanh(desc(x, b.species, b.pair_i, b.pair_j, b.pair_shift) @ W).sum()
        F, = torch.autograd.grad(E, x, create_graph=True)
        return (F ** 2).sum()

    g, = torch.autograd.grad(loss(W), W)
    h = 1e-6
    for k in (0, 3, desc.dim - 1):
        e = torch.zeros_like(W)
        e[k] = h
        fd = (loss(W.detach() + e) - loss(W.detach() - e)) / (2 * h)
        assert abs(float((fd - g[k]).detach())) <= 1e-6 * max(1.0, float(g.abs().max()))


# ------------------------------------------------------------------------------- invariances

def test_rotation_translation_permutation_invariance():
    rng = np.random.default_rng(11)
    desc = ChebyshevDescriptor(["H", "C", "O"], 4.2, 6, 3.3, 4)
    s = _random_periodic(rng, n=6)
    _, G = describe(desc, [s])
    # rotation of positions and cell + translation
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    t = rng.normal(size=3) * 3
    s2 = mol(s.numbers, s.positions @ q.T + t, s.cell @ q.T, True)
    _, G2 = describe(desc, [s2])
    torch.testing.assert_close(G2, G, rtol=1e-10, atol=1e-10)
    # wrapping an atom by a lattice vector
    p3 = s.positions.copy()
    p3[2] += s.cell[0] - 2 * s.cell[2]
    _, G3 = describe(desc, [mol(s.numbers, p3, s.cell, True)])
    torch.testing.assert_close(G3, G, rtol=1e-10, atol=1e-10)
    # permutation (atoms of equal species swap their rows; others follow)
    perm = rng.permutation(len(s.numbers))
    _, G4 = describe(desc, [mol(np.asarray(s.numbers)[perm], s.positions[perm], s.cell, True)])
    torch.testing.assert_close(G4, G[perm], rtol=1e-10, atol=1e-10)
    # molecule: rotation + translation + swap of two equal atoms
    m = _random_molecule(rng, 7)
    _, Gm = describe(desc, [m])
    _, Gm2 = describe(desc, [mol(m.numbers, m.positions @ q.T + t)])
    torch.testing.assert_close(Gm2, Gm, rtol=1e-10, atol=1e-10)
    nums = np.asarray(m.numbers)
    a, b = [k for k in range(len(nums)) if nums[k] == nums[0]][:2]
    p = np.arange(len(nums))
    p[[a, b]] = p[[b, a]]
    _, Gm3 = describe(desc, [mol(nums[p], m.positions[p])])
    torch.testing.assert_close(Gm3, Gm[p], rtol=1e-12, atol=1e-12)


def test_batch_equals_single_and_float32():
    rng = np.random.default_rng(12)
    desc = ChebyshevDescriptor(["H", "C", "O"], 4.2, 6, 3.3, 4)
    structs = [_random_periodic(rng), _random_molecule(rng), _random_periodic(rng, n=4)]
    _, Gb = describe(desc, structs)
    Gs = torch.cat([describe(desc, [s])[1] for s in structs])
    torch.testing.assert_close(Gb, Gs, rtol=0, atol=0)
    # pairs beyond the cutoff in the list are ignored
    _, Gskin = describe(desc, structs, skin=1.0)
    torch.testing.assert_close(Gskin, Gb, rtol=1e-12, atol=1e-12)
    _, G32 = describe(desc, structs, dtype=torch.float32)
    assert G32.dtype == torch.float32
    torch.testing.assert_close(G32.double(), Gb, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- triplets

def test_build_triplets_against_loop():
    rng = np.random.default_rng(13)
    P = 200
    pair_i = torch.from_numpy(np.sort(rng.integers(0, 15, size=P)))
    r = torch.from_numpy(rng.uniform(0.5, 5.0, size=P))
    rc = 3.0
    tp, tq = build_triplets(pair_i, r, rc)
    expected = [(p, q) for p in range(P) for q in range(p + 1, P)
                if pair_i[p] == pair_i[q] and r[p] < rc and r[q] < rc]
    assert list(zip(tp.tolist(), tq.tolist())) == expected
    # unsorted pair list: same set, still p < q within a centre pair order
    perm = torch.from_numpy(rng.permutation(P))
    tp2, tq2 = build_triplets(pair_i[perm], r[perm], rc)
    got = {tuple(sorted((int(perm[a]), int(perm[b])))) for a, b in zip(tp2.tolist(), tq2.tolist())}
    assert got == set(expected)
    # nothing within the cutoff
    tp3, tq3 = build_triplets(pair_i, r, 0.1)
    assert tp3.numel() == 0 and tq3.numel() == 0


def test_fused_kernels_match_reference():
    """kernels='fused' gives the reference values."""
    from distmlip._ext import has_kernel

    if not has_kernel("chebyshev_forward", "cpu"):
        pytest.skip("compiled extension missing")
    rng = np.random.default_rng(14)
    ref = ChebyshevDescriptor(["H", "C", "O"], 4.2, 6, 3.3, 4)
    fus = ChebyshevDescriptor(["H", "C", "O"], 4.2, 6, 3.3, 4, kernels="fused")
    b = collate([_random_periodic(rng), _random_molecule(rng)], ref.species, ref.cutoff)
    args = (b.positions, b.species, b.pair_i, b.pair_j, b.pair_shift)
    torch.testing.assert_close(fus(*args, pair_ptr=b.pair_ptr), ref(*args), rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kernels", ["reference", "fused"])
def test_cuda_matches_cpu(kernels):
    """Descriptor, its VJP and the weight-free second derivative of a force-like loss on the GPU
    equal the CPU reference (float64)."""
    from distmlip._ext import has_kernel

    if kernels == "fused" and not has_kernel("chebyshev_forward", "cuda"):
        pytest.skip("extension built without CUDA kernels")
    rng = np.random.default_rng(15)
    desc = ChebyshevDescriptor(["H", "C", "O"], 4.2, 6, 3.3, 4)
    b = collate([_random_periodic(rng), _random_molecule(rng)], desc.species, desc.cutoff)
    w = torch.linspace(-1.0, 1.0, desc.dim, dtype=torch.float64)

    def run(batch, module, kern):
        x = batch.positions.detach().clone().requires_grad_()
        G = module(x, batch.species, batch.pair_i, batch.pair_j, batch.pair_shift, kernels=kern)
        (g,) = torch.autograd.grad((torch.tanh(G) * w.to(G.device)).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad((g * g).sum(), x)
        return G.detach().cpu(), g.detach().cpu(), h.cpu()

    cpu = run(b, desc, "reference")
    gpu = run(b.to("cuda"), desc.to("cuda"), kernels)
    for a, c, name in zip(gpu, cpu, ("G", "dE/dR", "second derivative")):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10, msg=name)


def test_empty_and_isolated_atom():
    d = ChebyshevDescriptor(["H", "O"], 4.0, 3, 3.0, 2)
    _, G0 = describe(d, [])
    assert G0.shape == (0, d.dim)
    b = collate([mol([1], [[0.0, 0.0, 0.0]])], d.species, d.cutoff)
    x = b.positions.requires_grad_()
    G = d(x, b.species, b.pair_i, b.pair_j, b.pair_shift)
    assert G.shape == (1, d.dim) and torch.all(G == 0)
    g, = torch.autograd.grad(G.sum(), x, allow_unused=True)
    assert g is None or torch.all(g == 0)
