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
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, InputError

__all__ = ["CartesianFingerprint", "ChebyshevFingerprint", "make_fingerprint"]


class CartesianFingerprint:
    name = "cartesian"

    def compute(self, positions_list, template=None, with_jacobian=True):
        X = torch.as_tensor(np.stack([np.asarray(p, dtype=np.float64).reshape(-1) for p in positions_list]))
        return X, None

    def fit_scale(self, X, J):
        return X, J

    def state(self) -> dict:
        return {"kind": "cartesian"}


@dataclass
class _Tmpl:
    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray


class ChebyshevFingerprint:
    name = "chebyshev"

    def __init__(self, species, rc_radial=4.0, n_radial=8, rc_angular=3.0, n_angular=4,
                 mode="concat", min_scale_rel=1e-2):
        from ..descriptors.chebyshev import ChebyshevDescriptor

        if mode not in ("concat", "sum"):
            raise ConfigError(f"chebyshev fingerprint mode must be 'concat' or 'sum', got {mode!r}")
        self.species = list(species)
        self.desc = ChebyshevDescriptor(self.species, rc_radial, n_radial, rc_angular, n_angular,
                                        backend="reference")
        self.cutoff = max(rc_radial, rc_angular)
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
            G = self.desc(p.reshape(n, 3), b.species, b.pair_i, b.pair_j, b.pair_shift)
            return G.reshape(-1) if self.mode == "concat" else G.sum(0)

        pos = b.positions.detach().reshape(-1).clone()
        x = f(pos).detach()
        if not with_jacobian:
            return x, None
        J = torch.autograd.functional.jacobian(f, pos, vectorize=True)      # [D, 3n]
        return x, J

    def compute(self, positions_list, template, with_jacobian=True):
        """Fingerprints of structures with ``template``'s numbers, cell and pbc and the given
        positions.  Returns X [B, D] and J [B, D, 3 natoms] (scaled if a scale is set)."""
        xs, js = [], []
        for p in positions_list:
            x, J = self._one(template.numbers, p, template.cell, template.pbc, with_jacobian)
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
        return {"kind": "chebyshev", "mode": self.mode, **{k: v for k, v in self.desc.params.items()
                                                           if k != "backend"}}


def make_fingerprint(kind: str, species=None, **params):
    if kind == "cartesian":
        return CartesianFingerprint()
    if kind == "chebyshev":
        if species is None:
            raise ConfigError("chebyshev fingerprint needs the species list")
        return ChebyshevFingerprint(species, **params)
    raise ConfigError(f"unknown fingerprint {kind!r} (cartesian or chebyshev)")
