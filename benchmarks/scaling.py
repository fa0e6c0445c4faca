"""Data-parallel scaling of `distmlip train`: throughput (atoms/s) and parallel efficiency.

Writes an EMT data set (Cu/Au fcc supercells with rattled positions, energies and forces, via
the real H5Writer), then for every training mode and rank count starts a real
``mpirun -n R python benchmarks/scaling.py --worker ...`` job.  Each rank builds the real Trainer
and runs synchronous steps on its own stream partition (batch_atoms per rank: weak scaling, the
usual regime of data parallelism); after warm-up steps, the timed steps are bracketed by barriers
and the atoms of all ranks are summed:

    throughput(R) = global atoms trained / wall time        efficiency(R) = throughput(R) / (R * throughput(1))

For R > 1 it also runs R single-process copies at the same time (no communication; a file
barrier starts their timed windows together, and the windows' overlap is printed): their
summed throughput is what the cores deliver to R workers, so MPI / independent separates the cost
of communication from core contention (on a shared or hyper-threaded machine).

    python benchmarks/scaling.py [--ranks 1 2] [--modes energy force] [--seconds 3] [--steps 0] [--warmup 10] [--repeat 3]
                                 [--batch-atoms 2000] [--threads 1] [--backend auto] [--bind none|core]
                                 [--json out.json]

Ranks x threads should not exceed the cores; on a shared machine the figures include the
load of other users (the load average is printed with the table).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_data(path: Path, n: int, seed: int = 0) -> None:
    import numpy as np
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from distmlip.data.h5store import write_dataset
    from distmlip.data.structure import Structure

    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))  # 32 atoms
        swap = rng.choice(len(a), size=int(rng.integers(0, 9)), replace=False)
        for i in swap:
            a.symbols[i] = "Au"
        a.set_cell(a.cell[:] * (1 + rng.normal(0, 0.01)), scale_atoms=True)
        a.positions += rng.normal(0, 0.08, a.positions.shape)
        a.calc = EMT()
        out.append(Structure(a.numbers.copy(), a.positions.copy(), np.array(a.cell), a.pbc.copy(),
                             energy=a.get_potential_energy(), forces=a.get_forces().copy(),
                             source="scaling-emt", source_index=k))
    write_dataset(path, out)


def start_together(folder: Path, copies: int, timeout: float = 120.0) -> None:
    """Start barrier of the independent copies (they share no communicator): each announces
    itself with a file and waits for all.  Without it their timed windows did not overlap (each
    copy starts up at its own pace and a window of a few dozen energy steps is shorter than that
    difference), so the control measured copies running alone, not side by side."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"ready_{os.getpid()}").touch()
    t0 = time.monotonic()
    while len(list(folder.glob("ready_*"))) < copies:
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"independent copies: only {len(list(folder.glob('ready_*')))} of {copies} ready")
        time.sleep(2e-4)


def worker(args) -> int:
    import torch

    from distmlip.distributed import init_distributed, run_guarded, shutdown
    from distmlip.training.config import load_train_config
    from distmlip.training.trainer import Trainer

    def main():
        ctx = init_distributed("cpu")
        cfg_path = Path(args.work) / f"cfg_{args.mode}_{ctx.world_size}_{ctx.rank}.yaml"
        cfg_path.write_text(f"""
data: {{train: [{args.data}], fractions: [1.0, 0.0, 0.0], prefetch: true}}
descriptor: {{rc_radial: 6.0, n_radial: 10, rc_angular: 4.0, n_angular: 4, backend: {args.backend}}}
model: {{hidden: [16, 16]}}
training: {{mode: {args.mode}, epochs: 1000, batch_atoms: {args.batch_atoms}, lr: 0.001,
           output: {Path(args.work) / f'out_{args.mode}_{ctx.world_size}'}, progress_bar: 'off'}}
""")
        tr = Trainer(load_train_config(cfg_path), ctx, quiet=True)
        acc = torch.zeros(16, dtype=torch.float64)
        atoms = torch.zeros(1, dtype=torch.float64)
        epoch, timed, t0, tw, total = 0, 0, None, None, None
        done = 0
        while total is None or done < total:
            for structures in tr.stream.epoch(epoch):
                if done == 1:
                    tw = time.perf_counter()     # the first step's set-up is not a step
                if done == args.warmup:
                    # the timed steps: --steps, or as many as fill --seconds at the warm-up's pace
                    # (the largest count over the ranks, so that every rank runs the same steps)
                    n = args.steps or max(20, int(args.seconds * (args.warmup - 1) / (time.perf_counter() - tw)))
                    n_t = torch.tensor([float(n)], dtype=torch.float64)
                    ctx.all_reduce_max(n_t)
                    # independent copies run on the clock alone (below)
                    total = args.warmup + int(n_t.item()) if not args.sync else 1 << 62
                    ctx.barrier()
                    if args.sync:
                        start_together(Path(args.sync), args.copies)
                    t0 = time.perf_counter()
                    wall0 = time.time()
                tr.train_step(structures, acc)
                if done >= args.warmup:
                    # the stream yields assembled batches (fixed batches) or prepared structures
                    atoms += structures.n_atoms if hasattr(structures, "n_atoms") else \
                        sum(len(getattr(s, "numbers", getattr(s, "species", ()))) for s in structures)
                    timed += 1
                done += 1
                if total is not None and done >= total:
                    break
                if args.sync and t0 is not None and time.perf_counter() - t0 >= args.seconds:
                    # independent copies stop on the clock, so that their windows end together too
                    total = done
                    break
            epoch += 1
        ctx.barrier()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        ctx.all_reduce_max(dt)
        ctx.all_reduce_sum(atoms)
        if ctx.rank == 0:
            print("SCALING " + json.dumps({"mode": args.mode, "ranks": ctx.world_size, "steps": timed,
                                           "atoms": float(atoms), "seconds": float(dt),
                                           "window": [wall0, time.time()],
                                           "backend": tr.model.plan().descriptor,
                                           "timers": {k: round(v, 4) for k, v in tr.timers.items()}}), flush=True)
        shutdown()

    run_guarded(main)
    return 0


