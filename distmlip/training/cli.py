"""``distmlip train config.yaml [--resume CKPT|auto] [--set key=value ...]``.

Runs single-process or under ``mpirun``/``srun`` (every rank runs this same command).  SIGTERM
and SIGUSR1 make every rank stop at the next step boundary; a checkpoint is written and the
command exits 0 with the resume command printed."""
from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("config", help="YAML training configuration (see docs/training.md)")
    p.add_argument("--resume", metavar="CKPT",
                   help="continue from a checkpoint; 'auto' uses OUTPUT/checkpoint.pt when it exists")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a configuration value, e.g. --set training.epochs=50 (repeatable)")
    p.add_argument("--output", "-o", help="output folder (same as --set training.output=DIR)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (same as --set training.device=...)")
    p.add_argument("--force", action="store_true",
                   help="take over the output folder from another job that holds its lock (when that job is gone)")


def run(args) -> int:
    from ..config import parse_override
    from ..distributed import init_distributed, install_stop_handlers, shutdown
    from ..utils.log import log
    from .config import load_train_config
    from .trainer import Trainer

    overrides = {}
    for o in args.overrides:
        k, v = parse_override(o)
        if isinstance(v, str):  # YAML 1.1 reads '1e-4' (no dot) as a string: accept it as a number
            try:
                v = float(v) if any(c in v for c in ".eE") else int(v)
            except ValueError:
                pass
        overrides[k] = v
    if args.output:
        overrides["training.output"] = args.output
    if args.device:
        overrides["training.device"] = args.device
    cfg = load_train_config(args.config, overrides)
    log_short_range(cfg)
    if cfg.committee.K > 1:
        return _run_committee(cfg, args.resume, args.force)
    resume = args.resume
    if resume == "auto":
        cand = Path(cfg.training.output) / "checkpoint.pt"
        resume = str(cand) if cand.is_file() else None
        if resume is None:
            log(f"--resume auto: no checkpoint in {cfg.training.output}, starting a new run")
    install_stop_handlers()
    ctx = init_distributed(cfg.training.device)
    try:
        trainer = Trainer(cfg, ctx, resume=resume, force=args.force)
        status = trainer.fit()
        log(f"training finished: {status}")
        _log_record(getattr(trainer.model, "training_record", None))
        return 0
    finally:
        shutdown()


def _run_committee(cfg, resume, force: bool = False) -> int:
    """K > 1: one job trains all members (training/committee.py); --resume auto|OUTPUT continues."""
    from ..distributed import init_distributed, install_stop_handlers, shutdown
    from ..errors import ConfigError
    from ..utils.log import log
    from .committee import train_committee

    if resume not in (None, "auto"):
        p = Path(resume)
        if p.is_file():
            p = p.parent.parent if p.parent.name.startswith("member_") else p.parent
        if not p.is_dir():
            raise ConfigError(f"--resume {resume}: for a committee give 'auto' or the committee output folder")
        cfg.training.output = str(p)
    install_stop_handlers()
    ctx = init_distributed(cfg.training.device)
    try:
        status = train_committee(cfg, ctx, resume=resume is not None, force=force)
        log(f"training finished: {status}")
        member0 = Path(cfg.training.output) / "member_00" / "model.pt"
        if ctx.rank == 0 and member0.is_file():
            from ..models.bpnn import BPNN

            _log_record(BPNN.load(member0).training_record)
        return 0
    finally:
        shutdown()


def log_short_range(cfg) -> None:
    """Say whether the ZBL short-range repulsion is on (it is by default: docs/robustness.md)."""
    from ..utils.log import log

    if cfg.training.warm_start:
        log(f"zbl: as the warm-start model {cfg.training.warm_start} has it (a warm start keeps the model's "
            f"architecture; the model line below says zbl=True or False)")
    elif cfg.zbl.enabled:
        log("zbl: short-range ZBL repulsion on (the default; radii "
            + ("from zbl.radii and " if cfg.zbl.radii else "")
            + "0.5 / 0.75 x the covalent-radius sum per element pair; 'zbl: {enabled: false}' turns it off)")
    else:
        log("zbl: off (zbl.enabled: false): nothing keeps atoms apart below the training data's shortest "
            "distances (docs/robustness.md)")


def _log_record(record) -> None:
    """The shortest distance per element pair and the lowest energies seen in the training data."""
    from ..models.data_record import describe
    from ..utils.log import log

    if record:
        log(describe(record) + "; stored in the model file (md-check and the calculator warn below them)")
