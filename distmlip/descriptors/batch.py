"""Collation of structures into one batch-global graph (atoms + neighbour pairs).

See docs/DESIGN.md, section "Batch".  Pairs are batch-global, both directions are present and
they are sorted by centre atom ``pair_i``; ``batch.pair_ptr`` [N + 1] holds the CSR offsets
(pairs of atom a are ``pair_ptr[a]:pair_ptr[a+1]``).  ``r_ij = positions[j] - positions[i] +
pair_shift``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple, Sequence

import numpy as np
import torch

from ..errors import InputError
from .neighbors import neighbor_list

__all__ = ["Batch", "Graph", "GraphStore", "cell_volumes", "collate", "collate_graphs", "prepare", "species_symbols",
           "species_table", "strained", "stress_from_virial"]


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
    # pairs (indices into pair_i) closer than the short_range the structures were prepared with
    # (GraphStore(short_range=...)), found once per structure; None: not computed
    short_pairs: torch.Tensor | None = None
    stress: torch.Tensor | None = None      # [B, 3, 3] float64 eV/A^3, ASE sign (zeros where missing)
    has_stress: torch.Tensor | None = None  # [B] bool

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


def strained(batch: Batch, strain: torch.Tensor) -> Batch:
    """The batch under a homogeneous strain ``strain`` [B, 3, 3] per structure (row vectors:
    x -> x (1 + eps)): positions and pair shifts as differentiable functions of the batch's
    positions and of ``strain``.  At strain 0 the values are the batch's; the gradient of an
    energy with respect to ``strain`` is dE/d(eps) = sum_pairs r_ij (x) dE/dr_ij, the virial
    that the stress is made of (:func:`cell_volumes`; ``BPNN.energy_forces_stress``)."""
    import dataclasses

    eps = strain.to(batch.positions.dtype)
    sh = batch.pair_shift.to(batch.positions.dtype)
    if batch.n_structures == 1:        # (most calculator and benchmark calls): no per-row gather
        pos = batch.positions + batch.positions @ eps[0]
        shift = sh + sh @ eps[0]
    else:
        pos = batch.positions + (batch.positions.unsqueeze(2) * eps[batch.structure]).sum(1)
        shift = sh + (sh.unsqueeze(2) * eps[batch.structure[batch.pair_i]]).sum(1)
    return dataclasses.replace(batch, positions=pos, pair_shift=shift)


def stress_from_virial(W: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Stress [B, 3, 3] float64 (eV/A^3, ASE's sign) from the virial W = dE/d(strain) [B, 3, 3]:
    sym(W) / V, zero for structures without a periodic direction (:func:`cell_volumes`)."""
    vol = cell_volumes(batch)
    inv = torch.where(vol > 0, 1.0 / vol.clamp(min=1e-300), torch.zeros_like(vol))
    W = W.to(torch.float64)
    return 0.5 * (W + W.transpose(1, 2)) * inv[:, None, None]


def cell_volumes(batch: Batch) -> torch.Tensor:
    """|det(cell)| [B] float64 of the structures of a batch; 0 for structures without a periodic
    direction (no stress is defined for them)."""
    if batch.cell.device.type == "cpu":
        # numpy on the few structures of a batch: torch's per-call cost was most of the stress
        # term of a training step
        c = batch.cell.detach().numpy().astype(np.float64, copy=False)
        vol = np.abs(np.linalg.det(c)) * batch.pbc.numpy().any(1)
        return torch.from_numpy(vol)
    vol = torch.linalg.det(batch.cell.to(torch.float64)).abs()
    return torch.where(batch.pbc.any(1), vol, torch.zeros_like(vol))


