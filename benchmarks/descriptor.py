"""Benchmark of the aenet Chebyshev descriptor: pure-PyTorch reference versus fused C++ kernels.

Side by side, in one run, on the same structures and cutoffs (radial/angular orders 12/4,
the distmlip model: one 10-10 tanh network per element, float64):

  * atoms/s of the forward descriptor, of forward + forces (-dE/dR), and of a full force-training
    step (forces with create_graph, loss (1-a) L_E + a L_F, backward to the weights, Adam step,
    fused Adam where torch has it, as the trainer uses);
  * the same for an energy-only training step (descriptor computed inside the step, no cache);
  * peak memory of the energy-only and force-training steps;
  * for the periodic structures (fused kernels), forces + stress (``BPNN.energy_forces_stress``)
    and the force+stress training step (loss (1-a-b) L_E + a L_F + b L_S, b = 0.1, the trainer's
    ``force_stress_loss_and_gradients``), its time and peak memory beside the force step's.

Each measurement runs on one training batch of copies of a structure (about 250 atoms: EC dimer
x12, Li slab + EC x6, bulk x1; --copies N overrides), with small independent displacements.
Structures: the EC dimer (first structure of $DISTMLIP_SHARED_DATA/ec_dimer/train if present, else
a generated pair of ethylene-carbonate molecules), a 46-atom Li slab with an EC molecule (bcc
Li(100) 3x3x4 slab + EC, periodic in x and y), and a dense 256-atom bulk (fcc 4x4x4, a = 3.6 A,
random Li/C/H/O decoration, 0.05 A noise).  Cutoffs (radial/angular): 6.5/4.0, 8.5/6.0,
10.5/8.0 A.

Timing: the minimum over repetitions (the machine may be shared: the minimum is the least
disturbed run) of the main thread's CPU time when running with one thread (default: the CPU time
does not count the time the process is descheduled on a loaded machine), of the wall clock with
--threads N > 1.  Memory: one child
process per structure and cutoff, MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB so that freed tensors go
back to the system; before each step the kernel's peak-RSS counter is reset
(/proc/self/clear_refs = 5) and the step's peak is read from VmHWM in /proc/self/status.  Reported:
the process peak RSS during the step (everything a training process holds: Python, torch, model,
batch and neighbour list, plus the step) and the step's increment over the RSS just before it.
tracemalloc is not used (it does not see torch's allocations).

The force-training step calls ``loss.backward(inputs=parameters)`` (the gradient with respect to
the positions is not needed for training; with the fused kernels this also skips the
position-Hessian term, see distmlip/descriptors/fused.py).

--batch-atoms N sets the batch to about N atoms instead (2000: the trainer's default
training.batch_atoms); --structures picks a subset.

Usage: python benchmarks/descriptor.py [--quick] [--threads N] [--budget SECONDS] [--batch-atoms N]
       [--structures ec_dimer,li_slab_ec,bulk256] [--no-memory] [--no-reference] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SPECIES = ["Li", "C", "H", "O"]
CUTOFFS = [(6.5, 4.0), (8.5, 6.0), (10.5, 8.0)]
N_RADIAL, N_ANGULAR = 12, 4
ALPHA = 0.5
BETA = 0.1


# ------------------------------------------------------------------------------------------
# structures
# ------------------------------------------------------------------------------------------

def _ec_molecule():
    """Ethylene carbonate (C3H4O3), planar approximation of the ring, bond lengths ~1.2-1.5 A."""
    from ase import Atoms

    pos = [
        [0.000, 0.000, 0.0],     # C carbonyl
        [0.000, 1.190, 0.0],     # O carbonyl
        [1.100, -0.700, 0.0],    # O ring
        [-1.100, -0.700, 0.0],   # O ring
        [0.765, -2.100, 0.0],    # C H2
        [-0.765, -2.100, 0.0],   # C H2
        [1.265, -2.550, 0.85],   # H
        [1.265, -2.550, -0.85],  # H
        [-1.265, -2.550, 0.85],  # H
        [-1.265, -2.550, -0.85],  # H
    ]
    return Atoms("COOOCCHHHH", positions=pos)


def ec_dimer():
    from ase.io import read

    shared = Path(os.environ.get("DISTMLIP_SHARED_DATA", REPO.parent / "shared" / "data")) / "ec_dimer" / "train"
    files = sorted(shared.glob("*.xsf")) if shared.is_dir() else []
    if files:
        at = read(files[0], format="xsf")
        return at, f"EC dimer ({files[0].name}, {len(at)} atoms)"
    a = _ec_molecule()
    b = _ec_molecule()
    b.rotate(70, "z")
    b.rotate(40, "x")
    b.translate([3.6, 1.2, 0.8])
    m = a + b
    m.pbc = False
    return m, f"EC dimer (generated, {len(m)} atoms)"


def li_slab_ec():
    from ase.build import bcc100

    slab = bcc100("Li", size=(3, 3, 4), vacuum=8.0, a=3.51)
    ec = _ec_molecule()
    ec.rotate(90, "x")
    top = slab.positions[:, 2].max()
    centre = slab.cell[0] / 2 + slab.cell[1] / 2
    ec.translate([centre[0], centre[1], top + 2.6 - ec.positions[:, 2].min()])
    s = slab + ec
    s.pbc = [True, True, False]
    return s, f"Li(100) slab + EC ({len(s)} atoms)"


def dense_bulk():
    from ase.build import bulk

    at = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((4, 4, 4))
    rng = np.random.default_rng(0)
    at.numbers = rng.choice([3, 6, 1, 8], len(at))
    at.positions += rng.normal(0, 0.05, at.positions.shape)
    return at, f"dense bulk ({len(at)} atoms, fcc a=3.6)"


STRUCTURES = {"ec_dimer": ec_dimer, "li_slab_ec": li_slab_ec, "bulk256": dense_bulk}
# copies of each structure in one training batch (about 250 atoms per batch, as in training)
COPIES = {"ec_dimer": 12, "li_slab_ec": 6, "bulk256": 1}


# ------------------------------------------------------------------------------------------
# model and steps
# ------------------------------------------------------------------------------------------

class Setup:
    """One batch and the distmlip model (BPNN, one 10-10 tanh network per element, float64) with
    the given descriptor backend, on ``device`` (benchmarks/gpu_throughput.py uses 'cuda'); the
    steps are those of distmlip.training.trainer."""

    def __init__(self, name, rc_r, rc_a, backend, copies=1, device="cpu"):
        import dataclasses

        from distmlip.descriptors.batch import collate
        from distmlip.models.bpnn import BPNN
        from distmlip.training.flat import FlatParameters
        from distmlip.training.trainer import fused_adam_kwargs

        atoms, self.label = STRUCTURES[name]()
        rng = np.random.default_rng(3)
        structs = []
        for _ in range(copies):        # copies with small independent displacements
            a = atoms.copy()
            a.positions += rng.normal(0, 0.02, a.positions.shape)
            structs.append(a)
        self.batch = collate(structs, SPECIES, cutoff=max(rc_r, rc_a), dtype=torch.float64)
        # targets: energies 0.1 eV, random forces; unit weights, forces on every structure, so
        # that the trainer's loss (distmlip.training.losses.energy_force_loss) is
        # (1 - a) mean(((E - E_ref) / n)^2) + a mean((F - F_ref)^2)
        g = torch.Generator().manual_seed(1)
        self.batch = dataclasses.replace(
            self.batch, energy=torch.full((copies,), 0.1, dtype=torch.float64),
            forces=torch.randn(self.batch.n_atoms, 3, dtype=torch.float64, generator=g),
            weight=torch.ones(copies, dtype=torch.float64), has_forces=torch.ones(copies, dtype=torch.bool),
            stress=0.01 * torch.randn(copies, 3, 3, dtype=torch.float64, generator=g),
            has_stress=self.batch.pbc.any(1))
        self.batch = self.batch.to(device)
        # separate batch objects for the energy step (positions without gradient) and the
        # force steps (positions a leaf requiring gradient, as the trainer sets them)
        self.ebatch = dataclasses.replace(self.batch, positions=self.batch.positions.detach().clone())
        self.fbatch = dataclasses.replace(self.batch,
                                          positions=self.batch.positions.detach().clone().requires_grad_())
        self.n_structures = copies
        torch.manual_seed(0)
        desc = {"rc_radial": rc_r, "n_radial": N_RADIAL, "rc_angular": rc_a, "n_angular": N_ANGULAR,
                "backend": backend}
        self.model = BPNN(SPECIES, desc, hidden=[10, 10], activation="tanh", dtype="float64").to(device)
        self.desc = self.model.descriptor
        # the optimiser as the trainer builds it: on the flat tensor whose views the parameters are
        self.flat = FlatParameters(self.model)
        params = self.flat.tensors
        self.opt = torch.optim.Adam(params, lr=1e-4, **fused_adam_kwargs(params))
        self.params = self.flat.grad_inputs
        self.n_atoms = self.batch.n_atoms
        self.counts = torch.tensor([float(copies), 3.0 * self.n_atoms], dtype=torch.float64, device=device)
        self.periodic = bool(self.batch.has_stress.all())
        self.scounts = torch.tensor([float(copies), 3.0 * self.n_atoms, 9.0 * copies], dtype=torch.float64,
                                    device=device)
        self.mask = torch.ones(self.n_atoms, dtype=torch.bool, device=device)

    def forward(self):
        with torch.no_grad():
            return self.model.ann.descriptors(self.ebatch, self.model.plan())

    def forces(self):
        return self.model.energy_and_forces(self.fbatch)[1]

    def forces_stress(self):
        return self.model.energy_forces_stress(self.fbatch)[2]

    def stress_step(self):
        from distmlip.training.flat import optimizer_step
        from distmlip.training.force_step import force_stress_loss_and_gradients

        self.flat.zero_grad()
        force_stress_loss_and_gradients(self.model, self.flat, self.fbatch, self.scounts, per_atom=True,
                                        alpha=ALPHA, mask=self.mask, beta=BETA, smask=self.fbatch.has_stress)
        self.flat.sync()
        optimizer_step(self.opt)

    def energy_step(self):
        from distmlip.training.flat import optimizer_step
        from distmlip.training.losses import energy_force_loss

        self.flat.zero_grad()
        E = self.model(self.ebatch)
        loss = energy_force_loss(E, self.ebatch, self.counts, per_atom=True,
                                 compiled=self.model.plan().loss == "compiled")
        loss.backward(inputs=self.params)
        self.flat.sync()
        optimizer_step(self.opt)

    def force_step(self):
        from distmlip.training.flat import optimizer_step
        from distmlip.training.force_step import force_loss_and_gradients

        self.flat.zero_grad()
        # as Trainer.train_step: on the CPU with the fused kernels, three compiled operators and
        # no autograd engine; with the reference descriptor, forces with create_graph and backward
        force_loss_and_gradients(self.model, self.flat, self.fbatch, self.counts, per_atom=True, alpha=ALPHA,
                                 mask=self.mask)
        self.flat.sync()
        optimizer_step(self.opt)


CLOCK = {"fn": time.perf_counter, "name": "wall clock"}


def time_it(fn, budget, max_reps=500, min_reps=3):
    """Minimum over repetitions of CLOCK (thread CPU time with one thread: insensitive to the
    process being descheduled on a shared machine; wall clock with several threads).  As the
    trainer does before its loop (Trainer.fit), the objects made during set-up are frozen out of
    the cyclic garbage collector first."""
    return time_alternating([fn], budget, max_reps, min_reps)[0]


def time_alternating(fns, budget, max_reps=500, min_reps=3, run=5):
    """Minimum of CLOCK per function over repetitions taken in alternating runs (``run`` calls
    of f, then of g, then of f, ...) within one window of ``budget`` seconds per function: the
    ratio of two steps then compares times taken side by side, which a slow spell of the shared
    machine (another tenant's load, lasting longer than one function's own window) cannot bias;
    runs rather than single calls, so that the minimum is taken over calls whose caches are
    warm as in a training loop, not cooled by the other step."""
    import gc

    for fn in fns:
        fn()  # warm-up
    gc.collect()
    gc.freeze()
    clock = CLOCK["fn"]
    best, reps = [float("inf")] * len(fns), 0
    t_end = time.perf_counter() + budget * len(fns)
    while reps < min_reps or (time.perf_counter() < t_end and reps < max_reps):
        for k, fn in enumerate(fns):
            for _ in range(run if len(fns) > 1 else 1):
                t0 = clock()
                fn()
                best[k] = min(best[k], clock() - t0)
        reps += run if len(fns) > 1 else 1
    return best


# ------------------------------------------------------------------------------------------
# memory (child process)
# ------------------------------------------------------------------------------------------

def _status_kb(key):
    m = re.search(rf"{key}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
    return int(m.group(1))


def _step_peak(fn):
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    return peak / 1024.0, (peak - base) / 1024.0


def memory_child(name, rc_r, rc_a, backends, copies):
    """Runs in a fresh process: peak RSS of one energy and one force step per backend."""
    out = {}
    # warm up every code path on a tiny structure (lazy library initialisation, thread pools)
    for backend in backends:
        tiny = Setup("ec_dimer", 3.0, 2.5, backend)
        tiny.energy_step()
        tiny.force_step()
    for backend in backends:            # fused first: its numbers are small, measure them clean
        s = Setup(name, rc_r, rc_a, backend, copies)
        s.energy_step()                 # allocate optimizer state and .grad outside the measurement
        e_peak, e_inc = _step_peak(s.energy_step)
        f_peak, f_inc = _step_peak(s.force_step)
        out[backend] = {"energy_peak_mb": e_peak, "energy_inc_mb": e_inc,
                        "force_peak_mb": f_peak, "force_inc_mb": f_inc}
        if backend == "fused" and s.periodic:
            s.stress_step()
            s_peak, s_inc = _step_peak(s.stress_step)
            out[backend].update(stress_peak_mb=s_peak, stress_inc_mb=s_inc)
        del s
    return out


def run_memory_child(name, rc_r, rc_a, backends, threads, copies):
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--memory-child", f"{name},{rc_r},{rc_a},{'+'.join(backends)},{copies}",
           "--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"memory child failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="EC dimer and Li slab at 6.5/4.0 and 8.5/6.0 only, short timing budget")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per measurement")
    ap.add_argument("--copies", type=int, default=None,
                    help="copies of each structure per batch (default: about 250 atoms per batch)")
    ap.add_argument("--batch-atoms", type=int, default=None,
                    help="about this many atoms per batch (copies = atoms // structure size, at least 1; "
                         "2000 is the trainer's default training.batch_atoms)")
    ap.add_argument("--structures", default=None,
                    help=f"comma-separated subset of {','.join(STRUCTURES)}")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.threads == 1:
        CLOCK.update(fn=time.thread_time, name="CPU time of the (only) thread")

    if args.memory_child:
        name, rc_r, rc_a, backends, copies = args.memory_child.split(",")
        print(json.dumps(memory_child(name, float(rc_r), float(rc_a), backends.split("+"), int(copies))))
        return 0

    from distmlip.descriptors import fused  # noqa: F401  (fail early if the kernels are missing)

    budget = args.budget if args.budget is not None else (0.3 if args.quick else 1.0)
    names = ["ec_dimer", "li_slab_ec"] if args.quick else list(STRUCTURES)
    if args.structures:
        names = [n.strip() for n in args.structures.split(",") if n.strip()]
        unknown = [n for n in names if n not in STRUCTURES]
        if unknown:
            ap.error(f"--structures: unknown {', '.join(unknown)} (choose from {', '.join(STRUCTURES)})")

    def n_copies(name):
        if args.copies is not None:
            return args.copies
        if args.batch_atoms is not None:
            return max(1, args.batch_atoms // len(STRUCTURES[name]()[0]))
        return COPIES[name]

    cutoffs = CUTOFFS[:2] if args.quick else CUTOFFS
    backends = ["fused"] if args.no_reference else ["fused", "reference"]
    isa = {2: "AVX2+FMA", 0: "generic"}.get(int(torch.ops.distmlip.chebyshev_cpu_isa()), "?")
    print(f"# descriptor benchmark: orders {N_RADIAL}/{N_ANGULAR}, species {SPECIES}, BPNN 10-10 tanh per element, "
          f"float64, {args.threads} thread(s), CPU kernels {isa}, torch {torch.__version__}")
    print(f"# timing: {CLOCK['name']}, min over repetitions (<= {budget:.1f} s each; energy and force steps "
          "in turn); memory: child process, peak RSS (VmHWM after clear_refs) during one step, MB")
    for name in names:
        copies = n_copies(name)
        print(f"# {name}: {STRUCTURES[name]()[1]} x {copies} per batch")
    rows = []
    t_start = time.perf_counter()
    for name in names:
        for rc_r, rc_a in cutoffs:
            row = {"structure": name, "rc": f"{rc_r}/{rc_a}"}
            copies = n_copies(name)
            for backend in backends:
                s = Setup(name, rc_r, rc_a, backend, copies)
                row["label"] = s.label
                row["n_atoms"] = s.n_atoms
                row["pairs_per_atom"] = s.batch.n_pairs / s.n_atoms
                n = s.n_atoms
                row[f"{backend}_fwd"] = n / time_it(s.forward, budget)
                row[f"{backend}_forces"] = n / time_it(s.forces, budget)
                # the two steps whose ratio is a target: timed in turn, in one window
                t_e, t_f = time_alternating([s.energy_step, s.force_step], budget)
                row[f"{backend}_estep"] = n / t_e
                row[f"{backend}_fstep"] = n / t_f
                if backend == "fused" and s.periodic:
                    row["fused_fstress"] = n / time_it(s.forces_stress, budget)
                    t_f2, t_s = time_alternating([s.force_step, s.stress_step], budget)
                    row["fused_sstep_over_fstep"] = t_s / t_f2
                    row["fused_fstress_over_forces"] = row["fused_forces"] / row["fused_fstress"]
                del s
            if not args.no_memory:
                mem = run_memory_child(name, rc_r, rc_a, backends, args.threads, copies)
                for backend, d in mem.items():
                    for k, v in d.items():
                        row[f"{backend}_{k}"] = v
            rows.append(row)
            _print_row(row, backends, header=(len(rows) == 1))
    print(f"# total benchmark time {time.perf_counter() - t_start:.0f} s")
    _print_summary(rows, backends, not args.no_memory)
    _print_stress(rows, not args.no_memory)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def _fmt(x):
    if x is None:
        return "-"
    if x >= 1e5:
        return f"{x:.3g}"
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}"


def _print_row(row, backends, header):
    if header:
        print()
        print("atoms/s (higher is better); step ratios fused force-step / fused energy-step")
        cols = ["structure", "Rc", "atoms", "nbr/at"]
        for b in backends:
            tag = "F" if b == "fused" else "R"
            cols += [f"{tag}:fwd", f"{tag}:forces", f"{tag}:E-step", f"{tag}:F-step"]
        if "reference" in backends:
            cols += ["F/R fwd", "F/R forces", "F/R F-step"]
        cols += ["Fst t/Est t"]
        print(" | ".join(f"{c:>11}" for c in cols))
    vals = [row["structure"], row["rc"], str(row["n_atoms"]), f"{row['pairs_per_atom']:.0f}"]
    for b in backends:
        vals += [_fmt(row[f"{b}_fwd"]), _fmt(row[f"{b}_forces"]), _fmt(row[f"{b}_estep"]), _fmt(row[f"{b}_fstep"])]
    if "reference" in backends:
        vals += [f"{row['fused_fwd'] / row['reference_fwd']:.1f}x",
                 f"{row['fused_forces'] / row['reference_forces']:.1f}x",
                 f"{row['fused_fstep'] / row['reference_fstep']:.1f}x"]
    vals += [f"{row['fused_estep'] / row['fused_fstep']:.2f}"]
    print(" | ".join(f"{v:>11}" for v in vals), flush=True)


def _print_summary(rows, backends, with_memory):
    if not with_memory:
        return
    print()
    print("peak memory of one training step, MB: process peak RSS (step increment over the RSS before it)")
    cols = ["structure", "Rc"]
    for b in backends:
        tag = "F" if b == "fused" else "R"
        cols += [f"{tag}:E-step", f"{tag}:F-step"]
    cols += ["F: Fst/Est peak", "F: Fst/Est inc"]
    if "reference" in backends:
        cols += ["R/F F-step inc"]
    print(" | ".join(f"{c:>16}" for c in cols))
    for row in rows:
        vals = [row["structure"], row["rc"]]
        for b in backends:
            vals += [f"{row[f'{b}_energy_peak_mb']:.0f} (+{row[f'{b}_energy_inc_mb']:.1f})",
                     f"{row[f'{b}_force_peak_mb']:.0f} (+{row[f'{b}_force_inc_mb']:.1f})"]
        vals += [f"{row['fused_force_peak_mb'] / row['fused_energy_peak_mb']:.3f}",
                 f"{row['fused_force_inc_mb'] / max(row['fused_energy_inc_mb'], 0.1):.1f}"]
        if "reference" in backends:
            vals += [f"{row['reference_force_inc_mb'] / max(row['fused_force_inc_mb'], 0.1):.0f}x"]
        print(" | ".join(f"{v:>16}" for v in vals), flush=True)


def _print_stress(rows, with_memory):
    rows = [r for r in rows if "fused_sstep_over_fstep" in r]
    if not rows:
        return
    print()
    print("stress (fused, periodic structures): time of forces+stress / forces, of the force+stress training step "
          "/ the force step" + (", peak RSS of the force+stress step / the force step (increments, MB)"
                                if with_memory else ""))
    cols = ["structure", "Rc", "FS/F t", "FS-step/F-step t"] + (["FS/F peak", "inc FS | F"] if with_memory else [])
    print(" | ".join(f"{c:>16}" for c in cols))
    for r in rows:
        vals = [r["structure"], r["rc"], f"{r['fused_fstress_over_forces']:.2f}", f"{r['fused_sstep_over_fstep']:.2f}"]
        if with_memory and "fused_stress_peak_mb" in r:
            vals += [f"{r['fused_stress_peak_mb'] / r['fused_force_peak_mb']:.3f}",
                     f"{r['fused_stress_inc_mb']:.1f} | {r['fused_force_inc_mb']:.1f}"]
        print(" | ".join(f"{v:>16}" for v in vals), flush=True)


if __name__ == "__main__":
    sys.exit(main())
