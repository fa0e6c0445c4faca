"""Neighbour lists against an independent brute-force O(N^2 x images) enumeration written here."""
from __future__ import annotations

import itertools
import math
import zlib

import numpy as np
import pytest

from distmlip.descriptors import neighbors as nl
from distmlip.descriptors.neighbors import neighbor_list, pair_offsets
from helpers import rattled_copies

def _have(backend):
    if backend == "matscipy":
        try:
            import matscipy.neighbours  # noqa: F401
            return True
        except Exception:
            return False
    return backend in nl.available_backends()


def brute_pairs(pos, cell, pbc, rc):
    """Set of (i, j, s0, s1, s2) by enumerating every image translation that can matter."""
    pos = np.asarray(pos, float)
    cell = np.asarray(cell, float)
    rng = []
    for d in range(3):
        if not pbc[d]:
            rng.append([0])
            continue
        # distance between lattice planes spanned by the two other vectors
        a, b = cell[(d + 1) % 3], cell[(d + 2) % 3]
        nrm = np.cross(a, b)
        h = abs(np.dot(cell[d], nrm)) / np.linalg.norm(nrm)
        # positions may lie outside the cell: add the spread of their projections
        proj = pos @ nrm / np.linalg.norm(nrm)
        k = int(math.ceil((rc + proj.max() - proj.min()) / h)) + 1
        rng.append(range(-k, k + 1))
    out = set()
    n = len(pos)
    for s in itertools.product(*rng):
        t = np.asarray(s, float) @ cell
        d = np.linalg.norm(pos[None, :, :] + t - pos[:, None, :], axis=-1)   # d[i, j]
        if not any(s):
            d[np.arange(n), np.arange(n)] = np.inf
        for i, j in zip(*np.nonzero(d < rc)):
            out.add((int(i), int(j)) + tuple(int(x) for x in s))
    return out


def random_case(rng, kind):
    n = int(rng.integers(1, 9))
    if kind == "molecule":
        pos = rng.normal(size=(n, 3)) * 2.0
        return pos, np.zeros((3, 3)), np.zeros(3, bool), float(rng.uniform(1.5, 5.0))
    while True:
        cell = rng.normal(size=(3, 3)) * rng.uniform(0.3, 2.5) + np.eye(3) * rng.uniform(1.5, 6.0)
        h = np.abs(np.linalg.det(cell)) / np.array(
            [np.linalg.norm(np.cross(cell[(d + 1) % 3], cell[(d + 2) % 3])) for d in range(3)])
        if h.min() > 1.0:
            break
    if kind == "small":          # cell smaller than the cutoff: several images, self images
        rc = float(h.max() * rng.uniform(1.2, 2.2))
    else:
        rc = float(rng.uniform(1.0, 4.0))
    pbc = np.ones(3, bool) if kind != "mixed" else rng.random(3) < 0.5
    frac = rng.random((n, 3)) + rng.integers(-1, 2, size=(n, 3)) * (rng.random((n, 3)) < 0.2)
    pos = frac @ cell            # some atoms outside the cell on purpose
    return pos, cell, pbc, rc


@pytest.mark.parametrize("backend", ["compiled", "numpy", "vesin", "matscipy", "ase"])
@pytest.mark.parametrize("kind", ["triclinic", "small", "mixed", "molecule"])
def test_against_brute_force(backend, kind):
    if not _have(backend):
        pytest.skip(f"{backend} not installed")
    rng = np.random.default_rng(zlib.crc32(f"{backend}-{kind}".encode()))
    for _ in range(6):
        pos, cell, pbc, rc = random_case(rng, kind)
        i, j, S = neighbor_list(pos, cell, pbc, rc, backend=backend)
        got = set(zip(i.tolist(), j.tolist(), *S.T.tolist()))
        assert len(got) == len(i), "duplicate pairs"
        assert got == brute_pairs(pos, cell, pbc, rc), (backend, kind, pbc, rc)


def test_output_conventions_default_backend():
    rng = np.random.default_rng(3)
    pos, cell, pbc, rc = random_case(rng, "small")
    i, j, S = neighbor_list(pos, cell, pbc, rc)
    assert i.dtype == np.int64 and j.dtype == np.int64 and S.dtype == np.int64 and S.shape == (len(i), 3)
    # sorted by (i, j, shift)
    keys = list(zip(i.tolist(), j.tolist(), *S.T.tolist()))
    assert keys == sorted(keys)
    # both directions
    assert set(keys) == {(b, a, -x, -y, -z) for a, b, x, y, z in keys}
    # no atom paired with itself at zero shift; an atom can neighbour its own images here
    assert not np.any((i == j) & ~S.any(axis=1))
    assert np.any(i == j)
    d = np.linalg.norm(pos[j] - pos[i] + S @ cell, axis=1)
    assert np.all(d < rc)
    ptr = pair_offsets(i, len(pos))
    assert ptr[0] == 0 and ptr[-1] == len(i)
    for a in range(len(pos)):
        assert np.all(i[ptr[a]:ptr[a + 1]] == a)