def run_case(mode, ranks, args, data, work) -> dict:
    mpirun = Path(sys.executable).parent / "mpirun"
    cmd = [str(mpirun) if mpirun.exists() else "mpirun", "-n", str(ranks), "--oversubscribe", "--bind-to",
           "core" if args.bind == "core" else "none"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += ["-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH", sys.executable, __file__, "--worker",
            "--mode", mode, "--data", str(data), "--work", str(work), "--steps", str(args.steps),
            "--seconds", str(args.seconds), "--warmup", str(args.warmup), "--batch-atoms", str(args.batch_atoms), "--backend", args.backend]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.time_limit)
    LAUNCHES.append((f"{mode}/{ranks} rank(s)", res.returncode))
    if res.returncode != 0:
        # every launch must exit 0 (a run that trained and then aborted at exit is a failure too):
        # reported and counted, the other cases still run
        print(f"  FAILED: {mode}/{ranks} exited {res.returncode}:\n{res.stdout[-1000:]}\n{res.stderr[-2000:]}",
              flush=True)
        return None
    line = next(l for l in res.stdout.splitlines() if l.startswith("SCALING "))
    return json.loads(line[8:])


def run_independent(mode, copies, args, data, work) -> float:
    """Aggregate atoms/s of ``copies`` single-process runs at the same time (no communication):
    what the machine's cores give R ranks' worth of compute; MPI throughput / this = the share
    lost to communication and synchronisation rather than to core contention."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in [k for k in env if k.startswith(("OMPI_", "PMI", "PMIX_", "SLURM_"))]:
        del env[k]
    procs = []
    sync = Path(tempfile.mkdtemp(prefix="sync_", dir=work))
    for c in range(copies):
        w = Path(work) / f"indep_{mode}_{c}"
        w.mkdir(exist_ok=True)
        # --bind core: copy c on core c, as mpirun --bind-to core places rank c
        pin = ["taskset", "-c", str(c % (os.cpu_count() or 1))] if args.bind == "core" else []
        procs.append(subprocess.Popen(
            pin + [sys.executable, __file__, "--worker", "--mode", mode, "--data", str(data), "--work", str(w),
             "--steps", str(args.steps), "--seconds", str(args.seconds), "--warmup", str(args.warmup),
             "--batch-atoms", str(args.batch_atoms), "--backend", args.backend, "--sync", str(sync),
             "--copies", str(copies)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    total = 0.0
    windows = []
    for p in procs:
        out, err = p.communicate(timeout=args.time_limit)
        LAUNCHES.append((f"{mode}/independent copy", p.returncode))
        if p.returncode != 0:
            print(f"  FAILED: independent {mode} run exited {p.returncode}:\n{err[-2000:]}", flush=True)
            return None
        res = json.loads(next(l for l in out.splitlines() if l.startswith("SCALING "))[8:])
        total += res["atoms"] / res["seconds"]
        windows.append(res["window"])
    # the share of the copies' windows that they ran side by side (1: fully overlapping)
    span = max(w[1] for w in windows) - min(w[0] for w in windows)
    OVERLAPS.append((min(w[1] for w in windows) - max(w[0] for w in windows)) / span if span > 0 else 1.0)
    return total


LAUNCHES: list = []     # (case, exit status) of every process started
OVERLAPS: list = []     # overlap of the independent copies' timed windows, per launch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--modes", nargs="+", default=["energy", "force"], choices=["energy", "force"])
    ap.add_argument("--steps", type=int, default=0,
                    help="timed steps of the R-rank runs (default 0: as many as fill --seconds at the "
                         "warm-up's pace); the independent copies always run for --seconds")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of the timed window when --steps is 0")
    ap.add_argument("--warmup", type=int, default=10, help="warm-up steps (at least 2: their pace sets the steps)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the fastest is reported")
    ap.add_argument("--batch-atoms", type=int, default=2000,
                    help="atoms per rank and step (default: the trainer's default training.batch_atoms)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    ap.add_argument("--structures", type=int, default=192, help="structures of 32 atoms in the data set")
    ap.add_argument("--backend", default="auto", choices=["auto", "reference", "fused"])
    ap.add_argument("--bind", default="none", choices=["none", "core"],
                    help="core: ranks bound to cores (mpirun --bind-to core), independent copies pinned "
                         "the same way (taskset)")
    ap.add_argument("--time-limit", type=float, default=900, help="seconds per case")
    ap.add_argument("--no-independent", action="store_true",
                    help="skip the baseline of R concurrent single-process runs (core contention check)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--keep", help="work in this folder (kept) instead of a temporary one")
    # worker mode (started by mpirun)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--sync", help=argparse.SUPPRESS)
    ap.add_argument("--copies", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.warmup = max(2, args.warmup)
    if args.worker:
        return worker(args)

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="distmlip-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "emt_scaling.h5"
    if not data.exists():
        t0 = time.time()
        make_data(data, args.structures)
        print(f"data set: {args.structures} structures x 32 atoms written in {time.time() - t0:.1f} s", flush=True)
    rows = []
    for mode in args.modes:
        # the cases interleaved (1 rank, R ranks, R independent copies, then again): a change of
        # the machine's load during the run touches every case alike; best of --repeat per case,
        # since other users' load only ever slows a run
        runs = {r: [] for r in args.ranks}
        indep = {r: [] for r in args.ranks}
        for _ in range(args.repeat):
            for r in args.ranks:
                res = run_case(mode, r, args, data, work)
                if res is not None:
                    runs[r].append(res)
                if r > 1 and not args.no_independent:
                    v = run_independent(mode, r, args, data, work)
                    if v is not None:
                        indep[r].append(v)
        base = None
        for r in args.ranks:
            if not runs[r]:
                continue
            res = max(runs[r], key=lambda x: x["atoms"] / x["seconds"])
            thr = res["atoms"] / res["seconds"]
            if base is None:
                base = thr / r
            res.update(atoms_per_s=thr, efficiency=thr / (r * base), step_ms=1e3 * res["seconds"] / res["steps"])
            res["independent_atoms_per_s"] = max(indep[r]) if indep[r] else None
            # the repeats' own ratios, each of an R-rank run and the independent copies launched
            # right after it: the machine's drift between repeats cancels in each pair
            pairs = [x["atoms"] / x["seconds"] / v for x, v in zip(runs[r], indep[r]) if v]
            res["paired_ratios"] = pairs
            rows.append(res)
            print(f"  {mode:6s} {r} rank(s): {thr:10.1f} atoms/s", flush=True)
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    print()
    print(f"weak scaling, best of {args.repeat} runs per case, {args.batch_atoms} atoms per rank and step, OMP_NUM_THREADS={args.threads}, "
          f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} core(s), "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| mode   | ranks | backend   | steps | atoms/step | ms/step | atoms/s    | efficiency "
          "| R independent runs, atoms/s | MPI / independent |")
    print("|--------|-------|-----------|-------|------------|---------|------------|------------"
          "|-----------------------------|-------------------|")
    paired = []
    for r in rows:
        ind = r.get("independent_atoms_per_s")
        ind_s = f"{ind:27.1f}" if ind else f"{'-':>27s}"
        rel = f"{100 * r['atoms_per_s'] / ind:16.1f}%" if ind else f"{'-':>17s}"
        if r.get("paired_ratios"):
            import statistics

            paired.append(f"{r['mode']} {r['ranks']} ranks: median {100 * statistics.median(r['paired_ratios']):.1f} % "
                          f"({', '.join(f'{100 * x:.0f}' for x in r['paired_ratios'])})")
        print(f"| {r['mode']:6s} | {r['ranks']:5d} | {r['backend']:9s} | {r['steps']:5d} | "
              f"{r['atoms'] / r['steps']:10.1f} | {r['step_ms']:7.1f} | {r['atoms_per_s']:10.1f} | "
              f"{100 * r['efficiency']:9.1f}% | {ind_s} | {rel} |")
    print("efficiency = atoms/s(R) / (R x atoms/s(1)); 'R independent runs' = R single-process copies at "
          "once\n(no communication): if they are slow too, the cores, not the all-reduce, are the limit.")
    if paired:
        print("MPI / independent per repeat (each R-rank run against the copies launched right after it): "
              + "; ".join(paired))
    if OVERLAPS:
        print(f"independent copies' timed windows overlapped by {100 * min(OVERLAPS):.1f}-{100 * max(OVERLAPS):.1f} %")
    bad = [(c, rc) for c, rc in LAUNCHES if rc != 0]
    print(f"launches: {len(LAUNCHES)}, exit 0: {len(LAUNCHES) - len(bad)}"
          + (f"; FAILED: {', '.join(f'{c} ({rc})' for c, rc in bad)}" if bad else " (all)"))
    print("target: R ranks >= 85 % of the R independent runs' atoms/s, every launch exits 0")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "launches": LAUNCHES}, indent=2))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
