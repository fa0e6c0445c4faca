"""``distmlip md-check MODEL [MODEL ...] STRUCTURE``: does MD with the potential survive?

For every temperature an NVT run (ASE Langevin; with ``--ensemble npt`` an NPT run, ASE's
Martyna-Tobias-Klein Nose-Hoover chains with an isotropic barostat, ``npt-cell`` with the whole
cell free, at ``--pressure`` GPa; periodic structures only) is driven by the model, by the mean forces of a
committee (several model files or a committee file), or by an ASE calculator named
``ase:NAME`` / ``module:Class`` (a reference run, e.g. ``ase:EMT``).  Every ``--interval`` steps
a frame is analysed, and after the NVT run an NVE (velocity Verlet) continuation of
``--nve-steps`` starts from its final state.  Each run gets a verdict from every sign of failure:

=====================  ====================================================================
criterion              a run is unstable when
=====================  ====================================================================
close pairs            a pair is closer than ``--threshold-factor`` x (r_cov(A) + r_cov(B))
                       (ASE covalent radii; 0.6)
temperature            the mean temperature over ``--temperature-window`` fs leaves
                       T0 +- tol, tol = T0 max(``--temperature-band``, 3 sqrt(2 / (3 N))),
                       after a thermostat warm-up of 3 / friction (the second term is three
                       standard deviations of the instantaneous temperature of N atoms, so
                       small systems are not flagged for their natural fluctuations)
beyond training        a pair is closer than ``--extrapolation-factor`` x the shortest distance
                       of its element pair in the training data (0.85; the model file's
                       training-data record or ``--training-data``): the model is far outside
                       its data there, where an under-trained one is flat and lets atoms
                       collapse without any other sign
energy below training  the potential energy per atom falls more than ``--energy-margin``
                       below the lowest energy per atom of the training structures of the
                       same composition (the model file's training-data record, or
                       ``--training-data``)
NVE drift              the total energy per atom of the NVE continuation moves more than
                       ``--max-nve-drift`` from its start
committee deviation    (committees) max over atoms of sqrt(mean_k |F_k,i - <F_i>|^2) exceeds
                       ``--max-force-deviation``
GPR sigma              (``--gpr-data``) the GPR energy standard deviation exceeds
                       ``--max-gpr-sigma``
cell volume            (NPT) the volume leaves V0 (1 +- ``--max-volume-change``) (a collapsing
                       or exploding cell: the stress of the model is wrong far from the data)
=====================  ====================================================================

A run whose energies or positions become non-finite stops: verdict ``aborted`` (its remaining
frames count as failed).  Verdicts: ``stable``, ``unstable: <criterion>, first at <t> fs,
<detail>`` (the earliest criterion; the others are listed), ``aborted: ...``.

Pairs closer than the shortest distance of their element pair in the training data (stored in
the model file by ``distmlip train``) but not beyond ``--extrapolation-factor`` of it are reported
as a warning: the model extrapolates there.

Outputs: ``DIR/summary.json``, failed frames ``DIR/failed_T<T>.extxyz`` (candidates for new
reference calculations), pair distribution functions ``DIR/pdf_T<T>.png``, a table, and one
summary line that batch scripts can grep::

    md-check result: unstable (2 runs: 1 stable, 1 unstable, 0 aborted; first: T=1500 K close pairs at 230 fs)

A stop request (SIGTERM, SIGUSR1, the file named by ``DISTMLIP_STOP_FILE``: what a batch system
sends before its time limit; ``distributed/signals.py``) ends the MD within a step: the runs that
finished keep their verdicts, the run it cut short is ``interrupted: <signal> at <t> fs ...`` (its
frames so far are reported, not judged), later temperatures are ``not run``; summary.json and the
table are written, the summary line says ``md-check result: interrupted (...)`` and the command
exits 128 + the signal number (143 for SIGTERM).  Ctrl-C (SIGINT) writes the same report of the
finished runs and exits 130.  A second SIGTERM ends the process at once.  The same command run
again reuses the runs that finished (summary.json records the check's identity: the models' and
the structure's content and every setting) and runs the rest; ``--fresh`` reruns everything.

Exit status: 0 when every run is stable, 3 when any run is unstable or aborted (``--report-only``:
0), 2 on bad input, 128 + the signal number after a stop request (143 SIGTERM, 138 SIGUSR1 or the
stop file, 130 Ctrl-C): the check is incomplete, whatever the finished runs said.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from ..errors import InputError
from ..utils.log import log, warn

EXIT_UNSTABLE = 3
# MD steps between md-check's stop checks: every step (its check, in a world of one, reads a
# flag; explore's is a collective and comes every few steps)
_STOP_EVERY = 1


def add_arguments(p) -> None:
    p.add_argument("paths", nargs="+", metavar="MODEL... STRUCTURE",
                   help="one or more model files (several = committee; a committee file also works) or one "
                        "ASE calculator name (ase:EMT, package.module:Class), then the starting structure "
                        "(any ASE-readable file, e.g. extxyz, xsf, POSCAR)")
    p.add_argument("--temperatures", "-T", nargs="+", type=float, default=[300.0, 1500.0],
                   help="temperatures in K (one run each; default 300 1500)")
    p.add_argument("--steps", type=int, default=2000, help="MD steps per temperature (default 2000)")
    p.add_argument("--timestep", type=float, default=1.0, help="time step in fs (default 1)")
    p.add_argument("--friction", type=float, default=0.02,
                   help="Langevin friction in 1/fs (default 0.02); NPT: the thermostat's time constant is 1 / friction")
    p.add_argument("--ensemble", choices=ENSEMBLES, default="nvt",
                   help="nvt (Langevin, default); npt (MTK Nose-Hoover chains, isotropic barostat); npt-cell "
                        "(MTK, the whole cell free); NPT needs a structure periodic in all three directions and a "
                        "model with stress")
    p.add_argument("--pressure", type=float, default=0.0, help="NPT: external pressure in GPa (default 0)")
    p.add_argument("--barostat-time", type=float, default=1000.0,
                   help="NPT: the barostat's time constant in fs (default 1000)")
    p.add_argument("--max-volume-change", type=float, default=0.3,
                   help="NPT: largest relative change of the cell volume (default 0.3)")
    p.add_argument("--threshold-factor", type=float, default=0.6,
                   help="close-pair threshold as a fraction of the covalent-radius sum per element pair (0.6)")
    p.add_argument("--interval", type=int, default=10, help="analyse every N-th step (default 10)")
    p.add_argument("--nve-steps", type=int, default=200,
                   help="NVE continuation after each NVT run for the energy drift (0: skip; default 200)")
    p.add_argument("--temperature-band", type=float, default=0.5,
                   help="allowed relative deviation of the windowed mean temperature from the target (0.5)")
    p.add_argument("--temperature-window", type=float, default=100.0,
                   help="window of the mean temperature in fs (default 100)")
    p.add_argument("--extrapolation-factor", type=float, default=0.85,
                   help="a pair closer than this fraction of the shortest distance of its element pair in the "
                        "training data counts as unstable (default 0.85; 0: off)")
    p.add_argument("--energy-margin", type=float, default=0.1,
                   help="eV/atom below the training data's lowest energy per atom that counts as unstable (0.1)")
    p.add_argument("--max-nve-drift", type=float, default=0.01,
                   help="largest change of the NVE total energy in eV/atom (default 0.01)")
    p.add_argument("--max-force-deviation", type=float, default=0.5,
                   help="largest committee force deviation in eV/A (committees only; default 0.5)")
    p.add_argument("--training-data", nargs="+", metavar="H5",
                   help="training data set(s) for the energy and shortest-distance checks when the model "
                        "file carries no training-data record (models trained before it was stored, ASE calculators)")
    p.add_argument("--gpr-data", nargs="+", metavar="H5",
                   help="GPR-ANN: fit a GPR on the reference structures of these data sets with the start's atom "
                        "sequence and report its energy standard deviation per frame")
    p.add_argument("--max-gpr-sigma", type=float, default=0.1,
                   help="largest GPR energy standard deviation in eV (with --gpr-data; default 0.1)")
    p.add_argument("--rdf-rmax", type=float, default=6.0, help="largest distance of the PDFs in A (default 6)")
    p.add_argument("--max-failed-frames", type=int, default=200,
                   help="write at most this many failed frames per run (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial velocities and the thermostat")
    p.add_argument("--device", default="cpu", help="torch device of the model (default cpu)")
    p.add_argument("--report-only", action="store_true",
                   help="exit 0 even when a run is unstable (the verdicts are printed all the same)")
    p.add_argument("--output", "-o", default=None,
                   help="output folder (default md_check_<model name>; for a run's model.pt, best_model.pt, "
                        "last_model.pt or committee.pt md_check_<run folder>[_<name>])")
    p.add_argument("--fresh", action="store_true",
                   help="run every temperature again; by default the runs that finished in an earlier "
                        "md-check into the same --output with the same models, structure and settings are "
                        "reused (a check stopped at a batch job's time limit continues)")


# ------------------------------------------------------------------------------ models
def load_committee(paths, device="cpu") -> list:
    """List of BPNN from one or more model files (a committee file gives all its members)."""
    from ..models.bpnn import load_models

    models = []
    for p in paths:
        models.extend(load_models(p, device=device))
    for m in models:
        m.eval()
        for q in m.parameters():
            q.requires_grad_(False)
    return models


class CommitteeCalculator(Calculator):
    """ASE calculator: energy, forces and (periodic cells) stress = committee mean;
    ``results['force_deviation']`` = max over atoms of the RMS deviation of the members' forces
    from the mean (0 for a single model).  ``with_stress``: the stress comes with every call (NPT
    asks for forces and stress of the same step: one model evaluation gives both)."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, models, device="cpu", with_stress: bool = False, **kwargs):
        super().__init__(**kwargs)
        import torch

        self.with_stress = with_stress
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
        want_stress = ((self.with_stress or "stress" in properties) and bool(np.all(a.pbc))
                       and abs(float(np.linalg.det(a.cell[:]))) > 0)
        Es, Fs, Ss = [], [], []
        batch, species = None, None
        for m in self.models:
            if batch is None or m.species != species:   # members of a committee share one pair list
                species = m.species
                batch = collate([s], species=m.species, cutoff=self.cutoff, dtype=torch.float64,
                                device=self.device)
            batch.positions = batch.positions.detach().requires_grad_(True)
            with torch.enable_grad():
                if want_stress:
                    E, F, S = m.energy_forces_stress(batch)
                    Ss.append(S.detach().cpu().numpy().astype(np.float64)[0])
                else:
                    E, F = m.energy_and_forces(batch)
            Es.append(float(E.detach().sum().cpu()))
            Fs.append(F.detach().cpu().numpy().astype(np.float64))
        F = np.stack(Fs)
        Fm = F.mean(0)
        dev = float(np.sqrt(((F - Fm) ** 2).sum(-1).mean(0)).max()) if len(F) > 1 and len(Fm) else 0.0
        self.results["energy"] = float(np.mean(Es))
        self.results["free_energy"] = self.results["energy"]
        self.results["forces"] = Fm
        self.results["force_deviation"] = dev
        if want_stress:
            from ase.stress import full_3x3_to_voigt_6_stress

            self.results["stress"] = full_3x3_to_voigt_6_stress(np.mean(Ss, axis=0))