def test_backends_identical_output():
    rng = np.random.default_rng(5)
    pos, cell, pbc, rc = random_case(rng, "triclinic")
    ref = np.column_stack(neighbor_list(pos, cell, pbc, rc, backend="numpy"))
    for b in ("compiled", "vesin", "matscipy", "ase", "brute"):
        if _have(b) or b == "brute":
            got = np.column_stack(neighbor_list(pos, cell, pbc, rc, backend=b))
            np.testing.assert_array_equal(got, ref)


def test_larger_bulk_numpy_vs_default():
    from ase.build import bulk

    at = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
    at.rattle(0.1, seed=0)
    a = np.column_stack(neighbor_list(at.positions, at.cell[:], at.pbc, 5.0, backend="numpy"))
    b = np.column_stack(neighbor_list(at.positions, at.cell[:], at.pbc, 5.0, backend="ase"))
    np.testing.assert_array_equal(a, b)
    assert len(a) > 108 * 40


def test_empty_and_isolated():
    i, j, S = neighbor_list(np.zeros((0, 3)), np.zeros((3, 3)), False, 5.0)
    assert len(i) == 0 and S.shape == (0, 3)
    i, j, S = neighbor_list(np.array([[0.0, 0, 0], [10.0, 0, 0]]), np.zeros((3, 3)), False, 5.0)
    assert len(i) == 0


def test_errors():
    with pytest.raises(ValueError, match="zero cell vector"):
        neighbor_list(np.zeros((2, 3)), np.zeros((3, 3)), True, 3.0)
    with pytest.raises(ValueError, match="cutoff"):
        neighbor_list(np.zeros((2, 3)), np.eye(3), False, -1.0)
    with pytest.raises(ValueError, match="far too small"):
        neighbor_list(np.random.default_rng(0).random((50, 3)) * 0.02, np.eye(3) * 0.02, True, 6.0)
    with pytest.raises(ValueError, match="unknown backend"):
        neighbor_list(np.zeros((2, 3)), np.eye(3), False, 3.0, backend="nope")


def test_auto_falls_back_to_numpy_without_vesin(monkeypatch):
    rng = np.random.default_rng(21)
    pos, cell, pbc, rc = random_case(rng, "small")
    monkeypatch.setattr(nl, "_have_vesin", lambda: False)
    monkeypatch.setattr(nl, "_COMPILED_CANDIDATES", 0)       # nor the compiled search
    assert "vesin" not in nl.available_backends()
    i, j, S = neighbor_list(pos, cell, pbc, rc)
    assert set(zip(i.tolist(), j.tolist(), *S.T.tolist())) == brute_pairs(pos, cell, pbc, rc)
    monkeypatch.setenv("DISTMLIP_NEIGHBORS", "bogus")
    with pytest.raises(ValueError, match="DISTMLIP_NEIGHBORS"):
        neighbor_list(pos, cell, pbc, rc)


