"""Energy-only versus direct force training: memory and time per epoch against the cutoff and the
batch size (the shape of Fig. 7 of the distmlip paper), through the real training code path.

Data: a heterogeneous Li/EC-like data set generated here (default 240 structures): EC dimers
(20 atoms), Li(100) slabs with an EC molecule (46 atoms, periodic in x, y), single EC molecules
(10 atoms) and small bcc Li bulk cells (16 atoms), each rattled (0.05 A), labelled with an ASE
Lennard-Jones calculator (the labels only set the loss values, not the cost), written to an HDF5
data set.  The structure builders are those of benchmarks/descriptor.py.

Each point (cutoff, batch size, backend, mode) builds a ``distmlip.training.trainer.Trainer``
from a TrainConfig (orders 12/4, network 10-10 tanh, float64, AdamW, alpha 0.1, all structures
with force loss, no validation, ``batch_structures`` = the batch size) and calls
``Trainer.train_step`` exactly as ``Trainer.fit`` does (collate with the neighbour list,
descriptor, loss, backward to the weights, optimizer step).  Modes:

  * energy: energy-only training with the descriptor computed in every step (descriptor cache off);
  * force:  direct force training, loss (1 - alpha) L_E + alpha L_F;
  * energy-cached (fused only): energy training streaming descriptors from the featurize cache
    (``descriptor.cache: on``; the cache is built once per cutoff, not timed).

Memory: one child process per (cutoff, batch size, backend) point, as benchmarks/descriptor.py
does (MALLOC_MMAP_THRESHOLD_ = 64 KiB, kernel peak-RSS counter reset through
/proc/self/clear_refs before each step, peak read from VmHWM): the largest peak RSS over the first
few steps of an epoch (the same batches for every mode), and the step's increment over the RSS
before it.  Time per epoch (after the memory phase, with the mmap threshold raised back to
32 MiB by mallopt so that allocations are not timed as page faults): the sum of the main
thread's CPU time of every ``train_step`` of one epoch (one thread; the CPU time does not count descheduling on a shared machine).  When a mode
would exceed its time budget (the reference backend at large cutoffs), the remaining steps are
extrapolated by atoms from the measured ones and the row says how many steps were measured.  The
reference backend can be limited to the first cutoffs with --ref-cutoffs N (its force step grows
fastest with the cutoff); its epoch time is extrapolated past the budget like any other.

Phase breakdown (fused, batch size 32, every cutoff): on the first batch of the epoch, the time of
collate, of the descriptor kernels alone (forward, VJP, JVP), and of the energy and force steps
split into forward / gradient with create_graph / backward to the weights / optimizer.

Usage: python benchmarks/force_training.py [--quick] [--no-reference] [--png out.png] [--json out.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

_spec = importlib.util.spec_from_file_location("_bench_descriptor", Path(__file__).with_name("descriptor.py"))
bd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bd)

SPECIES = ["Li", "C", "H", "O"]
CUTOFFS = [(6.5, 4.0), (8.5, 6.0), (10.5, 8.0)]
BATCHES = [8, 32, 128]
B_RC = 32            # batch size of the cutoff sweep
RC_B = CUTOFFS[0]    # cutoff of the batch-size sweep
ALPHA = 0.1
MEM_STEPS = 3


# ------------------------------------------------------------------------------------------
# data set
# ------------------------------------------------------------------------------------------

def _li_bulk():
    from ase.build import bulk

    return bulk("Li", "bcc", a=3.51, cubic=True).repeat((2, 2, 2))


def make_dataset(path: Path, n: int, seed: int = 0) -> dict:
    from ase.calculators.lj import LennardJones

    from distmlip.data.h5store import write_dataset
    from distmlip.data.structure import Structure

    kinds = [("ec_dimer", bd.ec_dimer()[0], 0.4), ("li_slab_ec", bd.li_slab_ec()[0], 0.3),
             ("ec", bd._ec_molecule(), 0.15), ("li_bulk16", _li_bulk(), 0.15)]
    kinds[2][1].pbc = False
    rng = np.random.default_rng(seed)
    counts = {}
    structures = []
    calc = LennardJones(sigma=1.2, epsilon=0.02, rc=4.0, smooth=True)
    for k, (name, atoms, share) in enumerate(kinds):
        m = max(1, int(round(share * n))) if k < len(kinds) - 1 else max(1, n - len(structures))
        counts[name] = m
        for _ in range(m):
            a = atoms.copy()
            a.positions += rng.normal(0, 0.05, a.positions.shape)
            a.calc = calc
            e = float(a.get_potential_energy())
            f = np.asarray(a.get_forces(), dtype=np.float64)
            structures.append(Structure(numbers=a.numbers.copy(), positions=a.positions.copy(),
                                        cell=np.asarray(a.cell[:], dtype=np.float64), pbc=np.asarray(a.pbc),
                                        energy=e, forces=f, source=name, source_index=len(structures)))
    write_dataset(path, structures, species=SPECIES)
    return {"n_structures": len(structures), "n_atoms": int(sum(len(s.numbers) for s in structures)),
            "kinds": counts}


# ------------------------------------------------------------------------------------------
# child: one (cutoff, batch size, backend) point
# ------------------------------------------------------------------------------------------

def make_trainer(data, rc, B, backend, mode, out, cache=False):
    from distmlip.training.config import TrainConfig
    from distmlip.training.trainer import Trainer

    cfg = TrainConfig()
    cfg.data.train = [str(data)]
    cfg.data.fractions = [1.0, 0.0, 0.0]
    cfg.data.use_stored_split = False
    cfg.data.prefetch = False
    cfg.descriptor.rc_radial, cfg.descriptor.rc_angular = rc
    cfg.descriptor.n_radial, cfg.descriptor.n_angular = bd.N_RADIAL, bd.N_ANGULAR
    cfg.descriptor.backend = backend
    cfg.descriptor.cache = "on" if cache else "off"
    if cache:
        cfg.descriptor.cache_file = str(Path(out) / f"cache_{rc[0]}_{rc[1]}.desc.h5")
    cfg.model.species = list(SPECIES)
    cfg.training.mode = mode
    cfg.training.alpha = ALPHA
    cfg.training.batch_structures = int(B)
    cfg.training.batch_atoms = 1 << 30
    cfg.training.epochs = 1
    cfg.training.scheduler = "none"
    cfg.training.progress_bar = "off"
    cfg.training.output = str(Path(out) / f"run_{backend}_{mode}")
    cfg.training.device = "cpu"
    for part in (cfg.data, cfg.descriptor, cfg.training):
        part.validate()
    return Trainer(cfg, quiet=True)


def _acc():
    from distmlip.training.trainer import _M

    return torch.zeros(len(_M), dtype=torch.float64)


def run_mode(data, rc, B, backend, mode, out, budget):
    cache = mode == "energy-cached"
    tr = make_trainer(data, rc, B, backend, "energy" if cache else mode, out, cache=cache)
    acc = _acc()
    plan0 = list(tr.stream.epoch(0))
    tr.train_step(plan0[0], acc)                  # warm-up: optimizer state, lazy initialisation
    peak = inc = 0.0
    for structures in plan0[:MEM_STEPS]:          # memory: the same first batches in every mode
        p, i = bd._step_peak(lambda t=tr, s=structures: t.train_step(s, acc))
        peak, inc = max(peak, p), max(inc, i)
    # time per epoch (epoch 1 order), extrapolated by atoms past the budget.  The memory phase
    # needs the 64 KiB mmap threshold (freed tensors go back to the system); timed with it, every
    # tensor above 64 KiB would cost an mmap and fresh zeroed pages (the energy step of a 32-
    # structure batch measured 2.2 ms instead of 1.0), so it is lifted first.
    _lift_mmap_threshold()
    plan = list(tr.stream.epoch(1))
    atoms = [sum(s.natoms for s in st) for st in plan]
    t_sum, a_sum, done = 0.0, 0, 0
    t_end = time.perf_counter() + budget
    for structures, n in zip(plan, atoms):
        t0 = time.thread_time()
        tr.train_step(structures, acc)
        t_sum += time.thread_time() - t0
        a_sum += n
        done += 1
        if time.perf_counter() > t_end and done >= 2:
            break
    epoch_s = t_sum * sum(atoms) / a_sum
    res = {"peak_mb": peak, "inc_mb": inc, "epoch_s": epoch_s, "steps": len(plan), "steps_timed": done,
           "pairs_per_atom": None}
    b = tr.collate(plan0[0]) if not cache else None
    if b is not None:
        res["pairs_per_atom"] = b.n_pairs / b.n_atoms
    if mode == "force" and backend == "fused" and B == B_RC:
        res["breakdown"] = breakdown(tr, plan0[0])
    del tr
    return res


def _lift_mmap_threshold(nbytes: int = 32 << 20) -> None:
    """mallopt(M_MMAP_THRESHOLD, nbytes) through ctypes (glibc; silently nothing elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, int(nbytes))   # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        pass


