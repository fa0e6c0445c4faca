"""``distmlip md-check MODEL [MODEL ...] STRUCTURE``: MD stability check of a potential.

For every temperature an NVT run (ASE Langevin) is driven by the model, or by the mean forces of a
committee when several model files (or a committee file) are given.  Every ``--interval`` steps
a frame is analysed:

* minimum interatomic distance (minimum image / periodic images included);
* failure: any pair closer than ``factor * (r_cov(A) + r_cov(B))`` (ASE covalent radii, default
  factor 0.6); the failure ratio is the fraction of failed frames; failed frames are written to
  ``DIR/failed_T<T>.extxyz`` (candidates for new reference calculations);
* committee force deviation: max over atoms of sqrt(mean_k |F_k,i - <F_i>|^2) (0 for one model);
* pair distribution functions per element pair, accumulated over frames, plotted to
  ``DIR/pdf_T<T>.png``.

Energy drift: Langevin dynamics does not conserve the total energy, so after the NVT run a short
NVE continuation (velocity Verlet, ``--nve-steps``, same time step) starts from the final state
and the drift is the change of the total energy per atom over it (``nve_drift_eV_atom``, plus the
largest excursion ``nve_max_dev_eV_atom``).  A run whose energies or positions become non-finite
stops early and counts the remaining frames as failed.

Writes ``DIR/summary.json`` and prints a table.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from ..errors import InputError
from ..utils.log import log


def add_arguments(p) -> None:
    p.add_argument("paths", nargs="+", metavar="MODEL... STRUCTURE",
                   help="one or more model files (several = committee; a committee file also works), "
                        "then the starting structure (any ASE-readable file, e.g. extxyz, xsf, POSCAR)")
    p.add_argument("--temperatures", "-T", nargs="+", type=float, default=[300.0, 1500.0],
                   help="temperatures in K (one run each; default 300 1500)")
    p.add_argument("--steps", type=int, default=2000, help="MD steps per temperature (default 2000)")
    p.add_argument("--timestep", type=float, default=1.0, help="time step in fs (default 1)")
    p.add_argument("--friction", type=float, default=0.02, help="Langevin friction in 1/fs (default 0.02)")
    p.add_argument("--threshold-factor", type=float, default=0.6,
                   help="failure threshold as a fraction of the covalent-radius sum per element pair (0.6)")
    p.add_argument("--interval", type=int, default=10, help="analyse every N-th step (default 10)")
    p.add_argument("--nve-steps", type=int, default=200,
                   help="NVE continuation after each NVT run for the energy drift (0: skip; default 200)")
    p.add_argument("--rdf-rmax", type=float, default=6.0, help="largest distance of the PDFs in A (default 6)")
    p.add_argument("--max-failed-frames", type=int, default=200,
                   help="write at most this many failed frames per run (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial velocities and the thermostat")
    p.add_argument("--device", default="cpu", help="torch device of the model (default cpu)")
    p.add_argument("--output", "-o", default="md_check", help="output folder (default md_check)")


# ------------------------------------------------------------------------------ models
def load_committee(paths, device="cpu") -> list:
    """List of BPNN from one or more model files (a committee file gives all its members)."""
    from ..models import bpnn

    models = []
    for p in paths:
        loader = getattr(bpnn, "load_models", None)
        models.extend(loader(p, device=device) if loader is not None else [bpnn.BPNN.load(p, device=device)])
    for m in models:
        m.eval()
        for q in m.parameters():
            q.requires_grad_(False)
    return models


class CommitteeCalculator(Calculator):
    """ASE calculator: energy and forces = committee mean; ``results['force_deviation']`` = max over
    atoms of the RMS deviation of the members' forces from the mean (0 for a single model)."""

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, models, device="cpu", **kwargs):
        super().__init__(**kwargs)
        import torch

        self.models = list(models)
        self.device = torch.device(device)
        self.cutoff = max(float(m.cutoff) for m in self.models)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        import torch

        from ..data.structure import Structure
        from ..descriptors.batch import collate

        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        s = Structure(numbers=np.asarray(a.numbers), positions=np.asarray(a.positions, dtype=np.float64),
                      cell=np.array(a.cell[:], dtype=np.float64), pbc=np.asarray(a.pbc, dtype=bool))
        Es, Fs = [], []
        for m in self.models:
            b = collate([s], species=m.species, cutoff=self.cutoff, dtype=torch.float64, device=self.device)
            b.positions.requires_grad_(True)
            with torch.enable_grad():
                E = m.atomic_energies(b).sum()
                (g,) = torch.autograd.grad(E, b.positions)
            Es.append(float(E.detach().cpu()))
            Fs.append(-g.detach().cpu().numpy())
        F = np.stack(Fs)
        Fm = F.mean(0)
        dev = float(np.sqrt(((F - Fm) ** 2).sum(-1).mean(0)).max()) if len(F) > 1 and len(Fm) else 0.0
        self.results["energy"] = float(np.mean(Es))
        self.results["free_energy"] = self.results["energy"]
        self.results["forces"] = Fm
        self.results["force_deviation"] = dev


