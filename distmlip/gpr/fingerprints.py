"""Structure fingerprints for the GPR: value ``x`` [D] and Jacobian ``J = dx/dR`` [D, 3 natoms].

* ``cartesian``: x = flattened Cartesian coordinates, J = identity, never built (``J`` is None
  and the kernel uses the closed-form blocks).  Meaningful for a homogeneous subset whose
  structures share the atom order and frame (the paper's H2 and EC dimer setting).

* ``chebyshev``: the aenet Chebyshev descriptor of every atom (``ChebyshevDescriptor``
  reference backend), **concatenated** in the subset's fixed atom order (mode ``concat``,
  default), or summed over the atoms (mode ``sum``).  Each component is divided by its standard
  deviation over the subset's training structures (one length scale then fits all components;
  the scale is fixed at fit time and applied to the displaced copies too).

  Why concatenation by default: a subset is homogeneous (same atoms in the same order, the
  structures being perturbations of one configuration), so concatenating keeps the atom
  identities and is injective up to the descriptor's own symmetries; it is rotation and
  translation invariant where the Cartesian fingerprint is not.  The sum over centres is a
  global "bag" of environments: many distinct geometries map onto the same sum (it has only
  ``dim`` components for 3 natoms degrees of freedom), so the GP cannot resolve forces on
  individual atoms; it is offered for subsets whose atom order varies.  The proper local-energy
  kernel (sum over pairs of atoms of k(G_i, G_j')) costs natoms^2 kernel and Jacobian products
  per pair of structures and is not implemented.

  Jacobians come from torch.autograd.functional.jacobian of the descriptor with respect to the
  positions (neighbour list built once per structure), one structure at a time.

* ``inverse``: all pairwise inverse distances ``1 / r_ij`` (i < j, the subset's fixed atom
  order; minimum image in periodic directions), D = natoms (natoms - 1) / 2, in 1/A, with the
  closed-form Jacobian ``d(1/r)/dR_j = -(R_j - R_i) / r^3 = -d(1/r)/dR_i``.  Rotation, translation
  invariant; a repulsive wall (r -> 0) is stretched over a long fingerprint interval while distant
  pairs (which hardly matter) are compressed, which suits molecules and clusters.  Under periodic
  boundaries the minimum image switches where a pair crosses half a cell (kink in x): use it for
  molecules; ``auto`` takes it only for non-periodic subsets.

* ``auto``: augment compares ``local`` with ``inverse`` on non-periodic subsets of at most
  ``AUTO_INVERSE_MAX_ATOMS`` atoms (D grows as natoms^2) and fits ``local`` alone otherwise
  (augment.auto_candidates); :func:`resolve_fingerprint` gives the global fingerprint that suits
  a subset (``inverse`` there, ``cartesian`` otherwise) where one global kind is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, InputError

__all__ = ["CartesianFingerprint", "ChebyshevFingerprint", "InverseDistanceFingerprint", "LocalFingerprint",
           "make_fingerprint", "resolve_fingerprint", "AUTO_INVERSE_MAX_ATOMS"]

AUTO_INVERSE_MAX_ATOMS = 64


class CartesianFingerprint:
    name = "cartesian"

    def compute(self, positions_list, template=None, with_jacobian=True):
        X = torch.as_tensor(np.stack([np.asarray(p, dtype=np.float64).reshape(-1) for p in positions_list]))
        return X, None

    def fit_scale(self, X, J):
        return X, J

    def state(self) -> dict:
        return {"kind": "cartesian"}


class InverseDistanceFingerprint:
    """x = [1 / r_ij for i < j] (minimum image in periodic directions), closed-form Jacobian."""
    name = "inverse"

    def __init__(self, min_distance: float = 1e-6):
        self.min_distance = float(min_distance)

    @staticmethod
    def _min_image(d, cell, pbc):
        """Shortest periodic image of the difference vectors d [..., 3]."""
        from ..data.structure import minimum_image

        if np.asarray(pbc, bool).any() and abs(np.linalg.det(np.asarray(cell, dtype=np.float64))) < 1e-12:
            raise InputError("inverse-distance fingerprint: periodic structure with a singular cell")
        return minimum_image(d, cell, pbc)

    def compute(self, positions_list, template=None, with_jacobian=True):
        R = np.stack([np.asarray(p, dtype=np.float64).reshape(-1, 3) for p in positions_list])
        B, n = R.shape[:2]
        if n < 2:
            raise InputError("inverse-distance fingerprint needs at least 2 atoms per structure")
        i, j = np.triu_indices(n, 1)
        d = R[:, j] - R[:, i]                                            # [B, D, 3]
        if isinstance(template, (list, tuple)):      # one cell per structure
            if any(np.asarray(t.pbc, bool).any() for t in template):
                d = np.stack([self._min_image(d[b], t.cell, t.pbc) for b, t in enumerate(template)])
        elif template is not None and getattr(template, "pbc", None) is not None:
            d = self._min_image(d, template.cell, template.pbc)
        r = np.sqrt((d * d).sum(-1))
        if (r < self.min_distance).any():
            b, p = np.argwhere(r < self.min_distance)[0]
            raise InputError(f"inverse-distance fingerprint: structure {b} of the subset has atoms "
                             f"{i[p]} and {j[p]} at distance {r[b, p]:.3g} A")
        X = torch.as_tensor(1.0 / r)
        if not with_jacobian:
            return X, None
        g = -d / r[..., None] ** 3                                       # d(1/r)/dR_j
        D = len(i)
        J = np.zeros((B, D, n, 3))
        ar = np.arange(D)
        J[:, ar, j] = g
        J[:, ar, i] = -g
        return X, torch.as_tensor(J.reshape(B, D, 3 * n))

    def fit_scale(self, X, J):
        return X, J

    def state(self) -> dict:
        return {"kind": "inverse"}


@dataclass
class _Tmpl:
    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray


class ChebyshevFingerprint:
    name = "chebyshev"

    def __init__(self, species, spec, mode="concat", min_scale_rel=1e-2):
        if mode not in ("concat", "sum"):
            raise ConfigError(f"chebyshev fingerprint mode must be 'concat' or 'sum', got {mode!r}")
        self.species = list(species)
        self.spec = spec
        # the reference kernels: the fingerprint's Jacobian needs autograd to second order
        self.desc = spec.build(self.species)
        self.cutoff = spec.cutoff
        self.mode = mode
        self.min_scale_rel = min_scale_rel
        self.scale = None

    def _one(self, numbers, positions, cell, pbc, with_jacobian):
        from ..descriptors.batch import collate

        b = collate([_Tmpl(np.asarray(numbers), np.asarray(positions, dtype=np.float64),
                           np.asarray(cell, dtype=np.float64), np.asarray(pbc, dtype=bool))],
                    self.species, self.cutoff, dtype=torch.float64)
        n = b.positions.shape[0]

        def f(p):
            G = self.desc(p.reshape(n, 3), b.species, b.pair_i, b.pair_j, b.pair_shift, pair_ptr=b.pair_ptr)
            return G.reshape(-1) if self.mode == "concat" else G.sum(0)

        pos = b.positions.detach().reshape(-1).clone()
        x = f(pos).detach()
        if not with_jacobian:
            return x, None
        J = torch.autograd.functional.jacobian(f, pos, vectorize=True)      # [D, 3n]
        return x, J

    def compute(self, positions_list, template, with_jacobian=True):
        """Fingerprints of structures with ``template``'s numbers, cell and pbc (or one template
        per structure: cells differ between the structures of a strained-bulk subset) and the given
        positions.  Returns X [B, D] and J [B, D, 3 natoms] (scaled if a scale is set)."""
        xs, js = [], []
        tmpls = template if isinstance(template, (list, tuple)) else [template] * len(positions_list)
        for p, t in zip(positions_list, tmpls):
            x, J = self._one(t.numbers, p, t.cell, t.pbc, with_jacobian)
            xs.append(x)
            js.append(J)
        X = torch.stack(xs)
        J = torch.stack(js) if with_jacobian else None
        if self.scale is not None:
            X = X / self.scale
            if J is not None:
                J = J / self.scale[None, :, None]
        return X, J

    def fit_scale(self, X, J):
        """Set the per-component scale from training fingerprints (std, floored at
        ``min_scale_rel`` x the largest std) and return the scaled X, J."""
        sd = X.std(0, unbiased=False)
        floor = max(float(sd.max()) * self.min_scale_rel, 1e-12)
        self.scale = sd.clamp_min(floor)
        return X / self.scale, (None if J is None else J / self.scale[None, :, None])

    def state(self) -> dict:
        return {"kind": "chebyshev", "mode": self.mode, "species": self.species, **self.spec.to_dict()}


# the per-atom descriptors and their Jacobian through the compiled operators
def _have_ops() -> bool:
    from ..descriptors import fused  # noqa: F401  (loads the extension where it exists)

    ops = getattr(torch.ops, "distmlip", None)
    try:
        return ops is not None and hasattr(ops, "chebyshev_forward") and hasattr(ops, "chebyshev_double_backward")
    except RuntimeError:
        return False


def descriptor_and_jacobian(desc, species, cutoff, numbers, positions, cell, pbc, with_jacobian=True):
    """(x [n D], J [n D, 3n] or None) with x = G.reshape(-1); None when the compiled operators
    are missing (the caller falls back to autograd on the reference descriptor)."""
    if not _have_ops():
        return None
    from ..descriptors import fused
    from ..descriptors.batch import collate

    b = collate([_Tmpl(np.asarray(numbers), np.asarray(positions, dtype=np.float64),
                       np.asarray(cell, dtype=np.float64), np.asarray(pbc, dtype=bool))],
                list(species), float(cutoff), dtype=torch.float64)
    n = b.positions.shape[0]
    pos, *tens = fused.prepare_arguments(b.positions.detach(), b.species, b.pair_i, b.pair_j, b.pair_shift,
                                         typespin=desc.typespin, pair_ptr=b.pair_ptr)
    prm = (float(desc.rc_radial), int(desc.n_radial), float(desc.rc_angular), int(desc.n_angular))
    ops = torch.ops.distmlip
    with torch.no_grad():
        G = ops.chebyshev_forward(pos, *tens, *prm)
        if not with_jacobian:
            return G.reshape(-1), None
        zero = torch.zeros_like(G)
        J = torch.empty(G.numel(), 3 * n, dtype=torch.float64)
        v = torch.zeros(n, 3, dtype=torch.float64)
        for k in range(3 * n):
            v.view(-1)[k] = 1.0
            jv, _ = ops.chebyshev_double_backward(zero, v, pos, *tens, *prm, True, False, None)
            J[:, k] = jv.reshape(-1)
            v.view(-1)[k] = 0.0
    return G.reshape(-1), J


class LocalFingerprint(ChebyshevFingerprint):
    """Per-atom Chebyshev descriptors for the local-environment kernel (``kernel.LocalKernel``):
    the layout of the concatenated chebyshev fingerprint (X [n D], J [n D, 3n]), but each
    descriptor component is scaled by its std over ALL atoms and structures of the subset (one
    scale per component, the same for every atom, so that environments stay comparable), and the
    descriptor is built for the subset's own elements (a one-element subset has no typespin-
    weighted half, which would repeat the unweighted one).

    ``mixed``: the structures differ in composition or atom order; each fingerprint then ends
    with its atoms' element codes (the index of each atom's element in ``species``), n columns
    that the scale leaves alone and whose Jacobian rows are zero (kernel.LocalKernel).  With
    ``n_pad`` (structures of different atom counts) every structure is padded to n_pad atoms:
    code -1, zero descriptor, zero Jacobian (X [n_pad D + n_pad], J [.., 3 n_pad])."""
    name = "local"

    def __init__(self, species, spec, min_scale_rel=1e-2, mixed=False, n_pad=None):
        super().__init__(species, spec, mode="concat", min_scale_rel=min_scale_rel)
        self.dim = int(self.desc.dim)
        self.mixed = bool(mixed) or n_pad is not None
        self.n_pad = None if n_pad is None else int(n_pad)

    @property
    def is_mixed(self) -> bool:
        return bool(getattr(self, "mixed", False))      # fits saved before mixed groups lack it

    def compute(self, positions_list, template, with_jacobian=True):
        if not self.is_mixed:
            return super().compute(positions_list, template, with_jacobian)
        from ase.data import atomic_numbers

        code = {atomic_numbers[e]: k for k, e in enumerate(self.species)}
        tmpls = template if isinstance(template, (list, tuple)) else [template] * len(positions_list)
        n = getattr(self, "n_pad", None) or max(len(t.numbers) for t in tmpls)
        D, B = self.dim, len(positions_list)
        X = torch.zeros(B, n * D + n, dtype=torch.float64)
        X[:, n * D:] = -1.0
        J = torch.zeros(B, n * D + n, 3 * n, dtype=torch.float64) if with_jacobian else None
        for b, (p, t) in enumerate(zip(positions_list, tmpls)):
            m = len(t.numbers)
            if m > n:
                raise InputError(f"a structure of {m} atoms for a local fingerprint padded to {n}")
            try:
                X[b, n * D:n * D + m] = torch.tensor([code[int(z)] for z in t.numbers], dtype=torch.float64)
            except KeyError as exc:
                raise InputError(f"an element (Z = {exc.args[0]}) that the local fingerprint of "
                                 f"{', '.join(self.species)} does not describe") from None
            x, Jb = self._one(t.numbers, p, t.cell, t.pbc, with_jacobian)
            X[b, :m * D] = x
            if with_jacobian:
                J[b, :m * D, :3 * m] = Jb
        if self.scale is not None:
            X[:, :n * D] /= self.scale
            if J is not None:
                J[:, :n * D] /= self.scale[:, None]
        return X, J

    def _one(self, numbers, positions, cell, pbc, with_jacobian):
        """x = the atoms' descriptors [n D]; J [n D, 3n] column by column from the compiled
        Jacobian-vector products (3n JVPs of the fused descriptor: much faster than autograd
        through the reference descriptor, docs/results.md).  Without the extension: the
        reference path."""
        out = descriptor_and_jacobian(self.desc, self.species, self.cutoff, numbers, positions,
                                      cell, pbc, with_jacobian)
        if out is None:
            return super()._one(numbers, positions, cell, pbc, with_jacobian)
        return out

    def fit_scale(self, X, J, per=None):
        """As the base class, one scale per descriptor component; ``per`` [D]: impose these
        scales instead of fitting them (a subset that shares another subset's hyperparameters
        must see the environments in the same units, or the length scale means another thing)."""
        nD = X.shape[1] - (X.shape[1] // (self.dim + 1) if self.is_mixed else 0)
        if per is None:
            B = X.shape[0]
            G = X[:, :nD].reshape(B, -1, self.dim).reshape(-1, self.dim)
            if self.is_mixed:        # padded atoms are no environments
                G = G[(X[:, nD:] >= 0).reshape(-1)]
            sd = G.std(0, unbiased=False)
            floor = max(float(sd.max()) * self.min_scale_rel, 1e-12)
            per = sd.clamp_min(floor)
        per = torch.as_tensor(per, dtype=torch.float64).reshape(-1)
        if per.numel() != self.dim:
            raise ValueError(f"LocalFingerprint: {per.numel()} scales given for a {self.dim}-component descriptor")
        self.scale = per.repeat(nD // self.dim)
        if self.is_mixed:       # the element codes stay as they are
            full = torch.cat([self.scale, torch.ones(X.shape[1] - nD, dtype=torch.float64)])
            return X / full, (None if J is None else J / full[None, :, None])
        return X / self.scale, (None if J is None else J / self.scale[None, :, None])

    def component_scale(self) -> list[float]:
        """The per-component scale [D] (after fit_scale)."""
        return [float(v) for v in self.scale[:self.dim]]

    def kernel(self, numbers):
        from .kernel import LocalKernel

        sym = np.asarray(numbers).reshape(-1)
        _, inv = np.unique(sym, return_inverse=True)
        n = getattr(self, "n_pad", None)
        if n is not None:        # the kernel's atom count is the padded one
            inv = np.zeros(n, dtype=np.int64)
        return LocalKernel(inv, self.dim, mixed=self.is_mixed)

    def state(self) -> dict:
        return {"kind": "local", "species": self.species, **self.spec.to_dict(),
                **({"mixed": True} if self.is_mixed else {}),
                **({"padded_to": self.n_pad} if getattr(self, "n_pad", None) else {})}


def resolve_fingerprint(kind: str, natoms: int, pbc) -> str:
    """The concrete fingerprint for ``kind`` ('auto': inverse for a non-periodic subset of at
    most AUTO_INVERSE_MAX_ATOMS atoms, else cartesian)."""
    if kind != "auto":
        return kind
    periodic = bool(np.asarray(pbc, bool).any()) if pbc is not None else False
    return "inverse" if (not periodic and 2 <= natoms <= AUTO_INVERSE_MAX_ATOMS) else "cartesian"


def make_fingerprint(kind: str, species=None, **params):
    if kind == "inverse":
        return InverseDistanceFingerprint()
    if kind == "cartesian":
        return CartesianFingerprint()
    if kind == "local":
        if species is None:
            raise ConfigError("local fingerprint needs the species list")
        return LocalFingerprint(species, **params)
    if kind == "chebyshev":
        if species is None:
            raise ConfigError("chebyshev fingerprint needs the species list")
        return ChebyshevFingerprint(species, **params)
    raise ConfigError(f"unknown fingerprint {kind!r} (cartesian, inverse, chebyshev or auto)")
