"""Streaming read benchmark of the distmlip HDF5 data set.

Generates a data set larger than --size-gb on the fly (random periodic structures of 8..120
atoms with energies and forces, written by the real H5Writer), then measures in child processes
(so that peak memory, ru_maxrss, is the reader's own):

  * raw sequential read of the file bytes (dd-style, 16 MiB buffer)
  * PartitionedStream, rank 0 of 1: block shuffle (default), full shuffle, no shuffle
  * PartitionedStream, rank 0 of 2 (reads only its half)

Before every measurement the file's pages are dropped from the page cache with
posix_fadvise(DONTNEED) (works for clean pages of a file we wrote and fsynced; it cannot be
guaranteed on every file system, so the table says whether the cache drop was possible).
MB/s of the stream counts the decoded array bytes handed to the consumer (numbers, positions,
forces, per-structure fields), not file bytes.

    python benchmarks/io.py [--size-gb 1.1] [--keep DIR] [--time-limit 60]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BYTES_PER_ATOM = 1 + 24 + 24
BYTES_PER_STRUCT = 8 + 4 + 8 + 72 + 3 + 4 + 1 + 1 + 8 + 8 + 8 + 4 + 8


def drop_cache(path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (AttributeError, OSError):
        return False


def generate(path: Path, size_gb: float, seed: int = 0) -> dict:
    from distmlip.data import h5store

    rng = np.random.default_rng(seed)
    target_atoms = int(size_gb * 1e9 / BYTES_PER_ATOM * 1.03)
    species = np.array([1, 6, 8, 29, 79], dtype=np.uint8)
    t0 = time.time()
    n_atoms = n_struct = 0
    with h5store.H5Writer(path, species=["H", "C", "O", "Cu", "Au"], subsets=[
            {"name": f"random_{k}", "composition": "mixed", "natoms": -1} for k in range(8)]) as w:
        while n_atoms < target_atoms:
            S = 4096
            nat = rng.integers(8, 121, size=S)
            N = int(nat.sum())
            off = np.cumsum(nat) - nat
            atoms = {"numbers": species[rng.integers(0, len(species), size=N)],
                     "positions": rng.random((N, 3)) * 12.0,
                     "forces": rng.normal(0.0, 1.0, size=(N, 3))}
            st = {k: np.zeros((S,) + shp, dtype=dt) for k, (dt, shp) in h5store.STRUCT_FIELDS.items()}
            st["atom_offset"][:] = off
            st["natoms"][:] = nat
            st["energy"][:] = rng.normal(-3.0, 0.2, size=S) * nat
            st["cell"][:] = np.eye(3) * 12.0
            st["pbc"][:] = True
            st["subset"][:] = rng.integers(0, 8, size=S)
            st["has_forces"][:] = True
            st["parent"][:] = -1
            st["weight"][:] = 1.0
            st["source_file"][:] = 0
            st["source_index"][:] = np.arange(n_struct, n_struct + S)
            w.append_arrays(atoms, st, ["generated"])
            n_atoms += N
            n_struct += S
    return {"structures": n_struct, "atoms": n_atoms, "seconds": time.time() - t0,
            "bytes": path.stat().st_size}


def child_raw(path: str) -> dict:
    buf = bytearray(16 << 20)
    mv = memoryview(buf)
    t0 = time.time()
    total = 0
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(mv)
            if not n:
                break
            total += n
    dt = time.time() - t0
    return {"seconds": dt, "bytes": total}


def child_stream(path: str, rank: int, world: int, shuffle: bool, block: int, time_limit: float) -> dict:
    from distmlip.data.h5store import H5Dataset
    from distmlip.data.stream import PartitionedStream

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t_open = time.time()
    ds = H5Dataset(path)
    s = PartitionedStream(ds, None, rank, world, batch_atoms=4096, batch_structures=128, seed=0,
                          shuffle=shuffle, prefetch=True, shuffle_block=block)
    steps = s.steps(0)
    t0 = time.time()
    n_s = n_a = 0
    done = 0
    for batch in s.epoch(0):
        n_s += len(batch)
        n_a += sum(len(x.numbers) for x in batch)
        done += 1
        if time.time() - t0 > time_limit:
            break
    dt = time.time() - t0
    return {"seconds": dt, "open_seconds": t0 - t_open, "structures": n_s, "atoms": n_a,
            "partition": int(len(s.partition())), "steps_done": done, "steps": steps,
            "complete": done == steps,
            "payload_bytes": n_a * BYTES_PER_ATOM + n_s * BYTES_PER_STRUCT,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "baseline_rss_mb": rss0 / 1024}


def run_child(args: list[str]) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child"] + args, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"child failed: {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.1)
    ap.add_argument("--keep", metavar="DIR", help="write the data set into DIR and keep it")
    ap.add_argument("--data", help="use an existing data set instead of generating one")
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per streaming measurement")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child is not None:
        kind, path = a.child[0], a.child[1]
        if kind == "raw":
            out = child_raw(path)
        else:
            rank, world, shuffle, block = (int(x) for x in a.child[2:6])
            out = child_stream(path, rank, world, bool(shuffle), block, float(a.child[6]))
        print(json.dumps(out))
        return 0

    tmpdir = None
    if a.data:
        path = Path(a.data)
        gen = None
    else:
        d = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="distmlip-io-"))
        d.mkdir(parents=True, exist_ok=True)
        tmpdir = None if a.keep else d
        path = d / "bench.h5"
        print(f"generating {a.size_gb} GB data set in {path} ...", flush=True)
        gen = generate(path, a.size_gb)
        print(f"  {gen['structures']} structures, {gen['atoms']} atoms, {gen['bytes'] / 1e9:.3f} GB on disk, "
              f"written in {gen['seconds']:.1f} s ({gen['bytes'] / 1e6 / gen['seconds']:.0f} MB/s)", flush=True)
    try:
        size = path.stat().st_size
        rows = []
        dropped = drop_cache(path)
        r = run_child(["raw", str(path)])
        rows.append(("raw sequential read (dd-style, 16 MiB)", r["seconds"], None, r["bytes"] / 1e6 / r["seconds"],
                     None, "file bytes", dropped))
        dropped = drop_cache(path)
        r = run_child(["raw", str(path)])
        rows.append(("raw sequential read, page cache warm", r["seconds"], None, r["bytes"] / 1e6 / r["seconds"],
                     None, "file bytes", False))
        for label, rank, world, shuf, block in (
                ("stream 1 rank, block shuffle (64 x 16)", 0, 1, 1, 64),
                ("stream 1 rank, no shuffle", 0, 1, 0, 1),
                ("stream rank 0 of 2, block shuffle", 0, 2, 1, 64),
                ("stream 1 rank, full shuffle", 0, 1, 1, 1)):
            dropped = drop_cache(path)
            r = run_child(["stream", str(path), str(rank), str(world), str(shuf), str(block), str(a.time_limit)])
            note = "" if r["complete"] else f" (stopped after {r['steps_done']}/{r['steps']} steps)"
            rows.append((label + note, r["seconds"], r["structures"] / r["seconds"],
                         r["payload_bytes"] / 1e6 / r["seconds"], r["maxrss_mb"], "decoded arrays", dropped))
        print()
        print(f"file: {path} ({size / 1e9:.3f} GB)")
        print(f"{'measurement':<58} {'time s':>8} {'struct/s':>10} {'MB/s':>8} {'peak RSS MB':>12}  cache dropped")
        for label, t, sps, mbs, rss, _, dr in rows:
            print(f"{label:<58} {t:8.1f} {sps if sps else float('nan'):10.0f} {mbs:8.0f} "
                  f"{rss if rss else float('nan'):12.0f}  {'yes' if dr else 'no'}")
        print("MB/s: raw = file bytes; stream = decoded array bytes delivered (49 B/atom + 137 B/structure).")
        print("peak RSS of the reader process includes the Python/numpy/h5py baseline (~60-80 MB).")
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
