"""Shared test helpers: real mpirun jobs, paths of the shared DFT data."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("DISTMLIP_SHARED_DATA", REPO.parent / "shared" / "data"))


def require_shared(sub: str) -> Path:
    p = shared_data_dir() / sub
    if not p.exists():
        pytest.skip(f"shared data {p} not available (set DISTMLIP_SHARED_DATA)")
    return p


def mpirun_exe() -> str:
    exe = shutil.which("mpirun", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        pytest.skip("mpirun not found")
    return exe


_LAUNCHER_FAILED = "PMIx server's listener thread failed to start"


def mpirun(n: int, args: list[str], *, timeout: float = 300, env: dict | None = None,
           check: bool = True, cwd=None) -> subprocess.CompletedProcess:
    """Run ``mpirun -n N python -m <args>`` (args[0] may be '-m' or a script) and return the result."""
    cmd = [mpirun_exe(), "-n", str(n), "--oversubscribe"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += ["-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", sys.executable] + list(args)
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    if env:
        e.update(env)
    for _ in range(3):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=cwd)
        # Open MPI's launcher itself failing to start (no rank ran): seen once on a loaded CI-like
        # machine; a launch retry, not a retry of anything distmlip did
        if not (res.returncode != 0 and not res.stdout and _LAUNCHER_FAILED in res.stderr):
            break
    if check and res.returncode != 0:
        raise AssertionError(f"mpirun failed ({res.returncode}):\nSTDOUT:\n{res.stdout[-4000:]}\nSTDERR:\n{res.stderr[-4000:]}")
    return res


def distmlip_cli(args: list[str], *, check: bool = True, timeout: float = 300, cwd=None):
    """Run the distmlip CLI in a fresh process."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "distmlip"] + list(args), capture_output=True,
                         text=True, timeout=timeout, env=e, cwd=cwd)
    if check and res.returncode != 0:
        raise AssertionError(f"distmlip {args} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def emt_structure(atoms, source: str, index: int):
    """A distmlip Structure of ``atoms`` labelled by ASE's EMT (energy and forces)."""
    from ase.calculators.emt import EMT

    from distmlip.data.structure import Structure

    atoms.calc = EMT()
    return Structure(numbers=atoms.numbers.copy(), positions=atoms.positions.copy(), cell=atoms.cell.array.copy(),
                     pbc=atoms.pbc.copy(), energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                     source=source, source_index=index)


def rattled_copies(atoms, count: int, rng, skew: float = 0.0, unwrap: bool = False) -> list:
    """``count`` distmlip Structures of ASE ``atoms`` with positions rattled (0.15 A), cells
    skewed (``skew``: relative, positions kept) and atoms moved by whole lattice vectors in
    periodic directions (``unwrap``); random energies.  Awkward geometry for neighbour tests."""
    import numpy as np

    from distmlip.data.structure import Structure

    out = []
    for _ in range(count):
        b = atoms.copy()
        b.positions += rng.normal(0, 0.15, b.positions.shape)
        if skew:
            b.set_cell(np.array(b.cell) @ (np.eye(3) + rng.normal(0, skew, (3, 3))), scale_atoms=False)
        if unwrap:
            b.positions += (rng.integers(-3, 4, (len(b), 3)) * b.pbc) @ np.array(b.cell)
        out.append(Structure(numbers=b.numbers.copy(), positions=b.positions.copy(), cell=np.array(b.cell),
                             pbc=b.pbc.copy(), energy=float(rng.normal())))
    return out


def tmpfs(folder, size: str, read_only: bool = False):
    """Context manager: a tmpfs of ``size`` (e.g. "64k": a full disk in a few writes) mounted on
    the existing ``folder``, read-only if asked; a skip where mounting is not allowed."""
    import contextlib

    @contextlib.contextmanager
    def _mount():
        opts = ("ro," if read_only else "") + f"size={size}"
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], capture_output=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs ({opts}) here ({res.stderr.decode().strip()})")
        try:
            yield Path(folder)
        finally:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)

    return _mount()


def read_only_folder(folder):
    """Context manager: ``folder`` (with its files) read-only for this process and its children.
    chmod where permissions count; as root (who ignores them) a read-only bind mount of the folder
    onto itself; a skip where neither is possible."""
    import contextlib

    @contextlib.contextmanager
    def _ro():
        folder_ = Path(folder)
        if os.geteuid() != 0:
            modes = {p: p.stat().st_mode for p in [folder_, *folder_.iterdir()]}
            for p, m in modes.items():
                p.chmod(m & ~0o222)
            try:
                yield folder_
            finally:
                for p, m in modes.items():
                    p.chmod(m)
            return
        res = subprocess.run(["mount", "--bind", str(folder_), str(folder_)], capture_output=True)
        if res.returncode != 0:
            pytest.skip(f"cannot make a read-only folder here ({res.stderr.decode().strip()})")
        try:
            res = subprocess.run(["mount", "-o", "remount,bind,ro", str(folder_)], capture_output=True)
            if res.returncode != 0:
                pytest.skip(f"cannot make a read-only folder here ({res.stderr.decode().strip()})")
            yield folder_
        finally:
            subprocess.run(["umount", "-l", str(folder_)], capture_output=True)

    return _ro()