# ------------------------------------------------------------------------------ criteria
@dataclass
class Criteria:
    """Thresholds of the verdict (the command's options; see the module docstring)."""
    threshold_factor: float = 0.6
    temperature_band: float = 0.5
    temperature_window_fs: float = 100.0
    energy_margin: float = 0.1
    max_nve_drift: float = 0.01
    max_force_deviation: float = 0.5
    max_gpr_sigma: float = 0.1
    max_volume_change: float = 0.3
    # between what EMT itself reaches at 1000 K (0.97 x the demo set's Cu-Cu minimum) and what
    # collapsing models reached without any other criterion firing (0.78-0.82; docs/robustness.md)
    extrapolation_factor: float = 0.85


ENSEMBLES = ("nvt", "npt", "npt-cell")


@dataclass
class Ensemble:
    """The MD ensemble of md-check and explore: ``kind`` nvt (Langevin) or npt / npt-cell (ASE's
    MTK Nose-Hoover chains with an isotropic / full-cell barostat at ``pressure_gpa``, time
    constant ``barostat_fs``)."""
    kind: str = "nvt"
    pressure_gpa: float = 0.0
    barostat_fs: float = 1000.0

    def check(self, atoms, where: str) -> None:
        if self.kind not in ENSEMBLES:
            raise InputError(f"{where}: ensemble {self.kind!r} is not one of {', '.join(ENSEMBLES)}")
        if self.kind != "nvt":
            if not (bool(np.all(atoms.pbc)) and abs(float(atoms.get_volume())) > 0):
                raise InputError(f"{where}: --ensemble {self.kind} needs a structure periodic in all three "
                                 f"directions (pbc {list(map(bool, atoms.pbc))})")
            if not (self.barostat_fs > 0 and math.isfinite(self.pressure_gpa)):
                raise InputError(f"{where}: --barostat-time must be > 0 and --pressure finite")


def threshold_matrix(numbers, factor: float):
    """{(Za, Zb): factor * (r_cov(a) + r_cov(b))} for the elements present."""
    from ase.data import covalent_radii

    zs = sorted(set(int(z) for z in numbers))
    return {(a, b): factor * float(covalent_radii[a] + covalent_radii[b]) for a in zs for b in zs}


def _table(thresholds: dict) -> np.ndarray:
    tab = np.zeros((119, 119))
    for (a, b), v in thresholds.items():
        tab[a, b] = v
    return tab


def frame_distances(atoms, rmax: float):
    """(i, j, d) of every pair closer than rmax once: i < j with each of j's periodic images, and
    an atom with one of each two opposite images of itself (small cells)."""
    from ase.neighborlist import neighbor_list

    i, j, d, S = neighbor_list("ijdS", atoms, rmax, self_interaction=False)
    # the full list holds (i, i, S) and (i, i, -S): the first nonzero shift component positive
    # picks one (both were kept before, and g(r) of a 4-atom fcc cell gave 16 first neighbours)
    lead = np.where(S[:, 0] != 0, S[:, 0], np.where(S[:, 1] != 0, S[:, 1], S[:, 2]))
    keep = (i < j) | ((i == j) & (lead > 0))
    return i[keep], j[keep], d[keep]


