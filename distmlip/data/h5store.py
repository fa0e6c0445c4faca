"""HDF5 data set: writer (atomic: temporary file, rename on success) and lazy reader.

Layout (see docs/data_format.md)::

    /                  attrs: format, version, units, species, provenance, reference_energies,
                              n_structures, n_atoms
    /atoms/numbers     [N]       uint8
    /atoms/positions   [N, 3]    float64  Angstrom
    /atoms/forces      [N, 3]    float64  eV/Angstrom (zeros where has_forces is False)
    /structures/atom_offset [S] int64, natoms [S] int32, energy [S] float64, cell [S,3,3] float64,
               pbc [S,3] bool, subset [S] int32, has_forces [S] bool, synthetic [S] bool,
               parent [S] int64, uncertainty [S] float64, weight [S] float64,
               source_file [S] int32, source_index [S] int64, (optional) split [S] int8,
               (version >= 2) stress [S,3,3] float64 eV/Angstrom^3 (ASE sign; zeros where
               has_stress is False), has_stress [S] bool
    /sources/files     [F]       str       file names referenced by structures/source_file
    /subsets/name, composition [K] str; natoms, count [K]; order_offset [K] int64,
             order_length [K] int32, order_numbers [*] uint8 (atom order of homogeneous subsets),
             (optional) copies_per_epoch [K] int32 (augment's copies: auto, pool: copies of each
             reference that training draws per epoch from its pool; absent: 0, all)
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
from pathlib import Path

import numpy as np

from ..errors import DataFormatError
from .structure import Structure

FORMAT_NAME = "distmlip-dataset"
# 2: per-structure stress (``structures/stress``, ``structures/has_stress``); version 1 files are
#    read as structures without stress
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
UNITS = {"energy": "eV", "length": "Angstrom", "force": "eV/Angstrom", "stress": "eV/Angstrom^3"}
ATOM_CHUNK = 4096        # atoms per chunk of the per-atom arrays (96 KiB of positions)
STRUCT_CHUNK = 1024      # structures per chunk of the per-structure arrays
FLUSH_ATOMS = 1 << 18    # writer buffer

STRUCT_FIELDS = {  # name: (dtype, trailing shape, fill for new rows)
    "atom_offset": (np.int64, ()),
    "natoms": (np.int32, ()),
    "energy": (np.float64, ()),
    "cell": (np.float64, (3, 3)),
    "pbc": (np.bool_, (3,)),
    "subset": (np.int32, ()),
    "has_forces": (np.bool_, ()),
    "synthetic": (np.bool_, ()),
    "parent": (np.int64, ()),
    "uncertainty": (np.float64, ()),
    "weight": (np.float64, ()),
    "source_file": (np.int32, ()),
    "source_index": (np.int64, ()),
    "stress": (np.float64, (3, 3)),
    "has_stress": (np.bool_, ()),
}
# fields added after version 1: absent from older files, read as their fill (no stress)
OPTIONAL_STRUCT_FIELDS = ("stress", "has_stress")
ATOM_FIELDS = {"numbers": (np.uint8, ()), "positions": (np.float64, (3,)), "forces": (np.float64, (3,))}


def provenance(extra: dict | None = None) -> dict:
    from .. import __version__

    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    if prog in ("__main__.py", "cli.py"):
        prog = "distmlip"
    p = {"command": " ".join([prog] + sys.argv[1:]),
         "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "distmlip_version": __version__}
    if extra:
        p.update(extra)
    return p


def _symbols(zs) -> list[str]:
    from ase.data import chemical_symbols

    return [chemical_symbols[int(z)] for z in zs]


def _numbers(symbols) -> list[int]:
    from ase.data import atomic_numbers

    return [atomic_numbers[s] for s in symbols]


def structures_to_arrays(structures: list[Structure]) -> tuple[dict, dict, list[str]]:
    """Structures -> (per-atom arrays, per-structure arrays, source table).  atom_offset is
    local (starting at 0); source_file indexes the returned source table."""
    n = np.array([len(s.numbers) for s in structures], dtype=np.int64)
    total = int(n.sum())
    atoms = {"numbers": np.empty(total, np.uint8), "positions": np.empty((total, 3)),
             "forces": np.zeros((total, 3))}
    S = len(structures)
    st = {k: np.zeros((S,) + shp, dtype=dt) for k, (dt, shp) in STRUCT_FIELDS.items()}
    sources: list[str] = []
    src_id: dict[str, int] = {}
    off = 0
    for k, s in enumerate(structures):
        m = int(n[k])
        atoms["numbers"][off:off + m] = s.numbers
        atoms["positions"][off:off + m] = s.positions
        if s.forces is not None:
            atoms["forces"][off:off + m] = s.forces
        st["atom_offset"][k] = off
        st["natoms"][k] = m
        st["energy"][k] = s.energy
        st["cell"][k] = s.cell
        st["pbc"][k] = s.pbc
        st["subset"][k] = s.subset
        st["has_forces"][k] = s.forces is not None
        st["synthetic"][k] = s.synthetic
        st["parent"][k] = s.parent
        st["uncertainty"][k] = s.uncertainty
        st["weight"][k] = s.weight
        if s.source not in src_id:
            src_id[s.source] = len(sources)
            sources.append(s.source)
        st["source_file"][k] = src_id[s.source]
        st["source_index"][k] = s.source_index
        if s.stress is not None:
            st["stress"][k] = s.stress
            st["has_stress"][k] = True
        off += m
    return atoms, st, sources


# ---------------------------------------------------------------------------------------------
# content identity: a digest of everything a stage computes from, written by the writer into the
# file's attributes (so checking it later costs nothing) and recomputed from the arrays for files
# written without it.  One running sha256 per field, so the digest does not depend on how the
# writer's appends were batched.
_HASH_SKIP = ("atom_offset",)          # derived from natoms


def _canonical(arr, dt) -> bytes:
    return np.ascontiguousarray(np.asarray(arr), dtype=np.dtype(dt).newbyteorder("<")).tobytes()


class _ContentHash:
    def __init__(self, struct_fields: dict):
        import hashlib

        self._dtypes = {**{f"atoms/{k}": v[0] for k, v in ATOM_FIELDS.items()},
                        **{f"structures/{k}": v[0] for k, v in struct_fields.items() if k not in _HASH_SKIP}}
        self._h = {k: hashlib.sha256() for k in self._dtypes}

    def update(self, group: str, name: str, arr) -> None:
        key = f"{group}/{name}"
        if key in self._h:
            self._h[key].update(_canonical(arr, self._dtypes[key]))

    def digest(self, sources: list, subset_names: list) -> str:
        import hashlib

        h = hashlib.sha256()
        for k in sorted(self._h):
            h.update(k.encode() + b"\0" + self._h[k].digest())
        h.update(json.dumps([list(map(str, sources)), list(map(str, subset_names))]).encode())
        return h.hexdigest()


def file_content_hash(path) -> str:
    """The content digest of a data set file, computed from its arrays (streamed; about a
    second per million atoms).  The digest stored at writing is only compared: a file edited in
    place (h5py) keeps its old attribute, and caches or shards keyed on that attribute were reused
    for the new content (a descriptor cache of the old positions, augment copies of the old
    energies)."""
    import h5py

    with h5py.File(path, "r") as f:
        stored = f.attrs.get("content_sha256")
        fields = {k: v for k, v in STRUCT_FIELDS.items() if k in f["structures"]}
        if "split" in f["structures"]:
            fields["split"] = (np.int8, ())
        h = _ContentHash(fields)
        for group, names in (("atoms", ATOM_FIELDS), ("structures", fields)):
            for name in names:
                d = f[group][name]
                step = max(1, (1 << 22) // max(1, int(np.prod(d.shape[1:]) or 1)))
                for lo in range(0, d.shape[0], step):
                    h.update(group, name, d[lo:lo + step])
        dec = lambda xs: [x.decode() if isinstance(x, bytes) else str(x) for x in xs]  # noqa: E731
        digest = h.digest(dec(f["sources/files"][...]), dec(f["subsets/name"][...]))
    if stored and str(stored) != digest:
        from ..utils.log import warn
        warn(f"{path}: its content differs from the digest stored when it was written (edited in place?); "
             f"descriptor caches, augment shards and checkpoints made from the old content are not reused")
    return digest


class H5Writer:
    """Write a data set.  Use as a context manager; the file appears under ``path`` only when
    the block completes without an exception (temporary file + rename).

    subsets: None -> automatic (one subset per atom sequence, in order of first appearance;
    ``Structure.subset`` is ignored), or a list of dicts (name, composition, natoms[, order])
    whose indices ``Structure.subset`` refers to (e.g. ``H5Dataset.subsets`` of the parent data
    set when writing synthetic structures).
    species: list of symbols; None -> the elements present.
    reference_energies: {symbol: eV} stored as a root attribute (energies stay total energies).
    store_split: write the optional ``structures/split`` dataset (``append(..., split=...)``).
    """

    def __init__(self, path, species=None, subsets=None, reference_energies=None, provenance_info=None,
                 compression: str | None = "lzf", store_split: bool = False, atomic: bool = True):
        self.path = Path(path)
        self.species = list(species) if species is not None else None
        self.subsets_given = subsets is not None
        self.subsets = [dict(t) for t in subsets] if subsets is not None else []
        self._auto_ids: dict[bytes, int] = {}
        self.reference_energies = dict(reference_energies) if reference_energies else None
        self.provenance = provenance_info if provenance_info is not None else provenance()
        self.compression = compression
        self.store_split = store_split
        self.atomic = atomic
        self._stack = contextlib.ExitStack()
        self._h5 = None
        self._sources: list[str] = []
        self._source_id: dict[str, int] = {}
        self._seen_z: set[int] = set()
        self._buf: list[tuple[dict, dict]] = []
        self._buf_atoms = 0
        self.n_structures = 0
        self.n_atoms = 0
        self._closed = False
        fields = dict(STRUCT_FIELDS)
        if store_split:
            fields["split"] = (np.int8, ())
        self._hash = _ContentHash(fields)

    # -- context management -------------------------------------------------------------
    def __enter__(self):
        import h5py

        if self.atomic:
            from ..utils.io import atomic_path

            tmp = self._stack.enter_context(atomic_path(self.path))
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path
        self._tmp = Path(tmp)
        self._h5 = self._stack.enter_context(h5py.File(tmp, "w", libver=("earliest", "v110")))
        kw = {}
        if self.compression:
            kw = dict(compression=self.compression, shuffle=True, fletcher32=True)
        g = self._h5.create_group("atoms")
        for k, (dt, shp) in ATOM_FIELDS.items():
            g.create_dataset(k, shape=(0,) + shp, maxshape=(None,) + shp, dtype=dt,
                             chunks=(ATOM_CHUNK,) + shp, **kw)
        g = self._h5.create_group("structures")
        fields = dict(STRUCT_FIELDS)
        if self.store_split:
            fields["split"] = (np.int8, ())
        for k, (dt, shp) in fields.items():
            g.create_dataset(k, shape=(0,) + shp, maxshape=(None,) + shp, dtype=dt,
                             chunks=(STRUCT_CHUNK,) + shp, **kw)
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._abandon()
            self._stack.__exit__(exc_type, exc, tb)
            err = _storage_error(exc, self.path) if isinstance(exc, Exception) else None
            if err is not None and err is not exc:
                raise err from None
            return False
        try:
            self._finish()
        except BaseException as exc2:
            self._abandon()
            err = _storage_error(exc2, self.path)
            if err is not None:
                self._stack.__exit__(type(err), err, None)
                raise err from None
            if not self._stack.__exit__(*sys.exc_info()):
                raise
            return False
        self._stack.close()
        return False

    def _abandon(self) -> None:
        """Before a failed file is closed: empty it.  HDF5 flushes its caches at close; on a full
        disk that flush fails again, and h5py's clean-up of the failed handles crashed the process
        (SIGSEGV).  With the temporary file truncated the flush has room, and the file is removed
        afterwards anyway (the final name is never touched)."""
        if self.atomic and getattr(self, "_tmp", None) is not None:
            try:
                os.truncate(self._tmp, 0)
            except OSError:
                pass

    def set_subsets(self, table: list[dict]) -> None:
        """Replace the (explicit) subset table; may be called until the writer closes."""
        self.subsets_given = True
        self.subsets = [dict(t) for t in table]

    # -- appending -----------------------------------------------------------------------
    def append(self, structures: list[Structure], split=None) -> None:
        if not structures:
            return
        atoms, st, sources = structures_to_arrays(list(structures))
        if not self.subsets_given:
            st["subset"] = self._auto_subsets(atoms, st)
        self.append_arrays(atoms, st, sources, split=split)

    def _auto_subsets(self, atoms, st) -> np.ndarray:
        ids = np.empty(len(st["natoms"]), dtype=np.int32)
        for k in range(len(ids)):
            o, m = int(st["atom_offset"][k]), int(st["natoms"][k])
            key = atoms["numbers"][o:o + m].tobytes()
            if key not in self._auto_ids:
                from .subsets import composition_of

                order = np.frombuffer(key, dtype=np.uint8).astype(np.int64)
                comp = composition_of(order)
                n = sum(1 for t in self.subsets if t["composition"] == comp)
                self.subsets.append({"name": f"{comp}_{n}", "composition": comp, "natoms": m, "order": order})
                self._auto_ids[key] = len(self.subsets) - 1
            ids[k] = self._auto_ids[key]
        return ids

    def append_arrays(self, atoms: dict, st: dict, sources: list[str], split=None) -> None:
        """Low-level append: per-atom arrays, per-structure arrays (atom_offset local, starting
        at 0; source_file indexing ``sources``), as produced by ``structures_to_arrays``."""
        S = len(st["natoms"])
        if S == 0:
            return
        remap = np.array([self._add_source(s) for s in sources], dtype=np.int32)
        st = dict(st)
        st["source_file"] = remap[np.asarray(st["source_file"])]
        st["atom_offset"] = np.asarray(st["atom_offset"], dtype=np.int64) - int(st["atom_offset"][0])
        if self.store_split:
            if split is None:
                raise ValueError("store_split=True needs split= on every append")
            st["split"] = np.asarray(split, dtype=np.int8)
        if self.subsets_given and np.min(st["subset"]) < 0:
            raise ValueError("negative structure subset id with an explicit subset table")
        zs = np.unique(atoms["numbers"])
        self._seen_z.update(int(z) for z in zs)
        if self.species is not None:
            unknown = set(int(z) for z in zs) - set(_numbers(self.species))
            if unknown:
                raise ValueError(f"elements {_symbols(sorted(unknown))} not in species {self.species}")
        self._buf.append((atoms, st))
        self._buf_atoms += len(atoms["numbers"])
        if self._buf_atoms >= FLUSH_ATOMS:
            self._flush()

    def _add_source(self, name: str) -> int:
        if name not in self._source_id:
            self._source_id[name] = len(self._sources)
            self._sources.append(name)
        return self._source_id[name]

    def _flush(self) -> None:
        if not self._buf:
            return
        self._check_space(sum(arr.nbytes for a, st in self._buf for arr in (*a.values(), *st.values())))
        atoms = {k: np.concatenate([b[0][k] for b in self._buf]) for k in ATOM_FIELDS}
        st = {}
        base = 0
        offs = []
        for a, s in self._buf:
            offs.append(np.asarray(s["atom_offset"], dtype=np.int64) + base + self.n_atoms)
            base += len(a["numbers"])
        st["atom_offset"] = np.concatenate(offs)
        for k in self._h5["structures"]:
            if k != "atom_offset":
                st[k] = np.concatenate([b[1][k] for b in self._buf])
        self._buf = []
        self._buf_atoms = 0
        na, ns = len(atoms["numbers"]), len(st["natoms"])
        for k, arr in atoms.items():
            d = self._h5["atoms"][k]
            d.resize(self.n_atoms + na, axis=0)
            d[self.n_atoms:] = arr
            self._hash.update("atoms", k, arr)
        for k, arr in st.items():
            d = self._h5["structures"][k]
            d.resize(self.n_structures + ns, axis=0)
            d[self.n_structures:] = arr
            self._hash.update("structures", k, arr)
        self.n_atoms += na
        self.n_structures += ns
        # HDF5 keeps written chunks in its cache and reports a failed write when it evicts them,
        # possibly only inside h5py's deallocation (where the error is lost); flushing here makes
        # a full disk an exception of this call
        self._h5.flush()

    def _check_space(self, nbytes: int) -> None:
        """Refuse to start a write the disk cannot take (HDF5 reports a full disk only when it
        flushes, often at close): the uncompressed size plus room for the metadata."""
        from ..errors import StorageError
        from ..utils.io import free_bytes

        free = free_bytes(self._tmp.parent)
        need = int(nbytes) + (1 << 20)
        if free is not None and free < need:
            raise StorageError(f"cannot write {self.path}: no space left on the device (disk full): the next "
                               f"{need / 1e6:.1f} MB do not fit in the {free / 1e6:.1f} MB free in {self._tmp.parent}")

    def _finish(self) -> None:
        import h5py

        self._flush()
        f = self._h5
        strt = h5py.string_dtype()
        f.create_group("sources").create_dataset("files", data=np.array(self._sources, dtype=object),
                                                 dtype=strt)
        if self.species is None:
            self.species = _symbols(sorted(self._seen_z))
        subset_ids = f["structures/subset"][...] if self.n_structures else np.zeros(0, np.int32)
        if len(subset_ids) and int(subset_ids.max()) >= len(self.subsets):
            raise ValueError(f"structure subset id {int(subset_ids.max())} outside the subset table "
                             f"({len(self.subsets)} entries)")
        counts = np.bincount(subset_ids, minlength=len(self.subsets)) if len(subset_ids) else np.zeros(len(self.subsets), np.int64)
        g = f.create_group("subsets")
        g.create_dataset("name", data=np.array([t["name"] for t in self.subsets], dtype=object), dtype=strt)
        g.create_dataset("composition", data=np.array([t.get("composition", "") for t in self.subsets], dtype=object),
                         dtype=strt)
        g.create_dataset("natoms", data=np.array([t.get("natoms", -1) for t in self.subsets], dtype=np.int32))
        g.create_dataset("count", data=np.asarray(counts, dtype=np.int64))
        orders = [np.asarray(t["order"] if t.get("order") is not None else [], dtype=np.uint8) for t in self.subsets]
        lens = np.array([len(o) for o in orders], dtype=np.int32)
        g.create_dataset("order_length", data=lens)
        g.create_dataset("order_offset", data=(np.cumsum(lens) - lens).astype(np.int64))
        g.create_dataset("order_numbers", data=np.concatenate(orders) if orders else np.zeros(0, np.uint8),
                         dtype=np.uint8)
        draws = [int(t.get("copies_per_epoch") or 0) for t in self.subsets]
        if any(draws):      # optional (augment's pool): absent means 0 everywhere
            g.create_dataset("copies_per_epoch", data=np.asarray(draws, dtype=np.int32))
        a = f.attrs
        a["format"] = FORMAT_NAME
        a["version"] = FORMAT_VERSION
        a["units"] = json.dumps(UNITS)
        a["species"] = json.dumps(list(self.species))
        a["provenance"] = json.dumps(self.provenance)
        a["reference_energies"] = json.dumps(self.reference_energies or {})
        a["n_structures"] = self.n_structures
        a["n_atoms"] = self.n_atoms
        a["content_sha256"] = self._hash.digest(self._sources, [t["name"] for t in self.subsets])
        a["complete"] = True
        f.flush()


def _storage_error(exc, path):
    from ..utils.io import storage_error

    err = storage_error(exc, path)
    if err is None and ("errno = 28" in str(exc) or "No space left" in str(exc)):   # HDF5's own wording
        from ..errors import StorageError

        err = StorageError(f"cannot write {path}: no space left on the device (disk full)")
    return err


def write_dataset(path, structures: list[Structure], **kwargs) -> Path:
    """Write ``structures`` to a new data set at ``path`` (atomically).  kwargs: see H5Writer;
    ``split=array`` stores an explicit split."""
    split = kwargs.pop("split", None)
    if split is not None:
        kwargs["store_split"] = True
    with H5Writer(path, **kwargs) as w:
        w.append(list(structures), split=split)
    return Path(path)


# ---------------------------------------------------------------------------------------------
class _Shard:
    def __init__(self, path: str):
        import h5py

        self.path = path
        if not os.path.isfile(path):
            raise DataFormatError(f"{path}: data set file does not exist")
        try:
            with h5py.File(path, "r") as f:
                a = f.attrs
                if a.get("format") != FORMAT_NAME:
                    raise DataFormatError(f"{path}: not a distmlip data set (format attribute "
                                          f"{a.get('format')!r}, expected {FORMAT_NAME!r})")
                ver = int(a.get("version", -1))
                if ver not in READABLE_VERSIONS:
                    raise DataFormatError(f"{path}: data set format version {ver} is not supported "
                                          f"(this distmlip reads versions "
                                          f"{', '.join(map(str, READABLE_VERSIONS))}); re-run distmlip convert")
                self.version = ver
                if not a.get("complete", False):
                    raise DataFormatError(f"{path}: incomplete data set (writer did not finish)")
                self.species = json.loads(a["species"])
                self.reference_energies = json.loads(a.get("reference_energies", "{}"))
                self.provenance = json.loads(a.get("provenance", "{}"))
                self.units = json.loads(a.get("units", "{}"))
                s = f["structures"]
                self.natoms = s["natoms"][...].astype(np.int64)
                self.atom_offset = s["atom_offset"][...]
                self.subset = s["subset"][...].astype(np.int64)
                self.has_split = "split" in s
                S = int(a["n_structures"])
                N = int(a["n_atoms"])
                if len(self.natoms) != S or len(self.atom_offset) != S:
                    raise DataFormatError(f"{path}: field 'structures/natoms': {len(self.natoms)} "
                                          f"entries, attribute n_structures says {S} (truncated?)")
                if S and (int(self.atom_offset[-1] + self.natoms[-1]) != N
                          or np.any(self.atom_offset != np.cumsum(self.natoms) - self.natoms)):
                    raise DataFormatError(f"{path}: field 'structures/atom_offset' inconsistent with natoms")
                for k in ATOM_FIELDS:
                    if f["atoms"][k].shape[0] != N:
                        raise DataFormatError(f"{path}: field 'atoms/{k}' has {f['atoms'][k].shape[0]} rows, "
                                              f"expected {N} (truncated?)")
                self.missing = {k for k in OPTIONAL_STRUCT_FIELDS if k not in s}
                for k in STRUCT_FIELDS:
                    if k in self.missing:
                        continue
                    if s[k].shape[0] != S:
                        raise DataFormatError(f"{path}: field 'structures/{k}' has {s[k].shape[0]} rows, "
                                              f"expected {S} (truncated?)")
                self.sources = [x.decode() if isinstance(x, bytes) else str(x) for x in f["sources/files"][...]]
                g = f["subsets"]
                names = [x.decode() if isinstance(x, bytes) else str(x) for x in g["name"][...]]
                comps = [x.decode() if isinstance(x, bytes) else str(x) for x in g["composition"][...]]
                nat = g["natoms"][...]
                cnt = g["count"][...]
                olen, ooff, onum = g["order_length"][...], g["order_offset"][...], g["order_numbers"][...]
                draws = g["copies_per_epoch"][...] if "copies_per_epoch" in g else np.zeros(len(names), np.int32)
                self.subsets = [{"name": names[k], "composition": comps[k], "natoms": int(nat[k]),
                                 "count": int(cnt[k]),
                                 "order": (onum[ooff[k]:ooff[k] + olen[k]].astype(np.int64) if olen[k] else None),
                                 "copies_per_epoch": int(draws[k])}
                                for k in range(len(names))]
        except DataFormatError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as exc:
            from ..utils.io import hdf5_lock_error

            raise (hdf5_lock_error(exc, path)
                   or DataFormatError(f"{path}: corrupt or truncated data set ({type(exc).__name__}: {exc})")) from None
        self.n = S
        self.n_atoms = N
        self._check_subset_table()

    def _check_subset_table(self) -> None:
        """The subset table against the structures (both already in memory): a damaged or
        hand-edited table (another natoms, count or atom-order length) would give augment and the
        per-subset metrics wrong groups without any other error."""
        K = len(self.subsets)
        if len(self.subset) and (self.subset.min() < 0 or self.subset.max() >= K):
            raise DataFormatError(f"{self.path}: field 'structures/subset' refers to subset "
                                  f"{int(self.subset.max())} of a table of {K} (damaged file?)")
        counts = np.bincount(self.subset, minlength=K) if len(self.subset) else np.zeros(K, np.int64)
        stored = np.array([int(t["count"]) for t in self.subsets], dtype=np.int64)
        if (stored != counts).any():
            k = int(np.flatnonzero(stored != counts)[0])
            raise DataFormatError(f"{self.path}: field 'subsets/count' of subset '{self.subsets[k]['name']}' says "
                                  f"{stored[k]}, the structures hold {int(counts[k])} (damaged or edited file)")
        nat = np.array([int(t["natoms"]) for t in self.subsets], dtype=np.int64)
        if len(self.subset):
            want = nat[self.subset]
            bad = (want >= 0) & (want != self.natoms)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                t = self.subsets[int(self.subset[i])]
                raise DataFormatError(f"{self.path}: field 'subsets/natoms' of subset '{t['name']}' says "
                                      f"{t['natoms']}, its structure {i} has {int(self.natoms[i])} atoms "
                                      f"(damaged or edited file)")
        for t in self.subsets:
            if t["order"] is not None and t["natoms"] >= 0 and len(t["order"]) != t["natoms"]:
                raise DataFormatError(f"{self.path}: field 'subsets/order_length' of subset '{t['name']}' is "
                                      f"{len(t['order'])} for {t['natoms']} atoms (damaged or edited file)")


_FINITE_STRUCT_FIELDS = ("energy", "cell", "weight", "uncertainty")


def _check_finite(sh, a: int, cols: dict, at: dict) -> None:
    """Every value a stage computes with is finite (files written by other tools may hold NaN);
    a DataFormatError names the file, the structure and the field otherwise.  One vectorised
    test per slab read."""
    for name in _FINITE_STRUCT_FIELDS:
        v = np.asarray(cols[name])
        ok = np.isfinite(v.reshape(len(v), -1)).all(1)
        if not ok.all():
            r = int(np.flatnonzero(~ok)[0])
            raise DataFormatError(f"{sh.path}: structure {a + r} ({_where(sh, cols, r)}): field 'structures/{name}' "
                                  f"is not finite ({np.asarray(v[r]).tolist()})")
    # a synthetic copy names its parent (the copy-difference term pairs them): an index >= 0
    syn = np.asarray(cols["synthetic"], bool)
    par = np.asarray(cols["parent"])
    bad = syn & (par < 0)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise DataFormatError(f"{sh.path}: structure {a + r} ({_where(sh, cols, r)}): field 'structures/parent' "
                              f"is {int(par[r])}: a synthetic structure needs its parent's index")
    w = np.asarray(cols["weight"])
    if (w < 0).any():
        r = int(np.flatnonzero(w < 0)[0])
        raise DataFormatError(f"{sh.path}: structure {a + r} ({_where(sh, cols, r)}): field 'structures/weight' "
                              f"is negative ({w[r]})")
    st = np.asarray(cols["stress"]).reshape(len(w), -1)
    ok = np.isfinite(st).all(1) | ~np.asarray(cols["has_stress"], bool)
    if not ok.all():
        r = int(np.flatnonzero(~ok)[0])
        raise DataFormatError(f"{sh.path}: structure {a + r} ({_where(sh, cols, r)}): field 'structures/stress' "
                              f"is not finite ({st[r].tolist()})")
    hf = np.repeat(np.asarray(cols["has_forces"], bool), sh.natoms[a:a + len(w)])
    for name, mask in (("positions", None), ("forces", hf)):
        v = np.asarray(at[name])
        ok = np.isfinite(v).all(1)
        if mask is not None:
            ok |= ~mask
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            starts = sh.atom_offset[a:a + len(w)] - sh.atom_offset[a]
            r = int(np.searchsorted(starts, i, side="right") - 1)
            raise DataFormatError(f"{sh.path}: structure {a + r} ({_where(sh, cols, r)}), atom {i - int(starts[r])}: "
                                  f"field 'atoms/{name}' is not finite ({v[i].tolist()})")


def _check_order(sh, a: int, cols: dict, at: dict) -> None:
    """Each structure's atoms in its subset's atom order: augment's GPR compares atom i of one
    structure with atom i of another, so a structure whose species sequence differs from its
    subset's (a hand-edited or damaged file) would give wrong labels without any other error.
    One vectorised comparison per slab read."""
    sub = np.asarray(cols["subset"], dtype=np.int64)
    nat = sh.natoms[a:a + len(sub)]
    orders = [sh.subsets[int(t)]["order"] if 0 <= int(t) < len(sh.subsets) else None for t in sub]
    if all(o is None for o in orders):
        return
    numbers = np.asarray(at["numbers"], dtype=np.int64)
    off = np.concatenate([[0], np.cumsum(nat)])
    for r, o in enumerate(orders):
        if o is None or len(o) != nat[r]:
            continue
        got = numbers[off[r]:off[r + 1]]
        if not np.array_equal(got, o):
            i = int(np.flatnonzero(got != o)[0])
            t = sh.subsets[int(sub[r])]
            raise DataFormatError(f"{sh.path}: structure {a + r} ({_where(sh, cols, r)}), atom {i}: field "
                                  f"'atoms/numbers' is {int(got[i])}, its subset '{t['name']}' orders atom {i} as "
                                  f"{int(o[i])} (damaged or edited file)")


def _where(sh, cols, r: int) -> str:
    sf = int(cols["source_file"][r])
    src = sh.sources[sf] if 0 <= sf < len(sh.sources) else "?"
    return f"source {src}, index {int(cols['source_index'][r])}"


class H5Dataset:
    """Read-only view of one data set file or a list of shard files read as one data set.

    Small per-structure index arrays (natoms, subset ids) are loaded at construction; all
    other data are read on demand, only the slabs needed.  File handles are opened lazily in
    each process (safe after fork; the object is picklable)."""

    CACHE_BYTES = 4 << 20   # HDF5 chunk cache per open dataset

    def __init__(self, paths):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [str(p) for p in paths]
        if not self.paths:
            raise DataFormatError("no data set files given")
        self._shards = [_Shard(p) for p in self.paths]
        # global subset table merged by (name, composition, natoms)
        table: list[dict] = []
        keymap: dict = {}
        self._subset_maps = []
        for sh in self._shards:
            m = np.empty(len(sh.subsets), dtype=np.int64)
            for k, t in enumerate(sh.subsets):
                key = (t["name"], t["composition"], t["natoms"])
                if key not in keymap:
                    keymap[key] = len(table)
                    table.append({"name": t["name"], "composition": t["composition"], "natoms": t["natoms"],
                                  "order": t["order"], "count": 0, "copies_per_epoch": 0})
                m[k] = keymap[key]
                table[m[k]]["count"] += t["count"]
                # copies per epoch of augment's pool (0: none recorded): the shard that has one
                table[m[k]]["copies_per_epoch"] = max(table[m[k]]["copies_per_epoch"], t.get("copies_per_epoch", 0))
            self._subset_maps.append(m)
        self.subsets = table
        zs = sorted(set(z for sh in self._shards for z in _numbers(sh.species)))
        self.species = _symbols(zs)
        self.reference_energies = {}
        for sh in self._shards:
            for k, v in sh.reference_energies.items():
                if k in self.reference_energies and self.reference_energies[k] != v:
                    raise DataFormatError(f"{sh.path}: reference energy of {k} ({v}) differs from "
                                          f"another shard ({self.reference_energies[k]})")
                self.reference_energies[k] = v
        # files that declare no reference energy for an element another file declares one for:
        # their energies are taken on that file's zero (same code and settings, or not: it cannot
        # tell), for the trainer to warn about
        self.undeclared_references = [(str(sh.path), sorted(set(_symbols(_numbers(sh.species)))
                                                            & set(self.reference_energies) - set(sh.reference_energies)))
                                      for sh in self._shards]
        self.undeclared_references = [(p, e) for p, e in self.undeclared_references if e]
        self.provenance = [sh.provenance for sh in self._shards]
        self.starts = np.cumsum([0] + [sh.n for sh in self._shards]).astype(np.int64)
        self.natoms = np.concatenate([sh.natoms for sh in self._shards]) if self._shards else np.zeros(0, np.int64)
        self.subset_ids = np.concatenate([self._subset_maps[k][sh.subset] if sh.n else np.zeros(0, np.int64)
                                          for k, sh in enumerate(self._shards)])
        self.n_structures = int(self.starts[-1])
        self.n_atoms = int(self.natoms.sum())
        self._pid = None
        self._files: dict = {}
        self._dsets: dict = {}
        self._columns: dict = {}

    # -- pickling / per-process handles --------------------------------------------------------
    def __getstate__(self):
        d = dict(self.__dict__)
        d["_files"] = {}
        d["_dsets"] = {}
        d["_pid"] = None
        return d

    def _file(self, k: int):
        import h5py

        if self._pid != os.getpid():
            self._files = {}
            self._dsets = {}
            self._pid = os.getpid()
        f = self._files.get(k)
        if f is None:
            self._dsets = {key: v for key, v in getattr(self, "_dsets", {}).items() if key[0] != k}
            path = self.paths[k]
            try:
                f = h5py.File(path, "r", rdcc_nbytes=self.CACHE_BYTES, rdcc_nslots=10007)
            except OSError as exc:
                raise DataFormatError(f"{path}: cannot open data set ({exc})") from None
            self._files[k] = f
        return f

    def close(self) -> None:
        self._dsets = {}
        for f in self._files.values():
            try:
                f.close()
            except Exception:
                pass
        self._files = {}

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- sizes ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n_structures

    def __getitem__(self, i) -> Structure:
        i = int(i)
        if i < 0:
            i += self.n_structures
        if not 0 <= i < self.n_structures:
            raise IndexError(f"structure index {i} out of range (data set has {self.n_structures})")
        return self.read([i])[0]

    @property
    def sources(self) -> list[str]:
        return [s for sh in self._shards for s in sh.sources]

    @property
    def content_id(self) -> str:
        """Digest of the data set's content (all shards, in order): what descriptor caches and
        augment shards are keyed on, so that a reconverted or replaced file is never mistaken
        for the one they were built from (names, sizes and times are not looked at)."""
        if getattr(self, "_content_id", None) is None:
            import hashlib

            digests = [file_content_hash(p) for p in self.paths]
            self._content_id = digests[0] if len(digests) == 1 else \
                hashlib.sha256("".join(digests).encode()).hexdigest()
        return self._content_id

    @property
    def has_stored_split(self) -> bool:
        return all(sh.has_split for sh in self._shards)

    def column(self, name: str) -> np.ndarray:
        """Whole per-structure column (e.g. 'energy', 'has_forces', 'synthetic', 'split');
        'source' gives the source file name of every structure, 'subset' global subset ids."""
        if name in self._columns:
            return self._columns[name]
        if name == "subset":
            return self.subset_ids
        if name == "natoms":
            return self.natoms
        parts = []
        for k, sh in enumerate(self._shards):
            try:
                if name == "source":
                    idx = self._read_col(k, "source_file", 0, sh.n)
                    arr = np.array(sh.sources, dtype=object)[idx] if sh.n else np.zeros(0, dtype=object)
                else:
                    arr = self._read_col(k, name, 0, sh.n)
            except KeyError:
                raise DataFormatError(f"{sh.path}: data set has no field 'structures/{name}'") from None
            parts.append(arr)
        out = np.concatenate(parts) if parts else np.zeros(0)
        self._columns[name] = out
        return out

    def _dset(self, k, group, name):
        f = self._file(k)   # resets the handles after a fork
        key = (k, group, name)
        d = self._dsets.get(key)
        if d is None:
            d = f[group][name]   # kept open: HDF5 chunk caches live with the open dataset
            self._dsets[key] = d
        return d

    def _read_col(self, k, name, a, b):
        if name in self._shards[k].missing:      # a field newer than the file: its fill
            dt, shp = STRUCT_FIELDS[name]
            return np.zeros((b - a,) + shp, dtype=dt)
        try:
            return self._dset(k, "structures", name)[a:b]
        except KeyError:
            raise
        except (OSError, ValueError) as exc:
            raise DataFormatError(f"{self.paths[k]}: field 'structures/{name}' rows {a}:{b} unreadable "
                                  f"(corrupt file? {exc})") from None

    def _read_atoms(self, k, name, a, b):
        try:
            return self._dset(k, "atoms", name)[a:b]
        except (OSError, ValueError) as exc:
            raise DataFormatError(f"{self.paths[k]}: field 'atoms/{name}' rows {a}:{b} unreadable "
                                  f"(corrupt file? {exc})") from None

    # -- reading ----------------------------------------------------------------------------------
    def read(self, indices) -> list[Structure]:
        """Structures at the given global indices (any order, repeats allowed).  Contiguous
        index ranges are read as one slab per dataset."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) == 0:
            return []
        if idx.min() < 0 or idx.max() >= self.n_structures:
            raise IndexError(f"structure index out of range 0..{self.n_structures - 1}")
        uniq = np.unique(idx)
        shard_of = np.searchsorted(self.starts, uniq, side="right") - 1
        out: dict[int, Structure] = {}
        for k in np.unique(shard_of):
            sh = self._shards[k]
            local = uniq[shard_of == k] - self.starts[k]
            # runs of consecutive indices
            brk = np.flatnonzero(np.diff(local) != 1) + 1
            starts = np.concatenate([[0], brk])
            ends = np.concatenate([brk, [len(local)]])
            for s0, e0 in zip(starts, ends):
                a, b = int(local[s0]), int(local[e0 - 1]) + 1
                cols = {name: self._read_col(k, name, a, b) for name in STRUCT_FIELDS
                        if name not in ("atom_offset", "natoms")}
                A = int(sh.atom_offset[a])
                B = int(sh.atom_offset[b - 1] + sh.natoms[b - 1])
                at = {name: self._read_atoms(k, name, A, B) for name in ATOM_FIELDS}
                _check_finite(sh, a, cols, at)
                _check_order(sh, a, cols, at)
                for r in range(b - a):
                    li = a + r
                    o = int(sh.atom_offset[li]) - A
                    m = int(sh.natoms[li])
                    hf = bool(cols["has_forces"][r])
                    hs = bool(cols["has_stress"][r])
                    sf = int(cols["source_file"][r])
                    gi = int(self.starts[k] + li)
                    out[gi] = Structure(
                        numbers=at["numbers"][o:o + m].astype(np.int64),
                        positions=np.array(at["positions"][o:o + m], dtype=np.float64),
                        cell=np.array(cols["cell"][r], dtype=np.float64),
                        pbc=np.array(cols["pbc"][r], dtype=bool),
                        energy=float(cols["energy"][r]),
                        forces=np.array(at["forces"][o:o + m], dtype=np.float64) if hf else None,
                        subset=int(self._subset_maps[k][cols["subset"][r]]),
                        synthetic=bool(cols["synthetic"][r]),
                        parent=int(cols["parent"][r]),
                        uncertainty=float(cols["uncertainty"][r]),
                        weight=float(cols["weight"][r]),
                        source=sh.sources[sf] if 0 <= sf < len(sh.sources) else "",
                        source_index=int(cols["source_index"][r]),
                        index=gi,
                        stress=np.array(cols["stress"][r], dtype=np.float64) if hs else None)
        return [out[int(i)] for i in idx]

    def __iter__(self):
        step = 1024
        for a in range(0, self.n_structures, step):
            yield from self.read(np.arange(a, min(a + step, self.n_structures)))

    def iter_atom_blocks(self, name: str, block: int = 1 << 20):
        """Yield (shard index, atom start, array) blocks of a per-atom field (for statistics)."""
        for k, sh in enumerate(self._shards):
            for a in range(0, sh.n_atoms, block):
                yield k, a, self._read_atoms(k, name, a, min(a + block, sh.n_atoms))


