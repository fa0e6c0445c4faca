"""``distmlip convert``: DFT data (aenet XSF, extended XYZ, ASE db, any ASE format) -> HDF5.

Under MPI (``mpirun -n K distmlip convert ...``) the FRAMES of all input files (not just the
files: one big extended-XYZ file is split too) are cut into K contiguous ranges balanced by
bytes (``frames.split_frames``, from a small per-frame index built first, in parallel over the
files); every rank streams its range in bounded chunks (``frames.iter_frames``), validates and
writes a shard; rank 0 merges the shards in input order into the final file (atomically), so
the data are identical for any K and no rank holds more than a chunk of frames.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import load_config, paths
from ..errors import ConfigError, DistmlipError, InputError
from ..utils.io import atomic_write_text, check_writable, clean_stale_temps, rename_target, temp_path
from ..utils.launch import placement
from ..utils.log import log, warn
from . import h5store
from .frames import FileFrames, index_file, iter_frames, split_frames
from .readers import expand_inputs
from .split import parse_split_patterns, split_from_patterns
from .subsets import SUBSET_MODES, SubsetBuilder
from .validate import DEFAULT_MIN_DISTANCE, check_structure


@dataclass
class ConvertConfig:
    """Settings of ``distmlip convert`` (also accepted as a YAML file via --config)."""
    inputs: list[str] = field(default_factory=list, metadata=paths("in"))
    output: str = field(default="", metadata=paths("out"))
    format: Optional[str] = None
    reference_energies: dict[str, float] = field(default_factory=dict)
    min_distance: float = DEFAULT_MIN_DISTANCE
    skip_invalid: bool = False
    subset_by: str = "auto"
    subset_pattern: Optional[str] = None
    split_by_pattern: dict[str, str] = field(default_factory=dict)
    compression: Optional[str] = "lzf"
    # where ASE frames keep their labels when not as calculator results or under the plain keys
    # (readers.LabelKeys; extxyz of published data sets: REF_energy, REF_forces, REF_stress)
    energy_key: Optional[str] = None
    forces_key: Optional[str] = None
    stress_key: Optional[str] = None
    # a structure that repeats an earlier one (the same frame in two files, a file read twice) is
    # dropped and listed in the rejected report unless this is true
    keep_duplicates: bool = False

    def label_keys(self):
        from .readers import LabelKeys

        return LabelKeys(energy=self.energy_key, forces=self.forces_key, stress=self.stress_key)

    def validate(self):
        if self.subset_by not in SUBSET_MODES:
            raise ConfigError(f"subset_by must be one of {', '.join(SUBSET_MODES)}, got {self.subset_by!r}")
        if self.min_distance < 0:
            raise ConfigError(f"min_distance must be >= 0, got {self.min_distance}")
        if self.compression not in (None, "lzf", "gzip"):
            raise ConfigError(f"compression must be lzf, gzip or null, got {self.compression!r}")


def add_arguments(p) -> None:
    p.add_argument("inputs", nargs="*", help="input files, directories (searched recursively) or glob patterns")
    p.add_argument("-o", "--output", help="output HDF5 file (written atomically)")
    p.add_argument("--config", help="YAML file with the same settings (keys: inputs, output, format, "
                   "reference_energies, min_distance, skip_invalid, subset_by, subset_pattern, split_by_pattern, "
                   "compression, energy_key, forces_key, stress_key, keep_duplicates); command-line options win")
    p.add_argument("--format", help="ASE format name for non-XSF inputs (default: from the file name); "
                   "'xsf' forces the aenet XSF reader")
    p.add_argument("--reference-energies", metavar="SPEC",
                   help="reference atomic energies in eV: 'H=-13.6,O=-432.1' or a YAML file {H: -13.6, ...}")
    p.add_argument("--min-distance", type=float, help=f"reject atoms closer than this (A, default {DEFAULT_MIN_DISTANCE})")
    p.add_argument("--skip-invalid", action="store_true", default=None,
                   help="drop invalid structures and write a report OUTPUT.rejected.{txt,json} instead of stopping")
    p.add_argument("--subset-by", choices=SUBSET_MODES,
                   help="subset grouping: auto (composition + atom order, default), directory, pattern")
    p.add_argument("--subset-pattern", metavar="REGEX", help="with --subset-by pattern: regex on the source "
                   "path; its first group (or whole match) names the subset")
    p.add_argument("--split-by-pattern", metavar="SPEC", help="store a train/val/test split from source paths, "
                   "e.g. 'train=train/,test=test/' (regexes)")
    p.add_argument("--compression", choices=["lzf", "gzip", "none"], help="HDF5 compression (default lzf)")
    p.add_argument("--energy-key", metavar="KEY", help="read the energy from this info key of each frame "
                   "(extxyz, e.g. REF_energy) instead of the calculator results / 'energy'")
    p.add_argument("--forces-key", metavar="KEY", help="read the forces from this per-atom array "
                   "(extxyz, e.g. REF_forces)")
    p.add_argument("--keep-duplicates", action="store_true", default=None,
                   help="keep structures that repeat an earlier one (same atoms, positions, cell and energy; "
                        "dropped and listed in OUTPUT.rejected.txt by default)")
    p.add_argument("--stress-key", metavar="KEY", help="read the stress (eV/A^3, ASE sign; 6 Voigt or 9 "
                   "values) from this info key (extxyz, e.g. REF_stress)")


def parse_reference_energies(spec) -> dict[str, float]:
    from ase.data import atomic_numbers

    if spec is None or spec == "":
        return {}
    if isinstance(spec, dict):
        data = spec
    elif os.path.isfile(spec):
        from ..config import load_yaml

        data = load_yaml(spec)
        if not isinstance(data, dict):
            raise ConfigError(f"{spec}: reference energies must be a mapping element -> eV")
    else:
        data = {}
        for part in str(spec).split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ConfigError(f"reference energy {part!r} must look like SYMBOL=ENERGY (or give a YAML file)")
            k, v = part.split("=", 1)
            data[k.strip()] = v.strip()
    out = {}
    for k, v in data.items():
        if k not in atomic_numbers or atomic_numbers[k] == 0:
            raise ConfigError(f"reference energies: unknown element symbol {k!r}")
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"reference energies: value of {k} is not a number: {v!r}") from None
        if not np.isfinite(out[k]):
            raise ConfigError(f"reference energies: value of {k} is not finite")
    return out


def config_from_args(args) -> ConvertConfig:
    overrides = {}
    if args.inputs:
        overrides["inputs"] = list(args.inputs)
    for name in ("output", "format", "min_distance", "skip_invalid", "subset_by", "subset_pattern",
                 "energy_key", "forces_key", "stress_key", "keep_duplicates"):
        v = getattr(args, name, None)
        if v is not None:
            overrides[name] = v
    if args.compression is not None:
        overrides["compression"] = None if args.compression == "none" else args.compression
    cfg = load_config(args.config, ConvertConfig, overrides)
    if args.reference_energies is not None:
        cfg.reference_energies = parse_reference_energies(args.reference_energies)
    else:
        cfg.reference_energies = parse_reference_energies(cfg.reference_energies)
    if args.split_by_pattern is not None:
        cfg.split_by_pattern = parse_split_patterns(args.split_by_pattern)
    elif cfg.split_by_pattern:
        cfg.split_by_pattern = parse_split_patterns(cfg.split_by_pattern)
    if not cfg.inputs:
        raise ConfigError("no input files given (positional INPUTS or 'inputs' in --config)")
    if not cfg.output:
        raise ConfigError("no output file given (-o OUTPUT.h5 or 'output' in --config)")
    if cfg.subset_by == "pattern" and not cfg.subset_pattern:
        raise ConfigError("--subset-by pattern needs --subset-pattern REGEX")
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------
def _raise_first(errors: list) -> None:
    """errors: per-rank None or (message, is_user_error).  Raise on every rank if any failed."""
    for r, e in enumerate(errors):
        if e is not None:
            raise DistmlipError(e[0])


def split_files(files: list[str], size: int) -> list[list[str]]:
    """Contiguous blocks of ``files`` balanced by file size (deterministic)."""
    if size == 1:
        return [list(files)]
    w = np.array([max(os.path.getsize(f), 1) if os.path.exists(f) else 1 for f in files], dtype=np.float64)
    csum = np.cumsum(w)
    total = csum[-1] if len(csum) else 0.0
    cuts = [0]
    for k in range(1, size):
        c = int(np.searchsorted(csum, total * k / size))
        cuts.append(max(cuts[-1], min(c, len(files))))
    cuts.append(len(files))
    return [files[cuts[k]:cuts[k + 1]] for k in range(size)]


class _RankResult:
    def __init__(self):
        self.n_structures = 0
        self.n_atoms = 0
        self.rejected: list[dict] = []
        self.z: set[int] = set()


def _index_inputs(files: list[str], cfg: ConvertConfig, ctx) -> list[FileFrames]:
    """Frame index of every input file (collective).  The files are shared out by size for
    indexing; every rank ends with all indexes (a few bytes per frame), or every rank raises the
    first failing rank's error."""
    if ctx.world_size == 1:
        return [index_file(f, cfg.format) for f in files]
    mine = split_files(files, ctx.world_size)[ctx.rank]
    out, err = [], None
    try:
        out = [index_file(f, cfg.format) for f in mine]
    except DistmlipError as exc:
        err = (type(exc).__name__, str(exc))
    except Exception as exc:  # a bug: show it here, stop everyone
        traceback.print_exc()
        err = ("DistmlipError", f"rank {ctx.rank}: internal error {type(exc).__name__}: {exc}")
    gathered = ctx.all_gather_object((out, err))
    for _, e in gathered:
        if e is not None:
            from .. import errors as E

            raise getattr(E, e[0], DistmlipError)(e[1])
    return [ff for g in gathered for ff in g[0]]


