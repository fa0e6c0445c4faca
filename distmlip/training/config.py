"""Configuration of ``distmlip train`` (YAML -> dataclasses; every default is here).

Example (see docs/training.md)::

    data:
      train: [train.h5]            # one or more HDF5 data sets (shards)
      validation: null             # explicit validation files, else split from `train`
      split_seed: 0
      fractions: [0.9, 0.1, 0.0]   # train / validation / test shares of `train`
    descriptor: {rc_radial: 6.5, n_radial: 12, rc_angular: 4.0, n_angular: 4, backend: auto}
    model: {hidden: [10, 10], activation: tanh, dtype: float64}
    training: {mode: energy, epochs: 100, batch_atoms: 2000, lr: 1.0e-3, output: run}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ..config import bounds, paths
from ..descriptors.spec import DescriptorConfig
from ..errors import ConfigError


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list, metadata=paths("in"))
    validation: Optional[list[str]] = field(default=None, metadata=paths("in"))
    split_seed: int = field(default=0, metadata=bounds(ge=0))
    fractions: list[float] = field(default_factory=lambda: [0.9, 0.1, 0.0], metadata=bounds(ge=0.0, le=1.0))
    by_subset: bool = True             # stratify the split per subset (exact shares in every subset)
    use_stored_split: bool = True      # use the split stored in the data set (convert --split) if any
    split_patterns: Optional[str] = None  # e.g. "train=train/,val=val/,test=test/" on source paths
    subsets: Optional[list[str]] = None  # train only on these subsets (names); null = all
    prefetch: bool = True
    # memory per rank for prepared training data, MB: neighbour lists of the structures and, with
    # fixed batches, the assembled batches (half each); a separate validation set gets a quarter
    # more; 0: prepare every batch anew
    neighbor_cache_mb: int = field(default=2048, metadata=bounds(ge=0))
    # fixed: the training batches are formed once (from a shuffled order) and every epoch visits
    # them in a new random order, so each batch is assembled once per run (aenet-PyTorch keeps
    # its batches too); reshuffled: new batches every epoch (each one assembled anew)
    batches: Literal["fixed", "reshuffled"] = "fixed"

    def validate(self):
        if len(self.fractions) != 3 or any(f < 0 for f in self.fractions) or sum(self.fractions) <= 0:
            raise ConfigError(f"data.fractions: expected three non-negative shares (train, validation, "
                              f"test), got {self.fractions}")


@dataclass
class ModelConfig:
    species: Optional[list[str]] = None   # default: the species of the training data
    hidden: list[int] = field(default_factory=lambda: [10, 10], metadata=bounds(ge=1))
    activation: Union[str, list[str]] = "tanh"
    dtype: Literal["float64", "float32"] = "float64"
    reference_energies: Optional[dict[str, float]] = None  # eV per free atom (cohesive-energy training)
    energy_shift: Literal["lstsq", "mean", "none"] = "lstsq"
    # scale of the networks' output (eV/atom): auto = the RMS per-atom energy residual, and in
    # force mode at least the RMS force component times 1 A (the networks must express forces
    # too: an output scale set by the energies alone made force training converge slowly);
    # energy = the residual RMS only; false = 1 eV (true reads as auto)
    energy_scale: Union[Literal["auto", "energy"], bool] = "auto"
    normalize_descriptor: bool = True

    def validate(self):
        if self.energy_scale is True:
            self.energy_scale = "auto"


@dataclass
class TrainingConfig:
    mode: Literal["energy", "force"] = "energy"
    alpha: float = field(default=0.1, metadata=bounds(ge=0.0, le=1.0))   # force weight in (1 - alpha - beta) L_E + alpha L_F + beta L_S
    # stress weight (force mode; 0: no stress term): L_S over the structures that carry a stress
    beta: float = field(default=0.0, metadata=bounds(ge=0.0, le=1.0))
    # the form of L_E and L_F (distmlip/training/losses.py): mse (mean squares), rmse (root mean
    # squares, aenet-PyTorch's form) or normalized (mean squares over the data's reference spreads)
    loss: Literal["mse", "rmse", "normalized"] = "mse"
    # energy mode on GPR-augmented data: weight gamma of the copy-difference term in
    # (1 - gamma) L_E + gamma L_D (training/losses.py; 0: the paper's plain energy loss); no
    # effect on data without synthetic copies
    difference_weight: float = field(default=0.05, metadata=bounds(ge=0.0, lt=1.0))
    # with the copy-difference term and in force mode (the hybrid): copies of each reference
    # structure trained on per epoch, drawn anew every epoch from all its copies (0: all copies
    # every epoch; the plain energy loss always takes all: drawn, it fitted worse); augment many copies
    # (augment: copies) and train on a few per epoch: more displacement directions at the cost of few.
    # auto: the number augment's 'copies: auto' with 'pool' > 1 recorded per subset in the data set
    # (its M of a pool of pool x M copies), 0 (all copies) for subsets and data sets without one
    copies_per_epoch: Union[int, Literal["auto"]] = "auto"
    force_fraction: float = field(default=1.0, metadata=bounds(ge=0.0, le=1.0))  # share of structures with force loss
    # structures with an atom whose force is far beyond its element's typical one (a broken SCF,
    # a wrong field; data.validate.force_outliers): their forces left out of the force loss, with
    # a warning naming them ('exclude'), or trained on ('keep')
    force_outliers: Literal["exclude", "keep"] = "exclude"
    stress_fraction: float = field(default=1.0, metadata=bounds(ge=0.0, le=1.0))  # share of structures with stress (of those that carry one) in L_S
    energy_loss: Literal["per_atom", "per_structure"] = "per_atom"
    epochs: int = field(default=100, metadata=bounds(ge=1))
    max_steps: int = field(default=0, metadata=bounds(ge=0))   # stop after this many optimizer steps (0: no limit)
    # stop at the end of the epoch in which this many minutes of training have passed (0: no
    # limit), writing the models as at the end of the run (status time_limit); counted from the
    # start of this job's training (a resumed run starts its count anew; per member in a committee)
    max_minutes: float = field(default=0.0, metadata=bounds(ge=0.0))
    batch_atoms: int = field(default=2000, metadata=bounds(ge=1))
    batch_structures: int = field(default=0, metadata=bounds(ge=0))   # 0: no limit on structures per batch
    # lbfgs: full-batch L-BFGS (training/lbfgs.py): every epoch one quasi-Newton iteration on the
    # loss of the whole training split, its step length from a line search (lr, the scheduler and
    # copies_per_epoch draws do not apply); for data sets whose whole loss and gradient take up to
    # a few seconds (docs/training.md "Choosing the optimizer")
    # auto: AdamW, switched to L-BFGS once AdamW stalls (or after epoch 300 of 600 or more) in force
    # and energy training on reference data of up to 50,000 atoms (trainer._auto_lbfgs_reason lists
    # where it stays AdamW)
    optimizer: Literal["auto", "adamw", "adam", "sgd", "lbfgs"] = "auto"
    lbfgs_history: int = field(default=20, metadata=bounds(ge=1))   # (s, y) pairs L-BFGS keeps
    # exponential moving average of the weights over the AdamW (Adam, SGD) steps, decay per step
    # (0: off): each validation scores the average and the raw weights, and the better one is the
    # epoch's (the kept models, auto's switch to L-BFGS); the steps continue from the raw ones
    # (the log's training columns are the raw weights'); without validation data the raw weights
    # are kept; the decay ramps up as (1 + t) / (10 + t) over the first steps t
    ema: float = field(default=0.999, metadata=bounds(ge=0.0, lt=1.0))
    lr: float = field(default=1.0e-3, metadata=bounds(gt=0.0, le=10.0))
    weight_decay: float = field(default=0.0, metadata=bounds(ge=0.0))
    # auto: cosine for energy training on GPR copies paired with their parents (difference_weight > 0)
    # and for training that draws a pool's copies per epoch (the hybrid too), plateau otherwise; a
    # resumed run keeps its checkpoint's schedule
    scheduler: Literal["auto", "plateau", "cosine", "none"] = "auto"
    plateau_factor: float = field(default=0.5, metadata=bounds(gt=0.0, lt=1.0))
    plateau_patience: int = field(default=10, metadata=bounds(ge=0))
    # ... and at least this many optimizer steps (small data sets: few steps per epoch)
    plateau_min_steps: int = field(default=500, metadata=bounds(ge=0))
    min_lr: float = field(default=1.0e-6, metadata=bounds(ge=0.0))
    early_stopping: int = field(default=0, metadata=bounds(ge=0))   # epochs without improvement before stopping (0: off)
    grad_clip: float = field(default=0.0, metadata=bounds(ge=0.0))   # max gradient norm (0: off)
    seed: int = field(default=0, metadata=bounds(ge=0))
    # checkpoints (and the best model so far) are written every checkpoint_minutes of wall time,
    # every checkpoint_every epochs (0: off) and always at the end, a stop and early stopping
    checkpoint_every: int = field(default=0, metadata=bounds(ge=0))
    checkpoint_minutes: float = field(default=10.0, metadata=bounds(ge=0.0))
    output: str = field(default="run", metadata=paths("out"))
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    warm_start: Optional[str] = field(default=None, metadata=paths("in"))    # model file to fine-tune from
    refit_normalization: bool = False   # with warm_start: refit the normalisation, keeping the model's energies
    validate_every: int = field(default=1, metadata=bounds(ge=1))
    log_every: int = field(default=1, metadata=bounds(ge=1))   # epochs between progress lines (the CSV has every epoch)
    progress_bar: Literal["auto", "on", "off"] = "auto"

    def validate(self):
        c = self.copies_per_epoch
        if c != "auto" and (isinstance(c, bool) or not isinstance(c, int) or c < 0):
            raise ConfigError(f"training.copies_per_epoch: expected a number >= 0 or auto, got {c!r}")
        if self.optimizer == "lbfgs":
            # each would change the loss or the step between the line search's evaluations
            for key, bad, why in (("loss", self.loss == "rmse", "its weights follow the previous step's errors"),
                                  ("grad_clip", self.grad_clip > 0, "the line search sets the step length"),
                                  ("weight_decay", self.weight_decay > 0, "not part of the L-BFGS loss")):
                if bad:
                    raise ConfigError(f"training.{key}: {getattr(self, key)!r} does not go with "
                                      f"training.optimizer: lbfgs ({why}); use mse or normalized / 0")
        if self.min_lr > self.lr:
            raise ConfigError(f"training.min_lr: {self.min_lr} is above training.lr {self.lr}")
        if self.beta > 0 and self.mode != "force":
            raise ConfigError(f"training.beta: a stress term ({self.beta}) needs training.mode: force")
        if self.alpha + self.beta > 1.0:
            raise ConfigError(f"training.alpha + training.beta: {self.alpha} + {self.beta} is above 1 "
                              "(the energy weight is 1 - alpha - beta)")


@dataclass
class CommitteeConfig:
    """K models differing by seed (member k: training.seed + k, i.e. initial weights and data
    order), optionally trained on bootstrap resamples of the training set.  The ranks are split
    into ``groups`` (0: automatic = the largest divisor of the world size not above K); group g
    holds ranks g, g+G, g+2G, ... and trains members g, g+G, ... one after the other, data
    parallel inside the group.  See docs/committees.md."""
    K: int = field(default=1, metadata=bounds(ge=1))
    bootstrap: bool = False
    groups: int = field(default=0, metadata=bounds(ge=0))



@dataclass
class ZBLConfig:
    """ZBL short-range repulsion added to the ANN: E = E_ZBL + E_ANN (docs/robustness.md).  On by
    default: it keeps atoms apart where the data end and is zero on the training structures (the
    default outer radius, 0.75 times the sum of the covalent radii, is lowered to 0.9 x the
    element pair's shortest distance in the training data where that is smaller:
    models/zbl.py radii_for_data).  ``radii``: per element pair "A-B": [inner, outer] in
    Angstrom, used as given (default inner radius 0.5 times the covalent-radius sum)."""
    enabled: bool = True
    radii: Optional[dict[str, list[float]]] = None

    def validate(self):
        for k, v in (self.radii or {}).items():
            if len(k.split("-")) != 2 or len(v) != 2 or not (0.0 < v[0] < v[1]):
                raise ConfigError(f"zbl.radii: {k!r}: expected 'A-B': [inner, outer] with "
                                  f"0 < inner < outer, got {v!r}")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    descriptor: DescriptorConfig = field(default_factory=DescriptorConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    committee: CommitteeConfig = field(default_factory=CommitteeConfig)
    zbl: ZBLConfig = field(default_factory=ZBLConfig)

    def validate(self):
        if not self.data.train:
            raise ConfigError("data.train: no training data files given")


def load_train_config(path, overrides: dict | None = None) -> TrainConfig:
    from ..config import load_config

    return load_config(path, TrainConfig, overrides)