# two structures are the same when their atoms (in order), positions and cell agree to this (A):
# an OUTCAR prints 5 decimals where vasprun.xml keeps 8, and a reprinted file may round
DUPLICATE_POSITION_TOL = 1e-4
DUPLICATE_ENERGY_TOL = 1e-4    # eV per structure: a same geometry with another energy is a conflict


class _BlockCache:
    """Rows lo..hi of an HDF5 dataset through a few cached aligned blocks."""

    def __init__(self, dset, block: int = 1 << 16, keep: int = 8):
        self.d, self.block, self.keep, self.cache = dset, int(block), int(keep), {}

    def _get_block(self, b: int) -> np.ndarray:
        arr = self.cache.pop(b, None)
        if arr is None:
            arr = self.d[b * self.block:(b + 1) * self.block]
            if len(self.cache) >= self.keep:
                self.cache.pop(next(iter(self.cache)))
        self.cache[b] = arr          # most recent last
        return arr

    def get(self, lo: int, hi: int) -> np.ndarray:
        b0, b1 = lo // self.block, (hi - 1) // self.block
        if b0 == b1:
            base = b0 * self.block
            return self._get_block(b0)[lo - base:hi - base]
        return np.concatenate([self._get_block(b) for b in range(b0, b1 + 1)])[lo - b0 * self.block:hi - b0 * self.block]