def test_compiled_search_equals_cell_list_on_dft_sized_cells(monkeypatch):
    """The compiled pair search (the default for DFT-sized structures) gives the cell list's
    pairs in the same order, array for array, on rattled bulk, skewed non-reduced cells with
    unwrapped positions, slabs and wires with vacuum, a cell thinner than the cutoff and a
    molecule; "auto" hands a structure beyond the candidate limit to the cell list, with the
    same result."""
    from ase.build import bulk, fcc111, molecule

    if not _have("compiled"):
        pytest.skip("compiled extension not built")
    rng = np.random.default_rng(11)
    cases = []
    a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    a.rattle(0.1, seed=1)
    cases.append((a.positions, a.cell[:], a.pbc, 6.5))
    a = bulk("Au", "fcc", a=4.08).repeat((3, 2, 4))          # primitive: 60-degree cell
    a.rattle(0.1, seed=2)
    cell = a.cell[:].copy()
    cell[1] += 2 * cell[0]
    cell[2] += cell[0] - 3 * cell[1]                          # the same lattice, non-reduced
    pos = a.positions + rng.integers(-2, 3, size=(len(a), 1)) * cell[0]   # unwrapped
    cases.append((pos, cell, a.pbc, 6.0))
    s = fcc111("Pt", size=(3, 3, 4), vacuum=8.0)
    s.rattle(0.05, seed=3)
    cases.append((s.positions, s.cell[:], np.array([True, True, False]), 6.0))
    wire = s.cell[:].copy()
    cases.append((s.positions, wire, np.array([True, False, False]), 5.0))
    thin = np.diag([2.1, 9.0, 9.0]) + np.array([[0, 0.4, 0], [0, 0, 0], [0.3, 0, 0]])
    cases.append((rng.random((7, 3)) @ thin, thin, np.array([True, True, True]), 5.5))
    m = molecule("C6H6")
    cases.append((m.positions, np.zeros((3, 3)), np.zeros(3, bool), 4.0))
    for k, (pos, cell, pbc, rc) in enumerate(cases):
        ref = np.column_stack(neighbor_list(pos, cell, pbc, rc, backend="numpy"))
        got = np.column_stack(neighbor_list(pos, cell, pbc, rc, backend="compiled"))
        auto = np.column_stack(neighbor_list(pos, cell, pbc, rc))
        assert len(ref) > 0, k
        np.testing.assert_array_equal(got, ref, err_msg=f"case {k}")
        np.testing.assert_array_equal(auto, ref, err_msg=f"case {k}")
        # the record's per-type shortest distances without a pair list: the list's minima
        types = np.arange(len(pos)) % 3
        m = nl.type_minima(pos, cell, pbc, rc, types, 3)
        i, j, S = ref[:, 0], ref[:, 1], ref[:, 2:]
        d = np.linalg.norm(pos[j] - pos[i] + S @ np.asarray(cell, float).reshape(3, 3), axis=1)
        want = np.full((3, 3), np.inf)
        np.minimum.at(want, (types[i], types[j]), d)
        np.testing.assert_allclose(m, np.minimum(want, want.T), rtol=1e-14, atol=0, err_msg=f"case {k}")
    monkeypatch.setattr(nl, "_COMPILED_CANDIDATES", 10)
    pos, cell, pbc, rc = cases[1]
    np.testing.assert_array_equal(np.column_stack(neighbor_list(pos, cell, pbc, rc)),
                                  np.column_stack(neighbor_list(pos, cell, pbc, rc, backend="numpy")))
    assert nl.type_minima(pos, cell, pbc, rc, np.zeros(len(pos), int), 1) is None     # beyond the limit


def test_dense_neighbor_lists_equal_neighbor_list():
    """Neighbour lists of many small structures at once (``dense_neighbor_lists``: molecules,
    small and skewed periodic cells with unwrapped positions, a slab, cutoffs beyond half the
    cell) are the per-structure lists, pair for pair and in the same order; ``collate`` of such
    a group gives the same batch as one structure at a time."""
    import torch
    from ase.build import bulk, fcc111, molecule

    from distmlip.descriptors.batch import collate, collate_graphs, prepare, species_table
    from distmlip.descriptors.neighbors import dense_neighbor_lists, neighbor_list

    rng = np.random.default_rng(4)

    def rattled(a, count, skew=0.0, unwrap=False):
        return rattled_copies(a, count, rng, skew, unwrap)

    groups = [rattled(molecule("CH3CH2OH"), 40), rattled(bulk("Cu", "fcc", a=3.6), 20, 0.15, True),
              rattled(bulk("Cu", "fcc", a=3.6, cubic=True), 20), rattled(bulk("Mg", "hcp", a=3.2), 20, 0.15, True),
              rattled(fcc111("Cu", (2, 2, 3), vacuum=5.0), 10, 0.0, True)]
    dense = 0
    for group in groups:
        for cutoff in (3.0, 5.0):
            got = dense_neighbor_lists(group, cutoff)
            if got is None:
                continue
            dense += 1
            for g, s in zip(got, group):
                ref = neighbor_list(s.positions, s.cell, s.pbc, cutoff)
                for a, b in zip(g, ref):
                    np.testing.assert_array_equal(a, b)
        species = sorted({int(z) for s in group for z in s.numbers})
        table = species_table(species)
        one = collate_graphs([prepare(s, table, 5.0) for s in group])
        many = collate(group, species, 5.0)
        for f in ("positions", "pair_i", "pair_j", "pair_shift", "pair_ptr", "species"):
            assert torch.equal(getattr(one, f), getattr(many, f)), f
    assert dense >= 8
    # a shuffled batch of several subsets: grouped wherever they stand, graphs in batch order
    mixed = [s for g in groups for s in g[:6]]
    mixed = [mixed[k] for k in rng.permutation(len(mixed))]
    species = sorted({int(z) for s in mixed for z in s.numbers})
    one = collate_graphs([prepare(s, species_table(species), 5.0) for s in mixed])
    many = collate(mixed, species, 5.0)
    for f in ("positions", "pair_i", "pair_j", "pair_shift", "pair_ptr", "species", "structure"):
        assert torch.equal(getattr(one, f), getattr(many, f)), f
