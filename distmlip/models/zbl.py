"""Ziegler-Biersack-Littmark (ZBL) universal screened nuclear repulsion, switched off smoothly.

E_ZBL = 1/2 sum_{i != j} S(r_ij) * k_e Z_i Z_j / r_ij * phi(r_ij / a_ij)
with a_ij = 0.46850 A / (Z_i^0.23 + Z_j^0.23), k_e = e^2 / (4 pi eps0) = 14.3996454784 eV A and
phi(x) = 0.18175 e^{-3.19980 x} + 0.50986 e^{-0.94229 x} + 0.28022 e^{-0.40290 x} + 0.02817 e^{-0.20162 x}.

S is the quintic smoothstep S(t) = 1 - 10 t^3 + 15 t^4 - 6 t^5 with t = (r - r_in) / (r_out - r_in)
clamped to [0, 1]: S = 1 below r_in, 0 above r_out, and its first and second derivatives vanish
at both radii, so the hybrid energy is C2.  Default radii per element pair come from the
covalent radii (ASE's table): r_in = 0.5 (rc_i + rc_j), r_out = 0.75 (rc_i + rc_j); they sit well
inside typical bond lengths (C-H 1.09 A -> r_out 0.80 A; Cu-Cu 2.55 A -> r_out 1.98 A), so ZBL
acts only where reference data rarely go and the ANN fits the residual E_ref - E_ZBL.
"""
from __future__ import annotations

import math

import torch
from torch import nn



def default_radii(z_i: int, z_j: int) -> tuple[float, float]:
    from ase.data import covalent_radii

    s = float(covalent_radii[z_i] + covalent_radii[z_j])
    return 0.5 * s, 0.75 * s


# the outer radius stays below this share of the shortest distance of the element pair in the
# training data (radii_for_data)
DATA_MARGIN = 0.9


def radii_for_data(species, radii: dict | None, pair_min: dict, margin: float = DATA_MARGIN):
    """ZBL radii {"A-B": [inner, outer]} for a model trained on data whose shortest distance per
    element pair is ``pair_min`` ({"A-B": d or None}, models/data_record.py), and the list of
    (pair, default outer, new outer, d) lowered.  Pairs in ``radii`` (the user's) are kept; a
    default outer radius above ``margin`` x d is lowered to it, the inner one scaled with it.
    Why: ZBL is there for distances the data never reach; where the data do reach (a rattled
    C-O bond at 0.84 A against C-O's default outer radius of 1.07 A), the network would have to
    learn to cancel an energy of eV against meV-sized differences, which slowed training and
    cost accuracy."""
    from ase.data import atomic_numbers

    out = {k: list(v) for k, v in (radii or {}).items()}
    given = {"-".join(sorted(k.split("-"))) for k in out}
    lowered = []
    for a, sa in enumerate(species):
        for sb in species[a:]:
            key = "-".join(sorted((sa, sb)))
            d = pair_min.get(key)
            if key in given or d is None:
                continue
            lo, hi = default_radii(atomic_numbers[sa], atomic_numbers[sb])
            if margin * d < hi:
                new = margin * d
                out[key] = [lo * new / hi, new]
                lowered.append((key, hi, new, float(d)))
    return out, lowered


def smoothstep(t: torch.Tensor) -> torch.Tensor:
    t = t.clamp(0.0, 1.0)
    return 1.0 - t * t * t * (10.0 - 15.0 * t + 6.0 * t * t)


def zbl_pair_energy(r: torch.Tensor, zi: torch.Tensor, zj: torch.Tensor) -> torch.Tensor:
    """Unswitched ZBL energy of pairs at distance r (eV).  Written without Python-only
    constructs (no module constants either) so that the TorchScript export compiles this same
    function: 0.46850 A = 0.8854 Bohr radii (screening length), 14.3996454784 eV A = e^2 / (4 pi eps0)."""
    zi = zi.to(r.dtype)
    zj = zj.to(r.dtype)
    a = 0.46850 / (torch.pow(zi, 0.23) + torch.pow(zj, 0.23))
    x = r / a
    phi = (0.18175 * torch.exp(-3.19980 * x) + 0.50986 * torch.exp(-0.94229 * x)
           + 0.28022 * torch.exp(-0.40290 * x) + 0.02817 * torch.exp(-0.20162 * x))
    return 14.3996454784 * zi * zj / r * phi


def switched_pair_energy(r: torch.Tensor, zi: torch.Tensor, zj: torch.Tensor, r_in: torch.Tensor,
                         r_out: torch.Tensor) -> torch.Tensor:
    """ZBL pair energies times the switch, zero at and beyond ``r_out`` (the model's and the
    TorchScript export's one definition)."""
    inside = r < r_out
    # evaluate only inside the outer radius (r > 0 guaranteed there by the data checks)
    rr = torch.where(inside, r, r_out)
    e = zbl_pair_energy(rr, zi, zj) * smoothstep((rr - r_in) / (r_out - r_in))
    return torch.where(inside, e, torch.zeros_like(e))


