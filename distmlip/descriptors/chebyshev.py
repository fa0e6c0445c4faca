"""aenet's Chebyshev (AUC) descriptor (Artrith, Urban, Ceder, PRB 96, 014112 (2017)).

Pure-PyTorch reference, differentiable to any order by autograd; the fused kernels
(``backend="fused"``, ``distmlip/descriptors/fused.py``) are tested against it.

Per atom i, with the same parameters for every species::

    fc(r)      = 0.5 (cos(pi r / Rc) + 1)                      r < Rc, else 0
    radial_n   = sum_j        T_n(2 r_ij / Rc_r - 1) fc_r(r_ij)                     n = 0..N_r
    angular_n  = sum_{j<k}    T_n(cos theta_ijk)   fc_a(r_ij) fc_a(r_ik)             n = 0..N_a

the sums running over the neighbours j (periodic images included) of i, the angular one over
unordered neighbour pairs {j, k} (each pair once) with both r_ij, r_ik < Rc_a.  With more than
one species a weighted copy follows, radial terms times s_{t_j}, angular terms times
s_{t_j} s_{t_k}; the layout is [radial, angular, radial weighted, angular weighted].

Conventions matched to aenet's Fortran source (src/ext/sfbasis.f90, src/ext/chebyshev.f90):
  * typespin: s = -T/2 (integer division towards zero), then for each species in list order
    skip 0 when T is even, assign s, s += 1.  T=2 -> [-1, 1], T=3 -> [-1, 0, 1],
    T=4 -> [-2, -1, 1, 2], T=5 -> [-2..2].  With one species there is no weighted copy.
  * angular pairs: aenet loops ``k = j+1 .. nat`` over the neighbour list, i.e. unordered
    pairs counted once (no factor 2, no 1/2); no normalisation of any term.
  * radial argument: ``chebyshev_polynomial(r, 0, Rc, n)`` maps [0, Rc] onto [-1, 1], i.e.
    x = 2 r / Rc - 1; angular argument cos(theta) directly (interval [-1, 1]).
  * fc is applied as 0 for r >= Rc.  aenet's Fortran uses PI = 3.14159265358979 (truncated,
    relative difference 1e-15 from math.pi); we use math.pi, a difference far below float64
    round-off of the sums.
  * aenet skips neighbours closer than 1e-12 A; the neighbour list here never returns an atom
    paired with itself at zero shift, and overlapping distinct atoms are invalid input.
"""
from __future__ import annotations

import math

import torch

from .batch import species_symbols

__all__ = ["ChebyshevDescriptor", "typespin", "descriptor_dim", "build_triplets", "chebyshev_reference"]


