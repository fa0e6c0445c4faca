"""Stop requests (signals, stop file) and fail-fast error handling for a job of many ranks.

Why a module of its own: these are process-wide states and handlers (signal handlers,
``sys.excepthook``, MPI_Abort) that must work at any moment, even before or without a process
group, and in any context of the job (the whole job or a committee's rank group).  They hold no
communicator: a context turns the *local* stop code of this module into a collective answer
(``DistContext.stop_requested``) with :func:`local_stop_code` and :func:`describe_stop`.

- SIGTERM / SIGUSR1 (``install_stop_handlers``) or the file named by ``DISTMLIP_STOP_FILE`` set a
  local flag; a second SIGTERM ends the process at once (the batch system means it).
- The stop code encodes who asked and why: ``1000 * (rank + 1) + signal number`` (999 for the stop
  file), so the maximum over ranks names one of them ("SIGTERM on rank 1"); ``stop_exit_status``
  turns it into the exit status of a command that a stop leaves without a complete result (128 +
  the signal number).
- ``run_guarded`` and the excepthook print an error with the rank and host and end the whole job
  (MPI_Abort), so that no rank waits forever in a collective for a peer that is gone;
  ``abort_mpi`` does that for the CLI.

The job's world context registers itself with :func:`set_world` (rank, host, size); without it,
the rank comes from the launcher's environment (``launch.placement``).
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
import traceback
from typing import Any, Callable, Optional

from ..errors import DistmlipError
from ..utils.launch import placement

# local stop state: set by the signal handlers (or a stop file), read by local_stop_code();
# 'generation' counts reset_stop_flag() calls so that contexts forget an earlier stop reason
_STOP = {"flag": False, "signal": 0, "count": 0, "generation": 0}
_STOP_FILE_PERIOD_S = 5.0
_last_stop_file_check = [float("-inf")]

# the world context of init_distributed (anything with .rank, .world_size, .hostname), or None
_WORLD: list[Any] = [None]


def set_world(ctx) -> None:
    """Register the job's world context (None after shutdown): run_guarded and the excepthook
    abort the job only when it has more than one rank, and errors name its rank and host."""
    _WORLD[0] = ctx


# ------------------------------------------------------------------------------------- stop codes
def local_stop_code(rank: int) -> int:
    """This process's stop code (0: no stop requested).  ``rank``: its rank in the whole job.
    Only rank 0 looks for the stop file, at most every few seconds (no metadata storm on a
    parallel file system)."""
    stop_file = os.environ.get("DISTMLIP_STOP_FILE")
    if not _STOP["flag"] and stop_file and rank == 0:
        now = time.monotonic()
        if now - _last_stop_file_check[0] >= _STOP_FILE_PERIOD_S:
            _last_stop_file_check[0] = now
            if os.path.exists(stop_file):
                _STOP["flag"] = True
                _STOP["signal"] = 999
    if not _STOP["flag"]:
        return 0
    return 1000 * (rank + 1) + int(_STOP["signal"] or 0) % 1000


def describe_stop(code: int) -> str:
    """'SIGTERM on rank 1' for a stop code (the maximum of every rank's local_stop_code)."""
    rank, sig = code // 1000 - 1, code % 1000
    if sig == 999:
        what = f"stop file {os.environ.get('DISTMLIP_STOP_FILE')}"
    elif sig:
        try:
            what = signal.Signals(sig).name
        except ValueError:
            what = f"signal {sig}"
    else:
        what = "stop request"
    return f"{what} on rank {rank}"


def stop_exit_status(code: int) -> int:
    """Exit status of a command whose result a stop request (``code``, as for describe_stop) left
    incomplete, with no rerun that continues it (md-check): 128 + the signal number, as a shell
    reports a process ended by that signal and as the CLI exits 130 on Ctrl-C (SIGTERM 143,
    SIGUSR1 138; the stop file, which requests a stop like SIGUSR1, 138).  0 for no stop.  train
    and explore exit 0 after a stop instead: their rerun continues where they stopped."""
    if not code:
        return 0
    sig = code % 1000
    return 128 + int(signal.SIGUSR1 if sig in (0, 999) else sig)


def stop_generation() -> int:
    """Changes whenever reset_stop_flag() is called (a context's stop reason is then stale)."""
    return _STOP["generation"]


def _handler(signum, frame):
    _STOP["count"] += 1 if signum == signal.SIGTERM else 0
    if signum == signal.SIGTERM and _STOP["count"] >= 2:
        # second SIGTERM: the batch system means it; die now with the default action
        try:
            sys.stderr.write(f"distmlip: second SIGTERM on rank {_rank_guess()}, exiting now\n")
            sys.stderr.flush()
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        return
    if not _STOP["flag"]:
        _STOP["flag"] = True
        _STOP["signal"] = int(signum)
        try:
            name = signal.Signals(signum).name
            # mpirun also sends SIGTERM when another rank of the job died: say so, since this
            # line was the only output when one rank was killed (sweep 24)
            why = (" (the batch system's time limit or scancel, or mpirun ending the job because another rank "
                   "died: then the last checkpoint is what is kept)" if signum == signal.SIGTERM else "")
            sys.stderr.write(f"distmlip: {name} received on rank {_rank_guess()}: stopping at the "
                             f"next step boundary{why}\n")
            sys.stderr.flush()
        except Exception:  # pragma: no cover
            pass


def install_stop_handlers(signals=(signal.SIGTERM, signal.SIGUSR1)) -> None:
    """SIGTERM and SIGUSR1 set the stop flag (read collectively by ctx.stop_requested());
    a second SIGTERM terminates the process at once.  Call from the main thread."""
    for sig in signals:
        signal.signal(sig, _handler)


def reset_stop_flag() -> None:
    """Forget a previous stop request (tests, or a driver that trains several models)."""
    _STOP.update(flag=False, signal=0, count=0, generation=_STOP["generation"] + 1)
    _last_stop_file_check[0] = float("-inf")


def _rank_guess() -> int:
    ctx = _WORLD[0]
    return ctx.rank if ctx is not None else placement().rank


# ------------------------------------------------------------------------------------ abort
def abort_mpi(code: int) -> None:
    """MPI_Abort of the whole job when this process is one of several initialised MPI ranks
    (mpirun then kills every rank and exits non-zero).  Returns otherwise: no MPI (a single
    process, torchrun), or a job of one rank."""
    if "mpi4py.MPI" not in sys.modules:
        return
    MPI = sys.modules["mpi4py.MPI"]
    try:
        if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            MPI.COMM_WORLD.Abort(code)
    except Exception:  # pragma: no cover - best effort
        pass


def abort(code: int = 1) -> None:
    """End the whole job now: MPI_Abort under MPI, else exit this process with ``code``
    (torchrun / srun --kill-on-bad-exit / mpirun without mpi4py end the job when a rank exits
    non-zero).  ``os._exit`` skips atexit handlers that could block in a collective."""
    sys.stdout.flush()
    sys.stderr.flush()
    abort_mpi(code)
    os._exit(code)


def report_error(exc: BaseException, ctx=None) -> str:
    """Format an exception with the rank and host, print it to stderr and return the text."""
    ctx = ctx or _WORLD[0]
    rank = ctx.rank if ctx is not None else _rank_guess()
    host = ctx.hostname if ctx is not None else socket.gethostname()
    if isinstance(exc, DistmlipError):
        text = f"distmlip: error on rank {rank} ({host}): {exc}\n"
    else:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        text = f"distmlip: error on rank {rank} ({host}): {type(exc).__name__}: {exc}\n" + \
            "".join(f"[rank {rank}] {line}\n" for line in tb.rstrip().splitlines())
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except Exception:  # pragma: no cover
        pass
    return text


def _parallel_world():
    ctx = _WORLD[0]
    return ctx if ctx is not None and ctx.world_size > 1 else None


def run_guarded(fn: Callable, *args, exit_code: int = 1, **kwargs):
    """Call ``fn(*args, **kwargs)``; if it raises on any rank, print the error with the rank and
    end the whole job (MPI_Abort) so that the launcher exits non-zero instead of the other ranks
    waiting forever in a collective.  In a single process the exception propagates unchanged.
    SystemExit with status 0/None is passed through."""
    try:
        return fn(*args, **kwargs)
    except SystemExit as exc:
        if exc.code in (0, None):
            raise
        ctx = _parallel_world()
        if ctx is None:
            raise
        report_error(exc, ctx)
        abort(exc.code if isinstance(exc.code, int) else exit_code)
    except BaseException as exc:
        ctx = _parallel_world()
        if ctx is None:
            raise
        report_error(exc, ctx)
        abort(2 if isinstance(exc, DistmlipError) else (130 if isinstance(exc, KeyboardInterrupt)
                                                        else exit_code))


_PREV_HOOK: Optional[Callable] = None


def _excepthook(tp, value, tb):
    ctx = _parallel_world()
    if ctx is None or issubclass(tp, SystemExit):
        (_PREV_HOOK or sys.__excepthook__)(tp, value, tb)
        return
    report_error(value, ctx)
    abort(1)


def install_excepthook() -> None:
    """An uncaught exception on one rank aborts the job (else mpi4py's MPI_Finalize at exit or a
    peer's collective would wait forever)."""
    global _PREV_HOOK
    if sys.excepthook is not _excepthook:
        _PREV_HOOK = sys.excepthook
        sys.excepthook = _excepthook