class ZBL(nn.Module):
    """Pairwise ZBL repulsion on a batch's neighbour list (pairs in both directions)."""

    def __init__(self, species: list[str], radii: dict | None = None):
        super().__init__()
        from ase.data import atomic_numbers

        self.species = list(species)
        z = torch.tensor([atomic_numbers[s] for s in self.species], dtype=torch.long)
        T = len(self.species)
        r_in = torch.zeros(T, T, dtype=torch.float64)
        r_out = torch.zeros(T, T, dtype=torch.float64)
        radii = dict(radii or {})
        for k, v in radii.items():
            parts = str(k).split("-")
            if len(parts) != 2 or any(x not in self.species for x in parts):
                raise ValueError(f"ZBL radii key {k!r} is not an element pair 'A-B' of the species "
                                 f"{self.species}")
            if len(tuple(v)) != 2:
                raise ValueError(f"ZBL radii for {k!r} must be [inner, outer], got {v!r}")
        for a in range(T):
            for b in range(T):
                key = None
                for k in (f"{self.species[a]}-{self.species[b]}", f"{self.species[b]}-{self.species[a]}"):
                    if k in radii:
                        key = k
                lo, hi = radii[key] if key else default_radii(int(z[a]), int(z[b]))
                if not (0.0 < lo < hi):
                    raise ValueError(f"ZBL radii for {self.species[a]}-{self.species[b]} must satisfy "
                                     f"0 < inner < outer, got {lo}, {hi}")
                r_in[a, b], r_out[a, b] = lo, hi
        self.register_buffer("z", z)
        self.register_buffer("r_in", r_in)
        self.register_buffer("r_out", r_out)

    @property
    def cutoff(self) -> float:
        return float(self.r_out.max())

    def to_dict(self) -> dict:
        radii = {f"{a}-{b}": (float(self.r_in[i, j]), float(self.r_out[i, j]))
                 for i, a in enumerate(self.species) for j, b in enumerate(self.species) if i <= j}
        return {"species": self.species, "radii": radii}

    @classmethod
    def from_dict(cls, d: dict) -> "ZBL":
        return cls(d["species"], {k: tuple(v) for k, v in d["radii"].items()})

    @property
    def short_range(self):
        """The outer radius per pair of species indices [T, T] (numpy): no pair beyond its
        element pair's radius has a ZBL energy (``descriptors.batch.prepare(short_range=...)``)."""
        return self.r_out.detach().cpu().numpy().astype("float64")

    def pair_energies(self, r: torch.Tensor, ti: torch.Tensor, tj: torch.Tensor) -> torch.Tensor:
        return switched_pair_energy(r, self.z[ti], self.z[tj], self.r_in[ti, tj].to(r.dtype),
                                    self.r_out[ti, tj].to(r.dtype))

    # ---- the energy-term interface (distmlip.models.bpnn): batches with positions and pairs
    def atomic_energies(self, batch, plan=None) -> torch.Tensor:
        """Per-atom ZBL energies [N] float64: half of each pair energy on its centre atom (the
        pair list holds both directions, so each atom of a pair gets half).  A batch of cached
        descriptors (energy training) carries its structures instead of positions: their ZBL
        energies are constants, computed once per structure (:meth:`frozen_atomic_energies`)."""
        if getattr(batch, "positions", None) is None or getattr(batch, "pair_i", None) is None:
            if getattr(batch, "frozen_energy", None) is not None:   # FeatureBatchLoader: computed once
                return batch.frozen_energy.to(torch.float64)
            if getattr(batch, "structures", None) is not None:
                return self.frozen_atomic_energies(batch.structures, batch.features.device)
            from ..errors import ConfigError

            raise ConfigError("the model has a ZBL term, which needs positions and the pair list: this "
                              "batch holds cached descriptors without its structures")
        pos = batch.positions.to(torch.float64)
        out = torch.zeros(pos.shape[0], dtype=torch.float64, device=pos.device)
        sel = self._pairs_inside(batch, pos)
        if sel is None:
            return out
        pi, pj = batch.pair_i[sel], batch.pair_j[sel]
        rij = pos[pj] - pos[pi] + batch.pair_shift.to(torch.float64)[sel]
        e = self.pair_energies(torch.linalg.norm(rij, dim=1), batch.species[pi], batch.species[pj])
        return 0.5 * out.index_add(0, pi, e)

    def _pairs_inside(self, batch, pos):
        """Indices of the batch's pairs inside their outer radius (None when there are none): only
        they have energy (the switch is C2 there).  The batch's pair list reaches the descriptor
        cutoff, so selecting them first (without autograd) keeps ZBL from costing a pass over
        every pair in each step; training batches bring the pairs inside short_range (>= every
        outer radius) found once per structure, usually none."""
        cand = getattr(batch, "short_pairs", None)
        if cand is not None and cand.numel() == 0:
            return None
        pi, pj = batch.pair_i, batch.pair_j
        with torch.no_grad():
            if cand is None:
                cand = torch.arange(pi.shape[0], device=pi.device)
            ci, cj = pi[cand], pj[cand]
            r0 = torch.linalg.norm(pos[cj] - pos[ci] + batch.pair_shift.to(torch.float64)[cand], dim=1)
            sel = cand[r0 < self.r_out.to(r0.dtype)[batch.species[ci], batch.species[cj]]]
        return sel if sel.numel() > 0 else None

    def energy_forces_virial(self, batch):
        """(E [B], F [N, 3], W [B, 3, 3]) of the ZBL term, detached: W = sum_p r_p (x) dE/dr_p the
        virial (stress = sym(W) / V), from the gradients of the pair energies in their pair
        vectors (ZBL has no parameters, so nothing else needs them)."""
        pos = batch.positions.detach().to(torch.float64)
        B = batch.n_structures
        E = torch.zeros(B, dtype=torch.float64, device=pos.device)
        F = torch.zeros_like(pos)
        W = torch.zeros(B, 3, 3, dtype=torch.float64, device=pos.device)
        sel = self._pairs_inside(batch, pos)
        if sel is not None:
            pi, pj = batch.pair_i[sel], batch.pair_j[sel]
            with torch.enable_grad():
                rij = (pos[pj] - pos[pi] + batch.pair_shift.to(torch.float64)[sel]).requires_grad_(True)
                e = self.pair_energies(torch.linalg.norm(rij, dim=1), batch.species[pi], batch.species[pj])
                (gr,) = torch.autograd.grad(e.sum(), rij)
            # each pair is listed in both directions and carries half its energy
            gr, e, rij = 0.5 * gr, 0.5 * e.detach(), rij.detach()
            s = batch.structure[pi]
            E.index_add_(0, s, e)
            F.index_add_(0, pi, gr).index_add_(0, pj, -gr)
            W.index_add_(0, s, rij[:, :, None] * gr[:, None, :])
        return E, F.to(batch.positions.dtype), W

    def frozen_atomic_energies(self, structures, device="cpu", memo: bool = True) -> torch.Tensor:
        """Per-atom ZBL energies [N] of fixed structures (no gradient), in the order of
        ``collate``: computed on the structure's own pair list the first time a structure
        (identified by a digest of numbers, positions, cell and pbc) is seen, then reused, so that
        energy training with the descriptor cache pays for ZBL once per structure, not per step.
        ``memo=False``: no memo here (the caller keeps the energies, as FeatureBatchLoader does)."""
        import hashlib

        import numpy as np

        from ..descriptors.batch import collate

        memo = self.__dict__.setdefault("_frozen", {}) if memo else {}
        out = []
        for s in structures:
            h = hashlib.blake2b(digest_size=16)
            for a in (np.asarray(s.numbers, np.int64), np.asarray(s.positions, np.float64),
                      np.asarray(s.cell, np.float64), np.asarray(s.pbc, bool)):
                h.update(np.ascontiguousarray(a).tobytes())
            key = h.digest()
            e = memo.get(key)
            if e is None:
                b = collate([s], species=self.species, cutoff=self.cutoff, dtype=torch.float64)
                with torch.no_grad():
                    e = self.atomic_energies(b).cpu()
                memo[key] = e
            out.append(e)
        if not out:
            return torch.zeros(0, dtype=torch.float64, device=device)
        return torch.cat(out).to(device)

    def energy_and_forces(self, batch, plan=None, create_graph: bool = False):
        """(E [B], F [N, 3]) of the ZBL term; ``batch.positions`` must require grad."""
        e = self.atomic_energies(batch)
        E = torch.zeros(batch.n_structures, dtype=torch.float64, device=e.device).index_add(0, batch.structure, e)
        if not e.requires_grad:          # no pair inside the outer radii
            return E, torch.zeros_like(batch.positions)
        (g,) = torch.autograd.grad(e.sum(), batch.positions, create_graph=create_graph)
        return (E if create_graph else E.detach()), -g.to(batch.positions.dtype)


def zbl_energy_reference(positions, numbers, cell=None, pbc=None, radii=None) -> float:
    """Plain-Python ZBL energy of one structure by explicit loops (minimum image not used:
    free molecules only).  Independent of the vectorised code above; used in tests."""
    n = len(numbers)
    e = 0.0
    for i in range(n):
        for j in range(i + 1, n):
            d = [positions[j][k] - positions[i][k] for k in range(3)]
            r = math.sqrt(sum(x * x for x in d))
            zi, zj = int(numbers[i]), int(numbers[j])
            lo, hi = radii(zi, zj) if radii else default_radii(zi, zj)
            if r >= hi:
                continue
            a = 0.46850 / (zi ** 0.23 + zj ** 0.23)
            x = r / a
            phi = (0.18175 * math.exp(-3.19980 * x) + 0.50986 * math.exp(-0.94229 * x)
                   + 0.28022 * math.exp(-0.40290 * x) + 0.02817 * math.exp(-0.20162 * x))
            t = min(max((r - lo) / (hi - lo), 0.0), 1.0)
            s = 1.0 - 10.0 * t ** 3 + 15.0 * t ** 4 - 6.0 * t ** 5
            e += s * 14.3996454784 * zi * zj / r * phi
    return e
