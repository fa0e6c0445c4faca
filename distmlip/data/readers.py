"""Readers of DFT reference data: aenet XSF (own parser), extended XYZ, ASE databases and every
other format ASE reads.  Inputs may be files, directories (searched recursively) and glob
patterns; every record carries its source file and frame index.

aenet XSF::

    # total energy = -18642.17 eV
    ATOMS                          (free molecule)
    O  x y z  fx fy fz             (forces optional: 4 or 7 columns)

    CRYSTAL / SLAB / POLYMER       (periodic in 3 / 2 / 1 directions; a PRIMVEC block without
    PRIMVEC                         any of them: periodic in 3, as aenet reads it)
      a1x a1y a1z
      ...
    PRIMCOORD
      N 1
      O  x y z  [fx fy fz]
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from ..errors import InputError
from .structure import Structure, complete_cell

# What a directory given to convert (without --format) contributes: files named like labelled
# data (suffixes, or VASP's OUTCAR / vasprun.xml anywhere in the name); other files only when
# ASE recognises their content as a format that carries energies (a Quantum ESPRESSO output named
# scf.out); structure-only files (POSCAR, CONTCAR, .cif) are skipped, as they hold no labels.
KNOWN_SUFFIXES = {".xsf", ".xyz", ".extxyz", ".db", ".traj", ".json"}
KNOWN_IN_NAME = ("OUTCAR", "vasprun")
STRUCTURE_ONLY = {".cif", ".vasp", ".poscar"}
STRUCTURE_ONLY_NAMES = ("POSCAR", "CONTCAR")
# ASE formats taken from a file's content, each with the bytes its head must hold (ASE's guess
# goes by the name for some: a SLURM log 'slurm-1.out' is 'espresso-out' to it)
LABELLED_FORMATS = {"espresso-out": b"Program PWSCF", "vasp-out": b"vasp.", "vasp-xml": b"<modeling",
                    "traj": b"", "db": b""}
XSF_FORMATS = {"xsf", "aenet-xsf", "aenet"}

_PBC_KEYWORDS = {"CRYSTAL": (True, True, True), "SLAB": (True, True, False),
                 "POLYMER": (True, False, False), "MOLECULE": (False, False, False)}


def _symbol_to_number(tok: str, path, lineno: int) -> int:
    from ase.data import atomic_numbers

    if tok.lstrip("-").isdigit():
        z = int(tok)
        if 1 <= z <= 118:
            return z
        raise InputError(f"{path}:{lineno}: field 'species': invalid atomic number {tok!r}")
    sym = tok[:1].upper() + tok[1:].lower()
    z = atomic_numbers.get(sym, 0)
    if z <= 0:
        raise InputError(f"{path}:{lineno}: field 'species': unknown element symbol {tok!r}")
    return z


def _floats(parts, path, lineno, what):
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise InputError(f"{path}:{lineno}: field '{what}': cannot parse numbers in {' '.join(parts)!r}") from None


def read_xsf(path, text: str | None = None) -> list[Structure]:
    """Parse one aenet XSF file (one structure).  Energy is NaN when the file has no
    ``# total energy`` line (validation reports it); forces are None when absent."""
    path = str(path)
    if text is None:
        try:
            with open(path, "r", encoding="utf-8", errors="strict") as fh:
                text = fh.read()
        except UnicodeDecodeError:
            raise InputError(f"{path}: not a text file (malformed XSF)") from None
        except OSError as exc:
            raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    lines = text.splitlines()
    if not any(ln.strip() for ln in lines):
        raise InputError(f"{path}: empty file")
    energy = float("nan")
    mode = None
    pbc = (False, False, False)
    pbc_keyword = False          # CRYSTAL / SLAB / POLYMER / MOLECULE seen
    cell = np.zeros((3, 3))
    atom_lines: list[tuple[int, list[str]]] = []
    i = 0
    n = len(lines)
    while i < n:
        raw = lines[i].strip()
        lineno = i + 1
        i += 1
        if not raw:
            continue
        if raw.startswith("#"):
            low = raw.lower()
            if "total energy" in low:
                try:
                    rhs = raw.split("=", 1)[1].split()
                    energy = float(rhs[0])
                except (IndexError, ValueError):
                    raise InputError(f"{path}:{lineno}: field 'energy': cannot parse {raw!r}") from None
                if len(rhs) > 1 and rhs[1].lower() not in ("ev",):
                    raise InputError(f"{path}:{lineno}: field 'energy': unit {rhs[1]!r} is not eV")
            continue
        key = raw.split()[0].upper()
        if key == "ANIMSTEPS":
            raise InputError(f"{path}:{lineno}: animated XSF (ANIMSTEPS) is not supported; "
                             "convert it to extended XYZ")
        if key in _PBC_KEYWORDS:
            pbc = _PBC_KEYWORDS[key]
            pbc_keyword = True
            mode = "periodic" if any(pbc) else None
            continue
        if key == "ATOMS":
            mode = "atoms"
            while i < n:
                s = lines[i].strip()
                if not s or s.startswith("#"):
                    i += 1
                    continue
                first = s.split()[0].upper()
                if first in _PBC_KEYWORDS or first in ("PRIMVEC", "PRIMCOORD", "CONVVEC", "ATOMS"):
                    break
                atom_lines.append((i + 1, s.split()))
                i += 1
            continue
        if key in ("PRIMVEC", "CONVVEC"):
            vecs = []
            while len(vecs) < 3:
                if i >= n:
                    raise InputError(f"{path}:{i}: field 'cell': {key} block ends early")
                s = lines[i].strip()
                i += 1
                if not s or s.startswith("#"):
                    continue
                parts = s.split()
                if len(parts) != 3:
                    raise InputError(f"{path}:{i}: field 'cell': expected 3 numbers, got {s!r}")
                vecs.append(_floats(parts, path, i, "cell"))
            if key == "PRIMVEC":
                cell = np.array(vecs, dtype=np.float64)
                if not pbc_keyword:
                    # aenet's reader (xsflib.f90) makes any structure with a PRIMVEC block periodic
                    # in all three directions, keyword or not, and files without CRYSTAL exist
                    # (hand-written, other tools); read as a molecule, such a cell lost its
                    # periodic images silently (a 1-atom fcc cell became one free atom)
                    pbc = (True, True, True)
                    mode = "periodic"
            continue
        if key == "PRIMCOORD":
            mode = "periodic" if mode is None and not any(pbc) else mode
            while i < n and (not lines[i].strip() or lines[i].strip().startswith("#")):
                i += 1
            if i >= n:
                raise InputError(f"{path}:{i}: field 'natoms': PRIMCOORD without atom count")
            head = lines[i].split()
            i += 1
            try:
                nat = int(head[0])
            except (IndexError, ValueError):
                raise InputError(f"{path}:{i}: field 'natoms': expected 'N 1' after PRIMCOORD, got "
                                 f"{' '.join(head)!r}") from None
            while len(atom_lines) < nat:
                if i >= n:
                    raise InputError(f"{path}:{i}: field 'positions': PRIMCOORD announces {nat} atoms, "
                                     f"file has {len(atom_lines)}")
                s = lines[i].strip()
                i += 1
                if not s or s.startswith("#"):
                    continue
                atom_lines.append((i, s.split()))
            continue
        raise InputError(f"{path}:{lineno}: unexpected line {raw!r} (malformed XSF)")
    if not atom_lines:
        raise InputError(f"{path}: field 'positions': no atoms (malformed XSF)")
    ncol = len(atom_lines[0][1])
    numbers = np.empty(len(atom_lines), dtype=np.int64)
    pos = np.empty((len(atom_lines), 3))
    frc = np.empty((len(atom_lines), 3)) if ncol == 7 else None
    for k, (ln, parts) in enumerate(atom_lines):
        if len(parts) != ncol or ncol not in (4, 7):
            raise InputError(f"{path}:{ln}: field 'positions': expected 4 or 7 columns "
                             f"(symbol x y z [fx fy fz]) consistently, got {len(parts)}")
        numbers[k] = _symbol_to_number(parts[0], path, ln)
        vals = _floats(parts[1:], path, ln, "positions" if ncol == 4 else "positions/forces")
        pos[k] = vals[:3]
        if frc is not None:
            frc[k] = vals[3:6]
    if any(pbc) and not np.any(cell):
        raise InputError(f"{path}: field 'cell': periodic structure without PRIMVEC")
    if not any(pbc):
        cell = np.zeros((3, 3)) if mode == "atoms" else cell
    return [Structure(numbers=numbers, positions=pos, cell=cell, pbc=np.array(pbc, dtype=bool),
                      energy=energy, forces=frc, source=path, source_index=0)]