class Graph(NamedTuple):
    """One structure prepared for batching: species indices, positions and its neighbour pairs
    (local atom indices, sorted as :func:`neighbor_list` sorts them, and integer image shifts in
    the smallest integer type that holds them).  Computed once per structure (:class:`GraphStore`)
    and concatenated into batches by :func:`collate_graphs`: training data never move, so their
    neighbour lists need not be rebuilt every epoch."""
    species: np.ndarray        # [n] int8/int16 index into the species list
    positions: np.ndarray      # [n, 3] float64
    forces: np.ndarray | None  # [n, 3] float64
    cell: np.ndarray           # [3, 3] float64
    pbc: np.ndarray            # [3] bool
    pair_i: np.ndarray         # [P] int32
    pair_j: np.ndarray         # [P] int32
    shift: np.ndarray | None   # [P, 3] small integer image shifts; None when all are zero
    energy: float
    weight: float
    index: int
    short_pairs: np.ndarray | None = None   # [S] int32 pairs closer than prepare()'s short_range
    stress: np.ndarray | None = None   # [3, 3] float64 eV/A^3 (ASE sign)

    @property
    def nbytes(self) -> int:
        # the arrays' data plus what Python holds per structure (about 128 bytes per array
        # object, 300 for the tuple and its numbers): measured 3.47 kB per 4-atom cell against
        # 2.35 kB counted before, so a budget of small structures overran by half
        arrays = [a for a in (self.species, self.positions, self.forces, self.cell, self.pbc,
                              self.pair_i, self.pair_j, self.shift, self.short_pairs, self.stress) if a is not None]
        return sum(a.nbytes for a in arrays) + 128 * len(arrays) + 300


def species_table(species):
    """(symbols, Z -> species index) of a species list, for :func:`prepare`."""
    from ase.data import atomic_numbers

    symbols = species_symbols(species)
    z_to_idx = np.full(119, -1, dtype=np.int64)
    for k, s in enumerate(symbols):
        z_to_idx[atomic_numbers[s]] = k
    return symbols, z_to_idx


def prepare(s, table, cutoff: float, where: str = "structure", neighbor_backend: str | None = None,
            short_range=0.0, pairs=None, short_clear: bool = False) -> Graph:
    """A :class:`Graph` of one structure (``Structure`` or any object with ``numbers, positions,
    cell, pbc`` and optionally ``energy, forces, weight, index``).  ``table``: :func:`species_table`.
    ``short_range`` > 0 (a distance, or a [T, T] array of distances per pair of species indices):
    also the pairs closer than that (``short_pairs``; a short-range term such as ZBL then looks
    at those only instead of every pair in every step).  ``pairs``: the structure's
    :func:`neighbor_list` when the caller has it already (:func:`prepare_many`).  ``short_clear``:
    the caller knows that no pair is closer than ``short_range`` (the training record's
    per-structure minima): the short pairs are none, without measuring every pair."""
    symbols, z_to_idx = table
    numbers = np.asarray(s.numbers, dtype=np.int64).reshape(-1)
    n = len(numbers)
    pos = np.asarray(s.positions, dtype=np.float64).reshape(n, 3)
    cell = np.asarray(s.cell, dtype=np.float64).reshape(3, 3)
    pbc = np.broadcast_to(np.asarray(s.pbc, dtype=bool), (3,)).copy()
    bad = (numbers <= 0) | (numbers >= len(z_to_idx))
    idx = np.where(bad, -1, z_to_idx[np.clip(numbers, 0, len(z_to_idx) - 1)])
    if (idx < 0).any():
        from ase.data import chemical_symbols

        z = int(numbers[np.nonzero(idx < 0)[0][0]])
        name = chemical_symbols[z] if 0 < z < len(chemical_symbols) else f"Z={z}"
        raise InputError(f"{where}: field 'numbers': element {name} is not in the species list {symbols}")
    if not np.all(np.isfinite(pos)):
        raise InputError(f"{where}: field 'positions' contains non-finite values")
    try:
        i, j, S = neighbor_list(pos, cell, pbc, cutoff, backend=neighbor_backend) if pairs is None else pairs
    except ValueError as exc:
        raise InputError(f"{where}: field 'cell'/'pbc': {exc}") from None
    shift = None
    if len(S) and S.any():
        m = int(np.abs(S).max())
        shift = S.astype(np.int8 if m < 128 else np.int16 if m < 32768 else np.int32)
    short = None
    if short_clear and short_range is not None and np.any(np.asarray(short_range) > 0):
        short = np.zeros(0, dtype=np.int32)
    elif short_range is not None and np.any(np.asarray(short_range) > 0):
        d = pos[j] - pos[i] + (S @ cell if shift is not None else 0.0)
        r = np.asarray(short_range, dtype=np.float64)
        if r.ndim == 2:        # a radius per pair of species indices
            r = r[idx[i], idx[j]]
        short = np.flatnonzero(np.einsum("ij,ij->i", d, d) < r * r).astype(np.int32)
    f = getattr(s, "forces", None)
    st = getattr(s, "stress", None)
    sidx = getattr(s, "index", -1)
    return Graph(species=idx.astype(np.int8 if len(symbols) < 128 else np.int16),
                 positions=pos, forces=None if f is None else np.asarray(f, dtype=np.float64).reshape(n, 3),
                 cell=cell, pbc=pbc, pair_i=i.astype(np.int32), pair_j=j.astype(np.int32), shift=shift,
                 energy=float(getattr(s, "energy", np.nan)), weight=float(getattr(s, "weight", 1.0)),
                 index=int(sidx if sidx is not None else -1), short_pairs=short,
                 stress=None if st is None else np.asarray(st, dtype=np.float64).reshape(3, 3))