def duplicate_structures(path, block_atoms: int = FLUSH_ATOMS) -> tuple[list, list]:
    """Structures of a data set file that repeat an earlier one.  Returns (duplicates, conflicts),
    lists of (index, index of the earlier one):

    * duplicates: the same element sequence and pbc, energy within DUPLICATE_ENERGY_TOL, every
      position and cell component within DUPLICATE_POSITION_TOL (candidates: neighbours in
      energy order within one element sequence, then compared exactly, so no rounding boundary
      can split a pair);
    * conflicts: the same geometry (rounded to the tolerance) with another energy: the same atoms
      labelled twice (another charge state, another DFT setting); not dropped, but said.

    One streamed pass keeps 32 bytes per structure (two digests and the energy), then sorts."""
    import hashlib

    import h5py

    tol, etol = DUPLICATE_POSITION_TOL, DUPLICATE_ENERGY_TOL
    q = 1.0 / tol
    with h5py.File(path, "r") as f:
        st, at = f["structures"], f["atoms"]
        S = int(f.attrs["n_structures"])
        if S < 2:
            return [], []
        offs = st["atom_offset"][...].astype(np.int64)
        nat_all = st["natoms"][...].astype(np.int64)
        ends = offs + nat_all
        energy = st["energy"][...].astype(np.float64)
        grp = np.empty(S, dtype=np.uint64)           # digest of the element sequence and pbc
        shape = np.empty((S, 2), dtype=np.uint64)    # digest of the rounded geometry too
        # 4 fixed projections of the positions and cell: a repeat's differ by at most the
        # tolerance times the summed weights, a distinct structure's almost never do, so the
        # exact comparison (reads from the file) runs for real candidates only
        fp = np.empty((S, 4), dtype=np.float64)
        fp_bound = np.empty(S, dtype=np.float64)
        wcell = np.cos(np.arange(9)[None, :] * 1.3 + np.arange(4)[:, None] * 2.1).reshape(4, 3, 3)
        wmax = 0
        W = np.zeros((4, 0, 3))
        a = 0
        while a < S:
            first = int(offs[a])
            b = min(max(int(np.searchsorted(ends, first + block_atoms, side="right")), a + 1), S)
            num = at["numbers"][first:int(ends[b - 1])]
            pos = np.round(at["positions"][first:int(ends[b - 1])] * q) + 0.0   # + 0.0: no -0.0
            cell = np.round(st["cell"][a:b] * q) + 0.0
            pbc = st["pbc"][a:b]
            raw_pos = at["positions"][first:int(ends[b - 1])]
            raw_cell = st["cell"][a:b]
            mmax = int(nat_all[a:b].max())
            if mmax > wmax:
                wmax = mmax
                kk = np.arange(wmax)[:, None] * 0.7 + np.arange(3)[None, :] * 1.9
                W = np.cos(kk[None, :, :] + np.arange(4)[:, None, None] * 2.1)
            for k in range(b - a):
                o, m = int(offs[a + k]) - first, int(nat_all[a + k])
                fp[a + k] = np.einsum("jkc,kc->j", W[:, :m], raw_pos[o:o + m]) + np.einsum(
                    "jxy,xy->j", wcell, raw_cell[k])
                fp_bound[a + k] = (3 * m + 9) * tol
                h = hashlib.blake2b(num[o:o + m].tobytes(), digest_size=8)
                h.update(np.asarray(pbc[k], dtype=bool).tobytes())
                grp[a + k] = np.frombuffer(h.digest(), dtype=np.uint64)[0]
                h2 = hashlib.blake2b(h.digest(), digest_size=16)
                h2.update(pos[o:o + m].tobytes())
                h2.update(cell[k].tobytes())
                shape[a + k] = np.frombuffer(h2.digest(), dtype=np.uint64)
            a = b

        # the exact comparisons read through a small cache of aligned blocks: one h5py read per
        # pair cost 2 ms (a chunk decompressed each time), repeats come in runs
        numbers_c, pos_c = _BlockCache(at["numbers"]), _BlockCache(at["positions"])
        cell_c, pbc_c = _BlockCache(st["cell"], 1 << 12), _BlockCache(st["pbc"], 1 << 12)

        def same(i, j) -> bool:
            oi, oj, m = int(offs[i]), int(offs[j]), int(nat_all[i])
            if m != int(nat_all[j]) or not np.array_equal(numbers_c.get(oi, oi + m), numbers_c.get(oj, oj + m)):
                return False
            if (not np.array_equal(pbc_c.get(i, i + 1), pbc_c.get(j, j + 1))
                    or np.abs(cell_c.get(i, i + 1) - cell_c.get(j, j + 1)).max() > tol):
                return False
            return bool(np.abs(pos_c.get(oi, oi + m) - pos_c.get(oj, oj + m)).max(initial=0.0) <= tol)

        first_of = np.full(S, -1, dtype=np.int64)
        order = np.lexsort((energy, grp))
        g_sorted, e_sorted = grp[order], energy[order]
        for p in range(S - 1):
            i = int(order[p])
            r = p + 1
            while r < S and g_sorted[r] == g_sorted[p] and e_sorted[r] - e_sorted[p] <= etol:
                j = int(order[r])
                lo, hi = min(i, j), max(i, j)
                near = np.abs(fp[lo] - fp[hi]).max() <= fp_bound[lo] * (1 + 1e-9) + 1e-12
                if near and (first_of[hi] < 0 or first_of[hi] > lo):
                    if same(lo, hi):
                        first_of[hi] = lo if first_of[lo] < 0 else first_of[lo]
                r += 1
    dup_mask = first_of >= 0
    dups = [(int(i), int(first_of[i])) for i in np.flatnonzero(dup_mask)]
    conflicts = []
    rest = np.flatnonzero(~dup_mask)
    o2 = rest[np.lexsort((rest, shape[rest, 1], shape[rest, 0]))]
    for p in range(1, len(o2)):
        i, j = int(o2[p]), int(o2[p - 1])
        if (shape[i] == shape[j]).all() and abs(energy[i] - energy[j]) > etol:
            conflicts.append((i, j))
    return dups, sorted(conflicts)


