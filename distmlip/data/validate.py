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
    fast = _min_distance_images(pos, np.asarray(s.cell, dtype=np.float64), pbc, cutoff)
    if fast is not None:
        return fast
    from ase.neighborlist import primitive_neighbor_list

    i, j, d = primitive_neighbor_list("ijd", pbc, np.asarray(s.cell, dtype=np.float64), pos,
                                      cutoff, self_interaction=False)
    if len(d) == 0:
        return float("inf"), -1, -1
    k = int(np.argmin(d))
    return float(d[k]), int(i[k]), int(j[k])


def _min_distance_images(pos, cell, pbc, cutoff: float, max_atoms: int = 2000, max_images: int = 125):
    """Smallest distance below ``cutoff`` over all pairs and periodic images, by enumerating
    the few images that can be that close (vectorised, O(n^2)): ASE's general neighbour list
    costs about a millisecond of Python per structure, which dominated converting millions of
    small cells.  None when the cell is singular, the structure large or the cell so thin that
    many images would be needed (the caller falls back to ASE)."""
    n = len(pos)
    if n > max_atoms or abs(np.linalg.det(cell)) < 1e-12:
        return None
    inv = np.linalg.inv(cell)                        # column k: reciprocal vector of row k of cell
    h = 1.0 / np.linalg.norm(inv, axis=0)            # heights of the cell
    # wrapped fractional differences lie in [-1/2, 1/2]; an image n_k can be closer than the
    # cut-off only if |n_k| <= cutoff / h_k + 1/2
    nmax = np.where(pbc, np.floor(cutoff / h + 0.5), 0).astype(int)
    if np.prod(2 * nmax + 1) > max_images:
        return None
    rng = [np.arange(-m, m + 1) for m in nmax]
    imgs = np.stack(np.meshgrid(*rng, indexing="ij"), -1).reshape(-1, 3).astype(np.float64)
    off = imgs @ cell                                # [I, 3]
    zero = int(np.flatnonzero(~imgs.any(1))[0])
    frac = pos @ inv
    best = (float("inf"), -1, -1)
    c2 = cutoff * cutoff
    step = max(1, 200000 // max(1, n * len(imgs)))
    for a in range(0, n, step):
        df = frac[None, :, :] - frac[a:a + step, None, :]       # [b, n, 3]: j - i
        df[..., pbc] -= np.round(df[..., pbc])
        d = (df @ cell)[:, :, None, :] + off[None, None]        # [b, n, I, 3]
        r2 = np.einsum("...k,...k->...", d, d)
        ii = np.arange(a, min(a + step, n))
        r2[ii - a, ii, zero] = np.inf                           # an atom and itself
        r2[ii[:, None] - a > np.arange(n)[None, :] - a] = np.inf   # j < i: counted as (j, i)
        k = int(np.argmin(r2))
        if r2.flat[k] < c2 and r2.flat[k] < best[0] ** 2:
            bi, j, _ = np.unravel_index(k, r2.shape)
            best = (float(np.sqrt(r2.flat[k])), int(a + bi), int(j))
    return best


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
        probs.append(("energy", "missing energy (no energy in the frame, or NaN)"))
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
        if s.stress is not None and not pbc.all() and not cells_with_volume(cell[None])[0]:
            # a stress is the virial over the cell volume: a slab or wire whose non-periodic cell
            # vectors are zero has none, so the model predicts no stress for it (zero) and the
            # label was compared with that zero in training and evaluate, silently
            probs.append(("stress", f"stress on a structure whose cell has no volume (pbc={pbc.tolist()}, a "
                                    "non-periodic cell vector is zero or dependent): give the cell the "
                                    "stress was computed with"))
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


def energy_force_outliers(structures, z_max: float = 25.0, min_eV: float = 0.1, k: int = 5,
                          partners: int = 64, seed: int = 0, cell_tol: float = 0.02) -> tuple[list[tuple[int, float]], float]:
    """Structures whose energy disagrees with their forces and their neighbours' energies
    (``energy_force_check``).  Returns ([(position in ``structures``, score eV)], median score eV)."""
    c = energy_force_check(structures, z_max, min_eV, k, partners, seed, cell_tol)
    return c.bad, c.typical


@dataclass
class LabelConsistency:
    """What ``energy_force_check`` found: the suspect structures, the typical residual, and the
    partner pairs' energy differences ``dE`` with the work ``work`` = -(F_i + F_j)/2 . (x_j - x_i)
    (plus the strain work where both carry a stress) that should equal them (``unit_slope`` fits one against the other)."""
    bad: list
    typical: float
    dE: np.ndarray
    work: np.ndarray
    pairs: np.ndarray = None      # [P, 2] positions in ``structures`` of each pair (i, j)


def _stress_helps(X, F, E, cells, W, pbc) -> bool:
    """Whether adding the strain work V sigma : eps to the forces' work brings consecutive
    structures' energy differences closer (median over the pairs with stresses whose cells
    differ; positions in fractional coordinates on the mean cell, as in energy_force_check)."""
    ok = np.flatnonzero(np.isfinite(W).all(axis=(1, 2)))
    a, b = ok[:-1], ok[1:]
    keep = np.abs(cells[b] - cells[a]).max(axis=(1, 2)) > 0
    a, b = a[keep], b[keep]
    if len(a) == 0:
        return False
    per = cells[:, pbc, :]
    frac = np.einsum("gak,gkl->gal", X, np.linalg.pinv(per))
    df = frac[b] - frac[a]
    df -= np.round(df)
    d = np.einsum("pak,pkl->pal", df, 0.5 * (cells[a] + cells[b])[:, pbc, :])
    work = -(0.5 * (F[a] + F[b]) * d).sum(axis=(1, 2))
    dh = cells[b] - cells[a]
    sw = 0.5 * (np.einsum("pkm,pkl,plm->p", W[a], np.linalg.inv(cells[a]), dh)
                + np.einsum("pkm,pkl,plm->p", W[b], np.linalg.inv(cells[b]), dh))
    dE = E[b] - E[a]
    return bool(np.median(np.abs(dE - work - sw)) < np.median(np.abs(dE - work)))


# Pairs farther apart than this (RMS displacement per atom, A) give the unit check nothing: the
# trapezoid rule assumes a path short against the curvature of the forces.  Snapshots of liquid
# water, whose nearest partners differ by whole molecules moved by Angstroms, had exact labels
# reported as a unit slip (docs/results.md, sweep 23).
UNIT_PAIR_MAX_STEP = 0.5


def energy_force_check(structures, z_max: float = 25.0, min_eV: float = 0.1, k: int = 5,
                       partners: int = 64, seed: int = 0, cell_tol: float = 0.02,
                       max_step: float = UNIT_PAIR_MAX_STEP) -> LabelConsistency:
    """Structures whose energy disagrees with their forces and their neighbours' energies.

    For two structures i, j of one atom order in the same cell, the trapezoid rule along the
    straight path gives E_j - E_i = -(F_i + F_j) / 2 . (x_j - x_i) up to third order in the
    displacement (minimum image in periodic directions).  Cells that differ by up to
    ``cell_tol`` (relative) are compared in fractional coordinates on their mean cell, and the
    strain term V sigma : eps is added to the work where both structures carry a stress (fully
    periodic cells); without stresses it is left out (a few meV for a 1 % strain of a 100 A^3
    cell at 1 GPa, but tenths of an eV at tens of GPa).
    A structure's score is the median |residual| over its ``k`` nearest partners (RMS displacement; ``partners`` drawn at random
    when there are more); one whose score is more than ``z_max`` robust standard deviations
    (1.4826 x the median absolute deviation of the scores) and ``min_eV`` above the median
    score carries a wrong energy or wrong forces (a label off by 100 eV, an energy per atom
    among totals, forces of 1e3 eV/A: sweep 7).  Why not the GPR's leave-one-out errors: a
    GPR fitted to the wrong label spreads it over its neighbours, and the largest LOO error was
    not the bad structure's.  Structures without forces, or with no partner in the same cell,
    get no score.  The pairs scored (each structure with its ``k`` nearest partners) that lie
    within ``max_step`` (RMS displacement per atom, A) are returned too, for the global unit
    check (``unit_slope``)."""
    S = list(structures)
    n = len(S)
    score = np.full(n, np.nan)
    pair_dE: list[np.ndarray] = []
    pair_work: list[np.ndarray] = []
    pair_ij: list[np.ndarray] = []
    if n < 5:
        return LabelConsistency([], float("nan"), np.zeros(0), np.zeros(0), np.zeros((0, 2), np.int64))
    rng = np.random.default_rng(seed)
    cells = np.stack([np.asarray(s.cell, dtype=np.float64) for s in S])
    flat = cells.reshape(n, 9)
    # one key per (atom order, periodicity): only structures with the same key are compared
    keys = np.array([hash((np.asarray(s.numbers).tobytes(), np.asarray(s.pbc, bool).tobytes())) for s in S])
    has_f = np.array([s.forces is not None for s in S])
    groups: dict = {}
    for i in range(n):
        if has_f[i]:
            groups.setdefault(keys[i], []).append(i)
    for members in groups.values():
        m = np.asarray(members)
        if len(m) < 2:
            continue
        X = np.stack([np.asarray(S[j].positions, np.float64) for j in m])           # [g, n_at, 3]
        Fo = np.stack([np.asarray(S[j].forces, np.float64) for j in m])
        E = np.array([float(S[j].energy) for j in m])
        pbc = np.asarray(S[m[0]].pbc, dtype=bool)
        # V sigma of each structure with a stress (fully periodic only: a slab's stress counts the
        # vacuum vector's strain, which the path below does not apply), NaN without one
        W = np.full((len(m), 3, 3), np.nan)
        if pbc.all():
            for a, j in enumerate(m):
                if S[j].stress is not None:
                    W[a] = abs(np.linalg.det(cells[j])) * np.asarray(S[j].stress, np.float64)
        # the stresses are used where they explain the energies better than the forces alone: a
        # stress in another unit (kbar read as eV/A^3) would otherwise be blamed on the energies
        # and forces by the unit check
        use_stress = np.isfinite(W).all(axis=(1, 2)).sum() >= 2 and _stress_helps(X, Fo, E, cells[m], W, pbc)
        if pbc.any():
            # fractional coordinates along the periodic vectors only, and what is left of each
            # position (the part outside their span: a slab's height, in any orientation; the
            # Cartesian component of the non-periodic axis index was taken before, wrong for a
            # rotated slab, sweep 13)
            per = cells[m][:, pbc, :]                                               # [g, k, 3]
            frac = np.einsum("gak,gkl->gal", X, np.linalg.pinv(per))
            rest = X - np.einsum("gak,gkl->gal", frac, per)
        else:
            frac = None
        for a, i in enumerate(m):
            size = max(float(np.linalg.norm(flat[i])), 1e-12)
            cand = np.flatnonzero(np.linalg.norm(flat[m] - flat[i], axis=1) <= cell_tol * size)
            cand = cand[cand != a]
            if len(cand) == 0:
                continue
            if len(cand) > partners:
                cand = rng.choice(cand, size=partners, replace=False)
            d = X[cand] - X[a]                                                     # [p, n_at, 3]
            if frac is not None:
                df = frac[cand] - frac[a]
                df -= np.round(df)
                c = 0.5 * (cells[i] + cells[m[cand]])[:, pbc, :]
                d = np.einsum("pak,pkl->pal", df, c) + (rest[cand] - rest[a])
            f = 0.5 * (Fo[a] + Fo[cand])
            work = -(f * d).sum(axis=(1, 2))
            # the energy of the strain between the two cells, V sigma : eps with eps = h^-1 dh at
            # either end (trapezoid): at tens of GPa it outweighs the forces' work of a 0.03 A
            # rattle between cells 2 % apart (consistent EMT labels read as a unit slip: sweep 17)
            strained = np.isfinite(W[a]).all() & np.isfinite(W[cand]).all(axis=(1, 2))
            if strained.any() and use_stress:
                dh = cells[m[cand]] - cells[i]                                      # [p, 3, 3]
                ea = np.einsum("kl,plm->pkm", np.linalg.inv(cells[i]), dh)
                eb = np.einsum("pkl,plm->pkm", np.linalg.inv(cells[m[cand]]), dh)
                sw = 0.5 * (np.einsum("km,pkm->p", np.nan_to_num(W[a]), ea)
                            + np.einsum("pkm,pkm->p", np.nan_to_num(W[cand]), eb))
                work = work + np.where(strained, sw, 0.0)
            res = np.abs((E[cand] - E[a]) - work)
            dist = np.sqrt((d * d).sum(2).mean(1))
            near = np.argsort(dist)[:k]
            score[i] = float(np.median(res[near]))
            near = near[dist[near] <= max_step]
            pair_dE.append(E[cand[near]] - E[a])
            pair_work.append(work[near])
            pair_ij.append(np.stack([np.full(len(near), i), m[cand[near]]], 1))
    bad, med = robust_outliers(score, z_max, min_eV)
    cat = (lambda v, shape=(0,): np.concatenate(v) if v else np.zeros(shape))
    return LabelConsistency([(i, float(score[i])) for i in bad], med, cat(pair_dE), cat(pair_work),
                            cat(pair_ij, (0, 2)).astype(np.int64))


# The slope of the partner pairs' energy differences against their forces' work
# (``unit_slope``).  Consistent labels measured 0.92-1.005 (medians; the 95 % ranges lay within
# 0.88-1.04): EMT Cu/Au sets rattled in cells up to 3 % apart, slab MD, the EC-dimer DFT set
# (1.005).  Below 1 where partners' cells differ and carry no stress (the strain term is then
# left out); with stresses it is in the work (strained EMT Cu/Ni cells: 1.02, sweep 17).  A unit slip moves
# it by a fixed factor: Hartree energies with eV/A forces 0.035, Ha with Ha/Bohr 1.82 (sweep 15).
# The band's edges lie near the geometric means of 1 and the closest slips (0.529, 1.89), and a
# slope is judged only when its whole 95 % range lies outside the band: strained sets whose
# pairs' work barely predicts dE (lattice constants 2 % apart, compressed cells) gave medians of
# -15 and 3.3 with ranges that span the band.  The trapezoid rule fails on large steps of a
# steep curve: 8 Cu dimers 0.2 A apart (2.2-2.8 A) gave 0.47 (0.38..0.61) on their 14 judged
# pairs, hence a slope is judged on 30 pairs at least (a unit slip shows in any subset).
UNIT_SLOPE_BAND = (0.7, 1.35)
UNIT_SLOPE_MIN_PAIRS = 30          # pairs with the larger half of |work| (the ones judged)
HARTREE, RYDBERG, BOHR, KCAL_MOL, KJ_MOL = 27.211386, 13.605693, 0.529177, 1.0 / 23.0605, 1.0 / 96.4853
UNIT_FACTORS = (
    (1.0 / HARTREE, "energies in Hartree with forces in eV/A (factor 1/27.211)"),
    (1.0 / RYDBERG, "energies in Rydberg with forces in eV/A (factor 1/13.606)"),
    (1.0 / BOHR, "forces per Bohr (Ha/Bohr, Ry/Bohr or eV/Bohr, a factor 1/0.529 on the work) with the energies' "
                 "own unit"),
    (BOHR, "forces per Angstrom taken for per Bohr, or positions in Bohr (factor 0.529)"),
    (HARTREE / BOHR, "energies in eV with forces in Hartree/Bohr (factor 51.42)"),
    (1.0 / KCAL_MOL, "energies in kcal/mol with forces in eV/A (factor 23.06)"),
    (KCAL_MOL, "forces in kcal/mol/A with energies in eV (factor 1/23.06)"),
    (1.0 / KJ_MOL, "energies in kJ/mol with forces in eV/A (factor 96.49)"),
    (KJ_MOL, "forces in kJ/mol/A with energies in eV (factor 1/96.49)"),
    (-1.0, "forces of the wrong sign (energy gradients stored as forces)"),
)


@dataclass
class UnitSlope:
    slope: float            # median of dE / work over the pairs judged
    low: float              # its 95 % range (order statistics of the median)
    high: float
    pairs: int              # pairs judged
    example: tuple          # (i, j, dE, work) of the pair with the median ratio (positions as given)

    @property
    def suspect(self) -> bool:
        lo, hi = UNIT_SLOPE_BAND
        return self.pairs >= UNIT_SLOPE_MIN_PAIRS and (self.high < lo or self.low > hi)

    def likely(self, natoms: int | None = None) -> str | None:
        """The unit slip whose factor lies closest to the slope (within 30 %), or None."""
        cands = list(UNIT_FACTORS)
        if natoms and natoms > 1:
            cands.append((1.0 / natoms, f"energies per atom with forces per structure (factor 1/{natoms} atoms)"))
        best, what = np.inf, None
        for f, text in cands:
            if f * self.slope > 0:
                d = abs(np.log(self.slope / f))
                if d < min(best, np.log(1.3)):
                    best, what = d, text
        return what


def unit_slope_warning(u: UnitSlope, where: str, name, natoms: int | None = None) -> str:
    """The warning for a suspect ``unit_slope``: ``where`` names the file (and subset), ``name(i)``
    a structure by its position."""
    i, j, de, w = u.example
    likely = u.likely(natoms)
    lo, hi = UNIT_SLOPE_BAND
    return (f"{where}: fields 'energy' and 'forces' disagree in units: over {u.pairs} pairs of nearby structures the "
            f"energy differences are {u.slope:.3g} x the work of the forces -F.dx (95 % range {u.low:.3g}..{u.high:.3g}; "
            f"labels in one unit system give 0.9-1.0, and {lo:g}..{hi:g} passes), e.g. {name(i)} and {name(j)}: "
            f"dE {de:.4g} eV, -F.dx {w:.4g} eV.  "
            + (f"Likely {likely}.  " if likely else "No common unit slip gives this factor.  ")
            + "distmlip reads energies in eV, forces in eV/A and positions in A: convert the labels before "
              "`distmlip convert` (ASE's readers convert DFT codes' output files)")


def _median_range(r_sorted) -> tuple[float, float]:
    """95 % range of the median of sorted values (order statistics, binomial normal approximation)."""
    n = len(r_sorted)
    h = 1.96 * np.sqrt(n) / 2
    return float(r_sorted[max(0, int(np.floor(n / 2 - h)))]), float(r_sorted[min(n - 1, int(np.ceil(n / 2 + h)))])


def unit_slope(dE, work, pairs=None) -> UnitSlope | None:
    """How many times the forces' work -F.dx the energy differences of the partner pairs are
    (``energy_force_check``): 1 for labels in one unit system.  The median ratio over the half of
    the pairs with the larger |work| (small work: the ratio is noise), robust to the few pairs
    of a wrong label, with its 95 % range; None without pairs."""
    dE, work = np.asarray(dE, np.float64), np.asarray(work, np.float64)
    ok = np.isfinite(dE) & np.isfinite(work) & (work != 0)
    if ok.sum() < 2:
        return None
    a = np.abs(work)
    use = np.flatnonzero(ok & (a >= np.median(a[ok])))
    r = dE[use] / work[use]
    o = np.argsort(r)
    n = len(r)
    lo, hi = _median_range(r[o])
    k = int(use[o[n // 2]])
    ex = (int(pairs[k, 0]), int(pairs[k, 1])) if pairs is not None and len(pairs) > k else (-1, -1)
    return UnitSlope(float(np.median(r)), float(lo), float(hi), int(n), ex + (float(dE[k]), float(work[k])))


# New labels against the predictions of the model whose MD found the structures (`explore`: an
# iteration brings a few labelled frames, too few partner pairs for ``unit_slope``).  Forces: per
# atom, the label projected on the prediction over the prediction's square: near 1 where the model
# is right, spread by its errors, and one fixed factor on every atom for a unit slip or a flipped
# sign; the median ignores the atoms the model gets badly wrong (what explore selects frames for).
# Energies: per frame, label / prediction per atom, judged only where the model's energies lie on
# an absolute scale (|E| / n >= ENERGY_LEVEL_MIN, e.g. DFT totals of -3 to -8 eV/atom, where a model
# error of a few 0.1 eV/atom moves the ratio by a few %); differences between frames failed: every
# explored frame carries the atoms the model gets wrong (a briefly trained committee gave 6 x on
# right labels of its collapsing MD frames, 1.7 x on the forces), and cohesive energies near zero
# say nothing either.  The bands lie well inside the slips they are for (Ry/Bohr 1/25.7, kcal/mol
# 23.1, the sign -1, Hartree and Rydberg energies 1/27.2 and 1/13.6); eV/Bohr (0.529) is too close
# to a model's scatter to be judged this way.
MODEL_RATIO_BAND = {"forces": (0.2, 5.0), "energy": (0.5, 2.0)}
MODEL_RATIO_MIN = {"forces": 20, "energy": 2}      # atoms, frames judged
ENERGY_LEVEL_MIN = 1.0                             # eV/atom
FORCE_LABEL_FACTORS = (
    (BOHR / HARTREE, "forces in Hartree/Bohr (factor 1/51.42)"),
    (BOHR / RYDBERG, "forces in Rydberg/Bohr (factor 1/25.71)"),
    (1.0 / KCAL_MOL, "forces in kcal/mol/A (factor 23.06)"),
    (1.0 / KJ_MOL, "forces in kJ/mol/A (factor 96.49)"),
    (1000.0, "forces in meV/A (factor 1000)"),
    (-1.0, "forces of the wrong sign (energy gradients stored as forces)"),
)
ENERGY_LABEL_FACTORS = (
    (1.0 / HARTREE, "energies in Hartree (factor 1/27.21)"),
    (1.0 / RYDBERG, "energies in Rydberg (factor 1/13.61)"),
    (1.0 / KCAL_MOL, "energies in kcal/mol (factor 23.06)"),
    (1.0 / KJ_MOL, "energies in kJ/mol (factor 96.49)"),
    (1000.0, "energies in meV (factor 1000)"),
)
_LABEL_UNITS = {"forces": ("eV/A", FORCE_LABEL_FACTORS, "atoms"),
                "energy": ("eV", ENERGY_LABEL_FACTORS, f"frames with |E| >= {ENERGY_LEVEL_MIN:g} eV/atom")}


@dataclass
class ModelRatio:
    field: str              # 'forces' or 'energy'
    n: int                  # items judged
    ratio: float            # median of label / prediction over them
    span: tuple             # its 95 % range (order statistics of the median)

    @property
    def low(self) -> float:
        return self.span[0]

    @property
    def high(self) -> float:
        return self.span[1]

    @property
    def suspect(self) -> bool:
        lo, hi = MODEL_RATIO_BAND[self.field]
        return self.n >= MODEL_RATIO_MIN[self.field] and (self.high < lo or self.low > hi)

    def likely(self) -> str | None:
        """The slips within a factor 2 of the ratio, closest first ("a or b"), or None: the
        model's own scale error moves the ratio, so Hartree/Bohr and Rydberg/Bohr, a factor 2
        apart, may both fit."""
        near = sorted((abs(np.log(self.ratio / f)), text) for f, text in _LABEL_UNITS[self.field][1]
                      if f * self.ratio > 0 and abs(np.log(self.ratio / f)) < np.log(2.0))
        return " or ".join(text for _, text in near) or None

    def describe(self) -> str:
        unit, _, what = _LABEL_UNITS[self.field]
        lo, hi = MODEL_RATIO_BAND[self.field]
        likely = self.likely()
        return (f"field '{self.field}': the labels are {self.ratio:.3g} x the model's predictions of the same "
                f"structures (median over {self.n} {what}, 95 % range {self.low:.3g}..{self.high:.3g}; labels in "
                f"{unit} give about 1, {lo:g}..{hi:g} passes)." + (f"  Likely {likely}." if likely else ""))


def ratio_to_model(label, pred, field: str = "forces") -> ModelRatio | None:
    """How many times the predictions ``pred`` the labels ``label`` are: rows [n, k] (``field``
    'forces': a force per atom, k = 3; 'energy': an energy per atom, k = 1), each row's
    projection l.p / p.p, median over the half of the rows with the larger |p| (a small prediction
    makes the ratio noise), with its 95 % range; None without such rows."""
    lab = np.asarray(label, np.float64).reshape(len(label), -1)
    p = np.asarray(pred, np.float64).reshape(len(pred), -1)
    pp = (p * p).sum(1)
    ok = np.isfinite(pp) & np.isfinite(lab).all(1) & (pp > 0)
    if ok.sum() < 1:
        return None
    use = np.flatnonzero(ok & (pp >= np.median(pp[ok])))
    r = np.sort((lab[use] * p[use]).sum(1) / pp[use])
    return ModelRatio(field, len(r), float(np.median(r)), _median_range(r))


def labels_against_model(labels, predictions) -> list[ModelRatio]:
    """``ratio_to_model`` of the forces and (where the model's energies lie on an absolute scale)
    the energies per atom: ``labels`` and ``predictions`` are lists of (energy, forces or None,
    n_atoms) per structure, in the same order.  Returns the ratios that could be formed."""
    fl, fp, el, ep = [], [], [], []
    for (e, f, n), (q, g, _) in zip(labels, predictions):
        if f is not None and g is not None:
            fl.append(np.asarray(f, np.float64).reshape(-1, 3))
            fp.append(np.asarray(g, np.float64).reshape(-1, 3))
        if np.isfinite(e) and np.isfinite(q) and n > 0 and abs(q) / n >= ENERGY_LEVEL_MIN:
            el.append(e / n)
            ep.append(q / n)
    out = [ratio_to_model(np.concatenate(fl), np.concatenate(fp), "forces") if fl else None,
           ratio_to_model(np.asarray(el), np.asarray(ep), "energy") if el else None]
    return [u for u in out if u is not None]


# Per-atom force outliers (``force_outliers``).  The scale is the median |F| of an element's
# atoms (exact zeros left out: fixed atoms), so a few wrong atoms do not move it.  Clean sets
# measured max |F| / median up to 6.3 (EMT sets, slab MD, the EC dimers) and 36.7 (Cu cells
# compressed to 0.78 a0); two atoms set to 100-140 eV/A among 320 gave 115 and 53.  Forces of a
# structure sum to about zero (|sum F| / max |F| below 3e-7 on every clean set): a large force that
# the others do not balance is a wrong label, not a close contact, and is flagged at 20 x; any
# atom at 100 x is flagged.
FORCE_OUTLIER_RATIO = 100.0
FORCE_OUTLIER_RATIO_UNBALANCED = 20.0
FORCE_OUTLIER_MIN_ATOMS = 20          # atoms of an element needed for its median


def cells_with_volume(cells) -> np.ndarray:
    """[S] bool: cells [S, 3, 3] whose volume is not zero against their size (a stress needs one:
    the virial is divided by it; a slab or wire stored with zero non-periodic vectors has none)."""
    c = np.asarray(cells, dtype=np.float64).reshape(-1, 3, 3)
    size = np.abs(c).max(axis=(1, 2))
    return np.abs(np.linalg.det(c)) > 1e-8 * size ** 3


def rare_element_scales(scale: dict, present, overall: float | None) -> dict:
    """``scale`` ({Z: median |F|} of the elements with FORCE_OUTLIER_MIN_ATOMS atoms or more)
    completed for the other elements ``present`` with ``overall``, the median |F| of all atoms:
    a few adsorbate or dopant atoms had no median and their forces were never judged (a
    100 eV/A label on one of them was trained on).  The thresholds are 20-100 x the scale, far
    beyond the factor of a few between elements' typical forces."""
    out = dict(scale)
    if overall is not None and overall > 0:
        for e in present:
            out.setdefault(int(e), float(overall))
    return out


def force_outliers(structures, scale: dict | None = None) -> tuple[list[dict], dict[int, float]]:
    """Atoms whose force is far beyond their element's typical force (see FORCE_OUTLIER_RATIO).
    ``scale``: {Z: median |F|} measured elsewhere (a whole data set, when ``structures`` are the
    few suspects); default: from ``structures``.  Returns ([{position, atom, Z, force, scale, net}]
    by decreasing ratio, {Z: median |F| eV/A})."""
    mags, zs = [], []
    S = [s for s in structures if s.forces is not None]
    for s in S:
        mags.append(np.linalg.norm(np.asarray(s.forces, np.float64), axis=1))
        zs.append(np.asarray(s.numbers))
    if not mags:
        return [], dict(scale or {})
    if scale is None:
        f, z = np.concatenate(mags), np.concatenate(zs)
        good = (f > 0) & np.isfinite(f)
        scale = {}
        for e in np.unique(z):
            fe = f[(z == e) & good]
            if len(fe) >= FORCE_OUTLIER_MIN_ATOMS:
                scale[int(e)] = float(np.median(fe))
        scale = rare_element_scales(scale, np.unique(z[good]), float(np.median(f[good]))
                                    if good.sum() >= FORCE_OUTLIER_MIN_ATOMS else None)
    out = []
    pos = [k for k, s in enumerate(structures) if s.forces is not None]
    for k, s, m, zz in zip(pos, S, mags, zs):
        sc = np.array([scale.get(int(e), np.inf) for e in zz])
        over = m > FORCE_OUTLIER_RATIO_UNBALANCED * sc
        if not over.any():
            continue
        net = float(np.linalg.norm(np.asarray(s.forces, np.float64).sum(0)))
        for a in np.flatnonzero(over):
            if m[a] > FORCE_OUTLIER_RATIO * sc[a] or net >= 0.5 * m[a]:
                out.append({"position": k, "atom": int(a), "Z": int(zz[a]), "force": float(m[a]),
                            "scale": float(sc[a]), "net": net})
    out.sort(key=lambda o: -o["force"] / o["scale"])
    return out, scale


def robust_outliers(values, z_max: float, floor: float, two_sided: bool = False) -> tuple[list[int], float]:
    """Positions of ``values`` (NaN: not judged) more than ``z_max`` robust standard deviations
    (1.4826 x the median absolute deviation) and ``floor`` above their median (or away from it,
    ``two_sided``), and the median; none with fewer than 5 finite values or ``z_max`` <= 0."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    if ok.sum() < 5 or not z_max > 0:
        return [], float("nan")
    med = float(np.median(v[ok]))
    mad = 1.4826 * float(np.median(np.abs(v[ok] - med)))
    dev = np.abs(v - med) if two_sided else v - med
    bad = ok & (dev > floor) & (dev > z_max * max(mad, 1e-12))
    return [int(i) for i in np.flatnonzero(bad)], med