# ------------------------------------------------------------------------------ analysis
def threshold_matrix(numbers, factor: float):
    """{(Za, Zb): factor * (r_cov(a) + r_cov(b))} for the elements present."""
    from ase.data import covalent_radii

    zs = sorted(set(int(z) for z in numbers))
    return {(a, b): factor * float(covalent_radii[a] + covalent_radii[b]) for a in zs for b in zs}


def frame_distances(atoms, rmax: float):
    """(i, j, d) of all pairs i<j (periodic images included) closer than rmax."""
    from ase.neighborlist import neighbor_list

    i, j, d = neighbor_list("ijd", atoms, rmax, self_interaction=False)
    keep = i < j
    # an atom with its own periodic image (small cells) appears with i == j: keep those once
    same = (i == j)
    if same.any():
        keep |= same
    return i[keep], j[keep], d[keep]


class PDFAccumulator:
    """Per element pair histogram of pair distances -> g(r) (periodic) or a distance density."""

    def __init__(self, numbers, rmax: float, nbins: int = 120):
        self.numbers = np.asarray(numbers)
        self.zs = sorted(set(int(z) for z in self.numbers))
        self.edges = np.linspace(0.0, rmax, nbins + 1)
        self.rmax = rmax
        self.hist = {(a, b): np.zeros(nbins) for ai, a in enumerate(self.zs) for b in self.zs[ai:]}
        self.nframes = 0
        self.volume = 0.0

    def add(self, atoms, i, j, d):
        zi, zj = self.numbers[i], self.numbers[j]
        lo, hi = np.minimum(zi, zj), np.maximum(zi, zj)
        for key in self.hist:
            sel = (lo == key[0]) & (hi == key[1]) & (d < self.rmax)
            self.hist[key] += np.histogram(d[sel], bins=self.edges)[0]
        self.nframes += 1
        if atoms.pbc.all():
            self.volume += float(atoms.get_volume())

    def curves(self):
        r = 0.5 * (self.edges[1:] + self.edges[:-1])
        dr = np.diff(self.edges)
        out = {}
        periodic = self.volume > 0 and self.nframes > 0
        V = self.volume / max(self.nframes, 1)
        for (a, b), h in self.hist.items():
            na, nb = int((self.numbers == a).sum()), int((self.numbers == b).sum())
            pairs = na * (na - 1) / 2 if a == b else na * nb
            if periodic and pairs > 0:
                g = h / max(self.nframes, 1) * V / (pairs * 4.0 * math.pi * r * r * dr)
            else:
                g = h / max(h.sum(), 1) / dr
            out[(a, b)] = g
        return r, out, periodic

    def plot(self, path, title):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from ase.data import chemical_symbols

        from ..utils.io import atomic_path

        r, curves, periodic = self.curves()
        fig, ax = plt.subplots(figsize=(6, 4))
        for (a, b), g in curves.items():
            ax.plot(r, g, label=f"{chemical_symbols[a]}-{chemical_symbols[b]}")
        ax.set_xlabel("r (A)")
        ax.set_ylabel("g(r)" if periodic else "distance density (1/A)")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)