def rewrite_without(path, drop, compression: str | None = "lzf") -> None:
    """Rewrite a data set file without the structures ``drop`` (indices), atomically; the subset
    table, sources, split and attributes are kept (subset counts recounted)."""
    import h5py

    src = H5Dataset(path)
    with h5py.File(path, "r") as f:
        prov = json.loads(f.attrs.get("provenance", "{}"))      # this file's own (not a list of shards')
    keep = np.ones(src.n_structures, dtype=bool)
    keep[np.asarray(list(drop), dtype=np.int64)] = False
    table = [{k: v for k, v in t.items() if k != "count"} for t in src.subsets]
    with H5Writer(path, species=src.species, subsets=table, reference_energies=src.reference_energies or None,
                  provenance_info=prov, compression=compression,
                  store_split=src.has_stored_split) as w:
        copy_dataset_arrays(str(path), w, keep=keep)


def copy_dataset_arrays(src_path: str, writer: H5Writer, block_structures: int = 65536,
                        subset_map=None, block_atoms: int = FLUSH_ATOMS, keep=None) -> None:
    """Append every structure of an existing (shard) file to ``writer`` without building
    Structure objects (used to merge MPI shards).  Subset ids are mapped through
    ``subset_map`` (array: shard id -> writer id) or copied as stored.  Blocks hold at most
    ``block_structures`` structures and (beyond one structure) ``block_atoms`` atoms, so the
    memory of a merge does not grow with the shard."""
    import h5py

    with h5py.File(src_path, "r") as f:
        S = int(f.attrs["n_structures"])
        sources = [x.decode() if isinstance(x, bytes) else str(x) for x in f["sources/files"][...]]
        st_g, at_g = f["structures"], f["atoms"]
        has_split = "split" in st_g
        ends = np.cumsum(st_g["natoms"][...].astype(np.int64))
        a = 0
        while a < S:
            first = int(ends[a - 1]) if a else 0
            b = int(np.searchsorted(ends, first + block_atoms, side="right"))
            b = min(max(b, a + 1), a + block_structures, S)
            st = {k: (st_g[k][a:b] if k in st_g else np.zeros((b - a,) + STRUCT_FIELDS[k][1], STRUCT_FIELDS[k][0]))
                  for k in STRUCT_FIELDS}
            A = int(st["atom_offset"][0])
            B = int(st["atom_offset"][-1] + st["natoms"][-1])
            atoms = {k: at_g[k][A:B] for k in ATOM_FIELDS}
            split = st_g["split"][a:b] if has_split else None
            if subset_map is not None:
                st["subset"] = np.asarray(subset_map, dtype=np.int32)[st["subset"]]
            if keep is not None and not keep[a:b].all():
                kk = np.asarray(keep[a:b], dtype=bool)
                amask = np.repeat(kk, st["natoms"].astype(np.int64))
                atoms = {k: v[amask] for k, v in atoms.items()}
                st = {k: v[kk] for k, v in st.items()}
                st["atom_offset"] = (np.cumsum(st["natoms"].astype(np.int64)) - st["natoms"]).astype(np.int64)
                split = None if split is None else split[kk]
            if len(st["natoms"]):
                writer.append_arrays(atoms, st, sources, split=split)
            a = b
