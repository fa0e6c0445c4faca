"""Cores of idle ranks, lent to the working ranks of their node.

Why: a stage whose units of work are fewer than its ranks (``augment`` on one subset under
``mpirun -n 32``) left all ranks but one waiting, and Open MPI's default binding keeps the one
working rank (and every BLAS thread it starts) on its own core.  A waiting rank sleeps in a
barrier and uses no CPU, so its cores and its thread budget can go to a working rank of the same
node for as long as the phase lasts: the working rank widens the CPU affinity of all its threads
to the lenders' cores and raises its thread count (torch, OpenMP, the BLAS libraries) by the
lenders' threads; both are restored when the phase ends.  The total number of threads on the
node stays what the launch asked for (ranks x threads per rank).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Optional

from .partition import lend_plan


def process_affinity() -> Optional[list[int]]:
    """The CPUs this process may run on, or None where the OS does not say (not Linux)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _set_affinity_of_all_threads(cpus) -> bool:
    """Set the affinity of every thread of this process (a thread pool started while the rank was
    bound to one core keeps that core unless each of its threads is moved).  False where the OS
    refused it (a cgroup without those cores) or has no such call."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    ok = True
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:      # a thread that ended meanwhile
            continue
        except (AttributeError, OSError):
            ok = False
    return ok


def cpu_list(cpus) -> str:
    """'0-3,8' for [0, 1, 2, 3, 8]."""
    cpus = sorted(cpus)
    parts, start = [], None
    for k, c in enumerate(cpus):
        if start is None:
            start = c
        if k + 1 == len(cpus) or cpus[k + 1] != c + 1:
            parts.append(f"{start}" if start == c else f"{start}-{c}")
            start = None
    return ",".join(parts)


@contextmanager
def borrowed_cores(ctx, busy: bool, enabled: bool = True):
    """Collective (every rank of ``ctx`` enters it): ranks with ``busy`` False lend their cores and
    threads to the busy ranks of their node (:func:`partition.lend_plan`) until the block ends.
    Yields, on a rank that borrowed, ``{"lenders": [...], "threads": n, "cpus": [...] or None,
    "pinned": bool}``; elsewhere None.  ``enabled`` False (the same on every rank): nothing is lent."""
    if ctx.world_size == 1 or not enabled:
        yield None
        return
    import torch

    mine = {"host": ctx.hostname, "cpus": process_affinity(), "threads": torch.get_num_threads(),
            "busy": bool(busy)}
    every = ctx.all_gather_object(mine)
    lenders = lend_plan([e["host"] for e in every], [e["busy"] for e in every]).get(ctx.rank, [])
    if not lenders:
        yield None
        return
    threads = mine["threads"] + sum(every[r]["threads"] for r in lenders)
    cpus, pinned = None, False
    if mine["cpus"] is not None and all(every[r]["cpus"] is not None for r in lenders):
        cpus = sorted(set(mine["cpus"]).union(*(every[r]["cpus"] for r in lenders)))
        pinned = _set_affinity_of_all_threads(cpus)
        if not pinned:                   # back to where it was, then only the thread count grows
            _set_affinity_of_all_threads(mine["cpus"])
    from threadpoolctl import threadpool_limits

    limits = threadpool_limits(limits=threads)      # OpenBLAS of numpy and scipy, OpenMP
    torch.set_num_threads(threads)                  # torch's own pool and MKL
    try:
        yield {"lenders": lenders, "threads": threads, "cpus": cpus, "pinned": pinned}
    finally:
        torch.set_num_threads(mine["threads"])
        limits.restore_original_limits()
        if pinned:
            _set_affinity_of_all_threads(mine["cpus"])


_LIMITS = None      # the threadpoolctl limits set by threads_per_rank (kept alive for the process)


def threads_per_rank(ctx) -> Optional[int]:
    """Give every thread pool of this rank (torch's, OpenMP's, the BLAS libraries of numpy and
    scipy) one thread count: ``OMP_NUM_THREADS`` when set, else the rank's share of the CPUs it
    may run on (its CPU set divided by the ranks of its node that share it: unbound ranks all see
    every core).  Why: without ``OMP_NUM_THREADS`` each rank's OpenBLAS started one thread per
    core of the node, and torch its own: two ranks on two cores ran augment 7x slower (257 s
    against 34 s, sweep 25), and on a 64-core node 64 ranks would each start 64.  Returns the
    count, or None for a job of one rank (left as it is)."""
    global _LIMITS
    if ctx.world_size == 1:
        return None
    import torch

    cpus = process_affinity()
    # collective on every rank whatever its environment (ranks launched with different
    # variables must not leave one waiting here)
    every = ctx.all_gather_object({"host": ctx.hostname, "cpus": tuple(cpus or ())})
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        n = int(env)
    else:
        ncpu = len(cpus) if cpus else (os.cpu_count() or 1)
        sharing = sum(1 for e in every if e["host"] == ctx.hostname and e["cpus"] == tuple(cpus or ()))
        n = max(1, ncpu // max(1, sharing))
    # libraries loaded later (scipy's own OpenBLAS) read the variables when they load; those
    # loaded already are limited in place
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        if not os.environ.get(var, "").strip():
            os.environ[var] = str(n)
    from threadpoolctl import threadpool_limits

    _LIMITS = threadpool_limits(limits=n)
    torch.set_num_threads(n)
    return n
