"""Gaussian-process regression on energies and forces (float64, any torch device).

:class:`GPR` fits one GP to the energies and position derivatives of a set of structures that
share a fingerprint (same atom count and order); :class:`LocalGPR` splits a set that is too large
for one kernel matrix into bounded clusters in fingerprint space and fits one GPR per cluster.

Standardisation: energies ``y_E = (E - mu) / s`` with ``mu`` the mean training energy and ``s``
their standard deviation (the force RMS times 1 A when all energies are equal); derivatives
``y_g = dE/dR / s = -F / s``, so that values and derivatives stay consistent.  Hyperparameters
are kept in these units:

* ``weight`` w: prior standard deviation of the energy in units of ``s`` (w s eV);
* ``length_scale`` l: in fingerprint units (A for the Cartesian fingerprint);
* ``noise_energy``: energy noise standard deviation relative to ``s`` (noise_energy s eV);
* ``noise_force``: force noise relative to the force RMS ``f`` (noise_force f eV/A).

The kernel matrix is factorised once (Cholesky, jitter added to the diagonal in decades until it
succeeds; the jitter used is reported); predictions use ``alpha = K^-1 y`` and, for the variance,
one triangular solve per test energy: ``var = w^2 - |L^-1 k_*|^2`` (the diagonal only, clamped at
zero).  Hyperparameters not given are fitted by maximising the log marginal likelihood with
L-BFGS-B on their logarithms and the closed-form gradient ``0.5 tr((alpha alpha^T - K^-1) dK)``
(bounded: l between 1 and 100 times the median nearest-neighbour fingerprint distance of the
training structures, relative noises in [noise_min, noise_max]; several starts); when the subset is large
the fit runs on a seeded sub-sample of structures (at most ``fit_max_obs`` observations; by
default the structures nearest to a random one, which keeps the data's spacing), is then refined
on the sum of the LMLs of blocks that cover all structures, and the full kernel is factorised once
with the fitted values.  For the Cartesian fingerprint each group of components (e.g. element)
may get its own length scale (``groups``), fitted the same way.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, asdict

import numpy as np
import torch

from ..errors import ConfigError, InputError
from .kernel import assemble, cartesian_grad_traces, cov_block

__all__ = ["composition_energies", "GPR", "LocalGPR", "Hyper", "cholesky_with_jitter", "available_memory",
           "max_kernel_obs", "bounded_kmeans", "transfer_hyper"]

LOG2PI = math.log(2.0 * math.pi)


@dataclass
class Hyper:
    weight: float
    length_scale: float
    noise_energy: float
    noise_force: float
    # per-group length-scale ratios l_g / l for groups 1.. (group 0 has ratio 1); () = one shared l
    length_ratios: tuple = ()


# ------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------

def available_memory(device="cpu") -> int:
    """Bytes available for the kernel: MemAvailable (CPU) or free GPU memory."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2 ** 30


def max_kernel_obs(device="cpu", memory_fraction: float = 0.5, factor: float = 2.5) -> int:
    """Largest kernel size n (observations) with ``factor * n^2 * 8`` bytes within
    ``memory_fraction`` of the available memory (K, its Cholesky factor and the blocks)."""
    avail = available_memory(device) * float(memory_fraction)
    return int(math.sqrt(max(avail, 0.0) / (8.0 * factor)))


# ------------------------------------------------------------------------------------------
# Cholesky with jitter escalation
# ------------------------------------------------------------------------------------------

def cholesky_with_jitter(K, jitter_start=1e-10, jitter_max=1e-2, inplace=False):
    """Cholesky factor of K; on failure add ``j * mean(diag K)`` to the diagonal for
    j = 0, jitter_start, 10 jitter_start, ... up to jitter_max.  Returns (L, jitter_abs,
    jitter_rel).  ``inplace`` adds the jitter to K's diagonal in place (no autograd)."""
    L, info = torch.linalg.cholesky_ex(K)
    if int(info) == 0:
        return L, 0.0, 0.0
    scale = float(K.diagonal().mean().detach())
    rel = jitter_start
    added = 0.0
    while rel <= jitter_max * (1 + 1e-9):
        j = rel * scale
        if inplace:
            with torch.no_grad():
                K.diagonal().add_(j - added)
            added = j
            L, info = torch.linalg.cholesky_ex(K)
        else:
            eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
            L, info = torch.linalg.cholesky_ex(K + j * eye)
        if int(info) == 0:
            return L, j, rel
        rel *= 10.0
    raise InputError(
        f"GPR: kernel matrix is not positive definite even with jitter {jitter_max:g} x mean "
        f"diagonal (duplicate structures with different labels, or a length scale far too large?)")


def _cholesky_inverse(L):
    """K^-1 from its lower Cholesky factor (full symmetric matrix).  On the CPU LAPACK dpotri
    through scipy (faster than torch.cholesky_inverse here; docs/results.md), else torch."""
    if L.device.type != "cpu":
        return torch.cholesky_inverse(L)
    from scipy.linalg import lapack

    Wi, info = lapack.dpotri(L.numpy(), lower=1)
    if info != 0:
        return torch.cholesky_inverse(L)
    Wl = torch.from_numpy(Wi).tril_()          # dpotri fills the lower triangle only
    del Wi
    W = Wl + Wl.T
    W.diagonal().sub_(Wl.diagonal())
    return W.contiguous()


# ------------------------------------------------------------------------------------------
# in-place dense linear algebra on the CPU (no n x n temporaries)
# ------------------------------------------------------------------------------------------
# Every n x n array that a likelihood evaluation allocated afresh (K, its factor, the inverse,
# dK, and the copies that torch/scipy made of them) was first touched page by page: on the EC
# dimers more than half of the fit's CPU time was system time (page faults).  The evaluations
# now reuse buffers and factorise in place through LAPACK on the transposed (Fortran-ordered)
# view of the row-major tensors: for a symmetric matrix the upper factor of that view is the
# lower factor of the tensor.

class Workspace:
    """Flat float64 buffers, grown to the largest n seen and viewed as [n, n]."""

    def __init__(self):
        self._flat: dict = {}

    def get(self, name: str, n: int, device) -> torch.Tensor:
        b = self._flat.get(name)
        if b is None or b.numel() < n * n or b.device != torch.device(device):
            b = torch.empty(n * n, dtype=torch.float64, device=device)
            self._flat[name] = b
        return b[:n * n].view(n, n)


def _lapack():
    from scipy.linalg import lapack
    return lapack


def _lapack_inplace(A: torch.Tensor, routine: str, **kw) -> int:
    """LAPACK ``routine`` on the C-contiguous CPU tensor A in place: its Fortran-ordered view is
    A's transpose, so LAPACK's upper triangle (``lower=0``) is A's lower one.  Returns info."""
    a = A.numpy().T
    c, info = getattr(_lapack(), routine)(a, lower=0, **kw)
    if not np.shares_memory(c, a):        # scipy copied (should not happen for this layout)
        A.copy_(torch.from_numpy(np.ascontiguousarray(c.T)))
    return int(info)


def potrf_inplace(A: torch.Tensor) -> int:
    """Lower Cholesky factor of the symmetric tensor A, written over A's lower triangle (the
    strict upper triangle keeps its old values).  Returns LAPACK's info."""
    return _lapack_inplace(A, "dpotrf", clean=0, overwrite_a=1)


def potri_inplace(L: torch.Tensor) -> int:
    """K^-1 from the lower factor in L, written over L as a full symmetric matrix."""
    info = _lapack_inplace(L, "dpotri", overwrite_c=1)
    if info == 0:
        symmetrize_lower_(L)
    return info


def trtri_inplace(L: torch.Tensor) -> int:
    """L^-1 from the lower factor in L, written over L's lower triangle (the strict upper
    triangle keeps its old values).  Returns LAPACK's info."""
    return _lapack_inplace(L, "dtrtri", unitdiag=0, overwrite_c=1)


