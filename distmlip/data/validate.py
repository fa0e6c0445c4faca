"""Validation of structures before they enter a data set.

``check_structure`` returns a list of problems (field, reason); ``validate`` raises InputError
naming the file, the structure (frame) and the field, or collects rejections when invalid
structures are to be skipped.  Missing forces are allowed (recorded as has_forces False)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .structure import Structure

DEFAULT_MIN_DISTANCE = 0.5  # Angstrom


@dataclass
class Rejection:
    source: str
    source_index: int
    field: str
    reason: str

    def as_dict(self) -> dict:
        return {"source": self.source, "structure": self.source_index, "field": self.field,
                "reason": self.reason}

    def __str__(self) -> str:
        return f"{self.source}: structure {self.source_index}: field '{self.field}': {self.reason}"


def _periodic_volume(cell: np.ndarray, pbc: np.ndarray) -> float:
    """Volume (3 periodic), area (2) or length (1) spanned by the periodic lattice vectors."""
    vecs = cell[np.asarray(pbc, dtype=bool)]
    gram = vecs @ vecs.T
    return float(np.sqrt(max(np.linalg.det(gram), 0.0)))


def min_interatomic_distance(s: Structure, cutoff: float) -> tuple[float, int, int]:
    """Smallest distance below ``cutoff`` (minimum-image aware, self images included) as
    (d, i, j); (inf, -1, -1) when no pair is closer than ``cutoff``."""
    pos = np.asarray(s.positions, dtype=np.float64)
    n = len(pos)
    pbc = np.asarray(s.pbc, dtype=bool)
    if not pbc.any():
        if n < 2:
            return float("inf"), -1, -1
        if n <= 2000:
            d = np.sqrt(((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1))
            iu = np.triu_indices(n, 1)
            dd = d[iu]
            k = int(np.argmin(dd))
            if dd[k] < cutoff:
                return float(dd[k]), int(iu[0][k]), int(iu[1][k])
            return float("inf"), -1, -1
        from scipy.spatial import cKDTree

        pairs = cKDTree(pos).query_pairs(cutoff, output_type="ndarray")
        if len(pairs) == 0:
            return float("inf"), -1, -1
        dd = np.linalg.norm(pos[pairs[:, 0]] - pos[pairs[:, 1]], axis=1)
        k = int(np.argmin(dd))
        return float(dd[k]), int(pairs[k, 0]), int(pairs[k, 1])
    from ase.neighborlist import primitive_neighbor_list

    i, j, d = primitive_neighbor_list("ijd", pbc, np.asarray(s.cell, dtype=np.float64), pos,
                                      cutoff, self_interaction=False)
    if len(d) == 0:
        return float("inf"), -1, -1
    k = int(np.argmin(d))
    return float(d[k]), int(i[k]), int(j[k])


def check_structure(s: Structure, min_distance: float = DEFAULT_MIN_DISTANCE) -> list[tuple[str, str]]:
    """Problems of one structure as [(field, reason)]; empty when valid."""
    probs: list[tuple[str, str]] = []
    numbers = np.asarray(s.numbers)
    n = len(numbers)
    if n == 0:
        return [("positions", "structure has no atoms")]
    if np.any(numbers < 1) or np.any(numbers > 118):
        bad = numbers[(numbers < 1) | (numbers > 118)][0]
        probs.append(("numbers", f"unknown element (atomic number {int(bad)})"))
    pos = np.asarray(s.positions)
    if pos.shape != (n, 3):
        return probs + [("positions", f"shape {pos.shape}, expected ({n}, 3)")]
    if not np.all(np.isfinite(pos)):
        a = int(np.argwhere(~np.isfinite(pos))[0, 0])
        probs.append(("positions", f"non-finite position of atom {a}"))
    e = s.energy
    if e is None or np.isnan(e):
        probs.append(("energy", "missing energy"))
    elif not np.isfinite(e):
        probs.append(("energy", f"non-finite energy {e}"))
    if s.forces is not None:
        f = np.asarray(s.forces)
        if f.shape != (n, 3):
            probs.append(("forces", f"shape {f.shape}, expected ({n}, 3)"))
        elif not np.all(np.isfinite(f)):
            a = int(np.argwhere(~np.isfinite(f))[0, 0])
            probs.append(("forces", f"non-finite force on atom {a}"))
    cell = np.asarray(s.cell, dtype=np.float64)
    pbc = np.asarray(s.pbc, dtype=bool)
    if s.stress is not None:
        st = np.asarray(s.stress)
        if st.shape != (3, 3):
            probs.append(("stress", f"shape {st.shape}, expected (3, 3)"))
        elif not np.all(np.isfinite(st)):
            probs.append(("stress", f"non-finite stress {st.reshape(-1).tolist()}"))
        elif not pbc.any():
            probs.append(("stress", ("stress on a non-periodic structure (pbc all False): a stress needs "
                                     "a periodic cell")))
    if cell.shape != (3, 3) or not np.all(np.isfinite(cell)):
        probs.append(("cell", "cell is not a finite 3x3 matrix"))
        return probs
    if pbc.any():
        vol = _periodic_volume(cell, pbc)
        scale = max(float(np.abs(cell[pbc]).max()), 1e-300) ** int(pbc.sum())
        if not vol > 1e-8 * scale or vol < 1e-6:
            probs.append(("cell", f"zero volume of the periodic cell under pbc={pbc.tolist()}"))
            return probs
    if min_distance and min_distance > 0 and np.all(np.isfinite(pos)):
        d, i, j = min_interatomic_distance(s, min_distance)
        if d < min_distance:
            what = "its own periodic image" if i == j else f"atom {j}"
            probs.append(("positions", f"atom {i} is {d:.4f} A from {what} "
                                       f"(closer than min_distance {min_distance} A)"))
    return probs


def validate(structures: list[Structure], min_distance: float = DEFAULT_MIN_DISTANCE,
             skip_invalid: bool = False) -> tuple[list[Structure], list[Rejection]]:
    """Return (valid structures, rejections).  Without ``skip_invalid`` the first problem
    raises InputError naming file, structure and field."""
    good: list[Structure] = []
    rejected: list[Rejection] = []
    for s in structures:
        probs = check_structure(s, min_distance)
        if not probs:
            good.append(s)
            continue
        rej = [Rejection(s.source, s.source_index, f, r) for f, r in probs]
        if not skip_invalid:
            raise InputError(str(rej[0]) + (f" (and {len(rej) - 1} more problem(s))" if len(rej) > 1 else "")
                             + "; use --skip-invalid to drop invalid structures")
        rejected.extend(rej)
    return good, rejected
