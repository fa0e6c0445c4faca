"""Helpers shared by the example drivers: the mpirun prefix and a logged, timed subprocess."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

AUG_YAML = """\
input: {input}
output: {output}
method: {method}
copies: {copies}
delta: {delta}
seed: 0
"""


def mpi_cmd(np_: int) -> list[str]:
    """``mpirun -n NP ... python -m distmlip`` with the flags needed as root and on a shared node."""
    exe = shutil.which("mpirun") or str(Path(sys.executable).parent / "mpirun")
    cmd = [exe, "-n", str(np_), "--oversubscribe"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd + ["--mca", "mpi_yield_when_idle", "1", "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH", sys.executable, "-m", "distmlip"]


def sh(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` with its output in ``log``; return the wall time, stop with the log tail on failure."""
    t0 = time.time()
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        p = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    dt = time.time() - t0
    if p.returncode:
        print(open(log).read()[-4000:])
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}  (log {log})")
    return dt


def prepare_run(out: Path, root: Path):
    """Environment and output folders of an example run: returns (out, logs, timings file, timings
    recorded by an earlier run).  Child processes import distmlip from ``root`` on one thread each."""
    import json

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["PYTHONPATH"] = str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    tfile = out / "timings.json"
    timings = json.loads(tfile.read_text()) if tfile.exists() else {}
    return out, logs, tfile, timings