class _ReprFmt:
    @staticmethod
    def format(v) -> str:
        return repr(float(v))


def write_xsf(path, structure: Structure, precision: int | None = None) -> None:
    """Write one structure as aenet XSF (energy comment, forces in columns 5-7 if present).
    Numbers are written exactly (shortest round-trip repr) unless ``precision`` (fixed
    decimals) is given."""
    s = structure
    fmt = f"{{:.{precision}f}}" if precision is not None else _ReprFmt
    out = []
    if np.isfinite(s.energy):
        out.append(f"# total energy = {fmt.format(s.energy)} eV")
        out.append("")
    pbc = tuple(bool(p) for p in np.asarray(s.pbc))
    from ase.data import chemical_symbols

    def atom_line(k):
        row = [chemical_symbols[int(s.numbers[k])]] + [fmt.format(v) for v in s.positions[k]]
        if s.forces is not None:
            row += [fmt.format(v) for v in s.forces[k]]
        return "    ".join(row)

    if any(pbc):
        key = {(True, True, True): "CRYSTAL", (True, True, False): "SLAB",
               (True, False, False): "POLYMER"}.get(pbc)
        if key is None:
            raise ValueError(f"XSF cannot express pbc={pbc}")
        out.append(key)
        out.append("PRIMVEC")
        cell = np.asarray(s.cell, dtype=np.float64).reshape(3, 3)
        full = complete_cell(cell, np.asarray(pbc))
        pos = np.asarray(s.positions, dtype=np.float64)
        for d in range(3):
            if pbc[d]:
                continue
            # aenet reads every PRIMVEC cell as periodic in all three directions (predict.x crashed
            # on zero vectors, and a slab's short vacuum vector made its periodic images interact):
            # a non-periodic axis gets at least 20 A of vacuum between the atoms and their image,
            # measured along the normal of the other two vectors, its direction kept (a zero or
            # dependent vector: complete_cell's unit vector)
            n = np.cross(full[(d + 1) % 3], full[(d + 2) % 3])
            n /= np.linalg.norm(n)
            height = abs(float(full[d] @ n))
            extent = float(np.ptp(pos @ n)) if len(pos) else 0.0
            if height < extent + 20.0:
                full[d] = full[d] * ((extent + 20.0) / height)
        for v in full:
            out.append("    ".join(fmt.format(x) for x in v))
        out.append("PRIMCOORD")
        out.append(f"{len(s.numbers)} 1")
    else:
        out.append("ATOMS")
    out.extend(atom_line(k) for k in range(len(s.numbers)))
    Path(path).write_text("\n".join(out) + "\n")


