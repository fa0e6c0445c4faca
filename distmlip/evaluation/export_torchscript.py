"""Export a BPNN (with its ZBL term, if any) as a self-contained TorchScript module.

TorchScript is deprecated in torch 2.x; the format is kept while torch runs it, and the
successor is ``--format exported-program`` (:mod:`.export_program`, torch.export, traced from the
package's own descriptor code).

    m = torch.jit.load("model.pt")                     # torch only, no distmlip import
    energy, forces = m(positions, numbers, cell, pbc)  # [N,3] f64, [N] long, [3,3] f64, [3] bool
                                                       # -> [] f64 (eV), [N,3] f64 (eV/A)

In C++: ``torch::jit::load("model.pt").forward({pos, numbers, cell, pbc})`` returns the same
tuple.  The ZBL term is the package's own :func:`distmlip.models.zbl.switched_pair_energy`, compiled by
TorchScript; the descriptor and the neighbour list are written again here in a form TorchScript
compiles (tests/test_export_torchscript.py proves them equal to the package's on random periodic
and free structures).  The module holds the species (atomic numbers), the Chebyshev descriptor parameters and
typespins, the per-species networks with their descriptor normalisation, energy shift/scale and
reference energies, and the ZBL parameters.  Attributes: ``cutoff``, ``species_z``.

Neighbour list: brute force over the periodic images.  Along each periodic direction k the
images -n_k..n_k with n_k = ceil(rc / h_k) (h_k the distance between the lattice planes spanned by
the other two cell vectors) are enough to find every pair within rc (any cell shape, several
images of an atom in small cells).  Cost: time and memory O(N^2 * S) with
S = prod_k (2 n_k + 1) images (S = 27 for a cell whose heights exceed rc), fine up to a few
hundred atoms; a linear-scaling cell list is the ASE calculator's job.  Angular triplets are
enumerated per centre from a padded [N, M, M] neighbour table (M = largest neighbour count).
"""
from __future__ import annotations

import math
import warnings
from typing import List, Tuple

import torch
from torch import nn

from ..models.zbl import switched_pair_energy


class _Net(nn.Module):
    def __init__(self, layers: nn.Sequential):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        return self.layers(x)


