"""``distmlip augment config.yaml``: GPR-ANN data augmentation (and the Taylor baseline).

For every subset of the input data set, a GPR is fitted to the energies and forces of its
reference structures (``distmlip.gpr.model``); ``copies`` randomly displaced copies of every
reference structure (``distmlip.gpr.sampling``) are labelled with the GPR energy and its standard
deviation (``method: gpr``) or with the first-order Taylor expansion ``E - F . d``
(``method: taylor``).  Copies whose uncertainty exceeds ``max_uncertainty`` are not used for
training; they go to an extended-XYZ file of active-learning candidates.  The output is a new
HDF5 data set: the input structures unchanged, then the synthetic copies subset by subset
(flags ``synthetic``, ``parent`` = index of the source structure, ``uncertainty`` in eV,
``weight`` = ``synthetic_weight``); copies inherit the parent's source, source index and stored
split, so a split by source never separates a copy from its parent.

Under ``mpirun -n K`` the ranks take the subsets largest first by estimated cost (n = N (1 + 3
natoms) kernel rows), each the next one no rank has taken (``distributed/claims.py``; with no more
subsets than ranks, one each, and the idle ranks lend their cores); each rank writes one shard per subset
(``<workdir>/subset_XXXXX.npz``, atomic) and rank 0 merges the shards in subset order.  The random
displacements of a subset are seeded by (seed, subset name), so the output does not depend on K.
A rerun skips subsets whose shard exists with the same settings (crash recovery); ``--fresh``
recomputes everything.

Example config::

    input: data/train.h5
    output: data/train_gpr.h5
    method: gpr            # or taylor
    copies: auto           # default for gpr: M per subset from the fit (taylor: 20)
    delta: 0.03            # A, std of the Gaussian displacement of every component
    pool: 1                # with copies auto: 3 labels 3M copies, training draws M per epoch
    seed: 0
    max_uncertainty: 0.05  # eV; copies above go to <output>.candidates.xyz
    gpr:
      fingerprint: auto        # local (and inverse for small molecules); or cartesian, chebyshev
      device: cpu
    subsets:
      Li12C3H4O3_0: {copies: 36, delta: 0.034, fixed_atoms: [0, 1, 2]}
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np

from ..config import bounds, load_config, parse_override, paths
from ..data.validate import energy_force_check, robust_outliers, unit_slope, unit_slope_warning
from ..descriptors.spec import DescriptorSpec
from ..distributed.claims import claim, claimed, new_claims_folder, remove_claims_folder
from ..distributed.cores import borrowed_cores, cpu_list
from ..errors import ConfigError, DistmlipError, InputError
from ..utils.io import OutputLock, atomic_path, atomic_write_text, check_writable, clean_stale_temps, json_text
from ..utils.log import log, warn

__all__ = ["AugmentConfig", "GPRSettings", "SubsetSettings", "augment", "add_arguments", "run"]


# ------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------

def _fingerprint_descriptor() -> DescriptorSpec:
    # a GPR fingerprint sees one structure at a time: shorter cutoffs and orders than a potential
    return DescriptorSpec(rc_radial=4.0, n_radial=8, rc_angular=3.0, n_angular=4)


@dataclass
class ChebyshevSettings:
    """The chebyshev fingerprint: a descriptor spec (its keys inline) and how the atoms' rows
    are combined (concatenated in the subset's atom order, or summed)."""
    spec: DescriptorSpec = field(default_factory=_fingerprint_descriptor, metadata={"inline": True})
    mode: Literal["concat", "sum"] = "concat"


def _local_descriptor() -> DescriptorSpec:
    # the local kernel compares atomic environments: the first two neighbour shells of a metal
    return DescriptorSpec(rc_radial=5.0, n_radial=8, rc_angular=3.5, n_angular=4)


@dataclass
class LocalSettings:
    """The local-environment kernel: the per-atom descriptor (keys inline) and the size of the
    hyperparameter sub-sample (kernel rows)."""
    spec: DescriptorSpec = field(default_factory=_local_descriptor, metadata={"inline": True})
    fit_max_obs: int = 800


# a displacement's standard deviation beyond which copies are no longer small displacements of
# their parent (the paper's optimum is 0.034 A; at 0.1 A the local GPR's labels already miss by
# 0.2-0.3 eV on a 30-atom alloy): a larger value is a unit or typing mistake
DELTA_MAX = 0.5


def _check_delta(key: str, delta, copies) -> None:
    if delta == "auto":
        return
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 <= delta <= DELTA_MAX:
        raise ConfigError(f"augment: '{key}' must be a displacement in A between 0 and {DELTA_MAX} "
                          f"(typically 0.01-0.05), got {delta!r}")
    if delta == 0 and copies:
        raise ConfigError(f"augment: '{key}' is 0 with copies = {copies}: every copy would equal its parent "
                          f"(set copies: 0 for no copies)")


def _check_copies(key: str, copies) -> None:
    if copies == "auto":
        return
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 0:
        raise ConfigError(f"augment: '{key}' must be an integer >= 0 or 'auto' (chosen per subset from the "
                          f"GPR's leave-one-out errors and the structures' degrees of freedom), got {copies!r}")


@dataclass
class GPRSettings:
    # auto: 'local'; for non-periodic subsets of <= 64 atoms also inverse distances, and the one
    # with the smaller leave-one-structure-out label-error estimate is kept (auto_candidates)
    fingerprint: Literal["auto", "cartesian", "inverse", "chebyshev", "local"] = "auto"
    chebyshev: ChebyshevSettings = field(default_factory=ChebyshevSettings)
    local: LocalSettings = field(default_factory=LocalSettings)
    # hyperparameters (see distmlip.gpr.model for units); None -> fitted by maximum LML
    weight: Optional[float] = None
    length_scale: Optional[float] = None
    noise_energy: Optional[float] = None
    noise_force: Optional[float] = None
    # cartesian fingerprint: one length scale per element (ratios to the first element fitted by
    # maximum LML with the others; used when length_scale is not given) or one shared by all
    length_scales: Literal["element", "shared"] = "element"
    fit_max_obs: int = 3000          # LML fit on a random sub-sample of at most this many rows
    fit_iterations: int = 60
    fit_restarts: int = 3            # L-BFGS-B runs from the best-screened starting points
    # L-BFGS-B iterations on the block likelihood of all structures after the sub-sample fit;
    # 0: off (on the EC dimers it changed the test MAE by <= 0.4 meV and cost 45-90 s)
    refine_iterations: int = 0
    select: Literal["lml", "loo"] = "lml"   # among the optima: max LML or min LOO energy MAE
    fit_subsample: Literal["random", "local"] = "local"   # which structures the LML fit sees
    max_kernel_obs: Optional[int] = None   # split into local GPRs above this (None: from memory)
    save: Optional[str] = field(default=None, metadata=paths("out"))       # directory: write each subset's fitted GPR (<subset>.gpr.pt)
    # none: every subset searches its own hyperparameters.  chemistry: subsets with the same
    # elements whose GPR uses the local kernel take the hyperparameters (and descriptor scale)
    # of the largest of them, whose search runs once (one atomic energy function per
    # chemistry); each keeps its own data and factorisation.  It halves the demo's fit time but
    # cost label accuracy there (docs/gpr.md), hence not the default.  Off with `load`.
    share: Literal["none", "chemistry"] = "none"
    load: Optional[str] = field(default=None, metadata=paths("in"))       # directory of saved fits (distmlip gpr fit / gpr.save): reuse them
    # share of MemAvailable for a kernel, split between the ranks of a node (augment)
    memory_fraction: float = 0.5
    device: str = "cpu"

    def validate(self):
        if self.fit_restarts < 1:
            raise ConfigError("gpr.fit_restarts must be >= 1")
        if self.fit_max_obs < 2:
            raise ConfigError("gpr.fit_max_obs must be >= 2")
        if self.refine_iterations < 0:
            raise ConfigError(f"gpr.refine_iterations must be >= 0, got {self.refine_iterations}")
        if not 0 < self.memory_fraction <= 1:
            raise ConfigError("gpr.memory_fraction must be in (0, 1]")
        for k in ("weight", "length_scale", "noise_energy", "noise_force"):
            v = getattr(self, k)
            if v is not None and not v > 0:
                raise ConfigError(f"gpr.{k} must be positive (or omitted to fit it), got {v}")


@dataclass
class SubsetSettings:
    # None: the global value; 'auto': chosen from the fit (choose_copies_delta)
    copies: Optional[Union[int, Literal["auto"]]] = None
    delta: Optional[Union[float, Literal["auto"]]] = None
    fixed_atoms: list[int] = field(default_factory=list)
    max_uncertainty: Optional[float] = None
    skip: bool = False


@dataclass
class AugmentConfig:
    input: str = field(default="", metadata=paths("in"))
    output: str = field(default="", metadata=paths("out"))
    method: Literal["gpr", "taylor"] = "gpr"
    # 'auto' (either or both): chosen per subset after its GPR fit from its leave-one-out errors,
    # the references' forces and the free atoms' degrees of freedom (choose_copies_delta; docs/gpr.md)
    # default: 'auto' for method gpr (M = 3n/2 measured better at equal training time past the
    # shortest budgets, docs/gpr.md), 20 for taylor (no fit to choose from)
    copies: Union[int, Literal["auto"], None] = field(
        default=None, metadata={"default_text": "'auto' (method gpr), 20 (method taylor)"})
    delta: Union[float, Literal["auto"]] = 0.03
    # with copies: auto, P > 1 labels a pool of P x M copies per reference and records M per subset
    # in the output (subsets/copies_per_epoch), which training draws anew every epoch
    # (training.copies_per_epoch: auto, the cosine schedule): M copies' cost per epoch, P x M
    # directions over the run.  auto: 3 where copies is auto (POOL_AUTO), else 1 (M fixed copies).
    # At equal training time the pool of 3M gave the slab with CO 0.81x the force error of M fixed
    # copies, the EC dimers 0.96x (0.77x in energy) at 400 s, the demo the same (docs/gpr.md)
    pool: Union[int, Literal["auto"]] = field(default="auto", metadata={"default_text": "auto (3 with copies: auto)"})
    seed: int = 0
    min_distance: float = 0.5
    max_uncertainty: Optional[float] = None
    # suspect labels (0: off): a reference whose energy-force consistency residual
    # (data.validate.energy_force_outliers) lies this many robust standard deviations above the
    # subset's typical one, and 0.1 eV above it, is left out of the GPR fit and gets no copies; a
    # fit whose leave-one-out energy errors still have such an outlier sends every copy of its
    # subset to the candidates file.  Either is named.
    outlier_z: float = field(default=25.0, metadata=bounds(ge=0.0))
    synthetic_weight: float = 1.0
    # weight of a synthetic energy in the ANN loss (docs/gpr.md):
    #   none:     w = synthetic_weight
    #   variance: w = synthetic_weight * s0^2 / (s0^2 + sigma^2), sigma = the GPR's predicted std
    #             of the copy's energy, s0 = weight_sigma (eV) or, when not given, the median sigma
    #             of the subset's kept copies (a copy as certain as the median counts half), but
    #             at least weight_sigma_floor per atom: a spread of sigmas far below what an ANN
    #             resolves says nothing about the labels (H2 copies with sigma <= 0.5 meV got
    #             weights 0-0.65 from the median alone, and GPR-ANN's error rose 10 -> 55 meV)
    weighting: Literal["none", "variance"] = "variance"
    weight_sigma: Optional[float] = None
    weight_sigma_floor: float = field(default=0.001, metadata=bounds(ge=0.0))   # eV per atom
    candidates: Optional[str] = field(default=None, metadata=paths("out"))      # default <output stem>.candidates.xyz
    report: Optional[str] = field(default=None, metadata=paths("out"))          # default <output stem>.report.json (+ .txt)
    workdir: Optional[str] = field(default=None, metadata=paths("out"))         # default <output>.shards
    # ranks without a unit of work (a subset) in a phase lend their cores and threads to the
    # working ranks of their node (distributed/cores.py): more threads change the labels by
    # rounding (1e-7 eV measured); false keeps them bitwise equal across rank counts
    lend_cores: bool = True
    subsets: dict[str, SubsetSettings] = field(default_factory=dict)
    gpr: GPRSettings = field(default_factory=GPRSettings)

    def validate(self):
        if not self.input:
            raise ConfigError("augment: 'input' (HDF5 data set) is required")
        if not self.output:
            raise ConfigError("augment: 'output' (new HDF5 data set) is required")
        if self.copies is None:
            self.copies = "auto" if self.method == "gpr" else 20
        _check_copies("copies", self.copies)
        any_auto = "auto" in [self.copies] + [t.copies for t in self.subsets.values()]
        if self.pool == "auto":
            self.pool = POOL_AUTO if any_auto else 1
        if isinstance(self.pool, bool) or not isinstance(self.pool, int) or self.pool < 1:
            raise ConfigError(f"augment: 'pool' must be an integer >= 1 or auto, got {self.pool!r}")
        if self.pool > 1 and not any_auto:
            raise ConfigError(f"augment: 'pool' ({self.pool}) multiplies the M of copies: auto, and no subset has "
                              "copies: auto; with a number, augment the pool itself (copies: P) and set "
                              "training.copies_per_epoch")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"augment: 'seed' must be an integer >= 0, got {self.seed!r}")
        _check_delta("delta", self.delta, self.copies)
        if self.max_uncertainty is not None and not self.max_uncertainty > 0:
            raise ConfigError("augment: 'max_uncertainty' must be positive")
        if not self.synthetic_weight >= 0:
            raise ConfigError("augment: 'synthetic_weight' must be >= 0")
        if self.weight_sigma is not None and not self.weight_sigma > 0:
            raise ConfigError("augment: 'weight_sigma' must be positive (or omitted: per-subset median sigma)")
        for name, s in self.subsets.items():
            if s.copies is not None:
                _check_copies(f"subsets.{name}.copies", s.copies)
            if s.delta is not None:
                _check_delta(f"subsets.{name}.delta", s.delta, self.copies if s.copies is None else s.copies)
        if self.method == "taylor":
            auto = [k for k, v in [("copies", self.copies), ("delta", self.delta)] +
                    [(f"subsets.{n}.{k}", getattr(t, k)) for n, t in self.subsets.items() for k in ("copies", "delta")]
                    if v == "auto"]
            if auto:
                raise ConfigError(f"augment: {', '.join(auto)}: 'auto' is chosen from the GPR's leave-one-out "
                                  f"errors, and method 'taylor' fits no GPR; give numbers (or method: gpr)")

    # derived paths
    def out_stem(self) -> Path:
        p = Path(self.output)
        return p.with_suffix("") if p.suffix in (".h5", ".hdf5") else p

    def workdir_path(self) -> Path:
        return Path(self.workdir) if self.workdir else Path(str(self.output) + ".shards")

    def candidates_path(self) -> Path:
        return Path(self.candidates) if self.candidates else Path(str(self.out_stem()) + ".candidates.xyz")

    def report_path(self) -> Path:
        return Path(self.report) if self.report else Path(str(self.out_stem()) + ".report.json")

    def for_subset(self, name: str) -> dict:
        s = self.subsets.get(name, SubsetSettings())
        return dict(copies=self.copies if s.copies is None else s.copies,
                    delta=self.delta if s.delta is None else s.delta,
                    fixed_atoms=list(s.fixed_atoms),
                    max_uncertainty=self.max_uncertainty if s.max_uncertainty is None else s.max_uncertainty,
                    skip=s.skip)