def stress_tensor(value, where: str, field: str = "stress") -> np.ndarray:
    """A stress given as 3x3, 9 values (row-major) or 6 Voigt values (ASE order xx yy zz yz xz xy)
    -> [3, 3] float64 (symmetrised for Voigt input).  InputError naming ``where`` otherwise."""
    from ase.stress import voigt_6_to_full_3x3_stress

    try:
        v = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{where}: field '{field}': cannot read {value!r} as numbers") from None
    if v.size == 6:
        return voigt_6_to_full_3x3_stress(v)
    if v.size == 9:
        return v.reshape(3, 3).copy()
    raise InputError(f"{where}: field '{field}': expected 6 (Voigt) or 9 (3x3) values, got {v.size}")


def _ase_stress(atoms, results, where: str):
    """The stress of an ASE frame in distmlip's convention (eV/A^3, ASE sign) or None: the
    calculator's ``stress`` (extxyz ``stress=``, OUTCAR, vasprun.xml, any single-point result),
    else ``info['stress']``, else ``info['virial']`` (extxyz of GAP/NEP/MACE: the virial
    W = -V * stress, eV)."""
    if results.get("stress") is not None:
        return stress_tensor(results["stress"], where)
    info = atoms.info
    if info.get("stress") is not None:
        return stress_tensor(info["stress"], where)
    if info.get("virial") is not None:
        w = stress_tensor(info["virial"], where, "virial")
        vol = abs(float(np.linalg.det(np.asarray(atoms.cell.array, dtype=np.float64))))
        if not vol > 0:
            raise InputError(f"{where}: field 'virial': structure has no cell volume to turn the virial into a stress")
        return -w / vol
    return None


