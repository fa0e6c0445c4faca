"""What a potential saw in its training data, stored in the model file: the shortest distance per
element pair and the lowest energy per atom per composition.

A data-driven potential knows nothing below the shortest distances of its training data and
nothing below its lowest energies; MD that goes there is extrapolating (docs/robustness.md).
The trainer computes this record over the training structures (:func:`record_from_structures`
per rank, :func:`merge_records` over the ranks), :meth:`BPNN.save` writes it into the model
file's metadata (``metadata["training_data"]``), and ``md-check`` and the ASE calculator compare
MD frames with it (:func:`pairs_below`, :func:`lowest_energy_per_atom`).

Record layout (JSON-compatible)::

    {"n_structures": 100, "cutoff_A": 5.0,
     "pair_min_distance_A": {"Au-Cu": 2.31, "Cu-Cu": 2.20, "Au-Au": null},   # null: never within cutoff
     "energy_per_atom_min": {"AuCu3": -0.051, "Cu": 0.012}}                  # eV/atom, by reduced formula

Pairs are keyed with the elements in alphabetical order; a pair never closer than the cutoff
(``null``) means the model never saw those two elements interact at all.
"""
from __future__ import annotations

import math
from functools import reduce

import numpy as np

RECORD_KEY = "training_data"
# pairs closer than this (A) are atoms on top of each other: NaN descriptors, zero ZBL radii
COINCIDENT_A = 0.01
# a warm start's new data whose lowest energies per atom lie further than this (eV/atom, median
# over the compositions both hold) from the model's training data have another energy zero:
# samplings of one composition differ by tenths at most, DFT codes and settings by eV
ENERGY_ZERO_WARN_EV = 0.5


def pair_key(a: str, b: str) -> str:
    return "-".join(sorted((a, b)))


