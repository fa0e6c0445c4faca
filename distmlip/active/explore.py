"""``distmlip explore CONFIG.yaml``: active learning until MD with the potential survives.

One iteration (folder ``OUTPUT/iter_XXX``):

1. **MD** at the current rung of the temperature ladder (``md.temperatures``: a list of rungs,
   each a temperature or a list of them): one Langevin trajectory per (starting structure,
   temperature, replica), spread over the ranks of ``mpirun`` (task t on rank t mod size),
   driven by the current committee (mean forces) or model.  Every analysed frame gets the
   uncertainty (``committee``: max over atoms of the members' force deviation, eV/A; ``gpr``: the
   GPR energy standard deviation of the GPR-ANN's GPR on the start's atom sequence, eV) and the
   geometry check of md-check (a pair < ``md.threshold_factor`` x covalent-radius sum = failed).
   Each task writes ``md/task_XXX.{json,extxyz,npz}``; its seed depends on (seed, iteration,
   task) only, so the frames do not depend on the number of ranks.
2. **Verdict**: failure ratio (failed frames, the frames not run after a failure included, over
   all frames) and flagged fraction (frames above ``uncertainty.threshold``).  When both are at
   or below ``targets``, the rung is converged: the next iteration climbs to the next rung, or
   exploration ends after the last one.
3. **Selection** (rank 0): the pool is every flagged or failed frame that is still physical (no
   pair below ``select.label_min_factor`` x covalent-radius sum: DFT cannot label a fused pair)
   plus the last ``select.pre_failure_frames`` frames before each failure (the way into the
   unphysical region, which is what the potential must learn to repel); farthest-point sampling
   on the descriptors (per-element means of the model's normalised descriptor) picks up to
   ``select.max_per_iteration`` frames, starting from the most uncertain one, and stops early
   when the farthest remaining frame is closer than ``select.fps_min_distance``.  Written to
   ``candidates.extxyz`` with their uncertainty, temperature, time and minimum distance: the
   input of the user's DFT.
4. **Labels**: ``label_with`` (``ase:EMT`` or any importable ASE calculator, over the ranks)
   labels the candidates into ``labelled.extxyz``; without it, explore stops and asks for the
   labelled file (``distmlip explore CONFIG --labelled dft.extxyz`` continues).  The labeller's
   frames are kept one by one (``labels_partial/``): a rerun after a failure or a stop labels only
   the missing frames.  When fewer than
   ``select.min_new`` frames were selected the model is not updated.
5. **Retrain**: ``distmlip convert`` of the labels into ``new.h5``, appended to the training data
   of ``train_config``; every member warm-starts from the current one (``training.warm_start``;
   member k of a committee from member k), with the ``retrain`` overrides, into ``train/``.
   ``--labelled`` files of other content than new.h5 was converted from (``labels.json``)
   replace it, and this retraining starts from scratch.
6. **Test** (``test_data``): energy and force MAE of the model that ran this iteration's MD.

Every stage writes its result atomically and is skipped when it exists, so a killed run
continues where it stopped (``distmlip explore CONFIG`` again; training continues from its
checkpoint).  A stop request (SIGTERM, SIGUSR1) during the MD ends it within a few steps on every
rank, not after the iteration's last trajectory (a batch system's grace period is shorter): the
finished tasks are kept, a trajectory cut short is not written and runs again whole on the rerun,
which therefore gives the uninterrupted run's frames.  The table (``OUTPUT/table.txt``,
``table.json``) has one row per iteration, like the exploration tables of Yan, Fan and Zhu
(NEP-ZBL, Table S2).

Example (see docs/robustness.md)::

    model: run/committee.pt            # a committee (or one GPR-ANN model with uncertainty.kind: gpr)
    train_config: train.yaml           # how it was trained: data.train are the initial data
    structures: [start.extxyz]
    output: explore
    iterations: 8
    label_with: ase:EMT                # omit on a cluster: label candidates.extxyz with DFT
    md: {temperatures: [300, 600, 1000], steps: 2000, timestep: 1.0, interval: 10}
    uncertainty: {kind: committee, threshold: 0.2}
    select: {max_per_iteration: 20, min_new: 1}
    targets: {failure_ratio: 0.0, flagged_fraction: 0.02}
    retrain: {training.epochs: 100}
    test_data: [test.h5]
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np

from ..config import bounds, paths
from ..distributed.liveness import Heartbeat
from ..errors import ConfigError, InputError
from ..gpr.augment import GPRSettings
from ..utils.io import atomic_path, atomic_write_text, json_text
from ..utils.log import log, warn


# ------------------------------------------------------------------------------ configuration
@dataclass
class ExploreMD:
    temperatures: list[Union[float, list[float]]] = field(default_factory=lambda: [300.0, 600.0, 1000.0],
                                                           metadata=bounds(ge=0.0))
    steps: int = field(default=2000, metadata=bounds(ge=1))
    timestep: float = field(default=1.0, metadata=bounds(gt=0.0))            # fs
    friction: float = field(default=0.02, metadata=bounds(gt=0.0))           # 1/fs (Langevin)
    interval: int = field(default=10, metadata=bounds(ge=1))                 # analyse every N-th step
    replicas: int = field(default=1, metadata=bounds(ge=1))                  # trajectories per (structure, T)
    threshold_factor: float = field(default=0.6, metadata=bounds(gt=0.0))    # failed: a pair below this x r_cov sum
    stop_on_failure: bool = True        # end a trajectory at its first failed frame
    seed: int = field(default=0, metadata=bounds(ge=0))

    def validate(self):
        if not self.temperatures:
            raise ConfigError("md.temperatures: give at least one temperature (rung)")
        for t in self.temperatures:
            for x in (t if isinstance(t, list) else [t]):
                if not x >= 0.0:
                    raise ConfigError(f"md.temperatures: {x} must be >= 0")
            if isinstance(t, list) and not t:
                raise ConfigError("md.temperatures: an empty rung")


@dataclass
class ExploreUncertainty:
    kind: Literal["auto", "committee", "gpr"] = "auto"   # auto: committee for K > 1, else gpr
    # committee: eV/A (max atomic force deviation); gpr: eV (energy sigma)
    threshold: float = field(default=0.2, metadata=bounds(gt=0.0))
    gpr_data: Optional[list[str]] = field(default=None, metadata=paths("in"))   # GPR training data (default: train_config's data.train)
    gpr_max_structures: int = field(default=400, metadata=bounds(ge=2))   # per GPR at most (seeded subsample)
    gpr: GPRSettings = field(default_factory=GPRSettings)


@dataclass
class ExploreSelect:
    max_per_iteration: int = field(default=20, metadata=bounds(ge=1))
    min_new: int = field(default=1, metadata=bounds(ge=1))                   # update only with this many frames
    fps_min_distance: float = field(default=0.0, metadata=bounds(ge=0.0))    # stop FPS below this distance
    include_failed: bool = False        # label failed frames too (those above label_min_factor)
    label_min_factor: float = field(default=0.4, metadata=bounds(ge=0.0))    # unlabelled below this x r_cov sum
    pre_failure_frames: int = field(default=3, metadata=bounds(ge=0))        # frames before a failure, always


@dataclass
class ExploreTargets:
    # converged when the failure ratio is at most this and at most this share of frames is
    # above the uncertainty threshold
    failure_ratio: float = field(default=0.0, metadata=bounds(ge=0.0, le=1.0))
    flagged_fraction: float = field(default=0.02, metadata=bounds(ge=0.0, le=1.0))


@dataclass
class ExploreConfig:
    model: str = field(default="", metadata=paths("in"))                     # model or committee file to start from
    train_config: str = field(default="", metadata=paths("in"))              # the training configuration of that model (data.train: initial data)
    structures: list[str] = field(default_factory=list, metadata=paths("in"))   # starting structures (every frame of each file)
    output: str = field(default="explore", metadata=paths("out"))
    iterations: int = field(default=5, metadata=bounds(ge=1))
    label_with: Optional[str] = None    # ase:EMT, package.module:Class; None: stop for external labels
    label_kwargs: dict[str, Any] = field(default_factory=dict)
    # refuse labels whose forces (or absolute energies per atom) are a unit factor or a sign away
    # from the model's predictions of the same frames (Explorer.check_label_units); off: trust them
    check_label_units: bool = True
    retrain: dict[str, Any] = field(default_factory=dict)    # overrides of train_config, e.g. training.epochs: 50
    # before each warm start, refit the normalisation on all data keeping the model's energies
    # (the old energy scale can cap what the networks reach; models/ann.py)
    refit_normalization: bool = True
    test_data: Optional[list[str]] = field(default=None, metadata=paths("in"))
    device: str = "cpu"
    md: ExploreMD = field(default_factory=ExploreMD)
    uncertainty: ExploreUncertainty = field(default_factory=ExploreUncertainty)
    select: ExploreSelect = field(default_factory=ExploreSelect)
    targets: ExploreTargets = field(default_factory=ExploreTargets)

    def validate(self):
        if not self.model:
            raise ConfigError("explore: 'model' (the model or committee file to start from) is required")
        if not self.train_config:
            raise ConfigError("explore: 'train_config' (the training configuration) is required")
        if not self.structures:
            raise ConfigError("explore: 'structures' (starting structures for MD) is required")

    def rungs(self) -> list[list[float]]:
        return [[float(t)] if not isinstance(t, list) else [float(x) for x in t] for t in self.md.temperatures]


def add_arguments(p) -> None:
    p.add_argument("config", help="YAML exploration configuration (see docs/robustness.md)")
    p.add_argument("--label-with", metavar="CALC", help="label candidates with an ASE calculator: ase:EMT, "
                                                        "package.module:Class (overrides label_with)")
    p.add_argument("--label-kwargs", metavar="JSON", help="keyword arguments of the calculator as a JSON object")
    p.add_argument("--labelled", nargs="+", metavar="FILE",
                   help="labelled candidates of the iteration waiting for labels (any format 'distmlip convert' "
                        "reads: extxyz with energies and forces, XSF, VASP outputs, ...)")
    p.add_argument("--iterations", type=int, help="number of iterations (overrides the configuration)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a configuration value, e.g. --set md.steps=500 (repeatable)")


def load_explore_config(path, overrides=None) -> ExploreConfig:
    from ..config import load_config

    cfg = load_config(path, ExploreConfig, overrides)
    # relative paths are relative to the working directory, as in every other configuration
    # (distmlip train's data paths too); the state file keeps them absolute
    cfg.model = _abs(cfg.model)
    cfg.train_config = _abs(cfg.train_config)
    cfg.structures = [_abs(s) for s in cfg.structures]
    cfg.output = _abs(cfg.output)
    if cfg.test_data:
        cfg.test_data = [_abs(s) for s in cfg.test_data]
    if cfg.uncertainty.gpr_data:
        cfg.uncertainty.gpr_data = [_abs(s) for s in cfg.uncertainty.gpr_data]
    return cfg


def _abs(p: str) -> str:
    return str(Path(p).absolute()) if p else p


# ------------------------------------------------------------------------------ helpers
def read_starts(paths) -> list:
    from ase.io import read

    out = []
    for p in paths:
        if not Path(p).is_file():
            raise InputError(f"explore: starting structure file {p} does not exist")
        try:
            frames = read(str(p), index=":", parallel=False)
        except Exception as exc:
            raise InputError(f"explore: cannot read {p}: {type(exc).__name__}: {exc}") from None
        for a in frames:
            a.calc = None
            out.append(a)
    return out


def frame_features(model, frames) -> np.ndarray:
    """[M, T * D] per-element means of the model's normalised descriptor (zeros for an absent
    element): a fixed-length fingerprint of a frame for farthest-point sampling."""
    import torch

    from ..data.structure import Structure
    from ..descriptors.batch import collate

    ann = model.ann
    T, D = len(model.species), ann.dim
    out = np.zeros((len(frames), T * D))
    for k, a in enumerate(frames):
        s = Structure(numbers=np.asarray(a.numbers), positions=np.asarray(a.positions, dtype=np.float64),
                      cell=np.array(a.cell[:], dtype=np.float64), pbc=np.asarray(a.pbc, dtype=bool))
        b = collate([s], species=model.species, cutoff=ann.cutoff, dtype=torch.float64)
        with torch.no_grad():
            G = ann.descriptors(b, model.plan()).to(torch.float64)
            x = ((G - ann.feature_mean.index_select(0, b.species)) / ann.feature_std.index_select(0, b.species))
        x = x.numpy()
        sp = b.species.numpy()
        for t in range(T):
            m = sp == t
            if m.any():
                out[k, t * D:(t + 1) * D] = x[m].mean(0)
    return out


def farthest_point_sampling(X: np.ndarray, first: int, n: int, min_distance: float = 0.0) -> list[int]:
    """Indices of up to ``n`` rows of ``X``: ``first``, then repeatedly the row farthest (Euclidean)
    from those chosen (ties: the lowest index); stops when that distance is below
    ``min_distance``.  Deterministic."""
    if len(X) == 0 or n <= 0:
        return []
    chosen = [int(first)]
    dist = np.linalg.norm(X - X[first], axis=1)
    while len(chosen) < min(n, len(X)):
        k = int(np.argmax(dist))
        if dist[k] <= 0.0 or dist[k] < min_distance:
            break
        chosen.append(k)
        dist = np.minimum(dist, np.linalg.norm(X - X[k], axis=1))
    return chosen


# a labelled frame is a candidate when its positions are this close (A): extxyz keeps 8 decimals,
# but VASP's OUTCAR prints positions with 5, so 1e-6 would refuse the labels of a real DFT run;
# MD frames analysed >= 1 step apart differ by far more
_LABEL_MATCH_A = 1e-4


def _same_frame(s, a) -> bool:
    """Structure ``s`` (a labelled frame) is the candidate Atoms ``a``: same numbers in the same
    order and positions within _LABEL_MATCH_A, folded into the cell along periodic directions."""
    if len(s.numbers) != len(a) or not np.array_equal(np.asarray(s.numbers), a.numbers):
        return False
    from ..data.structure import minimum_image

    # the project's exact minimum image: also slabs and wires whose non-periodic cell rows are zero
    d = minimum_image(np.asarray(s.positions, dtype=np.float64) - a.positions, np.array(a.cell[:], dtype=np.float64),
                      np.asarray(a.pbc, dtype=bool))
    return bool(np.abs(d).max(initial=0.0) <= _LABEL_MATCH_A)


def _load(path, device="cpu") -> list:
    from ..evaluation.mdcheck import load_committee

    return load_committee([path], device=device)


def _model_file(train_dir: Path) -> Path:
    c = train_dir / "committee.pt"
    return c if c.is_file() else train_dir / "model.pt"


# ------------------------------------------------------------------------------ explorer
# a retraining stopped inside explore continues with explore, not with `distmlip train`
_RESUME_EXPLORE = "the same 'distmlip explore' command"
# MD steps between the stop checks of the MD phase (at most; md.interval when smaller): a batch
# system's grace period after SIGTERM is often a minute or two, less than a trajectory takes,
# while each check is a collective that holds the ranks in step, so not every step
_MD_STOP_EVERY = 10


class Explorer:
    def __init__(self, cfg: ExploreConfig, ctx, labelled=None):
        from ..training.config import load_train_config

        self.cfg = cfg
        self.ctx = ctx
        self.out = Path(cfg.output)
        self.labelled = list(labelled or [])
        self.rank0 = ctx.rank == 0
        self.starts = read_starts(cfg.structures)
        self.tcfg0 = load_train_config(cfg.train_config, dict(cfg.retrain))
        self.base_data = [_abs(p) for p in self.tcfg0.data.train]
        if self.tcfg0.data.validation:
            self.tcfg0.data.validation = [_abs(p) for p in self.tcfg0.data.validation]
        models = _load(cfg.model, cfg.device)
        self.K = len(models)
        if self.tcfg0.committee.K != self.K:
            if self.tcfg0.committee.K == 1 and self.K > 1:
                self.tcfg0.committee.K = self.K
            else:
                raise ConfigError(f"explore: {cfg.model} has {self.K} member(s) but {cfg.train_config} trains "
                                  f"committee.K = {self.tcfg0.committee.K}")
        kind = cfg.uncertainty.kind
        if kind == "auto":
            kind = "committee" if self.K > 1 else "gpr"
        if kind == "committee" and self.K < 2:
            raise ConfigError(f"explore: uncertainty.kind committee needs a committee; {cfg.model} is one model "
                              f"(train with committee.K > 1, or use uncertainty.kind: gpr)")
        self.kind = kind
        for a in self.starts:
            missing = sorted({s for s in a.get_chemical_symbols() if s not in models[0].species})
            if missing:
                raise InputError(f"explore: starting structure has elements {missing} the model lacks "
                                 f"({models[0].species})")

    # ---------------------------------------------------------------- state
    def state_path(self) -> Path:
        return self.out / "state.json"

    def load_state(self) -> dict:
        p = self.state_path()
        if p.is_file():
            return json.loads(p.read_text())
        return {"iteration": 0, "rung": 0, "model": str(self.cfg.model), "members": None, "new_data": [],
                "rows": [], "finished": None}

    def save_state(self, st: dict) -> None:
        if self.rank0:
            atomic_write_text(self.state_path(), json.dumps(st, indent=1))
        self.sync()

    # ---------------------------------------------------------------- stages
    def tasks(self, rung: list[float]) -> list[dict]:
        t = []
        for s in range(len(self.starts)):
            for T in rung:
                for r in range(self.cfg.md.replicas):
                    t.append({"task": len(t), "structure": s, "T": float(T), "replica": r})
        return t

    def _uncertainty_fn(self, it: int, st: dict):
        """Per start structure: Atoms -> GPR sigma (kind gpr), else None."""
        if self.kind != "gpr":
            return {}
        from ..evaluation.gpr_uncertainty import GPRSigma

        data = (self.cfg.uncertainty.gpr_data or self.base_data) + list(st["new_data"])
        fns = {}
        for k, a in enumerate(self.starts):
            fns[k] = GPRSigma(data, a, settings=self.cfg.uncertainty.gpr, seed=self.cfg.md.seed,
                              max_structures=self.cfg.uncertainty.gpr_max_structures)
        return fns

    def run_md(self, it: int, itdir: Path, st: dict, models: list, rung: list[float]) -> list[dict] | None:
        """The iteration's MD tasks not done yet, over the ranks; returns every task's summary, or
        None when a stop was requested: the tasks that finished are kept (their json marks them
        done), a trajectory the stop cut short is discarded."""
        from ..evaluation.mdcheck import CommitteeCalculator, simulate, threshold_matrix

        md = self.cfg.md
        mddir = itdir / "md"
        if self.rank0:
            mddir.mkdir(parents=True, exist_ok=True)
        self.sync()
        tasks = self.tasks(rung)
        self._drop_changed_tasks(it, itdir, tasks)
        mine = [t for t in tasks if t["task"] % self.ctx.world_size == self.ctx.rank]
        todo = [t for t in mine if not (mddir / f"task_{t['task']:03d}.json").is_file()]
        gprs = self._uncertainty_fn(it, st) if todo else {}
        calc = CommitteeCalculator(models, device=self.cfg.device)
        # the ranks without tasks wait for the GPR fits here (sleeping, under the heartbeat), not in
        # the stop checks below, whose collectives have a deadline
        self.sync()
        stopped = False
        for t in todo:
            a0 = self.starts[t["structure"]]
            seed = int(np.random.SeedSequence([md.seed, it, t["task"]]).generate_state(1)[0])
            unc = gprs[t["structure"]].sigma if t["structure"] in gprs else None
            tr, _ = simulate(a0, calc, t["T"], md.steps, md.timestep, md.friction, md.interval, seed,
                             threshold_matrix(a0.numbers, md.threshold_factor), uncertainty=unc,
                             keep_frames=True, stop_on_failure=md.stop_on_failure, report=False,
                             stop_check=lambda: self._md_tick(busy=True)[0],
                             stop_every=min(md.interval, _MD_STOP_EVERY))
            if tr["interrupted"]:
                # the trajectory is cut short: nothing of it is written, the rerun runs it whole
                stopped = True
                break
            u = np.asarray(tr["gpr_sigma"] if self.kind == "gpr" else tr["fdev"], dtype=np.float64)
            frames = tr["frames"]
            for k, a in enumerate(frames):
                a.info.update({"task": t["task"], "structure": t["structure"], "temperature_K": t["T"],
                               "md_step": tr["step"][k], "time_fs": tr["t_fs"][k], "min_dist": tr["min_dist"][k],
                               "failed": bool(tr["failed"][k]), "uncertainty": float(u[k]),
                               "uncertainty_kind": self.kind, "iteration": it})
            X = frame_features(models[0], frames)
            n_frames = len(frames) + tr["n_missing"]
            summary = {**t, "seed": seed, "settings": self.task_settings(t), "frames": n_frames, "analysed": len(frames),
                       "failed": int(sum(tr["failed"])) + tr["n_missing"], "n_missing": tr["n_missing"],
                       "aborted": tr["aborted"], "stopped_on_failure": tr["stopped_on_failure"],
                       "flagged": int((u > self.cfg.uncertainty.threshold).sum()),
                       "max_uncertainty": float(u.max()) if len(u) else 0.0,
                       "min_dist_A": float(min(tr["min_dist"])) if tr["min_dist"] else float("nan"),
                       "first_failure_fs": (float(tr["t_fs"][int(np.argmax(tr["failed"]))]) if any(tr["failed"])
                                            else (tr["abort_t_fs"] if tr["aborted"] else None))}
            from ase.io import write

            with atomic_path(mddir / f"task_{t['task']:03d}.extxyz", suffix=".extxyz") as tmp:
                write(str(tmp), frames, format="extxyz", parallel=False)
            with atomic_path(mddir / f"task_{t['task']:03d}.npz", suffix=".npz") as tmp:
                np.savez(tmp, features=X, uncertainty=u)
            # the .json is written last: it marks the task done
            atomic_write_text(mddir / f"task_{t['task']:03d}.json", json_text(summary))
            log(f"  iteration {it} task {t['task']}: T={t['T']:g} K, structure {t['structure']}, "
                f"{summary['analysed']} frames, failed {summary['failed']}/{n_frames}, flagged "
                f"{summary['flagged']}, max {self.kind} uncertainty {summary['max_uncertainty']:.3f}",
                all_ranks=True)
        # a rank whose tasks are done keeps taking part in the checks until every rank's are
        while not stopped:
            stopped, busy = self._md_tick(busy=False)
            if not busy:
                break
        self.sync()
        if stopped:
            return None
        return [json.loads((mddir / f"task_{t['task']:03d}.json").read_text()) for t in tasks]

    def _md_tick(self, busy: bool) -> tuple[bool, bool]:
        """One stop check of the MD phase: (a stop was requested on any rank, any rank still runs
        MD).  Collective: the ranks run different tasks of different lengths, so each calls it
        between its pieces of MD steps (``busy``) and, once its tasks are done, in a loop until no
        rank is busy; the k-th call then gives every rank the same answer, and all of them stop at
        the same point (as the labelling's rounds do)."""
        import torch

        stop = self.ctx.stop_requested()
        b = self.ctx.all_reduce_max(torch.tensor([int(busy)], dtype=torch.int64))
        return stop, bool(b.item())

    def task_settings(self, t: dict) -> dict:
        """What an MD task's results depend on, by configuration key: stored in its json, so
        that a task is reused only while the configuration asks for the same run."""
        md, u = self.cfg.md, self.cfg.uncertainty
        return {"structure": t["structure"], "md.temperatures": t["T"], "replica": t["replica"],
                "md.steps": md.steps, "md.timestep": md.timestep, "md.friction": md.friction,
                "md.interval": md.interval, "md.threshold_factor": md.threshold_factor,
                "md.stop_on_failure": md.stop_on_failure, "md.seed": md.seed,
                "uncertainty.kind": self.kind, "uncertainty.threshold": u.threshold}

    def _drop_changed_tasks(self, it: int, itdir: Path, tasks: list[dict]) -> None:
        """Task results of this iteration that ran with other settings than the configuration's
        now (changed after a stop) were reused, and the table showed the new settings over the old
        trajectories (sweep 16).  Before the selection they are run again; after it, the candidates
        (and any labels the user is computing) come from the old MD, so the run is refused: the
        user restores the settings or removes the iteration."""
        mddir = itdir / "md"
        changed = []
        if self.rank0:
            for t in tasks:
                p = mddir / f"task_{t['task']:03d}.json"
                if not p.is_file():
                    continue
                old = json.loads(p.read_text())
                now = self.task_settings(t)
                was = old.get("settings")
                if was is None:    # written before settings were stored: what it does record
                    seed = int(np.random.SeedSequence([self.cfg.md.seed, it, t["task"]]).generate_state(1)[0])
                    was = {**now, "structure": old.get("structure"), "md.temperatures": old.get("T"),
                           "replica": old.get("replica")}
                    if old.get("seed") != seed:
                        was["md.seed"] = "another"
                diff = [(k, was.get(k), v) for k, v in now.items() if was.get(k) != v]
                if diff:
                    changed.append((t["task"], str(p), diff))
        sel = itdir / "selection.json"
        # the tasks the selection was made from must be the tasks now: a rung with a temperature
        # more or less keeps the matching tasks but the selection would not see the added ones, or
        # would keep frames of the removed ones
        ran = sorted(int(p.stem[5:]) for p in mddir.glob("task_*.json")) if self.rank0 else []
        changed, ran = self.ctx.broadcast_object((changed, ran))
        if sel.is_file() and not changed and ran != [t["task"] for t in tasks]:
            raise ConfigError(
                f"explore: {itdir.name}'s candidates ({sel}) were selected from the {len(ran)} MD task(s) in "
                f"{mddir}, the configuration now asks for {len(tasks)} (md.temperatures rung "
                f"{[t['T'] for t in tasks]}, md.replicas {self.cfg.md.replicas}, structures): restore those "
                f"settings to continue (labels of the candidates stay valid), or remove {itdir} to run "
                f"iteration {it} with the new ones")
        if not changed:
            return
        task, path, diff = changed[0]
        what = ", ".join(f"{k} {a} (now {b})" for k, a, b in diff)
        if sel.is_file():
            raise ConfigError(
                f"explore: {path} ran with {what}, and {len(changed) - 1} more task(s) of {itdir.name} with "
                f"other settings; {itdir.name}'s candidates ({sel}) were selected from that MD, so it is not "
                f"run again over them: restore those settings to continue (labels of the candidates stay "
                f"valid), or remove {itdir} to run iteration {it} with the new ones")
        for task, path, diff in changed:
            log(f"explore: {itdir.name} task {task} ran with "
                f"{', '.join(f'{k} {a} (now {b})' for k, a, b in diff)}: running it again")
            if self.rank0:
                Path(path).unlink()
        self.sync()

    def select(self, itdir: Path, summaries: list[dict]) -> dict:
        """Rank 0: the pool, farthest-point sampling, candidates.extxyz; returns selection.json."""
        from ase.io import read, write

        from ..evaluation.mdcheck import frame_distances, threshold_matrix

        sel_path = itdir / "selection.json"
        if sel_path.is_file():
            return json.loads(sel_path.read_text())
        sc = self.cfg.select
        thr = self.cfg.uncertainty.threshold
        frames, feats, unc, why = [], [], [], []
        for s in summaries:
            t = s["task"]
            fr = read(str(itdir / "md" / f"task_{t:03d}.extxyz"), index=":", parallel=False)
            z = np.load(itdir / "md" / f"task_{t:03d}.npz")
            failed = [bool(a.info.get("failed")) for a in fr]
            first = failed.index(True) if any(failed) else (len(fr) if s["aborted"] else None)
            pre = set(range(max(0, first - sc.pre_failure_frames), first)) if first is not None else set()
            label_thr = threshold_matrix(fr[0].numbers, sc.label_min_factor) if fr else {}
            tab = max(label_thr.values()) if label_thr else 0.0
            for k, a in enumerate(fr):
                reason = []
                if z["uncertainty"][k] > thr:
                    reason.append("uncertainty")
                if failed[k]:
                    reason.append("failed")
                if k in pre:
                    reason.append("before failure")
                if not reason:
                    continue
                if failed[k] and not sc.include_failed:    # unphysical: not for DFT (NEP-ZBL's practice)
                    continue
                if failed[k]:   # labelled only while physical: no pair below label_min_factor x r_cov sum
                    i, j, d = frame_distances(a, tab)
                    nums = a.numbers
                    if len(d) and any(d[m] < label_thr[(int(nums[i[m]]), int(nums[j[m]]))] for m in range(len(d))):
                        continue
                frames.append(a)
                feats.append(z["features"][k])
                unc.append(float(z["uncertainty"][k]))
                why.append("+".join(reason))
        n_pool = len(frames)
        chosen = []
        if n_pool:
            X = np.stack(feats)
            u = np.asarray(unc)
            # before-failure frames rank first (they matter most when uncertainty misses the collapse),
            # then the most uncertain
            score = u + np.array([1e6 if "before failure" in w else 0.0 for w in why])
            chosen = farthest_point_sampling(X, int(np.argmax(score)), sc.max_per_iteration, sc.fps_min_distance)
        out_frames = []
        for k in chosen:
            a = frames[k]
            a.info["selected_because"] = why[k]
            out_frames.append(a)
        cand = itdir / "candidates.extxyz"
        if out_frames:
            with atomic_path(cand, suffix=".extxyz") as tmp:
                write(str(tmp), out_frames, format="extxyz", parallel=False)
        sel = {"pool": n_pool, "selected": len(chosen),
               "candidates": str(cand) if out_frames else None,
               "chosen": [{"task": int(frames[k].info["task"]), "md_step": int(frames[k].info["md_step"]),
                           "uncertainty": unc[k], "why": why[k]} for k in chosen]}
        atomic_write_text(sel_path, json.dumps(sel, indent=1))
        return sel

    def label(self, itdir: Path, sel: dict) -> Path | str | None:
        """``labelled.extxyz`` from the labeller over the ranks, or the user's files; None when
        labels are missing (explore stops and says how to continue); "stopped" when a stop was
        requested between frames.  Each labelled frame is kept at once in ``labels_partial/``
        (keyed by the candidate's atoms and positions), so a killed or stopped run, or one whose
        labeller failed on some frames, labels only the frames still missing when rerun: with
        DFT, a frame is hours (sweep 16: one failing frame threw away every label of the
        iteration, and every rerun recomputed them all)."""
        import hashlib

        from ase.io import read, write

        out = itdir / "labelled.extxyz"
        if out.is_file():
            return out
        if self.labelled:
            return None
        if not self.cfg.label_with:
            return None
        frames = read(sel["candidates"], index=":", parallel=False)
        from ..evaluation.labelling import label as label_frames, stress_if_computed

        part = itdir / "labels_partial"
        part.mkdir(exist_ok=True)

        def key(a) -> str:
            return hashlib.blake2b(np.asarray(a.numbers, dtype=np.int64).tobytes()
                                   + np.asarray(a.positions, dtype=np.float64).tobytes(), digest_size=16).hexdigest()

        def kept(k: int):
            f = part / f"frame_{k:05d}.npz"
            try:
                with np.load(f) as z:
                    if str(z["key"]) == key(frames[k]):
                        return float(z["energy"]), np.array(z["forces"]), (np.array(z["stress"]) if "stress" in z else None)
            except (OSError, KeyError, ValueError):
                pass                     # absent, cut short or another candidate's: labelled again
            return None

        W, failed, stopped = self.ctx.world_size, [], False
        for r in range(-(-len(frames) // W)):        # rounds: every rank calls the stop check alike
            k = r * W + self.ctx.rank
            if k < len(frames) and kept(k) is None:
                try:
                    a = label_frames([frames[k]], self.cfg.label_with, self.cfg.label_kwargs)[0]
                    e, f, st = float(a.get_potential_energy()), np.asarray(a.get_forces()), stress_if_computed(a)
                    with atomic_path(part / f"frame_{k:05d}.npz", suffix=".npz") as tmp:
                        np.savez(tmp, key=key(frames[k]), energy=e, forces=f,
                                 **({} if st is None else {"stress": np.asarray(st)}))
                except Exception as exc:   # the labeller's error on one frame: the others go on
                    failed.append((k, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
            if self.ctx.stop_requested():
                stopped = True
                break
        failed = sorted(x for r in self.ctx.all_gather_object(failed) for x in r)
        if stopped:
            return "stopped"
        if failed:
            raise InputError(f"explore: {itdir.name}: labelling with {self.cfg.label_with} failed on {len(failed)} of "
                             f"{len(frames)} candidates (frames {[k for k, _ in failed]} of {sel['candidates']}; "
                             f"frame {failed[0][0]}: {failed[0][1]}); the labels of the other frames are kept in "
                             f"{part}: rerun the same command to label only the missing frames")
        if self.rank0:
            from ase.calculators.singlepoint import SinglePointCalculator

            outf = []
            for k, a in enumerate(frames):
                e, f, st = kept(k)
                b = a.copy()
                b.info.update(a.info)
                b.info["labelled_with"] = str(self.cfg.label_with)
                # the stress too, where the labeller computed one for a periodic cell: the
                # retraining's stress term (training.beta) needs it at the explored volumes
                b.calc = SinglePointCalculator(b, energy=e, forces=f, **({} if st is None else {"stress": st}))
                outf.append(b)
            with atomic_path(out, suffix=".extxyz") as tmp:
                write(str(tmp), outf, format="extxyz", parallel=False)
        self.sync()
        return out

    def check_labels(self, itdir: Path, sel: dict, inputs) -> int:
        """Every frame of the user's labelled files ``inputs`` must be a candidate of this
        iteration (``candidates.extxyz``): same atomic numbers in the same order, positions equal
        within ``_LABEL_MATCH_A`` after the periodic images are folded (a DFT code may wrap atoms into
        the cell), in any order, each candidate at most once.  Labels of another iteration, of another
        structure or a second copy were trained on silently (sweep 16: iteration 1's labels given to
        iteration 2 trained the committee twice on them and the real candidates were never
        labelled).  Candidates left unlabelled are only warned about: training on the labelled ones
        is sound.  Returns how many candidates were labelled."""
        from ..data.readers import iter_structures

        cand_path = sel["candidates"]
        err, n_lab, n_cand = None, 0, 0
        if self.rank0:
            from ase.io import read

            cands = read(cand_path, index=":", parallel=False)
            n_cand = len(cands)
            owner: dict[int, tuple[str, int]] = {}
            try:
                for s in iter_structures([str(p) for p in inputs]):
                    where = f"{s.source} frame {s.source_index}"
                    k = next((c for c, a in enumerate(cands) if _same_frame(s, a)), None)
                    if k is None:
                        err = (f"explore: --labelled {where} ({len(s.numbers)} atoms) is not a candidate of "
                               f"{itdir.name}: no frame of {cand_path} has its atomic numbers and positions "
                               f"(within {_LABEL_MATCH_A:g} A); label the frames of that file (labels of an "
                               f"earlier iteration are not its candidates); nothing was done")
                        break
                    if k in owner:
                        err = (f"explore: --labelled {where} labels candidate {k} of {cand_path} again (already "
                               f"labelled by {owner[k][0]} frame {owner[k][1]}); give each candidate once, "
                               f"nothing was done")
                        break
                    owner[k] = (s.source, s.source_index)
            except (InputError, OSError) as exc:     # every rank must hear of it, not wait
                err = f"explore: labelled files {[str(p) for p in inputs]}: {exc}"
            n_lab = len(owner)
        err, n_lab, n_cand = self.ctx.broadcast_object((err, n_lab, n_cand))
        if err:
            raise InputError(err)
        if n_lab < n_cand:
            warn(f"explore: {itdir.name}: {n_cand - n_lab} of the {n_cand} candidates of {cand_path} have no "
                 f"label in {', '.join(map(str, inputs))}; retraining on the {n_lab} labelled one(s)")
        return n_lab

    def check_label_units(self, inputs, model_file: str) -> None:
        """Refuse labels whose units or force sign differ from the model's: the model whose MD
        found the frames predicts them, and the labels' forces (per atom) and, where the model's
        energies lie on an absolute scale, energies per atom must be about those predictions, not a
        unit factor away (``data.validate.labels_against_model``).  Explore's few labels per iteration are too few for
        the data sets' own check (``unit_slope`` needs 30 partner pairs), and labels in Hartree/Bohr
        or kcal/mol trained into the next model silently.  Off with ``check_label_units: false``."""
        from ..data.readers import iter_structures
        from ..data.validate import labels_against_model
        from ..evaluation.calculator import DistmlipCalculator

        err = None
        if self.rank0:
            try:
                from ase import Atoms

                calc = DistmlipCalculator(_load(model_file, self.cfg.device), device=self.cfg.device)
                labels, preds = [], []
                for s in iter_structures([str(p) for p in inputs]):
                    a = Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
                    a.calc = calc
                    preds.append((float(a.get_potential_energy()), np.asarray(a.get_forces()), len(a)))
                    labels.append((float(s.energy), s.forces, len(a)))
                found = labels_against_model(labels, preds)
                bad = [u for u in found if u.suspect]
                if bad:
                    err = (f"explore: labelled files {', '.join(map(str, inputs))}, against {model_file}: "
                           f"{bad[0].describe()}  distmlip reads energies in eV and forces in eV/A: convert the labels "
                           f"(or, if they are right and the model is that wrong, set check_label_units: false); "
                           f"nothing was done")
                elif found:        # the model's error on what it explored: worth seeing each iteration
                    log("explore: labels / the model's predictions of the same frames: "
                        + ", ".join(f"{u.field} {u.ratio:.3g} x ({u.low:.3g}..{u.high:.3g}, {u.n})" for u in found))
            except (InputError, OSError) as exc:     # every rank must hear of it, not wait
                err = f"explore: labelled files {[str(p) for p in inputs]}: {exc}"
        err = self.ctx.broadcast_object(err)
        if err:
            raise InputError(err)

    def convert(self, itdir: Path, inputs) -> Path:
        """``new.h5`` of the labels ``inputs``; None: the new.h5 already there (an iteration
        stopped during its retraining continues on the labels it was given).  new.h5 is kept only
        when the inputs have the content it was converted from (``labels.json``: a digest of the
        files' bytes); other labels (corrected ones, or a new.h5 without that record) are converted
        again and the iteration's retraining starts from scratch, since its checkpoints and
        refitted warm starts were made from the old labels (sweep 14: they were kept silently)."""
        import shutil

        from ..data.convert import ConvertConfig, convert
        from ..data.readers import expand_inputs
        from ..gpr.store import file_digest

        out = itdir / "new.h5"
        rec = itdir / "labels.json"
        if inputs is None:
            self.sync()
            return out
        redo, err = None, None
        if self.rank0:
            try:
                files = expand_inputs([str(p) for p in inputs])
                digest = [file_digest(f) for f in files]
            except (InputError, OSError) as exc:     # every rank must hear of it, not wait
                err = f"explore: labelled files {[str(p) for p in inputs]}: {exc}"
            else:
                old = json.loads(rec.read_text()) if rec.is_file() and out.is_file() else None
                if old is None or old.get("digest") != digest:
                    redo = {"files": files, "digest": digest, "old": (old or {}).get("files"),
                            "stale": any(p.exists() for p in (out, itdir / "train", itdir / "warm"))}
        redo, err = self.ctx.broadcast_object((redo, err))
        if err:
            raise InputError(err)
        if redo is not None:
            if redo["stale"]:
                was = (f"{out.name} was converted from {', '.join(redo['old'])}" if redo["old"] else
                       f"no record of what {out.name} was converted from")
                log(f"explore: {itdir.name}: new labels {', '.join(redo['files'])} ({was}): converting them; "
                    f"the retraining of this iteration starts from scratch (its checkpoints learnt the old labels)")
            if self.rank0:
                # new.h5 first: a run killed in between asks for labels rather than reusing old ones
                rec.unlink(missing_ok=True)
                out.unlink(missing_ok=True)
                for d in ("train", "warm"):
                    shutil.rmtree(itdir / d, ignore_errors=True)
            self.sync()
            convert(ConvertConfig(inputs=[str(p) for p in inputs], output=str(out)))
            if self.rank0:
                atomic_write_text(rec, json_text({"files": redo["files"], "digest": redo["digest"]}, indent=1))
        self.sync()
        return out

    def retrain(self, itdir: Path, st: dict, new_data: list[str]) -> tuple[str, str]:
        """Warm-started training on the initial plus all new data; returns (status, model file)."""
        from ..training.committee import train_committee
        from ..training.trainer import Trainer

        cfg = copy.deepcopy(self.tcfg0)
        tdir = itdir / "train"
        cfg.data.train = list(self.base_data) + list(new_data)
        cfg.training.output = str(tdir)
        if cfg.descriptor.cache != "off":    # the data changed: the cache of this iteration lives here
            cfg.descriptor.cache_file = str(tdir / "train.desc.h5")
        warm = st["members"] if self.K > 1 else st["model"]
        if self.cfg.refit_normalization:
            warm = self.refit_warm_starts(itdir, cfg, warm)
        if self.K > 1:
            cfg.training.warm_start = warm
            status = train_committee(cfg, self.ctx, resume=True, resume_hint=_RESUME_EXPLORE)
            return status, str(tdir / "committee.pt")
        done = tdir / "done.json"
        if done.is_file():
            return json.loads(done.read_text())["status"], str(tdir / "model.pt")
        cfg.training.warm_start = warm
        ck = tdir / "checkpoint.pt"
        status = Trainer(cfg, self.ctx, resume=str(ck) if ck.is_file() else None,
                         log_prefix="  [retrain] ", resume_hint=_RESUME_EXPLORE).fit()
        if status != "stopped" and self.rank0:
            atomic_write_text(done, json.dumps({"status": status}))
        self.sync()
        return status, str(tdir / "model.pt")

    def refit_warm_starts(self, itdir: Path, cfg, warm: str) -> str:
        """Rank 0: every member (``warm``, a file or a '{k}' template) with its normalisation refit
        on the new training data, its energies kept (``itdir/warm/``); returns the new file or
        template."""
        import torch

        from ..data.h5store import H5Dataset
        from ..data.split import get_split, parse_split_patterns, split_from_patterns
        from ..descriptors.batch import collate
        from ..models.bpnn import BPNN

        wdir = itdir / "warm"
        names = [f"member_{k:02d}" for k in range(self.K)] if self.K > 1 else ["model"]
        target = str(wdir / ("member_{k:02d}" if self.K > 1 else "model") / "model.pt")
        if self.rank0 and not all((wdir / n / "model.pt").is_file() for n in names):
            ds = H5Dataset(cfg.data.train)
            if cfg.data.validation:
                idx = np.arange(ds.n_structures)
            else:
                dc = cfg.data
                split = (split_from_patterns(ds.column("source"), parse_split_patterns(dc.split_patterns))
                         if dc.split_patterns else
                         get_split(ds, dc.split_seed, tuple(dc.fractions), per_subset=dc.by_subset,
                                   use_stored=dc.use_stored_split))
                idx = np.flatnonzero(np.asarray(split) == 0)
            structures = ds.read(idx)
            for k, n in enumerate(names):
                src = warm.format(k=k) if self.K > 1 else warm
                m = BPNN.load(src)
                chunks = [structures[a:a + 64] for a in range(0, len(structures), 64)]
                batches = (collate(c, species=m.species, cutoff=m.cutoff, dtype=torch.float64) for c in chunks)
                mc = cfg.model
                summ = m.refit_normalization_keeping_function(batches, descriptor=mc.normalize_descriptor,
                                                              energy=mc.energy_shift, scale=mc.energy_scale)
                (wdir / n).mkdir(parents=True, exist_ok=True)
                m.save(wdir / n / "model.pt", metadata=dict(getattr(m, "metadata", {}) or {}))
                if k == 0:
                    log(f"  normalisation refit on {summ['n_structures']} structures (energies kept): energy "
                        f"scale {summ['energy_scale']:.4g} eV/atom")
        self.sync()
        return target

    def members_of(self, model_file: str, where: Path) -> str | None:
        """A committee's members as files (the warm start of member k is member k): the template
        '.../member_{k:02d}/model.pt' (committee outputs have them; a committee file from elsewhere
        is unpacked into ``where``)."""
        if self.K < 2:
            return None
        p = Path(model_file)
        if all((p.parent / f"member_{k:02d}" / "model.pt").is_file() for k in range(self.K)):
            return str(p.parent / "member_{k:02d}" / "model.pt")
        if self.rank0:
            from ..utils.io import atomic_torch_save, load_torch_file

            obj = load_torch_file(p, "model file")
            for k, m in enumerate(obj["members"]):
                d = where / f"member_{k:02d}"
                d.mkdir(parents=True, exist_ok=True)
                if not (d / "model.pt").is_file():
                    atomic_torch_save(m, d / "model.pt")
        self.sync()
        return str(where / "member_{k:02d}" / "model.pt")

    def test(self, model_file: str) -> dict:
        if not self.cfg.test_data or not self.rank0:
            return {}
        from ..data.h5store import H5Dataset
        from ..evaluation.metrics import metrics, predict

        models = _load(model_file, self.cfg.device)
        pred = predict(models, H5Dataset(self.cfg.test_data), forces=True, device=self.cfg.device)
        ov = metrics(pred)
        return {"test_E_mae_meV_atom": ov["E_mae_meV_atom"], "test_F_mae": ov.get("F_mae")}

    def sync(self) -> None:
        """Wait for every rank: sleeping (ranks that finished their MD tasks early do not spin a
        core), and watched by the run's heartbeat once it beats."""
        hb = getattr(self, "_hb", None)
        watch = None if hb is None or hb.stopped else hb.check
        self.ctx.barrier(sleep=True, watch=watch)

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict:
        """The loop, with the explore folder locked for this job: a second explore on the same
        folder removed the first's live retraining folders (sweep 16: its corrected --labelled
        restarted an iteration under the running job, which then finished on what was left)."""
        from ..utils.io import OutputLock

        lock, err = None, None
        if self.rank0:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                lock = OutputLock(self.out, what="explore folder", log=log).acquire()
            except Exception as exc:  # noqa: BLE001  (every rank must hear of it, not wait)
                err = (type(exc).__name__, str(exc))
        err = self.ctx.broadcast_object(err)
        if err is not None:
            from .. import errors as E

            raise getattr(E, err[0], E.DistmlipError)(err[1])
        try:
            return self._run()
        finally:
            if lock is not None:
                lock.release()

    def _run(self) -> dict:
        cfg = self.cfg
        self.ctx.barrier()
        # ranks run MD tasks and label frames of different lengths and wait for each other without a
        # deadline; a rank whose heartbeat stops (frozen, node lost) ends the wait
        with Heartbeat(self.out, self.ctx.rank, self.ctx.world_size, self.ctx.timeout_s,
                       hint="finished iterations are kept: rerun the same command to continue") as self._hb:
            st = self.load_state()
            if self.labelled and not st.get("waiting"):
                # labels are for the candidates of the iteration that asked for them; otherwise they
                # were kept for whichever iteration next needed labels, or ignored without a word
                # after the last one (sweep 14)
                last = self.out / f"iter_{st['iteration']:03d}" / "labels.json"
                was = (f"; iteration {st['iteration']} was trained on "
                       f"{', '.join(json.loads(last.read_text())['files'])}" if last.is_file() else "")
                raise InputError(f"explore: --labelled {' '.join(map(str, self.labelled))}: no iteration of "
                                 f"{self.out} is waiting for labels ({self.state_path()}: {st['iteration']} "
                                 f"iteration(s) finished{was}); labels of a finished iteration are not replaced, "
                                 f"nothing was done")
            if st["members"] is None and self.K > 1:
                st["members"] = self.members_of(st["model"], self.out / "initial")
            rungs = cfg.rungs()
            log(f"explore: {self.K} model(s) from {cfg.model}, uncertainty {self.kind} (threshold "
                f"{cfg.uncertainty.threshold:g} {'eV/A' if self.kind == 'committee' else 'eV'}), "
                f"{len(self.starts)} starting structure(s), temperature rungs {rungs}, {cfg.md.steps} x "
                f"{cfg.md.timestep:g} fs, on {self.ctx.world_size} rank(s); labels: "
                f"{cfg.label_with or ('files given' if self.labelled else 'external (DFT)')}")
            if st["finished"] == "iterations exhausted" and st["iteration"] < cfg.iterations:
                # a run that stopped on its iteration count continues when the count is raised
                # (sweep 8: it printed 'iterations exhausted' again and ran nothing)
                log(f"explore: continuing after iteration {st['iteration']} (iterations now {cfg.iterations})")
                st["finished"] = None
            if st["finished"] == "converged" and st["rows"]:
                # a rung added above the converged one reopens the run, as a raised iteration count
                # does (sweep 16: 'converged' again, the new rung never run); found by its
                # temperatures, since a rung inserted below shifts the indices
                done = st["rows"][-1]["temperatures_K"]
                k = next((i for i, r in enumerate(rungs) if list(dict.fromkeys(r)) == done), None)
                if k is not None and k + 1 < len(rungs):
                    if st["iteration"] < cfg.iterations:
                        log(f"explore: converged at {done} K; md.temperatures now goes on: continuing at rung "
                            f"{k + 2} {rungs[k + 1]} K")
                        st["rung"], st["finished"] = k + 1, None
                    else:
                        log(f"explore: md.temperatures has rung(s) above the converged {done} K; raise iterations "
                            f"(now {cfg.iterations}, all run) to explore them")
            if st["finished"] is None and st["iteration"] < cfg.iterations and st["rung"] >= len(rungs):
                # a ladder shortened below the rung reached: an IndexError before; which rung to run is
                # the user's choice (the lower ones converged already), so nothing is guessed
                raise ConfigError(f"explore: {self.state_path()}: 'rung' is {st['rung']} (counted from 0: the run "
                                  f"climbed to rung {st['rung'] + 1}), but the configuration's md.temperatures has only "
                                  f"{len(rungs)} rung(s) {rungs}: restore the rungs, or use another output to "
                                  f"start again on this ladder")
            while st["finished"] is None and st["iteration"] < cfg.iterations:
                it = st["iteration"] + 1
                itdir = self.out / f"iter_{it:03d}"
                rung = rungs[st["rung"]]
                t0 = time.time()
                models = _load(st["model"], cfg.device)
                summaries = self.run_md(it, itdir, st, models, rung)
                if summaries is None:
                    log(f"explore: stop requested during the MD of iteration {it}; the finished MD tasks are kept, "
                        f"the interrupted ones run again: continue with 'distmlip explore CONFIG'")
                    return st
                frames = sum(s["frames"] for s in summaries)
                analysed = sum(s["analysed"] for s in summaries)
                fr = sum(s["failed"] for s in summaries) / max(frames, 1)
                flagged = sum(s["flagged"] for s in summaries) / max(analysed, 1)
                umax = max(s["max_uncertainty"] for s in summaries)
                # what ran (run_md reruns tasks whose settings changed; a task json from before the
                # settings were stored has the configuration's)
                ran = [s.get("settings", {}) for s in summaries]
                ps = max(r.get("md.steps", cfg.md.steps) * r.get("md.timestep", cfg.md.timestep) / 1000.0
                         for r in ran)
                row = {"iteration": it, "temperatures_K": list(dict.fromkeys(s["T"] for s in summaries)), "ps": ps,
                       "trajectories": len(summaries), "frames": frames, "failure_ratio": fr,
                       "flagged_fraction": flagged, "max_uncertainty": umax,
                       "min_dist_A": min(s["min_dist_A"] for s in summaries), "model": st["model"]}
                row.update(self.test(st["model"]) if self.rank0 else {})
                converged = fr <= cfg.targets.failure_ratio and flagged <= cfg.targets.flagged_fraction
                if converged:
                    row.update(pool=0, sampled=0, updated=False,
                               note=("rung converged: next temperatures" if st["rung"] + 1 < len(rungs)
                                     else "converged at the last rung"))
                    if st["rung"] + 1 < len(rungs):
                        st["rung"] += 1
                    else:
                        st["finished"] = "converged"
                else:
                    sel = self.select(itdir, summaries) if self.rank0 else None
                    sel = self.ctx.broadcast_object(sel)
                    row.update(pool=sel["pool"], sampled=sel["selected"])
                    if sel["selected"] < max(cfg.select.min_new, 1):
                        row.update(updated=False, note=f"{sel['selected']} selected < select.min_new: model kept")
                    else:
                        lab = self.label(itdir, sel)
                        if lab == "stopped":
                            log(f"explore: stop requested during labelling of iteration {it}; the frames labelled "
                                f"so far are kept: continue with 'distmlip explore CONFIG'")
                            return st
                        if lab is None and self.labelled:
                            lab_inputs = self.labelled
                            self.check_labels(itdir, sel, lab_inputs)
                            self.labelled = []
                        elif lab is None and (itdir / "new.h5").is_file():
                            # labels given before, stopped during the retraining: continue on them
                            log(f"explore: iteration {it}: continuing with the labels of {itdir / 'new.h5'}")
                            lab_inputs = None
                        elif lab is None:
                            log(f"explore: iteration {it}: {sel['selected']} candidates for reference calculations in "
                                f"{sel['candidates']}; label them (energies and forces), then continue with\n"
                                f"  distmlip explore CONFIG --labelled LABELLED_FILES")
                            st["waiting"] = sel["candidates"]
                            self.save_state(st)
                            return st
                        else:
                            lab_inputs = [lab]
                        if lab_inputs is not None and cfg.check_label_units:
                            self.check_label_units(lab_inputs, st["model"])
                        new = self.convert(itdir, lab_inputs)
                        # N_samp is what is trained on: fewer than selected when candidates lack labels
                        from ..data.h5store import H5Dataset

                        row["sampled"] = int(H5Dataset(new).n_structures)
                        new_data = list(st["new_data"]) + [str(new)]
                        status, model_file = self.retrain(itdir, st, new_data)
                        if status == "stopped":
                            log(f"explore: stop requested during retraining of iteration {it}; continue with "
                                f"'distmlip explore CONFIG' (training resumes from its checkpoint; with "
                                f"--labelled and other labels, it starts again on them)")
                            return st
                        st["new_data"] = new_data
                        st["model"] = model_file
                        if self.K > 1:
                            st["members"] = str(Path(model_file).parent / "member_{k:02d}" / "model.pt")
                        row.update(updated=True, note=f"retrained ({status}) on {len(new_data)} new data file(s)")
                row["wall_s"] = time.time() - t0
                st["rows"].append(row)
                st["iteration"] = it
                st.pop("waiting", None)
                if self.rank0:
                    atomic_write_text(itdir / "done.json", json_text(row, indent=1))
                self.save_state(st)
                self.write_table(st)
                log(format_row(row))
            if st["finished"] is None:
                st["finished"] = "iterations exhausted"
                if st["rows"] and st["rows"][-1].get("updated"):
                    st["final_test"] = self.test(st["model"])
                self.save_state(st)
            self.write_table(st)
            log(format_table(st))
            log(f"explore: {st['finished']} after {st['iteration']} iteration(s); model {st['model']}")
            return st

    def write_table(self, st: dict) -> None:
        if self.rank0:
            atomic_write_text(self.out / "table.txt", format_table(st) + "\n")
            atomic_write_text(self.out / "table.json", json_text(st["rows"], indent=1))


def format_row(r: dict) -> str:
    t = ",".join(f"{x:g}" for x in r["temperatures_K"])
    e = r.get("test_E_mae_meV_atom")
    f = r.get("test_F_mae")
    test = "" if e is None else f"  {e:9.3f} {('n/a' if f is None else f'{f:.4f}'):>9}"
    return (f"{r['iteration']:4d} {t:>12} {r['ps']:6.2f} {r['trajectories']:5d} {r['frames']:7d} "
            f"{100 * r['failure_ratio']:7.1f} {100 * r['flagged_fraction']:8.1f} {r['max_uncertainty']:9.3f} "
            f"{r['min_dist_A']:7.3f} {r['sampled']:6d} {('yes' if r['updated'] else 'no'):>8}" + test
            + f"  {r.get('note', '')}")


def format_table(st: dict) -> str:
    rows = st["rows"]
    has_test = any(r.get("test_E_mae_meV_atom") is not None for r in rows)
    head = (f"{'iter':>4} {'T (K)':>12} {'t (ps)':>6} {'traj':>5} {'frames':>7} {'FR (%)':>7} {'flag (%)':>8} "
            f"{'max unc':>9} {'d_min':>7} {'N_samp':>6} {'updated?':>8}"
            + (f"  {'E MAE':>9} {'F MAE':>9}" if has_test else "") + "  note")
    lines = [head, "-" * len(head)] + [format_row(r) for r in rows]
    if st.get("final_test"):
        ft = st["final_test"]
        lines.append(f"final model {st['model']}: test E MAE {ft['test_E_mae_meV_atom']:.3f} meV/atom, "
                     f"F MAE {ft['test_F_mae']:.4f} eV/A (not yet explored)")
    if has_test:
        lines.append("E MAE (meV/atom), F MAE (eV/A): test set, of the model that ran the iteration's MD")
    return "\n".join(lines)


def run(args) -> int:
    from ..config import parse_override
    from ..distributed import init_distributed, install_stop_handlers, shutdown

    overrides = {}
    for o in args.overrides:
        k, v = parse_override(o)
        overrides[k] = v
    if args.label_with:
        overrides["label_with"] = args.label_with
    if args.label_kwargs:
        from ..evaluation.labelling import parse_kwargs

        overrides["label_kwargs"] = parse_kwargs(args.label_kwargs)
    if args.iterations:
        overrides["iterations"] = args.iterations
    cfg = load_explore_config(args.config, overrides)
    install_stop_handlers()
    ctx = init_distributed(cfg.device)
    try:
        Explorer(cfg, ctx, labelled=[_abs(p) for p in (args.labelled or [])]).run()
        return 0
    finally:
        shutdown()


__all__ = ["ExploreConfig", "Explorer", "farthest_point_sampling", "frame_features", "add_arguments", "run"]
