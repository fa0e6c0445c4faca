"""The copy-difference term of energy training on GPR-augmented data (training/losses.py): the
grouped stream keeps every copy with its parent (ranks, batches, splits), the trainer's loss equals
the written-out formula with displacements known independently (a copy wrapped across the
periodic boundary included), validation uses the same loss, the plain energy loss is unchanged
when the term is off, and 1 rank == 2 ranks (tests/mpi_scripts/train_equiv.py, mode difference)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distmlip.data.h5store import H5Dataset, write_dataset
from distmlip.data.stream import PartitionedStream
from distmlip.data.structure import Structure


def augmented_emt(path, n_ref=8, M=3, delta=0.03, seed=0):
    """Two subsets (8-atom periodic Cu, 4-atom free Cu cluster), ``n_ref`` EMT references each,
    then M copies per reference displaced by N(0, delta) on every coordinate and labelled by EMT;
    periodic copies are wrapped into the cell (so atoms near a face jump by a lattice vector).
    Returns (structures, true displacement norm per structure index, 0 for references)."""
    from ase import Atoms
    from ase.build import bulk
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    refs, atoms = [], []
    for k in range(n_ref):
        a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((1, 1, 2))
        a.rattle(0.06, seed=seed + k)                 # atoms at 0 go negative: copies wrap
        atoms.append(a)
        c = Atoms("Cu4", positions=[[0, 0, 0], [2.5, 0, 0], [1.25, 2.15, 0], [1.25, 0.72, 2.05]])
        c.rattle(0.06, seed=100 + seed + k)
        atoms.append(c)

    def lab(a, **kw):
        a.calc = EMT()
        return Structure(numbers=a.numbers.copy(), positions=a.positions.copy(), cell=a.cell.array.copy(),
                         pbc=a.pbc.copy(), energy=float(a.get_potential_energy()), **kw)
    for k, a in enumerate(atoms):
        a.calc = EMT()
        refs.append(lab(a.copy(), forces=a.get_forces(), source="bulk" if a.pbc.any() else "cluster",
                        source_index=k))
    out, dx = list(refs), [0.0] * len(refs)
    for k, a in enumerate(atoms):
        for _ in range(M):
            b = a.copy()
            d = rng.normal(0.0, delta, b.positions.shape)
            b.positions = a.positions + d
            if b.pbc.any():
                b.wrap()
            out.append(lab(b, forces=None, synthetic=True, parent=k, uncertainty=0.002, weight=0.8,
                           source=refs[k].source, source_index=k))
            dx.append(float(np.sqrt((d * d).sum())))
    write_dataset(path, out)
    return out, np.array(dx)


@pytest.fixture(scope="module")
def aug(tmp_path_factory):
    p = tmp_path_factory.mktemp("diff") / "aug.h5"
    _, dx = augmented_emt(p)
    return p, dx


def _cfg(tmp_path, h5, **training):
    from distmlip.training.config import load_train_config

    t = dict(mode="energy", epochs=2, batch_atoms=40, lr=0.01, output=str(tmp_path / "run"), progress_bar="off",
             seed=2)
    t.update(training)
    tmp_path.mkdir(parents=True, exist_ok=True)
    y = tmp_path / "c.yaml"
    import yaml

    y.write_text(yaml.safe_dump({"data": {"train": [str(h5)], "fractions": [0.7, 0.3, 0.0], "prefetch": False},
                                 "descriptor": {"rc_radial": 4.0, "n_radial": 4, "rc_angular": 3.0, "n_angular": 2,
                                                "backend": "reference"},
                                 "model": {"hidden": [6, 6]}, "training": t}))
    return load_train_config(y)


def test_grouped_stream_keeps_copies_with_their_parents():
    class DS:
        natoms = np.array([5, 3, 4, 6, 2, 5, 3, 4, 6, 2, 7, 1], dtype=np.int64)
    groups = np.array([0, 1, 2, 3, 4, 0, 1, 0, 3, 4, 4, 11])
    for world in (1, 2, 3):
        for fixed in (True, False):
            seen = []
            for r in range(world):
                s = PartitionedStream(DS(), None, r, world, batch_atoms=9, batch_structures=4, seed=5,
                                      fixed_batches=fixed, groups=groups, prefetch=False)
                for ep in range(3):
                    for b in s.batches(ep):
                        g = set(groups[b].tolist())
                        # a batch holds whole groups (a group above batch_atoms is a batch alone)
                        assert sorted(np.flatnonzero(np.isin(groups, list(g))).tolist()) == sorted(b.tolist())
                        assert DS.natoms[b].sum() <= 9 or len(g) == 1
                    if ep == 0:
                        seen += np.concatenate(s.batches(0)).tolist()
                # a group lives on one rank
                assert all(set(np.flatnonzero(groups == gk)) <= set(s.partition().tolist())
                           for gk in set(groups[s.partition()].tolist()))
            assert sorted(seen) == list(range(12))
    # the group of 0 (5 + 5 + 4 atoms) exceeds batch_atoms 9: alone, whole
    s = PartitionedStream(DS(), None, 0, 1, batch_atoms=9, batch_structures=4, seed=5, groups=groups)
    assert any(sorted(b.tolist()) == [0, 5, 7] for b in s.batches(0))


def test_split_never_separates_a_copy_from_its_parent(aug):
    from distmlip.data.split import assign_split

    ds = H5Dataset(aug[0])
    par, syn = ds.column("parent"), ds.column("synthetic")
    for seed in range(6):
        sp = assign_split(ds, seed, (0.7, 0.3, 0.0))
        c = np.flatnonzero(syn)
        assert (sp[c] == sp[par[c]]).all()
        assert (sp == 1).any() and (sp == 0).any()


def _written_out(tr, idx, dx_true, gamma):
    """(1 - g) L_E + g L_D of the structures ``idx`` from the model's energies, in numpy, with the
    displacements known from the generator (not from the trainer's minimum-image pairing)."""
    ds = tr.ds
    S = ds.read(idx)
    batch = tr.collate(S, ds)
    with torch.no_grad():
        E = tr.model(batch).double().numpy()
    pos = {int(i): k for k, i in enumerate(batch.index.tolist())}
    Er = np.array([s.energy for s in S])[[idx.tolist().index(i) for i in batch.index.tolist()]]
    n = batch.natoms.numpy().astype(float)
    w = batch.weight.numpy()
    e = (E - Er) / n
    LE = (w * e * e).sum() / w.sum()
    par, syn = ds.column("parent"), ds.column("synthetic")
    sd = cd = 0.0
    for i in idx:
        if syn[i] and int(par[i]) in pos:
            c, p = pos[int(i)], pos[int(par[i])]
            r = ((E[c] - E[p]) - (Er[c] - Er[p])) / dx_true[i]
            sd += w[c] * r * r
            cd += w[c]
    return (1 - gamma) * LE + gamma * sd / cd, cd


def test_loss_equals_the_written_out_formula(tmp_path, aug):
    from distmlip.training.trainer import Trainer

    h5, dx_true = aug
    tr = Trainer(_cfg(tmp_path, h5, difference_weight=0.3), quiet=True)
    assert tr._gamma == 0.3
    # pairing and displacements (minimum image across the periodic faces)
    parent, dx = tr._diff[id(tr.ds)]
    c = np.flatnonzero(parent >= 0)
    ds = tr.ds
    assert len(c) == int(ds.column("synthetic").sum())          # every copy paired (same split)
    assert np.abs(dx[c] - dx_true[c]).max() < 1e-12
    wrapped = [i for i in c if np.abs(ds.read([int(i)])[0].positions
                                      - ds.read([int(parent[i])])[0].positions).max() > 1]
    assert wrapped, "no copy crossed the periodic boundary: the minimum image was not exercised"
    for idx in (np.sort(tr.train_idx), np.sort(tr.val_idx)):
        want, cd = _written_out(tr, idx, dx_true, 0.3)
        assert cd > 0
        counts = tr.counts_of(idx)
        assert abs(float(counts[3]) - cd) < 1e-12
        batch = tr.collate(ds.read(idx), ds)
        got = float(tr.batch_loss(batch, counts).detach())
        assert abs(got - want) < 1e-12 * want
    # validation loss of the whole stream: the same formula over the validation split
    got = tr.evaluate_stream(tr.val_stream)["loss"]
    want, _ = _written_out(tr, np.sort(tr.val_idx), dx_true, 0.3)
    assert abs(got - want) < 1e-10 * want


def test_term_off_is_the_plain_energy_loss(tmp_path, aug):
    from distmlip.training.trainer import Trainer

    h5, dx_true = aug
    tr = Trainer(_cfg(tmp_path, h5, difference_weight=0.0), quiet=True)
    assert tr._gamma == 0.0 and tr.stream.units is None
    idx = np.sort(tr.train_idx)
    want, _ = _written_out(tr, idx, dx_true, 0.0)
    got = float(tr.batch_loss(tr.collate(tr.ds.read(idx), tr.ds), tr.counts_of(idx)).detach())
    assert abs(got - want) < 1e-12 * want


def test_training_with_the_term_lowers_the_difference_error(tmp_path, aug):
    """The gradient's sign and scale: 40 epochs with gamma 0.5 bring the copies' directional-
    derivative error (D_rmse, validation copies) well below that of the plain energy loss."""
    from distmlip.training.trainer import Trainer

    h5, _ = aug
    out = {}
    for g in (0.0, 0.5):
        tr = Trainer(_cfg(tmp_path / f"g{g}", h5, difference_weight=g, epochs=40, lr=0.02, scheduler="none"),
                     quiet=True)
        tr.fit()
        tr.cfg.training.difference_weight = 0.5      # measure D on the same pairs for both runs
        tr._setup_differences()
        st = PartitionedStream(tr.ds, tr.val_idx, 0, 1, 10 ** 6, 10 ** 6, 0, shuffle=False, prefetch=False,
                               groups=tr._diff_groups(tr.ds))
        out[g] = tr.evaluate_stream(st)["D_rmse"]
        if g > 0:       # log.csv keeps the epochs' D_rmse too (it was on the terminal only)
            import csv
            rows = list(csv.DictReader(open(tmp_path / f"g{g}" / "run" / "log.csv")))
            assert len(rows) == 40 and float(rows[-1]["train_D_rmse"]) > 0 and float(rows[-1]["val_D_rmse"]) > 0
    assert out[0.5] < 0.7 * out[0.0], out


def test_rmse_loss_form_with_copies_is_refused(tmp_path, aug):
    from distmlip.errors import ConfigError
    from distmlip.training.trainer import Trainer

    with pytest.raises(ConfigError, match="difference_weight"):
        Trainer(_cfg(tmp_path, aug[0], loss="rmse"), quiet=True)


def test_one_rank_equals_two_ranks_with_the_term(tmp_path, aug):
    import os
    import subprocess
    import sys

    from helpers import REPO, mpirun

    equiv = str(REPO / "tests" / "mpi_scripts" / "train_equiv.py")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for k in [k for k in env if k.startswith(("OMPI_", "PMI", "PMIX_", "SLURM_"))]:
        del env[k]
    res = subprocess.run([sys.executable, equiv, str(aug[0]), str(tmp_path), "difference"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    mpirun(2, [equiv, str(aug[0]), str(tmp_path), "difference"], timeout=300)
    w1 = torch.load(tmp_path / "difference_w1.pt", weights_only=True)
    w2 = torch.load(tmp_path / "difference_w2.pt", weights_only=True)
    init = torch.load(tmp_path / "difference_w1_init.pt", weights_only=True)
    moved = max(float((w1[k] - init[k]).abs().max()) for k in w1)
    assert moved > 1e-4
    d = max(float((w1[k].double() - w2[k].double()).abs().max()) for k in w1)
    assert d < 1e-10, d


def test_copies_per_epoch_draws_other_copies_each_epoch():
    """``sample_k``: each epoch a group keeps its reference and k of its copies, drawn anew per
    epoch (the union over epochs covers more than k), the same plan from any rank's stream, and
    groups with at most k copies keep them all."""
    class DS:
        natoms = np.full(14, 2, dtype=np.int64)
    # references 0, 1, 2; copies: 3-7 of 0, 8-12 of 1, 13 of 2
    groups = np.array([0, 1, 2] + [0] * 5 + [1] * 5 + [2])
    copy = np.arange(14) >= 3
    for world in (1, 2):
        streams = [PartitionedStream(DS(), None, r, world, batch_atoms=8, batch_structures=100, seed=4,
                                     fixed_batches=True, groups=groups, prefetch=False, sample_mask=copy, sample_k=2)
                   for r in range(world)]
        union = {g: set() for g in range(3)}
        for ep in range(6):
            seen = []
            for r, s in enumerate(streams):
                assert [b.tolist() for b in s.batches(ep)] == [b.tolist() for b in streams[0].batches(ep, r)]
                seen += np.concatenate(s.batches(ep)).tolist() if s.batches(ep) else []
            seen = np.array(sorted(seen))
            for g in range(3):
                mine = seen[groups[seen] == g]
                assert g in mine.tolist()                                   # the reference, every epoch
                n_copies = int(copy[mine].sum())
                assert n_copies == (1 if g == 2 else 2), (ep, g, mine)
                union[g] |= set(mine[copy[mine]].tolist())
        assert len(union[0]) > 2 and len(union[1]) > 2, union
    # the draw is a function of the structure, not of the rank that holds it: the copies drawn
    # on 1 and on 2 ranks are the same set every epoch (sweep 10: the fixed validation draw
    # differed between 1 and 3 ranks)
    for ep in range(4):
        drawn = []
        for world in (1, 2):
            ss = [PartitionedStream(DS(), None, r, world, batch_atoms=8, batch_structures=100, seed=4,
                                    fixed_batches=False, groups=groups, prefetch=False, sample_mask=copy, sample_k=2)
                  for r in range(world)]
            drawn.append(sorted(i for s in ss for b in s.batches(ep) for i in b.tolist()))
        assert drawn[0] == drawn[1], (ep, drawn)
    one, again = (PartitionedStream(DS(), None, 0, 1, batch_atoms=8, batch_structures=100, seed=4, groups=groups,
                                    prefetch=False, sample_mask=copy, sample_k=2) for _ in range(2))
    assert [b.tolist() for b in again.batches(3)] == [b.tolist() for b in one.batches(3)]
    assert not again.fixed_batches


def test_trainer_copies_per_epoch(tmp_path, aug, capsys):
    """training.copies_per_epoch 1 on M = 3 copies: every epoch's training batches hold each
    training reference with exactly one of its training copies; the plain energy loss takes
    them all, and it and a data set without copies warn."""
    from distmlip.training.trainer import Trainer

    h5, _ = aug
    tr = Trainer(_cfg(tmp_path / "k1", h5, copies_per_epoch=1, epochs=2), quiet=True)
    parent = tr._diff[id(tr.ds)][0]
    refs = [i for i in tr.train_idx if parent[i] < 0 and (parent[tr.train_idx] == i).any()]
    assert refs
    for ep in range(2):
        b = np.concatenate(tr.stream.batches(ep))
        for r in refs:
            assert r in b and int((parent[b] == r).sum()) == 1
    # validation: one fixed draw of the same number of copies per reference
    vrefs = [i for i in tr.val_idx if parent[i] < 0 and (parent[tr.val_idx] == i).any()]
    assert vrefs
    v0, v1 = (np.concatenate(tr.val_stream.batches(ep)) for ep in (0, 1))
    assert sorted(v0.tolist()) == sorted(v1.tolist())
    assert all(r in v0 and int((parent[v0] == r).sum()) == 1 for r in vrefs)
    tr.fit()
    # the paper's plain energy loss trains on every copy (draws measured worse for it): a warning
    capsys.readouterr()
    plain = Trainer(_cfg(tmp_path / "k0", h5, copies_per_epoch=1, difference_weight=0.0))
    assert "copies_per_epoch 1 has no effect with the plain energy loss" in capsys.readouterr().err
    b = np.concatenate(plain.stream.batches(1))
    assert plain.stream.sample_k == 0 and sorted(b.tolist()) == sorted(plain.train_idx.tolist())
    # nothing to draw from: a warning
    from distmlip.data.h5store import write_dataset

    src = H5Dataset(h5)
    syn = np.asarray(src.column("synthetic"), dtype=bool)
    refs_only = write_dataset(tmp_path / "refs.h5", src.read(np.flatnonzero(~syn)), species=src.species)
    capsys.readouterr()
    Trainer(_cfg(tmp_path / "k2", refs_only, copies_per_epoch=1), quiet=True)
    assert "copies_per_epoch has no effect" in capsys.readouterr().err


def test_pool_with_plateau_scheduler_points_to_cosine(tmp_path, aug, capsys):
    """The plateau scheduler spends a pool's run badly (docs/gpr.md): the default (auto) takes the
    cosine schedule for a pool (and for fixed copies); an explicit plateau with a pool gets a hint,
    and only that combination."""
    import torch

    from distmlip.training.trainer import Trainer

    h5, _ = aug
    hint = "'training.scheduler: cosine' (or auto) uses the epochs better"
    capsys.readouterr()
    tr = Trainer(_cfg(tmp_path / "a", h5, copies_per_epoch=1))
    out = capsys.readouterr()
    assert tr.cfg.training.scheduler == "auto" and tr.sched_kind == "cosine"
    assert isinstance(tr.sched, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert hint not in out.out + out.err and "scheduler: cosine (auto" in out.out + out.err
    tr = Trainer(_cfg(tmp_path / "a0", h5, copies_per_epoch=0))        # fixed copies: cosine too
    assert tr.sched_kind == "cosine" and isinstance(tr.sched, torch.optim.lr_scheduler.CosineAnnealingLR)
    capsys.readouterr()
    Trainer(_cfg(tmp_path / "p", h5, copies_per_epoch=1, scheduler="plateau"))
    out = capsys.readouterr()
    assert hint in out.out + out.err
    Trainer(_cfg(tmp_path / "c", h5, copies_per_epoch=1, scheduler="cosine"))
    out = capsys.readouterr()
    assert hint not in out.out + out.err and "copies: 1 per reference" in out.out + out.err


def test_copies_per_epoch_auto_reads_the_data_sets_pools(tmp_path, aug):
    """training.copies_per_epoch: auto (the default) draws, per subset, the number of copies that
    augment's copies: auto recorded in the data set (subsets/copies_per_epoch: the periodic subset
    1 of its 3 copies, the cluster subset none recorded: all 3), with the cosine schedule; on a
    data set without the field it trains on every copy with the plateau schedule (as before the
    field existed); an explicit number overrides the recorded ones.  The field survives writing,
    reading and two shards read as one data set."""
    import torch

    from distmlip.data.h5store import write_dataset
    from distmlip.training.trainer import Trainer

    h5, _ = aug
    src = H5Dataset(h5)
    table = [{k: v for k, v in t.items() if k != "count"} for t in src.subsets]
    periodic = {k for k, t in enumerate(table) if t["natoms"] == 8}
    for k, t in enumerate(table):
        t["copies_per_epoch"] = 1 if k in periodic else 0
    structs = src.read(np.arange(src.n_structures))
    pooled = write_dataset(tmp_path / "pooled.h5", structs, species=src.species, subsets=table)
    back = H5Dataset(pooled)
    assert [t["copies_per_epoch"] for t in back.subsets] == [t["copies_per_epoch"] for t in table]
    assert all(t["copies_per_epoch"] == 0 for t in src.subsets)        # absent: 0
    both = H5Dataset([h5, pooled])                                      # a shard without it: max
    assert [t["copies_per_epoch"] for t in both.subsets] == [t["copies_per_epoch"] for t in table]

    tr = Trainer(_cfg(tmp_path / "auto", pooled), quiet=True)
    assert tr.cfg.training.copies_per_epoch == "auto" and tr.sched_kind == "cosine"
    assert isinstance(tr.sched, torch.optim.lr_scheduler.CosineAnnealingLR)
    parent = tr._diff[id(tr.ds)][0]
    sub = np.asarray(tr.ds.subset_ids)
    for ep in range(3):
        b = np.concatenate(tr.stream.batches(ep))
        for r in tr.train_idx:
            if parent[r] < 0 and (parent[tr.train_idx] == r).any():
                n_train = int((parent[tr.train_idx] == r).sum())
                assert r in b and int((parent[b] == r).sum()) == (1 if sub[r] in periodic else n_train)
    v = np.concatenate(tr.val_stream.batches(0))
    for r in tr.val_idx:
        if parent[r] < 0 and sub[r] in periodic and (parent[tr.val_idx] == r).any():
            assert int((parent[v] == r).sum()) == 1
    tr.fit()

    plain = Trainer(_cfg(tmp_path / "plain", h5), quiet=True)          # no recorded pools
    assert plain.sched_kind == "cosine" and plain.stream.sample_k == 0    # paired copies: cosine
    b = np.concatenate(plain.stream.batches(1))
    assert sorted(b.tolist()) == sorted(plain.train_idx.tolist())
    two = Trainer(_cfg(tmp_path / "two", pooled, copies_per_epoch=2), quiet=True)
    b = np.concatenate(two.stream.batches(1))
    p2 = two._diff[id(two.ds)][0]
    assert all(int((p2[b] == r).sum()) == min(2, int((p2[two.train_idx] == r).sum()))
               for r in two.train_idx if p2[r] < 0 and (p2[two.train_idx] == r).any())
    zero = Trainer(_cfg(tmp_path / "zero", pooled, copies_per_epoch=0), quiet=True)
    assert zero.sched_kind == "cosine" and zero.stream.sample_k == 0


def test_the_hybrid_draws_a_pool_and_the_papers_loss_takes_it_whole(tmp_path, aug):
    """Force mode on the augmented set (the hybrid) draws the recorded number of a pool's copies
    per reference structure and epoch as the copy-difference loss does (before, it trained on the
    whole pool each epoch, P times the copies' cost), with the cosine schedule; the paper's plain
    energy loss (difference_weight 0) trains on every copy, where the draws gave 2x the errors at
    equal cost.  Without recorded pools both keep every copy and the plateau schedule."""
    from distmlip.data.h5store import write_dataset
    from distmlip.training.trainer import Trainer

    h5, _ = aug
    src = H5Dataset(h5)
    table = [dict({k: v for k, v in t.items() if k != "count"}, copies_per_epoch=1) for t in src.subsets]
    pooled = write_dataset(tmp_path / "pooled.h5", src.read(np.arange(src.n_structures)), species=src.species,
                           subsets=table)
    syn = np.asarray(H5Dataset(pooled).column("synthetic"), dtype=bool)
    paper = Trainer(_cfg(tmp_path / "paper", pooled, difference_weight=0.0), quiet=True)
    b = np.concatenate(paper.stream.batches(1))
    assert paper.stream.sample_k == 0 and sorted(b.tolist()) == sorted(paper.train_idx.tolist())
    assert paper.sched_kind == "plateau"
    for name, extra in (("hybrid", dict(mode="force", alpha=0.1)),):
        tr = Trainer(_cfg(tmp_path / name, pooled, **extra), quiet=True)
        assert tr._gamma == 0.0 and tr.sched_kind == "cosine"
        parent = tr._diff[id(tr.ds)][0]
        refs = [r for r in tr.train_idx if not syn[r] and (parent[tr.train_idx] == r).any()]
        assert refs
        drawn = set()
        for ep in range(4):
            b = np.concatenate(tr.stream.batches(ep))
            assert all(r in b and int((parent[b] == r).sum()) == 1 for r in refs)
            drawn |= set(b[syn[b]].tolist())
        assert len(drawn) > len(refs)          # different copies in different epochs
        tr.fit()
        plain = Trainer(_cfg(tmp_path / (name + "_plain"), h5, **extra), quiet=True)
        assert plain.sched_kind == "plateau" and plain.stream.sample_k == 0
        b = np.concatenate(plain.stream.batches(1))
        assert sorted(b.tolist()) == sorted(plain.train_idx.tolist())


def test_resume_across_copies_per_epoch_0_and_auto(tmp_path, aug):
    """A checkpoint with copies_per_epoch 0 (every one written before 'auto' existed, or given)
    resumes under the default auto where the data set records no pools (the same run), and is
    refused where it does (one run draws copies, the other trains on all of them)."""
    from distmlip.data.h5store import write_dataset
    from distmlip.errors import ConfigError
    from distmlip.training.trainer import Trainer

    h5, _ = aug
    src = H5Dataset(h5)
    table = [dict({k: v for k, v in t.items() if k != "count"}, copies_per_epoch=1) for t in src.subsets]
    pooled = write_dataset(tmp_path / "pooled.h5", src.read(np.arange(src.n_structures)), species=src.species,
                           subsets=table)
    for data, ok in ((h5, True), (pooled, False)):
        d = tmp_path / ("plain" if ok else "pooled")
        Trainer(_cfg(d, data, copies_per_epoch=0, epochs=1), quiet=True).fit()
        ck = str(d / "run" / "checkpoint.pt")
        if ok:
            Trainer(_cfg(d, data, epochs=2), resume=ck, quiet=True).fit()
        else:
            with pytest.raises(ConfigError, match="copies_per_epoch: 0.*records copies per epoch"):
                Trainer(_cfg(d, data, epochs=2), resume=ck, quiet=True)
            Trainer(_cfg(d, data, copies_per_epoch=0, epochs=2), resume=ck, quiet=True).fit()


def test_auto_schedule_is_cosine_on_paired_copies_and_kept_on_resume(tmp_path, aug):
    """scheduler: auto takes the cosine schedule for energy training on GPR copies paired with
    their parents, fixed copies too (the plateau scheduler reached its floor rate at a quarter of
    a 400 s EC run, which then learnt nothing: docs/results.md), and the plateau one without the
    pairs (difference_weight 0, force mode); a run resumed under auto keeps the schedule its
    checkpoint started with (a plateau run from before this rule stays plateau)."""
    import torch

    from distmlip.training import checkpoint as ckpt
    from distmlip.training.trainer import Trainer

    h5, _ = aug
    assert Trainer(_cfg(tmp_path / "c", h5), quiet=True).sched_kind == "cosine"
    assert Trainer(_cfg(tmp_path / "p", h5, difference_weight=0.0), quiet=True).sched_kind == "plateau"
    assert Trainer(_cfg(tmp_path / "f", h5, mode="force"), quiet=True).sched_kind == "plateau"

    run = Trainer(_cfg(tmp_path / "old", h5, scheduler="plateau", epochs=2), quiet=True)
    run.fit()
    last = run.out / "checkpoint.pt"
    st = ckpt.load_checkpoint(last)
    assert st["scheduler_kind"] == "plateau"
    # the same run with the schedule left to auto (its config as written before the rule)
    resumed = Trainer(_cfg(tmp_path / "old", h5, epochs=3), resume=last, quiet=True)
    assert resumed.sched_kind == "plateau" and isinstance(resumed.sched, torch.optim.lr_scheduler.ReduceLROnPlateau)


def test_energies_no_better_than_the_composition_are_named(tmp_path, aug, capsys):
    """A loss whose copy-difference term outweighs the energy term can keep a model whose energies
    are worse than the per-element mean energies (GPR copies of liquid water under the default
    weight: 2x the mean's error, exit 0, nothing said; sweep 23).  The end of training compares the
    kept model's energy RMSE with the normalisation's residual and names the weight to lower."""
    from distmlip.training.trainer import Trainer

    h5, _ = aug
    for g, named in ((0.05, False), (0.999, True)):
        tr = Trainer(_cfg(tmp_path / f"g{g}", h5, difference_weight=g, epochs=40, lr=0.02, scheduler="none"),
                     quiet=True)
        tr.fit()
        err = capsys.readouterr().err
        e, which, _ = tr._best_energy
        assert which == "validation" and (e > 1000.0 * tr._energy_rms) == named
        assert ("no better than that baseline" in err) == named
        if named:
            assert "training.difference_weight 0.999" in err and "e.g. 0.0999" in err
