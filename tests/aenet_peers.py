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


def run(prog: str, infile: str, cwd, timeout: float = 600, extra=()) -> str:
    exe = aenet_bin_dir() / prog
    res = subprocess.run([str(exe), infile, *extra], cwd=str(cwd), capture_output=True, text=True, timeout=timeout)
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


def write_setup(path, element: str, envtypes, rc_radial, n_radial, rc_angular, n_angular) -> Path:
    """A generate.x descriptor setup file (Chebyshev basis)."""
    path = Path(path)
    path.write_text("\n".join(["DESCR", " distmlip test setup", "END DESCR", "", f"ATOM {element}", "",
                                f"ENV {len(envtypes)}"] + list(envtypes) + ["", "RMIN 0.5d0", "",
                                "BASIS type=Chebyshev",
                                f"radial_Rc = {rc_radial}  radial_N = {n_radial} angular_Rc = {rc_angular}  "
                                f"angular_N = {n_angular}"]) + "\n")
    return path


def generate(workdir, xsf_files, species, atomic_energies: dict, descriptor: dict, output="train.set",
             forces: bool = False) -> Path:
    """Run generate.x on ``xsf_files`` (one setup per element of ``species``, environment in that
    order; ``forces``: the forces and descriptor derivatives too, as aenet-PyTorch reads them);
    returns the path of the binary training-set file."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    d = descriptor
    for el in species:
        write_setup(workdir / f"{el}.stp", el, species, d["rc_radial"], d["n_radial"], d["rc_angular"], d["n_angular"])
    L = [f"OUTPUT {output}", "", "TYPES", str(len(species))]
    L += [f"{el} {float(atomic_energies.get(el, 0.0))!r}" for el in species]
    L += ["", "SETUPS"] + [f"{el} {el}.stp" for el in species] + ["", "FORCES", "FORCESPERCENT 100"] * forces
    L += ["", "FILES", str(len(xsf_files))]
    L += [str(Path(f).resolve()) for f in xsf_files]
    (workdir / "generate.in").write_text("\n".join(L) + "\n")
    out = run("generate.x", "generate.in", workdir)
    (workdir / "generate.out").write_text(out)
    return workdir / output


def raw_features(workdir, trainset: Path) -> list:
    """The unnormalised descriptors generate.x stored, per structure [n_atoms, nsf] in file
    order (trnset2ASCII.x --raw)."""
    workdir = Path(workdir)
    run("trnset2ASCII.x", "--raw", workdir, extra=[str(trainset), "raw.ascii"])
    tok = (workdir / "raw.ascii").read_text().split()
    # header: file, normalized, scale, shift, ntypes, names, E_atom(ntypes), natomtot, nstrucs, Emin Emax Eav
    k = 4
    ntypes = int(tok[k]); k += 1 + 2 * ntypes
    k += 1
    nstrucs = int(tok[k]); k += 1 + 3
    out = []
    for _ in range(nstrucs):
        k += 1                                     # file name
        nat = int(tok[k]); k += 3                  # natoms, ntypes, energy
        rows = []
        for _ in range(nat):
            k += 1 + 3 + 3                         # type, coordinates, forces
            nsf = int(tok[k]); k += 1
            rows.append([float(v) for v in tok[k:k + nsf]]); k += nsf
        out.append(np.array(rows))
    return out