@dataclass(frozen=True)
class LabelKeys:
    """Where ASE frames keep their labels when not as calculator results or the plain ``energy``
    / ``forces`` / ``stress`` keys: extxyz files of many published data sets carry them as
    ``REF_energy``, ``REF_forces``, ``REF_stress`` or ``dft_energy`` (convert's --energy-key,
    --forces-key, --stress-key).  A given key is read from ``info`` (energy, stress) or
    ``arrays`` (forces) and wins over the calculator."""
    energy: Optional[str] = None
    forces: Optional[str] = None
    stress: Optional[str] = None


def _unread_labels(atoms, keys: LabelKeys, energy, forces, stress, where: str, results=None) -> None:
    """A frame whose label sits under a key that was not asked for would lose it silently (no
    energy: rejected; no forces or stress: stored without): stop and name the key instead.  The
    same when a key was given (``--forces-key``) but the frame has the label only under another
    key: a typo in the option would otherwise drop the label from every frame with exit 0."""
    looks = [("energy", "--energy-key", keys.energy, np.isnan(energy), atoms.info, ("energy",)),
             ("forces", "--forces-key", keys.forces, forces is None, atoms.arrays, ("force",)),
             ("stress", "--stress-key", keys.stress, stress is None, atoms.info, ("stress", "virial"))]
    n = len(atoms)

    def fits(field_, v) -> bool:      # a value of the label's shape (not a weight, a flag, a name)
        try:
            a = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):
            return False
        return {"energy": a.size == 1, "forces": a.shape == (n, 3), "stress": a.size in (6, 9)}[field_]

    for field_, opt, given, missing, store, words in looks:
        if not missing:
            continue
        pool = dict(store) if given is None else {**(results or {}), **store}
        cand = sorted(k for k in pool if k != given and any(w in k.lower() for w in words)
                      and "weight" not in k.lower() and fits(field_, pool[k]))
        if not cand:
            continue
        # files evaluated by a model carry its predictions beside the reference labels (REF_energy
        # and MACE_energy): with several candidates none is guessed; the one with the prefix of
        # a key already given comes first (REF_forces after --energy-key REF_energy)
        prefixes = {g.lower().split("_")[0] for g in (keys.energy, keys.forces, keys.stress)
                    if g and "_" in g}
        cand.sort(key=lambda k: (k.lower().split("_")[0] not in prefixes, k))
        same = [k for k in cand if "_" in k and k.lower().split("_")[0] in prefixes]
        if len(cand) == 1 or len(same) == 1:
            how = f"pass {opt} {cand[0]}"
        else:
            how = (f"pass {opt} with the key that holds the reference (DFT) labels; several keys fit, so "
                   f"convert does not guess (a file evaluated by a model also carries its predictions)")
        if "virial" in cand[0].lower() and field_ == "stress":
            how += " (a key named '...virial...' is read as a virial W and stored as the stress -W / V)"
        if given is not None:
            raise InputError(f"{where}: field '{field_}': no key '{given}' ({opt}) in this frame, but it has "
                             f"{', '.join(map(repr, cand))}: a typo in {opt}? ({how})")
        raise InputError(f"{where}: field '{field_}': no {field_} where convert reads it (the calculator "
                         f"results or the key '{field_}'), but the frame has {', '.join(map(repr, cand))}: "
                         f"{how}")


