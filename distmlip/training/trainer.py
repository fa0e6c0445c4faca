"""The training loop (energy and direct-force modes), written data-parallel from the start.

Every rank streams its own atom-balanced partition of the training set (PartitionedStream) and
computes the loss of its share with GLOBAL denominators (structure weights and force components
all-reduced over the ranks), so that the sum of the per-rank losses is the loss of the global
batch; the gradients are then summed with one flat all-reduce (``allreduce_gradients``).  With one
process every collective is a no-op.  Validation metrics are sums of squared/absolute errors and
counts over each rank's disjoint share of the validation set, all-reduced once per evaluation.

Rank 0 alone writes the CSV log, checkpoints and model files.  At every step boundary the loop
asks ``ctx.stop_requested()`` (SIGTERM/SIGUSR1 on any rank); when set, a checkpoint with the
epoch and step position is written and :meth:`Trainer.fit` returns ``"stopped"``.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import gc
import io
import math
import sys
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..data.info import EV_A3_GPA
from ..data.structure import minimum_images
from ..config import absolute_path_value, absolute_paths, config_to_dict, path_keys
from ..errors import ConfigError, DataFormatError, InputError, NonFiniteError
from ..models.ann import FEATURE_STD_FLOOR
from ..models.bpnn import BPNN
from ..models.data_record import COINCIDENT_A, ENERGY_ZERO_WARN_EV
from ..utils.io import OutputLock, atomic_write_text, check_writable, clean_stale_temps, storage_error
from ..utils.log import log, warn
from . import checkpoint as ckpt
from . import energy_step
from .config import TrainConfig
from .flat import FlatParameters, avoid_dynamo_import, optimizer_step
from .force_step import force_stress_loss_and_gradients
from .losses import (N_SUMS, difference_residuals, difference_term, energy_force_loss, force_atom_mask,
                     force_selection, loss_from_sums, loss_sums, stress_selection, stress_structure_mask,
                     term_weights)

# layout of the float64 metric accumulator
_M = ["loss", "e_sse", "e_sae", "n_struct", "es_sse", "es_sae", "f_sse", "f_sae", "n_comp", "n_steps",
      "s_sse", "s_sae", "n_scomp", "d_sse", "n_diff"]
_IDX = {k: i for i, k in enumerate(_M)}

CSV_FIELDS = ["epoch", "steps", "lr", "train_loss", "train_E_rmse_meV_atom", "train_E_mae_meV_atom",
              "train_F_rmse", "train_F_mae", "val_loss", "val_E_rmse_meV_atom", "val_E_mae_meV_atom",
              "val_F_rmse", "val_F_mae", "train_S_rmse_GPa", "train_S_mae_GPa", "val_S_rmse_GPa", "val_S_mae_GPa",
              "train_D_rmse", "val_D_rmse", "time_s"]


def _fmt(x, nd=3):
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def metrics_from_sums(acc: torch.Tensor) -> dict:
    a = acc.tolist()
    g = dict(zip(_M, a))
    n, c = g["n_struct"], g["n_comp"]
    out = {"loss": g["loss"] / g["n_steps"] if g["n_steps"] > 0 else g["loss"],
           "E_rmse_meV_atom": 1e3 * math.sqrt(g["e_sse"] / n) if n else float("nan"),
           "E_mae_meV_atom": 1e3 * g["e_sae"] / n if n else float("nan"),
           "E_rmse_meV_struct": 1e3 * math.sqrt(g["es_sse"] / n) if n else float("nan"),
           "F_rmse": math.sqrt(g["f_sse"] / c) if c else float("nan"),
           "F_mae": g["f_sae"] / c if c else float("nan"),
           "n_structures": int(n), "n_force_components": int(c)}
    if g["n_diff"]:
        # RMS error of the copies' energy rise per A of displacement (copy-difference term)
        out["D_rmse"] = math.sqrt(g["d_sse"] / g["n_diff"])
    if g["n_scomp"]:
        out["S_rmse_GPa"] = EV_A3_GPA * math.sqrt(g["s_sse"] / g["n_scomp"])
        out["S_mae_GPa"] = EV_A3_GPA * g["s_sae"] / g["n_scomp"]
    return out


def _accumulate_errors(acc, batch, E, F, S=None, fmask=None):
    """Add a batch's energy (per atom and per structure), force and stress error sums to ``acc``
    (one update of the accumulator; on the CPU the sums are taken in numpy, whose per-call cost on
    arrays of a batch's size is a fraction of torch's).  ``fmask``: [B] bool, the structures whose
    forces count (default: those with forces)."""
    hf = batch.has_forces if fmask is None else fmask
    if S is not None and getattr(batch, "has_stress", None) is not None and bool(batch.has_stress.any()):
        d = (S.detach().to(torch.float64) - batch.stress)[batch.has_stress].reshape(-1)
        acc[_IDX["s_sse"]] += (d * d).sum()
        acc[_IDX["s_sae"]] += d.abs().sum()
        acc[_IDX["n_scomp"]] += float(d.numel())
    if E.device.type == "cpu":
        es = E.detach().numpy() - batch.energy.numpy()
        ea = es / batch.natoms.numpy()
        v = np.zeros(_IDX["n_steps"] + 1)
        v[_IDX["e_sse"]], v[_IDX["e_sae"]] = float(ea @ ea), float(np.abs(ea).sum())
        v[_IDX["es_sse"]], v[_IDX["es_sae"]] = float(es @ es), float(np.abs(es).sum())
        v[_IDX["n_struct"]] = float(batch.n_structures)
        if F is not None:
            m = hf.numpy()[batch.structure.numpy()]
            d = (F.detach().numpy() - batch.forces.numpy())[m].ravel()
            v[_IDX["f_sse"]], v[_IDX["f_sae"]], v[_IDX["n_comp"]] = float(d @ d), float(np.abs(d).sum()), float(d.size)
        acc[:len(v)] += torch.from_numpy(v)
        return
    ea = (E - batch.energy) / batch.natoms.to(torch.float64)
    es = E - batch.energy
    parts = [torch.zeros((), dtype=torch.float64, device=E.device)] * (_IDX["n_steps"] + 1)
    parts[_IDX["e_sse"]], parts[_IDX["e_sae"]] = (ea * ea).sum(), ea.abs().sum()
    parts[_IDX["es_sse"]], parts[_IDX["es_sae"]] = (es * es).sum(), es.abs().sum()
    parts[_IDX["n_struct"]] = torch.tensor(float(batch.n_structures), dtype=torch.float64, device=E.device)
    if F is not None:
        m = hf[batch.structure]
        d = (F - batch.forces)[m]
        parts[_IDX["f_sse"]], parts[_IDX["f_sae"]] = (d * d).sum(), d.abs().sum()
        parts[_IDX["n_comp"]] = torch.tensor(float(d.numel()), dtype=torch.float64, device=E.device)
    acc[:len(parts)] += torch.stack(parts)


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists kept whole)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v) and key != "zbl.radii":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def fused_adam_kwargs(params) -> dict:
    """``{"fused": True}`` when torch has the fused (single-kernel) Adam/AdamW for these
    parameters (CPU or CUDA floating point, torch >= 2.4), else ``{}``.  The per-element
    networks are many small tensors, and the default per-tensor loop costs several times the fused
    step (same update rule)."""
    import inspect

    if "fused" not in inspect.signature(torch.optim.Adam).parameters:
        return {}
    ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if ok and params else {}

# training.optimizer: auto switches force training of at most this many atoms in the training split
# from AdamW to L-BFGS when AdamW stalls, and an explicit adamw force run of at most this many atoms
# gets a hint that names it.  An L-BFGS iteration costs a whole epoch of AdamW steps: the switch
# won at 46,000 atoms (38 steps per epoch) and lost at 166,000 (138) (docs/results.md)
AUTO_LBFGS_ATOMS = 50_000
# ... and at the end of this epoch at the latest, when at least as many epochs remain: AdamW's head
# start is worth most in its first few hundred epochs.  Measured (docs/results.md): switching at
# epoch 100-1,000 of 2,000 beat both the plateau cut (1,839) and L-BFGS alone on the EC dimers
# (3 steps per epoch), and 300 beat 100 on 46,000 atoms (38 steps per epoch, 1,000 epochs)
AUTO_SWITCH_EPOCH = 300
# fewer optimizer steps than this in a whole run draw a warning: with the default epochs and batch
# a small data set gets a few hundred steps (EC dimers: 3 per epoch), and every set in
# docs/results.md was still improving after this many
FEW_STEPS = 2000


# The force RMS that scales the force loss and floors the energy scale leaves out the largest
# FORCE_RMS_TRIM of the atoms when with them it is FORCE_RMS_DOMINATED x as large: measured 1.02-1.12
# on clean sets (EMT Cu/Au, slab MD, Cu compressed to 0.78 a0, the EC dimers), 6.3 with two atoms
# of 320 at 100-140 eV/A.
FORCE_RMS_TRIM = 0.01
FORCE_RMS_DOMINATED = 1.5


# what a committee writes into its output folder besides its member_XX/ folders
COMMITTEE_FILES = ("committee.pt", "committee.json")


def keep_earlier_run(out, quiet: bool = False, members_from: int = 0) -> Path | None:
    """A new run in a folder that holds an earlier run's model or checkpoint (a config reused
    without ``--resume``) replaced that model without a word; its files now move to
    ``previous-<UTC time>/`` in the folder, and the warning says how to continue a run instead.
    An earlier run is a single model's (model.pt, checkpoint.pt, ...) or a committee's
    (committee.pt, committee.json, member_XX/ from ``members_from`` on: a new committee's own
    members move their own folders' files): a committee written into a single run's folder left
    that run's model.pt beside committee.pt under the committee's config.yaml, and a single run
    into a committee's folder the committee's files beside its model (sweep 20).  Returns the
    folder the files went to, if any."""
    out = Path(out)
    old = [out / f for f in Trainer.RUN_FILES + COMMITTEE_FILES if (out / f).is_file()]
    members = sorted(d for d in out.glob("member_[0-9]*")
                     if d.is_dir() and d.name[7:].isdigit() and int(d.name[7:]) >= members_from)
    if not any(p.name in ("model.pt", "checkpoint.pt", "committee.pt") for p in old) and not members:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = out / f"previous-{stamp}"
    k = 1
    while dest.exists():
        k += 1
        dest = out / f"previous-{stamp}-{k}"
    dest.mkdir()
    for p in old + members:
        os.replace(p, dest / p.name)
    if not quiet:
        names = [p.name for p in old] + [p.name + "/" for p in members]
        warn(f"{out} held an earlier run ({', '.join(names)}): moved to {dest} (to continue a run instead: "
             f"distmlip train CONFIG --resume auto)")
    return dest


def selection_note(kept: dict | None, last: dict | None) -> str | None:
    """The log's note when the kept model (lowest validation loss) and the last validated epoch
    differ by a quarter or more in one of the validation errors (energy RMSE, force MAE): the
    loss traded one for the other, and one validation structure far outside the training data
    can decide that (a heterogeneous set kept epoch 599 of 2,000 for its energies, with 2.2x the
    last epoch's force error: docs/results.md, twenty-fourth session).  ``kept`` and ``last``:
    {epoch, E_rmse_meV_atom, F_mae}; None when they are the same epoch or either is unknown."""
    if not kept or not last or kept.get("epoch") == last.get("epoch"):
        return None
    e0, f0, e1, f1 = (kept.get("E_rmse_meV_atom"), kept.get("F_mae"), last.get("E_rmse_meV_atom"), last.get("F_mae"))
    if any(v is None or not math.isfinite(v) or v <= 0 for v in (e0, f0, e1, f1)):
        return None
    better = [w for w, r in (("force", f1 / f0), ("energy", e1 / e0)) if r <= 0.75]
    if not better:
        return None
    return (f"note: the kept model (epoch {kept['epoch']}: validation E_rmse {e0:.3f} meV/atom, F_mae {f0:.4f} eV/A) "
            f"has the lowest validation loss; the last epoch ({last['epoch']}: {e1:.3f}, {f1:.4f}) has "
            f"{(f1 / f0 if better[0] == 'force' else e1 / e0):.2f}x its {better[0]} error.  The loss traded one "
            f"for the other, which a few validation structures far from the training data can decide: "
            f"last_model.pt holds the last weights; evaluate both on your test data (distmlip evaluate, "
            f"structures.csv lists each structure's error)")

class Trainer:
    """Single- or multi-rank trainer of one BPNN (committees: K = 1 for now)."""

    def __init__(self, cfg: TrainConfig, ctx=None, resume: str | None = None, quiet: bool = False,
                 log_prefix: str | None = None, force: bool = False, resume_hint: str | None = None):
        """``ctx``: a DistContext, or a group context of a committee (training/committee.py);
        ``log_prefix``: print progress with this prefix on the context's rank 0 (committee
        groups), instead of on the global rank 0; ``force``: take over the output folder's lock
        from another job; ``resume_hint``: the command that continues a stopped run, where the
        training is part of another command (explore)."""
        self.resume_hint = resume_hint
        from ..distributed import init_distributed

        self.cfg = cfg
        self.log_prefix = log_prefix
        self.cache = None        # descriptor cache of the training data (energy mode)
        self.val_cache = None
        self.sample_multiplier = None  # bootstrap counts per data-set index (committee.bootstrap)
        self.ctx = ctx if ctx is not None else init_distributed(cfg.training.device)
        self.device = self.ctx.device
        self.rank0 = self.ctx.rank == 0
        self.quiet = quiet
        tc = cfg.training
        self.out = Path(tc.output)
        self.force_mode = tc.mode == "force"
        self.per_atom = tc.energy_loss == "per_atom"
        self._resume_state = None
        self.lock = None
        self._claim_output(force)
        try:
            if resume is not None:
                self._resume_state = ckpt.load_checkpoint(resume)
                self._resume_path = resume
                self._check_resume(self._resume_state)
            self._setup_data()
            if self._resume_state is not None:
                self._check_resume_data()
            self._setup_model()
            self._setup_optim()
            self.epoch = 0
            self.step_in_epoch = 0
            self.global_step = 0
            self.best = float("inf")
            self.bad_epochs = 0
            self.partial = None  # accumulator of an interrupted epoch
            if self._resume_state is not None:
                self._restore(self._resume_state)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    # ------------------------------------------------------------------ set-up
    def _log(self, msg):
        if self.quiet:
            return
        if self.log_prefix is not None:
            if self.rank0:
                print(self.log_prefix + msg, flush=True)
        else:
            log(msg)

    def _claim_output(self, force: bool) -> None:
        """Before any long work: the output folder is writable, its leftovers of dead writers are
        gone, and no other job writes there (a lock held until fit() ends).  Decided on rank 0 and
        broadcast, so every rank fails with the same clear error."""
        err = None
        if self.rank0:
            try:
                check_writable(self.out)
                removed = clean_stale_temps(self.out)
                if removed:
                    self._log(f"removed {len(removed)} temporary file(s) of dead writers in {self.out}")
                self.lock = OutputLock(self.out, force=force, log=self._log).acquire()
            except (ConfigError, InputError, OSError) as exc:   # StorageError, LockedError: DistmlipErrors
                err = exc
            except Exception as exc:  # noqa: BLE001  (any failure must reach every rank)
                err = exc
        err = self.ctx.broadcast_object(None if err is None else (type(err).__name__, str(err)))
        if err is not None:
            from .. import errors as E

            raise getattr(E, err[0], E.DistmlipError)(err[1])

    # settings that define the model, the data or the order of the steps: a resumed run must keep
    # them (the run would silently be another run); every other setting (schedule, lr, logging,
    # checkpoints, kernels) is applied from the new configuration and logged
    _FIXED_ON_RESUME = ("data.train", "data.validation", "data.split_seed", "data.fractions", "data.by_subset",
                        "data.use_stored_split", "data.split_patterns", "data.subsets", "descriptor.type",
                        "descriptor.rc_radial", "descriptor.n_radial", "descriptor.rc_angular",
                        "descriptor.n_angular", "model.", "zbl.", "committee.", "training.mode", "training.seed",
                        "training.batch_atoms", "training.batch_structures", "training.energy_loss",
                        "training.force_fraction", "training.optimizer", "data.batches",
                        "training.copies_per_epoch")
    # what a checkpoint written before a setting existed did, and older spellings of a value
    _BEFORE_SETTING = {"data.batches": "reshuffled", "training.copies_per_epoch": 0, "training.ema": 0.0}
    _ADOPTED_FROM_WARM_START = ("descriptor.type", "descriptor.rc_radial", "descriptor.n_radial",
                                "descriptor.rc_angular", "descriptor.n_angular", "model.hidden", "model.activation",
                                "zbl.enabled")
    _LEGACY_VALUES = {("model.energy_scale", True): "auto"}

    def _check_resume(self, st) -> None:
        """The checkpoint fits this run: same rank count (the data order and a rank's position in
        its partition depend on it) and the same model, data and step-order settings."""
        old = _flatten(st.get("config") or {})
        if old:
            old = {**self._BEFORE_SETTING, **old}
            old = {k: self._LEGACY_VALUES.get((k, v), v) if isinstance(v, (bool, str, int, float)) else v
                   for k, v in old.items()}
        new = _flatten(config_to_dict(absolute_paths(self.cfg)))
        # paths compared as absolute paths: a run's config.yaml records them so, the configuration
        # as first given (and checkpoints before that) may not
        for k in path_keys(self.cfg) & set(old):
            old[k] = absolute_path_value(old[k])
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        fixed = [k for k in changed if any(k == f or (f.endswith(".") and k.startswith(f))
                                           for f in self._FIXED_ON_RESUME)]
        if {old.get("training.copies_per_epoch"), new.get("training.copies_per_epoch")} == {0, "auto"}:
            # the same run where the data set records no draws (every copy every epoch either
            # way; checkpoints before 'auto' say 0): checked against the data in _setup_data
            fixed.remove("training.copies_per_epoch")
            self._resume_draws_check = old.get("training.copies_per_epoch")
        if (old.get("training.optimizer"), new.get("training.optimizer")) == ("adamw", "auto") \
                and "optimizer_phase" not in st:
            # a run started before auto was the default (its checkpoint has no phase): it was AdamW
            # and continues as AdamW, whether its config said so or took the default
            fixed.remove("training.optimizer")
            changed.remove("training.optimizer")
            self.cfg.training.optimizer = "adamw"
            self._log("resume: the checkpoint's run trained with training.optimizer: adamw (the default before "
                      "auto) and continues with it")
        if old and bool(old.get("training.warm_start")) != bool(new.get("training.warm_start")):
            # (sweep 7: a warm start added on --resume was accepted and only merged the record)
            raise ConfigError(f"{self._resume_path}: the checkpoint's run was "
                              + (f"a fine-tuning of {old.get('training.warm_start')}" if old.get("training.warm_start")
                                 else "not a fine-tuning (no training.warm_start)")
                              + f", this configuration says training.warm_start: {new.get('training.warm_start')!r}; "
                              "a resumed run keeps how it started (start a new run in another output folder to "
                              "fine-tune)")
        if old and "training.difference_weight" in changed and \
                (float(old.get("training.difference_weight") or 0) > 0) != (float(new.get("training.difference_weight") or 0) > 0):
            # on or off, the term groups copies with their parents (another step plan) and turns
            # a pool on or off (sweep 13: resumed at "step 1" of a different plan); other values
            # only weigh the loss
            fixed.append("training.difference_weight")
        if old.get("training.warm_start"):
            # a fine-tuning run's architecture is its loaded model's whatever either config says
            # (_adopt_warm_start_architecture): its own config.yaml, which records the model's,
            # or the config as first given must both resume it
            fixed = [k for k in fixed if k not in self._ADOPTED_FROM_WARM_START]
        if fixed:
            raise ConfigError(f"{self._resume_path}: the configuration differs from the checkpoint's in settings a "
                              "resumed run must keep: " + "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
                                                                    for k in fixed)
                              + " (start a new run in another output folder to change them)")
        ws = int(st.get("world_size", 1))
        if ws != self.ctx.world_size:
            raise ConfigError(f"{self._resume_path}: the checkpoint was written by a run on {ws} rank(s); resume "
                              f"it on {ws} rank(s) (e.g. mpirun -n {ws}), not {self.ctx.world_size}: each rank's "
                              "place in the data order depends on the rank count")
        self._resume_changes = {k: (old.get(k), new.get(k)) for k in changed
                                if k not in ("training.output", "training.warm_start")}

    def _setup_data(self):
        from ..data.h5store import H5Dataset
        from ..data.stream import PartitionedStream

        dc, tc = self.cfg.data, self.cfg.training
        self.ds = H5Dataset(dc.train)
        S = self.ds.n_structures
        if dc.validation:
            self.val_ds = H5Dataset(dc.validation)
            train_idx = np.arange(S, dtype=np.int64)
            val_idx = np.arange(self.val_ds.n_structures, dtype=np.int64)
        else:
            from ..data import split as splitmod

            split = splitmod.split_of(self.ds, dc.split_seed, dc.fractions, by_subset=dc.by_subset,
                                      use_stored=dc.use_stored_split, patterns=dc.split_patterns)
            if dc.use_stored_split and not dc.split_patterns and self.ds.has_stored_split:
                drawn = int(((np.asarray(self.ds.column("split")) == 0) & (split == 1)).sum())
                if drawn:
                    self._log(f"data: the stored split has no validation structures; {drawn} of its training "
                              f"structures validate (data.fractions {list(dc.fractions)}, seed {dc.split_seed})")
            train_idx = np.nonzero(split == 0)[0].astype(np.int64)
            val_idx = np.nonzero(split == 1)[0].astype(np.int64)
            self.val_ds = self.ds
        if dc.subsets:
            names = [t["name"] for t in self.ds.subsets]
            unknown = [s for s in dc.subsets if s not in names]
            if unknown:
                raise ConfigError(f"data.subsets: {unknown} not in the data set {dc.train} "
                                  f"(subsets: {sorted(set(names))})")
            keep = np.array([names[k] in dc.subsets for k in range(len(names))], dtype=bool)
            train_idx = train_idx[keep[self.ds.subset_ids[train_idx]]]
            if self.val_ds is self.ds:
                val_idx = val_idx[keep[self.ds.subset_ids[val_idx]]]
        if len(train_idx) == 0:
            raise InputError(f"{dc.train}: no training structures (check data.fractions / data.subsets)")
        if getattr(self.cfg.committee, "bootstrap", False):
            # bootstrap resample (seeded by training.seed): a structure drawn c times enters the
            # losses with weight c (identical to c copies), undrawn ones are left out
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(tc.seed), 0xB007])))
            counts = rng.multinomial(len(train_idx), np.full(len(train_idx), 1.0 / len(train_idx)))
            mult = np.ones(S, dtype=np.float64)
            mult[train_idx] = counts
            self.sample_multiplier = mult
            train_idx = train_idx[counts > 0]
            self._log(f"bootstrap: {len(train_idx)} distinct training structures drawn (seed {tc.seed})")
        self.train_idx, self.val_idx = train_idx, val_idx
        self._setup_differences()
        r, w = self.ctx.rank, self.ctx.world_size
        bs = tc.batch_structures if tc.batch_structures > 0 else 1 << 30
        groups = self._diff_groups(self.ds)
        sample = None
        draws = self._draws(self.ds)
        was = getattr(self, "_resume_draws_check", None)
        if was is not None and groups is not None and self._recorded_draws(self.ds).any():
            # 0 against auto on a data set that records draws: one run draws, the other does not
            raise ConfigError(f"{self._resume_path}: the checkpoint's run had training.copies_per_epoch: {was!r}, "
                              f"this configuration {'auto' if was == 0 else 0!r}, and the data set records copies per "
                              "epoch (augment pool): one draws copies, the other trains on all; a resumed "
                              f"run must keep it (set training.copies_per_epoch: {was})")
        if self._plain_energy_loss() and tc.copies_per_epoch != 0 and self.rank0 and not self.quiet:
            if tc.copies_per_epoch != "auto":
                warn(f"training.copies_per_epoch {tc.copies_per_epoch} has no effect with the plain energy loss "
                     "(training.difference_weight 0): it trains on every copy each epoch (drawn copies gave it "
                     "2x the errors at equal cost, docs/gpr.md)")
            elif self._recorded_draws(self.ds).any():
                self._log("copies: the plain energy loss (training.difference_weight 0) trains on every copy of "
                          "the data set's pools each epoch (drawn copies gave it 2x the errors at equal cost)")
        if draws is not None:
            if groups is None:
                warn("training.copies_per_epoch has no effect: no synthetic copy of the training split has its "
                     "parent (a reference structure) in the split, so there is nothing to draw from")
            else:
                sample = self._diff[id(self.ds)][0] >= 0
        self.stream = PartitionedStream(self.ds, train_idx, r, w, tc.batch_atoms, bs, tc.seed,
                                        shuffle=True, prefetch=dc.prefetch, fixed_batches=dc.batches == "fixed",
                                        groups=groups, sample_mask=sample, sample_k=0 if draws is None else draws)
        # auto: cosine for energy training on GPR copies paired with their parents, plateau
        # otherwise.  The draws of a pool make the validation loss noisy: on the slab set the
        # plateau scheduler reached its floor rate in the first third of the run, which then
        # learned nothing more.  Fixed copies too: on the EC dimers at 400 s it reached the floor
        # at epoch 683 of 2,666 (the errors of the 120 s run, while the pool's kept falling), and
        # cosine beat it in 11 of 12 seed/metric comparisons at 60-120 s (docs/results.md, sweep
        # 22).  A resumed run keeps the schedule its checkpoint started with.
        started = (self._resume_state or {}).get("scheduler_kind") if tc.scheduler == "auto" else None
        self.sched_kind = tc.scheduler if tc.scheduler != "auto" else (
            started or ("cosine" if groups is not None else "plateau"))
        self._resolve_optimizer()
        if self.phase == "lbfgs":
            self.sched_kind = "none"        # the line search chooses every step's length
            if tc.copies_per_epoch != 0 and self._recorded_draws(self.ds).any():
                self._log("copies: lbfgs trains on every copy of the data set's pools at each evaluation "
                          "(training.copies_per_epoch draws would change the loss between its steps)")
        if sample is not None:
            if tc.copies_per_epoch == "auto":
                sub_ids = np.asarray(self.ds.subset_ids)[train_idx]
                ids = np.unique(sub_ids[np.asarray(sample)[train_idx]])     # subsets with copies only
                n_without = len(np.unique(sub_ids)) - len(ids)
                per = ", ".join(f"{self.ds.subsets[k]['name']} {self.ds.subsets[k].get('copies_per_epoch') or 'all'}"
                                for k in ids[:8]) + (" ..." if len(ids) > 8 else "") \
                    + (f"; {n_without} subset(s) without copies" if n_without else "")
                self._log(f"copies: per reference structure and epoch as augment's copies: auto chose them ({per}; pool), "
                          f"drawn anew each epoch from {int(sample[train_idx].sum())} training copies "
                          "(training.copies_per_epoch: auto)")
            else:
                self._log(f"copies: {tc.copies_per_epoch} per reference structure and epoch, drawn anew each epoch "
                          f"from {int(sample[train_idx].sum())} training copies (training.copies_per_epoch)")
            if self.sched_kind == "plateau":
                self._log("copies: with a pool, 'training.scheduler: cosine' (or auto) uses the epochs better "
                          "than the plateau scheduler (docs/gpr.md \"A pool of copies\")")
            elif tc.scheduler == "auto":
                self._log("scheduler: cosine (auto: a pool of copies)")
        elif groups is not None and tc.scheduler == "auto" and self.sched_kind == "cosine":
            self._log("scheduler: cosine (auto: GPR copies paired with their parents)")
        # validation: the same number of copies per reference, one fixed draw (a pool's copies
        # all validated would cost pool / copies_per_epoch times the training copies per epoch)
        vgroups = self._diff_groups(self.val_ds)
        vdraws = self._draws(self.val_ds)
        vsample = None if (sample is None or vgroups is None or vdraws is None) \
            else self._diff[id(self.val_ds)][0] >= 0
        self.val_stream = (PartitionedStream(self.val_ds, val_idx, r, w, tc.batch_atoms, bs, tc.seed,
                                             shuffle=False, prefetch=dc.prefetch, groups=vgroups,
                                             sample_mask=vsample, sample_k=0 if vdraws is None else vdraws,
                                             sample_fixed=True)
                           if len(val_idx) else None)
        self._log(f"data: {len(train_idx)} training, {len(val_idx)} validation structures; "
                  f"{self.stream.steps(0)} steps per epoch on {w} rank(s)")
        self._check_labels(dc, tc, train_idx, val_idx)
        biggest = int(np.max(self.ds.natoms[train_idx])) if len(train_idx) else 0
        if biggest > tc.batch_atoms and self.rank0 and not self.quiet:
            over = int(np.sum(self.ds.natoms[train_idx] > tc.batch_atoms))
            warn(f"training.batch_atoms {tc.batch_atoms} is below the largest training structure ({biggest} "
                 f"atoms): {over} structure(s) form batches of their own, above the setting (a rank's memory "
                 f"follows the largest batch)")
        total = self.stream.steps(0) * tc.epochs
        # (lbfgs: an epoch is one iteration on the whole split, not steps of batches; it ends
        # by itself when converged)
        if total < FEW_STEPS and tc.optimizer != "lbfgs" and self.rank0 and not self.quiet:
            warn(f"training: {tc.epochs} epochs x {self.stream.steps(0)} steps per epoch = {total} optimizer "
                 f"steps in all; on the data sets measured (docs/results.md, 'Learning-rate schedule') the "
                 f"errors were still falling after {FEW_STEPS} steps: raise training.epochs (or lower "
                 f"training.batch_atoms) unless this run is a test")

    # ---- the copy-difference term (energy mode on GPR-augmented data; training/losses.py) -----
    _gamma = 0.0       # weight of the copy-difference term in effect (0: none)
    _diff = None       # {id(ds): (parent [S] int64, -1 where none; |x_c - x_p| [S] float64)}

    def _check_labels(self, dc, tc, train_idx, val_idx) -> None:
        """Settings that the training data cannot honour: an error where the run would learn
        nothing it was asked for, a warning where it would run without what was asked."""
        if self.force_mode and tc.alpha > 0:
            hf = np.asarray(self.ds.column("has_forces"), dtype=bool)[train_idx]
            if not hf.any():
                raise ConfigError(f"training.mode: force (alpha {tc.alpha}) but none of the {len(train_idx)} "
                                  f"training structures of {dc.train} carries forces (distmlip info shows "
                                  f"'with forces'); train with 'training.mode: energy'")
        if self.stress_mode:
            try:
                hs = np.asarray(self.ds.column("has_stress"), dtype=bool)[train_idx]
            except (KeyError, OSError, ValueError):
                hs = np.zeros(len(train_idx), dtype=bool)
            if not hs.any():
                raise ConfigError(f"training.beta: {tc.beta} (a stress term) but none of the {len(train_idx)} "
                                  f"training structures of {dc.train} carries a stress (convert keeps the "
                                  f"stress of periodic frames, --stress-key; distmlip info shows it); set "
                                  f"training.beta: 0")
            self._check_stress_cells(train_idx, val_idx)
        elif self.force_mode and self.rank0 and not self.quiet and self._resume_state is None:
            # stresses that convert kept but the loss leaves out: the energies of strained cells
            # (equations of state, elastic constants) then rest on the energies alone
            try:
                n_s = int(np.asarray(self.ds.column("has_stress"), dtype=bool)[train_idx].sum())
            except (KeyError, OSError, ValueError):
                n_s = 0
            if n_s >= max(1, len(train_idx) // 5):
                self._log(f"hint: {n_s} of {len(train_idx)} training structures carry a stress, unused with "
                          f"training.beta: 0; 'training.beta: 0.03' adds the stress term (docs/training.md "
                          f"\"Training with stresses\")")
        if not dc.validation and len(val_idx) == 0 and dc.fractions[1] > 0 and self.rank0 and not self.quiet:
            ns = len(np.unique(self.ds.subset_ids[train_idx]))
            warn(f"data.fractions {list(dc.fractions)} asks for a validation share, but the split gave no "
                 f"validation structures ({len(train_idx)} training structures in {ns} subsets"
                 f"{': the per-subset split rounds the few reference structures of each small subset whole into training' if dc.by_subset else ''}"
                 f"); the learning-rate schedule and the best model then follow the training loss.  Set "
                 f"'data.by_subset: false', raise the validation share, or give data.validation")

    def _check_stress_cells(self, train_idx, val_idx) -> None:
        """Stress labels on cells without volume (a slab or wire stored with zero non-periodic
        vectors, in data sets converted before convert refused them): the model predicts no
        stress there and the label would be compared with that zero, silently (sweep 18)."""
        from ..data.validate import cells_with_volume

        for ds, idx in ((self.ds, train_idx), (self.val_ds, val_idx)):
            if ds is None or not len(idx):
                continue
            idx = np.asarray(idx, dtype=np.int64)
            hs = np.asarray(ds.column("has_stress"), dtype=bool)[idx]
            if not hs.any():
                continue
            idx = idx[hs]
            bad = idx[~cells_with_volume(np.asarray(ds.column("cell"))[idx])]
            if len(bad):
                src, sidx = ds.column("source"), ds.column("source_index")
                named = ", ".join(f"{int(i)} ({src[i]}, index {int(sidx[i])})" for i in bad[:5])
                raise InputError(f"{', '.join(ds.paths)}: structure(s) {named}{' ...' if len(bad) > 5 else ''}, "
                                 f"field 'stress': a stress on a cell without volume (a non-periodic cell vector "
                                 f"is zero): the model predicts no stress there.  Reconvert the data with the "
                                 f"cell the stress was computed with, or set training.beta: 0")

    def _setup_differences(self) -> None:
        """Pair every synthetic copy of the training (validation) split with its parent in the
        same split, and measure the displacement between them (minimum image in periodic
        directions).  The stored parent index is local to the copy's file; a pair is kept only
        when the parent is a reference structure of the same atom count and source index."""
        tc = self.cfg.training
        self._gamma = 0.0
        # the pairs serve two things: the copy-difference term (energy mode, weight > 0) and the
        # per-epoch draw of a pool's copies (that term's training and force mode, the hybrid,
        # which would otherwise train on the whole pool, P times the copies' cost per epoch)
        need_pairs = not self.force_mode and tc.difference_weight > 0
        need_draws = self._draws(self.ds) is not None or (
            self.val_ds is not None and self.val_ds is not self.ds and self._draws(self.val_ds) is not None)
        if not (need_pairs or need_draws):
            return
        tables = {}
        for ds, idx in ((self.ds, self.train_idx), (self.val_ds, self.val_idx)):
            parent, dx = tables.get(id(ds), (None, None))
            syn = np.asarray(ds.column("synthetic"), dtype=bool)
            if parent is None:
                if not syn.any():
                    continue
                parent = np.full(ds.n_structures, -1, dtype=np.int64)
                dx = np.zeros(ds.n_structures, dtype=np.float64)
                tables[id(ds)] = (parent, dx)
            offs = ds.starts      # the stored parent index counts within the copy's own file
            shard = np.searchsorted(offs, np.arange(ds.n_structures), side="right") - 1
            inset = np.zeros(ds.n_structures, dtype=bool)
            inset[idx] = True
            c = idx[syn[idx]]
            p = np.asarray(ds.column("parent"), dtype=np.int64)[c] + offs[shard[c]]
            ok = (p >= 0) & (p < ds.n_structures)
            c, p = c[ok], p[ok]
            natoms = np.asarray(ds.natoms)
            sidx = np.asarray(ds.column("source_index"))
            ok = inset[p] & ~syn[p] & (natoms[p] == natoms[c]) & (sidx[p] == sidx[c])
            c, p = c[ok], p[ok]
            if len(c) == 0:
                continue
            if not need_pairs:
                # the draw needs only the parent of each copy, not its displacement
                parent[c] = p
                continue
            # in blocks of copies, each block's displacements at once per atom count (one
            # Python minimum image per copy took 55-130 us: seconds at 10^5 copies, and the
            # whole set was read at once)
            for a0 in range(0, len(c), 8192):
                cb, pb = c[a0:a0 + 8192], p[a0:a0 + 8192]
                pos = {st.index: st for st in ds.read(np.unique(np.concatenate([cb, pb])))}
                for n in np.unique(natoms[cb]):
                    sel = np.flatnonzero(natoms[cb] == n)
                    ci, pi = cb[sel], pb[sel]
                    d = (np.stack([np.asarray(pos[int(k)].positions, dtype=np.float64).reshape(-1, 3) for k in ci])
                         - np.stack([np.asarray(pos[int(k)].positions, dtype=np.float64).reshape(-1, 3) for k in pi]))
                    d = minimum_images(d, np.stack([np.asarray(pos[int(k)].cell, dtype=np.float64) for k in pi]),
                                       np.stack([np.broadcast_to(np.asarray(pos[int(k)].pbc, dtype=bool), (3,))
                                                 for k in pi]))
                    length = np.sqrt((d * d).reshape(len(d), -1).sum(axis=1))
                    keep = length > 1e-8
                    parent[ci[keep]], dx[ci[keep]] = pi[keep], length[keep]
        self._diff = tables or None
        n_pairs = sum(int((t[0][self.train_idx] >= 0).sum()) for k, t in tables.items() if k == id(self.ds))
        if n_pairs and need_pairs:
            if tc.loss == "rmse":
                raise ConfigError("training.difference_weight: the copy-difference term of GPR-augmented data is "
                                  "defined for loss mse and normalized, not rmse; set training.loss: mse, or "
                                  "training.difference_weight: 0 for the plain energy loss")
            self._gamma = float(tc.difference_weight)
            self._log(f"copy-difference term: {n_pairs} training copies paired with their parents, "
                      f"weight {self._gamma:g} (training.difference_weight)")

    def _draws(self, ds):
        """training.copies_per_epoch for ``ds``: the number (None for 0: every copy every epoch)
        or, with auto, one number per structure of ``ds`` from its subset's ``copies_per_epoch``
        in the data set (written by augment's copies: auto with pool > 1; 0 there: all of the subset's copies),
        None when no subset records one."""
        c = self.cfg.training.copies_per_epoch
        if self._plain_energy_loss() or self.cfg.training.optimizer == "lbfgs":
            return None         # (lbfgs: one fixed loss over every copy, or its line search compares nothing)
        if c != "auto":
            return int(c) if c > 0 else None
        per = self._recorded_draws(ds)
        if not per.any():
            return None
        return per[np.asarray(ds.subset_ids, dtype=np.int64)]

    def _plain_energy_loss(self) -> bool:
        """Energy mode without the copy-difference term (the paper's loss): it trains on every
        copy each epoch.  Drawing M of a pool of 3M per epoch gave it 2x the errors at equal cost
        in make demo (each copy's energy is fitted on its own, and a copy seen a third as often is
        fitted worse; docs/results.md, thirteenth session), while the difference loss and the
        hybrid gained from the draws."""
        return not self.force_mode and self.cfg.training.difference_weight <= 0

    @staticmethod
    def _recorded_draws(ds) -> np.ndarray:
        """Copies per epoch that ``ds`` records per subset (augment's pool; 0: none)."""
        return np.array([int(t.get("copies_per_epoch") or 0) for t in ds.subsets], dtype=np.int64)

    def _diff_groups(self, ds):
        """Group key per structure of ``ds`` for the stream: a paired copy joins its parent's
        group (None: no pairs, or neither a difference term nor a draw uses them: structures
        stream alone)."""
        t = (self._diff or {}).get(id(ds))
        if t is None or (self._gamma <= 0 and self._draws(ds) is None):
            return None
        g = np.arange(ds.n_structures, dtype=np.int64)
        m = t[0] >= 0
        g[m] = t[0][m]
        return g

    def _pairs(self, batch, ds=None):
        """(copy positions, parent positions, |x_c - x_p|) of the batch's paired copies, or None."""
        if self._gamma <= 0:
            return None
        t = self._diff.get(id(self.ds if ds is None else ds))
        if t is None:
            return None
        # a loader's kept batch comes back every epoch with the same structures: its pairs too
        kept = getattr(batch, "__dict__", {}).get("_pairs")
        if kept is not None and kept[0] is t:
            return kept[1]
        pairs = self._find_pairs(batch, t)
        if hasattr(batch, "__dict__"):
            batch.__dict__["_pairs"] = (t, pairs)
        return pairs

    @staticmethod
    def _find_pairs(batch, t):
        idx = batch.index.cpu().numpy()
        par = t[0][idx]
        c = np.flatnonzero(par >= 0)
        if len(c) == 0:
            return None
        order = np.argsort(idx, kind="stable")
        k = np.searchsorted(idx, par[c], sorter=order)
        k = np.minimum(k, len(idx) - 1)
        p = order[k]
        ok = idx[p] == par[c]
        if not ok.all():      # a parent outside the batch cannot happen with grouped streams
            c, p = c[ok], p[ok]
        dev = batch.energy.device
        return (torch.as_tensor(c, device=dev), torch.as_tensor(p, device=dev),
                torch.as_tensor(t[1][idx[c]], dtype=torch.float64, device=dev))

    def _norm_batches(self):
        tc = self.cfg.training
        bs = tc.batch_structures if tc.batch_structures > 0 else 1 << 30
        from ..data.stream import PartitionedStream

        st = PartitionedStream(self.ds, self.train_idx, self.ctx.rank, self.ctx.world_size,
                               tc.batch_atoms, bs, tc.seed, shuffle=False, prefetch=False,
                               loader=self.stream.loader if getattr(self, "graphs", None) is None else self.graphs)
        for structures in st.epoch(0):
            if structures:
                yield self.collate(structures, self.ds)

    def _setup_model(self):
        mc, dc, tc = self.cfg.model, self.cfg.descriptor, self.cfg.training
        torch.manual_seed(tc.seed)
        np.random.seed(tc.seed % (2 ** 32))
        import random

        random.seed(tc.seed)
        fit = True
        if self._resume_state is not None:
            self.model = BPNN.from_payload(self._resume_state["model"], source=str(self._resume_path),
                                           backend=dc.backend)
            fit = False
            if tc.warm_start:         # a resumed fine-tuning run: config.yaml as its first part wrote it
                self._adopt_warm_start_architecture()
        elif tc.warm_start:
            self.model = BPNN.load(tc.warm_start, backend=dc.backend)
            self._prior_record = self.model.training_record      # overwritten below: kept to merge
            missing = [s for s in self.ds.species if s not in self.model.species]
            if missing:
                # a new element changes the descriptor's type weights of every element (aenet's
                # typespin runs over the species list), so no network could be kept
                raise ConfigError(f"training.warm_start: model {tc.warm_start} has no network for "
                                  f"{missing} present in {self.cfg.data.train}; an element cannot be added to a "
                                  f"trained model (the descriptor's type weights of every element depend on the "
                                  f"species list): train a new model on all the data (model.species may list "
                                  f"elements a first model has no data for yet, so that later warm starts can "
                                  f"add their data)")
            fit = tc.refit_normalization
            self._log(f"warm start from {tc.warm_start}" + (" (refitting normalisation)" if fit else ""))
            self._adopt_warm_start_architecture()
            self._adopt_reference_energies()
        else:
            species = mc.species or list(self.ds.species)
            missing = [s for s in self.ds.species if s not in species]
            if missing:
                raise ConfigError(f"model.species: {missing} occur in {self.cfg.data.train} but are not listed")
            ref = mc.reference_energies
            if ref is None and getattr(self.ds, "reference_energies", None):
                ref = dict(self.ds.reference_energies) or None
                for path, elements in (getattr(self.ds, "undeclared_references", []) if self.rank0 and not self.quiet
                                       else []):
                    # (sweep 17: merged silently; files from another code or setting sit on another zero)
                    warn(f"data.train: {path} declares no reference energy for {elements}, which another "
                               f"training file declares ({', '.join(f'{e} {ref[e]:g} eV' for e in elements)}): its "
                               f"energies are taken on that zero; if it comes from another code or setting, "
                               f"declare its references (convert --reference-energies) or set "
                               f"model.reference_energies")
            zbl = None
            if self.cfg.zbl.enabled:
                # ZBL's default radii kept off the training structures (models/zbl.py); the
                # record is computed here once and reused below
                from ..models.data_record import dataset_record
                from ..models.zbl import DATA_MARGIN, radii_for_data

                minima: list = []
                record = dataset_record(self.ds, self.stream.partition(), species, dc.spec.cutoff, self.ctx,
                                        minima=minima)
                self._check_coincident(record, minima)
                self._check_cutoff(record)
                radii, lowered = radii_for_data(species, self.cfg.zbl.radii, record["pair_min_distance_A"])
                for key, hi, new, d in lowered:
                    self._log(f"zbl: {key} outer radius {hi:.3f} -> {new:.3f} A ({DATA_MARGIN:g} x the shortest "
                              f"{key} distance of the training data, {d:.3f} A): ZBL stays off the training "
                              f"structures (zbl.radii sets it explicitly)")
                zbl = {"radii": radii}
                self._early_record = record
            self.model = BPNN(species, dc.spec, mc.hidden, mc.activation, mc.dtype, ref, zbl=zbl,
                              backend=dc.backend)
            if zbl is not None and getattr(self.model, "zbl", None) is not None:
                self._zbl_clear = self._structures_beyond_zbl(species, minima)
        if self._resume_state is None and getattr(self, "_early_record", None) is None:
            # the record pass (shortest pairs, lowest energies) before any descriptor is computed:
            # atoms on top of each other give NaN descriptors, which must be named, not trained on
            from ..models.data_record import dataset_record

            minima = []
            self._early_record = dataset_record(self.ds, self.stream.partition(), self.model.species,
                                                self.model.cutoff, self.ctx, minima=minima)
            self._check_coincident(self._early_record, minima)
            self._check_cutoff(self._early_record)
            if tc.warm_start:
                self._check_energy_zero()
        self.model.to(self.device)
        self._setup_cache()
        self._setup_graphs()
        if fit:
            t0 = time.time()
            # a warm start's refit keeps the model's energies (the networks' first and last
            # layers absorb the new statistics) and what it knows of elements the new data lack
            refit = (self.model.refit_normalization_keeping_function if tc.warm_start and self._resume_state is None
                     else self.model.fit_normalization)
            summary = refit(self._norm_batches(), ctx=self.ctx, descriptor=mc.normalize_descriptor,
                            energy=mc.energy_shift, scale=mc.energy_scale is not False,
                            min_scale=(self._force_rms() * 1.0 if self.force_mode
                                       and mc.energy_scale == "auto" else None))
            self._energy_rms = summary.get("energy_residual_rms")
            self._log(f"normalisation fitted on {summary['n_structures']} structures in {time.time() - t0:.1f} s: "
                      f"shift {', '.join(f'{k} {v:.4f}' for k, v in summary['energy_shift'].items())} eV/atom, "
                      f"scale {summary['energy_scale']:.4g} eV/atom"
                      + (f" (energy residual RMS {summary['energy_residual_rms']:.4g}; RMS force "
                         f"{self._force_rms():.4g} eV/A x 1 A sets the floor in force mode)"
                         if self.force_mode and "energy_residual_rms" in summary else ""))
            absent = summary.get("absent_species") or []
            if absent and tc.warm_start and self._resume_state is None:
                self._log(f"normalisation: {absent} have no atoms in the training split; the model's statistics "
                          f"and energy shift for them are kept")
            elif absent and self.rank0 and not self.quiet:
                held = [s for s in absent if s in set(self.ds.species) | set(getattr(self.val_ds, "species", ()))]
                warn(f"{absent} have no atoms in the training split"
                     + (f" ({held} only in the structures held out for validation or test)" if held else "")
                     + ": their networks stay untrained and predict the mean energy per atom of the other "
                     "elements; train on structures that contain them, or drop them from model.species")
            fl = summary.get("floored_features")
            if fl and self.rank0 and not self.quiet:
                warn(f"descriptor features that barely vary in the training data ({', '.join(f'{k}: {v}' for k, v in fl.items())} "
                     f"of {self.model.ann.dim}, spread below {100 * FEATURE_STD_FLOOR:g} % of their size; e.g. a bulk "
                     f"cell at one lattice constant): their scale is floored, but the model has not seen those "
                     f"environments change (strain, other densities) and will extrapolate there")
        # shortest pair distances and lowest energies of the training data, saved with the model
        # (md-check and the calculator warn below them; models/data_record.py)
        from ..models.data_record import dataset_record, merge_records
        prior = None
        if tc.warm_start:   # the loaded model's record; a resumed fine-tuning run's from its checkpoint
            if self._resume_state is not None:
                self._prior_record = self._warm_start_record()
            prior = self._prior_record
            if prior and float(prior.get("cutoff_A", -1)) != float(self.model.cutoff):
                prior = None
        early = getattr(self, "_early_record", None)
        if early is not None and float(early["cutoff_A"]) == float(self.model.cutoff):
            self.model.training_record = early
        else:
            self.model.training_record = dataset_record(self.ds, self.stream.partition(), self.model.species,
                                                        self.model.cutoff, self.ctx)
        if self.model.training_record:
            self.model.training_record = {**self.model.training_record, "data": [self.ds.content_id]}
        if prior:
            # a fine-tuned model has seen its first data too: md-check and the calculator judge
            # against both (the fine-tuning data alone called the first data's pairs unseen)
            self.model.training_record = merge_records([prior, self.model.training_record])
        self._log(f"model: {self.model.describe()}, {sum(p.numel() for p in self.model.parameters())} parameters")
        self._log(f"backend: {self.model.plan().describe()}")

    def _adopt_reference_energies(self) -> None:
        """A warm start takes the reference energies (eV per free atom) that the config or the new
        data declare, where they differ from the loaded model's: the networks' energies are
        relative to them, so new DFT data whose energy zero moved (another code, pseudopotential
        or setting: the data then declare other references) are predicted with the networks
        kept.  Before, the model kept its own references silently and its networks had to learn
        an offset of eV per atom (sweep 14: 2.5 eV/atom error after 40 epochs, 30 meV/atom for a
        fresh run).  The record of the first data moves with them (md-check's lowest energies)."""
        from ..models.data_record import shift_energies

        mc, ann = self.cfg.model, self.model.ann
        declared, where = mc.reference_energies, "model.reference_energies"
        if declared is None:
            declared, where = dict(getattr(self.ds, "reference_energies", None) or {}), f"{self.cfg.data.train}"
            declared = {k: v for k, v in declared.items() if k in ann.species}
        unknown = [k for k in declared if k not in ann.species]
        if unknown:
            raise ConfigError(f"{where}: {unknown} are not species of the warm-start model {self.cfg.training.warm_start} "
                              f"({ann.species})")
        old = ann.reference_energies()
        delta = {k: float(v) - float(old.get(k, 0.0)) for k, v in declared.items() if float(v) != float(old.get(k, 0.0))}
        if not delta:
            return
        with torch.no_grad():
            for k, d in delta.items():
                ann.reference_energy[ann.species.index(k)] += d
        self._prior_record = shift_energies(getattr(self, "_prior_record", None), delta)
        self._reference_shift = delta
        self._log(f"warm start: reference energies from {where}: "
                  + ", ".join(f"{k} {old.get(k, 0.0):g} -> {old.get(k, 0.0) + d:g}" for k, d in delta.items())
                  + " eV (the model's energies move by these per atom; its networks are kept)")

    def _check_energy_zero(self) -> None:
        """Warn when the new data's lowest energies per atom lie eV away from the warm-start
        model's training data for the same compositions (after any adopted reference energies):
        another energy zero that no reference energy accounts for, which the networks would have
        to learn as an offset."""
        from ..models.data_record import energy_zero_offset

        found = energy_zero_offset(getattr(self, "_prior_record", None), self._early_record)
        if found is None or not self.rank0 or self.quiet:
            return
        off, n = found
        if abs(off) > ENERGY_ZERO_WARN_EV:
            warn(f"training.warm_start: the lowest energies per atom of {self.cfg.data.train} lie {off:+.3g} eV/atom "
                 f"from those of the model's training data ({self.cfg.training.warm_start}; median over {n} shared "
                 f"compositions): another DFT code or setting?  Declare each data set's energy zero "
                 f"(convert --reference-energies, or model.reference_energies) so the warm start adopts it; "
                 f"otherwise the networks must learn the offset")

    def _warm_start_record(self) -> dict | None:
        """The training-data record of the warm-start model as the run loaded it, kept in the
        checkpoint: the file may have changed or gone since (an in-place warm start moves it to
        previous-*, sweep 14).  Checkpoints written before they kept it: read from the file (None
        if it has none or is gone)."""
        if "warm_start_record" in self._resume_state:
            return self._resume_state["warm_start_record"]
        try:
            return BPNN.load(self.cfg.training.warm_start).training_record
        except Exception:
            return None

    def _check_cutoff(self, record: dict) -> None:
        """Stop when no pair of atoms of the training data lies within the descriptor's cutoff
        (every descriptor is zero: the model learns the per-element shift only; rc 1.5 A on Cu/Au
        trained to 74 meV/atom against 7 at 5 A, exit 0), and warn when no pair lies within the
        angular cutoff (the angular features are zero).  Names the cutoff and the shortest
        distance in the data."""
        spec = self.cfg.descriptor.spec
        rc_r = float(getattr(spec, "rc_radial", spec.cutoff))
        rc_a = getattr(spec, "rc_angular", None)
        found = [d for d in (record.get("pair_min_distance_A") or {}).values() if d is not None]
        d_min = min(found) if found else None
        if d_min is not None and d_min < rc_r and (rc_a is None or d_min < float(rc_a)):
            return
        if d_min is None or d_min >= rc_r:
            if d_min is None:
                from ..data.validate import min_interatomic_distance

                idx = np.asarray(self.train_idx)[:200]
                ds = [min_interatomic_distance(s, 20.0)[0] for s in self.ds.read(idx)] if len(idx) else []
                d_min = min(ds) if ds else None
            where = (f"{d_min:.3f} A" if d_min is not None and np.isfinite(d_min) else "beyond 20 A")
            raise ConfigError(f"descriptor.rc_radial: {rc_r:g} A is below every interatomic distance of the training "
                              f"data {', '.join(map(str, self.cfg.data.train))} (the shortest is {where}): every atom's "
                              f"descriptor is zero and the model could learn only one energy per element; raise "
                              f"rc_radial (and rc_angular) above the bond lengths (typically 4-7 A)")
        if self.rank0 and not self.quiet:
            warn(f"descriptor.rc_angular: {float(rc_a):g} A is below every interatomic distance of the training data "
                 f"{', '.join(map(str, self.cfg.data.train))} (the shortest is {d_min:.3f} A): the angular features "
                 f"are zero for every atom and the model sees no bond angles; raise rc_angular above the "
                 f"nearest-neighbour distance (typically 3.5-4.5 A)")

    def _check_coincident(self, record: dict, minima: list) -> None:
        """Stop on atoms on top of each other in the training data (convert --min-distance 0 lets
        them through): they made ZBL's radii zero ('must satisfy 0 < inner < outer', no
        structure named) or the descriptors NaN ('non-finite loss', every structure of the batch
        named).  Names the pair, its distance and, on the rank that holds it, the structure."""
        bad = {k: d for k, d in (record.get("pair_min_distance_A") or {}).items()
               if d is not None and d < COINCIDENT_A}
        if not bad:
            return
        key, d = min(bad.items(), key=lambda kv: kv[1])
        where = "a structure on another rank"
        if minima:
            rows = np.concatenate(minima)
            col = list(record["pair_min_distance_A"]).index(key)
            hit = np.flatnonzero(rows[:, col] < COINCIDENT_A)
            if len(hit):
                i = int(np.asarray(self.stream.partition())[hit[0]])
                src = self.ds.column("source")[i]
                where = f"structure {i}" + (f" (source {src}, index {int(self.ds.column('source_index')[i])})"
                                            if src else "")
        raise DataFormatError(f"{self.cfg.data.train}: {where}: a {key} pair at {d:.3g} A (atoms on top of each "
                              f"other, below {COINCIDENT_A} A): remove it (convert's default --min-distance "
                              f"rejects such structures)")

    def _adopt_warm_start_architecture(self) -> None:
        """A warm start fine-tunes the loaded model's weights, so its descriptor, layers,
        activations and ZBL term are the run's, whatever the config says: say which of the
        config's settings differ (they are ignored; a silent mismatch had config.yaml record an
        architecture the model did not have), and write the model's into config.yaml."""
        import copy

        m, mc, dc, tc = self.model, self.cfg.model, self.cfg.descriptor, self.cfg.training
        spec = m.spec
        cfg_act = [mc.activation] * len(mc.hidden) if isinstance(mc.activation, str) else list(mc.activation)
        diffs = [(f"descriptor.{k}", getattr(dc.spec, k), getattr(spec, k))
                 for k in ("type", "rc_radial", "n_radial", "rc_angular", "n_angular")
                 if getattr(dc.spec, k) != getattr(spec, k)]
        if list(mc.hidden) != list(m.ann.hidden):
            diffs.append(("model.hidden", list(mc.hidden), list(m.ann.hidden)))
        if (cfg_act != list(m.activations) if len(cfg_act) == len(m.activations)
                else set(cfg_act) != set(m.activations)):
            diffs.append(("model.activation", mc.activation, list(m.activations)))
        if bool(self.cfg.zbl.enabled) != (m.zbl is not None):
            diffs.append(("zbl.enabled", bool(self.cfg.zbl.enabled), m.zbl is not None))
        if not diffs:
            return
        if self.rank0 and not self.quiet:
            warn(f"training.warm_start: the model {tc.warm_start} keeps its own architecture; these settings of "
                 f"the config differ and are ignored: "
                 + "; ".join(f"{k}: {a!r} (model: {b!r})" for k, a, b in diffs)
                 + (".  The model has no ZBL repulsion: nothing keeps atoms apart below the training data's "
                    "shortest distances" if m.zbl is None and self.cfg.zbl.enabled else "")
                 + ".  To change the architecture, train a new model (no warm_start)")
        eff = copy.deepcopy(self.cfg)      # what config.yaml records; the checkpoint keeps the given
        eff.descriptor.spec = spec
        eff.model.hidden = list(m.ann.hidden)
        eff.model.activation = list(m.activations)
        eff.zbl.enabled = m.zbl is not None
        self._cfg_effective = eff

    def _structures_beyond_zbl(self, species, minima) -> np.ndarray:
        """[n_structures] bool over the training set: True for this rank's training structures
        whose every pair lies at or beyond its ZBL outer radius (per-structure minima from the
        record pass), whose ZBL energies are therefore exactly zero.  With the default radii kept
        off the training data (models/zbl.py) that is every structure, and the cached-descriptor
        path skips their pair lists (a neighbour list per structure: most of the set-up time of an
        energy run on many small structures)."""
        clear = np.zeros(self.ds.n_structures, dtype=bool)
        if not minima:
            return clear
        r_out = self.model.zbl.short_range
        radius = np.array([r_out[a, a + k] for a in range(len(species)) for k in range(len(species) - a)],
                          dtype=np.float64)
        def mark(indices, blocks):
            # compared in float64: a row understates its distances, so "clear" is never wrong
            if blocks:
                ok = np.concatenate([(b.astype(np.float64) >= radius[None, :]).all(axis=1) for b in blocks])
                clear[np.asarray(indices, dtype=np.int64)[ok]] = True

        mark(self.stream.partition(), minima)
        if self.val_stream is not None and self.val_ds is self.ds and len(self.val_stream.partition()):
            # this rank's validation structures of the same file too (they share the loader):
            # their ZBL energies were otherwise computed from pair lists at the first validation
            from ..models.data_record import dataset_record

            rows: list = []
            dataset_record(self.ds, self.val_stream.partition(), species, self.model.cutoff, None, minima=rows)
            mark(self.val_stream.partition(), rows)
        return clear

    def _setup_cache(self):
        """Descriptor cache (energy mode; ZBL energies are constants of each structure there,
        models/zbl.py): stream cached descriptors instead of recomputing them
        (``descriptor.cache``; docs/training.md)."""
        dc = self.cfg.descriptor
        mode = getattr(dc, "cache", "off")
        if mode == "off" or self.force_mode:
            if mode == "on" and self.force_mode:
                warn("descriptor.cache: on is ignored in force mode (positions needed)")
            return
        from ..descriptors.featurize import open_or_build

        spec, kernels = self.model.spec, self.model.plan().descriptor
        t0 = time.time()
        self.cache = open_or_build(self.ds, self.model.species, spec, kernels, dc.cache_file, mode, self.ctx,
                                   log_fn=self._log, warn_fn=warn)
        if self.val_ds is self.ds:
            self.val_cache = self.cache
        elif self.val_stream is not None:
            vpath = None if not dc.cache_file else str(dc.cache_file) + ".val.h5"
            self.val_cache = open_or_build(self.val_ds, self.model.species, spec, kernels, vpath, mode, self.ctx,
                                           log_fn=self._log, warn_fn=warn)
        if self.cache is not None:
            mine = self.stream.partition()
            if self.val_stream is not None and self.val_cache is self.cache:
                mine = np.concatenate([mine, self.val_stream.partition()])
            self.cache.preload(mine)
            if self.val_cache is not None and self.val_cache is not self.cache and self.val_stream is not None:
                self.val_cache.preload(self.val_stream.partition())
            self._log(f"descriptor cache: {self.cache.path} ({time.time() - t0:.1f} s)")

    def _setup_graphs(self):
        """Prepared structures (species, positions, neighbour pairs) computed once per run for
        the streams that do not read cached descriptors: the neighbour lists of fixed training
        structures need not be rebuilt every epoch; with fixed batches the assembled batches are
        kept too.  Filled by the first pass (the normalisation fit, else the first epoch).
        Memory per rank: the training data's within data.neighbor_cache_mb (half for the
        prepared structures, half for the kept batches), a separate validation set's within a
        quarter of it more (beyond a budget, structures and batches are prepared when used)."""
        from ..descriptors.batch import BatchStore, GraphStore

        from ..descriptors.featurize import FeatureBatchLoader

        budget = int(self.cfg.data.neighbor_cache_mb) << 20
        fixed = self.stream.fixed_batches and budget > 0
        graph_budget, batch_budget = (budget // 2, budget // 2) if fixed else (budget, 0)
        store = None
        zbl = getattr(self.model, "zbl", None)
        frozen = None if zbl is None else (lambda structures: zbl.frozen_atomic_energies(structures, "cpu", memo=False))
        short_range = 0.0 if zbl is None else zbl.short_range
        if self.cache is None:
            # the record's minima show which structures no ZBL radius reaches: their short pairs
            # are none without measuring each pair (a fifth of preparing a 32-atom cell)
            store = GraphStore(self.ds, self.model.species, self.model.cutoff, graph_budget, short_range,
                               short_clear=getattr(self, "_zbl_clear", None))
            self.stream.loader = BatchStore(store, batch_budget, device=self.device) if fixed else store
        else:       # cached descriptors: batches from in-memory columns, no read per batch
            self.stream.loader = FeatureBatchLoader(self.cache, self.ds, self.model.species, frozen, batch_budget,
                                                    frozen_zero=getattr(self, "_zbl_clear", None))
        if self.val_stream is not None:
            # the validation batches are the same every epoch
            vb = budget // 8
            if self.val_cache is not None:
                # the training loader keeps no batch where each epoch forms new ones (a pool of
                # copies): the validation batches, the same every epoch, get a loader that keeps them
                self.val_stream.loader = (self.stream.loader if self.val_cache is self.cache and fixed
                                          else FeatureBatchLoader(self.val_cache, self.val_ds, self.model.species,
                                                                  frozen, 2 * vb,
                                                                  frozen_zero=getattr(self, "_zbl_clear", None)
                                                                  if self.val_ds is self.ds else None))
            else:
                vstore = store if (self.val_ds is self.ds and store is not None) else \
                    GraphStore(self.val_ds, self.model.species, self.model.cutoff, vb, short_range)
                self.val_stream.loader = BatchStore(vstore, vb, device=self.device) if budget > 0 else vstore
            self.val_stream.prefetch = False       # a few batches once per epoch: no thread
        self.graphs = store

    def _setup_optim(self):
        tc = self.cfg.training
        # the parameters become views of one flat tensor, which the optimiser updates (one fused
        # call per step instead of a loop over a few dozen small tensors; see flat.py)
        self.flat = FlatParameters(self.model)
        params = self.flat.tensors
        avoid_dynamo_import()
        if tc.optimizer in ("adamw", "adam") and self.force_mode and self.rank0 and not self.quiet \
                and self._resume_state is None and self._auto_lbfgs_reason() is None:
            self._log(f"hint: force training of {self._train_atoms()} atoms: training.optimizer: auto (adamw, then "
                      "lbfgs once adamw stalls) reached lower force errors than adamw alone on force-labelled sets "
                      "of up to 46,000 atoms (docs/training.md \"Choosing the optimizer\")")
        if len(params) != 1 and self._auto_switch:
            self._auto_switch = False       # (L-BFGS works on one flat tensor; mixed dtypes or devices)
        if self.phase == "adamw":
            self.opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay,
                                         **fused_adam_kwargs(params))
        elif tc.optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay,
                                        **fused_adam_kwargs(params))
        elif self.phase == "lbfgs":
            from .lbfgs import LBFGS

            if len(params) != 1:
                raise ConfigError("training.optimizer: lbfgs needs all parameters in one dtype and device")
            self.opt = LBFGS(params[0], history=tc.lbfgs_history)
        else:
            self.opt = torch.optim.SGD(params, lr=tc.lr, weight_decay=tc.weight_decay)
        # the weights' moving average (training.ema): AdamW's steps only; L-BFGS descends
        # without noise to average
        self._ema = ([t.detach().clone() for t in params]
                     if tc.ema > 0 and self.phase in ("adamw", "adam", "sgd") else None)
        self._use_avg = False     # the last validation preferred the average (_end_epoch)
        if self.sched_kind == "plateau":
            patience = self._plateau_patience()
            self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.opt, factor=tc.plateau_factor, patience=patience, min_lr=tc.min_lr)
            if patience > tc.plateau_patience:
                self._log(f"scheduler: plateau patience {patience} epochs (at least "
                          f"training.plateau_min_steps = {tc.plateau_min_steps} steps of "
                          f"{self.stream.steps(0)} per epoch)")
        elif self.sched_kind == "cosine":
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(tc.epochs, 1),
                                                                    eta_min=tc.min_lr)
        else:
            self.sched = None

    def _plateau_patience(self) -> int:
        """Epochs without improvement before the plateau scheduler lowers the learning rate:
        plateau_patience, but at least plateau_min_steps optimizer steps.  Small data sets have
        a few steps per epoch, and 10 epochs of them are too few for the validation loss to
        move: with 3 steps per epoch the learning rate fell to its minimum before the networks
        had learnt anything (docs/results.md, "Learning-rate schedule")."""
        tc = self.cfg.training
        per = max(1, int(self.stream.steps(0)))
        return max(tc.plateau_patience, -(-tc.plateau_min_steps // per))

    def _restore(self, st):
        tc = self.cfg.training
        self.opt.load_state_dict(self.flat.optimizer_state(st["optimizer"], self.opt))
        if self.sched is not None and st.get("scheduler") is not None:
            if st.get("scheduler_kind") == self.sched_kind:
                self.sched.load_state_dict(st["scheduler"])
            else:
                warn(f"scheduler changed since the checkpoint ({st.get('scheduler_kind')} -> {self.sched_kind}): "
                     f"the new one starts at the resumed epoch")
                if isinstance(self.sched, torch.optim.lr_scheduler.CosineAnnealingLR):
                    # on the cosine at this epoch, not a cosine restarted there (sweep 13: a run
                    # switched to cosine at epoch 42 of 150 ended at 9e-4 instead of min_lr)
                    self.sched.last_epoch = int(st["epoch"])
                    self._cosine_placed = True
        changes = getattr(self, "_resume_changes", {})
        # settings of the new configuration override what the checkpoint's state dicts restored
        for g in self.opt.param_groups:
            if "training.lr" in changes:
                g["lr"] = tc.lr
            if "training.weight_decay" in changes:
                g["weight_decay"] = tc.weight_decay
        if isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.sched.factor, self.sched.patience = tc.plateau_factor, self._plateau_patience()
            self.sched.min_lrs = [tc.min_lr] * len(self.opt.param_groups)
        elif isinstance(self.sched, torch.optim.lr_scheduler.CosineAnnealingLR):
            self.sched.T_max, self.sched.eta_min = max(tc.epochs, 1), tc.min_lr
        if "training.lr" in changes and isinstance(self.sched, torch.optim.lr_scheduler.CosineAnnealingLR):
            self.sched.base_lrs = [tc.lr] * len(self.opt.param_groups)
        if (isinstance(self.sched, torch.optim.lr_scheduler.CosineAnnealingLR)
                and ({"training.epochs", "training.lr", "training.min_lr"} & set(changes)
                     or getattr(self, "_cosine_placed", False))):
            # torch's cosine schedule updates the rate from its last value: a run extended after
            # its schedule ended stayed at min_lr for every added epoch, and trained on without
            # learning (sweep 11).  The rate is set to the cosine over the new epoch count at
            # this epoch, from where the schedule continues
            T, t = max(tc.epochs, 1), min(int(self.sched.last_epoch), max(tc.epochs, 1))
            for g, base in zip(self.opt.param_groups, self.sched.base_lrs):
                g["lr"] = tc.min_lr + (base - tc.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t / T))
            self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]
            self._log(f"resume: cosine schedule over {T} epochs, learning rate {self.opt.param_groups[0]['lr']:.3g} "
                      f"at epoch {t}")
        self.epoch, self.step_in_epoch = int(st["epoch"]), int(st["step"])
        self.global_step = int(st["global_step"])
        if self._ema is not None:
            if st.get("ema") is not None:
                for t, v in zip(self._ema, st["ema"]):
                    t.copy_(v)
                self._use_avg = bool(st.get("ema_chosen", False))
            else:       # (a checkpoint without one: ema was 0, or written before the setting)
                self._log("resume: the checkpoint has no moving average of the weights; training.ema "
                          f"{tc.ema:g} starts one at the resumed weights")
        self.best, self.bad_epochs = float(st["best"]), int(st["bad_epochs"])
        loss_keys = sorted(set(changes) & {"training.alpha", "training.beta", "training.difference_weight",
                                           "training.loss"})
        if loss_keys:
            # the checkpoint's best loss is on the old loss's scale: compared with the new one,
            # a larger weight never found a new best model and the plateau scheduler halved the
            # rate every patience (sweep 13); both start afresh on the new loss
            self.best, self.bad_epochs = float("inf"), 0
            if isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.sched.best, self.sched.num_bad_epochs = self.sched.mode_worse, 0
            self._log(f"resume: the loss changed ({', '.join(loss_keys)}): the best validation loss and the plateau "
                      f"count start afresh (best_model.pt is replaced by the first model on the new loss)")
        self._check_best_file()
        if st.get("loss_state") is not None:
            self._prev_rmse = tuple(float(x) for x in st["loss_state"])
        if st.get("loss_spread") is not None:
            self._spread_cache = tuple(float(x) for x in st["loss_spread"])
        # the interrupted epoch's error sums of ALL ranks (reduced when the checkpoint was
        # written); rank 0 alone adds them back, so the epoch's reduction counts them once
        self.partial = st.get("partial") if self.ctx.rank == 0 else None
        ckpt.set_rng_state(st["rng"])
        self._log(f"resumed from {self._resume_path}: epoch {self.epoch + 1}, step {self.step_in_epoch}")
        for k, (a, b) in sorted(changes.items()):
            self._log(f"resume: {k} changed from {a!r} to {b!r} (applied)")

    def _check_best_file(self) -> None:
        """A resumed run copies best_model.pt to model.pt at its end: a damaged one (a truncated
        copy, a full disk in another tool) became an unreadable model.pt with exit 0 (sweep 13).
        Checked here (on rank 0, the answer shared: every rank keeps the same best); a missing
        one means the best is tracked afresh."""
        if self.val_stream is None or not math.isfinite(self.best):
            return
        best = self.out / "best_model.pt"
        state = None
        if self.rank0:
            if not best.exists():
                state = "missing"
            else:
                from ..utils.io import load_torch_file

                try:
                    load_torch_file(best, "best model")          # checksums too
                    state = "ok"
                except DataFormatError as exc:
                    state = str(exc)
        if self.ctx.world_size > 1:
            state = self.ctx.broadcast_object(state)
        if state == "missing":
            self._log(f"resume: {best} is missing: the best validation loss is tracked afresh")
            self.best = float("inf")
        elif state != "ok":
            raise DataFormatError(f"{state}  It is the best model of the run being resumed: remove it to resume "
                                  f"(the best model is then tracked from the resumed epoch on)")

    # ------------------------------------------------------------------ batches and steps
    def collate(self, structures, ds=None):
        """Batch of ``structures`` of data set ``ds`` (default: the training set): cached
        descriptors when a cache of that data set is active, else a full ``collate``; bootstrap
        multiplicities are applied to the weights of training structures."""
        from ..descriptors.batch import Batch, Graph, collate, collate_graphs
        from ..descriptors.featurize import FeatureBatch

        ds = self.ds if ds is None else ds
        cache = self.cache if ds is self.ds else (self.val_cache if ds is self.val_ds else None)
        if isinstance(structures, Batch):     # assembled by the loader (BatchStore): shared, not mutated
            batch = structures if structures.positions.device == self.device else structures.to(self.device)
        elif isinstance(structures, FeatureBatch):
            batch = structures.to(self.device) if self.device.type != "cpu" else structures
        elif structures and isinstance(structures[0], Graph):
            batch = collate_graphs(structures, dtype=torch.float64, device=self.device)
        elif cache is not None:
            from ..descriptors.featurize import feature_batch

            batch = feature_batch(structures, cache, self.model.species, self.device)
        else:
            batch = collate(structures, species=self.model.species, cutoff=self.model.cutoff,
                            dtype=torch.float64, device=self.device)
        if self.sample_multiplier is not None and ds is self.ds:
            m = self.sample_multiplier[batch.index.cpu().numpy()]
            if isinstance(batch, Batch):
                # a new Batch object: a loader's batch may be shared between epochs
                w = batch.weight * torch.as_tensor(m, dtype=torch.float64, device=batch.weight.device)
                batch = dataclasses.replace(batch, weight=w)
            else:
                # a kept feature batch comes back every epoch: weigh its stored weights, once
                # (multiplying batch.weight in place compounded the multiplicities, 2**epoch)
                base = batch.__dict__.setdefault("_unweighted", batch.weight)
                batch.weight = base * torch.as_tensor(m, dtype=torch.float64, device=base.device)
        return batch

    def _selected(self, batch, ds=None):
        """[B] bool: the batch's structures in the force loss (``ds``: the batch's data set, the
        training set's by default)."""
        return torch.as_tensor(self._force_loss_selection(batch.index.cpu().numpy(), ds),
                               device=batch.index.device)

    def _force_loss_selection(self, idx, ds=None) -> np.ndarray:
        """bool per structure index of ``ds`` (default the training set): force_fraction's
        selection less the training set's structures with force outliers (:meth:`_force_excluded`)."""
        tc = self.cfg.training
        sel = force_selection(idx, tc.seed, tc.force_fraction)
        ex = self._force_excluded() if ds is None or ds is self.ds else None
        return sel if ex is None else sel & ~ex[np.asarray(idx, dtype=np.int64)]

    def _reported_forces(self, batch, ds=None):
        """[B] bool: the batch's structures whose force errors the logs report, or None (all with
        forces): not the force outliers left out of the loss, whose errors against broken labels
        would swamp the figure (a single such atom dominates an RMSE over thousands)."""
        ex = self._force_excluded() if ds is None or ds is self.ds else None
        if ex is None:
            return None
        keep = ~torch.as_tensor(ex[batch.index.cpu().numpy()], device=batch.has_forces.device)
        return batch.has_forces & keep

    def _force_excluded(self) -> np.ndarray | None:
        """bool per structure of the training set: an atom's force far beyond its element's typical
        one (data.validate.force_outliers; per-element medians over the training structures from
        a histogram of |F|, the few suspects read and judged exactly), so its forces stay out of the
        force loss (training.force_outliers: exclude; None: none, or 'keep').  A few such atoms
        dominate the force loss, and the trimmed force scale alone did not stop them ruining the
        model (docs/results.md, sweep 15 and the eighth session)."""
        if getattr(self, "_force_excluded_cache", None) is None:
            self._force_excluded_cache = (self._find_force_outliers(),)
        return self._force_excluded_cache[0]

    def _find_force_outliers(self) -> np.ndarray | None:
        from ..data.validate import (FORCE_OUTLIER_MIN_ATOMS, FORCE_OUTLIER_RATIO_UNBALANCED, force_outliers,
                                     rare_element_scales)

        if not self.force_mode or self.cfg.training.force_outliers == "keep":
            return None
        use = np.zeros(self.ds.n_structures, dtype=bool)
        use[self.train_idx] = True
        use &= np.asarray(self.ds.column("has_forces"), dtype=bool)
        atom_ok = np.repeat(use, self.ds.natoms)
        shard_base = np.cumsum([0] + [sh.n_atoms for sh in self.ds._shards])
        edges = np.arange(-30.0, 30.0 + 1e-9, 0.005)        # log10 |F| bins: medians to about 1 %
        hist: dict[int, np.ndarray] = {}
        top: dict[int, float] = {}
        blocks = zip(self.ds.iter_atom_blocks("forces"), self.ds.iter_atom_blocks("numbers"))
        for (k, a, F), (_, _, Z) in blocks:
            m = atom_ok[shard_base[k] + a: shard_base[k] + a + len(F)]
            f = np.sqrt((F[m] ** 2).sum(1))
            z = np.asarray(Z)[m]
            ok = (f > 0) & np.isfinite(f)
            for e in np.unique(z[ok]):
                fe = f[ok & (z == e)]
                h = hist.setdefault(int(e), np.zeros(len(edges) + 1))
                h += np.bincount(np.searchsorted(edges, np.log10(fe)), minlength=len(h))
                top[int(e)] = max(top.get(int(e), 0.0), float(fe.max()))
        def median(h):
            b = int(np.searchsorted(np.cumsum(h), 0.5 * h.sum()))
            return float(10.0 ** (edges[max(b - 1, 0)] + 0.0025))

        scale = {e: median(h) for e, h in hist.items() if h.sum() >= FORCE_OUTLIER_MIN_ATOMS}
        every = sum(hist.values()) if hist else None
        scale = rare_element_scales(scale, list(hist), median(every) if every is not None
                                    and every.sum() >= FORCE_OUTLIER_MIN_ATOMS else None)
        limit = {e: FORCE_OUTLIER_RATIO_UNBALANCED * v for e, v in scale.items()}
        if not any(top[e] > limit[e] for e in limit):
            return None
        # the suspects: structures with an atom beyond the lower (unbalanced) limit, judged exactly
        table = np.full(max(max(hist), 118) + 1, np.inf)
        for e, v in limit.items():
            table[e] = v
        starts = np.concatenate([[0], np.cumsum(self.ds.natoms)])
        sus = set()
        blocks = zip(self.ds.iter_atom_blocks("forces"), self.ds.iter_atom_blocks("numbers"))
        for (k, a, F), (_, _, Z) in blocks:
            g0 = shard_base[k] + a
            m = atom_ok[g0: g0 + len(F)]
            f = np.sqrt((F ** 2).sum(1))
            lim = table[np.asarray(Z, dtype=np.int64)]
            for g in g0 + np.flatnonzero(m & (f > lim)):
                sus.add(int(np.searchsorted(starts, g, side="right") - 1))
        sus = sorted(sus)
        found, _ = force_outliers(self.ds.read(sus), scale)
        if not found:
            return None
        ex = np.zeros(self.ds.n_structures, dtype=bool)
        ex[[sus[o["position"]] for o in found]] = True
        if self.rank0 and not self.quiet:
            from ase.data import chemical_symbols

            from ..data.info import force_outlier_text

            src, sidx = self.ds.column("source"), self.ds.column("source_index")
            named = []
            for o in found[:5]:
                s_ = sus[o["position"]]
                named.append(force_outlier_text({
                    "structure": s_, "source": str(src[s_]), "source_index": int(sidx[s_]), "atom": o["atom"],
                    "element": chemical_symbols[o["Z"]], "force_eVA": o["force"], "typical_eVA": o["scale"],
                    "net_force_eVA": o["net"]}))
            warn(f"{', '.join(map(str, self.cfg.data.train))}: field 'forces': {len(found)} atom(s) in {int(ex.sum())} "
                 f"training structure(s) with a force far beyond their element's typical one: {'; '.join(named)}"
                 + (" ..." if len(found) > 5 else "") + ".  The forces of these structures are left out of the "
                 "force loss (their energies are still trained on; drop the structures if those are wrong too); "
                 "training.force_outliers: keep trains on them")
        return ex

    @property
    def stress_mode(self) -> bool:
        """Force training with a stress term (training.beta > 0)."""
        return self.force_mode and self.cfg.training.beta > 0

    def _stress_mask(self, batch):
        """[B] bool: the batch's structures in the stress loss (None without a stress term)."""
        if not self.stress_mode:
            return None
        tc = self.cfg.training
        sel = stress_selection(batch.index.cpu().numpy(), tc.seed, tc.stress_fraction)
        return stress_structure_mask(batch, torch.as_tensor(sel, device=batch.index.device))

    def batch_loss(self, batch, counts: torch.Tensor, acc: torch.Tensor | None = None,
                   selected=None, create_graph=True):
        """Local contribution to the global loss of one step, given the GLOBAL counts
        (sum of weights, weighted force components)."""
        S = None
        smask = self._stress_mask(batch)
        if self.stress_mode:
            E, F, S = self.model.energy_forces_stress(batch, create_graph=create_graph)
        elif self.force_mode:
            E, F = self.model.energy_and_forces(batch, create_graph=create_graph)
        else:
            E, F = self.model(batch), None
        mask = force_atom_mask(batch, selected) if self.force_mode else None
        pairs = None if self.force_mode else self._pairs(batch)
        alpha, beta, wcounts = self._weighted(counts)
        lcounts, c_d, gamma = self._energy_counts(counts, wcounts)
        loss = energy_force_loss(E, batch, lcounts, per_atom=self.per_atom, alpha=alpha, F=F, mask=mask,
                                 compiled=self.model.plan().loss == "compiled", beta=beta, S=S, smask=smask)
        dterm = difference_term(E, batch, pairs, c_d, gamma) if gamma > 0 else None
        if dterm is not None:
            loss = loss + dterm
        if acc is not None:
            with torch.no_grad():
                rw = None if pairs is None else difference_residuals(E.detach(), batch, pairs)
                self._account(acc, batch, E.detach(), None if F is None else F.detach(),
                              None if S is None else S.detach(), mask, smask, None if rw is None else rw[0])
        return loss

    def _energy_counts(self, counts: torch.Tensor, weighted: torch.Tensor | None = None):
        """(counts of the energy term, C_D, gamma) of an energy step: the loss form's weighted
        counts (``weighted``, when the caller has them), the energy count divided by 1 - gamma
        when the copy-difference term is on."""
        c_d = float(counts[3]) if counts.numel() > 3 else 0.0    # unscaled: L_D over s_F^2 = 1 (losses)
        gamma = self._gamma if c_d > 0 else 0.0
        counts = self._weighted(counts)[2] if weighted is None else weighted
        lcounts = counts if gamma == 0 else torch.cat([counts[:1] / (1.0 - gamma), counts[1:]])
        return lcounts, c_d, gamma

    def _account(self, acc, batch, E, F, S, mask, smask, r) -> None:
        """Add a step's errors (detached E, F, S; difference residuals ``r`` or None) to the
        epoch's sums ``acc``, and keep its loss sums for the loss form 'rmse'."""
        if r is not None:
            acc[_IDX["d_sse"]] += (r * r).sum()
            acc[_IDX["n_diff"]] += float(len(r))
        _accumulate_errors(acc, batch, E, F, S, self._reported_forces(batch))
        if self.cfg.training.loss == "rmse":
            self._step_sums = loss_sums(E, batch, per_atom=self.per_atom, F=F, mask=mask, S=S, smask=smask)

    def _energy_step(self, batch, counts: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
        """The loss of an energy step, its weight gradients in the flat gradient: engine-free on
        cached descriptors where it applies (training.energy_step), else through autograd."""
        if energy_step.applies(self.model, self.flat, batch):
            lcounts, c_d, gamma = self._energy_counts(counts)
            loss, E, r = energy_step.energy_loss_and_gradients(self.model, self.flat, batch, lcounts,
                                                              per_atom=self.per_atom, pairs=self._pairs(batch),
                                                              c_d=c_d, gamma=gamma)
            self._account(acc, batch, E, None, None, None, None, r)
            return loss
        with self.flat.routing():
            loss = self.batch_loss(batch, counts, acc)
            loss.backward(inputs=self.flat.grad_inputs)
        return loss

    # ---- the loss form (training.loss): weights of the step's mean squares ---------------------
    _prev_rmse = None          # global (RMSE_E, RMSE_F, RMSE_S) of the previous step (loss 'rmse')
    _step_sums = None          # this rank's loss_sums of the current step (loss 'rmse')

    def _spread(self) -> tuple[float, float, float]:
        """Reference spreads of the energy error measure, of the force components and of the
        virial components of the training data: the scale of the per-atom energies (the model's
        fitted energy scale, times the mean atom count for per-structure energies), the RMS force
        component and the RMS virial component (per atom or per structure, as the energies)."""
        if getattr(self, "_spread_cache", None) is None:
            sE = getattr(self, "_energy_rms", None) or float(self.model.ann.energy_scale)
            if not self.per_atom:
                sE *= float(np.mean(self.ds.natoms[self.train_idx])) if len(self.train_idx) else 1.0
            sF = self._force_rms() if self.force_mode else 1.0
            sS = self._virial_rms() if self.stress_mode else 1.0
            self._spread_cache = (max(sE, 1e-6), max(sF, 1e-6), max(sS, 1e-6))
        return self._spread_cache

    def _virial_rms(self) -> float:
        """RMS virial component V sigma (/ n per atom) of the training structures with stress."""
        use = np.zeros(self.ds.n_structures, dtype=bool)
        use[self.train_idx] = True
        use &= np.asarray(self.ds.column("has_stress"), dtype=bool)
        if not use.any():
            return 1.0
        cell = np.asarray(self.ds.column("cell"), dtype=np.float64)[use]
        st = np.asarray(self.ds.column("stress"), dtype=np.float64)[use]
        v = st * np.abs(np.linalg.det(cell))[:, None, None]
        if self.per_atom:
            v = v / np.asarray(self.ds.natoms, dtype=np.float64)[use][:, None, None]
        r = math.sqrt(float((v * v).mean()))
        return r if r > 0 else 1.0

    def _force_rms(self) -> float:
        """RMS force component (eV/A) of the training structures with forces (the same on every
        rank: read from the data set, not from a rank's share).  When a handful of atoms dominate
        it (FORCE_RMS_DOMINATED), the RMS without the largest FORCE_RMS_TRIM of the atoms, with a
        warning: two atoms at 100-140 eV/A among 320 raised it 0.97 -> 6.1 eV/A, and the force
        term, scaled by it, barely counted in the loss."""
        if getattr(self, "_force_rms_cache", None) is None:
            use = np.zeros(self.ds.n_structures, dtype=bool)
            use[self.train_idx] = True
            use &= np.asarray(self.ds.column("has_forces"), dtype=bool)
            ex = self._force_excluded()
            if ex is not None:
                use &= ~ex
            atom_ok = np.repeat(use, self.ds.natoms)
            shard_base = np.cumsum([0] + [sh.n_atoms for sh in self.ds._shards])
            # |F|^2 per atom in a histogram of 0.01-decade bins (count and sum per bin), so the
            # largest atoms can be left out without holding every atom's force; the largest few
            # atoms themselves are kept to name them
            edges = np.arange(-30.0, 30.0 + 1e-9, 0.01)
            cnt = np.zeros(len(edges) + 1)
            sm = np.zeros(len(edges) + 1)
            top: list = []
            ss = n = 0.0
            for k, a, blk in self.ds.iter_atom_blocks("forces"):
                m = atom_ok[shard_base[k] + a: shard_base[k] + a + len(blk)]
                sq = blk[m] ** 2
                ss += float(sq.sum())          # summed as before the trim: the same RMS to the bit
                f2 = sq.sum(1)
                n += 3.0 * float(m.sum())
                b = np.searchsorted(edges, np.log10(np.maximum(f2, 1e-300)))
                cnt += np.bincount(b, minlength=len(cnt))
                sm += np.bincount(b, weights=f2, minlength=len(cnt))
                g = shard_base[k] + a + np.flatnonzero(m)
                big = np.argsort(f2)[-5:]
                top = sorted(top + [(float(f2[i]), int(g[i])) for i in big], reverse=True)[:5]
            rms = math.sqrt(ss / n) if n > 0 and ss > 0 else 1.0
            n_atoms = n / 3.0
            drop = math.ceil(FORCE_RMS_TRIM * n_atoms)
            if n_atoms > drop and ss > 0:
                left, cut = float(drop), 0.0
                for c, v in zip(cnt[::-1], sm[::-1]):
                    if left <= 0:
                        break
                    take = min(c, left)
                    cut += v * take / c if c else 0.0
                    left -= take
                trimmed = math.sqrt(max(ss - cut, 0.0) / (3.0 * (n_atoms - drop)))
                if trimmed > 0 and rms > FORCE_RMS_DOMINATED * trimmed:
                    self._warn_force_rms(rms, trimmed, drop, cut / ss, top)
                    rms = trimmed
            self._force_rms_cache = rms
        return self._force_rms_cache

    def _warn_force_rms(self, rms: float, trimmed: float, drop: int, share: float, top: list) -> None:
        if not self.rank0 or self.quiet:
            return
        starts = np.concatenate([[0], np.cumsum(self.ds.natoms)])
        src, sidx = self.ds.column("source"), self.ds.column("source_index")
        named = []
        for f2, g in [t for t in top if t[0] > (10 * trimmed) ** 2][:3] or top[:1]:
            s = int(np.searchsorted(starts, g, side="right") - 1)
            named.append(f"structure {s} ({src[s]}#{int(sidx[s])}) atom {g - int(starts[s])}: {math.sqrt(f2):.4g} eV/A")
        warn(f"{', '.join(map(str, self.cfg.data.train))}: field 'forces': a few atoms dominate the training forces' "
             f"RMS: the largest {100 * FORCE_RMS_TRIM:g} % ({drop} atoms; {'; '.join(named)}) carry {100 * share:.0f} % of the sum of "
             f"F^2, RMS force component {rms:.4g} eV/A with them, {trimmed:.4g} without.  The force term's scale "
             f"in the loss and the energy-scale floor use {trimmed:.4g}; these atoms are still trained on: check "
             f"their forces (`distmlip info` names atoms far beyond their element's typical force) and fix or "
             f"drop their structures")

    def _weighted(self, counts: torch.Tensor):
        """(alpha', beta', counts') such that the loss operator's
        (1-a'-b') S_E/C_E' + a' S_F/C_F' + b' S_S/C_S' is c_E MSE_E + c_F MSE_F + c_S MSE_S with the
        weights of the configured loss form (losses.term_weights)."""
        tc = self.cfg.training
        beta = tc.beta if self.stress_mode else 0.0
        if tc.loss == "mse":
            return tc.alpha, beta, counts
        cE, cF, cS = term_weights(tc.loss, tc.alpha, self.force_mode, self._spread(), self._prev_rmse, beta)
        s = cE + cF + cS
        return cF / s, cS / s, counts / s

    def _global_counts(self, epoch: int, step: int) -> torch.Tensor:
        """(C_E, C_F) of the GLOBAL batch of ``step``: derived from the epoch plan, which every
        rank knows (the batches of every rank are a function of the seed), so that no
        collective is needed before the step's compute."""
        kept = self.__dict__.get("_epoch_counts")
        if kept is None or kept[0] != (epoch, id(self.stream)):
            kept = (epoch, id(self.stream)), self._plan_counts(epoch)
            self.__dict__["_epoch_counts"] = kept
        table = kept[1]
        if step < len(table):
            return table[step]
        return self.counts_of(np.zeros(0, np.int64))

    def _plan_counts(self, epoch: int) -> torch.Tensor:
        """[steps, 4] (C_E, C_F, C_S, C_D) of every global batch of ``epoch``, from the plan at
        once (one table per epoch instead of a gather and four sums per step)."""
        plans = [self.stream.batches(epoch, r) for r in range(self.ctx.world_size)]
        steps = max((len(b) for b in plans), default=0)
        tables = self._count_tables_of_data()
        out = np.zeros((steps, 4), dtype=np.float64)
        for k in range(steps):
            members = [b[k] for b in plans if k < len(b)]
            idx = np.concatenate(members).astype(np.int64, copy=False)
            out[k] = [float(t[idx].sum()) for t in tables]    # counts_of's sums, exactly
        return torch.as_tensor(out, device=self.device)

    def counts_of(self, indices) -> torch.Tensor:
        """(C_E, C_F, C_S, C_D) of the training structures at data-set ``indices`` (losses.local_counts
        of their batch, from per-structure tables)."""
        w, fc, sc, dc = self._count_tables_of_data()
        idx = np.asarray(indices, dtype=np.int64)
        return torch.tensor([float(w[idx].sum()), float(fc[idx].sum()), float(sc[idx].sum()), float(dc[idx].sum())],
                            dtype=torch.float64, device=self.device)

    def _count_tables_of_data(self) -> tuple:
        """Per data-set structure (w, force components, stress components, difference pairs),
        each weighted: what :meth:`counts_of` sums (computed once)."""
        if self._count_tables is None:
            idx = np.arange(self.ds.n_structures)
            w = np.asarray(self.ds.column("weight"), dtype=np.float64)
            if self.sample_multiplier is not None:
                w = w * self.sample_multiplier
            fc = np.zeros_like(w)
            if self.force_mode:
                tc = self.cfg.training
                sel = self._force_loss_selection(idx)
                hf = np.asarray(self.ds.column("has_forces"), dtype=bool)
                fc = 3.0 * np.asarray(self.ds.natoms, dtype=np.float64) * w * (hf & sel)
            sc = np.zeros_like(w)
            if self.stress_mode:
                tc = self.cfg.training
                ssel = stress_selection(idx, tc.seed, tc.stress_fraction)
                hs = np.asarray(self.ds.column("has_stress"), dtype=bool)
                sc = 9.0 * w * (hs & ssel)
            dc = np.zeros_like(w)
            t = (self._diff or {}).get(id(self.ds))
            if self._gamma > 0 and t is not None:
                dc = w * (t[0] >= 0)
            self._count_tables = (w, fc, sc, dc)
        return self._count_tables

    _count_tables = None
    _stop_after_step = False

    @property
    def timers(self) -> dict:
        """Wall seconds spent, on this rank, in: collate (batch assembly), compute (loss,
        gradients, optimizer update), reduce (the step's all-reduce, waiting for the other ranks
        included), epoch (whole epochs, validation and end-of-epoch work included); steps."""
        t = self.__dict__.get("_timers")
        if t is None:
            t = self.__dict__["_timers"] = dict.fromkeys(("collate", "compute", "reduce", "epoch", "validation"), 0.0)
            t["steps"] = 0
        return t

    def _batch_gradient(self, batch, counts: torch.Tensor, acc: torch.Tensor, selected=None) -> torch.Tensor:
        """The loss of ``batch`` (normalised by the GLOBAL ``counts`` of the step it belongs to),
        its parameter gradient added to the flat gradient and its errors to ``acc``."""
        if not self.force_mode:
            return self._energy_step(batch, counts, acc)
        mask = force_atom_mask(batch, selected)
        smask = self._stress_mask(batch)
        alpha, beta, wcounts = self._weighted(counts)
        loss, E, F, S = force_stress_loss_and_gradients(self.model, self.flat, batch, wcounts,
                                                        per_atom=self.per_atom, alpha=alpha, mask=mask,
                                                        beta=beta, smask=smask)
        _accumulate_errors(acc, batch, E, F, S, self._reported_forces(batch))
        if self.cfg.training.loss == "rmse":
            self._step_sums = loss_sums(E, batch, per_atom=self.per_atom, F=F, mask=mask, S=S,
                                        smask=smask if S is not None else None)
        return loss

    def _note_stop(self, extra: torch.Tensor) -> None:
        """A step's reduced ``extra`` (stop code, ranks asking to stop, ...): when some rank asked
        to stop, every rank stops after this step, with the reason kept for the log."""
        from ..distributed import signals

        if extra[1] > 0:
            self._stop_after_step = True
            n = int(extra[1])
            self._stop_reason = signals.describe_stop(int(extra[0])) if n == 1 else f"a signal or the stop file on {n} ranks"

    def _stopped_after_epoch(self, epoch: int) -> str:
        self._log(f"stop requested ({getattr(self, '_stop_reason', None) or 'callback'}): "
                  f"checkpoint written to {self.out / 'checkpoint.pt'} after epoch "
                  f"{epoch + 1}; resume with {self._resume_command()}")
        self.save_checkpoint(self.epoch, 0)
        return "stopped"

    # ---- training.optimizer: auto (AdamW until it stalls, then L-BFGS) ----------------------------
    _auto_switch = False       # this run switches from AdamW to L-BFGS at the plateau scheduler's first cut

    def _train_atoms(self) -> int:
        return int(np.asarray(self.ds.natoms, dtype=np.int64)[self.train_idx].sum())

    def _auto_lbfgs_reason(self) -> str | None:
        """Why training.optimizer: auto keeps AdamW to the end on this run (None: it switches to
        L-BFGS when AdamW stalls).  Each reason is a measured loss or an unmeasured regime of
        L-BFGS (docs/results.md, twentieth and twenty-first sessions)."""
        tc = self.cfg.training
        if np.asarray(self.ds.column("synthetic"), dtype=bool)[self.train_idx].any():
            return "GPR copies in the training split (each L-BFGS evaluation would take all of them)"
        if self.sched_kind != "plateau":
            return f"training.scheduler: {self.sched_kind} (the switch comes at the plateau scheduler's first cut)"
        for key, bad in (("loss: rmse", tc.loss == "rmse"), ("grad_clip", tc.grad_clip > 0),
                         ("weight_decay", tc.weight_decay > 0)):
            if bad:
                return f"training.{key} is set (AdamW's; L-BFGS refuses it)"
        atoms = self._train_atoms()
        if atoms > AUTO_LBFGS_ATOMS:
            return (f"{atoms} training atoms, above {AUTO_LBFGS_ATOMS} (on 166,000 atoms AdamW alone trained "
                    "better than with the switch)")
        return None

    def _resolve_optimizer(self) -> None:
        """The optimizer this run starts with (``self.phase``: adamw, adam, sgd or lbfgs) and
        whether training.optimizer: auto switches from AdamW to L-BFGS: at the end of the epoch at
        which the plateau scheduler first lowers the rate, i.e. when AdamW has stalled.  AdamW
        makes the faster start (its many steps per epoch against one iteration), L-BFGS the
        better end (docs/training.md "Choosing the optimizer"); a resumed run continues in the
        phase its checkpoint was written in."""
        tc = self.cfg.training
        if tc.optimizer != "auto":
            self.phase = tc.optimizer
            return
        self.phase = (self._resume_state or {}).get("optimizer_phase", "adamw")
        if self.phase != "adamw":
            return
        why = self._auto_lbfgs_reason()
        self._auto_switch = why is None
        if self._resume_state is None:
            self._log("optimizer: auto: adamw, then lbfgs once adamw stalls (the plateau scheduler's first cut) or "
                      f"after epoch {AUTO_SWITCH_EPOCH} when as many remain"
                      if why is None else f"optimizer: auto: adamw to the end: {why}")

    def _switch_to_lbfgs(self, why: str) -> None:
        from .lbfgs import LBFGS

        self.phase, self._auto_switch = "lbfgs", False
        if self._ema is not None and self._use_avg:   # L-BFGS starts from the weights validated best
            self._set_weights(self._ema)
        self._ema, self._use_avg = None, False
        self.opt = LBFGS(self.flat.tensors[0], history=self.cfg.training.lbfgs_history)
        self.sched, self.sched_kind = None, "none"
        self._log(f"optimizer: auto: {why}: lbfgs from the next epoch on, one iteration on the whole training "
                  "split each (the lr column: its step length)")

    # ---- training.optimizer: lbfgs (full batch; training/lbfgs.py) --------------------------------
    def _lbfgs_evaluate(self, acc: torch.Tensor) -> float:
        """The global training loss of the whole training split at the current parameters, its
        gradient (reduced over the ranks) in the flat gradient and its errors in ``acc`` (reset
        first: ``acc`` describes the last evaluation, which L-BFGS leaves at the accepted point).
        NaN when some rank's loss is not finite (the line search then steps back)."""
        from ..distributed import allreduce_gradients
        from ..distributed import signals

        tm = self.timers
        counts = self.__dict__.get("_lbfgs_counts")
        if counts is None:     # the whole split is one global batch: its counts normalise every batch
            counts = self.__dict__["_lbfgs_counts"] = self._plan_counts(0).sum(0)
        acc.zero_()
        self.flat.zero_grad()
        total = torch.zeros((), dtype=torch.float64)
        t0 = time.perf_counter()
        for structures in self.stream.epoch(0):
            t1 = time.perf_counter()
            batch = self.collate(structures, self.ds) if structures else None
            tm["collate"] += time.perf_counter() - t1
            if batch is not None and counts[0] > 0:
                selected = self._selected(batch) if self.force_mode else None
                total += self._batch_gradient(batch, counts, acc, selected).detach().to(torch.float64).cpu()
        self.flat.sync()
        stop = signals.local_stop_code(self.ctx.job_rank)
        bad = 0.0 if bool(torch.isfinite(total)) else 1.0
        extra = torch.tensor([float(stop), 1.0 if stop else 0.0, bad, float(total) if bad == 0.0 else 0.0],
                             dtype=torch.float64)
        t2 = time.perf_counter()
        extra = allreduce_gradients(self.flat.tensors, self.ctx, extra=extra, every_rank_has_grads=True)
        tm["reduce"] += time.perf_counter() - t2
        tm["compute"] += t2 - t0
        tm["steps"] += 1
        self.global_step += 1
        acc[_IDX["loss"]] += total * float(counts[0])
        acc[_IDX["n_steps"]] += float(counts[0]) / self.ctx.world_size
        self._note_stop(extra)
        if extra[2] > 0 or not bool(torch.isfinite(self.flat.tensors[0].grad).all()):
            return float("nan")
        return float(extra[3])

    def _fit_lbfgs(self) -> str:
        """The epoch loop of training.optimizer: lbfgs: one L-BFGS iteration per epoch."""
        tc = self.cfg.training
        status = "done"
        while self.epoch < tc.epochs:
            epoch = self.epoch
            t0 = time.time()
            acc = torch.zeros(len(_M), dtype=torch.float64, device=self.device)
            moved = self.opt.iteration(lambda: self._lbfgs_evaluate(acc))
            params = self.flat.tensors[0]
            if not (self.opt.loss is not None and math.isfinite(self.opt.loss)
                    and bool(torch.isfinite(params).all())):
                self._non_finite(None, acc)
            stop = self._stop_after_step
            self._end_epoch(epoch, acc, t0)
            self.timers["epoch"] += time.time() - t0
            if stop:
                return self._stopped_after_epoch(epoch)
            if not moved:
                self._log(f"lbfgs: converged at epoch {epoch + 1}: the training loss {self.opt.loss:.6g} no longer "
                          "falls (no step lowers it, or the last iterations lowered it by less than 1e-10 of it)"
                          + (f"; the training loss is below 1 % of the best validation loss {self.best:.3g}: "
                             "over-fitting (fewer parameters, more data or force training)"
                             if self.val_stream is not None and self.opt.loss < 0.01 * self.best else ""))
                status = "converged"
            elif tc.max_steps and self.global_step >= tc.max_steps:
                status = "max_steps"
            elif self._early_stop:
                status = "early_stopped"
            elif self._time_up:
                status = "time_limit"
            if status != "done":
                self.save_checkpoint(self.epoch, 0)
                break
        return status

    def train_step(self, structures, acc: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """One synchronous optimizer step on this rank's share of the global batch, with ONE
        collective: the gradient all-reduce, which also carries this rank's stop request and its
        non-finite flag.  ``counts``: the global batch's (C_E, C_F); default: from the plan of
        the current step (:meth:`counts_of` gives them for any global batch)."""
        from ..distributed import allreduce_gradients
        from ..distributed import signals

        tc = self.cfg.training
        tm = self.timers
        t0 = time.perf_counter()
        batch = self.collate(structures, self.ds) if structures else None
        t1 = time.perf_counter()
        tm["collate"] += t1 - t0
        selected = None
        if counts is None:
            counts = self._global_counts(self.epoch, self.step_in_epoch)
        if batch is not None:
            selected = self._selected(batch) if self.force_mode else None
        self.flat.zero_grad()
        params = self.flat.tensors
        if batch is not None and counts[0] > 0:
            loss = self._batch_gradient(batch, counts, acc, selected)
            # weighted by the step's global energy count: the epoch's training loss is then the
            # loss of the whole epoch (exactly, for energy terms), not the mean over steps, in which a
            # batch of one large structure counted as much as a full one and the figure moved with
            # the rank count (sweep 10); without validation data it picks the best model
            acc[_IDX["loss"]] += loss.detach() * float(counts[0])
        self.flat.sync()
        stop = signals.local_stop_code(self.ctx.job_rank)
        bad_loss = 0.0 if bool(torch.isfinite(acc[_IDX["loss"]])) else 1.0
        sums = self._step_sums if self._step_sums is not None else torch.zeros(N_SUMS, dtype=torch.float64)
        self._step_sums = None
        extra = torch.cat([torch.tensor([float(stop), 1.0 if stop else 0.0, bad_loss], dtype=torch.float64),
                           sums.to("cpu", torch.float64)])
        t2 = time.perf_counter()
        extra = allreduce_gradients(params, self.ctx, extra=extra, every_rank_has_grads=True)
        t3 = time.perf_counter()
        tm["compute"] += t2 - t1
        tm["reduce"] += t3 - t2
        if tc.loss == "rmse":       # this step's global RMSEs weigh the next step's terms
            g = extra[3:3 + N_SUMS].tolist()
            if g[1] > 0:
                self._prev_rmse = (math.sqrt(g[0] / g[1]), math.sqrt(g[2] / g[3]) if g[3] > 0 else 1.0,
                                   math.sqrt(g[4] / g[5]) if g[5] > 0 else 1.0)
        self._note_stop(extra)
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        optimizer_step(self.opt)
        tm["steps"] += 1
        acc[_IDX["n_steps"]] += float(counts[0]) / self.ctx.world_size  # reduced: the epoch's energy count
        # one check per step of everything that can go non-finite: every rank's loss (the flag
        # above), the reduced gradients and the updated parameters (identical on every rank, so
        # every rank stops together)
        checks = [t.reshape(-1) for t in params] + [t.grad.reshape(-1) for t in params if t.grad is not None]
        finite = extra[2] == 0 and bool(torch.isfinite(torch.cat(checks)).all())
        if not finite:
            self._non_finite(batch, acc)
        if self._ema is not None:
            self._update_average()
        tm["compute"] += time.perf_counter() - t3

    def _update_average(self) -> None:
        """One step of the weights' exponential moving average (training.ema).  The decay ramps
        up over the first steps t as (1 + t) / (10 + t): the weights move fast there, and an
        average that remembered the initial weights for a thousand steps lagged the raw ones."""
        t = self.global_step       # steps before this one (a resumed run continues the count)
        decay = min(self.cfg.training.ema, (1.0 + t) / (10.0 + t))
        with torch.no_grad():
            torch._foreach_lerp_(self._ema, [p.detach() for p in self.flat.tensors], 1.0 - decay)

    @contextlib.contextmanager
    def _averaged(self, force: bool = False):
        """The averaged weights in the model for the duration, where the last validation preferred
        them (or ``force``): the kept models; the raw ones back afterwards (the optimizer's steps
        continue from them)."""
        if self._ema is None or not (force or self._use_avg):
            yield
            return
        raw = [p.detach().clone() for p in self.flat.tensors]
        self._set_weights(self._ema)
        try:
            yield
        finally:
            self._set_weights(raw)

    def _set_weights(self, tensors) -> None:
        """Copy ``tensors`` into the flat parameters (the model's weights are views of them)."""
        with torch.no_grad():
            torch._foreach_copy_(self.flat.tensors, tensors)

    def _non_finite(self, batch, acc) -> None:
        """Stop the run: name what went non-finite, where, and how to continue.  Nothing is
        written: the last checkpoint and model files are those of the last good epoch."""
        params = self.flat.tensors
        what = [name for name, ts in (("loss", [acc[_IDX["loss"]]]), ("gradients", [t.grad for t in params
                                                                                    if t.grad is not None]),
                                       ("parameters", params))
                if any(not bool(torch.isfinite(t).all()) for t in ts)]
        idx = [] if batch is None else batch.index.tolist()
        shown = ", ".join(map(str, idx[:20])) + (f", ... ({len(idx)} in all)" if len(idx) > 20 else "")
        lr = self.opt.param_groups[0]["lr"]
        self._flush_best()          # the best model so far is good: keep it
        ck = self.out / "checkpoint.pt"
        hint = (f"resume from the last good checkpoint {ck} with a lower learning rate: distmlip train CONFIG "
                f"--resume {ck} --set training.lr={lr / 10:.3g}" if ck.exists()
                else f"no checkpoint was written yet; start again with a lower learning rate (now {lr:.3g})")
        if self.phase == "lbfgs":      # (its line search sets the steps: no rate to lower)
            hint = ("the loss itself is not finite where L-BFGS stands: check the data for extreme energies or "
                    "forces, or train with optimizer adamw" + (f" (last good checkpoint: {ck})" if ck.exists() else ""))
        raise NonFiniteError(
            f"non-finite {' and '.join(what) or 'values'} at epoch {self.epoch + 1}, step {self.step_in_epoch + 1} "
            f"(global step {self.global_step + 1}, learning rate {lr:.3g}); structures of this rank's batch "
            f"(data-set indices in {self.cfg.data.train}): {shown or 'none'}.  No model file was written for this "
            f"state (best_model.pt is the best model so far); {hint}")

    def evaluate_stream(self, stream) -> dict:
        """Global metrics over a whole (partitioned) stream, each structure counted once: local
        sums of errors and counts, all-reduced once.  The loss is the training loss
        (:mod:`.losses`) of the whole set, force selection included."""
        acc = torch.zeros(len(_M), dtype=torch.float64, device=self.device)
        sums = torch.zeros(N_SUMS, dtype=torch.float64, device=self.device)
        for structures in stream.epoch(0):
            if not structures:
                continue
            batch = self.collate(structures, stream.ds)
            S = None
            if self.stress_mode:
                E, F, S = self.model.energy_forces_stress(batch)
            elif self.force_mode:
                with torch.enable_grad():
                    E, F = self.model.energy_and_forces(batch)
            elif energy_step.forward_applies(self.model, batch):
                E, F = energy_step.energies(self.model, batch), None
            else:
                with torch.no_grad():
                    E, F = self.model(batch), None
            E = E.detach()
            F = None if F is None else F.detach()
            _accumulate_errors(acc, batch, E, F, S, self._reported_forces(batch, stream.ds))
            mask = force_atom_mask(batch, self._selected(batch, stream.ds)) if F is not None else None
            pairs = None if F is not None else self._pairs(batch, stream.ds)
            if pairs is not None:
                r, _ = difference_residuals(E, batch, pairs)
                acc[_IDX["d_sse"]] += (r * r).sum()
                acc[_IDX["n_diff"]] += float(len(r))
            sums += loss_sums(E, batch, per_atom=self.per_atom, F=F, mask=mask, S=S, smask=self._stress_mask(batch),
                              pairs=pairs)
        both = torch.cat([acc, sums])
        self.ctx.all_reduce_sum(both)
        acc, sums = both[:len(_M)], both[len(_M):]
        m = metrics_from_sums(acc)
        m["loss"] = loss_from_sums(sums, alpha=self.cfg.training.alpha, force_mode=self.force_mode,
                                   beta=self.cfg.training.beta if self.stress_mode else 0.0,
                                   form=self.cfg.training.loss, spread=self._spread(), gamma=self._gamma)
        return m

    # ------------------------------------------------------------------ checkpoints and logs
    def _payload(self, epoch, step, partial):
        return dict(model=self.model.payload(), optimizer=self.opt.state_dict(), optimizer_phase=self.phase,
                    ema=[t.detach().cpu().clone() for t in self._ema] if self._ema is not None else None,
                    ema_chosen=self._use_avg,
                    scheduler=self.sched.state_dict() if self.sched is not None else None,
                    scheduler_kind=self.sched_kind,
                    epoch=epoch, step=step, global_step=self.global_step, best=self.best,
                    bad_epochs=self.bad_epochs, partial=partial, config=config_to_dict(absolute_paths(self.cfg)),
                    loss_state=list(self._prev_rmse) if self._prev_rmse is not None else None,
                    loss_spread=list(self._spread()),
                    world_size=self.ctx.world_size, data=self._data_ids(),
                    warm_start_record=getattr(self, "_prior_record", None))

    def _data_ids(self) -> dict:
        """Content digests of the training (and separate validation) data: a resumed run must
        see the data its checkpoint was trained on, not whatever now sits at the same path."""
        ids = {"train": self.ds.content_id}
        if self.val_ds is not self.ds:
            ids["validation"] = self.val_ds.content_id
        return ids

    def _check_resume_data(self) -> None:
        old = (self._resume_state or {}).get("data")
        if not old:          # checkpoints written before the digests were stored
            return
        new = self._data_ids()
        dc = self.cfg.data
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                paths = ", ".join(map(str, dc.train if k == "train" else dc.validation))
                raise ConfigError(
                    f"{self._resume_path}: the {k} data changed since this checkpoint was written: {paths} "
                    f"now has content {str(new.get(k))[:12]}, the checkpoint's run trained on "
                    f"{str(old.get(k))[:12]} (the file was replaced, reconverted or re-augmented).  A "
                    f"resumed run must see the same data: restore it, or start a new run (another "
                    f"training.output, or without --resume)")

    _best = None               # (payload, metadata) of the best model not yet written (rank 0)
    _last_checkpoint = 0.0     # time.monotonic() of the last checkpoint written (rank 0)

    def save_checkpoint(self, epoch, step, partial=None, path=None):
        """The checkpoint (durable: fsync, it is what a resume starts from) and the best model
        kept in memory since the last one."""
        if self.rank0:
            # the best model first: a checkpoint on disk promises that everything before it is
            # (a kill between the two writes must not resume without the best model)
            self._flush_best()
            self._flush_csv()
            ckpt.save_checkpoint(path or (self.out / "checkpoint.pt"), **self._payload(epoch, step, partial))
            self._last_checkpoint = time.monotonic()

    def _flush_best(self) -> None:
        if self.rank0 and self._best is not None:
            from ..utils.io import atomic_torch_save

            payload, meta = self._best
            atomic_torch_save({**payload, "metadata": {**meta, **self._data_metadata()}}, self.out / "best_model.pt")
            self._best = None

    _csv_rows = None           # log.csv rows not yet appended (rank 0)
    _csv_written = 0.0         # time.monotonic() of the last append

    def _write_csv_row(self, row: dict):
        """Rows are appended every few seconds, at checkpoints and when the run ends: opening the
        file for every epoch was a twentieth of a small data set's epoch."""
        if not self.rank0:
            return
        if self._csv_rows is None:
            self._csv_rows = []
        self._csv_rows.append(row)
        if time.monotonic() - self._csv_written >= 2.0:
            self._flush_csv()

    def _flush_csv(self) -> None:
        if not self.rank0 or not self._csv_rows:
            return
        path = self.out / "log.csv"
        new = not path.exists()
        size = 0 if new else path.stat().st_size
        rows, self._csv_rows = self._csv_rows, []       # not again from fit()'s clean-up
        try:
            with open(path, "a", newline="") as fh:
                wr = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
                if new:
                    wr.writeheader()
                wr.writerows(rows)
        except OSError as exc:
            # a full disk: the file back to its last whole row (a cut row was left before, and
            # the error came as chained tracebacks, sweep 13); a resume rewrites the rows
            with contextlib.suppress(OSError):
                os.truncate(path, size)
            raise (storage_error(exc, path) or exc) from None
        self._csv_written = time.monotonic()

    # what a run writes into its output folder (a new run there moves an earlier run's aside)
    RUN_FILES = ("model.pt", "best_model.pt", "last_model.pt", "checkpoint.pt", "log.csv", "config.yaml")

    def _prepare_output(self):
        if not self.rank0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if self._resume_state is None:
            keep_earlier_run(self.out, quiet=self.quiet)
        import yaml

        atomic_write_text(self.out / "config.yaml", yaml.safe_dump(
            config_to_dict(absolute_paths(getattr(self, "_cfg_effective", None) or self.cfg)), sort_keys=False))
        path = self.out / "log.csv"
        if self._resume_state is None:
            if path.exists():
                path.unlink()
        elif path.exists():
            # drop rows of epochs after the checkpoint (a run killed after its last checkpoint)
            rows = list(csv.DictReader(io.StringIO(path.read_text())))
            keep = [r for r in rows if r.get("epoch") and int(r["epoch"]) <= self.epoch]
            buf = io.StringIO()
            wr = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
            wr.writeheader()
            for r in keep:
                wr.writerow({k: r.get(k, "") for k in CSV_FIELDS})
            atomic_write_text(path, buf.getvalue())

    def _resume_command(self) -> str:
        return self.resume_hint or f"'distmlip train CONFIG --resume {self.out / 'checkpoint.pt'}'"


    def _progress(self, total, initial):
        tc = self.cfg.training
        show = {"on": True, "off": False}.get(tc.progress_bar, sys.stderr.isatty() and total >= 20)
        if not (show and self.rank0 and not self.quiet):
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=total, initial=initial, leave=False, unit="step", dynamic_ncols=True)

    # ------------------------------------------------------------------ main loop
    def fit(self, step_callback=None) -> str:
        """Train; returns 'done', 'early_stopped', 'max_steps', 'time_limit', 'converged' (lbfgs)
        or 'stopped' (signal / callback).

        ``step_callback(trainer)`` is called after every step; a True return requests a stop
        exactly like a signal (used by tests).  The output folder's lock is released at the end,
        whatever happens."""
        try:
            return self._fit(step_callback)
        finally:
            try:
                self._flush_csv()
            finally:
                if self.lock is not None:
                    self.lock.release()

    def _fit(self, step_callback=None) -> str:
        tc = self.cfg.training
        self._last_checkpoint = self._fit_started = time.monotonic()
        self._prepare_output()
        # Every step allocates a few hundred short-lived Python objects (autograd contexts,
        # tuples), which trigger the cyclic garbage collector; its full collections walked every
        # object made during set-up (torch, ase, the data).  Freezing those objects keeps them
        # out of the collections (a tenth to a fifth of a small force step; docs/results.md).  No
        # collection first: it cost 0.15 s of every run, for the little garbage of the set-up.
        gc.freeze()
        status = "done"
        if self.epoch >= tc.epochs and self._resume_state is not None:
            # (sweep 13: "training finished: done" alone read as if it had trained)
            self._log(f"nothing to train: the checkpoint is at epoch {self.epoch} and training.epochs is {tc.epochs} "
                      f"(raise it to continue: --set training.epochs=N)")
        while self.phase != "lbfgs" and self.epoch < tc.epochs:     # (auto: until the switch, _end_epoch)
            epoch = self.epoch
            t0 = time.time()
            acc = torch.zeros(len(_M), dtype=torch.float64, device=self.device)
            if self.partial is not None and self.step_in_epoch > 0:
                acc += self.partial.to(acc)
            self.partial = None
            steps = self.stream.steps(epoch)
            it = iter(self.stream.epoch(epoch, start_step=self.step_in_epoch))
            bar = self._progress(steps, self.step_in_epoch)
            stop = False
            while self.step_in_epoch < steps:
                structures = next(it)
                self.train_step(structures, acc)
                self.step_in_epoch += 1
                self.global_step += 1
                if bar is not None:
                    bar.update(1)
                if self._stop_after_step:     # a stop request travelled with this step's gradients
                    stop = True
                    if self.step_in_epoch < steps:
                        break
                if tc.max_steps and self.global_step >= tc.max_steps:
                    status = "max_steps"
                    break
                if step_callback is not None and step_callback(self):
                    stop = True
                    # still at a step boundary: fall through to the check below
                    if self.step_in_epoch < steps:
                        break
            if bar is not None:
                bar.close()
            close = getattr(it, "close", None)
            if close is not None:
                close()
            if stop or status == "max_steps":
                if self.step_in_epoch < steps:
                    partial = acc.clone()
                    self.ctx.all_reduce_sum(partial)     # every rank's partial sums, counted once on resume
                    self.save_checkpoint(epoch, self.step_in_epoch, partial=partial.cpu())
                    if stop:
                        self._log(f"stop requested ({getattr(self, '_stop_reason', None) or 'callback'}): "
                                  f"checkpoint written to {self.out / 'checkpoint.pt'} at epoch "
                                  f"{epoch + 1}, step {self.step_in_epoch}/{steps}; resume with "
                                  f"{self._resume_command()}")
                        return "stopped"
                    self._write_models()
                    return status
            self._end_epoch(epoch, acc, t0)
            self.timers["epoch"] += time.time() - t0
            if stop:
                return self._stopped_after_epoch(epoch)
            if status == "max_steps" or self._early_stop or self._time_up:
                status = "early_stopped" if self._early_stop else "time_limit" if self._time_up else status
                self.save_checkpoint(self.epoch, 0)
                break
        if self.phase == "lbfgs" and status == "done":
            status = self._fit_lbfgs()
        self._write_models()
        self._check_energy_baseline()
        return status

    _best_energy = None        # (E RMSE meV/atom, which set, epoch) of the model kept as the best
    _kept_val = _last_val = None   # validation errors of the kept model's epoch and of the last one

    def _check_energy_baseline(self) -> None:
        """Warn when the kept model's energies are no better than the composition alone: the
        per-element mean energies of the normalisation fit (its RMS per-atom residual).  A loss
        whose other terms outweigh the energy term can leave the energies there or worse while the
        loss falls, and the best model is chosen on that loss: GPR copies of liquid water (large
        forces) under the default copy-difference weight did so without a word (docs/results.md,
        sweep 23)."""
        base = getattr(self, "_energy_rms", None)
        if not self._best_energy or not base or self._best_energy[0] is None:
            return
        e, which, epoch = self._best_energy
        b = 1000.0 * float(base)
        if not (math.isfinite(e) and e > b):
            return
        tc = self.cfg.training
        if self._gamma > 0:
            hint = (f"The copy-difference term (training.difference_weight {self._gamma:g}) outweighs the energy term on "
                    f"this data: lower training.difference_weight (e.g. {self._gamma / 10:g})")
        elif self.force_mode:
            hint = f"The force term (training.alpha {tc.alpha:g}) may outweigh the energy term: lower training.alpha"
        else:
            hint = "Train longer, check the energies' labels, or add data"
        if self.rank0:
            warn(f"training: the kept model (epoch {epoch}) has a {which} energy RMSE of {e:.4g} meV/atom, above the "
                 f"{b:.4g} meV/atom of the composition alone (per-element mean energies, the normalisation fit): its "
                 f"energies are no better than that baseline.  {hint}")

    _early_stop = False
    _time_up = False           # training.max_minutes passed (decided by rank 0's clock, for all ranks)

    def _end_epoch(self, epoch, acc, t0):
        tc = self.cfg.training
        self.ctx.all_reduce_sum(acc)
        tr = metrics_from_sums(acc)
        val = avg_loss = None     # (avg_loss: the moving average's validation loss, training.ema)
        if self.val_stream is not None and ((epoch + 1) % max(tc.validate_every, 1) == 0
                                            or epoch + 1 == tc.epochs):
            tv = time.perf_counter()
            with self._averaged(force=True):
                val = self.evaluate_stream(self.val_stream)
            if self._ema is not None:
                # the plateau scheduler follows the average's validation loss: the raw weights'
                # jitters made it cut the rate to its floor by epoch 500 of 1,500 on a slab set,
                # after its best epoch 271 (docs/results.md, twenty-second session).  The kept
                # model is the better of the two: early in a run, while the steps still make fast
                # progress, the average lags them (a 10-epoch committee had half the forces)
                avg_loss = val["loss"]
                raw = self.evaluate_stream(self.val_stream)
                self._use_avg = not raw["loss"] < val["loss"]
                if not self._use_avg:
                    val = raw
            self.timers["validation"] += time.perf_counter() - tv
        if not math.isfinite(tr["loss"]) or (val is not None and not math.isfinite(val["loss"])):
            # finite parameters whose predictions overflow: as diverged as NaN weights
            what = "training" if not math.isfinite(tr["loss"]) else "validation"
            self._flush_best()
            ck = self.out / "checkpoint.pt"
            raise NonFiniteError(
                f"the {what} loss of epoch {epoch + 1} is not finite (train {tr['loss']:.3g}, validation "
                f"{(val or {}).get('loss', float('nan')):.3g}, learning rate {self.opt.param_groups[0]['lr']:.3g}): "
                "the model diverged.  No checkpoint or model file was written for this epoch; "
                + (f"resume from {ck} with a lower learning rate (--resume {ck} --set training.lr=...)"
                   if ck.exists() else "start again with a lower learning rate"))
        metric = val["loss"] if val is not None else tr["loss"]
        sched_metric = avg_loss if avg_loss is not None else metric
        if val is not None:    # (selection_note's inputs)
            self._last_val = {"epoch": epoch + 1, "E_rmse_meV_atom": val.get("E_rmse_meV_atom"), "F_mae": val.get("F_mae")}
        lr = self.opt.param_groups[0]["lr"]
        improved = metric < self.best
        if improved:
            self.best = metric
            self.bad_epochs = 0
            if self.rank0:     # kept in memory; written with the next checkpoint and at the end
                with self._averaged():
                    self._best = (self.model.payload(), {"epoch": epoch + 1, "val_loss": metric})
            self._best_energy = ((val or tr).get("E_rmse_meV_atom"), "validation" if val is not None else "training",
                                 epoch + 1)
            self._kept_val = None if val is None else self._last_val
        else:
            self.bad_epochs += 1
        if isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.sched.step(sched_metric)
        elif self.sched is not None:
            self.sched.step()
        if self._auto_switch:       # before this epoch's checkpoint: a resume continues with L-BFGS
            if self.opt.param_groups[0]["lr"] < lr:
                self._switch_to_lbfgs(f"adamw stalled at epoch {epoch + 1} (the plateau scheduler lowered the rate)")
            elif epoch + 1 == AUTO_SWITCH_EPOCH and tc.epochs - epoch - 1 >= AUTO_SWITCH_EPOCH:
                self._switch_to_lbfgs(f"epoch {epoch + 1} of adamw done")
        dt_total = time.time() - t0  # training + validation of this epoch
        row = {"epoch": epoch + 1, "steps": self.global_step, "lr": f"{lr:.6g}",
               "train_loss": f"{tr['loss']:.8g}", "train_E_rmse_meV_atom": _fmt(tr["E_rmse_meV_atom"]),
               "train_E_mae_meV_atom": _fmt(tr["E_mae_meV_atom"]),
               "train_F_rmse": _fmt(tr["F_rmse"], 5), "train_F_mae": _fmt(tr["F_mae"], 5),
               "val_loss": f"{val['loss']:.8g}" if val else "",
               "val_E_rmse_meV_atom": _fmt(val["E_rmse_meV_atom"]) if val else "",
               "val_E_mae_meV_atom": _fmt(val["E_mae_meV_atom"]) if val else "",
               "val_F_rmse": _fmt(val["F_rmse"], 5) if val else "", "val_F_mae": _fmt(val["F_mae"], 5) if val else "",
               # empty unless the structures carry stress and the model predicted it (stress term)
               "train_S_rmse_GPa": _fmt(tr.get("S_rmse_GPa"), 4), "train_S_mae_GPa": _fmt(tr.get("S_mae_GPa"), 4),
               "val_S_rmse_GPa": _fmt((val or {}).get("S_rmse_GPa"), 4),
               "val_S_mae_GPa": _fmt((val or {}).get("S_mae_GPa"), 4),
               # GPR-ANN: the copies' energy rise per A against their labels (eV/A; empty otherwise)
               "train_D_rmse": _fmt(tr.get("D_rmse"), 5), "val_D_rmse": _fmt((val or {}).get("D_rmse"), 5),
               "time_s": f"{dt_total:.2f}"}
        self._write_csv_row(row)
        line = f"epoch {epoch + 1:4d}/{tc.epochs}  train E_rmse {tr['E_rmse_meV_atom']:9.3f} meV/atom"
        if self.force_mode:
            line += f"  F_rmse {tr['F_rmse']:.4f} F_mae {tr['F_mae']:.4f} eV/A"
        if "S_mae_GPa" in tr:
            line += f"  S_mae {tr['S_mae_GPa']:.3f} GPa"
        if "D_rmse" in tr:
            line += f"  D_rmse {tr['D_rmse']:.4f} eV/A"
        if val is not None:
            line += f"  | val E_rmse {val['E_rmse_meV_atom']:9.3f} meV/atom"
            if "D_rmse" in val:
                line += f"  D_rmse {val['D_rmse']:.4f} eV/A"
            if self.force_mode:
                line += f"  F_rmse {val['F_rmse']:.4f} F_mae {val['F_mae']:.4f} eV/A"
            if "S_mae_GPa" in val:
                line += f"  S_mae {val['S_mae_GPa']:.3f} GPa"
        line += f"  lr {lr:.3g}  {dt_total:.1f} s" + ("  *" if improved else "")
        if val is not None and self._ema is not None:
            line += "  (averaged weights)" if self._use_avg else "  (raw weights)"
        # the run's ETA from its own epochs so far (this process's: a resumed run counts anew);
        # lbfgs runs have thousands of short epochs and no progress bar
        start = self.__dict__.setdefault("_eta_start", (time.time() - dt_total, epoch))
        done, left = epoch + 1 - start[1], tc.epochs - epoch - 1
        if left > 0 and done > 0:
            eta = (time.time() - start[0]) / done * left
            # training.max_minutes ends the run first: that is when it ends, and how far it gets
            limit_left = 60.0 * tc.max_minutes - (time.monotonic() - self._fit_started) if tc.max_minutes > 0 else eta
            tag = ""
            if limit_left < eta:
                tag = f" (max_minutes; about epoch {epoch + 1 + int(max(limit_left, 0.0) / eta * left)})"
                eta = max(limit_left, 0.0)
            line += (f"  ETA {eta / 60:.0f} min" if eta >= 120 else f"  ETA {eta:.0f} s") + tag
        if (epoch + 1) % max(tc.log_every, 1) == 0 or epoch + 1 == tc.epochs or epoch == 0:
            self._log(line)
        self.epoch = epoch + 1
        self.step_in_epoch = 0
        # checkpoints by wall time (rank 0's clock: only rank 0 writes, nothing to agree on) and
        # by epoch count; always at the end, at a stop and at early stopping (see _fit)
        if self.rank0 and (self.epoch == tc.epochs
                           or (tc.checkpoint_every > 0 and self.epoch % tc.checkpoint_every == 0)
                           or (tc.checkpoint_minutes > 0
                               and time.monotonic() - self._last_checkpoint >= 60.0 * tc.checkpoint_minutes)):
            self.save_checkpoint(self.epoch, 0)
        if tc.early_stopping > 0 and self.bad_epochs >= tc.early_stopping:
            self._log(f"early stopping: no validation improvement for {self.bad_epochs} epochs")
            self._early_stop = True
        if tc.max_minutes > 0 and not self._time_up:
            # rank 0's clock decides for every rank (clocks and epoch ends differ between ranks; a
            # rank leaving alone would hang the others in the next reduction)
            up = torch.tensor([1.0 if self.rank0 and time.monotonic() - self._fit_started >= 60.0 * tc.max_minutes
                               else 0.0], dtype=torch.float64, device=self.device)
            self.ctx.all_reduce_sum(up)
            if float(up[0]) > 0:
                self._time_up = True
                self._log(f"time limit: training.max_minutes {tc.max_minutes:g} reached at the end of epoch "
                          f"{epoch + 1}; the models are written as at the end of the run (continue to training.epochs "
                          f"with {self._resume_command()})")

    def _data_metadata(self) -> dict:
        """What the saved models record about their training data (rank 0; computed once):
        ``training_set`` (counts and energy range per atom, see distmlip.data.info.energy_statistics),
        which the aenet export writes into the .nn headers."""
        if getattr(self, "_training_set_meta", None) is None:
            from ..data.info import energy_statistics

            try:
                stats = energy_statistics(self.ds, self.train_idx, self.model.ann.reference_energies())
                stats["source"] = ",".join(Path(p).name for p in self.ds.paths)
                self._training_set_meta = {"training_set": stats}
            except Exception as exc:   # the model is saved all the same, without the statistics
                warn(f"training-set statistics for the model file: {exc}")
                self._training_set_meta = {}
        from ..models.data_record import RECORD_KEY

        record = getattr(self.model, "training_record", None)
        return {**self._training_set_meta, **({RECORD_KEY: record} if record else {})}

    def _write_models(self):
        if not self.rank0:
            return
        self._flush_best()
        meta = {"epoch": self.epoch, "step": self.global_step, **self._data_metadata()}
        best = self.out / "best_model.pt"
        with self._averaged():
            self.model.save(self.out / "last_model.pt", metadata=meta)
            if not (best.exists() and self.val_stream is not None):
                self.model.save(self.out / "model.pt", metadata=meta)
        if best.exists() and self.val_stream is not None:
            import shutil

            from ..utils.io import atomic_path

            with atomic_path(self.out / "model.pt") as tmp:
                shutil.copyfile(best, tmp)
        self._log(f"model written to {self.out / 'model.pt'}"
                  + (" (best on validation)" if best.exists() and self.val_stream is not None else ""))
        note = selection_note(self._kept_val, self._last_val) if self.force_mode and best.exists() else None
        if note:
            self._log(note)
