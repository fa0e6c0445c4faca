"""Partitioning, streaming, prefetch, resume and the train/val/test split."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import mpirun
from distmlip.data.examples import emt_structures
from distmlip.data.h5store import H5Dataset, write_dataset
from distmlip.data.split import assign_split, assign_split_arrays, get_split, split_from_patterns, structure_identity
from distmlip.data.stream import PartitionedStream, make_batches, partition_by_atoms


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    p = tmp_path_factory.mktemp("stream") / "mixed.h5"
    structs = emt_structures(60, seed=5, max_size=4)  # 1 .. ~60 atoms per structure
    for k, s in enumerate(structs):
        s.source = f"/x/{'train' if k % 5 else 'test'}/f{k:03d}.xsf"
        s.source_index = 0
    write_dataset(p, structs)
    return p


def test_partition_disjoint_covering_balanced():
    rng = np.random.default_rng(0)
    natoms = rng.integers(1, 200, size=500)
    idx = np.flatnonzero(rng.random(500) < 0.8)
    for R in (1, 2, 3, 7):
        parts = partition_by_atoms(natoms, idx, R)
        cat = np.concatenate(parts)
        assert len(cat) == len(idx) and np.array_equal(np.sort(cat), np.sort(idx))
        loads = np.array([natoms[p].sum() for p in parts])
        assert loads.max() - loads.min() <= 2 * natoms.max()
    parts = partition_by_atoms(natoms, idx, 2)
    loads = [natoms[p].sum() for p in parts]
    assert abs(loads[0] - loads[1]) / np.mean(loads) < 0.05
    # more ranks than structures: empty partitions, still covering
    parts = partition_by_atoms(natoms, [3, 4], 4)
    assert sorted(np.concatenate(parts).tolist()) == [3, 4]


def test_make_batches_bounds():
    natoms = np.array([5, 7, 30, 2, 2, 2, 9, 50])
    b = make_batches(np.arange(8), natoms, batch_atoms=12, batch_structures=2)
    assert np.array_equal(np.concatenate(b), np.arange(8))
    for x in b:
        assert len(x) <= 2 and (natoms[x].sum() <= 12 or len(x) == 1)


def test_batches_balanced_and_fewest():
    """The cut keeps the greedy cut's (minimal) batch count and budgets, but of near-equal size:
    no small remainder batch that a rank would step on while another steps on a full one."""
    from distmlip.data.stream import _greedy_bounds

    natoms = np.full(96, 32)
    b = make_batches(np.arange(96), natoms, batch_atoms=2000, batch_structures=1 << 30)
    assert [int(natoms[x].sum()) for x in b] == [1536, 1536]      # greedy: 1984 + 1088
    rng = np.random.default_rng(0)
    for _ in range(500):
        k = int(rng.integers(1, 40))
        nat = rng.integers(1, 60, k)
        ba, bs = int(rng.integers(1, 150)), int(rng.integers(1, 8))
        b = make_batches(np.arange(k), nat, batch_atoms=ba, batch_structures=bs)
        assert np.array_equal(np.concatenate(b), np.arange(k))
        assert len(b) == len(_greedy_bounds(nat, np.ones(k), ba, bs)) - 1
        for x in b:
            assert len(x) == 1 or (nat[x].sum() <= ba and len(x) <= bs)
    # uniform structures: batch sizes differ by at most one structure
    for n in (7, 50, 333):
        b = make_batches(np.arange(n), np.full(n, 20), batch_atoms=300, batch_structures=1 << 30)
        sizes = [len(x) for x in b]
        assert max(sizes) - min(sizes) <= 1, sizes


def test_stream_epochs_ranks_and_imbalance(dataset):
    ds = H5Dataset(dataset)
    R = 2
    streams = [PartitionedStream(ds, None, r, R, batch_atoms=64, batch_structures=5, seed=7) for r in range(R)]
    loads = [int(ds.natoms[s.partition()].sum()) for s in streams]
    assert abs(loads[0] - loads[1]) / np.mean(loads) < 0.05, loads
    for epoch in (0, 1):
        steps = {s.steps(epoch) for s in streams}
        assert len(steps) == 1
        seen = []
        for s in streams:
            batches = list(s.epoch(epoch))
            assert len(batches) == s.steps(epoch) == s.steps_per_epoch
            for b in batches:
                assert len(b) <= 5 and (sum(x.natoms for x in b) <= 64 or len(b) == 1)
                seen += [x.index for x in b]
        assert sorted(seen) == list(range(len(ds)))
    # order: reproducible, differs between epochs, independent of prefetch
    a = [x.index for b in streams[0].epoch(3) for x in b]
    s2 = PartitionedStream(ds, None, 0, R, batch_atoms=64, batch_structures=5, seed=7, prefetch=False)
    assert a == [x.index for b in s2.epoch(3) for x in b]
    assert a != [x.index for b in s2.epoch(4) for x in b]
    full = PartitionedStream(ds, None, 0, 1, batch_atoms=64, batch_structures=5, seed=7, shuffle_block=1)
    assert sorted(full.order(0)) == list(range(len(ds)))


def test_stream_resume_and_errors(dataset, tmp_path):
    ds = H5Dataset(dataset)
    s = PartitionedStream(ds, np.arange(0, 60, 2), 1, 2, batch_atoms=40, batch_structures=4, seed=1)
    full = [[x.index for x in b] for b in s.epoch(2)]
    resumed = [[x.index for x in b] for b in s.epoch(2, start_step=3)]
    assert resumed == full[3:]
    assert all(i % 2 == 0 for b in full for i in b)
    # an exception in the prefetch thread reaches the consumer
    broken = tmp_path / "broken.h5"
    broken.write_bytes(dataset.read_bytes())
    bad = H5Dataset(broken)
    broken.write_bytes(b"x" * 100)  # destroyed after opening the index
    with pytest.raises(Exception, match="broken.h5"):
        for _ in PartitionedStream(bad, None, 0, 1, batch_atoms=64, batch_structures=5).epoch(0):
            pass
    # early exit does not hang
    it = s.epoch(0)
    next(it)
    it.close()


def test_split_stable_and_per_subset(dataset):
    ds = H5Dataset(dataset)
    a = assign_split(ds, seed=3)
    b = assign_split(ds, seed=3)
    c = assign_split(ds, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert set(np.unique(a)) <= {0, 1, 2}
    for sid in np.unique(ds.subset_ids):
        m = ds.subset_ids == sid
        n = int(m.sum())
        assert (a[m] == 0).sum() == round(0.8 * n)
    # identity-based: reordering the structures does not change anybody's split
    src, si, sub = ds.column("source"), ds.column("source_index"), ds.subset_ids
    perm = np.random.default_rng(0).permutation(len(ds))
    a2 = assign_split_arrays(src[perm], si[perm], sub[perm], 3, per_subset=False)
    a1 = assign_split_arrays(src, si, sub, 3, per_subset=False)
    assert np.array_equal(a1[perm], a2)
    # machine independence: a fixed value of the hash
    assert structure_identity("/a/b/train/f.xsf", 2) == "train/f.xsf#2"
    assert list(assign_split_arrays(["/q/train/f.xsf"] * 4, [0, 1, 2, 3], [0] * 4, 0, per_subset=False)) == \
        list(assign_split_arrays(["/other/root/train/f.xsf"] * 4, [0, 1, 2, 3], [0] * 4, 0, per_subset=False))
    # augmentation (copies share their parent's identity, M per parent, appended) leaves every
    # reference in its split, per subset too: the fractions count identities, not structures
    rng = np.random.default_rng(1)
    for n_ref, M, f in ((42, 8, (0.8, 0.1, 0.1)), (7, 20, (0.7, 0.15, 0.15)), (40, 3, (0.9, 0.1, 0.0))):
        srcs = [f"/d/f{k}.xyz" for k in range(n_ref)]
        base = assign_split_arrays(srcs, [0] * n_ref, [0] * n_ref, 5, f)
        cp = rng.permutation(np.repeat(np.arange(n_ref), M))
        aug = assign_split_arrays(srcs + [srcs[k] for k in cp], [0] * (n_ref + len(cp)), [0] * (n_ref + len(cp)), 5, f)
        assert np.array_equal(aug[:n_ref], base), (n_ref, M, f)
        assert np.array_equal(aug[n_ref:], base[cp])            # copies in their parent's split
        assert (base == 1).sum() == round((f[0] + f[1]) * n_ref) - round(f[0] * n_ref)
    sp = split_from_patterns(src, {"train": "/train/", "test": "/test/"})
    assert (sp == 2).sum() == 12 and get_split(ds, 0).shape == (60,)


SCRIPT = r"""
import json, sys
import numpy as np
from mpi4py import MPI
from distmlip.data.h5store import H5Dataset
from distmlip.data.stream import PartitionedStream
comm = MPI.COMM_WORLD
ds = H5Dataset(sys.argv[1])
s = PartitionedStream(ds, None, comm.rank, comm.size, batch_atoms=64, batch_structures=6, seed=2)
got, steps = [], 0
for b in s.epoch(1):
    steps += 1
    got += [x.index for x in b]
