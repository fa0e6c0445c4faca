"""Which launcher started this process, and where the process stands in the job, from the
environment alone.

Why a module of its own: the rank is needed long before (and often without) a process group.
Logging prints on rank 0 only, error messages name the rank, the signal handler says which rank
got SIGTERM, and a plain single process must never initialise MPI.  All of that is answered here
from the variables the launchers set, without importing mpi4py or torch.  It lives in the
foundation layer (``utils``) because logging needs it and every layer logs; the distributed layer
builds on it.  This is the one place in the package that reads the launchers' variables;
``distributed.rendezvous`` uses the same tables when mpi4py is not available.

Under ``mpirun``/``srun`` the rank read here equals ``MPI.COMM_WORLD``'s rank (the launcher sets
both); under torchrun it is ``RANK``.  Nothing from distmlip is imported apart from
``distmlip.errors``.
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping, NamedTuple, Optional

from ..errors import DistributedError

# Variables set by MPI launchers for every process they start.  SLURM_NTASKS alone is not used:
# it is also set inside a batch script that runs python without srun.
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE",
                  "MPI_LOCALNRANKS", "SLURM_STEP_NUM_TASKS")
_MPI_MARKER_VARS = _MPI_SIZE_VARS + ("PMIX_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK")
# Set by srun for the tasks of a job step and never in the batch script itself (Slurm exports no
# step id for the batch step, whose id is negative as an int).  With SLURM_PROCID they mark a task
# of an srun step even where SLURM_STEP_NUM_TASKS did not come through (a container or wrapper
# that passes on only some of the variables): such tasks counted as plain processes and each
# trained alone as "rank 0 of 1" on the whole data set (sweep 19).
_SLURM_STEP_VARS = ("SLURM_STEP_NUM_TASKS", "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NODELIST")
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID")
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE",
              "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK",
                    "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK")
_LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE",
                    "MV2_COMM_WORLD_LOCAL_SIZE", "SLURM_STEP_TASKS_PER_NODE", "LOCAL_WORLD_SIZE")


class Placement(NamedTuple):
    """Where the launcher put this process: its launcher, rank and size in the job and on the node."""

    launcher: str            # "mpi" | "torchrun" | "none"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def _env_int(names: Iterable[str], default: Optional[int] = None,
             environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
    env = os.environ if environ is None else environ
    for n in names:
        v = env.get(n)
        if v is None or v == "":
            continue
        try:
            # SLURM_STEP_TASKS_PER_NODE may read "4(x2)" or "4,3": the first figure is ours or
            # at least an upper bound; only used when MPI is not available.
            return int(v.split("(")[0].split(",")[0])
        except ValueError:
            continue
    return default


def detect_launcher(environ: Optional[Mapping[str, str]] = None) -> str:
    """'mpi' when started by an MPI launcher, 'torchrun' for RANK/WORLD_SIZE env, else 'none'."""
    env = os.environ if environ is None else environ
    if any(env.get(v) for v in _MPI_MARKER_VARS) or _slurm_step_task(env):
        return "mpi"
    if env.get("RANK") is not None and env.get("WORLD_SIZE") is not None:
        return "torchrun"
    return "none"


def _slurm_step_task(env: Mapping[str, str]) -> bool:
    """True for a task of an srun step: SLURM_PROCID with a step variable, or SLURM_PROCID > 0
    (a batch script is always task 0 of its job)."""
    procid = (env.get("SLURM_PROCID") or "").strip()
    if not procid:
        return False
    return any(env.get(v) for v in _SLURM_STEP_VARS) or (procid.isdigit() and int(procid) > 0)


def size_source(environ: Optional[Mapping[str, str]] = None) -> str:
    """The variable the job size was read from and its value, e.g. 'SLURM_STEP_NUM_TASKS=4'
    (for messages that say why this process expects partners)."""
    env = os.environ if environ is None else environ
    names = ("WORLD_SIZE",) + _SIZE_VARS if detect_launcher(env) == "torchrun" else _SIZE_VARS
    return next((f"{n}={env[n]}" for n in names if env.get(n)), "no job-size variable")


def placement(environ: Optional[Mapping[str, str]] = None, *, strict: bool = False) -> Placement:
    """This process's launcher, rank, world size, local rank and local size, from the environment.

    Without a launcher: rank 0 of 1.  ``strict``: raise DistributedError when an MPI launcher is
    detected but its rank/size variables are unreadable (the rendezvous without mpi4py needs
    them); otherwise such a process counts as rank 0 of 1 (good enough for logging)."""
    env = os.environ if environ is None else environ
    launcher = detect_launcher(env)
    if launcher == "torchrun":
        rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        if strict and not 0 <= rank < size:
            raise DistributedError(f"the launcher's variables disagree: RANK={rank} in a job of "
                                   f"WORLD_SIZE={size}")
        return Placement(launcher, rank, size, int(env.get("LOCAL_RANK", "0")),
                         int(env.get("LOCAL_WORLD_SIZE", str(size))))
    if launcher == "mpi":
        rank, size = _env_int(_RANK_VARS, environ=env), _env_int(_SIZE_VARS, environ=env)
        if rank is not None and size is not None:
            if strict and not 0 <= rank < size:
                raise DistributedError(f"the launcher's variables disagree: rank {rank} in a job of {size} "
                                       f"({size_source(env)})")
            local_size = _env_int(_LOCAL_SIZE_VARS, size, environ=env)
            # no local-rank variable (PMIx alone, a wrapper that passed on some variables): where
            # every rank counts as on this node (no local size, or one of the whole job) the local
            # rank is the rank; it was 0 for all, and on a GPU node every rank took GPU 0
            local_rank = _env_int(_LOCAL_RANK_VARS, rank if local_size >= size else 0, environ=env)
            return Placement(launcher, rank, size, local_rank, local_size)
        if strict:
            raise DistributedError("started by an MPI launcher but neither mpi4py nor the rank/size "
                                   "environment variables (OMPI_COMM_WORLD_RANK, PMI_RANK, "
                                   "SLURM_PROCID, ...) are usable")
    return Placement(launcher, 0, 1, 0, 1)


def single_rank_mpi(environ: Optional[Mapping[str, str]] = None) -> bool:
    """True when an MPI launcher says, in its own job-size variable, that the job has exactly one
    rank (``mpirun -n 1``, ``srun -n 1``): such a process needs no MPI at all, and initialising
    it costs about a second of start-up.  Only the launchers' job-size variables count (not
    SLURM_NTASKS, which describes the allocation, nor a local rank count)."""
    env = os.environ if environ is None else environ
    size = _env_int(("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE",
                     "SLURM_STEP_NUM_TASKS"), environ=env)
    # a rank above 0 in a job of one is a contradiction the start-up must report, not a world of
    # one: a second task started beside it would train alone too (sweep 19)
    return size == 1 and not _env_int(_RANK_VARS, 0, environ=env)


def pmix_without_server(environ: Optional[Mapping[str, str]] = None) -> bool:
    """True when PMIX_RANK says a PMIx launcher started this process but no PMIx server address
    (PMIX_SERVER_URI2, ...3, ...4, ...) came with it, so that MPI_Init has nothing to connect to.
    Every PMIx server (mpirun's, srun --mpi=pmix's) gives its tasks those addresses; a rank
    variable without them was passed on by something else (a wrapper, a container's env list)."""
    env = os.environ if environ is None else environ
    return bool(env.get("PMIX_RANK")) and not any(k.startswith("PMIX_SERVER_URI") and env[k] for k in env)


def use_mpi4py(environ: Optional[Mapping[str, str]] = None) -> bool:
    """False when DISTMLIP_USE_MPI4PY=0/false/no asks to read the rank from the environment only."""
    env = os.environ if environ is None else environ
    return env.get("DISTMLIP_USE_MPI4PY", "1") not in ("0", "false", "no")


def leave_process(code: int, *, always: bool = False) -> None:
    """End a finished ``distmlip`` program now, without the interpreter's finalisation.

    Why: with torch imported, CPython's finalisation (module teardown and the C++ libraries' static
    destructors) takes 0.7-0.8 s on this project's machines, which every command, every rank of
    every ``mpirun`` and every test that starts one pays after its work is done (docs/results.md,
    "Leaving without finalisation").  What finalisation would still have done that matters is done
    here first, in its order: non-daemon threads joined and threading's exit hooks run, ``atexit``
    handlers run (logging), every open writable Python file and HDF5 file flushed, MPI finalised,
    the standard streams flushed.  ``DISTMLIP_FAST_EXIT=0`` turns this off (a plain return) unless
    ``always``: a process that ran a gloo group must not finalise (``distributed.exit_process``)."""
    import atexit
    import gc
    import io
    import sys
    import threading
    import warnings

    if not always and os.environ.get("DISTMLIP_FAST_EXIT", "1").strip().lower() in ("0", "off", "false", "no"):
        return
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    with warnings.catch_warnings():
        # isinstance on some objects warns (torch's deprecated reduce_op wrapper printed a
        # FutureWarning at the end of every command)
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, io.IOBase):
                try:
                    if not obj.closed and obj.writable():
                        obj.flush()
                except Exception:    # a broken pipe or closed descriptor: nothing left to save there
                    pass
    h5py = sys.modules.get("h5py")
    if h5py is not None:
        try:
            for fid in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE):
                if fid.get_intent() & h5py.h5f.ACC_RDWR:
                    h5py.h5f.flush(fid)
        except Exception:
            pass
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None:
        try:
            if mpi.Is_initialized() and not mpi.Is_finalized():
                mpi.Finalize()
        except Exception:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)
