"""The ``distmlip`` command.  Each subcommand lives in the package folder of its pipeline
stage and exposes ``add_arguments(parser)`` and ``run(args) -> int``; they are imported lazily
so ``distmlip convert`` does not pay for importing the GPR or training code.

Errors derived from DistmlipError are printed as one clear line (file, structure, field) and the
process exits with status 2.  Under MPI, an error on one rank aborts the whole job so that no
rank waits forever for a peer that is gone.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import traceback

from . import __version__
from .utils.launch import leave_process, placement
from .distributed.signals import abort_mpi
from .errors import DistmlipError

# name -> (module, one-line help)
# commands without MPI work sharing: under mpirun only rank 0 runs them
ONE_PROCESS = {"info", "gpr", "evaluate", "export", "import-aenet", "md-check"}

COMMANDS = {
    "convert": ("distmlip.data.convert", "convert DFT data (XSF, extxyz, ASE formats) into a distmlip HDF5 data set"),
    "info": ("distmlip.data.info", "print a summary of an HDF5 data set"),
    "featurize": ("distmlip.descriptors.featurize", "precompute descriptors into a companion cache file"),
    "augment": ("distmlip.gpr.augment", "GPR-ANN data augmentation: label displaced copies with local GPRs"),
    "gpr": ("distmlip.gpr.cli", "fit, save, predict with and test the per-subset GPRs (fit|predict|test)"),
    "train": ("distmlip.training.cli", "train a potential (energy or force mode, committees, MPI data parallel)"),
    "evaluate": ("distmlip.evaluation.evaluate", "metrics, per-structure CSV and parity plots of a model on a data set"),
    "export": ("distmlip.evaluation.export", "export a model to aenet .nn files, a torch.export program, TorchScript or metatomic (LAMMPS, i-PI, ASE)"),
    "import-aenet": ("distmlip.evaluation.import_aenet", "read aenet .nn potential files into a distmlip model (for evaluation or retraining)"),
    "md-check": ("distmlip.evaluation.mdcheck", "MD stability check of a potential: a verdict per run (close pairs, "
                 "temperature, energy, drift, uncertainty); exit 3 when unstable, 128 + signal when stopped"),
    "explore": ("distmlip.active.explore", "active learning: MD at rising temperatures, uncertain frames by "
                "farthest-point sampling, label, retrain, until MD survives"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distmlip",
        description="Distributed training of Behler-Parrinello potentials on aenet Chebyshev "
        "descriptors, with GPR-ANN data augmentation. Launch parallel stages with mpirun/srun.",
    )
    parser.add_argument("--version", action="version", version=f"distmlip {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (modname, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if only is not None and name != only:
            continue
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("distmlip"):
                p.set_defaults(_missing=name)
                continue
            raise
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    """Run one command; ``argv`` None means the command line of the ``distmlip`` program, whose
    process then ends here on success or a clean error (``utils.launch.leave_process``)."""
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=cmd if cmd in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    if getattr(args, "_missing", None):
        print(f"distmlip {args.command}: not available in this build", file=sys.stderr)
        return 2
    if args.command in ONE_PROCESS:
        where = placement()
        if where.world_size > 1:
            # under mpirun every rank would repeat the whole job and write the same files
            if where.rank != 0:
                return 0
            idle = "rank 1" if where.world_size == 2 else f"ranks 1..{where.world_size - 1}"
            print(f"distmlip {args.command}: runs in one process; {idle} of this mpirun "
                  f"{'has' if where.world_size == 2 else 'have'} nothing to do (launch it without mpirun)",
                  file=sys.stderr, flush=True)
    try:
        rc = int(args._run(args) or 0)
    except DistmlipError as exc:
        where = placement()
        at = f" (rank {where.rank})" if where.world_size > 1 else ""
        print(f"distmlip {args.command}: error{at}: {exc}", file=sys.stderr, flush=True)
        if args.traceback:
            traceback.print_exc()
        abort_mpi(2)
        rc = 2
    except BrokenPipeError:
        # the reader of stdout went away (`distmlip info data.h5 | head`): end quietly, as a
        # command killed by SIGPIPE does, without a traceback from the final flush
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        abort_mpi(141)
        rc = 141
    except KeyboardInterrupt:
        print(f"distmlip {args.command}: interrupted", file=sys.stderr)
        abort_mpi(130)
        rc = 130
    except BaseException:
        if "mpi4py.MPI" in sys.modules:  # label the traceback with the rank before aborting the job
            where = placement()
            if where.world_size > 1:
                print(f"distmlip {args.command}: internal error on rank {where.rank}:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        abort_mpi(1)
        raise
    if "distmlip.distributed.context" in sys.modules:  # a stage set up a distributed context
        sys.modules["distmlip.distributed.context"].exit_process(rc)
    if as_program:      # the ``distmlip`` program, not a call from Python: leave without finalisation
        leave_process(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