class _Progress:
    """Progress of rank 0's share (ranks get equal shares of bytes, so its ETA is the job's)."""

    def __init__(self, enabled: bool, n_frames: int, total_bytes: float, counted: bool = True):
        self.enabled, self.n_frames, self.total = enabled, n_frames, max(total_bytes, 1.0)
        self.counted = counted     # False: files whose frames are only known once read (OUTCAR)
        self.t0 = self.last = time.time()
        self.frames = 0
        self.bytes = 0.0

    def update(self, frames: int, nbytes: float, res: _RankResult, final: bool = False) -> None:
        self.frames += frames
        self.bytes += nbytes
        now = time.time()
        el = now - self.t0
        # every 2 s at first, then every tenth of the elapsed time (at most 30 s): long
        # conversions do not flood the log
        if not self.enabled or not (final or now - self.last > min(30.0, max(2.0, 0.1 * el))):
            self.pending = True
            return
        if final and not getattr(self, "pending", True):
            return      # the last chunk's line was just printed
        self.pending = False
        self.last = now
        frac = min(self.bytes / self.total, 1.0)
        eta = f", ETA {el * (1 - frac) / frac:.0f} s" if 0 < frac < 1 else ""
        who = "rank 0: " if placement().world_size > 1 else ""
        of = f"/{self.n_frames}" if self.counted else ""
        log(f"  {who}read {self.frames}{of} frames{' of its share' if who else ''} "
            f"({100 * frac:.0f} %), {res.n_structures} structures, {el:.1f} s{eta}")