# ------------------------------------------------------------------------------------------
# one subset
# ------------------------------------------------------------------------------------------

# raised whenever a code change alters what a shard holds for the same settings and input, so that
# a rerun after an upgrade recomputes instead of reusing (2: one-atom subsets get no copies; 3:
# one-structure fits get none, one GPR per composition group; 4: a local sub-sample that explains
# the set poorly is searched again; 5: references whose energy contradicts their forces are left out;
# 6: keyed by the subset's own reference structures instead of the whole input file)
SHARD_VERSION = 6


def _subset_content(ds, idx: np.ndarray, chunk: int = 2048) -> str:
    """Digest of what a subset's shard is made from: its reference structures (atoms, positions,
    cell, pbc, energy, forces) and the data set's element list (the fingerprints' layout).  Not
    the whole file's: one corrected energy, or new structures in other subsets, recomputed every
    subset of a data set before (sweep 25); the merge reads the parents' other fields anew."""
    from .store import structures_digest

    h = hashlib.sha256(json.dumps(list(ds.species)).encode())
    for a in range(0, len(idx), chunk):
        h.update(structures_digest(ds.read(np.asarray(idx[a:a + chunk]))).encode())
    return h.hexdigest()[:32]


def _subset_key(cfg: AugmentConfig, name: str, idx: np.ndarray, content: str) -> str:
    """Digest of everything a subset's shard depends on (rerun validity): the settings, the
    reference structures' indices and CONTENT (:func:`_subset_content`; a reconverted file under
    the same name is another input where their data differ) and ``SHARD_VERSION``."""
    d = {"version": SHARD_VERSION, "method": cfg.method, "seed": cfg.seed, "min_distance": cfg.min_distance,
         "sub": cfg.for_subset(name), "gpr": asdict(cfg.gpr) if cfg.method == "gpr" else None,
         "name": name, "idx": hashlib.sha256(np.asarray(idx, np.int64).tobytes()).hexdigest(),
         "input": content, "outlier_z": cfg.outlier_z}
    if "auto" in (d["sub"]["copies"], d["sub"]["delta"]):
        d["auto_rule"] = AUTO_RULE      # the values it picks: a changed rule must not reuse old copies
    if d["sub"]["copies"] == "auto" and cfg.pool > 1:
        d["pool"] = cfg.pool            # (absent at 1: the shards written before the key stay valid)
    d["gpr"] and d["gpr"].pop("device", None)
    d["gpr"] and d["gpr"].pop("save", None)
    if d["gpr"] and cfg.gpr.load:
        # a saved fit's content, not its path: a refit into the same directory is another input
        from .store import file_digest, fit_path
        p = fit_path(cfg.gpr.load, name)
        d["gpr"]["load"] = file_digest(p) if p.is_file() else None
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _parents_of(ds, sid: int) -> tuple[np.ndarray, int]:
    """Reference structures of a subset: not synthetic, with forces and, when the data set stores
    a train/validation/test split, in the training split (validation and test structures must not
    inform the GPR labels).  Returns (indices, n_without_forces)."""
    ids = np.flatnonzero(ds.subset_ids == sid)
    synth = ds.column("synthetic")[ids].astype(bool)
    hf = ds.column("has_forces")[ids].astype(bool)
    train = np.ones(len(ids), dtype=bool)
    if ds.has_stored_split:
        train = np.asarray(ds.column("split"))[ids] == 0
    return ids[~synth & hf & train], int((~synth & ~hf & train).sum())


def fit_subset(ds, structs, cfg: AugmentConfig, name: str, rank: int = 0, shared: dict | None = None,
               mixed_orders: bool = False, delta: float | None = None) -> dict:
    """The GPR of one subset: loaded from ``gpr.load`` (a directory of saved fits) when it holds
    one for this subset, else fitted; with ``fingerprint: auto`` every candidate fingerprint is
    fitted and the one with the smallest leave-one-structure-out estimate of a copy's label error
    (:func:`_choose_fingerprint`; ``delta`` the copies' displacement) is kept.  ``shared`` (:func:`shared_hyper` of another subset of
    the same elements, local kernel): the local kernel with those hyperparameters and descriptor
    scale, no search.  Saved to ``gpr.save`` when set.  Returns a dict with fingerprint, model,
    kind, choice (LOO per candidate), loaded (path or None) and shared_from (subset or None)."""
    from .store import fit_path, load_fit, save_fit, structures_digest

    g = cfg.gpr
    if shared is not None and shared.get("kind") == "local":
        E0 = np.array([s.energy for s in structs])
        F0 = _padded_forces(structs)
        fp, model = _fit_fingerprint("local", ds, structs, E0, F0, cfg, name, rank, shared=shared)
        model.calibrate()
        fit = dict(kind="local", fingerprint=fp, model=model, loaded=None, choice=None,
                   shared_from=shared["from"])
        if g.save:
            save_fit(fit_path(g.save, name), fit, structs[0].numbers, structs)
        return fit
    if g.load:
        path = fit_path(g.load, name)
        if path.is_file():
            fit = load_fit(path, structs[0].numbers)
            if fit["data"] != structures_digest(structs):
                raise InputError(
                    f"{path}: the saved GPR of subset '{name}' was fitted on {fit['n_structures']} "
                    f"structures that differ from this subset's {len(structs)} training structures in "
                    f"{cfg.input} (another data set, split or subset); its labels would not reproduce "
                    f"them.  Fit it again (drop gpr.load, or distmlip gpr fit on this input)")
            if g.fingerprint != "auto" and fit["kind"] != g.fingerprint:
                # sweep 8: a saved Cartesian fit labelled a 'fingerprint: local' run's copies 64 meV
                # off, with nothing said
                raise ConfigError(f"{path}: the saved GPR of subset '{name}' uses the {fit['kind']!r} "
                                  f"fingerprint, the configuration asks for gpr.fingerprint: {g.fingerprint!r}; "
                                  f"fit it again with that fingerprint, or set gpr.fingerprint: auto (or "
                                  f"{fit['kind']}) to use the saved one")
            fit["loaded"] = str(path)
            log(f"subset {name}: GPR loaded from {path} ({fit['kind']} fingerprint, fitted on "
                f"{fit['n_structures']} structures)", all_ranks=True)
            return fit
        warn(f"augment: no saved GPR for subset '{name}' in {g.load}; fitting it")
    E0 = np.array([s.energy for s in structs])
    F0 = _padded_forces(structs)
    ref = structs[0]
    # several atom orders (a composition group): only the local kernel compares them atom by atom
    kinds = (["local"] if mixed_orders else auto_candidates(ref.natoms, ref.pbc)) if g.fingerprint == "auto" \
        else [g.fingerprint]
    fits = [_fit_local_checked(ds, structs, E0, F0, cfg, name, rank) if kind == "local" else
            _fit_fingerprint(kind, ds, structs, E0, F0, cfg, name, rank) for kind in kinds]
    if len(fits) == 1:
        best, choice = 0, None
        _calibrated(fits[0][1])      # K^-1 once, for the kept fingerprint only
    else:
        best, choice = _choose_fingerprint(kinds, [f[1] for f in fits], ref.natoms, delta, name)
    fit = dict(kind=kinds[best], fingerprint=fits[best][0], model=fits[best][1], loaded=None,
               choice=choice, shared_from=None)
    if g.save:
        save_fit(fit_path(g.save, name), fit, ref.numbers, structs)
    return fit


def permuted(s, perm):
    """Structure ``s`` with its atoms in the order ``perm`` (None: as it is): numbers, positions
    and forces together (a group's structures sorted by element, a test structure shown to a fit
    in the fit's atom order)."""
    if perm is None:
        return s
    return replace(s, numbers=np.asarray(s.numbers)[perm], positions=np.asarray(s.positions)[perm],
                   forces=None if s.forces is None else np.asarray(s.forces)[perm])


def _padded_forces(structs) -> np.ndarray:
    """[N, n, 3] forces of structures of up to n atoms, zero for the atoms a structure lacks
    (the local kernel's padding, LocalFingerprint)."""
    n = max(s.natoms for s in structs)
    F = np.zeros((len(structs), n, 3))
    for k, s in enumerate(structs):
        F[k, :s.natoms] = np.asarray(s.forces, dtype=np.float64).reshape(-1, 3)
    return F


def _choose_fingerprint(kinds, models, natoms: int, delta: float | None, name: str):
    """(index of the kept candidate, {kind: score in eV}) for ``fingerprint: auto``.

    The score estimates the error of a copy's label from closed-form leave-one-structure-out
    errors over ALL the subset's training structures (each candidate's K^-1, one more
    factorisation's cost): the energy MAE plus the first-order error of the LOO forces over a
    copy's displacement, ``E_MAE + delta sqrt(3 n) F_MAE`` (n atoms, F per component).  The LOO
    of each hyperparameter search's own sub-sample is not comparable between candidates: the
    local kernel's holds a few structures, the global ones' many (on MD frames of a Pt slab with
    CO it chose Cartesian, whose labels were 0.37 eV low, against local's 0.003 eV; docs/gpr.md).
    The energy term alone misses what the copies need: on those frames Cartesian's LOO energy
    error was 2x local's but its LOO force error 17x."""
    for m in models:
        _calibrated(m)
    infos = [m.info for m in models]
    if all("loo_all_energy_mae_eV" in i for i in infos):
        d = 0.0 if delta is None else float(delta)
        score = [i["loo_all_energy_mae_eV"] + d * math.sqrt(3 * natoms) * i.get("loo_all_force_mae_eVA", 0.0)
                 for i in infos]
    else:
        warn(f"subset {name}: the kernel is too large for leave-one-out errors over all its structures; "
             f"fingerprint auto compares the hyperparameter searches' sub-samples (less reliable: name "
             f"gpr.fingerprint to choose)")
        score = [i.get("loo_energy_mae_eV") for i in infos]
    best = min(range(len(models)), key=lambda k: (score[k] is None, score[k] if score[k] is not None else 0.0))
    return best, {k: v for k, v in zip(kinds, score)}


