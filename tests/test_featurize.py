"""Descriptor cache: training with the cache == without (float64), the cache equals descriptors
computed directly, stale caches (data changed, other parameters, other species) are detected and
rebuilt, `distmlip featurize` under mpirun -n 2 writes the same file as 1 rank, force mode and
`cache: off` never touch it."""
import dataclasses
import os

import h5py
import numpy as np
import pytest

from distmlip.data.examples import rattled_cu_au
from distmlip.data.h5store import H5Dataset, write_dataset
from distmlip.descriptors.batch import collate
from distmlip.descriptors.featurize import FeatureCache, StaleCacheError, default_cache_path, featurize
from distmlip.descriptors.spec import DescriptorSpec
from distmlip.training.config import load_train_config
from distmlip.training.trainer import Trainer
from helpers import distmlip_cli, mpirun, read_only_folder

SPEC = DescriptorSpec(rc_radial=4.0, n_radial=4, rc_angular=3.0, n_angular=2)


@pytest.fixture()
def emt_h5(tmp_path):      # per test: the tests here rewrite the data file
    p = tmp_path / "data" / "emt.h5"
    p.parent.mkdir()
    write_dataset(p, rattled_cu_au(20))
    return p


def make_cfg(tmp_path, h5, cache, mode="energy", name="run"):
    y = tmp_path / f"{name}.yaml"
    y.write_text(f"""
data: {{train: [{h5}], fractions: [0.75, 0.25, 0.0]}}
descriptor: {{rc_radial: 4.0, n_radial: 4, rc_angular: 3.0, n_angular: 2, backend: reference, cache: {cache}}}
model: {{hidden: [6, 6]}}
training: {{mode: {mode}, epochs: 3, batch_atoms: 16, lr: 0.01, output: {tmp_path / name}, progress_bar: 'off'}}
""")
    return load_train_config(y)


def test_cache_matches_direct_descriptors(tmp_path, emt_h5):
    ds = H5Dataset(emt_h5)
    out = featurize(ds, ds.species, SPEC, "reference", tmp_path / "c.h5")
    c = FeatureCache(out, ds, ds.species, SPEC)
    desc = SPEC.build(ds.species)
    idx = [7, 2, 2, 13]
    b = collate(ds.read(idx), ds.species, cutoff=4.0)
    G = desc(b.positions, b.species, b.pair_i, b.pair_j, b.pair_shift).detach().numpy()
    np.testing.assert_allclose(c.features(idx), G, rtol=0, atol=1e-13)
    c.preload(range(ds.n_structures))
    np.testing.assert_array_equal(c.features(idx), c.features(np.array(idx)))


def test_cache_memory_bounded_by_budget(tmp_path, emt_h5, monkeypatch):
    """Rows are kept in chunks under a byte budget: a small budget reads on demand and never
    holds more than the budget (plus the chunks of the current call), with the same values."""
    ds = H5Dataset(emt_h5)
    out = featurize(ds, ds.species, SPEC, "reference", tmp_path / "c.h5")
    full = FeatureCache(out, ds, ds.species, SPEC)
    assert full.preload(range(ds.n_structures)) and full.reads == 1
    ref = full.features(range(ds.n_structures))
    with h5py.File(out) as f:
        np.testing.assert_array_equal(ref, f["features"][...])
    monkeypatch.setattr(FeatureCache, "CHUNK_ROWS", 8)          # 2 structures per chunk
    chunk = 8 * full.dim * 8
    monkeypatch.setenv("DISTMLIP_FEATURE_CACHE_MB", str(3 * chunk / (1 << 20)))
    small = FeatureCache(out, ds, ds.species, SPEC)
    assert small.max_chunks == 3
    assert not small.preload(range(ds.n_structures)) and small.reads == 0
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = rng.choice(ds.n_structures, size=int(rng.integers(1, 4)))
        got = small.features(idx)
        np.testing.assert_array_equal(got, np.concatenate([ref[4 * i:4 * i + 4] for i in idx]))
        assert small.cached_bytes <= 3 * chunk
    reads = small.reads
    small.features([0, 1])          # most recently used: no read
    small.features([0, 1])
    assert small.reads <= reads + 1
    # a share that fits the budget is read once and then served from memory
    assert small.preload([4, 5, 6]) and small.features([6, 4]).shape == (8, full.dim)
    r = small.reads
    small.features([5, 4, 6])
    assert small.reads == r