_NOTED: set = set()      # (what, file) already said


def _note_once(what: str, path, msg: str) -> None:
    """Warn ``msg`` once per input file and kind of note (not once per frame)."""
    if (what, str(path)) not in _NOTED:
        _NOTED.add((what, str(path)))
        from ..utils.log import warn
        warn(msg)


def _note_fixed_atoms(atoms, path, where: str) -> None:
    """Say once per file that its frames fix atoms (ASE FixAtoms: selective dynamics, extxyz
    move_mask): the data set does not keep constraints, and augment displaces every atom of a
    copy unless the subset's ``fixed_atoms`` names them."""
    if ("fixed", str(path)) in _NOTED:
        return
    idx = set()
    for c in getattr(atoms, "constraints", None) or []:
        if type(c).__name__ == "FixAtoms":
            idx.update(int(i) for i in c.get_indices())
    if not idx:
        return
    shown = sorted(idx)
    # the whole list, ready to paste (the first 12 of 50 were shown, with an instruction to list
    # them all: sweep 12); the subset's name is the formula `distmlip info` prints
    listed = "[" + ", ".join(map(str, shown)) + "]" if len(shown) <= 400 else \
        f"{len(shown)} indices, {shown[0]}..{shown[-1]} (too many to print)"
    formula = atoms.get_chemical_formula(mode="hill") if hasattr(atoms, "get_chemical_formula") else "?"
    _note_once("fixed", path, f"{where}: {len(shown)} of the {len(atoms)} atoms ({formula}) are fixed (FixAtoms / "
               f"move_mask); the data set does not keep constraints: for augment to leave them in place, give "
               f"them to that subset (`distmlip info` names it): subsets: {{NAME: {{fixed_atoms: {listed}}}}} "
               f"(docs/gpr.md)")


_CHARGE_SPIN_KEYS = ("charge", "total_charge", "spin", "total_spin", "multiplicity", "spin_multiplicity")


def _note_charge_spin(atoms, path, where: str) -> None:
    """Say once per file that its frames carry a charge or spin state: the model has no input for
    it, so the same atoms in two states are contradictory targets (convert warns when the same
    geometry appears with two energies)."""
    if ("charge", str(path)) in _NOTED:
        return
    got = {k: atoms.info[k] for k in _CHARGE_SPIN_KEYS if k in atoms.info
           and isinstance(atoms.info[k], (int, float, np.number)) and not isinstance(atoms.info[k], bool)}
    neutral = {k: (1.0 if "multiplicity" in k else 0.0) for k in got}
    if any(float(v) != neutral[k] for k, v in got.items()):
        shown = ", ".join(f"{k}={v}" for k, v in got.items())
        _note_once("charge", path, f"{where}: the frame gives {shown}; the data set does not keep charge or spin "
                   f"and the model has no input for them: structures of one composition in different states are "
                   f"fitted as one potential energy surface")


