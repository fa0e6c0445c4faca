"""Collation of structures into one batch-global graph (atoms + neighbour pairs).

See docs/DESIGN.md, section "Batch".  Pairs are batch-global, both directions are present and
they are sorted by centre atom ``pair_i``; ``batch.pair_ptr`` [N + 1] holds the CSR offsets
(pairs of atom a are ``pair_ptr[a]:pair_ptr[a+1]``).  ``r_ij = positions[j] - positions[i] +
pair_shift``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch

from ..errors import InputError
from .neighbors import neighbor_list

__all__ = ["Batch", "collate", "species_symbols"]


def species_symbols(species) -> list[str]:
    """Normalise a species list (symbols or atomic numbers) to chemical symbols."""
    from ase.data import atomic_numbers, chemical_symbols

    out = []
    for s in species:
        if isinstance(s, (int, np.integer)):
            if not 0 < int(s) < len(chemical_symbols):
                raise InputError(f"species list: invalid atomic number {s}")
            out.append(chemical_symbols[int(s)])
        else:
            sym = str(s).strip()
            if sym not in atomic_numbers:
                raise InputError(f"species list: unknown element symbol {s!r}")
            out.append(sym)
    if len(set(out)) != len(out):
        raise InputError(f"species list: duplicate elements in {out}")
    return out


@dataclass
class Batch:
    positions: torch.Tensor      # [N, 3] leaf tensor
    species: torch.Tensor        # [N] long
    structure: torch.Tensor      # [N] long, structure index inside the batch
    n_structures: int
    natoms: torch.Tensor         # [B] long
    cell: torch.Tensor           # [B, 3, 3]
    pbc: torch.Tensor            # [B, 3] bool
    pair_i: torch.Tensor         # [P] long, sorted
    pair_j: torch.Tensor         # [P] long
    pair_shift: torch.Tensor     # [P, 3] Cartesian
    pair_ptr: torch.Tensor       # [N + 1] long, CSR offsets of pair_i
    energy: torch.Tensor         # [B] float64
    forces: torch.Tensor         # [N, 3] float64
    has_forces: torch.Tensor     # [B] bool
    weight: torch.Tensor         # [B] float64
    index: torch.Tensor          # [B] long

    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_pairs(self) -> int:
        return int(self.pair_i.shape[0])

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Batch":
        """Copy to ``device``; ``dtype`` (optional) converts positions, cell and pair_shift only
        (energies, forces and weights stay float64).  ``positions`` stays a leaf tensor."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                if f.name in ("positions", "cell", "pair_shift") and dtype is not None:
                    v = v.detach().to(device=device, dtype=dtype)
                else:
                    v = v.detach().to(device=device)
            kw[f.name] = v
        return Batch(**kw)

    def pin_memory(self) -> "Batch":
        kw = {f.name: (getattr(self, f.name).pin_memory() if isinstance(getattr(self, f.name), torch.Tensor)
                       else getattr(self, f.name)) for f in fields(self)}
        return Batch(**kw)


