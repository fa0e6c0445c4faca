"""Running the real aenet 2.0.4 programs (generate.x, train.x, predict.x) from tests.

The programs are looked up in ``DISTMLIP_AENET_BIN`` (default ``../shared/peers/aenet-2.0.4/bin``
beside the repository); tests that need them skip when they are absent.  Nothing of aenet is
part of the repository: these helpers write aenet's input files and read its printed output."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO


def aenet_bin_dir() -> Path:
    return Path(os.environ.get("DISTMLIP_AENET_BIN", REPO.parent / "shared" / "peers" / "aenet-2.0.4" / "bin"))


def require_aenet(*programs: str) -> Path:
    d = aenet_bin_dir()
    for prog in programs or ("predict.x",):
        if not (d / prog).is_file():
            pytest.skip(f"aenet program {d / prog} not available (set DISTMLIP_AENET_BIN)")
    return d


def write_xsf(path, atoms, energy: float | None = None) -> Path:
    """XSF as aenet reads it: ATOMS for a molecule, CRYSTAL/PRIMVEC/PRIMCOORD when periodic (all
    three directions), the total energy in the comment line, forces when the atoms have them."""
    path = Path(path)
    L = [f"# total energy = {0.0 if energy is None else energy:.12f} eV", ""]
    try:
        forces = atoms.get_forces()
    except Exception:
        forces = np.zeros((len(atoms), 3))
    rows = [f"{s:2s} {p[0]:22.14f} {p[1]:22.14f} {p[2]:22.14f} {f[0]:18.10f} {f[1]:18.10f} {f[2]:18.10f}"
            for s, p, f in zip(atoms.get_chemical_symbols(), atoms.positions, forces)]
    if atoms.pbc.all():
        L += ["CRYSTAL", "PRIMVEC"] + [f"{v[0]:22.14f} {v[1]:22.14f} {v[2]:22.14f}" for v in np.array(atoms.cell)]
        L += ["PRIMCOORD", f"{len(atoms)} 1"] + rows
    elif not atoms.pbc.any():
        L += ["ATOMS"] + rows
    else:
        raise ValueError("aenet reads fully periodic or free structures only")
    path.write_text("\n".join(L) + "\n")
    return path


def run(prog: str, infile: str, cwd, timeout: float = 600) -> str:
    exe = aenet_bin_dir() / prog
    res = subprocess.run([str(exe), infile], cwd=str(cwd), capture_output=True, text=True, timeout=timeout)
    out = res.stdout + res.stderr
    if res.returncode != 0 or "Fortran runtime error" in out:
        raise AssertionError(f"{prog} failed ({res.returncode}):\n{out[-3000:]}")
    return out


def predict(workdir, nn_files: dict, xsf_files, forces: bool = True):
    """Run predict.x in ``workdir`` (the .nn files are copied there: predict.x cuts paths at '/').
    ``nn_files``: {element: path}.  Returns (energies [S], list of forces [n_s, 3])."""
    import shutil

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    names = {}
    for el, p in nn_files.items():
        p = Path(p)
        if p.parent.resolve() != workdir.resolve():
            shutil.copyfile(p, workdir / p.name)
        names[el] = p.name
    els = list(nn_files)
    L = ["TYPES", str(len(els))] + els + ["", "NETWORKS"] + [f"  {el} {names[el]}" for el in els] + [""]
    if forces:
        L += ["FORCES", ""]
    L += ["FILES", str(len(xsf_files))] + [str(Path(f).resolve()) for f in xsf_files]
    (workdir / "predict.in").write_text("\n".join(L) + "\n")
    out = run("predict.x", "predict.in", workdir)
    (workdir / "predict.out").write_text(out)
    return parse_predict(out, forces)


def parse_predict(out: str, forces: bool = True):
    energies = [float(x) for x in re.findall(r"Total energy\s*:\s*(\S+)\s*eV", out)]
    F = []
    if forces:
        for block in out.split("Cartesian atomic coordinates")[1:]:
            lines = block.split("\n")
            start = next(k for k, ln in enumerate(lines) if ln.strip().startswith("-----")) + 1
            rows = []
            for ln in lines[start:]:
                t = ln.split()
                if len(t) != 7:
                    break
                rows.append([float(v) for v in t[4:7]])
            F.append(np.array(rows))
    return np.array(energies), F
