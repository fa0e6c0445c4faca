"""Descriptor cache for energy-only training: ``distmlip featurize DATA.h5 [...] --config train.yaml``.

Energy-mode training (and training on GPR-augmented data, M = 10-40 times the original set) needs
the descriptors of fixed structures only, so they can be computed once.  ``featurize`` computes
them with the fused kernels (fallback: the PyTorch reference), spread over the MPI ranks, into a
companion HDF5 file (default ``<first data file>.desc-<digest of spec, species and the file
list>.h5``, so that runs with other descriptor settings or other data lists never share a
file)::

    attrs   format = "distmlip-descriptor-cache", version = 2, complete = True,
            key (JSON: the descriptor spec's fields, species, dim: DescriptorSpec.key),
            data (JSON: content: the data set's content digest, H5Dataset.content_id; files),
            n_structures, n_atoms, dim
    features      [n_atoms, dim] float64   in data-set atom order (all shards concatenated)
    atom_offset   [n_structures + 1] int64

Parallel write: each rank takes a contiguous, atom-balanced range of structures
(``partition_by_atoms``); rank 0 creates a temporary file (a name of its own: host, pid, random)
with the datasets pre-allocated; in rounds, every rank computes the next block (64 MiB) of its
range and the ranks write their blocks one after the other (memory per rank bounded by the
block, not by the data set); rank 0 marks it complete and renames it into place (atomic), and
the file is opened again with its key checked, so a job never reads another job's descriptors.
Results do not depend on the number of ranks (each atom's descriptor depends on its own
neighbourhood only; tested bit for bit).

Reading (``FeatureCache``): rows are kept in chunks of 4096 atoms in a least-recently-used list
under a byte budget (``DISTMLIP_FEATURE_CACHE_MB``, default 512 MiB per rank): a rank whose
share fits holds all of it after ``preload``, a larger share is read chunk by chunk on demand.

A cache is valid for a data set when the key (descriptor spec AND species list) matches and the
data set's content digest (written by convert/augment into the file's attributes; names, sizes
and modification times are not trusted) is the one it was built from.  Otherwise
:class:`StaleCacheError` (a ``DataFormatError``) says what differs; training with
``descriptor.cache: auto|on`` then rebuilds it.  Force-mode training never uses it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataFormatError
from .batch import KeptBatches
from .spec import DescriptorSpec

FORMAT = "distmlip-descriptor-cache"
VERSION = 3   # 3: checksummed features


class StaleCacheError(DataFormatError):
    """The cache file does not belong to these data / descriptor parameters."""


# ------------------------------------------------------------------------------------ keys
def default_cache_path(data_paths, spec: DescriptorSpec, species) -> Path:
    """``<first file>.desc-<tag>.h5``, the tag a digest of the descriptor key and of the whole
    file list in order (relative to the first file's folder, so a moved data folder keeps its
    caches): lists that share a first file (a training set and its validation set, sweep 14)
    never share a cache, which one would rebuild under the other's open reader."""
    paths = [data_paths] if isinstance(data_paths, (str, os.PathLike)) else list(data_paths)
    home = os.path.dirname(os.path.abspath(paths[0]))
    files = [os.path.relpath(os.path.abspath(p), home) for p in paths]
    tag = hashlib.sha256(json.dumps([spec.key(species), files], sort_keys=True).encode()).hexdigest()[:10]
    first = Path(paths[0])
    # a data file name near the file system's limit (legal) made an illegal cache name, and
    # training ended in a traceback (sweep 20): the data file's part is shortened to fit
    from ..utils.io import fit_name, name_max

    end = f".desc-{tag}.h5"
    return first.with_name(fit_name(first.name, name_max(first.parent) - len(end)) + end)


# ------------------------------------------------------------------------------------ reader
def _default_budget() -> int:
    """Memory budget of a FeatureCache in bytes: ``DISTMLIP_FEATURE_CACHE_MB`` (default 512 MiB
    per rank).  Why bounded: with 10-40 GPR copies or millions of structures a rank's share
    of the cache is many GB, and a node runs dozens of ranks."""
    v = os.environ.get("DISTMLIP_FEATURE_CACHE_MB")
    if v is None or not v.strip():
        return 512 << 20
    try:
        mb = float(v)
    except ValueError:
        raise ConfigError(f"DISTMLIP_FEATURE_CACHE_MB must be a number of MiB, got {v!r}") from None
    if mb < 0:
        raise ConfigError(f"DISTMLIP_FEATURE_CACHE_MB must be >= 0, got {v!r}")
    return int(mb * (1 << 20))