def _from_ase(atoms, path, k, keys: Optional[LabelKeys] = None) -> Structure:
    keys = keys or LabelKeys()
    where = f"{path}: structure {k}"
    energy = float("nan")
    forces = None
    calc = atoms.calc
    results = getattr(calc, "results", {}) if calc is not None else {}
    if keys.energy is not None:
        v = atoms.info.get(keys.energy, results.get(keys.energy))
        if v is None:
            raise InputError(f"{where}: field 'energy': no key '{keys.energy}' (--energy-key) in this frame")
        energy = float(v)
    elif "energy" in results:
        energy = float(results["energy"])
    elif "free_energy" in results:
        energy = float(results["free_energy"])
        # which energy a user gets matters: said once per file
        _note_once("free_energy", path, f"{where}: no 'energy' in the calculator results, only 'free_energy': "
                   f"stored as the energy (for this file's frames that lack 'energy'; --energy-key chooses "
                   f"another key)")
    elif "energy" in atoms.info:
        energy = float(atoms.info["energy"])
    # a forces or stress key may be absent from some frames (molecules beside bulk cells): those
    # frames are stored without (flagged, counted by `distmlip info`); an energy key is required
    if keys.forces is not None:
        v = atoms.arrays.get(keys.forces, results.get(keys.forces))
        forces = None if v is None else np.array(v, dtype=np.float64)
    elif results.get("forces") is not None:
        forces = np.array(results["forces"], dtype=np.float64)
    elif "forces" in atoms.arrays:
        forces = np.array(atoms.arrays["forces"], dtype=np.float64)
    if keys.stress is not None:
        v = atoms.info.get(keys.stress, results.get(keys.stress))
        stress = None if v is None else stress_tensor(v, where)
        if stress is not None and "virial" in keys.stress.lower():
            # a virial (W = -V stress, eV: extxyz of GAP/NEP/MACE data sets) under the stress key
            # would be stored as a stress V times too large with the wrong sign
            vol = abs(float(np.linalg.det(np.asarray(atoms.cell.array, dtype=np.float64))))
            if not vol > 0:
                raise InputError(f"{where}: field '{keys.stress}': structure has no cell volume to turn the "
                                 f"virial into a stress")
            stress = -stress / vol
            _note_once("virial", path, f"{path}: '{keys.stress}' (--stress-key) is read as a virial W (eV) and "
                       f"stored as the stress -W / V (eV/A^3)")
    else:
        stress = _ase_stress(atoms, results, where)
    _unread_labels(atoms, keys, energy, forces, stress, where, results)
    _note_fixed_atoms(atoms, path, where)
    _note_charge_spin(atoms, path, where)
    return Structure(numbers=np.array(atoms.numbers, dtype=np.int64),
                     positions=np.array(atoms.positions, dtype=np.float64),
                     cell=np.array(atoms.cell.array, dtype=np.float64),
                     pbc=np.array(atoms.pbc, dtype=bool), energy=energy, forces=forces,
                     source=str(path), source_index=k, stress=stress)


def read_ase(path, format: str | None = None, keys: Optional[LabelKeys] = None) -> list[Structure]:
    """Read all frames of any ASE-readable file (extxyz, ASE db, traj, OUTCAR, ...)."""
    import ase.io

    path = str(path)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise InputError(f"{path}: empty file")
    try:
        # parallel=False: each rank reads its own files; ASE's default would broadcast from
        # rank 0 under MPI and deadlock when ranks read different files
        frames = ase.io.read(path, index=":", format=format, parallel=False)
    except InputError:
        raise
    except Exception as exc:  # ASE raises many types for malformed input
        raise InputError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    if not isinstance(frames, list):
        frames = [frames]
    if not frames:
        raise InputError(f"{path}: no structures in file")
    return [_from_ase(a, path, k, keys) for k, a in enumerate(frames)]


def read_file(path, format: str | None = None, keys: Optional[LabelKeys] = None) -> list[Structure]:
    """Read every structure of one file; aenet XSF by our parser, everything else by ASE."""
    p = str(path)
    if (format or "").lower() in XSF_FORMATS or (format is None and p.lower().endswith(".xsf")):
        return read_xsf(p)
    return read_ase(p, format=format, keys=keys)


def _discover(path: Path, format: str | None) -> tuple[bool, str]:
    """(read it, why not) for a file found in a directory."""
    name = path.name
    if name.startswith("."):
        return False, "hidden"
    if format is not None:
        return True, ""
    suffix = path.suffix.lower()
    if suffix in STRUCTURE_ONLY or name.startswith(STRUCTURE_ONLY_NAMES):
        return False, "structure only (no energies)"
    if suffix == ".json":
        # an ASE database, or a stray metadata.json that stopped the whole conversion
        try:
            import ase.db

            with ase.db.connect(str(path), type="json") as db:
                db.count()
            return True, ""
        except Exception:
            return False, "not an ASE database"
    if suffix in KNOWN_SUFFIXES or any(k in name for k in KNOWN_IN_NAME):
        return True, ""
    try:
        from ase.io.formats import filetype

        kind = filetype(str(path), guess=False)
    except Exception:
        kind = None
    if kind in LABELLED_FORMATS:
        try:
            with open(path, "rb") as fh:
                head = fh.read(1 << 16)
        except OSError:
            head = b""
        if LABELLED_FORMATS[kind] in head:
            return True, ""
    return False, "not a known data format"