# ------------------------------------------------------------------------------ one run
def run_one(atoms0, calc, T: float, steps: int, timestep: float, friction: float, thresholds: dict,
            interval: int, nve_steps: int, rdf_rmax: float, seed: int, out: Path, max_failed: int,
            label: str = "") -> dict:
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary

    try:   # ASE >= 3.29 (MaxwellBoltzmannDistribution, the same function, is deprecated there)
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as _mbd

        def thermalize_momenta(atoms, temperature_K, rng=None):
            _mbd(atoms, temperature_K=temperature_K, rng=rng)
    from ase.md.verlet import VelocityVerlet

    atoms = atoms0.copy()
    atoms.calc = calc
    n = len(atoms)
    rng = np.random.default_rng(seed)
    thermalize_momenta(atoms, T, rng=rng)
    Stationary(atoms)
    dyn = Langevin(atoms, timestep * units.fs, temperature_K=T, friction=friction / units.fs,
                   fixcm=False, rng=np.random.default_rng(seed + 1))
    thr_max = max(thresholds.values())
    rmax = max(rdf_rmax, thr_max)
    pdf = PDFAccumulator(atoms.numbers, rdf_rmax)
    nums = atoms.numbers
    rec = {"step": [], "min_dist": [], "failed": [], "epot": [], "etot": [], "temp": [], "fdev": []}
    failed_frames = []
    status = "ok"
    t0 = time.time()
    n_frames_total = steps // interval + 1
    report_every = max(1, n_frames_total // 10)

    def analyse(step):
        pos = atoms.positions
        if not np.all(np.isfinite(pos)):
            return False
        i, j, d = frame_distances(atoms, rmax)
        dmin = float(d.min()) if len(d) else float("inf")
        thr = np.array([thresholds[(int(nums[a]), int(nums[b]))] for a, b in zip(i, j)]) if len(d) else np.zeros(0)
        failed = bool((d < thr).any()) if len(d) else False
        epot = float(atoms.get_potential_energy())
        ekin = float(atoms.get_kinetic_energy())
        if not (math.isfinite(epot) and math.isfinite(ekin)):
            return False
        pdf.add(atoms, i, j, d)
        rec["step"].append(step)
        rec["min_dist"].append(dmin)
        rec["failed"].append(failed)
        rec["epot"].append(epot / n)
        rec["etot"].append((epot + ekin) / n)
        rec["temp"].append(float(atoms.get_temperature()))
        rec["fdev"].append(float(calc.results.get("force_deviation", 0.0)))
        if failed and len(failed_frames) < max_failed:
            a = atoms.copy()
            a.calc = None
            a.info.update({"md_step": step, "temperature_K": T, "min_dist": dmin, "model_energy": epot})
            failed_frames.append(a)
        k = len(rec["step"]) - 1
        if k % report_every == 0:
            log(f"  {label}T={T:.0f} K step {step:6d}/{steps}  T_inst {rec['temp'][-1]:7.1f} K  "
                f"E_pot {rec['epot'][-1]:10.4f} eV/atom  d_min {dmin:6.3f} A  "
                f"failed frames {sum(rec['failed'])}/{k + 1}  ({time.time() - t0:.0f} s)")
        return True

    ok = analyse(0)
    step = 0
    while ok and step < steps:
        nrun = min(interval, steps - step)
        try:
            with np.errstate(all="ignore"):
                dyn.run(nrun)
        except Exception as exc:  # blown-up configuration (e.g. non-finite positions in the neighbour list)
            log(f"  T={T:.0f} K: MD stopped at step {step + nrun}: {type(exc).__name__}: {str(exc)[:120]}")
            ok = False
            break
        step += nrun
        ok = analyse(step)
    n_done = len(rec["step"])
    if not ok:
        status = f"aborted at step {step} (non-finite energy/positions)"
    n_missing = (n_frames_total - n_done) if not ok else 0
    nfail = int(sum(rec["failed"])) + max(n_missing, 0)
    n_frames = n_done + max(n_missing, 0)

    # NVE continuation for the energy drift
    drift = maxdev = None
    if ok and nve_steps > 0:
        e = []
        nve = VelocityVerlet(atoms, timestep * units.fs)

        def _rec():
            e.append((atoms.get_potential_energy() + atoms.get_kinetic_energy()) / n)

        nve.attach(_rec, interval=1)
        try:
            with np.errstate(all="ignore"):
                nve.run(nve_steps)
            e = np.asarray(e)
            if np.all(np.isfinite(e)):
                drift = float(e[-1] - e[0])
                maxdev = float(np.abs(e - e[0]).max())
        except Exception:
            pass

    tag = f"T{T:g}"
    out.mkdir(parents=True, exist_ok=True)
    fail_path = None
    if failed_frames:
        from ase.io import write

        from ..utils.io import atomic_path

        fail_path = out / f"failed_{tag}.extxyz"
        with atomic_path(fail_path, suffix=".extxyz") as tmp:
            write(str(tmp), failed_frames, format="extxyz", parallel=False)
    pdf_path = out / f"pdf_{tag}.png"
    if pdf.nframes:
        pdf.plot(pdf_path, f"{label}T = {T:g} K, {pdf.nframes} frames")
    md = np.asarray(rec["min_dist"]) if rec["min_dist"] else np.asarray([np.nan])
    return {
        "temperature_K": T, "steps": steps, "steps_done": step, "timestep_fs": timestep, "status": status,
        "frames": n_frames, "failed_frames": nfail, "failure_ratio": nfail / max(n_frames, 1),
        "min_dist_A": float(np.nanmin(md)), "min_dist_first_A": float(md[0]),
        "min_dist_series": [[s, d] for s, d in zip(rec["step"], rec["min_dist"])],
        "mean_T_K": float(np.mean(rec["temp"][1:])) if len(rec["temp"]) > 1 else float("nan"),
        "nve_steps": nve_steps if drift is not None else 0,
        "nve_drift_eV_atom": drift, "nve_max_dev_eV_atom": maxdev,
        "max_force_deviation": float(max(rec["fdev"])) if rec["fdev"] else 0.0,
        "failed_frames_file": str(fail_path) if fail_path else None,
        "pdf_png": str(pdf_path) if pdf.nframes else None,
        "wall_s": time.time() - t0,
    }


def format_table(runs: list[dict]) -> str:
    head = (f"{'T (K)':>8} {'frames':>7} {'failed':>7} {'fail ratio':>10} {'d_min (A)':>10} "
            f"{'NVE drift (eV/atom)':>20} {'max dF (eV/A)':>14}  status")
    lines = [head, "-" * len(head)]
    for r in runs:
        drift = "n/a" if r["nve_drift_eV_atom"] is None else f"{r['nve_drift_eV_atom']:.2e}"
        lines.append(f"{r['temperature_K']:8.0f} {r['frames']:7d} {r['failed_frames']:7d} "
                     f"{r['failure_ratio']:10.3f} {r['min_dist_A']:10.3f} {drift:>20} "
                     f"{r['max_force_deviation']:14.4f}  {r['status']}")
    return "\n".join(lines)


def md_check(model_paths, structure, temperatures=(300.0, 1500.0), steps=2000, timestep=1.0, friction=0.02,
             threshold_factor=0.6, interval=10, nve_steps=200, rdf_rmax=6.0, seed=0, output="md_check",
             device="cpu", max_failed_frames=200, label="") -> dict:
    """Python entry point of ``distmlip md-check`` (returns the summary dict)."""
    from ase.io import read

    if steps < 0 or timestep <= 0 or interval <= 0 or threshold_factor <= 0:
        raise InputError("md-check: --steps must be >= 0, --timestep, --interval and --threshold-factor > 0")
    if isinstance(structure, (str, Path)):
        spath = Path(structure)
        if not spath.is_file():
            raise InputError(f"md-check: structure file {spath} does not exist")
        try:
            atoms = read(str(spath), parallel=False)
        except Exception as exc:
            raise InputError(f"md-check: cannot read structure {spath}: {type(exc).__name__}: {exc}") from None
    else:
        atoms = structure.copy()
    models = load_committee(model_paths, device=device)
    missing = sorted({s for s in atoms.get_chemical_symbols() if any(s not in m.species for m in models)})
    if missing:
        raise InputError(f"md-check: structure {structure}: field 'numbers': elements {missing} are not "
                         f"in the model species {models[0].species}")
    calc = CommitteeCalculator(models, device=device)
    thresholds = threshold_matrix(atoms.numbers, threshold_factor)
    out = Path(output)
    log(f"md-check: {len(models)} model(s), {len(atoms)} atoms, temperatures {list(temperatures)} K, "
        f"{steps} steps x {timestep} fs, Langevin friction {friction} 1/fs, failure threshold "
        f"{threshold_factor} x covalent-radius sum")
    runs = []
    for k, T in enumerate(temperatures):
        runs.append(run_one(atoms, calc, float(T), steps, timestep, friction, thresholds, interval, nve_steps,
                            rdf_rmax, seed + 1000 * k, out, max_failed_frames, label=label))
    from ase.data import chemical_symbols

    summary = {"models": [str(p) for p in model_paths], "structure": str(structure), "n_atoms": len(atoms),
               "committee_size": len(models), "threshold_factor": threshold_factor,
               "thresholds_A": {f"{chemical_symbols[a]}-{chemical_symbols[b]}": v
                                for (a, b), v in thresholds.items() if a <= b},
               "energy_drift": "total energy per atom change over an NVE (velocity Verlet) continuation "
                               "of nve_steps from the final NVT state",
               "runs": runs}
    from ..utils.io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary


def run(args) -> int:
    if len(args.paths) < 2:
        raise InputError("md-check: give at least one MODEL file and a STRUCTURE file")
    summary = md_check(args.paths[:-1], args.paths[-1], args.temperatures, args.steps, args.timestep,
                       args.friction, args.threshold_factor, args.interval, args.nve_steps, args.rdf_rmax,
                       args.seed, args.output, args.device, args.max_failed_frames)
    log(format_table(summary["runs"]))
    log(f"summary written to {Path(args.output) / 'summary.json'}")
    return 0