def typespin(n_species: int) -> list[float]:
    """aenet's typespin values for ``n_species`` species, in species-list order."""
    T = int(n_species)
    if T < 1:
        raise ValueError("typespin: at least one species required")
    s = -(T // 2)            # Fortran -T/2 truncates towards zero; T > 0 so this is the same
    out = []
    for _ in range(T):
        if s == 0 and T % 2 == 0:
            s += 1
        out.append(float(s))
        s += 1
    return out


def descriptor_dim(n_species: int, n_radial: int, n_angular: int) -> int:
    base = (int(n_radial) + 1) + (int(n_angular) + 1)
    return 2 * base if int(n_species) > 1 else base


def _chebyshev_stack(x: torch.Tensor, order: int) -> torch.Tensor:
    """[..., order + 1] values T_0(x) .. T_order(x) (recurrence, differentiable)."""
    T = [torch.ones_like(x)]
    if order >= 1:
        T.append(x)
    for _ in range(2, order + 1):
        T.append(2.0 * x * T[-1] - T[-2])
    return torch.stack(T, dim=-1)


def _cutoff_fn(r: torch.Tensor, rc: float) -> torch.Tensor:
    # callers pass only r < rc
    return 0.5 * (torch.cos(r * (math.pi / rc)) + 1.0)


def build_triplets(pair_i: torch.Tensor, r: torch.Tensor, rc_angular: float):
    """Angular triplets from a pair list.

    For every centre i, all unordered pairs {p, q} of its pairs (p before q in pair order,
    i.e. j<k in aenet's sense) with r[p] < rc_angular and r[q] < rc_angular.  Returns two long
    tensors ``(tp, tq)`` [T] of indices into the pair list (sorted by tp, then tq).  The pair
    list need not be sorted by centre (it is stably sorted here; the order of pairs with the
    same centre is kept).  No gradient flows through this function."""
    device = pair_i.device
    # branch-free (no test of a size or a value): torch.export traces it with the sizes as
    # unbacked symbols, so the exported program (distmlip/evaluation/export_program.py) runs
    # this same code
    with torch.no_grad():
        sel = torch.nonzero(r < rc_angular, as_tuple=False).reshape(-1)
        ci = pair_i[sel]
        o = torch.sort(ci, stable=True).indices           # stable: a centre's pairs keep their order
        sel, ci = sel[o], ci[o]
        n_sel = sel.numel()
        first_of = torch.searchsorted(ci, ci, side="left")   # where my centre's group starts
        end_of = torch.searchsorted(ci, ci, side="right")
        local = torch.arange(n_sel, device=device) - first_of
        n_partner = end_of - first_of - local - 1          # partners after me in my group
        total = n_partner.sum().item()    # (an int; a symbol while torch.export traces)
        a = torch.repeat_interleave(torch.arange(n_sel, device=device), n_partner, output_size=total)
        first = torch.cumsum(n_partner, 0) - n_partner
        step = torch.arange(total, device=device) - torch.repeat_interleave(first, n_partner, output_size=total)
        b = a + 1 + step
        # sel is increasing within a centre (nonzero's order, kept by the stable sort): tp < tq
        return sel[a], sel[b]


def chebyshev_reference(positions, species_idx, pair_i, pair_j, pair_shift, typespin_t,
                        rc_radial: float, n_radial: int, rc_angular: float, n_angular: int):
    """Functional form of the reference descriptor: G [N, dim] in the dtype of ``positions``."""
    N = positions.shape[0]
    dtype, device = positions.dtype, positions.device
    multi = typespin_t.numel() > 1
    nr, na = int(n_radial) + 1, int(n_angular) + 1
    pair_shift = pair_shift.to(dtype)
    # pair vectors only for pairs inside the larger of the two cutoffs
    rmax = max(rc_radial, rc_angular)
    with torch.no_grad():
        d0 = positions[pair_j] - positions[pair_i] + pair_shift
        inside = torch.nonzero((d0 * d0).sum(-1) < rmax * rmax, as_tuple=False).reshape(-1)
    pi, pj = pair_i[inside], pair_j[inside]
    vec = positions[pj] - positions[pi] + pair_shift[inside]
    r = torch.linalg.vector_norm(vec, dim=-1)
    spin = typespin_t.to(dtype=dtype, device=device)
    s_j = spin[species_idx[pj]] if multi else None

    # radial
    with torch.no_grad():
        rsel = torch.nonzero(r < rc_radial, as_tuple=False).reshape(-1)
    rr = r[rsel]
    g_r = _chebyshev_stack(2.0 * rr / rc_radial - 1.0, int(n_radial)) * _cutoff_fn(rr, rc_radial).unsqueeze(-1)
    rad = torch.zeros(N, nr, dtype=dtype, device=device).index_add(0, pi[rsel], g_r)

    # angular: per-pair unit vectors and cutoff values, gathered per triplet; one column per
    # order (no [T, N_a] stack, which was slower forward and backward on dense bulk; docs/results.md)
    tp, tq = build_triplets(pi, r, rc_angular)
    centre = pi[tp]
    u = vec / r.unsqueeze(-1)
    fca = torch.where(r < rc_angular, _cutoff_fn(r, rc_angular), torch.zeros_like(r))
    cos = (u[tp] * u[tq]).sum(-1)
    w = fca[tp] * fca[tq]
    ws = w * (s_j[tp] * s_j[tq]) if multi else None
    cols, cols_w = [], []
    t_prev, t_cur = None, None
    for n in range(na):
        if n == 0:
            t_cur = torch.ones_like(cos)
        elif n == 1:
            t_prev, t_cur = t_cur, cos
        else:
            t_prev, t_cur = t_cur, 2.0 * cos * t_cur - t_prev
        cols.append(torch.zeros(N, dtype=dtype, device=device).index_add(0, centre, t_cur * w))
        if multi:
            cols_w.append(torch.zeros(N, dtype=dtype, device=device).index_add(0, centre, t_cur * ws))
    ang = torch.stack(cols, dim=1)

    if not multi:
        return torch.cat([rad, ang], dim=1)
    rad_w = torch.zeros(N, nr, dtype=dtype, device=device).index_add(0, pi[rsel], g_r * s_j[rsel].unsqueeze(-1))
    ang_w = torch.stack(cols_w, dim=1)
    return torch.cat([rad, ang, rad_w, ang_w], dim=1)


KERNELS = ("reference", "fused")


class ChebyshevDescriptor(torch.nn.Module):
    """aenet Chebyshev descriptor (see module docstring).

    ``desc(positions, species_idx, pair_i, pair_j, pair_shift) -> G [N, dim]`` with
    ``r_ij = positions[pair_j] - positions[pair_i] + pair_shift``; ``species_idx`` indexes
    ``species``.  The pair list must contain every neighbour within max(rc_radial, rc_angular)
    in both directions (``collate`` builds it); pairs beyond a cutoff are ignored.

    ``kernels``: 'reference' (pure PyTorch, this module) or 'fused' (the compiled kernels,
    :mod:`distmlip.descriptors.fused`), the default of calls that do not name one; a model passes
    its plan's choice on every call (:mod:`distmlip.models.backend`)."""

    def __init__(self, species, rc_radial: float, n_radial: int, rc_angular: float, n_angular: int,
                 kernels: str = "reference"):
        super().__init__()
        from .spec import DescriptorSpec

        symbols = species_symbols(species)
        try:
            self.spec = DescriptorSpec("chebyshev", rc_radial, n_radial, rc_angular, n_angular)
        except Exception as exc:  # ConfigError: the same message, as the ValueError of a bad argument
            raise ValueError(f"ChebyshevDescriptor: {exc}") from None
        if kernels not in KERNELS:
            raise ValueError(f"ChebyshevDescriptor: kernels must be one of {KERNELS}, got {kernels!r}")
        self.species = symbols
        self.rc_radial, self.n_radial = self.spec.rc_radial, self.spec.n_radial
        self.rc_angular, self.n_angular = self.spec.rc_angular, self.spec.n_angular
        self.kernels = kernels
        self.register_buffer("typespin", torch.tensor(typespin(len(symbols)), dtype=torch.float64),
                             persistent=False)

    @classmethod
    def from_spec(cls, spec, species, kernels: str = "reference") -> "ChebyshevDescriptor":
        return cls(species, spec.rc_radial, spec.n_radial, spec.rc_angular, spec.n_angular, kernels=kernels)

    @staticmethod
    def dimension(spec, n_species: int) -> int:
        return descriptor_dim(n_species, spec.n_radial, spec.n_angular)

    @property
    def dim(self) -> int:
        return descriptor_dim(len(self.species), self.n_radial, self.n_angular)

    @property
    def cutoff(self) -> float:
        """Neighbour-list cutoff needed by this descriptor."""
        return self.spec.cutoff

    def extra_repr(self) -> str:
        return (f"species={self.species}, rc_radial={self.rc_radial}, n_radial={self.n_radial}, "
                f"rc_angular={self.rc_angular}, n_angular={self.n_angular}, dim={self.dim}")

    def forward(self, positions, species_idx, pair_i, pair_j, pair_shift, pair_ptr=None, kernels=None):
        """G [N, dim].  ``pair_ptr`` (optional, ``batch.pair_ptr``): CSR offsets of a pair list
        sorted by centre, passed on to the fused kernels (the reference does not need it)."""
        if (kernels or self.kernels) == "fused":
            from . import fused

            return fused.chebyshev(positions, species_idx, pair_i, pair_j, pair_shift,
                                   typespin=self.typespin, rc_radial=self.rc_radial,
                                   n_radial=self.n_radial, rc_angular=self.rc_angular,
                                   n_angular=self.n_angular, pair_ptr=pair_ptr)
        return chebyshev_reference(positions, species_idx, pair_i, pair_j, pair_shift, self.typespin,
                                   self.rc_radial, self.n_radial, self.rc_angular, self.n_angular)