class FeatureCache:
    """Cached descriptors of a data set.  ``features(indices)`` -> float64 [sum natoms, D] in the
    order of ``indices``.

    Rows are held in memory in chunks of ``CHUNK_ROWS`` atoms (the file's HDF5 chunk) with a
    least-recently-used list bounded by ``max_bytes`` (default ``DISTMLIP_FEATURE_CACHE_MB``,
    512 MiB): a rank whose share fits keeps all of it after ``preload`` (as fast as a whole
    array in memory), a larger share is read on demand chunk by chunk (consecutive missing
    chunks in one read), so memory is bounded by the budget, never by the data set."""

    CHUNK_ROWS = 4096

    def __init__(self, path, ds, species, spec: DescriptorSpec, check: bool = True, max_bytes: int | None = None):
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise StaleCacheError(f"descriptor cache {self.path} does not exist")
        try:
            with h5py.File(self.path, "r") as f:
                a = f.attrs
                if a.get("format") != FORMAT:
                    raise DataFormatError(f"{self.path}: not a distmlip descriptor cache (format "
                                          f"{a.get('format')!r})")
                if int(a.get("version", -1)) != VERSION:
                    # a cache of an older distmlip (version 2: no checksums) is rebuilt, not an error
                    raise StaleCacheError(f"{self.path}: descriptor cache of format version {int(a.get('version', -1))}, "
                                          f"this distmlip writes version {VERSION}")
                if not a.get("complete", False):
                    raise StaleCacheError(f"{self.path}: incomplete descriptor cache (writer did not finish)")
                key = json.loads(a["key"])
                data = json.loads(a["data"])
                self._identity = (key, data)
                self.atom_offset = f["atom_offset"][...].astype(np.int64)
                self.dim = int(a["dim"])
                shape = f["features"].shape
        except DataFormatError:
            raise
        except (OSError, KeyError, ValueError) as exc:
            from ..utils.io import hdf5_lock_error

            raise (hdf5_lock_error(exc, self.path, "descriptor cache")
                   or DataFormatError(f"{self.path}: corrupt descriptor cache ({type(exc).__name__}: {exc})")) from None
        want = spec.key(species)
        if check:
            diff = [k for k in want if key.get(k) != want[k]]
            if diff:
                raise StaleCacheError(f"{self.path}: descriptor cache built for different "
                                      + ", ".join(f"{k} ({key.get(k)!r}, now {want[k]!r})" for k in diff)
                                      + "; rebuild it with 'distmlip featurize' or set descriptor.cache: off")
            if len(self.atom_offset) != ds.n_structures + 1 or int(self.atom_offset[-1]) != ds.n_atoms \
                    or shape != (ds.n_atoms, want["dim"]) \
                    or np.any(np.diff(self.atom_offset) != np.asarray(ds.natoms)):
                raise StaleCacheError(f"{self.path}: descriptor cache has {len(self.atom_offset) - 1} structures / "
                                      f"{shape[0]} atoms, the data set {ds.paths} has {ds.n_structures} / "
                                      f"{ds.n_atoms}; rebuild it with 'distmlip featurize'")
            if data.get("content") != ds.content_id:
                raise StaleCacheError(f"{self.path}: stale descriptor cache: the data set {', '.join(ds.paths)} "
                                      "is not the one it was built from (content digest differs); rebuild it "
                                      f"with 'distmlip featurize {' '.join(map(str, ds.paths))} ...'")
        self.n_rows = int(self.atom_offset[-1])
        self.max_bytes = _default_budget() if max_bytes is None else int(max_bytes)
        chunk_bytes = self.CHUNK_ROWS * max(self.dim, 1) * 8
        self.max_chunks = self._budget_chunks = max(1, self.max_bytes // chunk_bytes)
        from collections import OrderedDict
        import threading

        self._chunks: OrderedDict = OrderedDict()     # chunk id -> rows [CHUNK_ROWS, dim] (last shorter)
        self._lock = threading.Lock()
        self.reads = 0                                # HDF5 read calls (for tests and benchmarks)
        self._pinned = None                           # (slot per chunk id or -1, rows) of preload()
        self._h5 = None
        self._pid = None

    def _dset(self):
        import h5py

        if self._pid != os.getpid() or self._h5 is None:
            h5 = h5py.File(self.path, "r")
            # the rows are read lazily: the file now under the name must be the one checked when
            # this reader was made, not a cache of other data renamed there since (sweep 14: the
            # validation set's cache replaced the training set's, whose rows were then trained on)
            try:
                now = (json.loads(h5.attrs["key"]), json.loads(h5.attrs["data"]))
            except (KeyError, ValueError):
                now = None
            if now != self._identity:
                h5.close()
                files = (now[1].get("files") if now else None) or "unknown files"
                raise StaleCacheError(f"{self.path}: the descriptor cache was replaced after it was checked (now built "
                                      f"from {files}, checked for {self._identity[1].get('files')}): another run "
                                      f"writes the same file; give each run its own descriptor.cache_file")
            self._h5 = h5
            self._pid = os.getpid()
            self._chunks.clear()
        return self._h5["features"]

    @property
    def cached_bytes(self) -> int:
        return sum(c.nbytes for c in self._chunks.values()) + (self._pinned[1].nbytes if self._pinned else 0)

    def _load(self, ids: np.ndarray, out: dict) -> None:
        """Read the chunks ``ids`` (sorted, unique, none cached) into ``out``: runs of
        consecutive ids in one read each."""
        d = self._dset()
        R = self.CHUNK_ROWS
        brk = np.flatnonzero(np.diff(ids) != 1) + 1
        for run in np.split(ids, brk):
            a, b = int(run[0]) * R, min((int(run[-1]) + 1) * R, self.n_rows)
            try:
                rows = np.asarray(d[a:b], dtype=np.float64)
            except OSError as exc:
                raise DataFormatError(f"{self.path}: descriptor cache rows {a}..{b - 1} unreadable ({exc}); a damaged "
                                      f"file: delete it, the next run rebuilds it") from None
            self.reads += 1
            for c in run:
                out[int(c)] = rows[int(c) * R - a:(int(c) + 1) * R - a]

    def _get(self, ids: np.ndarray) -> dict:
        """Chunks ``ids`` (sorted, unique) from the LRU list, loading the missing ones; the
        least recently used beyond the budget are dropped (the ones asked for are returned
        even when they exceed it)."""
        got = {}
        missing = []
        for c in ids:
            c = int(c)
            arr = self._chunks.get(c)
            if arr is None:
                missing.append(c)
            else:
                self._chunks.move_to_end(c)
                got[c] = arr
        if missing:
            new: dict = {}
            self._load(np.asarray(missing, dtype=np.int64), new)
            for c, arr in new.items():
                # own copy: a view would keep the whole read run alive after eviction
                arr = arr.copy() if len(new) > 1 else arr
                self._chunks[c] = arr
                got[c] = arr
            while len(self._chunks) > self.max_chunks:
                self._chunks.popitem(last=False)
        return got

    def preload(self, indices, max_bytes: int | None = None) -> bool:
        """Read the chunks holding the rows of ``indices`` into memory now, if they fit in the
        budget (``max_bytes``: lowers the cache's budget for this call).  Returns whether
        they all fit (else rows are read on demand)."""
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) == 0:
            return True
        budget = self.max_chunks if max_bytes is None else \
            min(self.max_chunks, int(max_bytes) // (self.CHUNK_ROWS * max(self.dim, 1) * 8))
        ids = self._chunk_ids(idx)
        if self._pinned is not None:        # pinned by an earlier call: in memory, and off the budget
            ids = ids[self._pinned[0][ids] < 0]
            if not len(ids):
                return True
        if len(ids) > budget:
            return False
        with self._lock:
            self._dset()
            # in slices of 64 chunks: one read each, no whole-share temporary
            for a in range(0, len(ids), 64):
                self._get(ids[a:a + 64])
            self._pin(ids)
        return True

    def _pin(self, ids: np.ndarray) -> None:
        """Keep the preloaded chunks ``ids`` in one array (they leave the LRU list, so memory is
        not doubled): a batch's rows are then one gather, whichever chunks a random draw of
        structures touches (pool epochs re-assemble every batch)."""
        R, n_chunks = self.CHUNK_ROWS, -(-self.n_rows // self.CHUNK_ROWS)
        old = self._pinned
        if old is not None:          # a second preload adds to the first
            ids = np.union1d(ids, np.flatnonzero(old[0] >= 0))
        slot = np.full(n_chunks, -1, dtype=np.int64)
        flat = np.zeros((len(ids) * R, self.dim), dtype=np.float64)
        for k, c in enumerate(ids):
            c = int(c)
            if old is not None and old[0][c] >= 0:
                arr = old[1][old[0][c] * R:(old[0][c] + 1) * R]
            else:
                arr = self._chunks.pop(c, None)
                if arr is None:
                    arr = self._get(np.asarray([c]))[c]
                    self._chunks.pop(c, None)
            flat[k * R:k * R + len(arr)] = arr
            slot[c] = k
        self._pinned = (slot, flat)
        # the pinned rows count against the budget of the chunks read on demand
        self.max_chunks = max(1, self._budget_chunks - len(ids))

    def _chunk_ids(self, idx: np.ndarray) -> np.ndarray:
        lo, hi = self.atom_offset[idx], self.atom_offset[idx + 1]
        keep = hi > lo
        R = self.CHUNK_ROWS
        a, b = lo[keep] // R, (hi[keep] - 1) // R
        if not len(a):
            return np.zeros(0, np.int64)
        if np.all(a == b):
            return np.unique(a)
        n = b - a + 1
        return np.unique(np.repeat(a - np.cumsum(n) + n, n) + np.arange(int(n.sum())))

    def features(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) == 0:
            return np.zeros((0, self.dim))
        lo, hi = self.atom_offset[idx], self.atom_offset[idx + 1]
        n = hi - lo
        total = int(n.sum())
        # row of every output atom: structure k's rows lo_k .. hi_k - 1, in the order asked
        rows = np.arange(total, dtype=np.int64) + np.repeat(lo - (np.cumsum(n) - n), n)
        R = self.CHUNK_ROWS
        cid = rows // R
        if self._pinned is not None:
            slot, flat = self._pinned
            s = slot[cid]
            if s.min() >= 0:
                return flat[s * R + (rows - cid * R)]
        with self._lock:
            self._dset()
            chunks = self._get(np.unique(cid))
        out = np.empty((total, self.dim), dtype=np.float64)
        if len(chunks) == 1:
            c, arr = next(iter(chunks.items()))
            out[:] = arr[rows - c * R]
            return out
        # one pass per chunk over its own rows (a mask over all rows per chunk cost a third of a
        # pool epoch on the EC dimers: a random draw of copies touches every chunk)
        order = np.argsort(cid, kind="stable")
        sc = cid[order]
        for grp in np.split(order, np.flatnonzero(sc[1:] != sc[:-1]) + 1):
            c = int(cid[grp[0]])
            out[grp] = chunks[c][rows[grp] - c * R]
        return out

    def close(self):
        self._chunks.clear()
        if self._h5 is not None:
            try:
                self._h5.close()
            except Exception:
                pass
            self._h5 = None


class FeatureBatch:
    """An energy-only batch carrying cached descriptors (``features``) instead of positions and
    pairs.  Same fields as ``Batch`` for what energy training and normalisation read, plus
    ``structures`` (the Structure records, in batch order)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    positions = None

    def to(self, device=None, dtype=None):
        return FeatureBatch(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                               for k, v in self.__dict__.items()})

    @property
    def n_atoms(self) -> int:
        return int(self.features.shape[0])


def feature_batch(structures, cache: FeatureCache, species, device="cpu") -> FeatureBatch:
    """Batch of ``structures`` (Structure records with their data-set ``index``) using cached
    descriptors; the atom order is that of ``collate``."""
    from ase.data import atomic_numbers

    from ..errors import InputError
    from .batch import species_symbols

    z_to_idx = np.full(256, -1, dtype=np.int64)
    for k, s in enumerate(species_symbols(species)):
        z_to_idx[atomic_numbers[s]] = k
    B = len(structures)
    numbers = np.concatenate([np.asarray(s.numbers, dtype=np.int64) for s in structures])
    spec = z_to_idx[np.clip(numbers, 0, 255)]
    if (spec < 0).any():
        raise InputError(f"element Z={int(numbers[np.nonzero(spec < 0)[0][0]])} is not in the species list {species}")
    natoms = np.array([len(s.numbers) for s in structures], dtype=np.int64)
    index = np.array([s.index for s in structures], dtype=np.int64)
    G = cache.features(index)
    dev = torch.device(device)
    t = lambda a, dt: torch.as_tensor(a, dtype=dt).to(dev)  # noqa: E731
    return FeatureBatch(
        features=t(G, torch.float64), species=t(spec, torch.long),
        structure=t(np.repeat(np.arange(B), natoms), torch.long), n_structures=B,
        natoms=t(natoms, torch.long), energy=t([float(s.energy) for s in structures], torch.float64),
        has_forces=t([s.forces is not None for s in structures], torch.bool),
        weight=t([float(getattr(s, "weight", 1.0)) for s in structures], torch.float64),
        index=t(index, torch.long),
        # the records themselves: position-dependent energy terms without parameters (ZBL) are
        # constants of each structure in energy training and are computed from them
        structures=list(structures))


# ------------------------------------------------------------------------------------ writer
def compute_features(structures, descriptor, species, kernels: str, device="cpu") -> np.ndarray:
    from .batch import collate

    batch = collate(structures, species=species, cutoff=descriptor.cutoff, dtype=torch.float64, device=device)
    with torch.no_grad():
        G = descriptor(batch.positions, batch.species, batch.pair_i, batch.pair_j, batch.pair_shift,
                       pair_ptr=batch.pair_ptr, kernels=kernels)
    return G.detach().to("cpu", torch.float64).numpy()


WRITE_BLOCK_BYTES = 64 << 20   # descriptors a rank computes before its turn to write


def featurize(ds, species, spec: DescriptorSpec, kernels: str, out_path, ctx=None, batch_atoms: int = 4096,
              device="cpu", log_fn=None, block_bytes: int = WRITE_BLOCK_BYTES) -> Path:
    """Compute the descriptors of ``spec`` for every structure of ``ds`` into ``out_path`` with
    ``kernels`` ('fused' or 'reference'; collective over ``ctx``: every rank must call it).
    Returns the path.

    Memory is bounded by ``block_bytes`` per rank, whatever the data set: the work goes in
    rounds; in each round every rank computes the next block of its range and the ranks write
    their blocks one after the other (HDF5 files are written by one process at a time)."""
    import h5py

    import contextlib

    from ..data.stream import make_batches, partition_by_atoms
    from ..errors import StorageError
    from ..utils.io import clean_stale_temps, rename_target, storage_error, temp_path

    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    # a link is written through (its target replaced, the link kept), as every atomic write does:
    # the rename replaced the link itself by a plain file beside it (sweep 20)
    out_path = rename_target(out_path)
    key = spec.key(species)
    dim = int(key["dim"])
    desc = spec.build(species).to(device)
    natoms = np.asarray(ds.natoms, dtype=np.int64)
    off = np.zeros(len(natoms) + 1, dtype=np.int64)
    np.cumsum(natoms, out=off[1:])
    parts = partition_by_atoms(natoms, None, world)
    block_atoms = max(int(batch_atoms), int(block_bytes) // (8 * max(dim, 1)))
    # every rank knows every rank's block count: the same number of rounds everywhere
    n_rounds = max(len(make_batches(p, natoms, block_atoms, 1 << 30)) for p in parts)
    blocks = make_batches(parts[rank], natoms, block_atoms, 1 << 30)

    _check_space(out_path, int(off[-1]) * dim * 8)     # every rank, the same answer: none waits
    tmp, err = (temp_path(out_path), None) if rank == 0 else (None, None)
    if rank == 0:
        fp = {"content": ds.content_id, "files": [os.path.basename(str(p)) for p in ds.paths]}
        try:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            clean_stale_temps(out_path.parent)
            with h5py.File(tmp, "w") as f:
                # fletcher32: a damaged block is an error on read, not features silently trained on
                f.create_dataset("features", shape=(int(off[-1]), dim), dtype=np.float64,
                                 chunks=(max(1, min(FeatureCache.CHUNK_ROWS, int(off[-1]))), dim) if off[-1] else None,
                                 fletcher32=bool(off[-1]))
                f.create_dataset("atom_offset", data=off)
                f.attrs["format"] = FORMAT
                f.attrs["version"] = VERSION
                f.attrs["complete"] = False
                f.attrs["key"] = json.dumps(key)
                f.attrs["data"] = json.dumps(fp)
                f.attrs["n_structures"] = len(natoms)
                f.attrs["n_atoms"] = int(off[-1])
                f.attrs["dim"] = dim
                f.attrs["backend"] = kernels
        except OSError as exc:
            # a read-only data folder (the default cache sits beside the data): a traceback
            # before (sweep 20), and under MPI the other ranks waited at the next barrier
            with contextlib.suppress(OSError):
                tmp.unlink()
            e = storage_error(exc, out_path, "write the descriptor cache")
            err = str(e) if e is not None else f"cannot write the descriptor cache {out_path}: {exc}"
    if ctx is not None:
        tmp, err = ctx.broadcast_object((tmp, err))
    if err is not None:             # every rank: none waits for the others
        raise StorageError(f"{err}; point descriptor.cache_file (featurize -o) to a writable folder, or set "
                           f"descriptor.cache: off")
    for k in range(n_rounds):
        G = None
        if k < len(blocks):
            parts_k = [compute_features(ds.read(chunk), desc, species, kernels, device)
                       for chunk in make_batches(blocks[k], natoms, batch_atoms, 1 << 30)]
            G = np.concatenate(parts_k) if len(parts_k) > 1 else parts_k[0]
            del parts_k
        for r in range(world):
            if ctx is not None:
                # a round is one block per rank: a partner missing for DISTMLIP_DIST_TIMEOUT is
                # frozen, and the job ends instead of hanging
                ctx.barrier(deadline=True)
            if r == rank and G is not None:
                a, b = int(off[blocks[k][0]]), int(off[blocks[k][-1] + 1])
                with h5py.File(tmp, "r+") as f:
                    f["features"][a:b] = G
        del G
    if ctx is not None:
        ctx.barrier(deadline=True)
    if rank == 0:
        with h5py.File(tmp, "r+") as f:
            f.attrs["complete"] = True
        os.replace(tmp, out_path)
        # read back what is now under the name: another job may have renamed its own cache there
        FeatureCache(out_path, ds, species, spec).close()
        if log_fn is not None:
            log_fn(f"descriptor cache {out_path}: {len(natoms)} structures, {int(off[-1])} atoms x {dim} "
                   f"features ({kernels} kernels, {world} rank(s))")
    if ctx is not None:
        ctx.barrier(deadline=True)
    return out_path


def _check_space(out_path: Path, nbytes: int) -> None:
    """Refuse a cache the disk cannot take, before writing: HDF5 meets a full disk at a flush
    and h5py then crashed in its deallocation (exit 139, the temporary file left behind)."""
    from ..errors import StorageError
    from ..utils.io import free_bytes

    free, need = free_bytes(out_path.parent), int(nbytes * 1.02) + (1 << 20)
    if free is not None and free < need:
        raise StorageError(f"cannot write the descriptor cache {out_path}: {need / 1e6:.1f} MB needed, "
                           f"{free / 1e6:.1f} MB free in {out_path.parent} (disk full); free space, point "
                           f"descriptor.cache_file elsewhere, or set descriptor.cache: off")


def open_or_build(ds, species, spec: DescriptorSpec, kernels: str, path=None, mode: str = "auto", ctx=None,
                  log_fn=None, warn_fn=None):
    """The training-side entry (collective): a valid :class:`FeatureCache` or None.

    ``mode`` 'off': None.  'auto': use the cache if valid; if missing or stale, build it when its
    folder is writable (else None, descriptors computed on the fly).  'on': as auto, but an
    unwritable folder is an error."""
    if mode == "off":
        return None
    path = Path(path) if path else default_cache_path(ds.paths, spec, species)
    rank0 = ctx is None or ctx.rank == 0
    status = None
    if rank0:
        try:
            FeatureCache(path, ds, species, spec).close()
            status = "ok"
        except StaleCacheError as exc:
            status = "missing" if not path.exists() else f"stale: {exc}"
    if ctx is not None:
        status = ctx.broadcast_object(status)
    if status != "ok":
        writable = os.access(path.parent if path.parent.exists() else Path("."), os.W_OK)
        if ctx is not None:
            writable = bool(ctx.broadcast_object(writable))
        if not writable:
            if mode == "on":
                raise ConfigError(f"descriptor.cache: on, but the cache {path} is {status.split(':')[0]} and its "
                                  f"folder is not writable (set descriptor.cache_file)")
            if warn_fn is not None and rank0:
                # (a read-only data folder cost every step its descriptors without a word, sweep 20)
                warn_fn(f"descriptor cache {path} is {status.split(':')[0]} and its folder is not writable: "
                        f"training without a descriptor cache (descriptors computed every step); set "
                        f"descriptor.cache_file to a writable place to build one, or descriptor.cache: off")
            return None
        if status.startswith("stale") and warn_fn is not None and rank0:
            warn_fn(status[len("stale: "):] + " -- rebuilding it")
        from ..errors import StorageError
        try:
            featurize(ds, species, spec, kernels, path, ctx, log_fn=log_fn)
        except StorageError as exc:
            # the space check runs on every rank before anything is written: all land here
            if mode == "on":
                raise
            if warn_fn is not None and rank0:
                warn_fn(f"{exc}; training without a descriptor cache (descriptors computed every step)")
            return None
    return FeatureCache(path, ds, species, spec, check=False)


# ------------------------------------------------------------------------------------ CLI
def _spec_options():
    """(flag, field name, type) of every DescriptorSpec field: the CLI's flags follow the spec."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(DescriptorSpec)
    return [("--" + f.name.replace("_", "-"), f.name, hints[f.name]) for f in dataclasses.fields(DescriptorSpec)]


def add_arguments(p) -> None:
    p.add_argument("data", nargs="+", help="HDF5 data set (shards are read as one data set)")
    p.add_argument("--config", help="training YAML: the descriptor section, model.species and "
                                    "descriptor.cache_file are taken from it")
    p.add_argument("-o", "--output", help="cache file (default: <first data file>.desc-<digest>.h5)")
    for flag, name, tp in _spec_options():
        p.add_argument(flag, dest=name, type=tp, help=f"descriptor {name} (overrides the config)")
    p.add_argument("--species", help="comma-separated species list (default: the data set's)")
    p.add_argument("--backend", choices=["auto", "fused", "reference"], default=None)
    p.add_argument("--batch-atoms", type=int, default=4096)
    p.add_argument("--block-mb", type=float, default=WRITE_BLOCK_BYTES / (1 << 20),
                   help="descriptors a rank holds before writing them (MiB; bounds its memory)")
    p.add_argument("--check", action="store_true", help="only check whether the cache is valid (exit 1 if not)")
    p.add_argument("--device", default="cpu")


def run(args) -> int:
    import dataclasses

    from ..config import from_dict, load_yaml
    from ..data.h5store import H5Dataset
    from ..distributed import init_distributed, shutdown
    from ..utils.log import log
    from .spec import DescriptorConfig, choose_kernels

    dcfg, species = DescriptorConfig(), None
    if args.config:
        data = load_yaml(args.config)
        dcfg = from_dict(DescriptorConfig, data.get("descriptor"), source=args.config, path="descriptor")
        species = ((data.get("model") or {}).get("species")) or None
    out = args.output or dcfg.cache_file
    over = {name: getattr(args, name) for _, name, _ in _spec_options() if getattr(args, name) is not None}
    spec = dataclasses.replace(dcfg.spec, **over) if over else dcfg.spec
    backend = args.backend or dcfg.backend
    if args.species:
        species = [s.strip() for s in args.species.split(",") if s.strip()]
    ds = H5Dataset(args.data)
    species = species or list(ds.species)
    missing = [s for s in ds.species if s not in species]
    if missing:
        raise ConfigError(f"species list {species} lacks {missing} present in {args.data}")
    path = Path(out) if out else default_cache_path(ds.paths, spec, species)
    if args.check:
        try:
            FeatureCache(path, ds, species, spec)
        except StaleCacheError as exc:
            print(str(exc))
            return 1
        print(f"{path}: valid descriptor cache for {', '.join(map(str, args.data))}")
        return 0
    _check_cutoff(ds, spec)
    ctx = init_distributed(args.device)
    try:
        import time

        t0 = time.time()
        featurize(ds, species, spec, choose_kernels(ctx.device, backend), path, ctx, batch_atoms=args.batch_atoms,
                  device=ctx.device, log_fn=log, block_bytes=int(args.block_mb * (1 << 20)))
        log(f"featurize finished in {time.time() - t0:.2f} s")
        return 0
    finally:
        shutdown()


def _check_cutoff(ds, spec: DescriptorSpec, sample: int = 200) -> None:
    """Refuse a cutoff below every interatomic distance of (a sample of) the data: every
    descriptor would be zero (the training's check reads all structures, Trainer._check_cutoff)."""
    from ..data.validate import min_interatomic_distance

    idx = np.unique(np.linspace(0, ds.n_structures - 1, min(sample, ds.n_structures)).astype(np.int64))
    structures = ds.read(idx) if ds.n_structures else []
    # pairs searched within the cutoff only: a 20 A search lists thousands of periodic images per
    # small cell (13 s for 200 4-atom cells, most of featurizing 10^4 of them)
    d = [min_interatomic_distance(s, spec.cutoff)[0] for s in structures]
    if d and min(d) >= spec.cutoff:
        # the error path: the shortest distance of a few structures, to say how far off it is
        far = min(min_interatomic_distance(s, 20.0)[0] for s in structures[:10])
        raise ConfigError(f"descriptor cutoff {spec.cutoff:g} A is below every interatomic distance of "
                          f"{', '.join(map(str, ds.paths))} (none of {len(idx)} structures has a pair within "
                          f"it; the shortest in the first {min(10, len(idx))} is "
                          + (f"{far:.3f} A" if np.isfinite(far) else "beyond 20 A")
                          + "): every descriptor would be zero; raise rc_radial (typically 4-7 A)")


class FeatureBatchLoader:
    """Batches of cached descriptors built from per-structure columns held in memory (species of
    every atom, energies, weights, ...): no read of the data set per batch.  A loader of the
    training stream (``PartitionedStream(loader=...)``); memory: one byte per atom plus a few
    numbers per structure beyond the cache itself."""

    def __init__(self, cache: FeatureCache, ds, species, frozen_energy=None, keep_bytes: int = 0,
                 frozen_zero=None):
        """``frozen_energy``: optional callable (list of Structure) -> per-atom energies [N] of
        the model's terms without trainable parameters (ZBL): constants of fixed structures,
        computed the first time a structure is batched and kept (8 bytes per atom of this
        rank's structures); batches then carry them as ``frozen_energy``.  ``keep_bytes`` > 0:
        assembled batches are kept for reuse up to that many bytes (fixed batches: every epoch
        asks for the same index sets; the batches returned are then shared, not to be changed).
        ``frozen_zero``: optional bool array over ``ds``: structures known to have zero frozen
        energies (no pair inside a ZBL radius), which need no read and no pair list."""
        from ..errors import InputError
        from .batch import species_table

        _, z_to_idx = species_table(species)
        numbers = np.concatenate([blk for _, _, blk in ds.iter_atom_blocks("numbers")]) if ds.n_atoms \
            else np.zeros(0, np.uint8)
        spec = z_to_idx[np.clip(numbers.astype(np.int64), 0, len(z_to_idx) - 1)]
        if (spec < 0).any():
            raise InputError(f"{', '.join(ds.paths)}: element Z={int(numbers[np.nonzero(spec < 0)[0][0]])} is not in "
                             f"the species list {list(species)}")
        self.cache = cache
        self.species = spec.astype(np.int8 if len(species) < 128 else np.int16)
        self.natoms = np.asarray(ds.natoms, dtype=np.int64)
        self.offset = np.concatenate([[0], np.cumsum(self.natoms)])
        self.energy = np.asarray(ds.column("energy"), dtype=np.float64)
        self.weight = np.asarray(ds.column("weight"), dtype=np.float64)
        self.has_forces = np.asarray(ds.column("has_forces"), dtype=bool)
        self.ds, self.frozen_fn, self._frozen = ds, frozen_energy, {}
        self.frozen_zero = None if frozen_zero is None else np.asarray(frozen_zero, dtype=bool)
        self.kept = KeptBatches(keep_bytes)

    def cheap(self, indices) -> bool:
        # a structure whose frozen energies are not known yet needs a read of the data set
        if indices in self.kept:
            return True
        return self.frozen_fn is None or all(int(i) in self._frozen or (self.frozen_zero is not None
                                                                        and self.frozen_zero[int(i)])
                                             for i in indices)

    def _frozen_energy(self, idx) -> np.ndarray:
        zero = self.frozen_zero
        missing = [int(i) for i in idx if int(i) not in self._frozen and (zero is None or not zero[int(i)])]
        if missing:
            structures = self.ds.read(missing)
            for i, s, e in zip(missing, structures, self._split(self.frozen_fn(structures), structures)):
                self._frozen[i] = e
        if zero is not None and zero[idx].all():
            return np.zeros(int(self.natoms[idx].sum()))
        return np.concatenate([self._frozen[int(i)] if int(i) in self._frozen else np.zeros(int(self.natoms[i]))
                               for i in idx]) if len(idx) else np.zeros(0)

    @staticmethod
    def _split(e, structures):
        e = np.asarray(e.detach().cpu() if isinstance(e, torch.Tensor) else e, dtype=np.float64)
        return np.split(e, np.cumsum([len(s.numbers) for s in structures])[:-1])

    def __call__(self, indices) -> FeatureBatch:
        idx = np.asarray(indices, dtype=np.int64)
        return self.kept.get(idx, lambda: self._assemble(idx))

    def _assemble(self, idx) -> FeatureBatch:
        n = self.natoms[idx]
        # every atom of the batch: structure k's atoms offset_k .. offset_k + n_k - 1, in order
        start = self.offset[idx]
        spec = self.species[np.arange(int(n.sum()), dtype=np.int64) + np.repeat(start - (np.cumsum(n) - n), n)]
        t = torch.as_tensor
        return FeatureBatch(
            features=t(self.cache.features(idx), dtype=torch.float64), species=t(spec.astype(np.int64)),
            structure=t(np.repeat(np.arange(len(idx)), n)), n_structures=len(idx), natoms=t(n),
            energy=t(self.energy[idx]), has_forces=t(self.has_forces[idx]), weight=t(self.weight[idx]),
            index=t(idx), frozen_energy=None if self.frozen_fn is None else t(self._frozen_energy(idx)))
