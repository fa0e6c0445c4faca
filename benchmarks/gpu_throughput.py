"""Training-step throughput on the GPU, side by side with the CPU in the same run.

The structures, batches, model and steps of benchmarks/descriptor.py (its ``Setup``: EC dimer x12,
Li slab + EC x6, dense 256-atom bulk x1, about 250 atoms per batch; BPNN 10-10 tanh per element,
float64, fused descriptor kernels, radial/angular orders 12/4), at the cutoffs 6.5/4.0, 8.5/6.0
and 10.5/8.0, and once more with about 2000 atoms per batch (the trainer's default
training.batch_atoms):

  * atoms/s of the energy-training step and of the force-training step (forces with
    create_graph, loss, backward to the weights, Adam step; distmlip.training.force_step) on the
    CPU and on the GPU, each with the plan the trainer takes there (CPU: one-node compiled
    operators; GPU: fused CUDA descriptor, torch networks, closed-form forces, torch loss);
  * the GPU's peak memory allocated during one force step.

Timing: wall clock, minimum over repetitions taken in alternating runs of the two steps
(descriptor.time_alternating, ``--budget`` seconds per step); on the GPU every call ends with
torch.cuda.synchronize().  The CPU runs ``--threads`` threads (default 1: one rank's share of a
node under MPI).  ``--time-limit`` stops starting new rows (rows done are reported).

usage: python benchmarks/gpu_throughput.py [--budget S] [--threads N] [--time-limit S]
       [--structures ...] [--no-large] [--json out.json] [--md out.md]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import descriptor as bench  # noqa: E402  (puts the repository first on sys.path)
import torch  # noqa: E402


def _timed(fn, device):
    if device.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize(device)
    return run


def measure(name, rc_r, rc_a, copies, device, budget):
    s = bench.Setup(name, rc_r, rc_a, "fused", copies, device=device)
    e, f = _timed(s.energy_step, device), _timed(s.force_step, device)
    t_e, t_f = bench.time_alternating([e, f], budget)
    out = {"estep": s.n_atoms / t_e, "fstep": s.n_atoms / t_f, "plan": s.model.plan().describe(),
           "n_atoms": s.n_atoms, "pairs_per_atom": s.batch.n_pairs / s.n_atoms}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        f()
        out["fstep_peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    del s
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=0.3, help="seconds of timing per step and device")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--time-limit", type=float, default=150.0, help="start no new row after this many seconds")
    ap.add_argument("--structures", default=",".join(bench.STRUCTURES))
    ap.add_argument("--no-large", action="store_true", help="skip the rows with about 2000 atoms per batch")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gpu = torch.device(args.device)
    if gpu.type != "cuda" or not torch.cuda.is_available():
        print("gpu_throughput: no GPU: skipped")
        return 0
    bench.CLOCK.update(fn=time.perf_counter, name="wall clock")
    from distmlip._ext import has_kernel
    from distmlip.descriptors import fused  # noqa: F401

    if not has_kernel("chebyshev_forward", "cuda"):
        print("gpu_throughput: the extension has no CUDA kernels (build it against a CUDA torch)")
        return 1
    cpu = torch.device("cpu")
    names = [n.strip() for n in args.structures.split(",") if n.strip()]
    plans = []
    for big in ([False] if args.no_large else [False, True]):
        for name in names:
            for rc_r, rc_a in bench.CUTOFFS:
                natoms = len(bench.STRUCTURES[name]()[0])
                copies = max(1, 2000 // natoms) if big else bench.COPIES[name]
                plans.append((name, rc_r, rc_a, copies))
    header = (f"# GPU {torch.cuda.get_device_name(gpu)}, torch {torch.__version__} (CUDA {torch.version.cuda}); "
              f"CPU: {args.threads} thread(s); wall clock, min over repetitions (<= {args.budget} s per step)")
    print(header, flush=True)
    rows = []
    t_start = time.perf_counter()
    cols = ["structure", "Rc", "atoms", "nbr/at", "CPU E-step", "CPU F-step", "GPU E-step", "GPU F-step",
            "GPU/CPU E", "GPU/CPU F", "GPU F-step MB"]
    print(" | ".join(f"{c:>12}" for c in cols), flush=True)
    skipped = 0
    for name, rc_r, rc_a, copies in plans:
        if time.perf_counter() - t_start > args.time_limit:
            skipped += 1
            continue
        c = measure(name, rc_r, rc_a, copies, cpu, args.budget)
        g = measure(name, rc_r, rc_a, copies, gpu, args.budget)
        row = {"structure": name, "rc": f"{rc_r}/{rc_a}", "n_atoms": c["n_atoms"],
               "pairs_per_atom": c["pairs_per_atom"], "cpu_estep": c["estep"], "cpu_fstep": c["fstep"],
               "gpu_estep": g["estep"], "gpu_fstep": g["fstep"], "gpu_fstep_peak_mb": g["fstep_peak_mb"],
               "cpu_plan": c["plan"], "gpu_plan": g["plan"]}
        rows.append(row)
        vals = [name, row["rc"], str(row["n_atoms"]), f"{row['pairs_per_atom']:.0f}",
                *(bench._fmt(row[k]) for k in ("cpu_estep", "cpu_fstep", "gpu_estep", "gpu_fstep")),
                f"{row['gpu_estep'] / row['cpu_estep']:.1f}x", f"{row['gpu_fstep'] / row['cpu_fstep']:.1f}x",
                f"{row['gpu_fstep_peak_mb']:.1f}"]
        print(" | ".join(f"{v:>12}" for v in vals), flush=True)
    total = time.perf_counter() - t_start
    if rows:
        print(f"# plans: CPU {rows[0]['cpu_plan']}; GPU {rows[0]['gpu_plan']}")
    print(f"# {len(rows)} rows in {total:.0f} s" + (f"; {skipped} rows not run (--time-limit)" if skipped else ""))
    meta = {"gpu": torch.cuda.get_device_name(gpu), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpu_threads": args.threads, "budget_s": args.budget, "seconds": total, "rows_not_run": skipped}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.md:
        lines = [header.lstrip("# "), "", "atoms/s (higher is better)", "",
                 "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            lines.append("| " + " | ".join([r["structure"], r["rc"], str(r["n_atoms"]), f"{r['pairs_per_atom']:.0f}",
                                            *(bench._fmt(r[k]) for k in ("cpu_estep", "cpu_fstep", "gpu_estep",
                                                                          "gpu_fstep")),
                                            f"{r['gpu_estep'] / r['cpu_estep']:.1f}x",
                                            f"{r['gpu_fstep'] / r['cpu_fstep']:.1f}x",
                                            f"{r['gpu_fstep_peak_mb']:.1f}"]) + " |")
        if rows:
            lines += ["", f"plans: CPU {rows[0]['cpu_plan']}; GPU {rows[0]['gpu_plan']}"]
        Path(args.md).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