def symmetrize_lower_(A: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Copy the lower triangle of A onto its upper triangle, tile by tile (no n x n copy).  Square
    tiles, whose transposed reads stay in cache: whole 512-row panels took 2.5-4.5x longer
    (a tenth of a likelihood evaluation of the hyperparameter search)."""
    n = A.shape[0]
    for s in range(0, n, block):
        e = min(n, s + block)
        d = A[s:e, s:e]
        d.copy_(torch.tril(d) + torch.tril(d, -1).T)
        for r in range(e, n, block):
            f = min(n, r + block)
            A[s:e, r:f].copy_(A[r:f, s:e].T)
    return A


def zero_upper_(A: torch.Tensor, block: int = 512) -> torch.Tensor:
    n = A.shape[0]
    for s in range(0, n, block):
        e = min(n, s + block)
        A[s:e, s:e].copy_(torch.tril(A[s:e, s:e]))
        if e < n:
            A[s:e, e:].zero_()
    return A


def potrs(L: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """K^-1 y from the lower factor in L (only its lower triangle is read)."""
    x, info = _lapack().dpotrs(L.numpy().T, y.numpy(), lower=0)
    return torch.from_numpy(np.ascontiguousarray(x))


# ------------------------------------------------------------------------------------------
# clustering for local GPRs
# ------------------------------------------------------------------------------------------

def bounded_kmeans(X: np.ndarray, max_size: int, seed: int = 0, iterations: int = 30):
    """Seeded k-means in fingerprint space with at most ``max_size`` members per cluster.

    k = ceil(N / max_size) clusters (k-means++ start); each Lloyd step assigns points greedily
    to the nearest centre with room left (pairs sorted by distance), so every cluster respects
    the bound.  Returns (labels [N], centres [k, D])."""
    X = np.asarray(X, dtype=np.float64)
    N = X.shape[0]
    k = int(math.ceil(N / max_size))
    if k <= 1:
        return np.zeros(N, dtype=np.int64), X.mean(0, keepdims=True)
    rng = np.random.default_rng(seed)
    centres = [X[rng.integers(N)]]
    for _ in range(1, k):
        d2 = np.min(((X[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        p = d2 / d2.sum() if d2.sum() > 0 else None
        centres.append(X[rng.choice(N, p=p)])
    C = np.asarray(centres)
    labels = np.full(N, -1, dtype=np.int64)
    for _ in range(iterations):
        d2 = ((X[:, None, :] - C[None]) ** 2).sum(-1)          # [N, k]
        order = np.argsort(d2, axis=None, kind="stable")
        new = np.full(N, -1, dtype=np.int64)
        room = np.full(k, max_size)
        left = N
        for flat in order:
            i, c = divmod(int(flat), k)
            if new[i] >= 0 or room[c] == 0:
                continue
            new[i] = c
            room[c] -= 1
            left -= 1
            if left == 0:
                break
        if np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            m = labels == c
            if m.any():
                C[c] = X[m].mean(0)
    return labels, C


# ------------------------------------------------------------------------------------------
# the GP
# ------------------------------------------------------------------------------------------

def standardisation(E, G=None):
    """(mu, s, f): mean energy, energy scale (std, or force RMS x 1 A, or 1) and force RMS."""
    E = torch.as_tensor(E, dtype=torch.float64).reshape(-1)
    mu = float(E.mean())
    sE = float(E.std(unbiased=False)) if E.numel() > 1 else 0.0
    fr = float(torch.sqrt((torch.as_tensor(G, dtype=torch.float64) ** 2).mean())) if G is not None else 0.0
    s = sE if sE > 1e-12 else (fr if fr > 1e-12 else 1.0)
    f = fr if fr > 1e-12 else s
    return mu, s, f


def composition_energies(C, E) -> torch.Tensor:
    """[K] per-element energies mu minimising |E - C mu| (least squares, minimum norm where the
    compositions do not fix them all: with one atom count per fit the counts of the elements
    add up to it in every row)."""
    C = torch.as_tensor(C, dtype=torch.float64)
    E = torch.as_tensor(np.asarray(E, dtype=np.float64)).reshape(-1, 1)
    return torch.linalg.lstsq(C, E, driver="gelsd").solution.reshape(-1)


def transfer_hyper(shared: dict, natoms: int, E, F, noise_floor: float = 1e-6) -> dict:
    """GPR keyword arguments (weight, length_scale, noise_energy, noise_force) for a subset with
    energies E [N] (eV) and forces F (eV/A) of ``natoms``-atom structures, from the local-kernel
    hyperparameters of another subset of the same elements, given in physical units (``shared``:
    weight_eV, length_scale, noise_energy_eV, noise_force_eVA and that subset's natoms; the
    ``info`` keys of a fitted GPR).  The local kernel models one atomic energy function, so its
    prior (w s eV per atom), its length scale (in the shared descriptor scale) and the force noise
    carry over unchanged; the energy noise of a structure is taken as independent atomic errors,
    sqrt(natoms) times the per-atom value.  Only the standardisation (s, f) is this subset's."""
    E = torch.as_tensor(np.asarray(E, dtype=np.float64)).reshape(-1)
    G = -torch.as_tensor(np.asarray(F, dtype=np.float64)).reshape(E.numel(), -1)
    _mu, s, f = standardisation(E, G)
    ne_eV = float(shared["noise_energy_eV"]) * math.sqrt(natoms / float(shared["natoms"]))
    tiny = 1e-12     # the given values must be positive; the noise floor is added back in fit
    return dict(weight=float(shared["weight_eV"]) / s, length_scale=float(shared["length_scale"]),
                noise_energy=max(ne_eV / s - noise_floor, tiny),
                noise_force=max(float(shared["noise_force_eVA"]) / f - noise_floor, tiny))


def _as_t(a, device):
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        return a.to(device=device, dtype=torch.float64)
    return torch.as_tensor(np.asarray(a, dtype=np.float64), device=device)


class GPR:
    """Full GPR on energies and forces (or energies only with ``use_forces=False``).

    Hyperparameters left as None are fitted (log marginal likelihood, L-BFGS in log space)."""

    def __init__(self, weight=None, length_scale=None, noise_energy=None, noise_force=None, *,
                 use_forces=True, device="cpu", fit_max_obs=3000, fit_iterations=60, seed=0,
                 jitter_start=1e-10, jitter_max=1e-2, noise_floor=1e-6,
                 init_noise_energy=1e-3, init_noise_force=3e-2, max_block_bytes=256 * 2 ** 20,
                 scales=None, noise_max=0.1, noise_min=1e-5, l_min_nn=1.0, l_max_nn=100.0, loo_max_obs=16384, fit_restarts=3,
                 select="lml", fit_subsample="local", short_iterations=8, groups=None,
                 refine_iterations=0, screen_min_obs=1200,
                 length_ratios=None, ratio_min=0.1, kernel=None):
        self.given = dict(weight=weight, length_scale=length_scale, noise_energy=noise_energy,
                          noise_force=noise_force)
        # groups: one label per Cartesian component (e.g. the element of its atom): each group
        # gets its own length scale l_g = l r_g (r of the first label in sorted order = 1);
        # length_ratios: the ratios r_g of the other groups, fitted when None
        self.groups = None if groups is None else np.asarray(groups).reshape(-1)
        self.given_ratios = None if length_ratios is None else tuple(float(v) for v in length_ratios)
        if self.given_ratios is not None and not all(v > 0 and math.isfinite(v) for v in self.given_ratios):
            raise ConfigError(f"GPR length_ratios must be positive, got {self.given_ratios}")
        self.ratio_min = float(ratio_min)   # fitted length ratios in [ratio_min, 1 / ratio_min]
        self.r = None
        self.group_names: list = []
        self.gidx = None
        for k, v in self.given.items():
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"GPR hyperparameter '{k}' must be positive, got {v}")
        self.use_forces = bool(use_forces)
        self.device = torch.device(device)
        self.fit_max_obs = int(fit_max_obs)
        self.fit_iterations = int(fit_iterations)
        self.seed = int(seed)
        self.jitter_start = jitter_start
        self.jitter_max = jitter_max
        self.noise_floor = noise_floor
        self.init_noise_energy = init_noise_energy
        self.init_noise_force = init_noise_force
        self.max_block_bytes = max_block_bytes
        self.noise_max = float(noise_max)   # upper bound of fitted relative noise levels
        self.noise_min = float(noise_min)   # lower bound of fitted relative noise levels
        self.l_min_nn = float(l_min_nn)     # l >= l_min_nn x median nearest-neighbour distance
        # l <= l_max_nn x the same distance.  On condensed data (EMT slab, bulk, alloys) the
        # likelihood keeps rising towards the near-quadratic regime l >> spacing, where the
        # amplitude w grows like l^2 and the kernel's constant part w^2 swamps float64: at
        # l ~ 250-700 x the spacing (the former bound 1000x) the factorisation needed jitter 10x
        # the energy noise, and the fits came out worse in energy and force and their sigmas
        # were rounding noise (docs/results.md, "GPR length-scale bound")
        self.l_max_nn = float(l_max_nn)
        # the sigma calibration from the LOO errors of every training structure up to this many
        # kernel rows (one K^-1 more; EC dimers, 15,250 rows: about the factorisation's time),
        # of the fit's sub-sample above
        self.loo_max_obs = int(loo_max_obs)
        self.fit_restarts = int(fit_restarts)
        self.short_iterations = int(short_iterations)
        self.refine_iterations = int(refine_iterations)
        # sub-samples of at least this many rows screen the starts and run the short restarts on
        # their nearer half (an eighth of the factorisation cost); only the run to
        # convergence sees every row of the sub-sample
        self.screen_min_obs = int(screen_min_obs)
        if select not in ("lml", "loo"):
            raise ConfigError(f"GPR select must be 'lml' or 'loo', got {select!r}")
        self.select = select
        if fit_subsample not in ("random", "local"):
            raise ConfigError(f"GPR fit_subsample must be 'random' or 'local', got {fit_subsample!r}")
        self.fit_subsample = fit_subsample
        self.scales = scales      # (mu, s, f) to impose a standardisation (local GPRs)
        # None: the squared-exponential kernel on the whole fingerprint; a kernel.LocalKernel:
        # a sum of per-atom kernels on the atoms' descriptors (X = the concatenated descriptors)
        self.kernel = kernel
        # progress(done, total, elapsed_s): called after each likelihood evaluation of the
        # hyperparameter search (total = the evaluations at most planned; augment prints an ETA)
        self.progress = None
        # assembly_progress(done, total, elapsed_s): called after each row chunk of the final
        # kernel (minutes for large subsets, which printed nothing after the search)
        self.assembly_progress = None
        # factor on predictive sigmas from the fit's leave-one-out errors (1: not fitted)
        self.sigma_calibration = 1.0
        self.info: dict = {}

    # ---------------------------------------------------------------- helpers
    def _targets(self, E, G):
        parts = [(E - self.mu) / self.s]
        if self.use_forces:
            parts.append((G / self.s).reshape(-1))
        return torch.cat(parts)

    def _noise_diag(self, N, P, ne, nf_std, r=None, pad=None):
        d = [torch.full((N,), 1.0, dtype=torch.float64, device=self.device) * ne ** 2]
        if self.use_forces:
            if r is None:
                d.append(torch.full((N * P,), 1.0, dtype=torch.float64, device=self.device) * nf_std ** 2)
            else:       # derivative rows in scaled coordinates: noise times r
                d.append(((nf_std * r) ** 2).repeat(N))
            if pad is not None:
                d[-1][pad] = 1.0
        return torch.cat(d)

    def _pad(self, X):
        """[N P] bool: the derivative rows of padded coordinates (a local kernel's group of
        structures of different atom counts, each padded to the largest: kernel.LocalKernel), or
        None.  Their kernel rows are zero and their targets 0; a unit diagonal, not the force
        noise, keeps them out of the likelihood's dependence on the hyperparameters (a noise
        diagonal there added log sigma_F per padded coordinate and pulled sigma_F down), and they
        count neither in its constant nor in the force statistics."""
        f = getattr(self.kernel, "padded", None) if self.use_forces else None
        m = None if f is None else f(X)
        return None if m is None or not bool(m.any()) else m.reshape(-1)

    # ---------------------------------------------------------------- per-group length scales
    # A length scale per group of Cartesian components is an isotropic kernel in the scaled
    # coordinates x / r (r = l_g / l per component): derivative observations become r dE/dx,
    # their noise r sigma_F, and the likelihood of the original data is that of the scaled data
    # plus N sum_k log r_k (the Jacobian of y -> r y).
    def _group_setup(self, P, J):
        self.group_names, self.gidx = [], None
        if self.groups is None:
            return
        if self.groups.shape[0] != P:
            raise ConfigError(f"GPR groups: one label per Cartesian component expected ({P}), "
                              f"got {self.groups.shape[0]}")
        names, inv = np.unique(self.groups, return_inverse=True)
        if len(names) < 2:
            return
        if J is not None:
            raise ConfigError("GPR: per-group length scales need the Cartesian fingerprint")
        self.group_names = [str(x) for x in names]
        self.gidx = torch.as_tensor(inv.reshape(-1), device=self.device)
        if self.given_ratios is not None and len(self.given_ratios) != len(names) - 1:
            raise ConfigError(f"GPR length_ratios: {len(names) - 1} values expected (groups "
                              f"{self.group_names[1:]}), got {len(self.given_ratios)}")

    def _ratio_names(self):
        return [f"ratio_{k}" for k in range(1, len(self.group_names))]

    def _rvec(self, p):
        if self.gidx is None:
            return None
        r = torch.ones(len(self.group_names), dtype=torch.float64, device=self.device)
        for k in range(1, len(self.group_names)):
            r[k] = float(p[f"ratio_{k}"])
        return r[self.gidx]

    def _scaled(self, X, y, r):
        if r is None:
            return X, y
        N = X.shape[0]
        if y is not None and self.use_forces:
            y = torch.cat([y[:N], (y[N:].reshape(N, -1) * r).reshape(-1)])
        return X / r, y

    def _log_jacobian(self, N, r):
        return 0.0 if (r is None or not self.use_forces) else float(N * torch.log(r).sum())

    # ---------------------------------------------------------------- fit
    def fit(self, X, J, E, F=None, hyper_only=False):
        """X [N, D] fingerprints, J [N, D, P] Jacobians (None: Cartesian, J = I),
        E [N] energies (eV), F [N, P] or [N, natoms, 3] forces (eV/A).  ``hyper_only``: stop
        after the hyperparameter fit (``self.hyper``), without factorising the full kernel."""
        t0 = time.perf_counter()
        X = _as_t(X, self.device)
        J = _as_t(J, self.device)
        E = _as_t(E, self.device).reshape(-1)
        N, D = X.shape
        self.P = D if J is None else J.shape[2]
        if self.use_forces:
            if F is None:
                raise InputError("GPR.fit: forces are required (use_forces=True)")
            G = -_as_t(F, self.device).reshape(N, self.P)
        else:
            G = torch.zeros(N, self.P, dtype=torch.float64, device=self.device)
        if not (torch.isfinite(E).all() and torch.isfinite(G).all() and torch.isfinite(X).all()):
            raise InputError("GPR.fit: non-finite energies, forces or fingerprints")
        if self.scales is not None:
            self.mu, self.s, self.f = (float(v) for v in self.scales)
        else:
            self.mu, self.s, self.f = standardisation(E, G if self.use_forces else None)
        self._group_setup(self.P, J)
        self.J = J
        y = self._targets(E, G)

        # --- hyperparameters
        need = any(v is None for v in self.given.values()) or \
            (self.gidx is not None and self.given_ratios is None)
        h = self._fit_hyper(X, J, E, G) if need else None
        if h is None:
            h = Hyper(**self.given, length_ratios=self.given_ratios if self.gidx is not None else ())
        self.hyper = h
        t_hyper = time.perf_counter() - t0
        if hyper_only:
            self.info.update(time_hyper_s=t_hyper)
            return self

        # --- full factorisation (in the scaled coordinates when lengths differ by group)
        t1 = time.perf_counter()
        self.r = self._rvec({f"ratio_{k + 1}": v for k, v in enumerate(h.length_ratios)})
        X, y = self._scaled(X, y, self.r)
        self.X = X
        K = assemble(X, J, X, J, h.weight, h.length_scale, self.use_forces, self.use_forces,
                     max_block_bytes=self.max_block_bytes, kernel=self.kernel,
                     progress=getattr(self, "assembly_progress", None))
        nf = (h.noise_force + self.noise_floor) * self.f / self.s
        pad = self._pad(X)
        K.diagonal().add_(self._noise_diag(N, self.P, h.noise_energy + self.noise_floor, nf, self.r, pad))
        stage = getattr(self, "stage", None)
        if stage is not None and K.shape[0] > 4000:     # minutes of silence otherwise (sweep 5)
            stage(f"factorising the kernel ({K.shape[0]} rows, {K.shape[0] ** 2 * 8 / 2**30:.1f} GiB)")
        if K.device.type == "cpu":
            # factorised in place (the factor replaces K: half the memory, no second n x n
            # array to fault in); a failure re-assembles K with jitter
            jit = jrel = 0.0
            rel = self.jitter_start
            scale = float(K.diagonal().mean())
            while potrf_inplace(K) != 0:
                if rel > self.jitter_max * (1 + 1e-9):
                    raise InputError(
                        f"GPR: kernel matrix is not positive definite even with jitter {self.jitter_max:g} "
                        f"x mean diagonal (duplicate structures with different labels?)")
                assemble(X, J, X, J, h.weight, h.length_scale, self.use_forces, self.use_forces,
                         max_block_bytes=self.max_block_bytes, kernel=self.kernel, out=K)
                K.diagonal().add_(self._noise_diag(N, self.P, h.noise_energy + self.noise_floor, nf, self.r, pad))
                jit, jrel = rel * scale, rel
                K.diagonal().add_(jit)
                rel *= 10.0
            L = zero_upper_(K)
        else:
            L, jit, jrel = cholesky_with_jitter(K, self.jitter_start, self.jitter_max, inplace=True)
        del K
        self.L = L
        self.alpha = torch.cholesky_solve(y[:, None], L)[:, 0]
        n = y.shape[0] - (0 if pad is None else int(pad.sum()))
        lml = float(-0.5 * (y @ self.alpha) - torch.log(L.diagonal()).sum() - 0.5 * n * LOG2PI) \
            + self._log_jacobian(N, self.r)
        t_fact = time.perf_counter() - t1
        if self.gidx is not None:
            ratios = (1.0,) + tuple(h.length_ratios)
            self.info.update(length_groups=self.group_names, length_ratios=list(h.length_ratios),
                             length_scale_by_group={g: h.length_scale * q
                                                    for g, q in zip(self.group_names, ratios)})
        self.info.update(
            n_structures=N, n_obs=n, use_forces=self.use_forces,
            energy_mean_eV=self.mu, energy_scale_eV=self.s, force_scale_eVA=self.f,
            weight=h.weight, length_scale=h.length_scale, noise_energy=h.noise_energy,
            noise_force=h.noise_force, weight_eV=h.weight * self.s,
            noise_energy_eV=(h.noise_energy + self.noise_floor) * self.s,
            noise_force_eVA=(h.noise_force + self.noise_floor) * self.f,
            jitter=jit, jitter_rel=jrel, lml=lml, time_hyper_s=t_hyper, time_factor_s=t_fact)
        return self

    # ---------------------------------------------------------------- analytic LML
    def _eff_noise(self, p):
        ne = p["noise_energy"] + self.noise_floor
        nf = (p["noise_force"] + self.noise_floor) * self.f / self.s
        return ne, nf

    def _factor_into(self, L, K) -> float:
        """Copy K into the buffer L and factorise it there (lower Cholesky, in place), adding
        jitter * mean(diag K) to the diagonal in decades on failure.  Returns the jitter."""
        L.copy_(K)
        if potrf_inplace(L) == 0:
            return 0.0
        scale = float(K.diagonal().mean())
        rel = self.jitter_start
        while rel <= self.jitter_max * (1 + 1e-9):
            L.copy_(K)
            L.diagonal().add_(rel * scale)
            if potrf_inplace(L) == 0:
                return rel * scale
            rel *= 10.0
        raise InputError(
            f"GPR: kernel matrix is not positive definite even with jitter {self.jitter_max:g} x mean "
            f"diagonal (duplicate structures with different labels, or a length scale far too large?)")

    @property
    def _ws(self) -> Workspace:
        if getattr(self, "_workspace", None) is None:
            self._workspace = Workspace()
        return self._workspace

    def lml_and_grad(self, X, J, y, p: dict, names=(), loo=False):
        """Log marginal likelihood at hyperparameters ``p`` (dict of floats), its gradient with
        respect to the logarithms of ``names`` (closed form:
        ``dLML/dtheta = 0.5 tr((alpha alpha^T - K^-1) dK/dtheta)``, with ``dK/dlog l`` from
        ``assemble(deriv="log_length")``, ``dK/dlog w = 2 K_signal`` and diagonal noise terms)
        and, with ``loo=True``, the closed-form leave-one-structure-out energy residuals
        ``r_b = [(K^-1)_bb]^-1 (K^-1 y)_b`` (block b = structure b's energy and derivatives;
        first component; standardised units) and their predictive variances
        ``[((K^-1)_bb)^-1]_00`` (noise included).  Returns (lml, grad [len(names)], loo or None),
        loo = (residuals [N], variances [N])."""
        N = X.shape[0]
        uf = self.use_forces
        r = self._rvec(p)
        X, y = self._scaled(X, y, r)
        n = y.shape[0]
        cpu = X.device.type == "cpu"
        ws = self._ws
        K = assemble(X, J, X, J, p["weight"], p["length_scale"], uf, uf,
                     max_block_bytes=self.max_block_bytes, kernel=self.kernel,
                     out=ws.get("K", n, X.device) if cpu else None)
        ne, nf = self._eff_noise(p)
        pad = self._pad(X)
        nd = self._noise_diag(N, self.P, ne, nf, r, pad)
        K.diagonal().add_(nd)
        n_lik = n - (0 if pad is None else int(pad.sum()))
        if cpu:     # factor and inverse in one reused buffer, in place (no n x n temporaries)
            L = ws.get("L", n, X.device)
            jit = self._factor_into(L, K)
            alpha = potrs(L, y[:, None])[:, 0]
        else:
            L, jit, _ = cholesky_with_jitter(K, self.jitter_start, self.jitter_max)
            alpha = torch.cholesky_solve(y[:, None], L)[:, 0]
        lml = float(-0.5 * (y @ alpha) - torch.log(L.diagonal()).sum() - 0.5 * n_lik * LOG2PI) \
            + self._log_jacobian(N, r)
        if not names and not loo:
            return lml, None, None
        if cpu:
            if potri_inplace(L) != 0:
                raise InputError("GPR: LAPACK dpotri failed on a factorised kernel")
            W = L
        else:
            W = _cholesky_inverse(L)
            del L
        W.neg_().addr_(alpha, alpha)                          # W = alpha alpha^T - K^-1
        Wd = W.diagonal()
        traces = None
        if self.kernel is None and J is None and any(nm == "length_scale" or nm.startswith("ratio_")
                                                     for nm in names):
            # the Cartesian kernel's length-scale traces in one pass over W (no dK matrices)
            rnames = [nm for nm in names if nm.startswith("ratio_")]
            masks = torch.stack([self.gidx == int(nm.split("_")[1]) for nm in rnames]) if rnames else None
            tl, tg = cartesian_grad_traces(W, X, p["weight"], p["length_scale"], uf, masks)
            traces = dict(length_scale=tl, **dict(zip(rnames, tg)))
        grad = []
        wk_rows = None
        for nm in names:
            if nm == "weight":      # dK/dlog w = 2 (K - noise - jitter)
                g = torch.dot(W.reshape(-1), K.reshape(-1)) - (Wd * (nd + jit)).sum()
            elif nm == "length_scale" and traces is not None:
                g = 0.5 * traces[nm]
            elif nm == "length_scale":
                dK = assemble(X, J, X, J, p["weight"], p["length_scale"], uf, uf,
                              max_block_bytes=self.max_block_bytes, deriv="log_length", kernel=self.kernel,
                              out=ws.get("dK", n, X.device) if cpu else None)
                g = 0.5 * torch.dot(W.reshape(-1), dK.reshape(-1))
                del dK
            elif nm == "noise_energy":
                g = Wd[:N].sum() * ne * p["noise_energy"]
            elif nm == "noise_force":
                wn = Wd[N:] * nd[N:]
                if pad is not None:      # the padded rows' unit diagonal is no noise
                    wn = wn.masked_fill(pad, 0.0)
                g = wn.sum() * p["noise_force"] / (p["noise_force"] + self.noise_floor)
            elif nm.startswith("ratio_"):
                # K = S^-1 K_iso(x / r) S^-1 + noise in the original units (S = 1 on energy
                # rows, r on derivative rows); in the scaled quantities used here
                # dLML/dlog r_g = 0.5 tr(W dK_iso/dlog r_g) - tr(W D_g K_signal),
                # D_g selecting the derivative rows of group g
                mask = self.gidx == int(nm.split("_")[1])
                if traces is not None:
                    g = 0.5 * traces[nm]
                else:
                    dK = assemble(X, J, X, J, p["weight"], p["length_scale"], uf, uf,
                                  max_block_bytes=self.max_block_bytes, deriv=mask,
                                  out=ws.get("dK", n, X.device) if cpu else None)
                    g = 0.5 * torch.dot(W.reshape(-1), dK.reshape(-1))
                    del dK
                if uf:
                    rows = N + torch.nonzero(mask.repeat(N)).reshape(-1)
                    if wk_rows is None:
                        # row sums of W * K over contiguous row blocks, once for every group
                        # (a gather of a group's rows copied them: a quarter of an evaluation)
                        wk_rows = torch.empty(n, dtype=W.dtype, device=W.device)
                        for b in range(0, n, 256):
                            torch.sum(W[b:b + 256] * K[b:b + 256], 1, out=wk_rows[b:b + 256])
                    g = g - (wk_rows[rows].sum() - (Wd[rows] * (nd[rows] + jit)).sum())
            else:
                raise ValueError(nm)
            grad.append(float(g))
        res = None
        if loo:
            idx = self._structure_rows(N, X.device)
            a_b = alpha[idx]                                       # [N, 1+P]
            # W = alpha alpha^T - K^-1, so the diagonal blocks of K^-1 are a_b a_b^T - W_bb
            res = self._loo_from_blocks(a_b[:, :, None] * a_b[:, None, :] - W[idx[:, :, None], idx[:, None, :]], a_b)
        return lml, np.asarray(grad), res

    def _structure_rows(self, N, device) -> torch.Tensor:
        """[N, 1+P] kernel rows of each structure: its energy row, then its derivative rows."""
        P = self.P if self.use_forces else 0
        idx = torch.arange(N, device=device)[:, None]
        if P:
            idx = torch.cat([idx, N + idx * P + torch.arange(P, device=device)[None]], 1)
        return idx

    @staticmethod
    def _loo_from_blocks(Kinv_bb, a_b, full: bool = False):
        """LOO energy residuals ``[(K^-1)_bb]^-1 (K^-1 y)_b`` (first component; ``full``: the
        whole block, energy then force components) and predictive variances
        ``[((K^-1)_bb)^-1]_00`` from the diagonal blocks of K^-1 and alpha's blocks."""
        # Cholesky, not LU: the blocks are positive definite, and torch 2.13's MKL fails batched
        # LU inverses of 128+ rows on 2+ threads ("Parameter 6 was incorrect on entry to DLASWP",
        # then a RuntimeError): 64-atom cells under mpirun with lent cores hit it.
        L, info = torch.linalg.cholesky_ex(Kinv_bb)
        inv = torch.cholesky_inverse(L)
        for b in torch.nonzero(info).reshape(-1).tolist():       # numerically indefinite: LU, alone
            inv[b] = torch.linalg.inv(Kinv_bb[b])
        r = (inv @ a_b[:, :, None])[:, :, 0]
        return (r if full else r[:, 0]), inv[:, 0, 0]

    def calibrate(self) -> "GPR":
        """The sigma calibration from the LOO errors of every training structure (up to
        ``loo_max_obs`` kernel rows and when K^-1 fits beside the factor in memory; else the
        fit's sub-sample's stays).  K^-1 costs about one more factorisation, so augment calls
        this once, for the fingerprint it keeps: the sub-sample's 5-50 structures give a noisy
        median (slab, 9 structures: 1.87 against 1.09 from all 40)."""
        L = self.L
        n = L.shape[0]
        if n <= self.loo_max_obs and 16 * n * n < available_memory(L.device) * 0.5:
            stage = getattr(self, "stage", None)
            if stage is not None and n > 4000:
                stage(f"leave-one-out errors of every structure (inverse of the {n}-row kernel, "
                      f"{2 * n * n * 8 / 2**30:.1f} GiB while it runs)")
            t0 = time.perf_counter()
            with torch.no_grad():
                full, var = self._loo(L, self.alpha, self.X.shape[0])
            res = full[:, 0]
            # per structure, in eV: augment names a reference whose own label the others contradict
            self.loo_residual_eV = res.detach().to("cpu", torch.float64).numpy() * float(self.s)
            self.sigma_calibration = self._calibration(res, var)
            self.info.update(sigma_calibration=self.sigma_calibration, sigma_calibration_from="all",
                             sigma_calibrated=int(res.numel()) >= 5,
                             loo_all_energy_mae_eV=float(res.abs().mean()) * self.s,
                             loo_all_n=int(full.shape[0]),
                             time_calibrate_s=time.perf_counter() - t0)
            if full.shape[1] > 1:      # per force component (of real atoms)
                fr = full[:, 1:].abs()
                pad = self._pad(self.X)
                fr = fr.reshape(-1) if pad is None else fr.reshape(-1)[~pad]
                self.info["loo_all_force_mae_eVA"] = float(fr.mean()) * self.f
        return self

    def _loo(self, L, alpha, N):
        """Leave-one-structure-out residuals [N, 1+P] (energy, then force components) and energy
        predictive variances (standardised units) of the factorised kernel L: the closed form of
        :meth:`lml_and_grad`."""
        idx = self._structure_rows(N, L.device)
        if L.device.type == "cpu":
            # only the diagonal blocks of K^-1 = L^-T L^-1 are needed: from L^-1 (dtrtri, n^3 / 3)
            # as X_b^T X_b with X_b the columns of structure b, instead of all of K^-1 (dpotri
            # adds dlauum, another n^3 / 3: half the time of this step)
            W = L.clone()
            if trtri_inplace(W) != 0:
                raise InputError("GPR: LAPACK dtrtri failed on a factorised kernel")
            zero_upper_(W)
            Kinv_bb = torch.empty(N, idx.shape[1], idx.shape[1], dtype=W.dtype)
            for b in range(N):
                X = W[b:, idx[b]]                 # rows above b are zero in these columns
                torch.mm(X.T, X, out=Kinv_bb[b])
        else:
            W = _cholesky_inverse(L)
            Kinv_bb = W[idx[:, :, None], idx[:, None, :]]
        del W
        return self._loo_from_blocks(Kinv_bb, alpha[idx], full=True)

    # ---------------------------------------------------------------- hyperparameter fit
    @staticmethod
    def _calibration(res, var) -> float:
        """Factor on the predictive standard deviation that makes the leave-one-structure-out
        energy errors ``res`` (predictive variances ``var``) standard normal in their median:
        median |r_b| / sqrt(v_b) over 0.6745 (the median of |z| for a Gaussian; the median, not
        the RMS, so that one outlier does not set it).  On held-out structures these LOO
        statistics matched the test errors' (docs/results.md), while the fitted noise and
        amplitude alone made the sigmas 6x too small or 2x too large depending on the data."""
        z = (res.abs() / var.clamp_min(1e-300).sqrt()).reshape(-1)
        # (fewer than 5 structures: no factor; info["sigma_calibrated"] says so)
        if z.numel() < 5 or not bool(torch.isfinite(z).all()):
            return 1.0
        c = float(z.median()) / 0.6745
        return c if math.isfinite(c) and c > 0 else 1.0

    def _nn_distance(self, X):
        """Median nearest-neighbour fingerprint distance between training structures (local
        kernel: between the atomic environments of different structures)."""
        if self.kernel is not None:
            return self.kernel.nn_distance(X, seed=self.seed)
        N = X.shape[0]
        if N < 2:
            return 1.0
        nn = torch.empty(N, dtype=X.dtype, device=X.device)
        c = max(1, int(2 ** 24 // max(1, N)))
        for s in range(0, N, c):
            d = torch.cdist(X[s:s + c], X)
            d[torch.arange(d.shape[0]), torch.arange(s, s + d.shape[0])] = float("inf")
            nn[s:s + c] = d.min(1).values
        nn = nn[torch.isfinite(nn) & (nn > 0)]
        return float(nn.median()) if nn.numel() else 1.0

    def _fit_hyper(self, X, J, E, G):
        """Maximum LML over the hyperparameters not given, L-BFGS-B in log space with the closed-
        form gradient, bounded: ``l >= l_min_nn x`` the median nearest-neighbour fingerprint
        distance between training structures (a GP with l below the data spacing interpolates
        nothing: every copy would fall back to the prior), relative noises in
        [noise_min, noise_max].  Several starts (l on a grid relative to that distance, w = 1 and
        the force-matched w = f l / s) are screened by LML, the best ``fit_restarts`` optimised;
        each for ``short_iterations``; with ``select: lml`` the one with the largest LML is then
        continued to convergence, with ``select: loo`` all are, and the optimum with the smallest
        closed-form leave-one-structure-out energy MAE is taken.  Sub-samples of at least
        ``screen_min_obs`` rows screen and run the short restarts on the first half of the
        sub-sample (the nearer half of a local one): those steps only rank the starts, and an
        evaluation on half the rows costs an eighth of the factorisations."""
        from scipy.optimize import minimize

        N = X.shape[0]
        per = 1 + (self.P if self.use_forces else 0)
        nsub = max(2, min(N, self.fit_max_obs // per))
        rng = np.random.default_rng(self.seed)
        if self.fit_subsample == "local":
            # the nsub structures nearest (fingerprint distance) to a seeded random centre:
            # the sub-sample keeps the data's local spacing (a random sub-sample of 1/k of the
            # structures is k^(1/d) times sparser, which biases l and the noise upwards)
            c = int(rng.integers(N))
            sel = torch.argsort(torch.cdist(X[c:c + 1], X)[0])[:nsub].cpu().numpy()
        else:
            sel = rng.choice(N, nsub, replace=False)
        if nsub < N:
            idx = torch.as_tensor(np.sort(sel), device=self.device)
            self.fit_index = np.sort(sel)
            Xs, Js, Es, Gs = X[idx], (None if J is None else J[idx]), E[idx], G[idx]
        else:
            Xs, Js, Es, Gs = X, J, E, G
            self.fit_index = np.arange(N)
        y = self._targets(Es, Gs)
        # the screening data: the first half of the sub-sample in its selection order (the nearer
        # half of a local sub-sample, a random half of a random one), for large sub-samples only
        Xc, Jc, yc = Xs, Js, y
        ncoarse = nsub // 2
        coarse = len(y) >= self.screen_min_obs and ncoarse >= 2
        if coarse:
            pos = np.searchsorted(self.fit_index, np.sort(sel[:ncoarse]))
            ci = torch.as_tensor(pos, device=self.device)
            Xc, Jc = Xs[ci], (None if Js is None else Js[ci])
            yc = self._targets(Es[ci], Gs[ci])
        dnn = self._nn_distance(X)
        names = [k for k, v in self.given.items() if v is None]
        fixed = {k: float(v) for k, v in self.given.items() if v is not None}
        if self.gidx is not None:
            if self.given_ratios is None:
                names += self._ratio_names()
            else:
                fixed.update({f"ratio_{k + 1}": v for k, v in enumerate(self.given_ratios)})
        bounds = {"weight": (1e-3 if self.kernel is not None else 1e-2, 1e4),
                  "length_scale": (self.l_min_nn * dnn, max(self.l_max_nn * dnn, 10.0 * self.l_min_nn * dnn)),
                  "noise_energy": (self.noise_min, self.noise_max),
                  "noise_force": (self.noise_min, self.noise_max)}
        bounds.update({k: (self.ratio_min, 1.0 / self.ratio_min) for k in self._ratio_names()})
        lb = np.log([bounds[k][0] for k in names])
        ub = np.log([bounds[k][1] for k in names])
        init = dict(weight=1.0, noise_energy=self.init_noise_energy, noise_force=self.init_noise_force)
        init.update({k: 1.0 for k in self._ratio_names()})
        lgrid = [dnn * f for f in (1.0, 2.0, 4.0, 8.0, 16.0)] if "length_scale" in names \
            else [fixed["length_scale"]]
        starts = []
        for l0 in lgrid:
            wst = [1.0]
            if self.kernel is not None:     # E sums n atomic terms: prior std ~ sqrt(n) w .. n w
                wst.append(1.0 / math.sqrt(self.kernel.n))
            if "weight" in names and self.use_forces and self.kernel is None:
                wst.append(max(1e-2, self.f * l0 / self.s))
            for w0 in (wst if "weight" in names else [fixed["weight"]]):
                p = dict(init, **fixed)
                p.update(length_scale=l0, weight=w0)
                th = np.clip(np.log([p[k] for k in names]), lb, ub)
                starts.append(th)
        state = {"evals": 0}

        def unpack(th):
            p = dict(fixed)
            p.update({k: float(math.exp(v)) for k, v in zip(names, th)})
            return p

        t_start = time.perf_counter()
        n_short = min(self.fit_iterations, self.short_iterations)
        # planned evaluations: screening, the short runs, the long run(s), the block refinement;
        # L-BFGS-B's line searches take about 1.2-1.4 evaluations per iteration (measured on
        # 100-200-atom cells: 123-140 evaluations of 102 planned with one per iteration, and the
        # ETA ran low, then vanished), so the iterations are counted at 1.35
        per_it = 1.35
        planned = len(starts) + int(math.ceil(
            max(1, self.fit_restarts) * (per_it * n_short + 2)
            + (1 if self.select == "lml" else max(1, self.fit_restarts)) * (per_it * self.fit_iterations + 2))) + \
            (2 * max(1, self.fit_restarts) if coarse else 0)

        def tick():
            state["evals"] += 1
            if self.progress is not None:
                self.progress(state["evals"], max(planned, state["evals"]), time.perf_counter() - t_start)

        def make_f(Xd, Jd, yd):
            def f(th):
                tick()
                try:
                    lml, g, _ = self.lml_and_grad(Xd, Jd, yd, unpack(th), names)
                except InputError:
                    return 1e10, np.zeros(len(names))
                return -lml / len(yd), -g / len(yd)
            return f

        def lml_at(th, Xd, Jd, yd):
            tick()
            try:
                v = self.lml_and_grad(Xd, Jd, yd, unpack(th), ())[0]
            except InputError:
                return -math.inf
            return v if math.isfinite(v) else -math.inf

        screened = [(v, th) for th in starts for v in [lml_at(th, Xc, Jc, yc)] if v > -math.inf]
        if not screened:
            raise InputError("GPR: no initial hyperparameters gave a positive-definite kernel")
        screened.sort(key=lambda t: -t[0])
        bnds = list(zip(lb, ub))

        def run(th0, iters, f, n_rows):
            r = minimize(f, th0, jac=True, method="L-BFGS-B", bounds=bnds,
                         options=dict(maxiter=iters, ftol=1e-9, gtol=1e-5))
            th = np.clip(r.x, lb, ub)
            return th, (-float(r.fun) * n_rows if np.isfinite(r.fun) and r.fun < 1e9 else -math.inf)

        # phase 1: every restart for a few iterations (on the screening data); phase 2: continue
        # to convergence on the whole sub-sample the best by LML (select lml) or all of them
        # (select loo: LOO is compared between optima)
        short = min(self.fit_iterations, self.short_iterations)
        f_c, f_s = make_f(Xc, Jc, yc), make_f(Xs, Js, y)
        runs = [run(th0, short, f_c, len(yc)) + (v0, th0) for v0, th0 in screened[:max(1, self.fit_restarts)]]
        if self.select == "lml":
            runs.sort(key=lambda t: -t[1])
            runs[0] = run(runs[0][0], self.fit_iterations, f_s, len(y)) + runs[0][2:]
        else:
            runs = [run(t[0], self.fit_iterations, f_s, len(y)) + t[2:] for t in runs]
        if coarse:
            # every LML below on the whole sub-sample, so that the optima compare alike
            n_cont = 1 if self.select == "lml" else len(runs)      # these have it already
            runs = [(th, lml1 if k < n_cont else lml_at(th, Xs, Js, y), lml_at(th0, Xs, Js, y), th0)
                    for k, (th, lml1, v0, th0) in enumerate(runs)]
        lml0 = max(t[2] for t in runs) if coarse else screened[0][0]
        cands = []
        for th, lml1, v0, th0 in runs:
            if not math.isfinite(lml1) or lml1 < v0:
                th, lml1 = th0, v0
            cands.append(dict(theta=th, lml=lml1, loo_mae_eV=None,
                              **{k: float(math.exp(v)) for k, v in zip(names, th)}))
        if self.select == "loo":
            for c in cands:
                _, _, (res, var) = self.lml_and_grad(Xs, Js, y, unpack(c["theta"]), (), loo=True)
                c["loo_mae_eV"], c["loo"] = float(res.abs().mean()) * self.s, (res, var)
        key = (lambda c: -c["lml"]) if self.select == "lml" else (lambda c: c["loo_mae_eV"])
        best = min(cands, key=key)
        if best["loo_mae_eV"] is None:
            _, _, (res, var) = self.lml_and_grad(Xs, Js, y, unpack(best["theta"]), (), loo=True)
            best["loo_mae_eV"], best["loo"] = float(res.abs().mean()) * self.s, (res, var)
        refine = {}
        if nsub < N and self.refine_iterations > 0:
            best["theta"], refine = self._refine_on_all(X, J, E, G, nsub, names, unpack, best["theta"],
                                                        bnds, lb, ub)
            _, _, best["loo"] = self.lml_and_grad(Xs, Js, y, unpack(best["theta"]), (), loo=True)
        res, var = best.pop("loo")
        for c in cands:
            c.pop("loo", None)
        self.sigma_calibration = self._calibration(res, var)
        self.info.update(sigma_calibration=self.sigma_calibration, sigma_calibration_from="sub-sample",
                         sigma_calibrated=int(res.numel()) >= 5,
                         sigma_calibration_subsample=self.sigma_calibration)
        vals = dict(fixed)
        vals.update(unpack(best["theta"]))
        vals["length_ratios"] = tuple(vals.pop(k) for k in self._ratio_names())
        self.info.update(refine)
        # a fitted value on its bound means the bound, not the data, decided it
        th = np.asarray(best["theta"])
        self.info["fit_at_bounds"] = [f"{k} {'lower' if t <= lo + 1e-6 else 'upper'}"
                                      for k, t, lo, hi in zip(names, th, lb, ub)
                                      if t <= lo + 1e-6 or t >= hi - 1e-6]
        self.info.update(fit_subsample=self.fit_subsample, fit_nn_distance=self._nn_distance(Xs),
                         fit_structures=int(Xs.shape[0]), fit_obs=int(len(y)), fitted=names,
                         lml_fit_start=lml0, lml_fit_end=best["lml"], fit_evals=state["evals"],
                         fit_select=self.select, nn_distance=dnn, loo_energy_mae_eV=best["loo_mae_eV"],
                         fit_candidates=[{k: v for k, v in c.items() if k != "theta"} for c in cands])
        return Hyper(**vals)

    def _refine_on_all(self, X, J, E, G, nsub, names, unpack, th0, bnds, lb, ub):
        """Continue the fit on all structures: L-BFGS-B on the sum of the LMLs of disjoint
        blocks of at most nsub structures that cover the set (random blocks, or k-means clusters
        with fit_subsample "local"; a composite likelihood:
        every structure counts, each evaluation costs (N / nsub) sub-sample factorisations, not
        one of the whole set).  The sub-sample optimum is the start; returned only if the
        block sum improves."""
        from scipy.optimize import minimize

        t0 = time.perf_counter()
        N = X.shape[0]
        if self.fit_subsample == "local":
            # local blocks (bounded k-means in fingerprint space): each keeps the data's spacing
            labels, _ = bounded_kmeans(X.cpu().numpy(), nsub, seed=self.seed)
            blocks = [np.nonzero(labels == c)[0] for c in range(int(labels.max()) + 1)]
        else:
            rng = np.random.default_rng(self.seed + 1)
            blocks = np.array_split(rng.permutation(N), int(math.ceil(N / nsub)))
        data = []
        for b in blocks:
            idx = torch.as_tensor(np.sort(b), device=self.device)
            data.append((X[idx], None if J is None else J[idx], self._targets(E[idx], G[idx])))
        n_tot = sum(len(d[2]) for d in data)
        evals = [0]

        def f(th):
            evals[0] += 1
            tot, grad = 0.0, np.zeros(len(names))
            try:
                for Xb, Jb, yb in data:
                    v, g, _ = self.lml_and_grad(Xb, Jb, yb, unpack(th), names)
                    tot += v
                    grad += g
            except InputError:
                return 1e10, np.zeros(len(names))
            return -tot / n_tot, -grad / n_tot

        f0 = f(th0)[0]
        r = minimize(f, th0, jac=True, method="L-BFGS-B", bounds=bnds,
                     options=dict(maxiter=self.refine_iterations, ftol=1e-9, gtol=1e-5))
        th = np.clip(r.x, lb, ub)
        ok = np.isfinite(r.fun) and r.fun < f0
        info = dict(fit_refine_blocks=len(blocks), fit_refine_evals=evals[0],
                    lml_blocks_start=-f0 * n_tot, lml_blocks_end=-float(min(r.fun, f0)) * n_tot,
                    time_refine_s=time.perf_counter() - t0)
        return (th if ok else th0), info

    def log_marginal_likelihood(self, X, J, E, F, hyper: Hyper) -> float:
        """LML (standardised units) of data (X, J, E, F) under ``hyper`` (uses this GPR's
        standardisation: call after fit)."""
        X = _as_t(X, self.device)
        J = _as_t(J, self.device)
        E = _as_t(E, self.device).reshape(-1)
        G = -_as_t(F, self.device).reshape(X.shape[0], -1) if self.use_forces else \
            torch.zeros(X.shape[0], self.P, dtype=torch.float64, device=self.device)
        y = self._targets(E, G)
        p = {k: getattr(hyper, k) for k in ("weight", "length_scale", "noise_energy", "noise_force")}
        p.update({f"ratio_{k + 1}": v for k, v in enumerate(hyper.length_ratios)})
        with torch.no_grad():
            return self.lml_and_grad(X, J, y, p)[0]

    # ---------------------------------------------------------------- predict
    def predict(self, X, J=None, forces=True, variance=True, chunk=None, predictive=False):
        """Energies [M] (eV), forces [M, P] (eV/A, or None) and energy standard deviation [M]
        (eV, or None).  Variance from the diagonal only: var = w^2 - |L^-1 k_*|^2, clamped >= 0:
        the latent energy's.  ``predictive``: the expected error against a reference label
        instead, c sqrt(var + noise_energy^2) with the fit's calibration factor c
        (:meth:`_calibration`)."""
        t0 = time.perf_counter()
        X = _as_t(X, self.device)
        J = _as_t(J, self.device)
        M = X.shape[0]
        P = X.shape[1] if J is None else J.shape[2]
        h = self.hyper
        if self.r is not None:
            X = X / self.r
        n = self.alpha.shape[0]
        if chunk is None:
            chunk = max(1, int(self.max_block_bytes // (8 * 4 * n * (1 + (P if forces else 0)))))
            if self.kernel is not None:     # the local kernel's per-atom-pair arrays too
                chunk = min(chunk, self.kernel.max_columns(self.X.shape[0], self.max_block_bytes))
        # the variance needs one triangular solve with the energy columns of the cross-covariance;
        # they are collected over a group of test structures and solved together (one pass over
        # L per group instead of one per chunk)
        group = max(chunk, int(self.max_block_bytes // (8 * n)))
        E = torch.empty(M, dtype=torch.float64, device=self.device)
        Fo = torch.empty(M, P, dtype=torch.float64, device=self.device) if forces else None
        S = torch.empty(M, dtype=torch.float64, device=self.device) if variance else None
        with torch.no_grad():
            for g0 in range(0, M, group):
                g1 = min(M, g0 + group)
                Ke = torch.empty(n, g1 - g0, dtype=torch.float64, device=self.device) if variance else None
                for s in range(g0, g1, chunk):
                    e = min(g1, s + chunk)
                    m = e - s
                    blk = cov_block if self.kernel is None else self.kernel.cov_block
                    Ks = blk(self.X, self.J, X[s:e], None if J is None else J[s:e],
                             h.weight, h.length_scale, self.use_forces, forces)  # [n, m(1+P)]
                    mean = Ks.T @ self.alpha
                    E[s:e] = self.mu + self.s * mean[:m]
                    if forces:
                        Fo[s:e] = -self.s * mean[m:].reshape(m, P)
                        if self.r is not None:      # d/dx = (1 / r) d/d(x / r)
                            Fo[s:e] /= self.r
                    if variance:
                        Ke[:, s - g0:e - g0] = Ks[:, :m]
                    del Ks
                if variance:
                    v = torch.linalg.solve_triangular(self.L, Ke, upper=False)
                    prior = h.weight ** 2 if self.kernel is None else \
                        self.kernel.prior_variance(X[g0:g1], h.weight, h.length_scale)
                    # the difference of two numbers of size `prior` cannot resolve less than one
                    # rounding unit eps prior; below it the result was often exactly 0 on
                    # condensed cells at large length scales (sweep 7: every copy of a subset with
                    # sigma 0, out of reach of max_uncertainty and the variance weights).  (The
                    # rounding error itself can be larger, about sqrt(n) eps prior: at those
                    # length scales the latent variance is at the precision limit; docs/gpr.md)
                    floor = prior * torch.finfo(torch.float64).eps
                    var = torch.maximum(prior - (v * v).sum(0), torch.as_tensor(floor, dtype=torch.float64,
                                                                                device=v.device))
                    if predictive:
                        ne = h.noise_energy + self.noise_floor
                        var = getattr(self, "sigma_calibration", 1.0) ** 2 * (var + ne * ne)
                    S[g0:g1] = self.s * torch.sqrt(var)
                    del v, Ke
        self.info["time_predict_s"] = self.info.get("time_predict_s", 0.0) + time.perf_counter() - t0
        return E, Fo, S


def _take(a, idx):
    if isinstance(a, torch.Tensor):
        return a[torch.as_tensor(idx, device=a.device)]
    return np.asarray(a)[idx]


class LocalGPR:
    """One GPR, or local GPRs on bounded clusters in fingerprint space when the kernel of all
    structures would exceed ``max_obs`` observations.  Hyperparameters are fitted once on the
    whole set's sub-sample (first cluster model) and shared by all clusters."""

    def __init__(self, max_obs=None, memory_fraction=0.5, seed=0, **gpr_kwargs):
        self.gpr_kwargs = gpr_kwargs
        self.seed = seed
        self.device = gpr_kwargs.get("device", "cpu")
        self.max_obs_user = max_obs
        self.memory_fraction = memory_fraction
        self.info: dict = {}

    def _mixed_kernel(self):
        """The local kernel when its structures differ in composition or atom count, else None."""
        kern = self.gpr_kwargs.get("kernel")
        return kern if getattr(kern, "is_mixed", False) else None

    def _composition(self, X):
        """[N, K] element counts of a mixed local kernel's structures, or None (one composition)."""
        kern = self._mixed_kernel()
        return None if kern is None else kern.composition(torch.as_tensor(X, dtype=torch.float64).cpu())

    def fit(self, X, J, E, F=None):
        # structures of different compositions (a mixed local kernel): the prior mean of an
        # energy is a sum of per-element energies fitted by least squares, and the GP models
        # what remains.  A zero-mean prior on the standardised energies would put every
        # composition at the set's mean energy: a Cu-rich and an Au-rich cell differ by eV
        C = self._composition(X)
        self.baseline = None
        if C is not None:
            self.baseline = composition_energies(C, E)
            E = _as_t(E, "cpu").reshape(-1) - C @ self.baseline
        Xn = np.asarray(X.cpu() if isinstance(X, torch.Tensor) else X, dtype=np.float64)
        N, D = Xn.shape
        P = D if J is None else (J.shape[2])
        use_forces = self.gpr_kwargs.get("use_forces", True)
        per = 1 + (P if use_forces else 0)
        cap = max_kernel_obs(self.device, self.memory_fraction)
        max_obs = cap if self.max_obs_user is None else min(cap, int(self.max_obs_user))
        if per > max_obs:
            raise InputError(
                f"GPR: a single structure needs {per} kernel rows but only {max_obs} fit in memory "
                f"({available_memory(self.device) / 2**30:.1f} GiB available on {self.device}); "
                f"use fewer atoms per subset or a machine with more memory")
        max_struct = max(1, max_obs // per)
        labels, centres = bounded_kmeans(Xn, max_struct, seed=self.seed)
        self.centres = centres
        k = int(labels.max()) + 1
        # the memory cap, not the user's max_kernel_obs, decided a split: it depends on the
        # machine's free memory and the ranks per node (augment warns; sweep 10)
        split_by_memory = k > 1 and (self.max_obs_user is None or cap < int(self.max_obs_user))
        stage = getattr(self, "stage", None)
        if k > 1 and stage is not None:
            # said when it happens: the split changes the labels, and a sweep saw it only in a
            # warning printed after the labelling, 7 minutes later
            stage(f"{N} structures x {per} kernel rows exceed the {max_obs}-row limit ("
                  + ("gpr.memory_fraction of the free memory" if split_by_memory else "gpr.max_kernel_obs")
                  + f"): {k} local GPRs of {', '.join(str(int((labels == c).sum())) for c in range(k))} structures")
        self.labels = labels
        self.models = []
        t0 = time.perf_counter()
        Et = _as_t(E, "cpu").reshape(-1)
        Gt = -_as_t(F, "cpu").reshape(N, -1) if (use_forces and F is not None) else None
        kern = self._mixed_kernel()
        pad = None if kern is None else kern.padded(torch.as_tensor(X).cpu())
        if Gt is not None and pad is not None:      # the force scale over real atoms only
            Gt = Gt.reshape(-1)[~pad.reshape(-1)]
        scales = standardisation(Et, Gt)
        hyper_given = None
        fit_info = {}
        if k > 1:
            # hyperparameters fitted once on the whole set (sub-sample of fit_max_obs rows, then
            # refined on blocks covering the set), shared by the local GPRs
            kw = dict(self.gpr_kwargs)
            g0 = GPR(seed=self.seed, scales=scales, **kw)
            g0.progress = getattr(self, "progress", None)
            g0.fit(X, J, E, F, hyper_only=True)
            hyper_given = asdict(g0.hyper)
            calibration = g0.sigma_calibration
            # the search's sub-sample LOO error too: copies: auto falls back on it where the
            # local GPRs are too large for LOO over all structures, as an unsplit fit does (without
            # it a split by free memory gave M = 20 instead of 64 on the same 256-atom cells)
            fit_info = {k_: v for k_, v in g0.info.items()
                        if k_.startswith("fit") or k_.startswith("lml_fit")
                        or k_ in ("time_hyper_s", "loo_energy_mae_eV", "nn_distance")}
        for c in range(k):
            idx = np.nonzero(labels == c)[0]
            kw = dict(self.gpr_kwargs)
            if hyper_given is not None:
                kw.update(hyper_given)
            g = GPR(seed=self.seed, scales=scales, **kw)
            g.progress = getattr(self, "progress", None)
            g.assembly_progress = getattr(self, "assembly_progress", None)
            g.stage = getattr(self, "stage", None)
            g.fit(_take(X, idx), None if J is None else _take(J, idx), _take(E, idx),
                  None if F is None else _take(F, idx))
            if hyper_given is None:
                hyper_given, calibration = asdict(g.hyper), g.sigma_calibration
            else:       # the search's calibration, until calibrate() has each cluster's own
                g.sigma_calibration = calibration
            self.models.append(g)
        self.info = dict(self.models[0].info)
        self.info.update(fit_info)
        n_obs = N * per - (0 if pad is None or not use_forces else int(pad.sum()))     # padded rows are no data
        self.info.update(n_structures=N, n_obs=n_obs, max_kernel_obs=max_obs, split_by_memory=split_by_memory,
                         memory_cap_obs=cap, n_local=k, sigma_calibration=self.models[0].sigma_calibration,
                         local_sizes=[int((labels == c).sum()) for c in range(k)],
                         jitter=max(m.info["jitter"] for m in self.models),
                         jitter_rel=max(m.info["jitter_rel"] for m in self.models),
                         time_fit_s=time.perf_counter() - t0)
        if k > 1:
            self.info["lml"] = [m.info["lml"] for m in self.models]
        return self

    def calibrate(self) -> "LocalGPR":
        """:meth:`GPR.calibrate` of every local GPR; one too large for its own LOO takes the
        first's factor (from its LOO or the search's sub-sample)."""
        for m in self.models:
            m.calibrate()
        res = np.full(len(self.labels), np.nan)
        for c, m in enumerate(self.models):
            r = getattr(m, "loo_residual_eV", None)
            if r is not None:
                res[np.nonzero(self.labels == c)[0]] = r
        self.loo_residual_eV = res
        c0 = self.models[0].sigma_calibration
        for m in self.models[1:]:
            if m.info.get("sigma_calibration_from") != "all":
                m.sigma_calibration = c0
        self.info.update(sigma_calibration=c0,
                         sigma_calibration_from=self.models[0].info.get("sigma_calibration_from"),
                         time_calibrate_s=sum(m.info.get("time_calibrate_s", 0.0) for m in self.models))
        # LOO over every structure only when every local GPR had its own (else: not comparable)
        if all("loo_all_energy_mae_eV" in m.info for m in self.models):
            n = np.array([m.info["loo_all_n"] for m in self.models], dtype=np.float64)
            self.info["loo_all_n"] = int(n.sum())
            for key in ("loo_all_energy_mae_eV", "loo_all_force_mae_eVA"):
                if all(key in m.info for m in self.models):
                    self.info[key] = float(np.dot(n, [m.info[key] for m in self.models]) / n.sum())
        return self

    def assign(self, X):
        Xn = np.asarray(X.cpu() if isinstance(X, torch.Tensor) else X, dtype=np.float64)
        return np.argmin(((Xn[:, None, :] - self.centres[None]) ** 2).sum(-1), axis=1)

    def predict(self, X, J=None, forces=True, variance=True, clusters=None, predictive=False):
        t0 = time.perf_counter()
        M = X.shape[0]
        if len(self.models) == 1:
            out = self.models[0].predict(X, J, forces, variance, predictive=predictive)
        else:
            cl = self.assign(X) if clusters is None else np.asarray(clusters)
            E = torch.empty(M, dtype=torch.float64)
            P = X.shape[1] if J is None else J.shape[2]
            Fo = torch.empty(M, P, dtype=torch.float64) if forces else None
            S = torch.empty(M, dtype=torch.float64) if variance else None
            for c, m in enumerate(self.models):
                idx = np.nonzero(cl == c)[0]
                if len(idx) == 0:
                    continue
                sel = torch.as_tensor(idx)
                Xc = X[sel] if isinstance(X, torch.Tensor) else np.asarray(X)[idx]
                Jc = None if J is None else (J[sel] if isinstance(J, torch.Tensor) else np.asarray(J)[idx])
                e, f, s = m.predict(Xc, Jc, forces, variance, predictive=predictive)
                E[sel] = e.cpu()
                if forces:
                    Fo[sel] = f.cpu()
                if variance:
                    S[sel] = s.cpu()
            out = (E, Fo, S)
        self.info["time_predict_s"] = self.info.get("time_predict_s", 0.0) + time.perf_counter() - t0
        out = tuple(None if o is None else o.cpu() for o in out)
        mu = getattr(self, "baseline", None)
        if mu is not None:
            C = self._composition(X)
            K = min(C.shape[1], mu.numel())
            out = (out[0] + C[:, :K] @ mu[:K],) + out[1:]
        return out