def _accept(structs, cfg: ConvertConfig, builder: SubsetBuilder, res: _RankResult) -> list:
    good = []
    for s in structs:
        if s.stress is not None and not np.asarray(s.pbc, dtype=bool).any():
            # a plane-wave code reports a stress for a molecule in its box; without a periodic
            # direction it means nothing here, but the frame's energy and forces do: keep those
            from .readers import _note_once

            _note_once("molecule-stress", s.source, f"{s.source}: structure {s.source_index}: a stress on a "
                       f"structure without periodic directions (pbc all False) is not stored (its energy and "
                       f"forces are; said once per file)")
            s.stress = None
        probs = check_structure(s, cfg.min_distance)
        if probs:
            if not cfg.skip_invalid:
                fld, why = probs[0]
                raise InputError(f"{s.source}: structure {s.source_index}: field '{fld}': {why}; "
                                 "use --skip-invalid to drop invalid structures")
            res.rejected.append({"source": s.source, "structure": s.source_index,
                                 "problems": [{"field": a, "reason": b} for a, b in probs]})
            continue
        k = builder.add(s)
        s.subset = builder.ids[k]
        good.append(s)
    return good


def _process_frames(segments, indexes: list[FileFrames], cfg: ConvertConfig, writer, builder: SubsetBuilder,
                    res: _RankResult, progress: bool):
    """Stream this rank's frame ranges [(file, lo, hi)] chunk by chunk into ``writer``."""
    n_frames = sum(hi - lo for _, lo, hi in segments)
    total = sum(float(indexes[f].weights()[lo:hi].sum()) for f, lo, hi in segments)
    prog = _Progress(progress, n_frames, total, counted=all(indexes[f].kind != "stream" for f, _, _ in segments))
    for f, lo, hi in segments:
        for structs, nbytes in iter_frames(indexes[f], lo, hi, keys=cfg.label_keys()):
            good = _accept(structs, cfg, builder, res)
            if good:
                split = None
                if cfg.split_by_pattern:
                    split = split_from_patterns([s.source for s in good], cfg.split_by_pattern,
                                                [s.source_index for s in good])
                writer.append(good, split=split)
                res.n_structures += len(good)
                res.n_atoms += sum(len(s.numbers) for s in good)
                for s in good:
                    res.z.update(int(z) for z in np.unique(s.numbers))
            prog.update(len(structs), nbytes, res)
    prog.update(0, 0, res, final=True)