def auto_candidates(natoms: int, pbc) -> list[str]:
    """Fingerprints that ``auto`` compares on a subset: the local-environment kernel, and inverse
    distances for a small non-periodic one (a molecule or cluster of at most
    AUTO_INVERSE_MAX_ATOMS atoms).  The global Cartesian kernel is no longer a candidate: it lost
    to the local kernel on every subset measured, by 7x on MD frames of a Pt slab with CO and by
    300-3000x on make demo's periodic cells, and fitting it cost 80 of the demo augment's 259 s
    (docs/gpr.md); it stays available by name."""
    from .fingerprints import resolve_fingerprint

    glob = resolve_fingerprint("auto", natoms, pbc)
    return ["local"] + ([glob] if glob != "cartesian" else [])


def shared_hyper(fit: dict, name: str, natoms: int) -> dict:
    """What a subset of the same elements takes from this subset's fit (JSON-able): the chosen
    fingerprint kind and, for the local kernel, the hyperparameters in physical units and the
    descriptor scale (:func:`~distmlip.gpr.model.transfer_hyper`)."""
    out = {"from": name, "kind": fit["kind"]}
    if fit["kind"] == "local":
        info = fit["model"].info
        out.update(natoms=int(natoms), weight_eV=float(info["weight_eV"]),
                   length_scale=float(info["length_scale"]), noise_energy_eV=float(info["noise_energy_eV"]),
                   noise_force_eVA=float(info["noise_force_eVA"]),
                   scale=fit["fingerprint"].component_scale())
    return out


def _hyper_given(cfg: AugmentConfig) -> bool:
    """All four GPR hyperparameters given in the config (no search)."""
    g = cfg.gpr
    return all(getattr(g, k) is not None for k in ("weight", "length_scale", "noise_energy", "noise_force"))


def share_plan(cfg: AugmentConfig, ds, parents: dict, costs: dict) -> dict[int, int]:
    """{subset: the subset whose hyperparameters it takes} under ``gpr.share: chemistry``: among
    the subsets to fit (GPR, not skipped, with reference structures and copies) those with the
    same set of elements form a group, and every member takes the search of the member with the
    largest estimated cost (the most reference data; ties: lowest id).  Empty when sharing does
    not apply (share none, a fixed non-local fingerprint, saved fits loaded, or all four
    hyperparameters given)."""
    g = cfg.gpr
    if (cfg.method != "gpr" or g.share != "chemistry" or g.fingerprint not in ("local", "auto") or g.load
            or _hyper_given(cfg)):
        return {}
    groups: dict[tuple, list[int]] = {}
    for sid in sorted(parents):
        sub = cfg.for_subset(ds.subsets[sid]["name"])
        if skip_reason(sub, len(parents[sid]), 0, sub["copies"], int(ds.natoms[parents[sid][0]])
                       if len(parents[sid]) else 0):
            continue
        z = tuple(sorted(set(int(v) for v in ds.read(parents[sid][:1])[0].numbers)))
        groups.setdefault(z, []).append(sid)
    plan = {}
    for members in groups.values():
        # a head fits its hyperparameters: one reference structure cannot (process_subsets)
        able = [s for s in members if len(parents[s]) >= 2]
        if len(members) < 2 or not able:
            continue
        head = min(able, key=lambda s: (-costs[s], s))
        plan.update({s: head for s in members if s != head})
    return plan


def composition_groups(cfg: AugmentConfig, ds, parents: dict) -> dict[int, list[int]]:
    """{first subset: [its subsets]} for subsets of one set of elements and one atom count, in any
    composition and atom order (random substitutions written by ASE make one subset per order,
    random alloys one per composition, often of one structure each): the local kernel compares
    atoms of one element, not positions in a list, so one GPR is fitted on all of them
    (process_subsets; the energies' prior mean per element where compositions differ, LocalGPR).
    Subsets of one structure that are alone in their element set and atom count join across
    atom counts (padded).  Only for the GPR with the local or auto fingerprint (the global ones
    need one atom order); skipped, copy-less and one-atom subsets stay alone."""
    g = cfg.gpr
    if cfg.method != "gpr" or g.fingerprint not in ("local", "auto"):
        return {}
    by: dict[tuple, list[int]] = {}
    for sid in sorted(parents):
        sub = cfg.for_subset(ds.subsets[sid]["name"])
        if len(parents[sid]) == 0:
            continue
        numbers = _subset_numbers(ds, sid, parents)
        if skip_reason(sub, len(parents[sid]), 0, sub["copies"], len(numbers)):
            continue
        by.setdefault((tuple(sorted({int(z) for z in numbers})), len(numbers)), []).append(sid)
    groups = {m[0]: m for m in by.values() if len(m) > 1}
    # a subset of one structure alone in its element set and atom count (vacancies, cells of
    # other sizes) would get no copies: such lone structures of one element set form one group
    # across their atom counts, each padded to the largest (LocalFingerprint n_pad).  Larger
    # fits keep their own atom count: padding costs kernel rows, and they need no partner
    lone: dict[tuple, list[int]] = {}
    for (elements, _n), m in by.items():
        if len(m) == 1 and len(parents[m[0]]) == 1:
            lone.setdefault(elements, []).append(m[0])
    for m in lone.values():
        if len(m) > 1:
            m = sorted(m)
            groups[m[0]] = m
    return groups


def _subset_numbers(ds, sid, parents) -> np.ndarray:
    """The atom sequence of a subset's structures, from its record (no read per subset: data sets
    may hold thousands); a subset of mixed sequences (directory or pattern subsets) has none, and
    its first structure's is read."""
    numbers = ds.subsets[sid].get("order")
    if numbers is None or len(numbers) != int(ds.natoms[parents[sid][0]]):
        numbers = ds.read(parents[sid][:1])[0].numbers
    return np.asarray(numbers)


def describe_group(ds, ms, parents, names) -> str:
    """One line on a composition group (composition_groups): its subsets (the first few), how many
    compositions and atom orders it joins, and its elements and atom count."""
    from ase.data import chemical_symbols

    seqs = [_subset_numbers(ds, m, parents) for m in ms]
    comps = {tuple(sorted(int(z) for z in q)) for q in seqs}
    elements = "".join(sorted({chemical_symbols[int(z)] for q in seqs for z in q}))
    shown = ", ".join(names[m] for m in ms[:6]) + (f", ... ({len(ms)} in all)" if len(ms) > 6 else "")
    sizes = sorted({len(q) for q in seqs})
    atoms = f"{sizes[0]} atoms" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]} atoms"
    what = (f"one composition in {len(ms)} atom orders" if len(comps) == 1 else
            f"{len(comps)} compositions of {elements} with {atoms}")
    return f"subsets {shown} have {what}: one GPR (local kernel) for them all"


def _calibrated(model):
    """``model.calibrate()`` unless it already ran (K^-1 costs one more factorisation)."""
    if "time_calibrate_s" not in model.info:
        model.calibrate()
    return model


# the local sub-sample's LOO error may understate the whole set's by this much before the
# hyperparameters are refitted on a random sub-sample (sweep 5, fits of 2-12 structures on
# 63-107-atom cells: all-set / sub-sample 0.05-1.74 where the labels were good, 5.1 where they were
# 44 meV off: Ni63 with a vacancy, whose 4 nearest structures were MD frames of one volume)
SUBSAMPLE_LOO_RATIO = 3.0


def _fit_local_checked(ds, structs, E0, F0, cfg, name, rank):
    """The local-kernel fit, with a guard on its hyperparameter sub-sample: a few structures
    nearest one centre (fit_subsample local) can all share one cell volume, and hyperparameters
    fitted there smooth the energy's volume dependence away as noise (silently: the labels were
    43.9 meV off with 6 % inside 1 sigma).  When the LOO error over all structures exceeds the
    sub-sample's by SUBSAMPLE_LOO_RATIO, the search is repeated on a random sub-sample and the fit
    with the smaller LOO error over all structures is kept (and said)."""
    fp, model = _fit_fingerprint("local", ds, structs, E0, F0, cfg, name, rank)
    g = cfg.gpr
    if g.fit_subsample != "local" or _hyper_given(cfg):
        return fp, model
    info = _calibrated(model).info
    full, sub = info.get("loo_all_energy_mae_eV"), info.get("loo_energy_mae_eV")
    n_fit = info.get("fit_structures", len(structs))
    pre = f"[rank {rank}] " if rank else ""
    if full is None and sub and n_fit < len(structs):
        # the guard needs the LOO error over all structures, which large kernels do not get
        # (GPR._loo: a row limit and the inverse's memory): say that the sub-sample went unchecked
        info["fit_subsample_unchecked"] = True
        lim = model.models[0].loo_max_obs
        print(f"{pre}subset {name}: hyperparameters from {n_fit} of {len(structs)} structures, not checked "
              f"against the others (leave-one-out errors over all structures are computed for kernels of at most "
              f"{lim} rows whose inverse fits in memory; this one has {info.get('n_obs')}; gpr.fit_max_obs sets "
              f"the sub-sample's rows)", flush=True)
    if full is None or not sub or n_fit >= len(structs) or full <= SUBSAMPLE_LOO_RATIO * sub:
        return fp, model
    print(f"{pre}subset {name}: the hyperparameters from {n_fit} neighbouring structures explain the "
          f"set poorly (LOO energy MAE over all {len(structs)}: {full:.4f} eV, over the sub-sample: "
          f"{sub:.4f} eV); searching again on a random sub-sample", flush=True)
    fp2, model2 = _fit_fingerprint("local", ds, structs, E0, F0, replace(cfg, gpr=replace(g, fit_subsample="random")),
                                   name, rank)
    full2 = _calibrated(model2).info.get("loo_all_energy_mae_eV")
    keep2 = full2 is not None and full2 < full
    print(f"{pre}subset {name}: random sub-sample: LOO energy MAE over all {full2 if full2 is not None else float('nan'):.4f} "
          f"eV; keeping the {'random' if keep2 else 'local'} sub-sample's fit", flush=True)
    if keep2:
        model2.info["fit_subsample_retried"] = {"local_loo_all_eV": full, "random_loo_all_eV": full2}
        return fp2, model2
    model.info["fit_subsample_retried"] = {"local_loo_all_eV": full, "random_loo_all_eV": full2}
    return fp, model


def _fit_fingerprint(kind, ds, structs, E0, F0, cfg, name, rank, shared=None):
    """(fingerprint, fitted LocalGPR) of one subset with fingerprint ``kind``; ``shared``
    (local kernel only): hyperparameters and descriptor scale of another subset, no search."""
    from .model import LocalGPR, transfer_hyper
    from .fingerprints import make_fingerprint

    g = cfg.gpr
    ref = structs[0]
    # a group of several compositions (composition_groups): each structure carries its atoms'
    # elements (LocalFingerprint mixed)
    mixed = kind == "local" and any(not np.array_equal(s.numbers, ref.numbers) for s in structs)
    n_pad = max(s.natoms for s in structs)
    if kind == "local":      # the subset's own elements, in the data set's order
        from ase.data import chemical_symbols
        present = {chemical_symbols[int(z)] for s in structs for z in s.numbers}
        fp = make_fingerprint(kind, species=[e for e in ds.species if e in present], spec=g.local.spec,
                              mixed=mixed, n_pad=n_pad if any(s.natoms != n_pad for s in structs) else None)
    else:
        fp = make_fingerprint(kind, species=ds.species,
                              **({"spec": g.chebyshev.spec, "mode": g.chebyshev.mode} if kind == "chebyshev" else {}))
    try:
        # each structure with its own cell (strained bulk: the cells differ within a subset)
        X, J = fp.compute([s.positions for s in structs], list(structs))
    except InputError as exc:
        raise InputError(f"{cfg.input}: subset '{name}': {exc}") from None
    X, J = fp.fit_scale(X, J, per=shared["scale"]) if shared is not None else fp.fit_scale(X, J)
    groups = None
    if kind == "cartesian" and g.length_scales == "element" and g.length_scale is None:
        from ase.data import chemical_symbols
        groups = np.repeat([chemical_symbols[int(z)] for z in ref.numbers], 3)
    extra = {}
    if kind == "local":
        # one atomic energy function seen through N n environments: a sub-sample of a few
        # structures fixes its hyperparameters (each row of this kernel costs n^2 atom pairs)
        extra = dict(kernel=fp.kernel(ref.numbers), fit_max_obs=min(g.fit_max_obs, g.local.fit_max_obs),
                     refine_iterations=0)
    kw = dict(fit_max_obs=g.fit_max_obs, refine_iterations=g.refine_iterations)
    kw.update(extra)
    hyper = dict(weight=g.weight, length_scale=g.length_scale, noise_energy=g.noise_energy,
                 noise_force=g.noise_force)
    if shared is not None:       # values given in the config still win
        Es = E0
        if mixed:                # the energies' spread about their per-element means (LocalGPR)
            import torch

            from .model import composition_energies
            C = extra["kernel"].composition(X)
            Es = (torch.as_tensor(E0, dtype=torch.float64) - C @ composition_energies(C, E0)).numpy()
        t = transfer_hyper(shared, ref.natoms, Es, F0)
        hyper = {k: (t[k] if v is None else v) for k, v in hyper.items()}
    model = LocalGPR(max_obs=g.max_kernel_obs, memory_fraction=g.memory_fraction,
                     seed=cfg.seed, **hyper, device=g.device,
                     fit_iterations=g.fit_iterations,
                     fit_restarts=g.fit_restarts, select=g.select,
                     fit_subsample=g.fit_subsample, groups=groups, **kw)
    model.progress = _progress_printer(f"{name} ({kind})", rank)
    model.assembly_progress = _progress_printer(f"{name} ({kind})", rank,
                                                what="final kernel, rows of {done}/{total} structures")
    model.stage = lambda msg: print(f"[rank {rank}] subset {name} ({kind}): {msg}", flush=True)
    model.fit(X, J, E0, F0.reshape(len(structs), -1))
    return fp, model