def _vasp_pairs(files: list[str]) -> tuple[list[str], list[str]]:
    """A VASP run folder holds its steps twice (OUTCAR and vasprun.xml): every structure was
    converted twice, and the copies landed in training and validation alike.  Keep vasprun.xml
    (more digits) where a folder has both; returns (kept, dropped)."""
    by_dir: dict[str, list[str]] = {}
    for f in files:
        by_dir.setdefault(os.path.dirname(f), []).append(f)
    drop = set()
    for d, fs in by_dir.items():
        if any("vasprun" in os.path.basename(f) for f in fs):
            drop.update(f for f in fs if "OUTCAR" in os.path.basename(f))
    return [f for f in files if f not in drop], sorted(drop)


def _tree_files(root) -> list[Path]:
    """Every file below ``root``, sorted by path, following symbolic links to folders (each real
    folder once: a link to an ancestor is no loop).  Path.rglob skips linked folders: a data
    tree that links in another group's calculations lost them without a word (sweep 20)."""
    seen, out = set(), []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        out += [Path(dirpath) / f for f in filenames]
    return sorted(out)


def _scan_dir(root, format: str | None) -> list[str]:
    found, skipped = [], {}
    for p in _tree_files(root):
        if not p.is_file():
            if p.is_symlink():
                skipped.setdefault("broken symbolic link", []).append(p.name)
            continue
        ok, why = _discover(p, format)
        if ok:
            found.append(str(p))
        elif why != "hidden":
            skipped.setdefault(why, []).append(p.name)
    if format is None:
        found, dropped = _vasp_pairs(found)
        if dropped:
            skipped.setdefault("OUTCAR beside vasprun.xml (the same steps; vasprun.xml is read)", []).extend(
                os.path.basename(f) for f in dropped)
    if skipped:
        from ..utils.log import warn

        parts = [f"{len(v)} {why} ({', '.join(sorted(set(v))[:4])}{' ...' if len(set(v)) > 4 else ''})"
                 for why, v in skipped.items()]
        warn(f"{root}: files not read: {'; '.join(parts)}; name a file to read it anyway, or pass --format")
    return found


def expand_inputs(inputs: Iterable[str], format: str | None = None) -> list[str]:
    """Files, directories (recursive) and glob patterns -> ordered list of file paths.

    Order: inputs in the order given; a directory's or a glob's files sorted by path.
    Duplicates are dropped (first occurrence kept)."""
    out: list[str] = []
    seen = set()

    def add(p):
        key = os.path.normpath(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            out.append(os.path.normpath(p))

    for item in inputs:
        item = str(item)
        if os.path.isdir(item):
            found = _scan_dir(item, format)
            if not found:
                raise InputError(f"{item}: directory contains no readable data files")
            for f in found:
                add(f)
        elif os.path.isfile(item):
            add(item)
        elif glob.has_magic(item):
            found = sorted(glob.glob(item, recursive=True))
            files = []
            for f in found:
                if os.path.isdir(f):
                    files += _scan_dir(f, format)
                else:
                    files.append(f)
            if not files:
                raise InputError(f"{item}: pattern matches no files")
            for f in files:
                add(f)
        else:
            raise InputError(f"{item}: no such file or directory")
    return out


def iter_structures(inputs: Iterable[str], format: str | None = None) -> Iterator[Structure]:
    """Yield every structure of every input (files, directories, globs) in input order."""
    for f in expand_inputs(inputs, format):
        yield from read_file(f, format)