def _check_reference(cfg, zs):
    from ase.data import chemical_symbols

    if cfg.reference_energies:
        missing = [chemical_symbols[z] for z in sorted(zs) if chemical_symbols[z] not in cfg.reference_energies]
        if missing:
            raise ConfigError(f"reference energies given but missing for element(s) {', '.join(missing)}")


def _drop_duplicates(out: Path, cfg: ConvertConfig, res: "_RankResult") -> tuple[int, int]:
    """Remove structures that repeat an earlier one (h5store.duplicate_structures) from the
    written file and list them in the rejected report: a repeated structure would sit in
    training and validation alike (optimistic validation errors) and weigh twice.  The same
    geometry with another energy is kept and warned about.  Returns (dropped, their atoms)."""
    dups, conflicts = h5store.duplicate_structures(out)
    if conflicts:
        ds = h5store.H5Dataset(out)
        shown = []
        for i, j in conflicts[:3]:
            a, b = ds.read([i, j])
            shown.append(f"{a.source}: structure {a.source_index} ({a.energy:.6f} eV) and {b.source}: structure "
                         f"{b.source_index} ({b.energy:.6f} eV)")
        warn(f"{out}: {len(conflicts)} structure(s) repeat an earlier geometry with another energy (kept): "
             f"{'; '.join(shown)}{' ...' if len(conflicts) > 3 else ''}; the same atoms labelled twice (another "
             f"charge or spin state, another DFT setting?) give the network contradictory targets")
    if not dups:
        return 0, 0
    ds = h5store.H5Dataset(out)
    src, sidx, nat = ds.column("source"), ds.column("source_index"), ds.natoms
    rows, n_atoms = [], 0
    for i, j in dups:
        n_atoms += int(nat[i])
        rows.append({"source": str(src[i]), "structure": int(sidx[i]),
                     "problems": [{"field": "structure", "reason": f"duplicate of {src[j]}: structure "
                                   f"{int(sidx[j])} (same atoms, positions and cell to "
                                   f"{h5store.DUPLICATE_POSITION_TOL:g} A, same energy); dropped "
                                   f"(--keep-duplicates keeps it)"}]})
    h5store.rewrite_without(out, [i for i, _ in dups], compression=cfg.compression)
    res.rejected.extend(rows)
    _write_report(out, res.rejected, res.n_structures - len(dups))
    warn(f"{out}: {len(dups)} structure(s) repeat an earlier one and were dropped (first: {rows[0]['source']}: "
         f"structure {rows[0]['structure']}, {rows[0]['problems'][0]['reason'].split(';')[0]}); listed in "
         f"{out}.rejected.txt")
    return len(dups), n_atoms