class ExportedPotential(nn.Module):
    """TorchScript-able BPNN (+ ZBL) on raw positions; built by :func:`build_module`."""

    def __init__(self, species_z: List[int], rc_radial: float, n_radial: int, rc_angular: float,
                 n_angular: int, typespin: List[float], nets: List[nn.Sequential],
                 feature_mean: torch.Tensor, feature_std: torch.Tensor, energy_shift: torch.Tensor,
                 energy_scale: float, reference_energy: torch.Tensor, has_zbl: bool,
                 zbl_r_in: torch.Tensor, zbl_r_out: torch.Tensor):
        super().__init__()
        self.species_z: List[int] = list(species_z)
        self.rc_radial = float(rc_radial)
        self.rc_angular = float(rc_angular)
        self.n_radial = int(n_radial)
        self.n_angular = int(n_angular)
        self.multi = len(species_z) > 1
        self.has_zbl = bool(has_zbl)
        zc = float(zbl_r_out.max()) if has_zbl else 0.0
        self.cutoff = max(self.rc_radial, self.rc_angular, zc)
        z2i = torch.full((119,), -1, dtype=torch.long)
        for k, z in enumerate(species_z):
            z2i[z] = k
        self.register_buffer("z_to_index", z2i)
        self.register_buffer("z_of_index", torch.tensor(species_z, dtype=torch.long))
        self.register_buffer("typespin", torch.tensor(typespin, dtype=torch.float64))
        self.nets = nn.ModuleList([_Net(n) for n in nets])
        self.register_buffer("feature_mean", feature_mean.to(torch.float64))
        self.register_buffer("feature_std", feature_std.to(torch.float64))
        self.register_buffer("energy_shift", energy_shift.to(torch.float64))
        self.register_buffer("energy_scale", torch.tensor(float(energy_scale), dtype=torch.float64))
        self.register_buffer("reference_energy", reference_energy.to(torch.float64))
        self.register_buffer("zbl_r_in", zbl_r_in.to(torch.float64))
        self.register_buffer("zbl_r_out", zbl_r_out.to(torch.float64))
        self.net_dtype = nets[0][0].weight.dtype if len(nets) else torch.float64

    # ---------------------------------------------------------------- neighbour list
    def _orth(self, v: torch.Tensor, qs: List[torch.Tensor]) -> torch.Tensor:
        for q in qs:
            v = v - (v @ q) * q
        return v

    def _complete_cell(self, cell: torch.Tensor, pbc: torch.Tensor) -> torch.Tensor:
        """The cell with every non-periodic vector replaced by a unit vector orthogonal to the
        periodic ones (a slab's zero or short third vector, a wire's two): invertible, and the
        periodic vectors' plane spacings unchanged."""
        qs: List[torch.Tensor] = []        # orthonormal basis of the vectors kept so far
        for k in range(3):
            if bool(pbc[k]):
                v = self._orth(cell[k], qs)
                qs.append(v / torch.linalg.norm(v))
        full = cell.clone()
        eye = torch.eye(3, dtype=cell.dtype, device=cell.device)
        for k in range(3):
            if not bool(pbc[k]):
                best = self._orth(eye[0], qs)
                for e in range(1, 3):
                    v = self._orth(eye[e], qs)
                    if float(torch.linalg.norm(v)) > float(torch.linalg.norm(best)):
                        best = v
                best = best / torch.linalg.norm(best)
                qs.append(best)
                full[k] = best
        return full

    def neighbor_pairs(self, pos: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(i, j, cartesian shift) of all pairs with |r_j + shift - r_i| < cutoff, i != j or a
        non-zero image; brute force over periodic images.  Positions are wrapped into the cell
        for the search (an unwrapped MD frame or an atom moved by lattice vectors describes the
        same crystal, and ceil(rc / h) images only cover atoms inside the cell); the shifts
        returned refer to the positions as given."""
        rc = self.cutoff
        N = pos.shape[0]
        dev = pos.device
        nimg: List[int] = [0, 0, 0]
        any_pbc = bool(pbc.any())
        p = pos.detach()
        offset = torch.zeros(N, 3, dtype=pos.dtype, device=dev)
        if any_pbc:
            full = self._complete_cell(cell, pbc)
            vol = torch.abs(torch.linalg.det(full))
            if float(vol) < 1e-12:
                raise RuntimeError("periodic structure with a singular cell")
            for k in range(3):
                if bool(pbc[k]):
                    a = full[(k + 1) % 3]
                    b = full[(k + 2) % 3]
                    h = float(vol / torch.linalg.norm(torch.linalg.cross(a, b)))
                    nimg[k] = int(math.ceil(rc / h))
            frac = p @ torch.linalg.inv(full)
            offset = torch.floor(frac) * pbc.to(pos.dtype)[None, :]
            p = p - offset @ full
        r0 = torch.arange(-nimg[0], nimg[0] + 1, device=dev)
        r1 = torch.arange(-nimg[1], nimg[1] + 1, device=dev)
        r2 = torch.arange(-nimg[2], nimg[2] + 1, device=dev)
        g = torch.meshgrid([r0, r1, r2], indexing="ij")
        S = torch.stack([g[0].reshape(-1), g[1].reshape(-1), g[2].reshape(-1)], dim=1).to(pos.dtype)
        shifts = S @ cell.to(pos.dtype) if any_pbc else torch.zeros_like(S)
        with torch.no_grad():
            d = p[None, :, None, :] + shifts[None, None, :, :] - p[:, None, None, :]   # [N, N, S, 3]
            r2m = (d * d).sum(-1)
            zero = (S.abs().sum(1) == 0)
            eye = torch.eye(N, dtype=torch.bool, device=dev)
            self_mask = eye[:, :, None] & zero[None, None, :]
            ok = (r2m < rc * rc) & (~self_mask)
            idx = torch.nonzero(ok)
        i, j = idx[:, 0], idx[:, 1]
        # wrapped r_j - r_i + S.cell = given r_j - r_i + (S + o_i - o_j).cell
        lat = S[idx[:, 2]] + offset[i] - offset[j]
        return i, j, lat @ cell.to(pos.dtype)

    # ---------------------------------------------------------------- descriptor
    def _cheb(self, x: torch.Tensor, order: int) -> torch.Tensor:
        T: List[torch.Tensor] = [torch.ones_like(x)]
        if order >= 1:
            T.append(x)
        for _ in range(2, order + 1):
            T.append(2.0 * x * T[-1] - T[-2])
        return torch.stack(T, dim=-1)

    def descriptor(self, pos, spec, pi, pj, shift) -> torch.Tensor:
        return self.descriptor_from_vectors(pos.shape[0], pos[pj] - pos[pi] + shift, spec, pi, pj)

    def descriptor_from_vectors(self, N: int, vec: torch.Tensor, spec: torch.Tensor, pi: torch.Tensor,
                                pj: torch.Tensor) -> torch.Tensor:
        """G [N, dim] from the pair vectors r_ij = vec (full list, both directions)."""
        dt = vec.dtype
        r = torch.linalg.norm(vec, dim=-1)
        nr = self.n_radial + 1
        na = self.n_angular + 1
        sel = torch.nonzero(r < self.rc_radial).reshape(-1)
        rr = r[sel]
        fc = 0.5 * (torch.cos(rr * (math.pi / self.rc_radial)) + 1.0)
        gr = self._cheb(2.0 * rr / self.rc_radial - 1.0, self.n_radial) * fc[:, None]
        rad = torch.zeros(N, nr, dtype=dt, device=vec.device).index_add(0, pi[sel], gr)
        # angular: padded neighbour table per centre (pairs with r < rc_angular)
        asel = torch.nonzero(r < self.rc_angular).reshape(-1)
        ci = pi[asel]
        order = torch.argsort(ci, stable=True)
        asel = asel[order]
        ci = ci[order]
        counts = torch.bincount(ci, minlength=N)
        M = int(counts.max()) if counts.numel() > 0 else 0
        ang = torch.zeros(N, na, dtype=dt, device=vec.device)
        ang_w = torch.zeros(N, na, dtype=dt, device=vec.device)
        if M > 1:
            start = torch.cumsum(counts, 0) - counts
            local = torch.arange(asel.numel(), device=vec.device) - start[ci]
            table = torch.full((N, M), -1, dtype=torch.long, device=vec.device)
            table[ci, local] = asel
            a = table[:, :, None].expand(N, M, M)
            b = table[:, None, :].expand(N, M, M)
            upper = torch.triu(torch.ones(M, M, dtype=torch.bool, device=vec.device), diagonal=1)
            ok = (a >= 0) & (b >= 0) & upper[None, :, :]
            trip = torch.nonzero(ok)
            tp = table[trip[:, 0], trip[:, 1]]
            tq = table[trip[:, 0], trip[:, 2]]
            rp = r[tp]
            rq = r[tq]
            cos = (vec[tp] * vec[tq]).sum(-1) / (rp * rq)
            fca = 0.25 * (torch.cos(rp * (math.pi / self.rc_angular)) + 1.0) * \
                (torch.cos(rq * (math.pi / self.rc_angular)) + 1.0)
            ga = self._cheb(cos, self.n_angular) * fca[:, None]
            ang = ang.index_add(0, trip[:, 0], ga)
            if self.multi:
                sj = self.typespin[spec[pj]]
                ang_w = ang_w.index_add(0, trip[:, 0], ga * (sj[tp] * sj[tq])[:, None])
        if not self.multi:
            return torch.cat([rad, ang], dim=1)
        sj = self.typespin[spec[pj]]
        rad_w = torch.zeros(N, nr, dtype=dt, device=vec.device).index_add(0, pi[sel], gr * sj[sel][:, None])
        return torch.cat([rad, ang, rad_w, ang_w], dim=1)

    # ---------------------------------------------------------------- ZBL
    def zbl_energy(self, pos, zi_idx, pi, pj, shift) -> torch.Tensor:
        return 0.5 * self.zbl_pair_energies(pos[pj] - pos[pi] + shift, zi_idx, pi, pj).sum()

    def zbl_pair_energies(self, vec, zi_idx, pi, pj) -> torch.Tensor:
        r = torch.linalg.norm(vec, dim=-1)
        ti = zi_idx[pi]
        tj = zi_idx[pj]
        return switched_pair_energy(r, self.z_of_index[ti], self.z_of_index[tj], self.zbl_r_in[ti, tj],
                                    self.zbl_r_out[ti, tj])

    def atomic_energies_from_vectors(self, numbers: torch.Tensor, vec: torch.Tensor, pi: torch.Tensor,
                                     pj: torch.Tensor) -> torch.Tensor:
        """Per-atom energies [N] float64 from atomic numbers and the pair vectors of a full
        neighbour list within ``cutoff`` (each pair in both directions); a ZBL pair energy is
        shared equally by its two atoms.  (The metatomic export calls this.)"""
        N = numbers.shape[0]
        if bool((numbers < 0).any()) or bool((numbers > 118).any()):
            raise RuntimeError("atomic number out of range")
        spec = self.z_to_index[numbers]
        if bool((spec < 0).any()):
            raise RuntimeError("structure contains an element this potential does not know")
        vec = vec.to(torch.float64)
        G = self.descriptor_from_vectors(N, vec, spec, pi, pj)
        e = torch.zeros(N, dtype=torch.float64, device=vec.device)
        for t, net in enumerate(self.nets):
            idx = torch.nonzero(spec == t).reshape(-1)
            if idx.numel() > 0:
                x = (G[idx] - self.feature_mean[t]) / self.feature_std[t]
                y = net(x.to(self.net_dtype)).reshape(-1).to(torch.float64)
                e = e.index_add(0, idx, self.reference_energy[t] + self.energy_shift[t] + self.energy_scale * y)
        if self.has_zbl:
            e = e.index_add(0, pi, 0.5 * self.zbl_pair_energies(vec, spec, pi, pj))
        return e

    # ---------------------------------------------------------------- energy and forces
    def energy(self, positions: torch.Tensor, numbers: torch.Tensor, cell: torch.Tensor,
               pbc: torch.Tensor) -> torch.Tensor:
        pos = positions
        if bool((numbers < 0).any()) or bool((numbers > 118).any()):
            raise RuntimeError("atomic number out of range")
        spec = self.z_to_index[numbers]
        if bool((spec < 0).any()):
            raise RuntimeError("structure contains an element this potential does not know")
        pi, pj, shift = self.neighbor_pairs(pos, cell.to(pos.dtype), pbc)
        G = self.descriptor(pos, spec, pi, pj, shift)
        E = torch.zeros((), dtype=torch.float64, device=pos.device)
        for t, net in enumerate(self.nets):
            idx = torch.nonzero(spec == t).reshape(-1)
            if idx.numel() > 0:
                x = (G[idx] - self.feature_mean[t]) / self.feature_std[t]
                y = net(x.to(self.net_dtype)).reshape(-1).to(torch.float64)
                E = E + (self.reference_energy[t] + self.energy_shift[t] + self.energy_scale * y).sum()
        if self.has_zbl:
            E = E + self.zbl_energy(pos, spec, pi, pj, shift)
        return E

    def forward(self, positions: torch.Tensor, numbers: torch.Tensor, cell: torch.Tensor,
                pbc: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        pos = positions.detach().to(torch.float64).requires_grad_(True)
        E = self.energy(pos, numbers.to(torch.long), cell.to(torch.float64), pbc.to(torch.bool))
        grads = torch.autograd.grad([E], [pos])
        g = grads[0]
        if g is None:
            g = torch.zeros_like(pos)
        return E.detach(), -g


def build_module(model) -> ExportedPotential:
    from ase.data import atomic_numbers

    spec, ann = model.spec, model.ann
    if spec.type != "chebyshev":
        raise ValueError(f"TorchScript export: descriptor type {spec.type!r} is not supported")
    nets = []
    for t in range(len(model.species)):
        seq = []
        for m in ann.nets[t]:
            if isinstance(m, nn.Linear):
                lin = nn.Linear(m.in_features, m.out_features, dtype=m.weight.dtype)
                lin.weight.data.copy_(m.weight.detach().cpu())
                lin.bias.data.copy_(m.bias.detach().cpu())
                seq.append(lin)
            else:
                seq.append(type(m)())
        nets.append(nn.Sequential(*seq))
    zbl = getattr(model, "zbl", None)
    T = len(model.species)
    r_in = zbl.r_in.detach().cpu() if zbl is not None else torch.ones(T, T, dtype=torch.float64)
    r_out = zbl.r_out.detach().cpu() if zbl is not None else 2 * torch.ones(T, T, dtype=torch.float64)
    from ..descriptors.chebyshev import typespin

    return ExportedPotential([atomic_numbers[s] for s in model.species], spec.rc_radial, spec.n_radial,
                             spec.rc_angular, spec.n_angular, typespin(T), nets, ann.feature_mean.detach().cpu(),
                             ann.feature_std.detach().cpu(), ann.energy_shift.detach().cpu(),
                             float(ann.energy_scale), ann.reference_energy.detach().cpu(),
                             zbl is not None, r_in, r_out)


def write_torchscript(model, path) -> str:
    """Script the model and save it atomically to ``path``."""
    from ..utils.io import atomic_path

    mod = build_module(model).eval()
    with warnings.catch_warnings():
        # torch 2.x marks torch.jit.script deprecated (in favour of torch.export: --format
        # exported-program); the TorchScript file still works, so the warning is not the user's
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        scripted = torch.jit.script(mod)
    # written through a Python file: torch's own writer met a full disk with a C++ exception
    # that ended the process (abort, exit 134, the temporary file left behind, sweep 20)
    data = scripted.save_to_buffer()
    with atomic_path(path, suffix=".pt") as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return str(path)