def _pair_name(za: int, zb: int) -> str:
    from ase.data import chemical_symbols

    return "-".join(sorted((chemical_symbols[int(za)], chemical_symbols[int(zb)])))


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
            # like pairs: na^2 / 2, an atom's own periodic images being neighbours too (with
            # na (na - 1) / 2 a small cell's g(r) came out na / (na - 1) too high)
            pairs = na * na / 2 if a == b else na * nb
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


# ------------------------------------------------------------------------------ one trajectory
def simulate(atoms0, calc, T: float, steps: int, timestep: float, friction: float, interval: int, seed: int,
             thresholds: dict, *, record: dict | None = None, uncertainty=None, pdf: PDFAccumulator | None = None,
             keep_frames: bool = False, stop_on_failure: bool = False, label: str = "", report: bool = True,
             ensemble: Ensemble | None = None, stop_check=None, stop_every: int | None = None):
    """Langevin NVT (or NPT, ``ensemble``) from Maxwell-Boltzmann velocities (seeded); a frame is analysed every
    ``interval`` steps.  Returns ``(trajectory, atoms)``: per-frame lists (step, t_fs, min_dist,
    failed, worst pair, epot/etot per atom, temperature, committee deviation, GPR sigma, pairs
    below the training record) and the final Atoms (with velocities, for an NVE continuation).

    ``uncertainty``: callable Atoms -> GPR sigma (eV); ``keep_frames``: also return copies of
    the analysed frames; ``stop_on_failure``: stop after the first frame with a close pair
    (the frames not run count as failed).  The trajectory depends only on the inputs and
    ``seed`` (not on the process that runs it).

    ``stop_check``: called before every ``stop_every`` steps (default ``interval``) of MD; when it
    returns True the run ends there with ``tr['interrupted']`` set (a stop request: the caller
    discards such a trajectory or reports it as interrupted, never judges it as a result).  Running
    the steps in such pieces does not change the trajectory."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary
    from ase.parallel import DummyMPI

    try:   # ASE >= 3.29 (MaxwellBoltzmannDistribution, the same function, is deprecated there)
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as _mbd

        def thermalize_momenta(atoms, temperature_K, comm=None, rng=None):
            _mbd(atoms, temperature_K=temperature_K, comm=comm, rng=rng)

    from ..models.data_record import pairs_below

    atoms = atoms0.copy()
    atoms.calc = calc
    n = len(atoms)
    rng = np.random.default_rng(seed)
    # ASE would broadcast rank 0's random numbers to every MPI rank (its default communicator);
    # under explore each rank runs its own trajectory, so every call here is process-local
    thermalize_momenta(atoms, T, comm=DummyMPI(), rng=rng)
    Stationary(atoms)
    ensemble = ensemble or Ensemble()
    if ensemble.kind == "nvt":
        dyn = Langevin(atoms, timestep * units.fs, temperature_K=T, friction=friction / units.fs,
                       fixcm=False, rng=np.random.default_rng(seed + 1), comm=DummyMPI())
    else:
        from ase.md.nose_hoover_chain import MTKNPT, IsotropicMTKNPT

        cls = IsotropicMTKNPT if ensemble.kind == "npt" else MTKNPT
        dyn = cls(atoms, timestep * units.fs, temperature_K=T, pressure_au=ensemble.pressure_gpa * units.GPa,
                  tdamp=(1.0 / friction if friction > 0 else 100.0 * timestep) * units.fs,
                  pdamp=ensemble.barostat_fs * units.fs, comm=DummyMPI())
    tab = _table(thresholds)
    # 2.5 x the threshold (1.5 x the covalent-radius sum at the default factor): the minimum
    # distance of a frame is then known even when no pair is close
    need = [2.5 * max(thresholds.values())]
    if pdf is not None:
        need.append(pdf.rmax)
    if record:
        pm = [v for v in (record.get("pair_min_distance_A") or {}).values() if v is not None]
        need.append(max(pm + [float(record.get("cutoff_A", 0.0))]) + 1e-6)
    rmax = max(need)
    nums = atoms.numbers
    tr = {k: [] for k in ("step", "t_fs", "min_dist", "failed", "worst", "epot", "etot", "temp", "fdev",
                          "gpr_sigma", "below", "volume")}
    frames = []
    t0 = time.time()
    n_frames_total = steps // interval + 1
    report_every = max(1, n_frames_total // 10)
    state = {"ok": True, "reason": None}

    def analyse(step):
        pos = atoms.positions
        if not np.all(np.isfinite(pos)):
            state["reason"] = "non-finite positions"
            return False
        i, j, d = frame_distances(atoms, rmax)
        epot = float(atoms.get_potential_energy())
        ekin = float(atoms.get_kinetic_energy())
        if not (math.isfinite(epot) and math.isfinite(ekin)):
            state["reason"] = "non-finite energy"
            return False
        dmin = float(d.min()) if len(d) else float("inf")
        worst = None
        failed = False
        if len(d):
            thr = tab[nums[i], nums[j]]
            ratio = d / thr
            k = int(np.argmin(ratio))
            failed = bool(ratio[k] < 1.0)
            worst = (_pair_name(nums[i[k]], nums[j[k]]), float(d[k]), float(thr[k]))
        if pdf is not None:
            pdf.add(atoms, i, j, d)
        tr["step"].append(step)
        tr["t_fs"].append(step * timestep)
        tr["min_dist"].append(dmin)
        tr["failed"].append(failed)
        tr["worst"].append(worst)
        tr["epot"].append(epot / n)
        tr["etot"].append((epot + ekin) / n)
        tr["temp"].append(float(atoms.get_temperature()))
        tr["volume"].append(float(atoms.get_volume()) if np.all(atoms.pbc) else None)
        tr["fdev"].append(float(calc.results.get("force_deviation", 0.0)))
        tr["gpr_sigma"].append(float(uncertainty(atoms)) if uncertainty is not None else None)
        tr["below"].append(pairs_below(record, nums, i, j, d) if record else {})
        if keep_frames:
            a = atoms.copy()
            a.calc = None
            frames.append(a)
        k = len(tr["step"]) - 1
        if report and k % report_every == 0:
            vol = (f"  V/V0 {tr['volume'][-1] / tr['volume'][0]:6.3f}" if ensemble.kind != "nvt" else "")
            log(f"  {label}T={T:.0f} K step {step:6d}/{steps}  T_inst {tr['temp'][-1]:7.1f} K  "
                f"E_pot {tr['epot'][-1]:10.4f} eV/atom  d_min {dmin:6.3f} A{vol}  "
                f"close-pair frames {sum(tr['failed'])}/{k + 1}  ({time.time() - t0:.0f} s)")
        return True

    ok = analyse(0)
    step = 0
    piece = max(1, int(stop_every or interval))
    interrupted = False
    while ok and step < steps:
        if stop_on_failure and tr["failed"] and tr["failed"][-1]:
            break
        nrun = min(interval, steps - step)
        done, interrupted, error = _run_in_pieces(dyn, nrun, piece, stop_check)
        if error is not None:
            state["reason"], ok = error, False
        if interrupted:
            step += done
            break
        step += nrun
        if not ok:
            break
        ok = analyse(step)
    n_done = len(tr["step"])
    stopped_early = ok and step < steps and not interrupted
    tr.update(steps=steps, steps_done=step, timestep_fs=timestep, n_frames_total=n_frames_total, ensemble=ensemble.kind,
              aborted=not ok, abort_reason=state["reason"], abort_t_fs=step * timestep if not ok else None,
              stopped_on_failure=stopped_early, interrupted=interrupted, n_missing=n_frames_total - n_done,
              wall_s=time.time() - t0)
    if keep_frames:
        tr["frames"] = frames
    return tr, atoms


def _run_in_pieces(dyn, n: int, piece: int, stop_check) -> tuple[int, bool, str | None]:
    """Run ``n`` steps of the ASE dynamics ``dyn`` in pieces of ``piece`` steps, asking
    ``stop_check`` before each (the pieces do not change the trajectory).  Returns (steps done,
    interrupted by the check, error text of a blown-up configuration or None)."""
    done = 0
    while done < n:
        # outside the try below: an error of the check (a collective's deadline) is not a
        # blown-up configuration
        if stop_check is not None and stop_check():
            return done, True, None
        part = min(piece, n - done)
        try:
            with np.errstate(all="ignore"):
                dyn.run(part)
        except Exception as exc:  # blown-up configuration (e.g. non-finite positions in the neighbour list)
            return done, False, f"{type(exc).__name__}: {str(exc)[:120]}"
        done += part
    return done, False, None


def nve_continuation(atoms, timestep: float, nve_steps: int, stop_check=None, stop_every: int = 1):
    """Total energy per atom along an NVE (velocity Verlet) run from ``atoms`` (its velocities).
    Returns ``(energies, interrupted)``: energies None when the run blows up; ``stop_check`` is
    called before every ``stop_every`` steps, and when it returns True the run ends there
    (``interrupted``, with the energies so far).  The pieces do not change the run."""
    from ase import units
    from ase.md.verlet import VelocityVerlet
    from ase.parallel import DummyMPI

    n = len(atoms)
    e = {}      # by step: a piece of the run must not record its start twice
    nve = VelocityVerlet(atoms, timestep * units.fs, comm=DummyMPI())

    def _rec():
        e[nve.nsteps] = (atoms.get_potential_energy() + atoms.get_kinetic_energy()) / n

    nve.attach(_rec, interval=1)
    _, interrupted, error = _run_in_pieces(nve, nve_steps, max(1, int(stop_every)), stop_check)
    if error is not None:
        return None, False
    e = np.asarray([e[k] for k in sorted(e)])
    return (e if np.all(np.isfinite(e)) else None), interrupted


# an instantaneous temperature above max(RUNAWAY_FACTOR x T, T + RUNAWAY_MIN_K) fails at any time;
# the absolute term keeps a cold run's warm-up from an unrelaxed start (potential energy released
# as heat) from counting as one
RUNAWAY_FACTOR = 10.0
RUNAWAY_MIN_K = 3000.0


def judge(tr: dict, T: float, n_atoms: int, friction: float, crit: Criteria, emin=None, nve=None,
          committee: bool = False, pair_min: dict | None = None) -> list[dict]:
    """Failure events of a trajectory: ``[{criterion, t_fs, detail}]`` sorted by time;
    ``pair_min``: the training data's shortest distance per element pair ("Cu-O": A)."""
    ev = []
    if pair_min and crit.extrapolation_factor > 0:
        for tk, b in zip(tr["t_fs"], tr.get("below", [])):
            worst = min(((d / pair_min[k], k, d) for k, d in b.items() if pair_min.get(k)), default=None)
            if worst is not None and worst[0] < crit.extrapolation_factor:
                r, k, d = worst
                ev.append({"criterion": "beyond training", "t_fs": float(tk),
                           "detail": f"{k} {d:.3f} A = {r:.3f} x the shortest {k} distance in the training data "
                                     f"({pair_min[k]:.3f} A) < {crit.extrapolation_factor:g} x"})
                break
    t = np.asarray(tr["t_fs"], dtype=np.float64)
    failed = np.asarray(tr["failed"], dtype=bool)
    n_frames = len(t) + tr["n_missing"]
    fr = (int(failed.sum()) + tr["n_missing"]) / max(n_frames, 1)
    if failed.any():
        k = int(np.argmax(failed))
        name, d, thr = tr["worst"][k]
        ev.append({"criterion": "close pairs", "t_fs": float(t[k]),
                   "detail": f"{name} {d:.3f} A < {thr:.3f} A ({crit.threshold_factor:g} x covalent-radius sum); "
                             f"failure ratio {fr:.3f}"})
    temps = np.asarray(tr["temp"], dtype=np.float64)
    if T > 0 and len(temps) > 1:
        warm = 3.0 / friction if friction > 0 else 0.0
        tol = T * max(crit.temperature_band, 3.0 * math.sqrt(2.0 / (3.0 * max(n_atoms, 1))))
        for k in range(len(t)):
            if t[k] < warm + crit.temperature_window_fs - 1e-9:
                # the band waits for the thermostat, a runaway does not: a run shorter than the
                # warm-up that heated to hundreds of times T was judged on other criteria only
                if temps[k] > max(RUNAWAY_FACTOR * T, T + RUNAWAY_MIN_K):
                    ev.append({"criterion": "temperature", "t_fs": float(t[k]),
                               "detail": f"{temps[k]:.0f} K, a runaway (above {RUNAWAY_FACTOR:g} x {T:g} K and "
                                         f"{T:g} + {RUNAWAY_MIN_K:g} K) before the thermostat's warm-up "
                                         f"({warm + crit.temperature_window_fs:g} fs) ended"})
                    break
                continue
            w = (t > t[k] - crit.temperature_window_fs) & (t <= t[k])
            m = float(temps[w].mean())
            if abs(m - T) > tol:
                ev.append({"criterion": "temperature", "t_fs": float(t[k]),
                           "detail": f"{crit.temperature_window_fs:g}-fs mean {m:.0f} K outside {T:g} +- {tol:.0f} K"
                                     f" (final {temps[-1]:.0f} K)"})
                break
    if emin is not None and len(t):
        ep = np.asarray(tr["epot"], dtype=np.float64)
        low = ep < emin - crit.energy_margin
        if low.any():
            k = int(np.argmax(low))
            ev.append({"criterion": "energy below training", "t_fs": float(t[k]),
                       "detail": f"E_pot {ep[k]:.4f} eV/atom < training minimum {emin:.4f} - {crit.energy_margin:g}"
                                 f" eV/atom (lowest in run {ep.min():.4f})"})
    if committee and len(t):
        fd = np.asarray(tr["fdev"], dtype=np.float64)
        hi = fd > crit.max_force_deviation
        if hi.any():
            k = int(np.argmax(hi))
            ev.append({"criterion": "committee deviation", "t_fs": float(t[k]),
                       "detail": f"max atomic force deviation {fd[k]:.3f} eV/A > {crit.max_force_deviation:g} "
                                 f"(largest {fd.max():.3f})"})
    gs = [x for x in tr["gpr_sigma"] if x is not None]
    if gs:
        g = np.asarray(tr["gpr_sigma"], dtype=np.float64)
        hi = g > crit.max_gpr_sigma
        if hi.any():
            k = int(np.argmax(hi))
            ev.append({"criterion": "GPR sigma", "t_fs": float(t[k]),
                       "detail": f"GPR energy sigma {g[k]:.4f} eV > {crit.max_gpr_sigma:g} (largest {g.max():.4f})"})
    vols = [v for v in tr.get("volume", []) if v is not None]
    if tr.get("ensemble", "nvt") != "nvt" and len(vols) > 1:
        rel = np.asarray(vols) / vols[0] - 1.0
        hi = np.abs(rel) > crit.max_volume_change
        if hi.any():
            k = int(np.argmax(hi))
            ev.append({"criterion": "cell volume", "t_fs": float(t[k]),
                       "detail": f"V/V0 = {1.0 + rel[k]:.3f}, beyond 1 +- {crit.max_volume_change:g} "
                                 f"(range {1.0 + rel.min():.3f}..{1.0 + rel.max():.3f})"})
    if nve is not None and len(nve) > 1:
        dev = np.abs(nve - nve[0])
        hi = dev > crit.max_nve_drift
        if hi.any():
            k = int(np.argmax(hi))
            ev.append({"criterion": "NVE drift", "t_fs": float(tr["steps_done"] * tr["timestep_fs"] + k * tr["timestep_fs"]),
                       "detail": f"total energy moved {dev[k]:.4f} eV/atom > {crit.max_nve_drift:g} "
                                 f"(after {len(nve) - 1} NVE steps: {nve[-1] - nve[0]:+.4f})"})
    ev.sort(key=lambda e: e["t_fs"])
    return ev