def _write_report(out: Path, rejected: list[dict], n_ok: int) -> None:
    base = str(out) + ".rejected"
    if not rejected:
        for ext in (".json", ".txt"):
            if os.path.exists(base + ext):
                os.unlink(base + ext)
        return
    atomic_write_text(base + ".json", json.dumps({"output": str(out), "accepted": n_ok,
                                                  "rejected": rejected}, indent=1) + "\n")
    lines = [f"# {len(rejected)} structure(s) rejected while converting to {out} ({n_ok} accepted)"]
    for r in rejected:
        for p in r["problems"]:
            lines.append(f"{r['source']}: structure {r['structure']}: field '{p['field']}': {p['reason']}")
    atomic_write_text(base + ".txt", "\n".join(lines) + "\n")


def convert(cfg: ConvertConfig) -> dict:
    """Run a conversion (MPI aware).  Returns a summary dict (on every rank)."""
    from ..distributed import Heartbeat, init_distributed

    ctx = init_distributed(device="cpu", torch_group=False)  # objects over MPI; no-op alone
    rank, size = ctx.rank, ctx.world_size
    out = Path(cfg.output)
    t0 = time.time()

    # 1. input list (rank 0), broadcast with any error so no rank waits forever; before reading
    # anything: the output folder is writable, and leftovers of dead writers there are removed
    files, err = None, None
    if rank == 0:
        try:
            rename_target(out)
            check_writable(out.parent, "output folder")
            clean_stale_temps(out.parent)
            files = expand_inputs(cfg.inputs, cfg.format)
        except DistmlipError as exc:
            err = (type(exc).__name__, str(exc))
    files, err = ctx.broadcast_object((files, err))
    if err:
        from .. import errors as E

        raise getattr(E, err[0], InputError)(err[1])
    t_index = time.time()
    indexes = _index_inputs(files, cfg, ctx)
    n_frames = sum(ff.n for ff in indexes)
    mine = split_frames(indexes, size)[rank]
    n_stream = sum(1 for ff in indexes if ff.kind == "stream")
    frames_txt = (f"{n_frames} frame(s)" if not n_stream else
                  f"{n_frames - n_stream} frame(s) + {n_stream} file(s) counted as read (OUTCAR, vasprun.xml, ...)")
    log(f"distmlip convert: {len(files)} input file(s), {frames_txt} (indexed in "
        f"{time.time() - t_index:.1f} s) on {size} rank(s) -> {out}")

    prov = h5store.provenance({"inputs": list(cfg.inputs), "n_input_files": len(files),
                               "min_distance": cfg.min_distance, "subset_by": cfg.subset_by})
    common = dict(reference_energies=cfg.reference_energies or None, provenance_info=prov,
                  compression=cfg.compression, store_split=bool(cfg.split_by_pattern))
    builder = SubsetBuilder(cfg.subset_by, cfg.subset_pattern)
    res = _RankResult()

    if size == 1:
        with h5store.H5Writer(out, subsets=[], **common) as w:
            _process_frames(mine, indexes, cfg, w, builder, res, True)
            if res.n_structures == 0:
                raise InputError(f"no valid structures in the {len(files)} input file(s)")
            _check_reference(cfg, res.z)
            table, _ = builder.finalize()
            w.set_subsets(table)
        if rank == 0:
            _write_report(out, res.rejected, res.n_structures)
        n_sub = len(builder.info)
    else:
        shard_dir = None
        if rank == 0:
            out.parent.mkdir(parents=True, exist_ok=True)
            shard_dir = str(temp_path(out, suffix=".shards"))   # host and pid in the name: see clean_stale_temps
            os.mkdir(shard_dir)
        shard_dir = ctx.broadcast_object(shard_dir)
        shard = os.path.join(shard_dir, f"shard{rank:05d}.h5")
        err = None
        # ranks wait for each other after their share of the frames and during rank 0's merge,
        # both as long as the data are large: no deadline, but a partner whose heartbeat stops
        # (frozen, its node lost) ends the wait
        hb = Heartbeat(shard_dir, rank, size, ctx.timeout_s, hint="nothing was written to " + str(out))
        try:
            with hb:
                try:
                    try:
                        with h5store.H5Writer(shard, subsets=[], atomic=False, **common) as w:
                            _process_frames(mine, indexes, cfg, w, builder, res, rank == 0)
                            w.set_subsets(builder.finalize()[0])
                    except DistmlipError as exc:
                        err = (str(exc), True)
                    except Exception as exc:  # a bug: show it here, stop everyone
                        traceback.print_exc()
                        err = (f"rank {rank}: internal error {type(exc).__name__}: {exc}", False)
                    ctx.barrier(sleep=True, watch=hb.check)
                    errors = ctx.all_gather_object(err)
                    _raise_first(errors)
                    gathered = ctx.all_gather_object((builder.state(), res.n_structures, res.n_atoms, res.rejected, res.z))
                    total = sum(g[1] for g in gathered)
                    if total == 0:
                        raise InputError(f"no valid structures in the {len(files)} input file(s)")
                    zs = set().union(*[g[4] for g in gathered])
                    _check_reference(cfg, zs)
                    glob_builder = SubsetBuilder(cfg.subset_by, cfg.subset_pattern)
                    for g in gathered:
                        glob_builder.merge(g[0])
                    table, gids = glob_builder.finalize()
                    n_sub = len(table)
                    merge_err = None
                    if rank == 0:
                        try:
                            log(f"  merging {size} shards")
                            with h5store.H5Writer(out, subsets=table, **common) as w:
                                for r in range(size):
                                    info = gathered[r][0]
                                    m = np.array([gids[k] for k in info], dtype=np.int64)
                                    if gathered[r][1]:
                                        h5store.copy_dataset_arrays(os.path.join(shard_dir, f"shard{r:05d}.h5"), w,
                                                                    subset_map=m)
                            rejected = [x for g in gathered for x in g[3]]
                            _write_report(out, rejected, total)
                        except DistmlipError as exc:
                            merge_err = (str(exc), True)
                        except Exception as exc:
                            traceback.print_exc()
                            merge_err = (f"rank 0: merge failed: {type(exc).__name__}: {exc}", False)
                    ctx.barrier(sleep=True, watch=hb.check)
                    merge_err = ctx.broadcast_object(merge_err)
                    _raise_first([merge_err])
                    res.n_structures, res.n_atoms = total, sum(g[2] for g in gathered)
                    res.rejected = [x for g in gathered for x in g[3]]
                finally:
                    # rank 0 may already be removing the whole shard folder
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(shard)
            ctx.barrier(deadline=True)     # every rank has stopped beating into the shard folder
        finally:
            if rank == 0:
                shutil.rmtree(shard_dir, ignore_errors=True)
    n_dup = 0
    if not cfg.keep_duplicates:
        # rank 0 on the written file: the same for any number of ranks (duplicates may sit in
        # different ranks' frame ranges); the others wait for its answer
        dd = None
        if rank == 0:
            try:
                dd = ("ok", _drop_duplicates(out, cfg, res))
            except DistmlipError as exc:
                dd = ("err", (type(exc).__name__, str(exc)))
        dd = ctx.broadcast_object(dd) if size > 1 else dd
        if dd[0] == "err":
            from .. import errors as E

            raise getattr(E, dd[1][0], DistmlipError)(dd[1][1])
        n_dup, n_atoms_dropped = dd[1]
        res.n_structures -= n_dup
        res.n_atoms -= n_atoms_dropped
    dt = time.time() - t0
    summary = {"files": len(files), "structures": res.n_structures, "atoms": res.n_atoms,
               "subsets": n_sub, "rejected": len(res.rejected), "duplicates": n_dup, "seconds": dt, "ranks": size}
    log(f"wrote {out}: {res.n_structures} structures, {res.n_atoms} atoms, {n_sub} subsets, "
        f"{len(res.rejected)} rejected, {dt:.2f} s on {size} rank(s)")
    if res.rejected:
        log(f"rejected structures listed in {out}.rejected.txt and {out}.rejected.json")
    if placement().rank == 0 and res.n_structures:
        _check_stress_units(out)
        _check_labels(out)
    return summary