def _progress_printer(name: str, rank: int, every_s: float = 30.0,
                      what: str = "hyperparameter search {done}/{total} likelihood evaluations"):
    """A progress callback ``cb(done, total, elapsed_s)`` that prints, at most every ``every_s``
    seconds, how far a subset's stage is (``what``, formatted with done and total), with an ETA
    from the mean time per unit done."""
    last = [0.0]

    def cb(done, total, elapsed):
        if elapsed - last[0] < every_s:
            return
        last[0] = elapsed
        if done >= total and "hyperparameter" in what:
            # the search ran past its planned evaluations: no honest ETA
            print(f"[rank {rank}] subset {name}: hyperparameter search, {done} likelihood evaluations "
                  f"(more than planned: no ETA), {elapsed:.0f} s", flush=True)
            return
        eta = elapsed / max(done, 1) * max(total - done, 0)
        print(f"[rank {rank}] subset {name}: {what.format(done=done, total=total)}, "
              f"{elapsed:.0f} s, ETA ~{eta:.0f} s", flush=True)
    return cb


def _label_copies(fp, model, structs, pos, M: int, name: str, rank: int, every_s: float = 30.0,
                  cluster_labels=None):
    """(energy [N*M], sigma [N*M]) of the copies ``pos`` [N, M, nat, 3], predicted in chunks of
    parents: a pool of tens of thousands of copies took tens of minutes in one silent call and
    held every copy's fingerprint at once.  Each copy's prediction depends on its own row only:
    chunks change the labels by rounding alone (the BLAS blocking of k^T alpha, whose terms
    cancel), and the same on every rank count."""
    N, nat = pos.shape[0], pos.shape[2]
    labels = model.labels if cluster_labels is None else cluster_labels   # the parents' local GPRs
    step = max(1, -(-N // 20))
    energy, unc = np.empty(N * M), np.empty(N * M)
    progress = _progress_printer(name, rank, every_s, what="labels of {done}/{total} copies")
    t0 = time.perf_counter()
    for a in range(0, N, step):
        b = min(N, a + step)
        Xs, _ = fp.compute(list(pos[a:b].reshape(-1, nat, 3)), [s for s in structs[a:b] for _ in range(M)],
                           with_jacobian=False)
        e, _, sd = model.predict(Xs, None, forces=False, variance=True,
                                 clusters=np.repeat(labels[a:b], M))
        energy[a * M:b * M] = e.numpy()
        unc[a * M:b * M] = sd.numpy()
        progress(b * M, N * M, time.perf_counter() - t0)
    return energy, unc


# ``copies: auto`` / ``delta: auto`` (choose_copies_delta).  A copy's label error is estimated as
# in the fingerprint choice, from the fit's closed-form leave-one-structure-out errors over all its
# training structures: e_L + delta sqrt(3n) f_L (LOO energy MAE per structure, LOO force MAE per
# component; pessimistic: a copy lies next to its parent, a LOO prediction a whole structure away).
# Its first-order signal is delta F_rms sqrt(3n) (the references' forces on the free atoms): the
# ratio rho = e_L / (delta F_rms sqrt(3n)) + f_L / F_rms.
DELTA_AUTO = 0.03        # the paper's optimum (0.03-0.034 A): kept while the labels allow it
DELTA_AUTO_MAX = 0.06    # larger delta only to lift the signal above e_L, at most this far
RHO_AUTO = 0.25          # a copy's estimated label error at most this share of its first-order signal
COPIES_PER_DOF = 0.5     # M = 3n/2 informative copies (M = 40 closed the gap on 60-87 dof: docs/gpr.md)
COPIES_AUTO_MIN = 10
COPIES_AUTO_MAX = 64
POOL_AUTO = 3            # pool: auto with copies: auto: 3M copies labelled, M drawn per epoch
# part of every 'auto' subset's shard key: a changed rule must not reuse copies chosen by the old one
AUTO_RULE = {"rule": 1, "delta": DELTA_AUTO, "delta_max": DELTA_AUTO_MAX, "rho": RHO_AUTO,
             "per_dof": COPIES_PER_DOF, "min": COPIES_AUTO_MIN, "max": COPIES_AUTO_MAX}


def nominal_delta(delta) -> float:
    """The displacement used before a fit exists (fingerprint choice): ``DELTA_AUTO`` for 'auto'."""
    return DELTA_AUTO if delta == "auto" else float(delta)


def choose_copies_delta(copies, delta, info: dict, forces, natoms: int, fixed_atoms=()) -> tuple[int, float, dict]:
    """(M, delta, why) for a subset whose ``copies`` and/or ``delta`` is 'auto' (a number given
    stays as given).  ``info``: the fitted GPR's ``info`` (``loo_all_energy_mae_eV``,
    ``loo_all_force_mae_eVA``; the search's sub-sample LOO energy error when the kernel was too
    large for the full one); ``forces``: the reference forces [N, natoms, 3].

    delta: DELTA_AUTO unless the estimated label error ratio rho there exceeds RHO_AUTO because
    of the LOO energy error (the term that a larger displacement outgrows); then the delta where
    rho = RHO_AUTO, at most DELTA_AUTO_MAX.  A ratio set by the LOO force error alone does not
    fall with delta, and the delta stays.
    copies: each copy gives one projection of the 3n-dimensional force of its parent; M =
    COPIES_PER_DOF x 3n x q, q = 1 / (1 + rho^2) the share of a copy that is signal, within
    [COPIES_AUTO_MIN, COPIES_AUTO_MAX] (labelling and each training epoch cost grow with M)."""
    moving = np.setdiff1d(np.arange(natoms), np.asarray(list(fixed_atoms), dtype=np.int64))
    dof = 3 * len(moving)
    F = np.asarray(forces, np.float64)[:, moving] if len(moving) else np.zeros((0, 3))
    f_rms = float(np.sqrt(np.mean(F ** 2))) if F.size else 0.0
    e_L = info.get("loo_all_energy_mae_eV", info.get("loo_energy_mae_eV"))
    f_L = info.get("loo_all_force_mae_eVA")
    why = {"rule": AUTO_RULE["rule"], "dof": dof, "force_rms_eVA": f_rms, "loo_energy_eV": e_L, "loo_force_eVA": f_L}
    d = DELTA_AUTO if delta == "auto" else float(delta)
    bad_loo = e_L is None or not math.isfinite(e_L) or (f_L is not None and not math.isfinite(f_L))
    if bad_loo or not f_rms > 0 or dof == 0:
        # nothing to measure against: the defaults' values (a non-finite LOO error, from a kernel
        # too ill-conditioned for its inverse, says nothing either)
        why["reason"] = ("no finite leave-one-out errors" if bad_loo else "no forces on the free atoms") + \
            ": default values"
        M = 20 if copies == "auto" else int(copies)
        why.update(copies=M, delta_A=d)
        return M, d, why
    g = f_rms * math.sqrt(dof)                      # first-order rise per A of displacement
    rel_f = (f_L or 0.0) / f_rms
    rho = e_L / (d * g) + rel_f
    reasons = []
    if delta == "auto":
        if rho > RHO_AUTO and rel_f < RHO_AUTO:
            d_need = e_L / (g * (RHO_AUTO - rel_f))
            d = min(DELTA_AUTO_MAX, d_need)
            reasons.append(f"delta {d:.3g} A: at {DELTA_AUTO} A the LOO energy error {e_L:.3g} eV was "
                           f"{rho:.2g} of the first-order rise {DELTA_AUTO * g:.3g} eV"
                           + (" (capped)" if d < d_need else ""))
            rho = e_L / (d * g) + rel_f
        else:
            reasons.append(f"delta {d:.3g} A: estimated label error {rho:.2g} of the first-order rise "
                           f"{d * g:.3g} eV" + (f" (LOO force error {rel_f:.2f} of F_rms: no delta lowers it)"
                                                 if rel_f >= RHO_AUTO else ""))
    q = 1.0 / (1.0 + rho * rho)
    if copies == "auto":
        raw = COPIES_PER_DOF * dof * q
        M = int(min(COPIES_AUTO_MAX, max(COPIES_AUTO_MIN, math.ceil(raw))))
        reasons.append(f"M {M}: {COPIES_PER_DOF:g} x {dof} degrees of freedom x signal share {q:.2f}"
                       + (f" = {raw:.1f}, bounded to [{COPIES_AUTO_MIN}, {COPIES_AUTO_MAX}]"
                          if M != math.ceil(raw) else ""))
    else:
        M = int(copies)
    why.update(copies=M, delta_A=d, label_error_ratio=rho, first_order_eV=d * g, reason="; ".join(reasons))
    return M, d, why


def skip_reason(sub: dict, n_ref: int, n_noforce: int, M: int, natoms: int) -> str | None:
    """Why a subset gets no copies (None: it gets them).  A one-atom structure (an isolated atom,
    a one-atom periodic cell) is only translated by a displacement: its copies would repeat the
    parent's energy and count it M + 1 times in the loss."""
    if sub["skip"]:
        return "skip"
    if M == 0:
        return "copies = 0"
    if n_ref == 0:
        return ("no structures with forces (the GPR fits energies and forces; its "
                f"{n_noforce} structure(s) stay in the output as they are)" if n_noforce else
                "no reference structures in the training split")
    if natoms == 1:
        return "one atom per structure: a displaced copy is a translation of its parent"
    if sub.get("fixed_atoms") and len({int(i) for i in sub["fixed_atoms"]}) >= natoms:
        return "every atom is in fixed_atoms: a copy would be its parent"
    return None


def process_subset(ds, sid: int, cfg: AugmentConfig, rank: int = 0, shared: dict | None = None) -> dict:
    """Augment one subset (:func:`process_subsets` of a group of one)."""
    return process_subsets(ds, [sid], cfg, rank, shared)[sid]


def process_subsets(ds, sids, cfg: AugmentConfig, rank: int = 0, shared: dict | None = None) -> dict:
    """Augment the subsets ``sids`` (one subset, or a :func:`composition_groups` group: one
    composition in several atom orders, whose GPR is fitted once on all their reference
    structures); returns {sid: result}, each with arrays (parent, copy, positions, energy,
    uncertainty, kept), the report entry and, for the GPR, ``hyper`` (:func:`shared_hyper`, what
    subsets of the same elements may take); ``shared``: hyperparameters taken from another
    subset (fit_subset).

    A group's local kernel sees each structure with its atoms sorted by element (stable), so
    that every structure of the group has the same element sequence; an energy does not depend
    on the atom order, so the copies' labels need no reordering back.  Each subset keeps its own
    random stream (``subset_rng``) and atom order for the displacements."""
    import torch

    from .sampling import displace, subset_rng, taylor_energy

    t0 = time.perf_counter()
    out, prep = {}, {}
    empty = dict(parent=np.zeros(0, np.int64), copy=np.zeros(0, np.int64), positions=np.zeros((0, 0, 3)),
                 energy=np.zeros(0), uncertainty=np.zeros(0), kept=np.zeros(0, bool))
    names = [ds.subsets[sid]["name"] for sid in sids]
    for sid, name in zip(sids, names):
        sub = cfg.for_subset(name)
        idx, n_noforce = _parents_of(ds, sid)
        M, delta = sub["copies"], sub["delta"]        # 'auto': chosen after the fit (choose_copies_delta)
        rep = {"subset": name, "subset_id": int(sid), "method": cfg.method, "rank": rank,
               "n_reference": int(len(idx)), "n_without_forces": n_noforce, "copies_per_structure": M,
               "delta_A": delta, "fixed_atoms": sub["fixed_atoms"], "max_uncertainty_eV": sub["max_uncertainty"]}
        if len(sids) > 1:
            rep["gpr_group"] = names
        reason = skip_reason(sub, len(idx), n_noforce, M, int(ds.natoms[idx[0]]) if len(idx) else 0)
        if reason:
            rep.update(n_copies=0, n_kept=0, n_candidates=0, skipped=True, reason=reason,
                       time_total_s=time.perf_counter() - t0)
            out[sid] = {**empty, "report": rep}
            continue
        structs = ds.read(idx)
        ref = structs[0]
        for s in structs:
            if s.natoms != ref.natoms or not np.array_equal(s.numbers, ref.numbers):
                raise InputError(f"{cfg.input}: structure {s.index}, field 'numbers': subset '{name}' is not "
                                 f"homogeneous (atom sequence differs from structure {ref.index}); the GPR "
                                 f"fingerprints need one atom order per subset")
        if cfg.outlier_z > 0 and cfg.method == "gpr":
            # a reference whose energy contradicts its forces and its neighbours' energies would
            # be fitted by the GPR and spread into every copy of the subset: left out of the fit
            # and given no copies (it stays in the data set), and named
            check = energy_force_check(structs, z_max=cfg.outlier_z)
            bad, typical = check.bad, check.typical
            u = unit_slope(check.dE, check.work, check.pairs)
            if u is not None and u.suspect:
                # energies and forces in different units: the GPR fits both, and its copies'
                # labels follow whichever it weighs more
                rep["unit_slope"] = {"slope": u.slope, "range": [u.low, u.high], "pairs": u.pairs,
                                     "likely": u.likely(ref.natoms)}
                warn(unit_slope_warning(u, f"{cfg.input}: subset {name}",
                                        lambda i: f"structure {int(idx[i])} ({structs[i].source}, index "
                                                  f"{structs[i].source_index})" if i >= 0 else "a structure",
                                        ref.natoms))
            if bad and len(bad) < len(structs):
                drop = {i for i, _ in bad}
                rep["label_outliers"] = [{"structure": int(idx[i]), "source": structs[i].source,
                                          "source_index": int(structs[i].source_index), "residual_eV": float(r)}
                                         for i, r in bad]
                warn(f"subset {name}: reference label(s) that contradict their own forces and their neighbours' "
                     f"energies (energy-force consistency residual against a typical {typical:.3g} eV): "
                     + "; ".join(f"structure {o['structure']} ({o['source']}, index {o['source_index']}) "
                                 f"{o['residual_eV']:.3g} eV" for o in rep["label_outliers"][:5])
                     + (" ..." if len(bad) > 5 else "")
                     + ".  Left out of the GPR fit and given no copies (they stay in the data set, and train "
                       "on them as they are): check their energy and forces (outlier_z: 0 keeps them)")
                keep = [i for i in range(len(structs)) if i not in drop]
                idx = idx[keep]
                structs = [structs[i] for i in keep]
                rep["n_reference"] = int(len(idx))
        prep[sid] = dict(name=name, idx=idx, M=M, delta=delta, sub=sub, rep=rep, structs=structs,
                         E0=np.array([s.energy for s in structs]), F0=np.stack([s.forces for s in structs]))

    def draw(d):
        """The copies of one prepared subset, once its M and delta are numbers.  Its generator is
        used for nothing else, so drawing after the fit gives the copies drawn before it."""
        t1 = time.perf_counter()
        rng = subset_rng(cfg.seed, d["name"])
        d["disp"] = np.stack([displace(s.positions, d["M"], d["delta"], rng, fixed=d["sub"]["fixed_atoms"],
                                       cell=s.cell, pbc=s.pbc, min_dist=cfg.min_distance,
                                       where=f"{cfg.input}: structure {s.index} (subset '{d['name']}')")
                              for s in d["structs"]])                                  # [N, M, nat, 3]
        d["pos"] = np.stack([s.positions for s in d["structs"]])[:, None] + d["disp"]  # [N, M, nat, 3]
        d["t_sample"] = time.perf_counter() - t1
    n_total = sum(len(d["idx"]) for d in prep.values())
    # (gpr.load only spares it when a saved fit for it exists: sweep 25 found a load run that
    # fitted and labelled the one-structure subsets the save run had refused)
    from .store import fit_path
    if prep and cfg.method == "gpr" and n_total == 1 and shared is None and not _hyper_given(cfg) \
            and not (cfg.gpr.load and fit_path(cfg.gpr.load, names[0]).is_file()):
        # measured: a GPR fitted on one structure puts its length scale on the lower bound and
        # misses 85-95 % of a copy's energy rise, far outside its sigma (docs/gpr.md)
        for sid, d in prep.items():
            d["rep"].update(n_copies=0, n_kept=0, n_candidates=0, skipped=True,
                            reason="one reference structure: its GPR hyperparameters cannot be fitted "
                                   "(add structures of this composition"
                                   + (" or of its elements and atom count (the local kernel fits one GPR on "
                                      "them all)" if cfg.gpr.fingerprint in ("local", "auto") else "")
                                   + (", gpr.share: chemistry (hyperparameters from a subset of the same "
                                      "elements with 2 or more structures)" if cfg.gpr.share != "chemistry"
                                      else "; gpr.share: chemistry found no subset of the same elements with "
                                           "2 or more structures to take them from")
                                   + ", or give gpr.weight, length_scale, noise_energy and noise_force)",
                            time_total_s=time.perf_counter() - t0)
            out[sid] = {**empty, "report": d["rep"]}
        return out
    if not prep:
        return out
    hyper, labels, fit_info = None, {}, {}
    if cfg.method == "taylor":
        for sid, d in prep.items():
            draw(d)
            labels[sid] = (np.concatenate([taylor_energy(d["E0"][k], d["F0"][k], d["disp"][k])
                                           for k in range(len(d["structs"]))]), None)
    else:
        g = cfg.gpr
        if g.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"gpr.device is {g.device!r} but torch has no CUDA device here")
        mixed = len(sids) > 1
        perms = {sid: (np.argsort(d["structs"][0].numbers, kind="stable") if mixed else None)
                 for sid, d in prep.items()}

        pstructs = {sid: [permuted(s, perms[sid]) for s in d["structs"]] for sid, d in prep.items()}
        allp = [s for sid in prep for s in pstructs[sid]]
        head = names[0]
        fit = fit_subset(ds, allp, cfg, head, rank, shared=shared, mixed_orders=mixed,
                         delta=nominal_delta(next(iter(prep.values()))["delta"]))
        fit, dropped = _refit_without_contradicted(ds, fit, allp, cfg, head, rank, shared, mixed, prep)
        if dropped:
            # the structures whose labels the others contradict and whose presence spoiled the
            # fit: out of the GPR and without copies (they stay in the data set), as the
            # energy-force check does before a fit
            at, gone = 0, set(dropped)
            for sid, d in prep.items():
                n = len(d["structs"])
                mine = [i - at for i in range(at, at + n) if i in gone]
                at += n
                if not mine:
                    continue
                keep = [k for k in range(n) if k not in mine]
                d["rep"].setdefault("label_outliers", []).extend(
                    {"structure": int(d["idx"][k]), "source": d["structs"][k].source,
                     "source_index": int(d["structs"][k].source_index), "loo_error_eV": float(dropped[at - n + k])}
                    for k in mine)
                d["idx"], d["E0"], d["F0"] = d["idx"][keep], d["E0"][keep], d["F0"][keep]
                d["structs"] = [d["structs"][k] for k in keep]
                pstructs[sid] = [pstructs[sid][k] for k in keep]
                d["rep"]["n_reference"] = len(keep)
            allp = [s for sid in prep for s in pstructs[sid]]
            for sid in [sid for sid, d in prep.items() if not d["structs"]]:
                d = prep.pop(sid)
                d["rep"].update(n_copies=0, n_kept=0, n_candidates=0, skipped=True,
                                reason="its reference structure's energy contradicts the other structures of its "
                                       "GPR group (left out of the fit; check its energy)",
                                time_total_s=time.perf_counter() - t0)
                out[sid] = {**empty, "report": d["rep"]}
                del pstructs[sid]
            if not prep:
                return out
        fp, model = fit["fingerprint"], fit["model"]
        hyper = shared_hyper(fit, head, allp[0].natoms)
        info = model.info
        fit_info = {"fingerprint": fp.state(), "gpr": {k: info.get(k) for k in (
            "weight", "length_scale", "noise_energy", "noise_force", "weight_eV", "noise_energy_eV",
            "noise_force_eVA", "length_scale_by_group", "energy_mean_eV", "energy_scale_eV", "force_scale_eVA", "jitter",
            "jitter_rel", "lml", "fitted", "fit_structures", "fit_obs", "lml_fit_start", "lml_fit_end",
            "fit_select", "fit_subsample", "fit_nn_distance", "nn_distance", "loo_energy_mae_eV", "fit_candidates",
            "sigma_calibration", "sigma_calibration_from", "loo_all_energy_mae_eV", "loo_all_force_mae_eVA", "loo_all_n",
            "time_calibrate_s", "fit_at_bounds", "n_obs", "max_kernel_obs", "memory_cap_obs", "split_by_memory", "n_local", "local_sizes", "time_hyper_s",
            "time_fit_s", "time_predict_s", "fit_subsample_retried", "fit_subsample_unchecked", "loo_unusual",
            "label_outliers_refit") if k in info}}
        if fit.get("choice"):
            fit_info["fingerprint_choice"] = fit["choice"]
        if fit.get("shared_from"):
            fit_info["hyperparameters_from"] = fit["shared_from"]
        if fit.get("loaded"):
            fit_info["gpr_loaded_from"] = fit["loaded"]
        # a loaded fit is not refitted (_refit_without_contradicted): its outliers are only named,
        # and its copies go to the candidates file
        suspects = _loo_outliers(getattr(model, "loo_residual_eV", None), cfg.outlier_z) if fit.get("loaded") else []
        if suspects:
            fit_info["loo_outliers"] = []
            at = 0
            for sid, d in prep.items():
                for i in suspects:
                    if at <= i < at + len(d["structs"]):
                        st = d["structs"][i - at]
                        fit_info["loo_outliers"].append(
                            {"subset": d["name"], "structure": int(d["idx"][i - at]), "source": st.source,
                             "source_index": int(st.source_index), "loo_error_eV": float(model.loo_residual_eV[i])})
                at += len(d["structs"])
            typical = float(np.nanmedian(np.abs(model.loo_residual_eV)))
            shown = "; ".join(f"structure {o['structure']} ({o['source']}, index {o['source_index']}) "
                              f"{o['loo_error_eV']:+.3g} eV" for o in fit_info["loo_outliers"][:5])
            warn(f"subset {head}: reference label(s) that the other structures contradict (leave-one-out energy "
                 f"error against a typical {typical:.3g} eV): {shown}"
                 f"{' ...' if len(fit_info['loo_outliers']) > 5 else ''}.  A wrong energy spoils the GPR fitted to "
                 f"it: every copy of {'these subsets' if len(prep) > 1 else 'this subset'} goes to the candidates "
                 f"file, none into training.  Check or remove the structure(s) and rerun augment (outlier_z: 0 "
                 f"keeps the copies)")
        for sid, d in prep.items():
            if d["M"] == "auto" or d["delta"] == "auto":
                asked = {"copies": d["M"], "delta": d["delta"]}
                d["M"], d["delta"], why = choose_copies_delta(d["M"], d["delta"], info, d["F0"],
                                                              d["structs"][0].natoms, d["sub"]["fixed_atoms"])
                pool = ""
                if asked["copies"] == "auto" and cfg.pool > 1:
                    # a pool of cfg.pool x M copies, M of them drawn per training epoch
                    d["rep"]["copies_per_epoch"] = d["M"]
                    d["M"] = cfg.pool * d["M"]
                    why["pool"] = d["M"]
                    pool = f" per training epoch, from a pool of {d['M']} (training.copies_per_epoch: auto)"
                d["rep"].update(copies_per_structure=d["M"], delta_A=d["delta"],
                                auto_choice=dict(why, asked=asked))
                log(f"subset {d['name']}: {' and '.join(k for k, v in asked.items() if v == 'auto')} auto: "
                    f"M = {why['copies']}{pool}, delta = {d['delta']:.3g} A ({why['reason']})", all_ranks=True)
            draw(d)
        fit_info["fit_warnings"] = _fit_quality(info, cfg.input, head, len(prep) > 1,
                                                float(next(iter(prep.values()))["delta"]), allp[0].natoms)
        for w in fit_info["fit_warnings"]:
            warn(w["message"])
        off = 0
        for sid, d in prep.items():
            n = len(d["structs"])
            pos = d["pos"] if perms[sid] is None else d["pos"][:, :, perms[sid]]
            labels[sid] = _label_copies(fp, model, pstructs[sid], pos, d["M"], f"{d['name']} ({fit['kind']})",
                                        rank, cluster_labels=model.labels[off:off + n])
            off += n
    for sid, d in prep.items():
        energy, unc = labels[sid]
        if unc is None:
            unc = np.zeros(len(energy))
        M, N, E0, rep = d["M"], len(d["structs"]), d["E0"], d["rep"]
        rep.update(fit_info)
        thr = cfg.for_subset(d["name"])["max_uncertainty"]
        kept = np.ones(len(energy), bool) if thr is None else unc <= thr
        if fit_info.get("loo_outliers") or any(w["copies_to_candidates"] for w in fit_info.get("fit_warnings", [])):
            kept[:] = False
        rep.update(
            n_copies=int(len(energy)), n_kept=int(kept.sum()), n_candidates=int((~kept).sum()),
            uncertainty_eV={"mean": float(unc.mean()), "median": float(np.median(unc)),
                            "p95": float(np.percentile(unc, 95)), "max": float(unc.max())},
            label_minus_parent_eV={"mean": float((energy - np.repeat(E0, M)).mean()),
                                   "std": float((energy - np.repeat(E0, M)).std())},
            time_sample_s=d["t_sample"], time_total_s=time.perf_counter() - t0)
        _report_curvature(rep, d)
        nat = d["structs"][0].natoms
        out[sid] = dict(parent=np.repeat(d["idx"], M).astype(np.int64),
                        copy=np.tile(np.arange(M), N).astype(np.int64),
                        positions=d["pos"].reshape(-1, nat, 3), energy=energy, uncertainty=unc, kept=kept,
                        report=rep, hyper=hyper)
    return out


# The copies' mean energy rise over their parents against the RMS first-order rise delta F_rms
# sqrt(3 n) (the part that carries the forces), reported per subset as rise_over_first_order: how
# much of a label is curvature.  It is reported, not warned about: on the EC dimers (2.4 at 0.03 A)
# copies at 0.012 A (1.0) gave the same GPR-ANN force error at equal epochs (docs/results.md, ninth
# session); an earlier reading that a smaller delta helped compared runs of different lengths.


def _report_curvature(rep: dict, d: dict) -> None:
    """Report the copies' rise over its first-order part (``rep['rise_over_first_order']``)."""
    natoms = d["structs"][0].natoms
    moving = np.setdiff1d(np.arange(natoms), np.asarray(rep.get("fixed_atoms") or [], dtype=np.int64))
    F = [np.asarray(s.forces, np.float64)[moving] for s in d["structs"] if getattr(s, "forces", None) is not None]
    delta = float(rep.get("delta_A") or 0.0)
    if not F or delta <= 0 or not len(moving):
        return
    first = delta * float(np.sqrt(np.mean(np.concatenate(F) ** 2))) * np.sqrt(3 * len(moving))
    if first > 0:
        rep["rise_over_first_order"] = float(rep["label_minus_parent_eV"]["mean"] / first)


# A fitted GPR that learned little about forces (leave-one-out force error against the forces'
# RMS; zero forces give ~0.8) on references that differ far less than a copy moves (the RMS of
# their energies against the first-order rise delta F_rms sqrt(3 n) of a copy): its copies'
# rise is curvature it never saw.  30 Cu8 cells rattled by 0.0007 A: 1.24 and 0.015 (12 cells:
# 0.32), every copy's label off by the whole rise (0 % within 2 sigma).  Clean: Cu8, Au2Cu6, Cu4,
# Al2 fits 0.003-0.03; a free Cu3Ni cluster of 5 references 0.84 with spread ~1, and its copies'
# labels good (1.7 meV against a 62 meV rise: first-order rises, from the parents' own forces).
# The jitter against the kernel's scale weight^2 (standardised units): 0.76 (30 cells), 0 on the
# clean fits.
GPR_LOO_FORCE_LEARNED = 0.3
GPR_SPREAD_OF_RISE = 0.1
GPR_JITTER_OF_WEIGHT = 0.01


def _fit_quality(info: dict, path: str, head: str, group: bool, delta: float, natoms: int) -> list[dict]:
    """Warnings about a fitted GPR from the numbers its fit reported (no extra computation):
    [{what, value, copies_to_candidates, message}]."""
    out = []
    where = f"{path}: subset {head}{' (and the subsets fitted with it)' if group else ''}"
    loo_f, f_rms, e_rms = info.get("loo_all_force_mae_eVA"), info.get("force_scale_eVA"), info.get("energy_scale_eV")
    todo = ("a smaller delta, more (or more varied) reference structures, or another fingerprint "
            "(gpr.fingerprint)")
    if loo_f is not None and f_rms and e_rms is not None and delta > 0 and natoms > 0:
        rise = delta * f_rms * np.sqrt(3 * natoms)
        if loo_f >= GPR_LOO_FORCE_LEARNED * f_rms and e_rms < GPR_SPREAD_OF_RISE * rise:
            out.append({"what": "loo_force", "value": loo_f / f_rms, "spread_of_rise": e_rms / rise,
                        "copies_to_candidates": True, "message": (
                f"{where}: field 'forces': the GPR learned little about the forces (leave-one-out force error "
                f"{loo_f:.3g} eV/A against the forces' own RMS {f_rms:.3g} eV/A; a fit that learned them gives a few "
                f"% of it), and the references' energies differ by {e_rms:.3g} eV RMS where a copy {delta:g} A away "
                f"rises by about {rise:.3g} eV to first order: the copies' energies rest on curvature the GPR never "
                f"saw and are not reliable; they go to the candidates file, none into training.  Use {todo}")})
    jit, w = info.get("jitter"), info.get("weight")
    if jit and w and jit > GPR_JITTER_OF_WEIGHT * w * w:
        out.append({"what": "jitter", "value": jit / (w * w), "copies_to_candidates": False, "message": (
            f"{where}: the GPR's kernel matrix needed a jitter of {jit:.3g} ({jit / (w * w):.2g} x the kernel's "
            f"scale weight^2 = {w * w:.3g}) to factorise: the fit is smoothed by it, not by its fitted noise, and "
            f"its uncertainties are too small.  Check the copies' labels; {todo} help")})
    return out


# ------------------------------------------------------------------------------------------
# shards
# ------------------------------------------------------------------------------------------

def _shard_path(workdir: Path, sid: int) -> Path:
    return workdir / f"subset_{sid:05d}.npz"


def write_shard(path: Path, res: dict, key: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, key=np.array(key), report=np.array(json.dumps(res["report"], default=float)),
                     **{k: res[k] for k in ("parent", "copy", "positions", "energy", "uncertainty", "kept")})


def read_shard(path: Path) -> dict | None:
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}      # reads every member: zip CRCs checked
        d["key"] = str(d["key"])
        d["report"] = json.loads(str(d["report"]))
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        # a truncated or damaged shard (a crash, a full disk, a bad block) is recomputed, never used
        warn(f"{path}: unreadable shard ({type(exc).__name__}: {exc}); recomputing")
        return None
    return d