def prepare_many(structures, table, cutoff: float, short_range=0.0, where=None, short_clear=None) -> list[Graph]:
    """:func:`prepare` of each structure, the neighbour lists of structures with the same atom
    count and periodicity (a data set's subsets) computed together where that is
    faster (:func:`~distmlip.descriptors.neighbors.dense_neighbor_lists`: molecules and small
    cells); the same graphs.  ``where``: callable (structure, position) -> its name in errors;
    ``short_clear``: per structure, :func:`prepare`'s flag (None: measure every structure)."""
    from .neighbors import dense_neighbor_lists

    where = where or _where
    structures = list(structures)
    # grouped wherever they stand (a shuffled batch holds short runs of each subset)
    groups: dict = {}
    for k, s in enumerate(structures):
        key = (len(s.numbers), tuple(np.broadcast_to(np.asarray(s.pbc, dtype=bool), (3,)).tolist()))
        groups.setdefault(key, []).append(k)
    out: list = [None] * len(structures)
    for idx in groups.values():
        group = [structures[k] for k in idx]
        lists = dense_neighbor_lists(group, cutoff) if len(group) > 1 else None
        for n, k in enumerate(idx):
            out[k] = prepare(structures[k], table, cutoff, where(structures[k], k), short_range=short_range,
                             pairs=None if lists is None else lists[n],
                             short_clear=bool(short_clear[k]) if short_clear is not None else False)
    return out


def _where(s, b: int) -> str:
    src = getattr(s, "source", "") or ""
    sidx = getattr(s, "index", -1)
    return f"structure {b} of the batch" + (f" (data-set index {sidx})" if sidx is not None and sidx >= 0 else "") \
        + (f" from {src}" if src else "")