# structures the label check of convert reads (a sample beyond; `distmlip info` checks 10,000):
# the 1,000 EC dimers (20 atoms) took 0.3 s, and a unit slip shows in a few dozen pairs
CONVERT_LABEL_CHECK = 2000


def _check_labels(out) -> None:
    """Warn about labels whose energies and forces disagree in units, and about atoms with a
    force far beyond their element's typical one (``info.label_check``)."""
    from .h5store import H5Dataset
    from .info import FORCE_OUTLIER_ADVICE, force_outlier_text, label_check, unit_warnings

    try:
        ds = H5Dataset(str(out))
        lc = label_check(ds, CONVERT_LABEL_CHECK)
        for w in unit_warnings(ds, lc):
            warn(w)
        fo = (lc or {}).get("force_outliers") or []
        if fo:
            warn(f"{out}: {len(fo)} atom(s) with a force far beyond their element's typical one: "
                 + "; ".join(force_outlier_text(o) for o in fo[:5]) + (" ..." if len(fo) > 5 else "")
                 + f".  {FORCE_OUTLIER_ADVICE[0].upper()}{FORCE_OUTLIER_ADVICE[1:]}")
    except (KeyError, OSError, ValueError):
        return


# 160 GPa: above the stresses of DFT training data outside high-pressure studies, and below
# what a stress in kbar (VASP's OUTCAR unit) read as eV/A^3 gives for any cell more than
# 1 kbar away from equilibrium (x 1602)
STRESS_PLAUSIBLE = 1.0     # eV/A^3