def reduced_formula(numbers) -> str:
    """Hill-like reduced formula with the counts divided by their gcd ('AuCu3', 'C3H4O3', 'Cu')."""
    from ase.data import chemical_symbols

    z, c = np.unique(np.asarray(numbers, dtype=np.int64), return_counts=True)
    g = reduce(math.gcd, [int(x) for x in c]) if len(c) else 1
    parts = sorted((chemical_symbols[int(a)], int(n) // g) for a, n in zip(z, c))
    return "".join(s + (str(n) if n > 1 else "") for s, n in parts)


def structure_pair_minima(numbers, positions, cell, pbc, cutoff: float) -> dict:
    """{pair key: shortest distance} of one structure, pairs closer than ``cutoff`` only
    (periodic images included)."""
    from ase.data import chemical_symbols

    from ..descriptors.neighbors import neighbor_list, type_minima

    z = np.asarray(numbers, dtype=np.int64)
    kinds, types = np.unique(z, return_inverse=True)
    m = type_minima(positions, cell, pbc, cutoff, types.reshape(-1), len(kinds)) if len(z) else None
    if m is not None:       # the compiled search: no pair list written (docs/results.md, seventh session)
        return {pair_key(chemical_symbols[int(kinds[a])], chemical_symbols[int(kinds[b])]): float(m[a, b])
                for a in range(len(kinds)) for b in range(a, len(kinds)) if np.isfinite(m[a, b])}
    i, j, S = neighbor_list(positions, cell, pbc, cutoff, sort=False)
    out: dict = {}
    if len(i) == 0:
        return out
    pos = np.asarray(positions, dtype=np.float64)
    d = np.linalg.norm(pos[j] - pos[i] + S @ np.asarray(cell, dtype=np.float64).reshape(3, 3), axis=1)
    zi, zj = np.minimum(z[i], z[j]), np.maximum(z[i], z[j])
    code = zi * 1000 + zj
    for c in np.unique(code):
        a, b = int(c // 1000), int(c % 1000)
        out[pair_key(chemical_symbols[a], chemical_symbols[b])] = float(d[code == c].min())
    return out


def _group_key(s) -> tuple:
    pbc = np.broadcast_to(np.asarray(s.pbc, dtype=bool), (3,))
    return len(s.numbers), np.asarray(s.numbers, dtype=np.int64).tobytes(), tuple(bool(x) for x in pbc)


def _group_rows(group, cols: dict, cutoff: float) -> np.ndarray:
    """[B, len(cols)] shortest distance per pair key of each structure of ``group`` (same atoms
    and periodicity; inf where a pair is absent or beyond the cutoff), float64."""
    from ase.data import chemical_symbols

    from ..descriptors.neighbors import dense_pair_minima

    rows = np.full((len(group), len(cols)), np.inf)
    d2 = dense_pair_minima(group, cutoff)
    if d2 is None:
        for r, s in enumerate(group):
            for k, d in structure_pair_minima(s.numbers, s.positions, s.cell, s.pbc, cutoff).items():
                if k in cols:
                    rows[r, cols[k]] = d
        return rows
    z = np.asarray(group[0].numbers, dtype=np.int64)
    code = (np.minimum(z[:, None], z[None, :]) * 1000 + np.maximum(z[:, None], z[None, :])).ravel()
    flat = d2.reshape(len(group), -1)
    for c in np.unique(code):
        k = pair_key(chemical_symbols[int(c // 1000)], chemical_symbols[int(c % 1000)])
        if k in cols:
            rows[:, cols[k]] = np.sqrt(flat[:, code == c].min(axis=1))
    return rows


def record_from_structures(structures, species, cutoff: float, minima: list | None = None) -> dict:
    """Partial record of an iterable of :class:`~distmlip.data.structure.Structure`.
    ``minima``: a list that receives each structure's shortest distance per pair key (the
    keys' order of the record's ``pair_min_distance_A``; inf where the pair is absent or
    beyond the cutoff) as float32 rows, in blocks of up to 4096 structures (``np.concatenate``
    gives one row per structure; a block, not a row object per structure: millions of
    structures), for callers that need them per structure (the trainer: which structures ZBL
    cannot reach).  Structures with the same atoms and periodicity (a data set's subsets) are
    measured together (:func:`~distmlip.descriptors.neighbors.dense_pair_minima`)."""
    pairs = {pair_key(a, b): None for k, a in enumerate(species) for b in species[k:]}
    col = {k: c for c, k in enumerate(pairs)}
    best = np.full(len(col), np.inf)
    emin: dict = {}
    n = 0
    blocks: list = []

    def measure(group):
        rows = _group_rows(group, col, cutoff)
        np.minimum(best, rows.min(axis=0) if len(rows) else best, out=best)
        e = np.array([float(s.energy) for s in group])
        ok = np.isfinite(e)
        natoms = len(group[0].numbers)
        if ok.any() and natoms:
            form = reduced_formula(group[0].numbers)
            low = float(e[ok].min()) / natoms
            if form not in emin or low < emin[form]:
                emin[form] = low
        return rows

    def flush(chunk):
        # the chunk's structures grouped by atoms and periodicity wherever they stand (a rank's
        # share comes in shuffled order: runs of one subset were a structure or two long, and
        # each group a call, for 4-atom cells of three elements), rows back in input order
        groups: dict = {}
        for i, s in enumerate(chunk):
            groups.setdefault(_group_key(s), []).append(i)
        rows = np.empty((len(chunk), len(col)))
        for idx in groups.values():
            rows[idx] = measure([chunk[i] for i in idx])
        if minima is not None:
            # rounded down: a row may only understate a distance (compared in float64: numpy
            # would compare a float32 with a float in float32)
            f = rows.astype(np.float32)
            blocks.append(np.where(f.astype(np.float64) > rows, np.nextafter(f, np.float32(0)), f))

    chunk: list = []
    for s in structures:
        n += 1
        chunk.append(s)
        if len(chunk) >= 4096:
            flush(chunk)
            chunk = []
    if chunk:
        flush(chunk)
    if minima is not None and blocks:
        rows = np.concatenate(blocks)
        minima.extend(rows[a:a + 4096] for a in range(0, len(rows), 4096))
    for k, c in col.items():
        if np.isfinite(best[c]):
            pairs[k] = float(best[c])
    return {"n_structures": n, "cutoff_A": float(cutoff), "pair_min_distance_A": pairs,
            "energy_per_atom_min": emin}


def merge_records(records: list) -> dict:
    """Element-wise minimum of partial records (one per rank, or a fine-tuned model's first and
    new data).  A record that names its data (``data``: content ids of the data sets) adds its
    structure count only for data not already counted: a fine-tuning run on its model's own
    training data does not double the count (the aenet export writes it into the headers)."""
    records = [r for r in records if r]
    if not records:
        return {}
    seen: list = []
    count = 0
    for r in records:
        ids = list(r.get("data") or [])
        if not ids or not all(i in seen for i in ids):
            count += int(r.get("n_structures", 0))
        seen += [i for i in ids if i not in seen]
    out = {"n_structures": count,
           "cutoff_A": min(float(r["cutoff_A"]) for r in records),
           "pair_min_distance_A": {}, "energy_per_atom_min": {}}
    if seen:
        out["data"] = seen
    for r in records:
        for k, v in r["pair_min_distance_A"].items():
            cur = out["pair_min_distance_A"].get(k)
            out["pair_min_distance_A"][k] = v if cur is None else (cur if v is None else min(cur, v))
        for k, v in r["energy_per_atom_min"].items():
            cur = out["energy_per_atom_min"].get(k)
            out["energy_per_atom_min"][k] = v if cur is None else min(cur, v)
    return out


def formula_energy(formula: str, per_element: dict) -> float:
    """Sum over a reduced formula's atoms of ``per_element`` [eV], per atom ('AuCu3' with
    {Au: a, Cu: c}: (a + 3 c) / 4); elements not in ``per_element`` count 0."""
    from ase.formula import Formula

    count = Formula(formula).count()
    n = sum(count.values())
    return sum(c * float(per_element.get(el, 0.0)) for el, c in count.items()) / max(n, 1)


def shift_energies(record: dict, per_element: dict) -> dict:
    """``record`` with its lowest energies per atom moved by ``per_element`` [eV per atom of each
    element]: the record of the same structures with an element's energy zero moved (a warm start
    that adopts new reference energies; merged with the new data's record, the old energies in
    the old zero would have counted as the lowest)."""
    if not record or not any(per_element.values()):
        return record
    out = dict(record)
    out["energy_per_atom_min"] = {k: v + formula_energy(k, per_element)
                                  for k, v in (record.get("energy_per_atom_min") or {}).items()}
    return out


def energy_zero_offset(old: dict | None, new: dict | None) -> tuple[float, int] | None:
    """(median over the compositions both records hold of new - old lowest energy per atom, how
    many) or None when they share none: eV per atom by which a new data set's energies lie from
    the ones a model was trained on.  Lowest energies of one composition from two samplings
    agree to tenths of an eV per atom; another DFT code or setting moves all of them by eV."""
    a = (old or {}).get("energy_per_atom_min") or {}
    b = (new or {}).get("energy_per_atom_min") or {}
    common = [k for k in a if k in b and a[k] is not None and b[k] is not None]
    if not common:
        return None
    return float(np.median([b[k] - a[k] for k in common])), len(common)


def dataset_record(ds, indices, species, cutoff: float, ctx=None, chunk: int = 512,
                   minima: list | None = None) -> dict:
    """Record of ``ds`` structures ``indices`` (this rank's share), merged over ``ctx``'s ranks;
    ``minima`` as in :func:`record_from_structures` (this rank's structures, in ``indices`` order)."""
    indices = np.asarray(indices, dtype=np.int64)
    # read in file order (a rank's share is shuffled: reads of scattered structures were most of
    # the pass on 10^5 small cells), the rows put back in ``indices`` order
    order = np.argsort(indices, kind="stable")
    ordered = indices[order]

    def structures():
        # by spans of the file: a span's wanted structures read as one slab of the span where
        # they are dense enough (ds.read reads each run of consecutive indices as its own slab,
        # about 0.3 ms per run: a scattered 10 % validation share cost as much as the other 90 %)
        span = 8 * chunk
        a = 0
        while a < len(ordered):
            lo = int(ordered[a])
            b = int(np.searchsorted(ordered, lo + span))
            want = ordered[a:b]
            if len(want) * 16 >= span:
                block = ds.read(np.arange(lo, int(want[-1]) + 1))
                keep = np.zeros(len(block), dtype=bool)
                keep[want - lo] = True
                yield from (st for st, k in zip(block, keep) if k)
            else:
                for c in range(0, len(want), chunk):
                    yield from ds.read(want[c:c + chunk])
            a = b

    rows: list | None = [] if minima is not None else None
    part = record_from_structures(structures(), list(species), cutoff, rows)
    if rows:
        got = np.concatenate(rows)
        back = np.empty_like(got)
        back[order] = got
        minima.extend(back[a:a + 4096] for a in range(0, len(back), 4096))
    parts = ctx.all_gather_object(part) if ctx is not None and ctx.world_size > 1 else [part]
    return merge_records(parts)


def describe(record: dict) -> str:
    """One line for the log: shortest distances per pair, lowest energy per atom."""
    if not record:
        return "no training-data record"
    # the pairs never within the cutoff once, after the others: with many elements they are most
    # pairs (11 elements: 44 of 66), and each with its own ">= cutoff" buried the distances that exist
    items = sorted(record["pair_min_distance_A"].items())
    far = [k for k, v in items if v is None]
    pairs = ", ".join(f"{k} {v:.3f} A" for k, v in items if v is not None)
    if far:
        what = f"never within {record['cutoff_A']:.2f} A: {' '.join(far)}"
        pairs = f"{pairs}; {what}" if pairs else what
    em = record.get("energy_per_atom_min") or {}
    energies = ", ".join(f"{k} {v:.4f}" for k, v in sorted(em.items())[:6]) + (" ..." if len(em) > 6 else "")
    return (f"training data ({record['n_structures']} structures): shortest distances {pairs}; "
            f"lowest energy per atom (eV) {energies}")


# ---------------------------------------------------------------------------------- checks
def pair_minima_table(record: dict, species) -> np.ndarray:
    """[T, T] shortest training distance for the model's species order (``cutoff`` where the
    pair never came closer than the cutoff, nan without a record)."""
    T = len(species)
    tab = np.full((T, T), np.nan)
    if not record:
        return tab
    pm = record.get("pair_min_distance_A") or {}
    for a in range(T):
        for b in range(T):
            k = pair_key(species[a], species[b])
            if k in pm:
                tab[a, b] = float(record["cutoff_A"]) if pm[k] is None else float(pm[k])
    return tab


def pairs_below(record: dict, numbers, i, j, d) -> dict:
    """{pair key: shortest distance} of the pairs (i, j, d) that are shorter than the
    training data's shortest distance of their element pair (empty without a record)."""
    from ase.data import chemical_symbols

    if not record or len(d) == 0:
        return {}
    pm = record.get("pair_min_distance_A") or {}
    cut = float(record.get("cutoff_A", 0.0))
    z = np.asarray(numbers, dtype=np.int64)
    zi, zj = np.minimum(z[i], z[j]), np.maximum(z[i], z[j])
    code = zi * 1000 + zj
    out = {}
    for c in np.unique(code):
        k = pair_key(chemical_symbols[int(c // 1000)], chemical_symbols[int(c % 1000)])
        if k not in pm:
            continue
        lim = cut if pm[k] is None else float(pm[k])
        dm = float(d[code == c].min())
        # the record's minima pass through float32 blocks: a training structure itself must not
        # count as below its own data ("2.446 A is shorter than 2.446 A")
        if dm < lim * (1.0 - 1e-6):
            out[k] = dm
    return out


def lowest_energy_per_atom(record: dict, numbers):
    """The training data's lowest energy per atom of the composition of ``numbers``, or None
    when the record has no structure of that composition."""
    if not record:
        return None
    return (record.get("energy_per_atom_min") or {}).get(reduced_formula(numbers))