def shard_is_done(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    d = read_shard(path)
    return d is not None and d["key"] == key


# ------------------------------------------------------------------------------------------
# distribution
# ------------------------------------------------------------------------------------------

def assign_subsets(costs: dict[int, float], world: int) -> dict[int, int]:
    """Largest-first greedy assignment of subsets to the least-loaded rank (ties: lowest rank,
    lower subset id first); identical on every rank."""
    load = [0.0] * world
    out = {}
    for sid in sorted(costs, key=lambda s: (-costs[s], s)):
        r = min(range(world), key=lambda k: (load[k], k))
        out[sid] = r
        load[r] += costs[sid]
    return out


def idle_ranks_hint(n_units: int, world: int, n_nodes: int) -> str | None:
    """The warning augment prints when whole nodes will wait: one unit of work (a subset, or a
    composition group) is one rank's; idle ranks lend their cores to the working ranks of their
    node (distributed/cores.py), but a node without a unit has nobody to lend to."""
    if world <= n_units or n_units >= n_nodes:
        return None
    return (f"augment: {n_units} unit(s) of work (subsets) for {world} ranks on {n_nodes} nodes: the ranks of "
            f"{n_nodes - n_units} node(s) will wait (idle ranks lend their cores only within a node).  Run "
            f"this stage on {max(n_units, 1)} node(s)")


ETA_AFTER_S = 10.0     # the whole-phase ETA line only once a rank has worked this long


# observations (energies and force components) above which the Cholesky factorisations (n^3, one
# core) outgrow the kernel blocks and the hyperparameter search (about n^1.25 on the 35 fits of a
# heterogeneous set of 49-2,254 observations; docs/results.md "Twenty-fourth session")
CUBIC_FROM_OBS = 55000.0


def _estimated_cost(cfg, ds, sid, n_ref) -> float:
    """A unit's relative cost: orders the work largest first (a long unit taken last leaves the
    other ranks waiting) and scales the progress lines' ETAs."""
    nat = int(ds.subsets[sid].get("natoms", -1))
    if nat <= 0:
        nat = int(np.max(ds.natoms[ds.subset_ids == sid])) if n_ref else 1
    sub = cfg.for_subset(ds.subsets[sid]["name"])
    if sub["skip"] or n_ref == 0:
        return 0.0
    if cfg.method == "taylor":
        return float(n_ref * max(sub["copies"], 1) * nat)
    n = float(n_ref * (1 + 3 * nat))
    cap = cfg.gpr.max_kernel_obs

    def one(m):
        return m ** 1.25 * (1.0 + (m / CUBIC_FROM_OBS) ** 1.75)

    if cap and n > cap:      # local GPRs: n / cap of them with cap observations each
        return n / cap * one(float(cap))
    return one(n)


def augment(cfg: AugmentConfig, fresh: bool = False, force: bool = False) -> dict | None:
    """Run the augmentation (all ranks); rank 0 returns the report, other ranks None."""
    from ..data.h5store import H5Dataset
    from ..distributed import Heartbeat, init_distributed

    # MPI only: shards travel through files; ranks that finished wait in a sleeping barrier
    ctx = init_distributed(device="cpu", torch_group=False)
    rank = ctx.rank
    if not Path(cfg.input).is_file():
        raise InputError(f"augment: input data set {cfg.input} does not exist")
    if os.path.abspath(cfg.input) == os.path.abspath(cfg.output):
        raise ConfigError("augment: 'output' must differ from 'input' (a NEW data set is written)")
    from .store import check_load_folder

    check_load_folder(cfg.gpr.load)
    ds = H5Dataset(cfg.input)
    names = [t["name"] for t in ds.subsets]
    unknown = sorted(set(cfg.subsets) - set(names))
    if unknown:
        raise ConfigError(f"augment: subsets {unknown} in the config are not in {cfg.input}; "
                          f"its subsets are: {', '.join(names)}")
    workdir = cfg.workdir_path()
    lock, out_lock, err = None, None, None
    if rank == 0:
        # before any fitting: the output's folder and the shard folder are writable, leftovers of
        # dead writers are removed, and no other augment job writes the same shards
        try:
            check_writable(Path(cfg.output).parent, "output folder")
            check_writable(workdir, "shard folder")
            for folder in (workdir, Path(cfg.output).parent):
                clean_stale_temps(folder)
            lock = OutputLock(workdir, force=force, what="shard folder", log=log).acquire()
            # and no other job writes the same output file (two jobs with their own shard folders
            # both reported "wrote" one file, which held the second's structures: sweep 13)
            out = Path(cfg.output)
            try:
                out_lock = OutputLock(out.parent, force=force, what="output file", log=log, file=out.name).acquire()
            except DistmlipError:
                lock.release()
                lock = None
                raise
        except DistmlipError as exc:
            err = (type(exc).__name__, str(exc))
    err = ctx.broadcast_object(err)
    if err is not None:
        from .. import errors as E

        raise getattr(E, err[0], DistmlipError)(err[1])
    try:
        # ranks that finished wait for the others without a deadline (fits take hours); a partner
        # that stops beating ends the wait instead (distributed/liveness.py)
        with Heartbeat(workdir, rank, ctx.world_size, ctx.timeout_s,
                       hint="Finished subsets are kept in the shard folder: rerun the same command to "
                            "resume") as hb:
            return _augment(cfg, ctx, ds, names, workdir, fresh, hb.check)
    finally:
        for held in (out_lock, lock):
            if held is not None:
                held.release()


def _hyper_path(workdir: Path, sid: int) -> Path:
    return workdir / f"subset_{sid:05d}.hyper.json"


def _read_hyper(path: Path, key: str) -> dict | None:
    """The shared hyperparameters a subset's run wrote, if they belong to its current key."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("key") != key:
        return None
    return {k: v for k, v in d.items() if k != "key"}


def _check_fixed_atoms(cfg, ds, names, parents) -> None:
    """Every subset's ``fixed_atoms`` within its atom count, before any fit (an index out of
    range surfaced only when the subset's turn came, after the others' fits)."""
    for sid, idx in parents.items():
        fx = cfg.for_subset(names[sid])["fixed_atoms"]
        if not fx or len(idx) == 0:
            continue
        n = int(ds.natoms[idx[0]])
        bad = [int(i) for i in fx if not 0 <= int(i) < n]
        if bad:
            raise ConfigError(f"{cfg.input}: subset '{names[sid]}': fixed_atoms {bad} out of range: its structures "
                              f"have {n} atoms (indices 0..{n - 1})")


def _augment(cfg, ctx, ds, names, workdir, fresh, watch=None):
    rank, world = ctx.rank, ctx.world_size
    parents = {sid: _parents_of(ds, sid)[0] for sid in range(len(names))}
    _check_fixed_atoms(cfg, ds, names, parents)
    keys = {sid: _subset_key(cfg, names[sid], parents[sid], _subset_content(ds, parents[sid])) for sid in parents}
    # the unit of work: a subset, or a composition group (one GPR for several atom orders) under
    # its first subset; a group's shards depend on every member's data, hence one key for all
    groups = composition_groups(cfg, ds, parents)
    member_of = {m: h for h, ms in groups.items() for m in ms}
    units = {sid: groups.get(sid, [sid]) for sid in parents if member_of.get(sid, sid) == sid}
    for h, ms in groups.items():
        gk = hashlib.sha256("".join(keys[m] for m in ms).encode()).hexdigest()[:32]
        keys.update({m: gk for m in ms})
    uparents = {h: np.concatenate([parents[m] for m in ms]) for h, ms in units.items()}
    costs = {h: _estimated_cost(cfg, ds, h, len(uparents[h])) for h in units}
    # units that take another's hyperparameters run in a second phase, after every rank has
    # finished the first (the heads' hyperparameters travel as files, like the shards)
    plan = share_plan(cfg, ds, uparents, costs)
    heads = set(plan.values())
    log(f"augment: {cfg.method}, {len(names)} subsets, {sum(len(p) for p in parents.values())} reference "
        f"structures, {world} rank(s); shards in {workdir}")
    for h, ms in groups.items():
        log(f"augment: {describe_group(ds, ms, parents, names)}")
    for h in sorted(heads):
        log(f"augment: subsets {', '.join(names[f] for f in sorted(plan) if plan[f] == h)} take the GPR "
            f"hyperparameters of {names[h]} (same elements; gpr.share: chemistry)")
    pre = f"[rank {rank}] " if world > 1 else ""
    hint = idle_ranks_hint(len(units), world, ctx.n_nodes)
    if rank == 0 and hint:
        warn(hint)
    if ctx.local_world_size > 1:
        # the ranks of a node fit at the same time and each reads the same MemAvailable: each
        # takes its share of gpr.memory_fraction (after the shard keys, which stay independent
        # of the rank count)
        cfg = replace(cfg, gpr=replace(cfg.gpr, memory_fraction=cfg.gpr.memory_fraction / ctx.local_world_size))
    n_units = len(units)
    # more units than ranks: each rank takes the next untaken unit of the largest-first list
    # (distributed/claims.py); a static split by estimated cost left ranks idle when the estimate
    # was off.  Fewer: one unit per rank, and the idle ranks lend their cores
    claims = None
    if world > 1 and sum(1 for c in costs.values() if c > 0) > world:
        claims = ctx.broadcast_object(str(new_claims_folder(workdir)) if rank == 0 else None)
    order_all = []        # the units' numbers in the progress lines: their place in this order

    def run(phase: dict, shared_of: dict, tag: str):
        order = sorted(phase, key=lambda s: (-phase[s], s))
        pos = {s: len(order_all) + i + 1 for i, s in enumerate(order)}
        order_all.extend(order)
        if claims is not None:
            mine, has_work = order, True
        else:
            owner = assign_subsets(phase, world)
            mine = [sid for sid in order if owner[sid] == rank]
            has_work = any(phase[s] > 0 for s in mine)
        # ranks without work in this phase sleep in the barrier after it: their cores and threads
        # go to the working ranks of their node meanwhile (distributed/cores.py)
        with borrowed_cores(ctx, has_work, enabled=cfg.lend_cores and claims is None) as lent:
            if lent:
                print(f"{pre}augment: {len(lent['lenders'])} idle rank(s) of this node lend their cores: "
                      f"{lent['threads']} threads"
                      + (f" on cores {cpu_list(lent['cpus'])}" if lent["pinned"] else
                         " (the cores they were bound to could not be taken: the threads share this rank's "
                         "binding; launch with 'mpirun --bind-to none')" if lent["cpus"] else ""),
                      flush=True)
            # and their share of the node's memory (gpr.memory_fraction was split among its ranks)
            work(mine, shared_of, cfg if not lent else replace(cfg, gpr=replace(
                cfg.gpr, memory_fraction=cfg.gpr.memory_fraction * (1 + len(lent["lenders"])))), phase, tag, pos)

    def work(mine: list, shared_of: dict, cfg: AugmentConfig, phase: dict, tag: str, pos: dict):
        # the whole phase's ETA: elapsed time scaled by estimated costs (_estimated_cost; a subset's
        # own stages print their ETAs as they run): of this rank's units, or with claims, of the
        # units no rank has taken yet
        t_phase, cost_done, n_own = time.perf_counter(), 0.0, 0
        cost_left = sum(phase[s] for s in mine)
        for sid in mine:
            if claims is not None and not claim(claims, f"{tag}_{sid}"):
                continue
            el = time.perf_counter() - t_phase
            if n_own and cost_done > 0 and el >= ETA_AFTER_S:
                if claims is None:
                    print(f"{pre}augment: {n_own}/{len(mine)} of this rank's units in this phase done, {el:.0f} s, "
                          f"ETA ~{el * cost_left / cost_done:.0f} s for the rest (by estimated cost)", flush=True)
                else:
                    # the untaken units' cost at this rank's own pace, times the ranks sharing them
                    # (the taken ones' cost would count the units still running as done)
                    taken = {int(c.split("_")[-1]) for c in claimed(claims, tag + "_")}
                    c_free = sum(c for s, c in phase.items() if s not in taken)
                    print(f"{pre}augment: {len(taken)}/{len(phase)} units of this phase taken by the ranks, "
                          f"{n_own} done here, {el:.0f} s, ETA ~{el * c_free / cost_done / world:.0f} s for "
                          f"the untaken (by estimated cost)", flush=True)
            cost_left -= phase[sid]
            n_own += 1
            k = pos[sid]
            ms = units[sid]
            hpath = _hyper_path(workdir, sid)
            done = not fresh and all(shard_is_done(_shard_path(workdir, m), keys[m]) for m in ms)
            if done and sid in heads and _read_hyper(hpath, keys[sid]) is None:
                done = False      # its hyperparameters, which others take, are gone: recompute
            if done:
                print(f"{pre}subset {', '.join(names[m] for m in ms)}: finished earlier, skipped "
                      f"({', '.join(_shard_path(workdir, m).name for m in ms)})", flush=True)
                continue
            n_ref = len(uparents[sid])
            if n_ref:      # a subset without references gets its "no copies: reason" line alone
                more = "" if len(ms) == 1 else f" (with {len(ms) - 1} more subset{'s' if len(ms) > 2 else ''} of its group)"
                sizes = sorted({int(ds.natoms[i]) for i in uparents[sid]})
                print(f"{pre}subset {names[sid]} ({k}/{n_units}): {cfg.method} on {n_ref} reference "
                      f"structures of {sizes[0] if len(sizes) == 1 else f'{sizes[0]}-{sizes[-1]}'} atoms{more}"
                      f"{f' with the hyperparameters of {names[plan[sid]]}' if sid in shared_of else ''} ...",
                      flush=True)
            results = process_subsets(ds, ms, cfg, rank, shared=shared_of.get(sid))
            cost_done += phase[sid]
            if sid in heads:      # before the shard: a finished shard implies its file
                atomic_write_text(hpath, json.dumps({"key": keys[sid], **(results[sid].get("hyper") or {})}) + "\n")
            for m in ms:
                write_shard(_shard_path(workdir, m), results[m], keys[m])
            for m in ms:
                r = results[m]["report"]
                if r.get("skipped"):
                    print(f"{pre}subset {names[m]} ({k}/{n_units}): no copies: {r['reason']}", flush=True)
                    continue
                extra = ""
                if "gpr" in r and m == ms[0]:
                    gi = r["gpr"]
                    extra = (f", w {gi['weight_eV']:.3g} eV, l {_lengths(gi)}, jitter {gi['jitter']:.1e}"
                             f", local GPRs {gi.get('n_local', 1)}")
                    # the length scale's upper bound is the float64 limit of the kernel (GPR.l_max_nn),
                    # where condensed subsets usually end: expected, so not a warning
                    bounded = [b for b in gi.get("fit_at_bounds", []) if b != "length_scale upper"]
                    if "length_scale upper" in gi.get("fit_at_bounds", []):
                        extra += " (l at its float64 bound)"
                    if bounded:
                        warn(f"subset {names[m]}: fitted hyperparameters on their bounds: "
                             f"{', '.join(bounded)} (the bound decided them, not the data)")
                    if gi.get("split_by_memory"):
                        warn(f"subset {names[m]}: split into {gi.get('n_local')} local GPRs because its "
                             f"{gi.get('n_obs')}-row kernel exceeds this rank's memory share "
                             f"({gi.get('memory_cap_obs')} rows: gpr.memory_fraction of the free memory, divided "
                             f"among the ranks of a node); the labels then depend on the free memory and the rank "
                             f"count.  Set gpr.max_kernel_obs (a value that fits) to make them reproducible")
                    n_loo = gi.get("loo_all_n")
                    if n_loo is not None and n_loo < 5 and not r.get("gpr_loaded_from"):
                        # GPR._calibration needs 5 leave-one-out errors; measured: 2 references of a
                        # 30-atom alloy gave 50-70 % of the copies' errors within 2 sigma at delta
                        # 0.03 A and 0 % at 0.1 A
                        warn(f"subset {names[m]}: the GPR's sigmas are not calibrated: {n_loo} reference "
                             f"structure(s), the calibration needs 5; the copies' sigmas may be several times "
                             f"too small (max_uncertainty and the variance weights rest on them)")
                unc = r.get("uncertainty_eV", {})
                # a group's one GPR: its time once, on its first subset (each member repeated it)
                took = f"{r['time_total_s']:.1f} s" if m == ms[0] else f"in the GPR of {names[ms[0]]}"
                print(f"{pre}subset {names[m]} ({k}/{n_units}): {r['n_reference']} reference, "
                      f"{r['n_kept']}/{r['n_copies']} copies kept, sigma mean {unc.get('mean', 0):.4f} eV"
                      f"{extra}, {took}", flush=True)

    first = {sid: c for sid, c in costs.items() if sid not in plan}
    second = {sid: costs[sid] for sid in plan}
    t0 = time.perf_counter()
    run(first, {}, "a")
    if plan:
        ctx.barrier(sleep=True, watch=watch)
        shared_of = {}
        for f, h in sorted(plan.items()):
            d = _read_hyper(_hyper_path(workdir, h), keys[h])
            if d is None:
                raise InputError(f"augment: {_hyper_path(workdir, h)}: the hyperparameters of subset "
                                 f"'{names[h]}' are missing or stale after its run (shard folder changed "
                                 f"by another job?); rerun")
            if d.get("kind") != "local":
                continue          # the head kept a global fingerprint: nothing to share
            shared_of[f] = d
            # the unit's output depends on the head's hyperparameters: part of its members' keys
            for m in units[f]:
                keys[m] = hashlib.sha256((keys[m] + json.dumps(d, sort_keys=True)).encode()).hexdigest()[:32]
        run(second, shared_of, "b")
    ctx.barrier(sleep=True, watch=watch)
    report = None
    if rank == 0:
        report = merge(cfg, ds, keys, workdir)
        report["time_s"] = time.perf_counter() - t0
        report["ranks"] = world
        write_report(cfg, report)
        log(format_table(report))
        log(f"augment: wrote {cfg.output} ({report['n_output']} structures, {report['n_synthetic']} "
            f"synthetic), report {cfg.report_path()}")
        note = skipped_summary(report, cfg.output)
        if note:
            warn(note)
    ctx.barrier(sleep=True, watch=watch)
    if rank == 0 and claims is not None:
        remove_claims_folder(Path(claims))
    return report


# ------------------------------------------------------------------------------------------
# merge (rank 0)
# ------------------------------------------------------------------------------------------

def merge(cfg: AugmentConfig, ds, keys: dict, workdir: Path) -> dict:
    from ..data.h5store import H5Writer
    from ..data.structure import Structure

    shards = {}
    for sid in sorted(keys):
        d = read_shard(_shard_path(workdir, sid))
        if d is None or d["key"] != keys[sid]:
            raise InputError(f"augment: shard {_shard_path(workdir, sid)} of subset "
                             f"'{ds.subsets[sid]['name']}' is missing or stale")
        shards[sid] = d
    split = ds.column("split") if ds.has_stored_split else None
    subsets = [{k: v for k, v in t.items() if k != "count"} for t in ds.subsets]
    for sid, d in shards.items():
        # copies: auto: the copies training draws per epoch from the subset's pool (0: all)
        subsets[sid]["copies_per_epoch"] = int(d["report"].get("copies_per_epoch") or 0)
    cand_atoms = []
    n_syn = 0
    with H5Writer(cfg.output, species=ds.species, subsets=subsets,
                  reference_energies=ds.reference_energies or None,
                  store_split=split is not None) as w:
        step = 4096
        for a in range(0, ds.n_structures, step):
            b = min(ds.n_structures, a + step)
            w.append(ds.read(np.arange(a, b)), split=None if split is None else split[a:b])
        for sid in sorted(shards):
            d = shards[sid]
            if len(d["energy"]) == 0:
                continue
            par = d["parent"]
            uniq = np.unique(par)
            pmap = {int(p): s for p, s in zip(uniq, ds.read(uniq))}
            # a subset is homogeneous: one atom count for all its copies
            wts = synthetic_weights(cfg, d["uncertainty"], d["kept"], natoms=len(pmap[int(uniq[0])].numbers))
            out, sp = [], []
            for k in range(len(par)):
                p = pmap[int(par[k])]
                st = Structure(numbers=p.numbers, positions=d["positions"][k], cell=p.cell, pbc=p.pbc,
                               energy=float(d["energy"][k]), forces=None, subset=int(sid), synthetic=True,
                               parent=int(par[k]), uncertainty=float(d["uncertainty"][k]),
                               weight=float(wts[k]), source=p.source,
                               source_index=p.source_index)
                if d["kept"][k]:
                    out.append(st)
                    if split is not None:
                        sp.append(split[int(par[k])])
                else:
                    cand_atoms.append((st, int(d["copy"][k])))
            w.append(out, split=None if split is None else np.asarray(sp))
            n_syn += len(out)
    # active-learning candidates
    if cfg.max_uncertainty is not None or any(s.max_uncertainty is not None for s in cfg.subsets.values()) \
            or cand_atoms:
        write_candidates(cfg.candidates_path(), cand_atoms, ds)
    subs = [shards[sid]["report"] for sid in sorted(shards)]
    return {"input": cfg.input, "output": cfg.output, "method": cfg.method, "seed": cfg.seed,
            "n_input": ds.n_structures, "n_synthetic": n_syn, "n_output": ds.n_structures + n_syn,
            "n_candidates": len(cand_atoms),
            "candidates": str(cfg.candidates_path()) if cand_atoms else None, "subsets": subs}


# a structure's leave-one-out energy error this many robust standard deviations (and 0.1 eV) from
# the others' makes it a suspect: the fit is repeated without it (_refit_without_contradicted)
LOO_SUSPECT_Z = 6.0
# ... and it is left out when the others' leave-one-out errors fall below this share of theirs
LOO_POISON_RATIO = 0.5


def _refit_without_contradicted(ds, fit, allp, cfg, head, rank, shared, mixed, prep, rounds: int = 3):
    """(fit, {position in allp: LOO error eV}) after the label-outlier test of a fitted GPR.

    A structure whose energy the others contradict (leave-one-out error beyond LOO_SUSPECT_Z
    robust standard deviations and 0.1 eV) is either mislabelled or merely unlike the others (an
    unusual configuration the GPR extrapolates to).  A wrong energy spoils every label of its fit:
    3 eV on one of 40 random-alloy cells put the energy noise on its upper bound and the copies'
    labels 156 meV off, while its own z (11) stayed below outlier_z; an unusual but correct one
    does not (an Au-Au adatom pair 0.39 eV below the others' prediction; its copies' labels were
    1 meV off, and sending the group's copies to the candidates file lost all of them).  So the
    GPR is fitted again without the worst suspect: when the other structures' LOO errors fall
    below LOO_POISON_RATIO of theirs, it was poisoning the fit and is left out and named (no
    copies for it), and the next worst of the new fit is judged the same way (at most ``rounds``
    times: a wrong label also throws its neighbours' LOO errors far out); else the last fit and
    its copies stay, and the suspect is named as unusual.  Nothing for a loaded fit, or with
    outlier_z 0."""
    if fit.get("loaded") or not cfg.outlier_z > 0:
        return fit, {}
    cfg2 = replace(cfg, gpr=replace(cfg.gpr, save=None))
    pre = f"[rank {rank}] " if rank else ""
    z = min(cfg.outlier_z, LOO_SUSPECT_Z)
    kept, dropped = list(range(len(allp))), {}
    for _ in range(rounds):
        res = getattr(fit["model"], "loo_residual_eV", None)
        if res is None:
            break
        res = np.asarray(res, dtype=np.float64)
        sus = _loo_outliers(res, z)
        if not sus or len(kept) - 1 < 2:
            break
        med = float(np.nanmedian(res))
        w = max(sus, key=lambda i: abs(res[i] - med))          # position in kept
        rest = [i for i in range(len(kept)) if i != w]
        print(f"{pre}subset {head}: structure {allp[kept[w]].index}'s leave-one-out energy error {res[w]:+.3g} eV is "
              f"far beyond the others' (typical {float(np.nanmedian(np.abs(res))):.3g} eV): fitting again without it",
              flush=True)
        fit2 = fit_subset(ds, [allp[kept[i]] for i in rest], cfg2, head, rank, shared=shared, mixed_orders=mixed,
                          delta=nominal_delta(next(iter(prep.values()))["delta"]))
        r2 = getattr(_calibrated(fit2["model"]), "loo_residual_eV", None)
        before = float(np.nanmean(np.abs(res[rest])))
        after = float(np.nanmean(np.abs(r2))) if r2 is not None else float("inf")
        if not after < LOO_POISON_RATIO * before:
            print(f"{pre}subset {head}: without it the GPR explains the others no better (leave-one-out energy MAE "
                  f"{before:.3g} -> {after:.3g} eV): an unusual structure, not a wrong label; kept with its copies",
                  flush=True)
            fit["model"].info.setdefault("loo_unusual", []).append(
                {"structure": int(allp[kept[w]].index), "loo_error_eV": float(res[w])})
            break
        warn(f"subset {head}: structure {allp[kept[w]].index} ({allp[kept[w]].source}, index "
             f"{allp[kept[w]].source_index}): a reference label that the other structures contradict (leave-one-out "
             f"energy error {res[w]:+.3g} eV).  Without it the GPR explains the others {before / max(after, 1e-12):.1f}x "
             f"better (leave-one-out energy MAE {before:.3g} -> {after:.3g} eV): left out of the GPR fit and given no "
             f"copies (it stays in the data set, and trains as it is): check its energy and forces (outlier_z: 0 keeps "
             f"it)")
        refits = fit["model"].info.get("label_outliers_refit", []) + [
            {"structure": int(allp[kept[w]].index), "loo_mae_before_eV": before, "loo_mae_after_eV": after}]
        dropped[kept[w]] = float(res[w])
        kept = [kept[i] for i in rest]
        fit = fit2
        fit["model"].info["label_outliers_refit"] = refits
    if dropped and cfg.gpr.save:
        from .store import fit_path, save_fit
        ks = [allp[i] for i in kept]
        save_fit(fit_path(cfg.gpr.save, head), fit, ks[0].numbers, ks)
    return fit, dropped


def _loo_outliers(res, z_max: float, floor_eV: float = 0.1) -> list[int]:
    """Rows of the leave-one-out energy residuals ``res`` (eV per structure, NaN where none) more
    than ``z_max`` robust standard deviations from their median and ``floor_eV`` from it."""
    if res is None:
        return []
    return robust_outliers(res, z_max, floor_eV, two_sided=True)[0]


def synthetic_weights(cfg: AugmentConfig, sigma, kept, natoms: int = 1) -> np.ndarray:
    """Loss weights of a subset's copies: ``synthetic_weight`` (weighting none) or
    ``synthetic_weight * s0^2 / (s0^2 + sigma^2)`` (weighting variance; s0 = weight_sigma, or
    the median sigma of the kept copies but at least ``weight_sigma_floor`` x ``natoms``), so
    that labels the GPR is unsure of pull less."""
    sigma = np.asarray(sigma, dtype=np.float64)
    w = np.full(sigma.shape, float(cfg.synthetic_weight))
    if cfg.weighting == "none" or sigma.size == 0:
        return w
    s0 = cfg.weight_sigma
    if s0 is None:
        ref = sigma[np.asarray(kept, bool)] if np.any(kept) else sigma
        s0 = max(float(np.median(ref)), float(cfg.weight_sigma_floor) * max(int(natoms), 1))
    if not s0 > 0:          # every copy certain (sigma 0): nothing to weigh
        return w
    return w * s0 ** 2 / (s0 ** 2 + sigma ** 2)


def write_candidates(path: Path, cands, ds) -> None:
    """Extended XYZ of the rejected copies (GPR energy and sigma in the comment line)."""
    import io

    from ase.io import write

    buf = io.StringIO()
    frames = []
    for st, c in cands:
        a = st.to_ase()
        a.calc = None
        a.info.update(subset=ds.subsets[st.subset]["name"], parent=st.parent, copy=c,
                      gpr_energy=st.energy, gpr_sigma=st.uncertainty, source=st.source)
        frames.append(a)
    if frames:
        write(buf, frames, format="extxyz", parallel=False)
    atomic_write_text(path, buf.getvalue())


def write_report(cfg: AugmentConfig, report: dict) -> None:
    p = cfg.report_path()
    atomic_write_text(p, json_text(report, indent=1, default=float) + "\n")
    atomic_write_text(p.with_suffix(".txt"), format_table(report) + "\n")


def _lengths(g: dict) -> str:
    """The length scale, or one per element ("Au 2.02 Cu 1.07") when they were fitted per element."""
    by = g.get("length_scale_by_group")
    if by:
        return " ".join(f"{k} {v:.3g}" for k, v in by.items())
    v = g.get("length_scale")
    return "-" if v is None else format(v, ".3g")


def skipped_summary(report: dict, output) -> str | None:
    """One warning for the subsets that got no copies, by reason (each was logged as it was met;
    on data of many one-structure subsets those lines scroll past, and a run that made no copies
    at all ended like any other with the input written out again: training on it is energy-only
    training; docs/results.md, sweep 24).  None when every subset got its copies or was skipped as asked (``skip: true``)."""
    subs = report.get("subsets") or []
    why: dict[str, list[str]] = {}
    for r in subs:
        if r.get("skipped") and r.get("reason") not in (None, "skip", "copies = 0"):
            why.setdefault(str(r["reason"]).split(" (")[0], []).append(r["subset"])
    if not why:
        return None
    parts = [f"{len(v)} for '{k}' ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})" for k, v in why.items()]
    n = sum(len(v) for v in why.values())
    head = (f"augment made NO copies: {output} holds the input's {report['n_input']} structures and nothing else, "
            f"and energy training on it is energy-only training, not GPR-ANN" if report.get("n_synthetic", 0) == 0
            else f"augment: {n} of {len(subs)} subset(s) got no copies")
    return head + ".  Subsets without copies: " + "; ".join(parts) + " (the report lists every subset)"


def format_table(report: dict) -> str:
    hdr = (f"{'subset':<24} {'ref':>5} {'copies':>7} {'kept':>7} {'cand':>5} {'sig mean':>9} {'sig max':>9} "
           f"{'w (eV)':>8} {'n_E':>8} {'n_F':>8} {'jitter':>8} {'local':>5} {'time s':>7}  l")
    lines = [hdr, "-" * len(hdr)]
    grouped = False
    for r in report["subsets"]:
        u = r.get("uncertainty_eV", {})
        g = r.get("gpr", {})
        member = bool(r.get("gpr_group")) and r["subset"] != r["gpr_group"][0]
        grouped |= member
        f = lambda v, fmt: (format(v, fmt) if isinstance(v, (int, float)) and v is not None else "-")
        lines.append(
            f"{r['subset'][:24]:<24} {r['n_reference']:>5} {r.get('n_copies', 0):>7} {r.get('n_kept', 0):>7} "
            f"{r.get('n_candidates', 0):>5} {f(u.get('mean'), '9.4f'):>9} {f(u.get('max'), '9.4f'):>9} "
            f"{f(g.get('weight_eV'), '8.3g'):>8} "
            f"{f(g.get('noise_energy_eV'), '8.2e'):>8} {f(g.get('noise_force_eVA'), '8.2e'):>8} "
            f"{f(g.get('jitter'), '8.1e'):>8} {g.get('n_local', '-') if g else '-':>5} "
            f"{'^' if member else f(r.get('time_total_s'), '7.1f'):>7}  {_lengths(g) if g else '-'}")
    if grouped:
        lines.append("(^: in the time of its GPR group's first subset, which fits one GPR for all of them)")
    lines.append(f"input {report['n_input']} + synthetic {report['n_synthetic']} = {report['n_output']} "
                 f"structures; {report['n_candidates']} active-learning candidates")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("config", help="YAML configuration (see distmlip/gpr/augment.py or docs/gpr.md)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set copies=10 --set gpr.device=cuda")
    parser.add_argument("--fresh", action="store_true", help="recompute every subset (ignore finished shards)")
    parser.add_argument("--force", action="store_true",
                        help="take over the shard folder from another augment job that holds its lock (when it is gone)")


def run(args) -> int:
    overrides = dict(parse_override(s) for s in args.set)
    cfg = load_config(args.config, AugmentConfig, overrides)
    augment(cfg, fresh=args.fresh, force=args.force)
    return 0
