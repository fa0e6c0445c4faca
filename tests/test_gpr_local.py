"""Local-environment GPR kernel (sum of per-atom kernels): covariance blocks and their length-scale
derivative against finite differences, the compiled Jacobian against autograd, per-structure
cells, the prior variance, and the variance weights of synthetic energies."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distmlip.descriptors.spec import DescriptorSpec
from distmlip.gpr.fingerprints import ChebyshevFingerprint, LocalFingerprint
from distmlip.gpr.kernel import assemble

SPEC = DescriptorSpec(rc_radial=4.0, n_radial=4, rc_angular=3.5, n_angular=2)
NUMBERS = np.array([29, 28, 29, 28])
BASE = np.array([[0, 0, 0], [2.4, 0.1, 0], [0.2, 2.3, 0.3], [1.3, 1.2, 1.9]], float)


def _fp():
    fpo = LocalFingerprint(["Cu", "Ni"], SPEC)
    fp = lambda R: fpo._one(NUMBERS, np.asarray(R).reshape(-1, 3), np.zeros((3, 3)), np.zeros(3, bool), True)
    return fpo, fp


def test_local_kernel_blocks_match_finite_differences():
    fpo, fp = _fp()
    ker = fpo.kernel(NUMBERS)
    rng = np.random.default_rng(8)
    Ra = BASE.ravel()
    Rb = Ra + 0.15 * rng.normal(size=Ra.size)

    def obs(R):
        x, J = fp(R)
        return x[None], J[None]

    w, l, h, P = 1.1, 0.9, 1e-5, Ra.size
    K = ker.cov_block(*obs(Ra), *obs(Rb), w, l)
    kee = lambda A, B: float(ker.cov_block(*obs(A), *obs(B), w, l, False, False)[0, 0])
    keg = lambda A, B: ker.cov_block(*obs(A), *obs(B), w, l, False, True)[0, 1:]
    # the energy-energy value is the double sum over same-element atom pairs
    Ga, Gb = obs(Ra)[0].reshape(4, -1), obs(Rb)[0].reshape(4, -1)
    ref = sum(w * w * math.exp(-float(((Ga[i] - Gb[j]) ** 2).sum()) / (2 * l * l))
              for i in range(4) for j in range(4) if NUMBERS[i] == NUMBERS[j])
    assert float(K[0, 0]) == pytest.approx(ref, rel=1e-12)
    fd_eg = np.array([(kee(Ra, Rb + h * e) - kee(Ra, Rb - h * e)) / (2 * h) for e in np.eye(P)])
    np.testing.assert_allclose(K[0, 1:].numpy(), fd_eg, rtol=1e-6, atol=1e-8)
    fd_ge = np.array([(kee(Ra + h * e, Rb) - kee(Ra - h * e, Rb)) / (2 * h) for e in np.eye(P)])
    np.testing.assert_allclose(K[1:, 0].numpy(), fd_ge, rtol=1e-6, atol=1e-8)
    fd_gg = np.stack([(keg(Ra + h * e, Rb) - keg(Ra - h * e, Rb)).numpy() / (2 * h) for e in np.eye(P)])
    np.testing.assert_allclose(K[1:, 1:].numpy(), fd_gg, rtol=1e-5, atol=1e-7)
    assert np.abs(fd_gg).max() > 0.1


def test_local_kernel_length_derivative_symmetry_and_prior_variance():
    fpo, fp = _fp()
    ker = fpo.kernel(NUMBERS)
    rng = np.random.default_rng(3)
    Rs = [BASE.ravel() + 0.1 * rng.normal(size=12) for _ in range(3)]
    X = torch.stack([fp(R)[0] for R in Rs])
    J = torch.stack([fp(R)[1] for R in Rs])
    w, l, h = 0.8, 1.3, 1e-5
    K = assemble(X, J, X, J, w, l, kernel=ker, max_block_bytes=1)      # one structure per chunk
    torch.testing.assert_close(K, ker.cov_block(X, J, X, J, w, l), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(K, K.T, rtol=0, atol=1e-12)
    assert torch.linalg.eigvalsh(K).min() > -1e-10
    dK = assemble(X, J, X, J, w, l, deriv="log_length", kernel=ker)
    fd = (assemble(X, J, X, J, w, l * math.exp(h), kernel=ker) - assemble(X, J, X, J, w, l * math.exp(-h), kernel=ker)) / (2 * h)
    torch.testing.assert_close(dK, fd, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ker.prior_variance(X, w, l), K[:3, :3].diagonal(), rtol=1e-12, atol=0)


def test_compiled_jacobian_matches_autograd_on_a_periodic_cell():
    from ase.build import bulk

    a = bulk("Cu", "fcc", a=3.61, cubic=True)
    a.rattle(0.05, seed=1)
    fpo = LocalFingerprint(["Cu"], SPEC)
    x1, J1 = fpo._one(a.numbers, a.positions, a.cell[:], a.pbc, True)
    x2, J2 = ChebyshevFingerprint._one(fpo, a.numbers, a.positions, a.cell[:], a.pbc, True)   # autograd
    torch.testing.assert_close(x1, x2, rtol=0, atol=1e-12)
    torch.testing.assert_close(J1, J2, rtol=0, atol=1e-11)
    assert J1.abs().max() > 0.1


def test_fingerprints_use_each_structures_own_cell():
    from ase.build import bulk

    from distmlip.gpr.fingerprints import InverseDistanceFingerprint

    a = bulk("Cu", "fcc", a=3.61, cubic=True)
    b = a.copy()
    b.set_cell(a.cell[:] * 1.03, scale_atoms=True)
    fpo = LocalFingerprint(["Cu"], SPEC)
    X, _ = fpo.compute([a.positions, b.positions], [a, b], with_jacobian=False)
    xb, _ = fpo._one(b.numbers, b.positions, b.cell[:], b.pbc, False)
    torch.testing.assert_close(X[1], xb)
    Xwrong, _ = fpo.compute([a.positions, b.positions], a, with_jacobian=False)   # old behaviour
    assert (Xwrong[1] - xb).abs().max() > 1e-3
    inv = InverseDistanceFingerprint()
    Xi, _ = inv.compute([a.positions, b.positions], [a, b], with_jacobian=False)
    Xb, _ = inv.compute([b.positions], b, with_jacobian=False)
    torch.testing.assert_close(Xi[1], Xb[0])


def test_variance_weights_formula():
    from distmlip.gpr.augment import AugmentConfig, synthetic_weights

    sig = np.array([0.0, 0.01, 0.02, 0.04])
    kept = np.array([True, True, True, False])
    cfg = AugmentConfig(input="x", output="y", synthetic_weight=2.0, weighting="variance")
    s0 = 0.01                                          # median sigma of the kept copies
    np.testing.assert_allclose(synthetic_weights(cfg, sig, kept), 2.0 * s0 ** 2 / (s0 ** 2 + sig ** 2))
    # the floor: 1 meV per atom x 32 atoms = 0.032 eV > the median, so it sets s0
    np.testing.assert_allclose(synthetic_weights(cfg, sig, kept, natoms=32),
                               2.0 * 0.032 ** 2 / (0.032 ** 2 + sig ** 2))
    # sigmas far below the floor (the H2 copies): all weights close to full
    assert synthetic_weights(cfg, np.array([0.0, 1e-4, 5e-4]), np.ones(3, bool), natoms=2).min() > 0.9 * 2.0
    cfg.weight_sigma = 0.02
    np.testing.assert_allclose(synthetic_weights(cfg, sig, kept), 2.0 * 4e-4 / (4e-4 + sig ** 2))
    cfg.weighting = "none"
    np.testing.assert_allclose(synthetic_weights(cfg, sig, kept), 2.0)


def test_hyperparameters_on_their_bounds_are_reported():
    from distmlip.gpr.model import GPR

    rng = np.random.default_rng(1)
    X = rng.normal(size=(12, 3))
    E = np.sin(X).sum(1)                          # noise-free: the fit wants the smallest noise
    F = -np.cos(X)
    g = GPR(noise_min=0.05, noise_max=0.1, fit_iterations=20, fit_restarts=1).fit(torch.as_tensor(X), None, E, F)
    assert "noise_energy lower" in g.info["fit_at_bounds"]
    assert g.hyper.noise_energy == pytest.approx(0.05, rel=1e-5)


def _kernel_and_structures(seed, scale, count=5):
    """The local kernel of NUMBERS and ``count`` rattled copies of BASE: (kernel, X, J)."""
    fpo, fp = _fp()
    rng = np.random.default_rng(seed)
    XJ = [fp(BASE + scale * rng.normal(size=BASE.shape)) for _ in range(count)]
    return fpo.kernel(NUMBERS), torch.stack([x for x, _ in XJ]), torch.stack([j for _, j in XJ])


def test_local_kernel_column_chunks_give_the_same_block():
    """cov_block in column chunks (the scratch memory bound) equals the block in one pass, for
    the covariance and its length-scale derivative, with and without gradient rows/columns."""
    ker, X, J = _kernel_and_structures(seed=3, scale=0.1)
    for deriv in (None, "log_length"):
        for rows_grad, cols_grad in ((True, True), (True, False), (False, True)):
            whole = ker.cov_block(X[:2], J[:2], X, J, 1.3, 0.7, rows_grad, cols_grad, deriv)
            ker.SCRATCH_BYTES = 8 * ker.n * ker.n * J.shape[-1] * 2     # two columns per pass
            assert ker.column_chunk(5, J.shape[-1], J.shape[-1]) == 2
            chunked = ker.cov_block(X[:2], J[:2], X, J, 1.3, 0.7, rows_grad, cols_grad, deriv)
            del ker.SCRATCH_BYTES
            torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
        # the energy rows against values and gradients (predictions without forces) take their
        # own contraction: the same numbers as those rows of the general block
        full = ker.cov_block(X[:2], J[:2], X, J, 1.3, 0.7, True, True, deriv)
        rows = ker.cov_block(X[:2], J[:2], X, J, 1.3, 0.7, False, True, deriv)
        torch.testing.assert_close(rows, full[:2], rtol=1e-12, atol=1e-12)
        cols = ker.cov_block(X[:2], J[:2], X, J, 1.3, 0.7, True, False, deriv)
        torch.testing.assert_close(cols, full[:, :5], rtol=1e-12, atol=1e-12)


def test_local_kernel_blocks_equal_the_pairwise_sums_over_several_structures():
    """Every block of cov_block between 2 and 3 structures (two elements) against its atom-pair
    sums written out: k_ij, c2_ij J_bj^T r_ij, c2_ij J_ai^T r_ij and
    c2_ij J_ai^T J_bj - c4_ij (J_ai^T r_ij)(J_bj^T r_ij)^T over same-element pairs, r_ij = G_ai - G_bj."""
    ker, X, J = _kernel_and_structures(seed=11, scale=0.12)
    XA, JA, XB, JB = X[:2], J[:2], X[2:], J[2:]
    w, l = 1.2, 0.8
    K = ker.cov_block(XA, JA, XB, JB, w, l).numpy()
    want = _pair_sums(XA, JA, XB, JB, w, l, ker.dim, [NUMBERS] * 2, [NUMBERS] * 3)
    np.testing.assert_allclose(K, want, rtol=1e-11, atol=1e-12 * np.abs(want).max())


def _pair_sums(XA, JA, XB, JB, w, l, D, zA, zB):
    """The local kernel's blocks between structure sets A and B written out atom pair by atom
    pair, over the pairs of one element (``zA``, ``zB``: each structure's atomic numbers)."""
    A, B, n, P = XA.shape[0], XB.shape[0], len(zA[0]), JA.shape[-1]
    want = np.zeros((A * (1 + P), B * (1 + P)))
    for a in range(A):
        Ga, Ja = XA[a, :n * D].numpy().reshape(n, D), JA[a, :n * D].numpy().reshape(n, D, P)
        for b in range(B):
            Gb, Jb = XB[b, :n * D].numpy().reshape(n, D), JB[b, :n * D].numpy().reshape(n, D, P)
            for i in range(n):
                for j in range(n):
                    if zA[a][i] != zB[b][j]:
                        continue
                    r = Ga[i] - Gb[j]
                    k = w * w * math.exp(-float(r @ r) / (2 * l * l))
                    c2, c4 = k / l ** 2, k / l ** 4
                    want[a, b] += k
                    want[a, B + b * P:B + (b + 1) * P] += c2 * (Jb[j].T @ r)
                    want[A + a * P:A + (a + 1) * P, b] -= c2 * (Ja[i].T @ r)
                    want[A + a * P:A + (a + 1) * P, B + b * P:B + (b + 1) * P] += (
                        c2 * Ja[i].T @ Jb[j] - c4 * np.outer(Ja[i].T @ r, Jb[j].T @ r))
    return want


MIXED = [np.array(z) for z in ([29, 28, 29, 28], [29, 29, 29, 28], [28, 28, 29, 28], [29, 29, 29, 29], [28, 29, 28, 29])]


def _mixed_structures(seed, scale):
    """Five 4-atom structures of Cu and Ni in five compositions and orders, through the mixed
    local fingerprint (each with its element codes): (fingerprint, kernel, X, J)."""
    from ase import Atoms

    rng = np.random.default_rng(seed)
    fpo = LocalFingerprint(["Cu", "Ni"], SPEC, mixed=True)
    tm = [Atoms(numbers=z, positions=BASE + scale * rng.normal(size=BASE.shape)) for z in MIXED]
    X, J = fpo.compute([a.positions for a in tm], [_T(a) for a in tm])
    return fpo, fpo.kernel(MIXED[0]), X, J


class _T:
    def __init__(self, a):
        self.numbers, self.positions = a.numbers, a.positions
        self.cell, self.pbc = np.zeros((3, 3)), np.zeros(3, bool)


def test_mixed_local_kernel_blocks_equal_the_pairwise_sums_per_structure():
    """Structures of different compositions in one fit: every block against its atom-pair sums
    over the pairs whose two atoms are of one element in THEIR OWN structures; the element codes'
    columns carry no gradient, and the blocks of structures that share one sequence equal the
    fixed-sequence kernel's."""
    fpo, ker, X, J = _mixed_structures(seed=5, scale=0.12)
    n, D, P = 4, ker.dim, J.shape[-1]
    assert ker.is_mixed and X.shape[1] == n * D + n and J.shape[1] == n * D + n
    assert torch.equal(X[:, n * D:].long(), torch.as_tensor(np.stack(MIXED) == 28).long())
    assert torch.all(J[:, n * D:] == 0)
    XA, JA, XB, JB = X[:2], J[:2], X[2:], J[2:]
    w, l = 1.2, 0.8
    K = ker.cov_block(XA, JA, XB, JB, w, l).numpy()
    want = _pair_sums(XA, JA, XB, JB, w, l, D, MIXED[:2], MIXED[2:])
    np.testing.assert_allclose(K, want, rtol=1e-11, atol=1e-12 * np.abs(want).max())
    # the one-sided blocks (predictions) and column chunks are those rows of the general block
    for deriv in (None, "log_length"):
        full = ker.cov_block(X[:2], J[:2], X, J, w, l, True, True, deriv)
        torch.testing.assert_close(ker.cov_block(X[:2], J[:2], X, J, w, l, False, True, deriv), full[:2],
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ker.cov_block(X[:2], J[:2], X, J, w, l, True, False, deriv), full[:, :5],
                                   rtol=1e-12, atol=1e-12)
        ker.SCRATCH_BYTES = 8 * n * n * P * 2
        torch.testing.assert_close(ker.cov_block(X[:2], J[:2], X, J, w, l, True, True, deriv), full,
                                   rtol=1e-12, atol=1e-12)
        del ker.SCRATCH_BYTES
    # the length derivative against finite differences, and the prior variance
    h = 1e-5
    dK = assemble(X, J, X, J, w, l, deriv="log_length", kernel=ker)
    fd = (assemble(X, J, X, J, w, l * math.exp(h), kernel=ker) - assemble(X, J, X, J, w, l * math.exp(-h), kernel=ker)) / (2 * h)
    torch.testing.assert_close(dK, fd, rtol=1e-6, atol=1e-7)
    Kall = assemble(X, J, X, J, w, l, kernel=ker)
    torch.testing.assert_close(ker.prior_variance(X, w, l), Kall[:5, :5].diagonal(), rtol=1e-12, atol=0)
    assert torch.linalg.eigvalsh(Kall).min() > -1e-10
    # one sequence: the mixed kernel equals the fixed one
    fx = LocalFingerprint(["Cu", "Ni"], SPEC)
    rng = np.random.default_rng(1)
    pos = [BASE + 0.1 * rng.normal(size=BASE.shape) for _ in range(3)]
    tm = [_T(type("A", (), {"numbers": MIXED[0], "positions": p})) for p in pos]
    Xf, Jf = fx.compute(pos, tm)
    Xm, Jm = fpo.compute(pos, tm)
    torch.testing.assert_close(ker.cov_block(Xm, Jm, Xm, Jm, w, l), fx.kernel(MIXED[0]).cov_block(Xf, Jf, Xf, Jf, w, l),
                               rtol=1e-12, atol=1e-12)


def test_mixed_fit_energies_have_a_prior_mean_per_element():
    """A GPR on structures of different compositions models the energies about a sum of
    per-element energies: shifting every atom's reference energy (as DFT codes and the choice of
    atomic references do, by eV per atom) shifts its predictions by exactly that sum, and its
    forces not at all.  Without that mean, compositions far from the set's mean energy were
    pulled towards it."""
    from distmlip.gpr.model import LocalGPR

    fpo, ker, X, J = _mixed_structures(seed=2, scale=0.1)
    rng = np.random.default_rng(4)
    n = 4
    Z = np.stack(MIXED)
    F = rng.normal(scale=0.3, size=(5, 3 * n))
    E = rng.normal(scale=0.05, size=5)
    shift = {29: -3.7, 28: 1.9}
    E2 = E + np.array([sum(shift[int(z)] for z in row) for row in Z])
    kw = dict(weight=0.5, length_scale=1.0, noise_energy=1e-3, noise_force=1e-3, kernel=ker, fit_iterations=0)
    m1, m2 = LocalGPR(**kw).fit(X, J, E, F), LocalGPR(**kw).fit(X, J, E2, F)
    # predicted away from the data (other positions), where the prior mean shows
    _, _, Xt, Jt = _mixed_structures(seed=9, scale=0.3)
    e1, f1, s1 = m1.predict(Xt, Jt)
    e2, f2, s2 = m2.predict(Xt, Jt)
    off = torch.as_tensor([sum(shift[int(z)] for z in row) for row in Z], dtype=torch.float64)
    torch.testing.assert_close(e2 - e1, off, rtol=0, atol=1e-9)
    torch.testing.assert_close(f2, f1, rtol=0, atol=1e-9)
    torch.testing.assert_close(s2, s1, rtol=1e-9, atol=1e-12)


def test_padding_structures_to_more_atoms_changes_nothing():
    """Structures padded with atoms that are not there (a group of several atom counts, each
    padded to the largest) give the GPR of the unpadded ones: the same likelihood and gradient in
    every hyperparameter, the same predictions, sigmas and forces of the real atoms, the same
    leave-one-out statistics.  A force-noise diagonal on the padded rows pulled sigma_F down (a
    log sigma_F per padded coordinate in the likelihood) and a zero-padded force MAE looked better
    than it was."""
    from ase import Atoms

    from distmlip.gpr.model import LocalGPR

    rng = np.random.default_rng(6)
    tm = [Atoms(numbers=z, positions=BASE + 0.12 * rng.normal(size=BASE.shape)) for z in MIXED]
    tt = [Atoms(numbers=z, positions=BASE + 0.2 * rng.normal(size=BASE.shape)) for z in MIXED[:3]]
    E = rng.normal(scale=0.05, size=5)
    F = rng.normal(scale=0.3, size=(5, 4, 3))
    out = []
    for n_pad in (None, 7):
        fpo = LocalFingerprint(["Cu", "Ni"], SPEC, mixed=True, n_pad=n_pad)
        X, J = fpo.compute([a.positions for a in tm], [_T(a) for a in tm])
        X, J = fpo.fit_scale(X, J)
        Fp = np.zeros((5, n_pad or 4, 3))
        Fp[:, :4] = F
        ker = fpo.kernel(MIXED[0])
        kw = dict(weight=0.7, length_scale=1.1, noise_energy=2e-3, noise_force=3e-2, kernel=ker, fit_iterations=0)
        m = LocalGPR(**kw).fit(X, J, E, Fp.reshape(5, -1)).calibrate()
        Xt, Jt = fpo.compute([a.positions for a in tt], [_T(a) for a in tt])
        e, f, sg = m.predict(Xt, Jt)
        g = m.models[0]
        y = g._targets(torch.as_tensor(E - (ker.composition(X) @ m.baseline).numpy()),
                       -torch.as_tensor(Fp.reshape(5, -1)))
        p = dict(weight=0.7, length_scale=1.1, noise_energy=2e-3, noise_force=3e-2)
        lml, grad, _ = g.lml_and_grad(X, J, y, p, names=("weight", "length_scale", "noise_energy", "noise_force"))
        out.append(dict(e=e, f=f.reshape(3, -1, 3)[:, :4], sg=sg, lml=lml, grad=grad, lml_fit=g.info["lml"],
                        loo_e=g.info["loo_all_energy_mae_eV"], loo_f=g.info["loo_all_force_mae_eVA"]))
    a, b = out
    torch.testing.assert_close(b["e"], a["e"], rtol=0, atol=1e-10)
    torch.testing.assert_close(b["f"], a["f"], rtol=0, atol=1e-10)
    torch.testing.assert_close(b["sg"], a["sg"], rtol=1e-9, atol=1e-12)
    assert b["lml"] == pytest.approx(a["lml"], rel=1e-10, abs=1e-9)
    assert b["lml_fit"] == pytest.approx(a["lml_fit"], rel=1e-10, abs=1e-9)
    np.testing.assert_allclose(b["grad"], a["grad"], rtol=1e-9, atol=1e-9)
    assert b["loo_e"] == pytest.approx(a["loo_e"], rel=1e-9) and b["loo_f"] == pytest.approx(a["loo_f"], rel=1e-9)


@pytest.mark.parametrize("mixed", [False, True])
def test_kept_row_terms_of_a_prediction_follow_the_rows_they_came_from(mixed):
    """The prediction blocks keep what they derive from the row structures alone between calls
    (the same training set in every call of a labelling); a change of those rows in place, or
    new row tensors, must not reuse it: each block equals the one of fresh copies of its inputs."""
    if mixed:
        _, ker, X, J = _mixed_structures(seed=5, scale=0.12)
    else:
        ker, X, J = _kernel_and_structures(seed=3, scale=0.1)
    nD = ker.n * ker.dim
    XA, JA, XB = X[:2].clone(), J[:2].clone(), X[2:].clone()
    w, l = 1.2, 0.8

    def fresh():
        return ker.cov_block(XA.clone(), JA.clone(), XB, None, w, l, True, False)

    want = fresh()
    first = ker.cov_block(XA, JA, XB, None, w, l, True, False)
    assert torch.equal(ker.cov_block(XA, JA, XB, None, w, l, True, False), first)
    assert torch.equal(first, want)
    XA[:, :nD] += 0.01                  # in place: the kept terms of the old values must go
    changed = ker.cov_block(XA, JA, XB, None, w, l, True, False)   # right after a call on XA
    assert not torch.equal(changed, first) and torch.equal(changed, fresh())
    ker.cov_block(XA, JA, XB, None, w, l, True, False)
    JA.mul_(1.1)
    changed = ker.cov_block(XA, JA, XB, None, w, l, True, False)
    assert torch.equal(changed, fresh())
