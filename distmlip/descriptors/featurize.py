"""Descriptor cache for energy-only training: ``distmlip featurize DATA.h5 [...] --config train.yaml``.

Energy-mode training (and training on GPR-augmented data, M = 10-40 times the original set) needs
the descriptors of fixed structures only, so they can be computed once.  ``featurize`` computes
them with the fused kernels (fallback: the PyTorch reference), spread over the MPI ranks, into a
companion HDF5 file (default ``<first data file>.desc-<digest of spec and species>.h5``, so
that runs with other descriptor settings never share a file)::

    attrs   format = "distmlip-descriptor-cache", version = 2, complete = True,
            key (JSON: the descriptor spec's fields, species, dim: DescriptorSpec.key),
            data (JSON: content: the data set's content digest, H5Dataset.content_id; files),
            n_structures, n_atoms, dim
    features      [n_atoms, dim] float64   in data-set atom order (all shards concatenated)
    atom_offset   [n_structures + 1] int64

Parallel write: each rank takes a contiguous, atom-balanced range of structures
(``partition_by_atoms``); rank 0 creates a temporary file (a name of its own: host, pid, random)
with the datasets pre-allocated, the ranks write their regions one after the other, rank 0 marks
it complete and renames it into place (atomic), and the file is opened again with its key checked,
so a job never reads another job's descriptors.  Results do not depend on the number of ranks (each atom's descriptor depends
on its own neighbourhood only; tested bit for bit).

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
from .spec import DescriptorSpec

FORMAT = "distmlip-descriptor-cache"
VERSION = 2


class StaleCacheError(DataFormatError):
    """The cache file does not belong to these data / descriptor parameters."""


# ------------------------------------------------------------------------------------ keys
def default_cache_path(data_paths, spec: DescriptorSpec, species) -> Path:
    paths = [data_paths] if isinstance(data_paths, (str, os.PathLike)) else list(data_paths)
    tag = hashlib.sha256(json.dumps(spec.key(species), sort_keys=True).encode()).hexdigest()[:10]
    return Path(f"{paths[0]}.desc-{tag}.h5")


# ------------------------------------------------------------------------------------ reader
class FeatureCache:
    """Cached descriptors of a data set.  ``features(indices)`` -> float64 [sum natoms, D] in the
    order of ``indices``; ``preload(indices)`` keeps the rows spanning those structures in memory
    (when at most ``max_bytes``), else rows are read from the file per call."""

    def __init__(self, path, ds, species, spec: DescriptorSpec, check: bool = True):
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise StaleCacheError(f"descriptor cache {self.path} does not exist")
        try:
            with h5py.File(self.path, "r") as f:
                a = f.attrs
                if a.get("format") != FORMAT or int(a.get("version", -1)) != VERSION:
                    raise DataFormatError(f"{self.path}: not a distmlip descriptor cache (format "
                                          f"{a.get('format')!r} version {a.get('version')!r})")
                if not a.get("complete", False):
                    raise StaleCacheError(f"{self.path}: incomplete descriptor cache (writer did not finish)")
                key = json.loads(a["key"])
                data = json.loads(a["data"])
                self.atom_offset = f["atom_offset"][...].astype(np.int64)
                self.dim = int(a["dim"])
                shape = f["features"].shape
        except DataFormatError:
            raise
        except (OSError, KeyError, ValueError) as exc:
            raise DataFormatError(f"{self.path}: corrupt descriptor cache ({type(exc).__name__}: {exc})") from None
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
        self._mem = None
        self._mem_start = 0
        self._h5 = None
        self._pid = None

    def _dset(self):
        import h5py

        if self._pid != os.getpid() or self._h5 is None:
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h5["features"]

    def preload(self, indices, max_bytes: int = 2 << 30) -> bool:
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) == 0:
            return True
        A, B = int(self.atom_offset[idx.min()]), int(self.atom_offset[idx.max() + 1])
        if (B - A) * self.dim * 8 > max_bytes:
            return False
        self._mem = np.asarray(self._dset()[A:B], dtype=np.float64)
        self._mem_start, self._mem_end = A, B
        return True

    def features(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        lo, hi = self.atom_offset[idx], self.atom_offset[idx + 1]
        if self._mem is not None and len(idx) and lo.min() >= self._mem_start and hi.max() <= self._mem_end:
            m, s0 = self._mem, self._mem_start
            return np.concatenate([m[a - s0:b - s0] for a, b in zip(lo, hi)]) if len(idx) \
                else np.zeros((0, self.dim))
        d = self._dset()
        return np.concatenate([d[int(a):int(b)] for a, b in zip(lo, hi)]) if len(idx) else np.zeros((0, self.dim))

    def close(self):
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


def featurize(ds, species, spec: DescriptorSpec, kernels: str, out_path, ctx=None, batch_atoms: int = 4096,
              device="cpu", log_fn=None) -> Path:
    """Compute the descriptors of ``spec`` for every structure of ``ds`` into ``out_path`` with
    ``kernels`` ('fused' or 'reference'; collective over ``ctx``: every rank must call it).
    Returns the path."""
    import h5py

    from ..data.stream import make_batches, partition_by_atoms

    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    out_path = Path(out_path)
    key = spec.key(species)
    desc = spec.build(species).to(device)
    natoms = np.asarray(ds.natoms, dtype=np.int64)
    off = np.zeros(len(natoms) + 1, dtype=np.int64)
    np.cumsum(natoms, out=off[1:])
    mine = partition_by_atoms(natoms, None, world)[rank]
    # descriptors of this rank's range, in memory until its turn to write
    parts = []
    for chunk in make_batches(mine, natoms, batch_atoms, 1 << 30):
        parts.append(compute_features(ds.read(chunk), desc, species, kernels, device))
    G = np.concatenate(parts) if parts else np.zeros((0, key["dim"]))
    from ..utils.io import clean_stale_temps, temp_path

    tmp = temp_path(out_path) if rank == 0 else None
    if ctx is not None:
        tmp = ctx.broadcast_object(tmp)
    if rank == 0:
        fp = {"content": ds.content_id, "files": [os.path.basename(str(p)) for p in ds.paths]}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(out_path.parent)
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", shape=(int(off[-1]), key["dim"]), dtype=np.float64,
                             chunks=(max(1, min(4096, int(off[-1]))), key["dim"]) if off[-1] else None)
            f.create_dataset("atom_offset", data=off)
            f.attrs["format"] = FORMAT
            f.attrs["version"] = VERSION
            f.attrs["complete"] = False
            f.attrs["key"] = json.dumps(key)
            f.attrs["data"] = json.dumps(fp)
            f.attrs["n_structures"] = len(natoms)
            f.attrs["n_atoms"] = int(off[-1])
            f.attrs["dim"] = key["dim"]
            f.attrs["backend"] = kernels
    for r in range(world):
        if ctx is not None:
            ctx.barrier()
        if r == rank and len(mine):
            a, b = int(off[mine[0]]), int(off[mine[-1] + 1])
            with h5py.File(tmp, "r+") as f:
                f["features"][a:b] = G
    if ctx is not None:
        ctx.barrier()
    if rank == 0:
        with h5py.File(tmp, "r+") as f:
            f.attrs["complete"] = True
        os.replace(tmp, out_path)
        # read back what is now under the name: another job may have renamed its own cache there
        FeatureCache(out_path, ds, species, spec).close()
        if log_fn is not None:
            log_fn(f"descriptor cache {out_path}: {len(natoms)} structures, {int(off[-1])} atoms x {key['dim']} "
                   f"features ({kernels} kernels, {world} rank(s))")
    if ctx is not None:
        ctx.barrier()
    return out_path


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
            return None
        if status.startswith("stale") and warn_fn is not None and rank0:
            warn_fn(status[len("stale: "):] + " -- rebuilding it")
        featurize(ds, species, spec, kernels, path, ctx, log_fn=log_fn)
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
    ctx = init_distributed(args.device)
    try:
        import time

        t0 = time.time()
        featurize(ds, species, spec, choose_kernels(ctx.device, backend), path, ctx, batch_atoms=args.batch_atoms,
                  device=ctx.device, log_fn=log)
        log(f"featurize finished in {time.time() - t0:.2f} s")
        return 0
    finally:
        shutdown()