def collate_graphs(graphs: Sequence[Graph], dtype: torch.dtype = torch.float64, device="cpu") -> Batch:
    """Concatenate prepared structures into one :class:`Batch` (atom and pair indices offset,
    pairs stay sorted by centre)."""
    B = len(graphs)
    natoms = np.fromiter((len(g.species) for g in graphs), dtype=np.int64, count=B)
    npairs = np.fromiter((len(g.pair_i) for g in graphs), dtype=np.int64, count=B)
    N, P = int(natoms.sum()), int(npairs.sum())
    aoff = np.zeros(B, dtype=np.int64)
    if B:
        np.cumsum(natoms[:-1], out=aoff[1:])
    pair_off = np.repeat(aoff, npairs)
    if P:
        pair_i = np.concatenate([g.pair_i for g in graphs]).astype(np.int64) + pair_off
        pair_j = np.concatenate([g.pair_j for g in graphs]).astype(np.int64) + pair_off
    else:
        pair_i = pair_j = np.zeros(0, np.int64)
    cells = np.stack([g.cell for g in graphs]) if B else np.zeros((0, 3, 3))
    shifts = np.zeros((P, 3))
    if any(g.shift is not None for g in graphs):
        poff = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(npairs, out=poff[1:])
        for b, g in enumerate(graphs):
            if g.shift is not None:
                shifts[poff[b]:poff[b + 1]] = g.shift.astype(np.float64) @ g.cell
    short = None
    if B and all(g.short_pairs is not None for g in graphs):
        poff = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(npairs, out=poff[1:])
        short = np.concatenate([g.short_pairs.astype(np.int64) + poff[b] for b, g in enumerate(graphs)])
    counts = np.bincount(pair_i, minlength=N)
    ptr = np.zeros(N + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    has_forces = np.fromiter((g.forces is not None for g in graphs), dtype=bool, count=B)
    forces = np.concatenate([g.forces if g.forces is not None else np.zeros((len(g.species), 3))
                             for g in graphs]) if B else np.zeros((0, 3))
    has_stress = np.fromiter((g.stress is not None for g in graphs), dtype=bool, count=B)
    stress = np.zeros((B, 3, 3))
    if has_stress.any():
        for b in np.flatnonzero(has_stress):
            stress[b] = graphs[b].stress
    dev = torch.device(device)
    if dev.type == "cpu":
        def t(a, dt):
            x = torch.from_numpy(np.ascontiguousarray(a))
            return x if x.dtype == dt else x.to(dt)
    else:
        def t(a, dt):
            return torch.as_tensor(a, dtype=dt).to(dev)
    return Batch(
        positions=t(np.concatenate([g.positions for g in graphs]) if B else np.zeros((0, 3)), dtype),
        species=t(np.concatenate([g.species for g in graphs]).astype(np.int64) if B else np.zeros(0, np.int64),
                  torch.long),
        structure=t(np.repeat(np.arange(B, dtype=np.int64), natoms), torch.long),
        n_structures=B,
        natoms=t(natoms, torch.long),
        cell=t(cells, dtype),
        pbc=t(np.stack([g.pbc for g in graphs]) if B else np.zeros((0, 3), bool), torch.bool),
        pair_i=t(pair_i, torch.long),
        pair_j=t(pair_j, torch.long),
        pair_shift=t(shifts, dtype),
        pair_ptr=t(ptr, torch.long),
        energy=t(np.fromiter((g.energy for g in graphs), dtype=np.float64, count=B), torch.float64),
        forces=t(forces, torch.float64),
        has_forces=t(has_forces, torch.bool),
        weight=t(np.fromiter((g.weight for g in graphs), dtype=np.float64, count=B), torch.float64),
        index=t(np.fromiter((g.index for g in graphs), dtype=np.int64, count=B), torch.long),
        short_pairs=None if short is None else t(short, torch.long),
        stress=t(stress, torch.float64),
        has_stress=t(has_stress, torch.bool),
    )


def collate(structures: Sequence, species, cutoff: float, dtype: torch.dtype = torch.float64,
            device="cpu", neighbor_backend: str | None = None) -> Batch:
    """Build a :class:`Batch` from a list of ``distmlip.data.structure.Structure`` (or any object
    with ``numbers, positions, cell, pbc`` and optionally ``energy, forces, weight, index``).

    ``species``: the model's element list (symbols or atomic numbers); ``batch.species`` indexes
    it.  ``cutoff``: neighbour cutoff (the largest descriptor cutoff).  An element that is not in
    ``species`` raises :class:`InputError` naming the structure.  The same code path as the
    training batches (:func:`prepare`, :func:`collate_graphs`)."""
    table = species_table(species)
    graphs = (prepare_many(structures, table, cutoff) if neighbor_backend is None else
              [prepare(s, table, cutoff, _where(s, b), neighbor_backend) for b, s in enumerate(structures)])
    return collate_graphs(graphs, dtype, device)


class GraphStore:
    """The prepared structures of a data set, each computed once and kept while they fit in
    ``max_bytes`` (beyond that, structures are prepared again whenever used, so memory stays
    bounded by the budget, not by the data set).  One writer thread (the stream's prefetch) and
    readers of the returned lists."""

    def __init__(self, ds, species, cutoff: float, max_bytes: int = 2 << 30, short_range=0.0, short_clear=None):
        self.ds = ds
        self.short_range = short_range      # see prepare()
        # [n_structures] bool or None: structures with no pair inside short_range (prepare())
        self.short_clear = short_clear
        self.table = species_table(species)
        self.cutoff = float(cutoff)
        self.max_bytes = int(max_bytes)
        self._g: dict[int, Graph] = {}
        self.nbytes = 0
        self.full = False

    def __len__(self) -> int:
        return len(self._g)

    def cheap(self, indices) -> bool:
        """Whether every structure at ``indices`` is prepared already (then a batch is a
        concatenation: no reading, no neighbour lists, nothing to do in a background thread)."""
        g = self._g
        return all(int(i) in g for i in indices)

    def __call__(self, indices) -> list[Graph]:
        return self.graphs(indices)

    def graphs(self, indices) -> list[Graph]:
        """Prepared structures at the data-set ``indices`` (read and prepared where missing)."""
        idx = [int(i) for i in indices]
        missing = sorted({i for i in idx if i not in self._g})
        fresh: dict[int, Graph] = {}
        if missing:
            clear = None if self.short_clear is None else self.short_clear[np.asarray(missing, dtype=np.int64)]
            for g in prepare_many(self.ds.read(missing), self.table, self.cutoff, self.short_range, short_clear=clear):
                fresh[g.index] = g
                if not self.full:
                    if self.nbytes + g.nbytes <= self.max_bytes:
                        self._g[g.index] = g
                        self.nbytes += g.nbytes
                    else:
                        self.full = True
        return [self._g.get(i) or fresh[i] for i in idx]


def batch_nbytes(batch) -> int:
    """Bytes of the tensors of a batch (a :class:`Batch` or any object holding tensors)."""
    return sum(v.numel() * v.element_size() for v in vars(batch).values() if isinstance(v, torch.Tensor))


class KeptBatches:
    """Assembled batches by their index set, kept while they fit in ``max_bytes`` (then no more
    are added): with fixed batches every epoch asks for the same index sets, so a batch is
    assembled once.  The one home of keeping batches, for :class:`BatchStore` and the
    cached-descriptor loader.  The batches returned are shared: users must not change their
    fields in place (the trainer replaces, it does not mutate)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._b: dict[bytes, object] = {}
        self.nbytes = 0
        self.full = self.max_bytes <= 0

    @staticmethod
    def _key(indices) -> bytes:
        return np.asarray(indices, dtype=np.int64).tobytes()

    def __contains__(self, indices) -> bool:
        return bool(self._b) and self._key(indices) in self._b

    def get(self, indices, make):
        """The kept batch of ``indices``, else ``make()`` (kept if it fits)."""
        k = self._key(indices) if self._b or not self.full else None
        b = self._b.get(k) if k is not None else None
        if b is None:
            b = make()
            if not self.full:
                size = batch_nbytes(b)
                if self.nbytes + size <= self.max_bytes:
                    self._b[k] = b
                    self.nbytes += size
                else:
                    self.full = True
        return b


class BatchStore:
    """Assembled batches kept for reuse (:class:`KeptBatches`, ``max_bytes``) on top of a
    :class:`GraphStore`: beyond the budget batches are assembled whenever used.  A loader of the
    training stream: ``store(indices) -> Batch``."""

    def __init__(self, graphs: GraphStore, max_bytes: int, dtype: torch.dtype = torch.float64, device="cpu"):
        self.graphs = graphs
        self.kept = KeptBatches(max_bytes)
        self.dtype, self.device = dtype, device

    def cheap(self, indices) -> bool:
        return indices in self.kept or self.graphs.cheap(indices)

    def __call__(self, indices) -> Batch:
        return self.kept.get(indices, lambda: collate_graphs(self.graphs(indices), self.dtype, self.device))