def _tmin(fn, reps=5):
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best


def breakdown(tr, structures):
    """Times (s, min of 5) of the phases of one energy and one force step on one batch."""
    from distmlip.descriptors import fused
    from distmlip.training.flat import optimizer_step
    from distmlip.training.losses import local_counts

    model, opt = tr.model, tr.opt
    params = tr.flat.grad_inputs      # the flat tensor and its views (distmlip/training/flat.py)
    out = {}
    out["collate"] = _tmin(lambda: tr.collate(structures))
    b = tr.collate(structures)
    d = model.descriptor
    sel = tr._selected(b)
    counts = local_counts(b, sel, True)
    pos = b.positions.detach()

    # descriptor kernels alone
    order = torch.sort(b.pair_i, stable=True).indices
    pj, sh = b.pair_j[order].contiguous(), b.pair_shift[order].contiguous()
    ptr = fused.pair_pointers(b.pair_i[order], b.n_atoms)
    p = (d.rc_radial, d.n_radial, d.rc_angular, d.n_angular)
    from distmlip.descriptors.chebyshev import typespin
    ts = fused._typespin_tensor(typespin(len(SPECIES)), "cpu")
    G = torch.ops.distmlip.chebyshev_forward(pos, b.species, ptr, pj, sh, ts, *p)
    gG = torch.randn_like(G)
    v = torch.randn_like(pos)
    out["kernel_fwd"] = _tmin(lambda: torch.ops.distmlip.chebyshev_forward(pos, b.species, ptr, pj, sh, ts, *p))
    out["kernel_vjp"] = _tmin(lambda: torch.ops.distmlip.chebyshev_backward(gG, pos, b.species, ptr, pj, sh, ts, *p))
    out["kernel_jvp"] = _tmin(lambda: torch.ops.distmlip.chebyshev_double_backward(
        gG, v, pos, b.species, ptr, pj, sh, ts, *p, True, False))

    # energy step phases (descriptor computed in the step)
    tr.force_mode = False
    out["E:forward"] = _tmin(lambda: tr.batch_loss(b, counts, None, sel))

    def e_all():
        tr.flat.zero_grad()
        tr.batch_loss(b, counts, None, sel).backward(inputs=params)

    out["E:forward+backward"] = _tmin(e_all)
    tr.force_mode = True

    def f_energy():
        b.positions = pos.clone().requires_grad_()
        return model(b)

    def f_forces():
        b.positions = pos.clone()
        return tr.batch_loss(b, counts, None, sel)

    def f_all():
        tr.flat.zero_grad()
        b.positions = pos.clone()
        with tr.flat.routing():
            tr.batch_loss(b, counts, None, sel).backward(inputs=params)

    out["F:energy forward"] = _tmin(f_energy)
    out["F:forward+forces (create_graph)"] = _tmin(f_forces)
    out["F:forward+forces+backward"] = _tmin(f_all)
    out["optimizer step"] = _tmin(lambda: optimizer_step(opt))
    b.positions = pos
    return out


