"""collate / Batch: fields, batch-global CSR pair list, shifts, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

from distmlip.data.structure import Structure
from distmlip.descriptors.batch import Batch, collate
from distmlip.errors import InputError


def from_ase(at, energy=0.0, forces=None, index=-1, weight=1.0):
    return Structure(numbers=at.numbers.copy(), positions=at.positions.copy(), cell=np.array(at.cell),
                     pbc=at.pbc.copy(), energy=energy, forces=forces, index=index, weight=weight,
                     source="test.xyz")


def structures():
    h2o = molecule("H2O")
    ch4 = molecule("CH4")
    ch4.rotate(30, "x")
    co = bulk("C", "diamond", a=3.57)          # 2-atom primitive cell, smaller than the cutoff
    co.numbers[1] = 8
    rng = np.random.default_rng(0)
    return [from_ase(h2o, -14.2, rng.normal(size=(3, 3)), index=7, weight=0.5),
            from_ase(co, -9.1, None, index=3),
            from_ase(ch4, -24.0, rng.normal(size=(5, 3)), index=11)]


def test_fields_and_pairs():
    structs = structures()
    rc = 4.0
    b = collate(structs, ["C", "H", "O"], rc)
    assert isinstance(b, Batch)
    N = 3 + 2 + 5
    assert b.n_structures == 3 and b.n_atoms == N
    assert b.positions.shape == (N, 3) and b.positions.dtype == torch.float64 and b.positions.is_leaf
    assert b.species.tolist() == [2, 1, 1, 0, 2, 0, 1, 1, 1, 1]
    assert b.structure.tolist() == [0] * 3 + [1] * 2 + [2] * 5
    assert b.natoms.tolist() == [3, 2, 5]
    assert b.cell.shape == (3, 3, 3) and b.pbc.tolist() == [[False] * 3, [True] * 3, [False] * 3]
    assert b.energy.dtype == torch.float64 and b.energy.tolist() == [-14.2, -9.1, -24.0]
    assert b.has_forces.tolist() == [True, False, True]
    assert torch.all(b.forces[3:5] == 0) and torch.allclose(b.forces[:3], torch.from_numpy(structs[0].forces))
    assert b.weight.tolist() == [0.5, 1.0, 1.0] and b.index.tolist() == [7, 3, 11]
    # pairs: sorted by centre, CSR offsets, within the same structure, r < cutoff, both directions
    pi, pj = b.pair_i, b.pair_j
    assert torch.all(pi[1:] >= pi[:-1])
    assert b.pair_ptr.shape == (N + 1,) and b.pair_ptr[0] == 0 and b.pair_ptr[-1] == len(pi)
    assert torch.equal(torch.diff(b.pair_ptr), torch.bincount(pi, minlength=N))
    assert torch.equal(b.structure[pi], b.structure[pj])
    rij = b.positions[pj] - b.positions[pi] + b.pair_shift
    d = rij.norm(dim=1)
    assert torch.all(d < rc) and torch.all(d > 0.5)
    # the periodic 2-atom cell: brute-force count of neighbours of atom 3 (first atom of it)
    co = structs[1]
    cnt = 0
    for t in np.stack(np.meshgrid(*[np.arange(-4, 5)] * 3, indexing="ij"), -1).reshape(-1, 3):
        for j in range(2):
            v = co.positions[j] + t @ co.cell - co.positions[0]
            cnt += 0 < np.linalg.norm(v) < rc
    assert int((pi == 3).sum()) == cnt
    # molecules: all pairs
    assert int((b.structure[pi] == 0).sum()) == 3 * 2
    assert int((b.structure[pi] == 2).sum()) == 5 * 4
    keys = {(int(a), int(c), *[round(float(x), 8) for x in s]) for a, c, s in zip(pi, pj, b.pair_shift)}
    assert keys == {(int(c), int(a), *[round(-float(x), 8) + 0.0 for x in s]) for a, c, s in zip(pi, pj, b.pair_shift)}


def test_to_and_dtype():
    b = collate(structures(), ["H", "C", "O"], 3.0, dtype=torch.float32)
    assert b.positions.dtype == torch.float32 and b.pair_shift.dtype == torch.float32
    assert b.energy.dtype == torch.float64 and b.forces.dtype == torch.float64
    c = b.to("cpu", dtype=torch.float64)
    assert c.positions.dtype == torch.float64 and c.positions.is_leaf and c.n_structures == 3
    c.positions.requires_grad_()
    assert not b.positions.requires_grad
    if torch.cuda.is_available():
        g = b.to("cuda")
        assert g.pair_ptr.is_cuda and g.positions.is_cuda


def test_unknown_element_names_structure_and_element():
    structs = structures()
    with pytest.raises(InputError) as ei:
        collate(structs, ["C", "H"], 3.0)
    msg = str(ei.value)
    assert "structure 0" in msg and "O" in msg and "index 7" in msg and "test.xyz" in msg


def test_bad_cell_and_species():
    s = Structure(numbers=np.array([1, 1]), positions=np.array([[0, 0, 0], [0.7, 0, 0]], float),
                  cell=np.zeros((3, 3)), pbc=np.array([True, True, True]))
    with pytest.raises(InputError, match="structure 0"):
        collate([s], ["H"], 3.0)
    with pytest.raises(InputError, match="duplicate"):
        collate([], ["H", "H"], 3.0)
    with pytest.raises(InputError, match="unknown element"):
        collate([], ["Xx"], 3.0)


def test_empty_batch():
    b = collate([], ["H"], 3.0)
    assert b.n_structures == 0 and b.n_atoms == 0 and b.pair_ptr.tolist() == [0]


def test_ec_dimer_shared_data():
    from ase.io import read

    from distmlip.descriptors.chebyshev import ChebyshevDescriptor
    from distmlip.descriptors.neighbors import neighbor_list
    from helpers import require_shared

    files = sorted((require_shared("ec_dimer") / "train").glob("*.xsf"))[:4]
    structs = [from_ase(read(f), index=k) for k, f in enumerate(files)]
    desc = ChebyshevDescriptor(["C", "H", "O"], 6.5, 12, 4.0, 4)
    b = collate(structs, desc.species, desc.cutoff)
    G = desc(b.positions, b.species, b.pair_i, b.pair_j, b.pair_shift)
    assert G.shape == (b.n_atoms, 36) and torch.isfinite(G).all()
    s = structs[0]
    for be in ("numpy", "ase"):
        np.testing.assert_array_equal(np.column_stack(neighbor_list(s.positions, s.cell, s.pbc, 6.5, backend=be)),
                                      np.column_stack(neighbor_list(s.positions, s.cell, s.pbc, 6.5)))