def verdict_of(events: list, tr: dict) -> str:
    if tr.get("interrupted"):
        cut = tr["interrupt"]
        before = f"; before: {events[0]['criterion']} at {events[0]['t_fs']:g} fs" if events else ""
        return f"interrupted: {cut['reason']} at {cut['t_fs']:g} fs{cut['where']} (not judged{before})"
    if tr["aborted"]:
        before = f" (before: {events[0]['criterion']} at {events[0]['t_fs']:g} fs)" if events else ""
        return f"aborted: {tr['abort_reason']} at {tr['abort_t_fs']:g} fs{before}"
    if not events:
        return "stable"
    e = events[0]
    others = sorted({x["criterion"] for x in events[1:]} - {e["criterion"]})
    return (f"unstable: {e['criterion']}, first at {e['t_fs']:g} fs, {e['detail']}"
            + (f" (also: {', '.join(others)})" if others else ""))


# ------------------------------------------------------------------------------ one run
def run_one(atoms0, calc, T: float, steps: int, timestep: float, friction: float, thresholds: dict,
            interval: int, nve_steps: int, rdf_rmax: float, seed: int, out: Path, max_failed: int,
            label: str = "", crit: Criteria | None = None, record: dict | None = None, uncertainty=None,
            committee: bool = False, ensemble: Ensemble | None = None, stop=None) -> dict:
    """One temperature: NVT (or NPT), NVE continuation, verdict, output files; returns the run's summary.

    ``stop``: a context (``distributed.DistContext``) whose ``stop_requested()`` is asked every
    step of the MD; a stop ends the run there: ``status`` 'interrupted', its verdict says so and
    what it saw until then, and nothing of it is judged (never 'stable')."""
    from ..models.data_record import lowest_energy_per_atom, reduced_formula

    crit = crit or Criteria()
    stop_check = stop.stop_requested if stop is not None else None
    pdf = PDFAccumulator(atoms0.numbers, rdf_rmax)
    tr, atoms = simulate(atoms0, calc, T, steps, timestep, friction, interval, seed, thresholds, record=record,
                         uncertainty=uncertainty, pdf=pdf, keep_frames=True, label=label, ensemble=ensemble,
                         stop_check=stop_check, stop_every=_STOP_EVERY)
    n = len(atoms0)
    nve = None
    if tr["interrupted"]:
        tr["interrupt"] = {"t_fs": tr["steps_done"] * timestep,
                           "where": f" of {steps * timestep:g} fs of {tr['ensemble'].upper()}"}
    elif not tr["aborted"] and nve_steps > 0:
        nve, cut = nve_continuation(atoms, timestep, nve_steps, stop_check=stop_check, stop_every=_STOP_EVERY)
        if cut:
            nve_done = max(len(nve) - 1, 0) if nve is not None else 0
            tr["interrupted"] = True
            tr["interrupt"] = {"t_fs": (tr["steps_done"] + nve_done) * timestep, "where": ", in the NVE continuation"}
            nve = None
        elif nve is None:
            tr["aborted"], tr["abort_reason"] = True, "NVE continuation blew up"
            tr["abort_t_fs"] = (tr["steps_done"] + nve_steps) * timestep
    if tr["interrupted"]:
        tr["interrupt"]["reason"] = stop.stop_reason() or "stop request"
        # the frames the stop left out are not failures: the run is reported as far as it went
        tr["n_missing"] = 0
    emin = lowest_energy_per_atom(record, atoms0.numbers)
    if emin is None and (record or {}).get("energy_per_atom_min"):
        # the bound is per composition: a start of a composition the data never held (a random
        # alloy's own) was judged without it and nothing said so (sweep 24)
        warn(f"{label}T={T:g} K: the training data hold no structure of the start's composition "
             f"{reduced_formula(atoms0.numbers)}: the 'energy below training' criterion is not applied (it compares "
             f"with the lowest energy per atom of the same composition)")
    events = judge(tr, T, n, friction, crit, emin=emin, nve=nve, committee=committee,
                   pair_min=(record or {}).get("pair_min_distance_A"))
    verdict = verdict_of(events, tr)
    n_frames = len(tr["step"]) + tr["n_missing"]
    nfail = int(sum(tr["failed"])) + tr["n_missing"]

    # pairs below the shortest distances of the training data: a warning, not a verdict
    below: dict = {}
    for tk, b in zip(tr["t_fs"], tr["below"]):
        for k, d in b.items():
            if k not in below:
                below[k] = {"first_t_fs": float(tk), "min_A": d, "frames": 0}
            below[k]["min_A"] = min(below[k]["min_A"], d)
            below[k]["frames"] += 1
    if below:
        pm = record.get("pair_min_distance_A") or {}
        for k, b in sorted(below.items()):
            lim = pm.get(k)
            warn(f"{label}T={T:g} K: {k} pairs down to {b['min_A']:.3f} A (first at {b['first_t_fs']:g} fs, "
                 f"{b['frames']} frames) are shorter than the shortest {k} distance in the training data "
                 f"({'none within %.2f A' % record['cutoff_A'] if lim is None else '%.3f A' % lim}): "
                 f"the model extrapolates there")

    tag = f"T{T:g}"
    out.mkdir(parents=True, exist_ok=True)
    fail_path = None
    failed_frames = []
    for a, f, s, tk, d in zip(tr["frames"], tr["failed"], tr["step"], tr["t_fs"], tr["min_dist"]):
        if f and len(failed_frames) < max_failed:
            a.info.update({"md_step": s, "time_fs": tk, "temperature_K": T, "min_dist": d})
            failed_frames.append(a)
    if failed_frames:
        from ase.io import write

        from ..utils.io import atomic_path

        fail_path = out / f"failed_{tag}.extxyz"
        with atomic_path(fail_path, suffix=".extxyz") as tmp:
            write(str(tmp), failed_frames, format="extxyz", parallel=False)
    pdf_path = out / f"pdf_{tag}.png"
    if pdf.nframes:
        pdf.plot(pdf_path, f"{label}T = {T:g} K, {pdf.nframes} frames" + (" (interrupted)" if tr["interrupted"] else ""))
    md = np.asarray(tr["min_dist"]) if tr["min_dist"] else np.asarray([np.nan])
    temps = tr["temp"]
    gs = [x for x in tr["gpr_sigma"] if x is not None]
    return {
        "temperature_K": T, "steps": steps, "steps_done": tr["steps_done"], "timestep_fs": timestep,
        "verdict": verdict, "stable": verdict == "stable", "aborted": bool(tr["aborted"]), "events": events,
        "status": "interrupted" if tr["interrupted"] else "done",
        "frames": n_frames, "failed_frames": nfail, "failure_ratio": nfail / max(n_frames, 1),
        "min_dist_A": float(np.nanmin(md)), "min_dist_first_A": float(md[0]),
        "min_dist_series": [[s, d] for s, d in zip(tr["step"], tr["min_dist"])],
        "mean_T_K": float(np.mean(temps[1:])) if len(temps) > 1 else float("nan"),
        "final_T_K": float(temps[-1]) if temps else float("nan"),
        "epot_min_eV_atom": float(min(tr["epot"])) if tr["epot"] else float("nan"),
        "training_epot_min_eV_atom": emin,
        "nve_steps": nve_steps if nve is not None else 0,
        "nve_drift_eV_atom": float(nve[-1] - nve[0]) if nve is not None else None,
        "nve_max_dev_eV_atom": float(np.abs(nve - nve[0]).max()) if nve is not None else None,
        "max_force_deviation": float(max(tr["fdev"])) if (committee and tr["fdev"]) else None,
        "max_gpr_sigma_eV": float(max(gs)) if gs else None,
        "below_training_pairs": below,
        "failed_frames_file": str(fail_path) if fail_path else None,
        "pdf_png": str(pdf_path) if pdf.nframes else None,
        "ensemble": tr["ensemble"],
        "volume_ratio_range": ([min(vols) / vols[0], max(vols) / vols[0]] if (vols := [v for v in tr["volume"]
                                                                                      if v is not None]) else None),
        # NPT: the equilibrium volume per atom, the mean over the run's second half
        "volume_per_atom_second_half_A3": (float(np.mean(vols[len(vols) // 2:])) / n
                                           if vols and tr["ensemble"] != "nvt" else None),
        "wall_s": tr["wall_s"],
    }


def format_table(runs: list[dict], committee: bool = False, gpr: bool = False) -> str:
    head = (f"{'T (K)':>8} {'frames':>7} {'failed':>7} {'fail ratio':>10} {'d_min (A)':>10} "
            f"{'final T (K)':>11} {'NVE drift (eV/atom)':>20}")
    if committee:
        head += f" {'max dF (eV/A)':>14}"
    if gpr:
        head += f" {'max GPR sigma (eV)':>19}"
    head += "  verdict"
    lines = [head, "-" * len(head)]
    for r in runs:
        drift = "n/a" if r["nve_drift_eV_atom"] is None else f"{r['nve_drift_eV_atom']:.2e}"
        line = (f"{r['temperature_K']:8.0f} {r['frames']:7d} {r['failed_frames']:7d} "
                f"{r['failure_ratio']:10.3f} {r['min_dist_A']:10.3f} {r['final_T_K']:11.0f} {drift:>20}")
        if committee:
            fd = r["max_force_deviation"]
            line += f" {('n/a' if fd is None else f'{fd:.4f}'):>14}"
        if gpr:
            g = r.get("max_gpr_sigma_eV")
            line += f" {('n/a' if g is None else f'{g:.4f}'):>19}"
        lines.append(line + "  " + r["verdict"])
    return "\n".join(lines)


def summary_line(runs: list[dict]) -> str:
    """One line for batch scripts: 'md-check result: stable|unstable|aborted|interrupted (...)';
    'interrupted' whenever a stop request left a run unfinished or not run, whatever the others said."""
    n = len(runs)
    cut = [r for r in runs if r.get("status", "done") == "interrupted"]
    not_run = [r for r in runs if r.get("status", "done") == "not run"]
    done = [r for r in runs if r.get("status", "done") == "done"]
    ab = [r for r in done if r["aborted"]]
    un = [r for r in done if not r["aborted"] and not r["stable"]]
    word = ("interrupted" if cut or not_run else
            "stable" if not ab and not un else ("aborted" if ab and not un else "unstable"))
    bad = sorted(ab + un, key=lambda r: r["temperature_K"])
    first = ""
    if bad:
        r = bad[0]
        what = (f"{r['events'][0]['criterion']} at {r['events'][0]['t_fs']:g} fs" if r["events"] and not r["aborted"]
                else r["verdict"].split(" (before")[0])
        first = f"; first: T={r['temperature_K']:g} K {what}"
    counts = f"{n} runs: {len(done) - len(ab) - len(un)} stable, {len(un)} unstable, {len(ab)} aborted"
    if cut or not_run:
        counts += f", {len(cut)} interrupted, {len(not_run)} not run"
        r = (cut or not_run)[0]
        first += f"; T={r['temperature_K']:g} K {r['verdict'].split(' (not judged')[0]}"
    return f"md-check result: {word} ({counts}{first})"


def unfinished_run(T: float, steps: int, timestep: float, ensemble: str, status: str, verdict: str) -> dict:
    """The summary of a run that a stop left without frames (``status`` 'not run', or
    'interrupted' by Ctrl-C, whose trajectory is lost): run_one's fields, nothing measured, and a
    ``verdict`` that says why there is none."""
    nan = float("nan")
    return {"temperature_K": T, "steps": steps, "steps_done": 0, "timestep_fs": timestep, "verdict": verdict,
            "stable": False, "aborted": False, "events": [], "status": status, "frames": 0, "failed_frames": 0,
            "failure_ratio": 0.0, "min_dist_A": nan, "min_dist_first_A": nan, "min_dist_series": [],
            "mean_T_K": nan, "final_T_K": nan, "epot_min_eV_atom": nan, "training_epot_min_eV_atom": None,
            "nve_steps": 0, "nve_drift_eV_atom": None, "nve_max_dev_eV_atom": None, "max_force_deviation": None,
            "max_gpr_sigma_eV": None, "below_training_pairs": {}, "failed_frames_file": None, "pdf_png": None,
            "ensemble": ensemble, "volume_ratio_range": None, "volume_per_atom_second_half_A3": None, "wall_s": 0.0}


def _read_structure(structure):
    from ase.io import read

    if isinstance(structure, (str, Path)):
        spath = Path(structure)
        if not spath.is_file():
            raise InputError(f"md-check: structure file {spath} does not exist")
        try:
            return read(str(spath), parallel=False)
        except Exception as exc:
            raise InputError(f"md-check: cannot read structure {spath}: {type(exc).__name__}: {exc}") from None
    return structure.copy()


def record_from_data(paths, species, cutoff: float) -> dict:
    """Training-data record (models/data_record.py) of whole data sets (``--training-data``)."""
    from ..data.h5store import H5Dataset
    from ..models.data_record import dataset_record

    ds = H5Dataset(paths)
    return dataset_record(ds, np.arange(ds.n_structures), list(species) if species else list(ds.species), cutoff)


def md_check(model_paths, structure, temperatures=(300.0, 1500.0), steps=2000, timestep=1.0, friction=0.02,
             threshold_factor=0.6, interval=10, nve_steps=200, rdf_rmax=6.0, seed=0, output="md_check",
             device="cpu", max_failed_frames=200, label="", criteria: Criteria | None = None,
             training_data=None, gpr_data=None, ensemble: Ensemble | None = None, ctx=None,
             fresh: bool = False) -> dict:
    """Python entry point of ``distmlip md-check`` (returns the summary dict).

    A run that finished ('done') in ``output``/summary.json of an earlier check whose identity
    (:func:`run_identity`: the models' and the structure's content, every setting that shapes a
    run, the training record, the GPR data's content, the version) equals this one's, at the same
    position in the temperature list (its seed), is reused, not rerun; ``fresh`` reruns all.

    ``ctx``: a context (``distributed.DistContext``; the command's: a world of one) whose
    ``stop_requested()`` is asked every MD step; a stop ends the MD there, the summary is written
    with the runs that finished, the one cut short ('interrupted') and the temperatures not run,
    and ``summary['stop']`` says so (None without a stop).  Ctrl-C writes the same report (the run
    it cut short: 'interrupted', nothing of it kept) and raises KeyboardInterrupt again."""
    from .labelling import is_calculator_name, make_calculator

    crit = criteria or Criteria(threshold_factor=threshold_factor)
    crit.threshold_factor = threshold_factor
    if steps < 0 or timestep <= 0 or interval <= 0 or threshold_factor <= 0:
        raise InputError("md-check: --steps must be >= 0, --timestep, --interval and --threshold-factor > 0")
    if not crit.max_volume_change > 0:
        raise InputError(f"md-check: --max-volume-change must be > 0, got {crit.max_volume_change}")
    if not 0 <= crit.extrapolation_factor < 1:
        raise InputError(f"md-check: --extrapolation-factor must be in [0, 1), got {crit.extrapolation_factor}")
    from ..utils.io import check_writable
    check_writable(output)          # before the MD, not after it
    atoms = _read_structure(structure)
    if len(atoms) < 2:
        # the thermostat's velocities have the centre of mass removed: one atom has no degree of
        # freedom left and its temperature is 0 / 0 (the run 'aborted' on a NaN energy)
        raise InputError(f"md-check: structure {structure} has {len(atoms)} atom(s); MD with the centre of mass "
                         f"fixed needs at least 2 (for a crystal give a supercell, e.g. ase.build.bulk(...)"
                         f".repeat(3))")
    ensemble = ensemble or Ensemble()
    ensemble.check(atoms, f"md-check: structure {structure}")
    model_paths = [str(p) for p in model_paths]
    record = None
    if len(model_paths) == 1 and is_calculator_name(model_paths[0]):
        calc = make_calculator(model_paths[0])
        models, kind = [], model_paths[0]
        cutoff = 6.0
    else:
        models = load_committee(model_paths, device=device)
        missing = sorted({s for s in atoms.get_chemical_symbols() if any(s not in m.species for m in models)})
        if missing:
            raise InputError(f"md-check: structure {structure}: field 'numbers': elements {missing} are not "
                             f"in the model species {models[0].species}")
        calc = CommitteeCalculator(models, device=device, with_stress=ensemble.kind != "nvt")
        kind = f"{len(models)} model(s)"
        record = getattr(models[0], "training_record", None)
        cutoff = max(float(m.cutoff) for m in models)
    if training_data:
        record = record_from_data(training_data, models[0].species if models else None, cutoff)
    if record is None and models:
        warn("md-check: the model file has no training-data record (trained before it was stored): the "
             "energy-below-training and beyond-training criteria and the shortest-distance warning are off; "
             "give --training-data H5")
    uncertainty = None
    if gpr_data:
        from .gpr_uncertainty import GPRSigma

        uncertainty = GPRSigma(gpr_data, atoms, seed=seed).sigma
    committee = len(models) > 1
    thresholds = threshold_matrix(atoms.numbers, threshold_factor)
    out = Path(output)
    log(f"md-check: {kind}, {len(atoms)} atoms, temperatures {list(temperatures)} K, "
        f"{steps} steps x {timestep} fs, "
        + (f"Langevin friction {friction} 1/fs" if ensemble.kind == "nvt" else
           f"{ensemble.kind} at {ensemble.pressure_gpa:g} GPa (thermostat {1.0 / friction if friction > 0 else 100 * timestep:g}"
           f" fs, barostat {ensemble.barostat_fs:g} fs)")
        + "; unstable on: close pairs "
        f"(< {threshold_factor} x covalent-radius sum), temperature outside +-{crit.temperature_band:g} T, "
        f"E_pot {crit.energy_margin:g} eV/atom below training, pairs < {crit.extrapolation_factor:g} x the "
        f"training minimum" + ("" if record else " (no record: both off)")
        + f", NVE drift > {crit.max_nve_drift:g} eV/atom"
        + (f", committee deviation > {crit.max_force_deviation:g} eV/A" if committee else "")
        + (f", GPR sigma > {crit.max_gpr_sigma:g} eV" if uncertainty else "")
        + (f", cell volume outside V0 (1 +- {crit.max_volume_change:g})" if ensemble.kind != "nvt" else ""))
    settings = dict(steps=steps, timestep=timestep, friction=friction, threshold_factor=threshold_factor,
                    interval=interval, nve_steps=nve_steps, rdf_rmax=rdf_rmax, seed=seed, device=str(device),
                    max_failed_frames=max_failed_frames, label=label, criteria=asdict(crit),
                    ensemble=asdict(ensemble))
    identity = run_identity(model_paths, atoms, settings, record, gpr_data)
    reuse = {} if fresh else finished_runs(out, identity, temperatures)
    runs = []

    def _unfinished(k, status, reason):
        T = float(temperatures[k])
        verdict = (f"interrupted: {reason} (its trajectory is not kept)" if status == "interrupted" else
                   f"not run: {reason} before it started")
        return unfinished_run(T, steps, timestep, ensemble.kind, status, verdict)

    try:
        for k, T in enumerate(temperatures):
            if ctx is not None and ctx.stop_requested():
                runs.extend(_unfinished(j, "not run", ctx.stop_reason()) for j in range(k, len(temperatures)))
                break
            if k in reuse:
                r = reuse[k]
                log(f"{label}T={float(T):g} K: reused, finished by an earlier md-check with the same models, "
                    f"structure and settings ({out / 'summary.json'}; --fresh reruns it): {r['verdict']}")
                runs.append(r)
                continue
            runs.append(run_one(atoms, calc, float(T), steps, timestep, friction, thresholds, interval, nve_steps,
                                rdf_rmax, seed + 1000 * k, out, max_failed_frames, label=label, crit=crit,
                                record=record, uncertainty=uncertainty, committee=committee, ensemble=ensemble,
                                stop=ctx))
    except KeyboardInterrupt:
        k = len(runs)
        if k < len(temperatures):
            runs.append(_unfinished(k, "interrupted", "SIGINT (Ctrl-C)"))
            runs.extend(_unfinished(j, "not run", "SIGINT (Ctrl-C)") for j in range(k + 1, len(temperatures)))
        _write_summary(out, model_paths, structure, atoms, models, threshold_factor, ensemble, crit, thresholds,
                       record, runs, "SIGINT (Ctrl-C)", identity)
        log(summary_line(runs))
        log(f"md-check: interrupted; {out / 'summary.json'} holds the runs that finished")
        raise
    stop = ctx.stop_reason() if ctx is not None and any(r["status"] != "done" for r in runs) else None
    summary = _write_summary(out, model_paths, structure, atoms, models, threshold_factor, ensemble, crit,
                             thresholds, record, runs, stop, identity)
    summary["_committee"] = committee
    summary["_gpr"] = uncertainty is not None
    return summary


def run_identity(model_paths, atoms, settings: dict, record, gpr_data) -> str:
    """What a run's result depends on, as a digest: the models' files (or calculator names), the
    starting structure (numbers, positions, cell, periodicity, momenta), ``settings`` (every
    option that shapes a run), the training-data record, the GPR data's content and the version.
    By content, not by file name or time: a model retrained into the same path is another model."""
    import hashlib

    from .. import __version__
    from ..data.h5store import file_content_hash
    from ..utils.io import json_text
    from .labelling import is_calculator_name

    h = hashlib.sha256()
    for path in model_paths:
        h.update(path.encode() if is_calculator_name(path) else hashlib.sha256(Path(path).read_bytes()).digest())
    for a in (atoms.numbers, atoms.positions, np.asarray(atoms.cell), atoms.pbc,
              atoms.get_momenta() if atoms.has("momenta") else np.zeros(0)):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(json_text({"settings": settings, "record": record, "version": __version__,
                        "gpr_data": [file_content_hash(q) for q in (gpr_data or [])]}, sort_keys=True,
                       default=str).encode())
    return h.hexdigest()


def finished_runs(out: Path, identity: str, temperatures) -> dict:
    """{position in ``temperatures``: run} of the runs that finished in ``out``/summary.json of an
    earlier check with this ``identity`` at the same temperature and position (the position sets
    the run's seed).  Another identity, or no readable summary: nothing (said when there was one)."""
    import json

    path = Path(out) / "summary.json"
    if not path.is_file():
        return {}
    try:
        prev = json.loads(path.read_text())
        same = prev.get("identity") == identity
        runs = prev["runs"] if same else []
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        warn(f"md-check: {path} cannot be read ({type(exc).__name__}: {exc}); every temperature runs anew")
        return {}
    if not same:
        log(f"md-check: {path} is from other models, structure, settings or version: every temperature runs anew")
        return {}
    keep = {k: r for k, (T, r) in enumerate(zip(temperatures, runs))
            if isinstance(r, dict) and r.get("status") == "done" and r.get("temperature_K") == float(T)}
    for r in keep.values():      # summary.json writes a non-finite figure as null
        for key in ("min_dist_A", "min_dist_first_A", "mean_T_K", "final_T_K", "epot_min_eV_atom"):
            if r.get(key) is None:
                r[key] = float("nan")
    return keep


def _write_summary(out: Path, model_paths, structure, atoms, models, threshold_factor, ensemble, crit, thresholds,
                   record, runs, stop, identity=None) -> dict:
    """summary.json of md_check: ``stop`` the reason of a stop request that left runs unfinished;
    ``identity``: :func:`run_identity`, which lets a later check reuse the finished runs."""
    from ase.data import chemical_symbols

    summary = {"models": model_paths, "structure": str(structure), "n_atoms": len(atoms),
               "identity": identity,
               "committee_size": len(models), "threshold_factor": threshold_factor,
               "ensemble": asdict(ensemble),
               "criteria": asdict(crit),
               "thresholds_A": {f"{chemical_symbols[a]}-{chemical_symbols[b]}": v
                                for (a, b), v in thresholds.items() if a <= b},
               "training_record": record,
               "energy_drift": "total energy per atom change over an NVE (velocity Verlet) continuation "
                               "of nve_steps from the final NVT state",
               "runs": runs, "result": summary_line(runs),
               "all_stable": all(r["stable"] for r in runs),
               # a stop request: the check is incomplete (the runs' "status": done, interrupted, not run)
               "stop": None if stop is None else {
                   "reason": stop,
                   "finished_K": [r["temperature_K"] for r in runs if r["status"] == "done"],
                   "interrupted_K": [r["temperature_K"] for r in runs if r["status"] == "interrupted"],
                   "not_run_K": [r["temperature_K"] for r in runs if r["status"] == "not run"]}}
    from ..utils.io import atomic_write_text, json_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.json", json_text(summary, indent=1))
    return summary


def run(args) -> int:
    from ..distributed import install_stop_handlers
    from ..distributed.context import DistContext

    if len(args.paths) < 2:
        raise InputError("md-check: give at least one MODEL file (or ase:NAME) and a STRUCTURE file")
    install_stop_handlers()
    # a world of one (md-check runs in one process; under mpirun on rank 0 only): its stop check
    # reads this process's stop flag and stop file
    ctx = DistContext()
    crit = Criteria(threshold_factor=args.threshold_factor, temperature_band=args.temperature_band,
                    temperature_window_fs=args.temperature_window, energy_margin=args.energy_margin,
                    max_nve_drift=args.max_nve_drift, max_force_deviation=args.max_force_deviation,
                    max_gpr_sigma=args.max_gpr_sigma, max_volume_change=args.max_volume_change,
                    extrapolation_factor=args.extrapolation_factor)
    if args.output is None:
        # one folder per model: every check without -o shared md_check/, each replacing the
        # report of the one before (sweep 20)
        from .evaluate import default_output

        args.output = str(default_output(args.paths[0], "md_check"))
    summary = md_check(args.paths[:-1], args.paths[-1], args.temperatures, args.steps, args.timestep,
                       args.friction, args.threshold_factor, args.interval, args.nve_steps, args.rdf_rmax,
                       args.seed, args.output, args.device, args.max_failed_frames, criteria=crit,
                       training_data=args.training_data, gpr_data=args.gpr_data,
                       ensemble=Ensemble(args.ensemble, args.pressure, args.barostat_time), ctx=ctx,
                       fresh=args.fresh)
    log(format_table(summary["runs"], committee=summary["_committee"], gpr=summary["_gpr"]))
    log(f"summary written to {Path(args.output) / 'summary.json'}")
    log(summary["result"])
    stop = summary["stop"]
    if stop is not None:
        # never exit as a check that passed, --report-only or not: the verdicts are incomplete
        code = ctx.stop_exit_status()
        fin = ", ".join(f"{t:g}" for t in stop["finished_K"])
        left = [f"{t:g} K interrupted" for t in stop["interrupted_K"]] + [f"{t:g} K not run" for t in stop["not_run_K"]]
        log(f"md-check: stopped by {stop['reason']}: the check is incomplete ({', '.join(left)}); "
            + (f"the verdicts of the runs that finished ({fin} K) are in {Path(args.output) / 'summary.json'}; "
               if fin else "no run finished; ")
            + f"run the same command again to finish the check (the finished runs are reused; exit status {code})")
        return code
    if summary["all_stable"] or args.report_only:
        return 0
    return EXIT_UNSTABLE