allg = comm.gather({"idx": got, "steps": steps, "atoms": int(ds.natoms[got].sum())}, root=0)
if comm.rank == 0:
    print("RESULT" + json.dumps(allg))
"""


def test_mpi_two_ranks_partitions(dataset, tmp_path):
    script = tmp_path / "w.py"
    script.write_text(SCRIPT)
    res = mpirun(2, [str(script), str(dataset)], timeout=120)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")][0]
    r = json.loads(line[6:])
    a, b = set(r[0]["idx"]), set(r[1]["idx"])
    assert not a & b and a | b == set(range(60))
    assert r[0]["steps"] == r[1]["steps"]
    assert abs(r[0]["atoms"] - r[1]["atoms"]) / (0.5 * (r[0]["atoms"] + r[1]["atoms"])) < 0.05


def test_fixed_batches_reordered_each_epoch_and_assembled_once(dataset):
    """data.batches: fixed -- every epoch visits the same batches (as index sets) in its own
    order, deterministically; reshuffled forms new batches.  The BatchStore returns the same
    assembled batch for the same indices (collated once) and equal to a fresh collation."""
    import dataclasses

    import torch

    from distmlip.descriptors.batch import BatchStore, GraphStore, collate_graphs

    ds = H5Dataset(dataset)
    kw = dict(batch_atoms=80, batch_structures=6, seed=3, shuffle=True, prefetch=False)
    fixed = PartitionedStream(ds, None, 0, 1, fixed_batches=True, **kw)
    again = PartitionedStream(ds, None, 0, 1, fixed_batches=True, **kw)
    resh = PartitionedStream(ds, None, 0, 1, fixed_batches=False, **kw)
    sets = [sorted(tuple(b.tolist()) for b in fixed.batches(e)) for e in range(4)]
    assert all(s == sets[0] for s in sets) and len(sets[0]) > 3
    orders = [[tuple(b.tolist()) for b in fixed.batches(e)] for e in range(4)]
    assert len({tuple(o) for o in orders}) > 1                     # the order changes
    assert orders == [[tuple(b.tolist()) for b in again.batches(e)] for e in range(4)]   # deterministic
    assert sorted(tuple(b.tolist()) for b in resh.batches(1)) != sorted(tuple(b.tolist()) for b in resh.batches(2))
    graphs = GraphStore(ds, ds.species, 4.0)
    store = BatchStore(graphs, 1 << 30)
    idx = fixed.batches(1)[0]
    b1, b2 = store(idx), store(idx.copy())
    assert b1 is b2 and store.cheap(idx)
    ref = collate_graphs(graphs(idx))
    for f in dataclasses.fields(ref):
        x, y = getattr(b1, f.name), getattr(ref, f.name)
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, f.name
    small = BatchStore(graphs, 1)                                  # over budget: assembled anew
    assert small(idx) is not small(idx)