def test_cache_rows_of_random_draws_pinned_or_not(tmp_path, emt_h5, monkeypatch):
    """A pool of GPR copies draws structures at random each epoch, so a batch touches many
    chunks: its rows come from the preloaded (pinned) chunks in one gather, from the chunks read
    on demand grouped by chunk, or from both, in the order asked and with repeats."""
    ds = H5Dataset(emt_h5)
    out = featurize(ds, ds.species, SPEC, "reference", tmp_path / "c.h5")
    with h5py.File(out) as f:
        ref = f["features"][...]
    off = np.r_[0, np.cumsum(ds.natoms)]

    def want(idx):
        return np.concatenate([ref[off[i]:off[i + 1]] for i in idx])

    monkeypatch.setattr(FeatureCache, "CHUNK_ROWS", 8)          # 2 structures per chunk
    c = FeatureCache(out, ds, ds.species, SPEC)
    rng = np.random.default_rng(1)
    n = ds.n_structures
    for k in range(30):
        if k == 10:
            assert c.preload(range(0, n // 2))                     # half pinned
        if k == 20:
            assert c.preload(range(n // 2, n))                     # a second preload adds the rest
            assert c.cached_bytes >= ref.nbytes
        idx = rng.choice(n, size=int(rng.integers(1, 3 * n // 4)))
        np.testing.assert_array_equal(c.features(idx), want(idx))
    r = c.reads
    c.features(rng.permutation(n))
    assert c.reads == r                                             # everything pinned: no read


def test_training_with_cache_equals_without(tmp_path, emt_h5):
    t_off = Trainer(make_cfg(tmp_path, emt_h5, "off", name="off"), quiet=True)
    t_off.fit()
    default = default_cache_path([str(emt_h5)], SPEC, H5Dataset(emt_h5).species)
    assert t_off.cache is None and not default.exists()
    t_on = Trainer(make_cfg(tmp_path, emt_h5, "on", name="on"), quiet=True)
    assert t_on.cache is not None and default.exists() and t_on.cache.path == default
    t_on.fit()
    a, b = t_off.model.state_dict(), t_on.model.state_dict()
    d = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert d < 1e-12, d
    la = (tmp_path / "off" / "log.csv").read_text().splitlines()
    lb = (tmp_path / "on" / "log.csv").read_text().splitlines()
    col = lambda lines, name: [r.split(",")[lines[0].split(",").index(name)] for r in lines[1:]]  # noqa: E731
    assert col(la, "train_loss") == col(lb, "train_loss") and col(la, "val_loss") == col(lb, "val_loss")
    # force mode never uses it
    t_f = Trainer(make_cfg(tmp_path, emt_h5, "on", mode="force", name="force"), quiet=True)
    assert t_f.cache is None


def test_stale_cache_detected_and_rebuilt(tmp_path, emt_h5, capsys):
    ds = H5Dataset(emt_h5)
    path = featurize(ds, ds.species, SPEC, "reference", default_cache_path(ds.paths, SPEC, ds.species))
    with pytest.raises(StaleCacheError, match="n_radial"):
        FeatureCache(path, ds, ds.species, dataclasses.replace(SPEC, n_radial=5))
    with pytest.raises(StaleCacheError, match="species"):
        FeatureCache(path, ds, ["Au", "Cu"], SPEC)
    # same sizes, moved atoms: a different data file content
    st = rattled_cu_au(20)
    st[3].positions[0, 0] += 0.01
    write_dataset(emt_h5, st)
    ds2 = H5Dataset(emt_h5)
    with pytest.raises(StaleCacheError, match="content digest differs"):
        FeatureCache(path, ds2, ds2.species, SPEC)
    res = distmlip_cli(["featurize", str(emt_h5), "--rc-radial", "4", "--n-radial", "4", "--rc-angular", "3",
                        "--n-angular", "2", "--check", "-o", str(path)], check=False)
    assert res.returncode == 1 and "stale" in res.stdout
    # a copy (new mtime, same content) is still valid: content digest, not file times
    featurize(ds2, ds2.species, SPEC, "reference", path)
    os.utime(emt_h5, ns=(2, 2))
    FeatureCache(path, ds2, ds2.species, SPEC)
    # a replaced file of the same size with its modification time preserved (cp -p, rsync -a)
    # is seen: the content digest changes
    st0 = os.stat(emt_h5)
    st[7].positions[2, 0] += 0.01
    write_dataset(emt_h5, st)
    os.utime(emt_h5, ns=(st0.st_atime_ns, st0.st_mtime_ns))
    with pytest.raises(StaleCacheError, match="content digest differs"):
        FeatureCache(path, H5Dataset(emt_h5), ds2.species, SPEC)
    # training with cache: auto rebuilds a stale cache (with a warning) and trains as without
    st[5].positions[1, 1] += 0.02
    write_dataset(emt_h5, st)
    tr = Trainer(make_cfg(tmp_path, emt_h5, "auto", name="auto"), quiet=True)
    assert "rebuilding" in capsys.readouterr().err
    tr.fit()
    ref = Trainer(make_cfg(tmp_path, emt_h5, "off", name="ref"), quiet=True)
    ref.fit()
    a, b = tr.model.state_dict(), ref.model.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-12


def test_featurize_one_vs_two_ranks(tmp_path, emt_h5):
    args = ["-m", "distmlip", "featurize", str(emt_h5), "--rc-radial", "4", "--n-radial", "4",
            "--rc-angular", "3", "--n-angular", "2", "--backend", "fused"]
    distmlip_cli(args[2:] + ["-o", str(tmp_path / "one.h5")])
    # tiny blocks: each rank computes and writes its range in several rounds
    mpirun(2, args + ["-o", str(tmp_path / "two.h5"), "--batch-atoms", "8", "--block-mb", "1e-5"], timeout=300)
    with h5py.File(tmp_path / "one.h5") as f1, h5py.File(tmp_path / "two.h5") as f2:
        G1, G2 = f1["features"][...], f2["features"][...]
        assert G1.shape == (H5Dataset(emt_h5).n_atoms, 16) and np.abs(G1).max() > 0
        assert np.array_equal(G1, G2)
        assert f1.attrs["key"] == f2.attrs["key"] and bool(f2.attrs["complete"])
    assert not list(tmp_path.glob(".*.tmp"))


def test_feature_batches_kept_for_fixed_batches(tmp_path, emt_h5):
    """FeatureBatchLoader(keep_bytes > 0) returns the kept batch for the same indices, equal to
    one assembled anew; over its budget it assembles every time."""
    import torch

    from distmlip.descriptors.featurize import FeatureBatchLoader

    ds = H5Dataset(emt_h5)
    cache = FeatureCache(featurize(ds, ds.species, SPEC, "reference", tmp_path / "c.h5"), ds, ds.species, SPEC)
    idx = np.array([5, 1, 7, 2])
    keep, fresh = FeatureBatchLoader(cache, ds, ds.species, keep_bytes=1 << 30), FeatureBatchLoader(cache, ds, ds.species)
    a, b, c = keep(idx), keep(idx.copy()), fresh(idx)
    assert a is b and keep.cheap(idx) and fresh(idx) is not c
    for k, v in c.__dict__.items():
        assert torch.equal(v, a.__dict__[k]) if isinstance(v, torch.Tensor) else v == a.__dict__[k], k
    small = FeatureBatchLoader(cache, ds, ds.species, keep_bytes=1)
    assert small(idx) is not small(idx)


def test_damaged_cache_block_is_an_error_not_data(tmp_path, emt_h5):
    """One flipped bit in the cached features fails the block's checksum: an error naming the
    cache, never features silently trained on."""
    from distmlip.errors import DataFormatError

    ds = H5Dataset(emt_h5)
    out = featurize(ds, ds.species, SPEC, "reference", tmp_path / "c.h5")
    with h5py.File(out, "r") as f:
        pos = f["features"].id.get_chunk_info(0).byte_offset + 8 * 50 + 6
    with open(out, "r+b") as g:
        g.seek(pos)
        b = g.read(1)
        g.seek(pos)
        g.write(bytes([b[0] ^ 64]))
    with pytest.raises(DataFormatError, match=r"c\.h5: descriptor cache rows .* unreadable"):
        FeatureCache(out, ds, ds.species, SPEC).features([0, 1])


def test_cache_of_an_older_version_is_stale_not_an_error(tmp_path, emt_h5):
    """A cache written by an older distmlip (another format version) is rebuilt by training,
    not a stop (make demo failed on the version 2 cache left by the previous release)."""
    ds = H5Dataset(emt_h5)
    out = featurize(ds, ds.species, SPEC, "reference", tmp_path / "c.h5")
    with h5py.File(out, "r+") as f:
        f.attrs["version"] = 2
    with pytest.raises(StaleCacheError, match="format version 2"):
        FeatureCache(out, ds, ds.species, SPEC)


def test_cache_that_does_not_fit_is_refused_before_writing(tmp_path, emt_h5, monkeypatch):
    """A cache larger than the free space is a StorageError before anything is written (on a
    full tmpfs h5py crashed at close, exit 139, leaving its temporary file); training in cache
    mode auto then runs without a cache, saying why.  The free space is what statvfs reports,
    made small here (a real full disk needs a mount)."""
    import distmlip.descriptors.featurize as fz
    from distmlip.descriptors.featurize import open_or_build
    from distmlip.errors import StorageError

    real = os.statvfs

    class Tiny:
        def __init__(self, st):
            self.f_frsize, self.f_bavail = st.f_frsize, 10

    monkeypatch.setattr(fz.os, "statvfs", lambda p: Tiny(real(p)))
    ds = H5Dataset(emt_h5)
    with pytest.raises(StorageError, match=r"cannot write the descriptor cache .*c\.h5: .* MB needed"):
        featurize(ds, ds.species, SPEC, "reference", tmp_path / "c.h5")
    assert not list(tmp_path.glob(".c.h5*")) and not (tmp_path / "c.h5").exists()
    said = []
    assert open_or_build(ds, ds.species, SPEC, "reference", tmp_path / "c.h5", warn_fn=said.append) is None
    assert "training without a descriptor cache" in said[0]


def test_training_and_validation_lists_never_share_a_cache(tmp_path, emt_h5):
    """data.train [A, T] and data.validation [A, T2] (T2: other structures of T's sizes) had one
    default cache path (the first file and the descriptor settings only): the validation cache
    replaced the training one under its open reader, and training ran on T2's descriptors for T's
    structures (exit 0), or crashed with an IndexError with validation [A] (sweep 14).  The path
    depends on the whole list, and a reader whose file was replaced after its check says so."""
    d = emt_h5.parent
    write_dataset(d / "t.h5", rattled_cu_au(6, seed=1))
    write_dataset(d / "t2.h5", rattled_cu_au(6, seed=2))
    A, T, T2 = str(emt_h5), str(d / "t.h5"), str(d / "t2.h5")
    sp = H5Dataset(emt_h5).species
    lists = ([A], [A, T], [A, T2], [T, A])
    assert len({default_cache_path(x, SPEC, sp) for x in lists}) == len(lists)
    for val in ([A, T2], [A]):
        states = {}
        for cache in ("auto", "off"):
            name = f"{len(val)}-{cache}"
            y = tmp_path / f"{name}.yaml"
            y.write_text(f"""
data: {{train: [{A}, {T}], validation: [{', '.join(val)}]}}
descriptor: {{rc_radial: 4.0, n_radial: 4, rc_angular: 3.0, n_angular: 2, backend: reference, cache: {cache}}}
model: {{hidden: [6, 6]}}
training: {{mode: energy, epochs: 3, batch_atoms: 16, lr: 0.01, output: {tmp_path / name}, progress_bar: 'off'}}
""")
            tr = Trainer(load_train_config(y), quiet=True)
            tr.fit()
            states[cache] = tr.model.state_dict()
        a, b = states["auto"], states["off"]
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-12
    # a reader made before another cache was renamed to its path refuses to read the new rows
    ds = H5Dataset([A, T])
    path = featurize(ds, sp, SPEC, "reference", tmp_path / "shared.h5")
    c = FeatureCache(path, ds, sp, SPEC)
    featurize(H5Dataset([A, T2]), sp, SPEC, "reference", path)
    with pytest.raises(StaleCacheError, match="shared.h5: the descriptor cache was replaced after it was checked"):
        c.features([0])


def test_default_cache_name_of_a_long_data_file_name_fits(tmp_path, emt_h5):
    """A data file whose name is legal but near the limit (240 bytes) got a default cache name
    beyond it (NAME.desc-TAG.h5): training with descriptor.cache auto ended in a traceback, 'File
    name too long' (sweep 20).  The cache name is shortened (a digest of the whole name kept)."""
    import shutil

    from distmlip.data.h5store import H5Dataset
    from distmlip.descriptors.featurize import default_cache_path, open_or_build
    from distmlip.descriptors.spec import DescriptorSpec

    data = tmp_path / ("d" * 240 + ".h5")
    shutil.copy(emt_h5, data)
    spec = DescriptorSpec(rc_radial=4.0, n_radial=4, rc_angular=3.0, n_angular=2)
    path = default_cache_path([data], spec, ["Cu", "Au"])
    assert len(path.name.encode()) <= 255 and path.parent == tmp_path and path.name.endswith(".h5")
    other = default_cache_path([tmp_path / ("d" * 239 + "e.h5")], spec, ["Cu", "Au"])
    assert other.name != path.name
    ds = H5Dataset([data])
    cache = open_or_build(ds, ["Cu", "Au"], spec, "reference", mode="on")
    assert cache is not None and cache.path == path
    cache.close()


def test_cache_beside_read_only_data_is_a_clear_error_or_a_warning(tmp_path, emt_h5):
    """Data on a read-only folder (a group's shared data set): 'distmlip featurize' ended in a
    PermissionError traceback from h5py naming the temporary file, and training with
    descriptor.cache auto silently ran without its cache (sweep 20).  Now featurize is one error
    naming the cache and the setting, training says why it has no cache, and nothing is written
    beside the data."""
    data = emt_h5.parent            # holds emt.h5 alone
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"""
data: {{train: [{data / 'emt.h5'}], fractions: [0.75, 0.25, 0.0]}}
descriptor: {{rc_radial: 4.0, n_radial: 4, rc_angular: 3.0, n_angular: 2, backend: reference, cache: auto}}
model: {{hidden: [4]}}
training: {{epochs: 1, batch_atoms: 40, output: {tmp_path / 'run'}, progress_bar: 'off'}}
""")
    with read_only_folder(data):
        res = distmlip_cli(["featurize", str(data / "emt.h5"), "--config", str(cfg)], check=False)
        text = res.stdout + res.stderr
        assert res.returncode == 2 and "Traceback" not in text, text
        assert "descriptor cache" in text and str(data / "emt.h5.desc-") in text and "descriptor.cache_file" in text, text
        res = distmlip_cli(["train", str(cfg)], check=False)
        text = res.stdout + res.stderr
        assert res.returncode == 0, text
        assert "without a descriptor cache" in text and "descriptor.cache_file" in text, text
    assert sorted(p.name for p in data.iterdir()) == ["emt.h5"]


def test_cache_file_that_is_a_link_is_written_through(tmp_path, emt_h5):
    """descriptor.cache_file (featurize -o) a link to a file elsewhere (a scratch file system):
    the rename replaced the link by a plain file beside it and left the target as it was
    (sweep 20); it is written through, as every atomic write is."""
    spec = DescriptorSpec(rc_radial=4.0, n_radial=4, rc_angular=3.0, n_angular=2)
    (tmp_path / "scratch").mkdir()
    target = tmp_path / "scratch" / "cache.h5"
    target.write_bytes(b"old")
    link = tmp_path / "cache.h5"
    link.symlink_to(target)
    featurize(H5Dataset([emt_h5]), ["Cu", "Au"], spec, "reference", link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    FeatureCache(link, H5Dataset([emt_h5]), ["Cu", "Au"], spec).close()