def _check_stress_units(out) -> None:
    """Warn (once) when stored stresses are so large that a unit is the likely cause."""
    from .h5store import H5Dataset
    from .info import EV_A3_GPA

    try:
        ds = H5Dataset(str(out))
        hs = np.asarray(ds.column("has_stress"), dtype=bool)
        if not hs.any():
            return
        st = np.abs(np.asarray(ds.column("stress"), dtype=np.float64).reshape(len(hs), -1))
        st[~hs] = 0.0
        k = int(np.argmax(st.max(1)))
        top = float(st[k].max())
        if top > STRESS_PLAUSIBLE:
            src, idx = ds.column("source")[k], int(ds.column("source_index")[k])
            warn(f"{src}: structure {idx}: field 'stress': |stress| up to {top:.3g} eV/A^3 = {EV_A3_GPA * top:.4g} "
                 f"GPa ({int((st.max(1) > STRESS_PLAUSIBLE).sum())} structures above {EV_A3_GPA * STRESS_PLAUSIBLE:.0f} "
                 f"GPa).  distmlip stores eV/A^3 with ASE's sign; a stress in kbar (VASP) or GPa read as "
                 f"eV/A^3 looks like this: convert the input (ASE's readers do) or check --stress-key")
    except (KeyError, OSError, ValueError):
        return


def run(args) -> int:
    cfg = config_from_args(args)
    lock = None
    if placement().rank == 0 and cfg.output:
        # one job per output file: two converts to the same path both reported success while
        # the file held one job's structures (the other's rename came first)
        from ..utils.io import OutputLock

        out = rename_target(cfg.output)       # refused before its folder gets a lock file
        lock = OutputLock(out.parent, what="output file", file=out.name).acquire()
    try:
        convert(cfg)
    finally:
        if lock is not None:
            lock.release()
    return 0