def collate(structures: Sequence, species, cutoff: float, dtype: torch.dtype = torch.float64,
            device="cpu", neighbor_backend: str | None = None) -> Batch:
    """Build a :class:`Batch` from a list of ``distmlip.data.structure.Structure`` (or any object
    with ``numbers, positions, cell, pbc`` and optionally ``energy, forces, weight, index``).

    ``species``: the model's element list (symbols or atomic numbers); ``batch.species`` indexes
    it.  ``cutoff``: neighbour cutoff (the largest descriptor cutoff).  An element that is not in
    ``species`` raises :class:`InputError` naming the structure."""
    symbols = species_symbols(species)
    from ase.data import atomic_numbers

    z_to_idx = np.full(119, -1, dtype=np.int64)
    for k, s in enumerate(symbols):
        z_to_idx[atomic_numbers[s]] = k

    B = len(structures)
    pos_l, spec_l, struct_l, forces_l = [], [], [], []
    pi_l, pj_l, ps_l = [], [], []
    natoms = np.zeros(B, dtype=np.int64)
    cells = np.zeros((B, 3, 3))
    pbcs = np.zeros((B, 3), dtype=bool)
    energy = np.full(B, np.nan)
    has_forces = np.zeros(B, dtype=bool)
    weight = np.ones(B)
    index = np.full(B, -1, dtype=np.int64)
    offset = 0
    for b, s in enumerate(structures):
        src = getattr(s, "source", "") or ""
        sidx = getattr(s, "index", -1)
        where = f"structure {b} of the batch" + (f" (data-set index {sidx})" if sidx is not None and sidx >= 0 else "") \
            + (f" from {src}" if src else "")
        numbers = np.asarray(s.numbers, dtype=np.int64).reshape(-1)
        n = len(numbers)
        pos = np.asarray(s.positions, dtype=np.float64).reshape(n, 3)
        cell = np.asarray(s.cell, dtype=np.float64).reshape(3, 3)
        pbc = np.broadcast_to(np.asarray(s.pbc, dtype=bool), (3,))
        bad = (numbers <= 0) | (numbers >= len(z_to_idx))
        idx = np.where(bad, -1, z_to_idx[np.clip(numbers, 0, len(z_to_idx) - 1)])
        if (idx < 0).any():
            from ase.data import chemical_symbols

            z = int(numbers[np.nonzero(idx < 0)[0][0]])
            name = chemical_symbols[z] if 0 < z < len(chemical_symbols) else f"Z={z}"
            raise InputError(f"{where}: field 'numbers': element {name} is not in the species list "
                             f"{symbols}")
        if not np.all(np.isfinite(pos)):
            raise InputError(f"{where}: field 'positions' contains non-finite values")
        try:
            i, j, S = neighbor_list(pos, cell, pbc, cutoff, backend=neighbor_backend)
        except ValueError as exc:
            raise InputError(f"{where}: field 'cell'/'pbc': {exc}") from None
        pos_l.append(pos)
        spec_l.append(idx)
        struct_l.append(np.full(n, b, dtype=np.int64))
        f = getattr(s, "forces", None)
        if f is not None:
            forces_l.append(np.asarray(f, dtype=np.float64).reshape(n, 3))
            has_forces[b] = True
        else:
            forces_l.append(np.zeros((n, 3)))
        pi_l.append(i + offset)
        pj_l.append(j + offset)
        ps_l.append(S.astype(np.float64) @ cell)
        natoms[b] = n
        cells[b] = cell
        pbcs[b] = pbc
        energy[b] = float(getattr(s, "energy", np.nan))
        weight[b] = float(getattr(s, "weight", 1.0))
        index[b] = int(sidx if sidx is not None else -1)
        offset += n

    def cat(lst, shape, dt):
        return np.concatenate(lst) if lst else np.zeros(shape, dtype=dt)

    N = offset
    pair_i = cat(pi_l, (0,), np.int64)
    counts = np.bincount(pair_i, minlength=N)
    ptr = np.zeros(N + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    dev = torch.device(device)
    t = lambda a, dt: torch.as_tensor(a, dtype=dt).to(dev)  # noqa: E731
    return Batch(
        positions=t(cat(pos_l, (0, 3), np.float64), dtype),
        species=t(cat(spec_l, (0,), np.int64), torch.long),
        structure=t(cat(struct_l, (0,), np.int64), torch.long),
        n_structures=B,
        natoms=t(natoms, torch.long),
        cell=t(cells, dtype),
        pbc=t(pbcs, torch.bool),
        pair_i=t(pair_i, torch.long),
        pair_j=t(cat(pj_l, (0,), np.int64), torch.long),
        pair_shift=t(cat(ps_l, (0, 3), np.float64), dtype),
        pair_ptr=t(ptr, torch.long),
        energy=t(energy, torch.float64),
        forces=t(cat(forces_l, (0, 3), np.float64), torch.float64),
        has_forces=t(has_forces, torch.bool),
        weight=t(weight, torch.float64),
        index=t(index, torch.long),
    )