def child_main(spec):
    data, rc_r, rc_a, B, backend, modes, out, budget = spec.split(",")
    rc, B, budget = (float(rc_r), float(rc_a)), int(B), float(budget)
    torch.set_num_threads(1)
    res = {}
    # warm-up of the lazy initialisations on a tiny problem is done by each mode's first step
    for mode in modes.split("+"):
        res[mode] = run_mode(data, rc, B, backend, mode, out, budget)
    print(json.dumps(res))
    return 0


def run_child(data, rc, B, backend, modes, out, budget):
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    spec = f"{data},{rc[0]},{rc[1]},{B},{backend},{'+'.join(modes)},{out},{budget}"
    res = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True,
                         env=env, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="80 structures, two cutoffs, batch sizes 8 and 32, short budgets (< 1 min)")
    ap.add_argument("--structures", type=int, default=None, help="data set size (default 240; quick 80)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timed steps per mode and point before extrapolating (default 12; quick 2)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--ref-cutoffs", type=int, default=3,
                    help="run the reference backend at the first N cutoffs only (default 3: all)")
    ap.add_argument("--no-cache-mode", action="store_true", help="skip the energy-cached mode")
    ap.add_argument("--png", default=str(REPO / "docs" / "figures" / "force_training.png"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args.child)

    from distmlip.descriptors import fused  # noqa: F401  (fail early if the kernels are missing)

    n_struct = args.structures or (80 if args.quick else 240)
    budget = args.budget if args.budget is not None else (2.0 if args.quick else 12.0)
    cutoffs = CUTOFFS[:2] if args.quick else CUTOFFS
    batches = BATCHES[:2] if args.quick else BATCHES
    ref_cut = [] if args.no_reference else cutoffs[:max(0, args.ref_cutoffs)]
    if args.quick:
        ref_cut = ref_cut[:1]
    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="distmlip_ftbench_")
    data = Path(tmp.name) / "li_ec.h5"
    info = make_dataset(data, n_struct)
    print(f"# force-training benchmark (Fig. 7 shape): orders {bd.N_RADIAL}/{bd.N_ANGULAR}, species {SPECIES}, "
          f"network 10-10 tanh float64, AdamW, alpha {ALPHA}, 1 thread, torch {torch.__version__}")
    print(f"# data: {info['n_structures']} structures, {info['n_atoms']} atoms "
          f"({', '.join(f'{k} x{v}' for k, v in info['kinds'].items())}), rattled 0.05 A, LJ labels")
    print(f"# time/epoch: sum of the main thread's CPU time of Trainer.train_step over one epoch "
          f"(extrapolated by atoms after {budget:.0f} s of steps: 'timed' column); memory: child process, "
          f"max over the first {MEM_STEPS} steps of the peak RSS (VmHWM after clear_refs) during a step, MB "
          f"(+ increment over the RSS before the step)")
    print(f"# reference backend at Rc {', '.join(f'{a}/{b}' for a, b in ref_cut) or 'none'} only")
    points = [(rc, B_RC) for rc in cutoffs] + [(RC_B, B) for B in batches if B != B_RC]
    rows, brk = [], {}
    hdr = ["Rc", "B", "backend", "mode", "nbr/at", "steps", "timed", "epoch s", "peak MB", "step +MB"]
    print()
    print(" | ".join(f"{h:>13}" for h in hdr), flush=True)
    for rc, B in points:
        for backend in ["fused", "reference"]:
            if backend == "reference" and rc not in ref_cut:
                continue
            modes = ["energy", "force"]
            if backend == "fused" and not args.no_cache_mode:
                modes.append("energy-cached")
            res = run_child(data, rc, B, backend, modes, tmp.name, budget)
            for mode, r in res.items():
                row = {"rc": f"{rc[0]}/{rc[1]}", "B": B, "backend": backend, "mode": mode, **r}
                rows.append(row)
                if "breakdown" in r:
                    brk[row["rc"]] = r.pop("breakdown")
                ppa = f"{r['pairs_per_atom']:.0f}" if r.get("pairs_per_atom") else "-"
                vals = [row["rc"], str(B), backend, mode, ppa, str(r["steps"]), str(r["steps_timed"]),
                        f"{r['epoch_s']:.2f}", f"{r['peak_mb']:.0f}", f"{r['inc_mb']:.1f}"]
                print(" | ".join(f"{v:>13}" for v in vals), flush=True)
    _summary(rows)
    _print_breakdown(brk)
    print(f"# total benchmark time {time.perf_counter() - t_start:.0f} s")
    if args.png:
        _plot(rows, cutoffs, batches, Path(args.png))
        print(f"# figure: {args.png}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "breakdown": brk}, indent=1))
    tmp.cleanup()
    return 0


def _get(rows, rc, B, backend, mode):
    for r in rows:
        if r["rc"] == rc and r["B"] == B and r["backend"] == backend and r["mode"] == mode:
            return r
    return None


def _summary(rows):
    print()
    print("ratios per point: fused force/energy epoch time and peak RSS; reference/fused force epoch time and "
          "step memory increment")
    cols = ["Rc", "B", "F: t force/en", "F: mem force/en", "F: t en/cached", "R/F t force", "R/F +MB force"]
    print(" | ".join(f"{c:>15}" for c in cols))
    seen = []
    for r in rows:
        key = (r["rc"], r["B"])
        if key in seen:
            continue
        seen.append(key)
        fe, ff = _get(rows, *key, "fused", "energy"), _get(rows, *key, "fused", "force")
        fc = _get(rows, *key, "fused", "energy-cached")
        rf = _get(rows, *key, "reference", "force")
        vals = [key[0], str(key[1]), f"{ff['epoch_s'] / fe['epoch_s']:.2f}", f"{ff['peak_mb'] / fe['peak_mb']:.3f}",
                f"{fe['epoch_s'] / fc['epoch_s']:.1f}" if fc else "-",
                f"{rf['epoch_s'] / ff['epoch_s']:.1f}x" if rf else "-",
                f"{rf['inc_mb'] / max(ff['inc_mb'], 0.1):.0f}x" if rf else "-"]
        print(" | ".join(f"{v:>15}" for v in vals), flush=True)


def _print_breakdown(brk):
    if not brk:
        return
    print()
    print(f"phase breakdown, fused, first batch of the epoch at B={B_RC}: ms (min of 5, CPU time); "
          "F-step/E-step = (forward+forces+backward)/(forward+backward), both without the optimizer")
    keys = list(next(iter(brk.values())).keys())
    print(f"{'phase':>36} | " + " | ".join(f"{rc:>10}" for rc in brk))
    for k in keys:
        print(f"{k:>36} | " + " | ".join(f"{1e3 * brk[rc][k]:>10.2f}" for rc in brk))
    print(f"{'F-step/E-step':>36} | " + " | ".join(
        f"{brk[rc]['F:forward+forces+backward'] / brk[rc]['E:forward+backward']:>10.2f}" for rc in brk))
    print(f"{'(fwd+VJP+JVP kernels)/fwd kernel':>36} | " + " | ".join(
        f"{(brk[rc]['kernel_fwd'] + brk[rc]['kernel_vjp'] + brk[rc]['kernel_jvp']) / brk[rc]['kernel_fwd']:>10.2f}"
        for rc in brk))


def _plot(rows, cutoffs, batches, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    series = [("fused", "energy", "C0", "o", "-"), ("fused", "force", "C3", "s", "-"),
              ("fused", "energy-cached", "C2", "^", ":"),
              ("reference", "energy", "C0", "o", "--"), ("reference", "force", "C3", "s", "--")]
    fig, ax = plt.subplots(2, 2, figsize=(10, 7.5))
    rcs = [f"{a}/{b}" for a, b in cutoffs]
    rc_b = f"{RC_B[0]}/{RC_B[1]}"
    for backend, mode, col, mk, ls in series:
        lab = f"{mode} ({backend})"
        for k, (key, xs, getter) in enumerate([
                ("peak_mb", [c[0] for c in cutoffs], lambda i: _get(rows, rcs[i], B_RC, backend, mode)),
                ("peak_mb", batches, lambda i: _get(rows, rc_b, batches[i], backend, mode)),
                ("epoch_s", [c[0] for c in cutoffs], lambda i: _get(rows, rcs[i], B_RC, backend, mode)),
                ("epoch_s", batches, lambda i: _get(rows, rc_b, batches[i], backend, mode))]):
            pts = [(x, getter(i)[key]) for i, x in enumerate(xs) if getter(i) is not None]
            if pts:
                a = ax[k // 2][k % 2]
                a.plot(*zip(*pts), color=col, marker=mk, ls=ls, label=lab)
    for k, a in enumerate(ax.flat):
        a.set_yscale("log")
        if k % 2 == 0:
            a.set_xlabel("cutoff radial/angular (A)")
            a.set_xticks([c[0] for c in cutoffs])
            a.set_xticklabels(rcs)
            a.set_title(f"batch size {B_RC}")
        else:
            a.set_xlabel("batch size (structures)")
            a.set_xscale("log", base=2)
            a.set_xticks(batches)
            a.set_xticklabels([str(b) for b in batches])
            a.set_title(f"Rc {rc_b}")
        a.set_ylabel("peak RSS per step (MB)" if k < 2 else "CPU time per epoch (s)")
        a.grid(alpha=0.3, which="both")
    ax[0][0].legend(fontsize=8)
    fig.suptitle("energy-only vs direct force training (CPU, 1 thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
