"""The distributed layer: one context for every parallel stage (training, committees, featurize,
convert, augment).  Single-process runs without mpirun work with no change; see
docs/distributed.md.

Modules (each imports only the ones above it, and nothing of distmlip but ``errors``):

    launch      launcher detection and the rank/size/local rank read from the environment
                (no mpi4py, no torch: ``distmlip.utils`` uses it for rank-aware logging)
    partition   deterministic splits of work over ranks
    signals     stop flags and handlers, stop codes, abort, run_guarded, the excepthook
    rendezvous  MPI world, device choice, TCPStore rendezvous, torch process group
    context     DistContext and its collectives, rank groups, init/shutdown, gradient all-reduce
    liveness    Heartbeat: ranks that wait long for each other (augment) end the job when a
                partner stops beating, instead of hanging the allocation
    cores       borrowed_cores: ranks without work in a phase lend their cores and threads
                to the working ranks of their node (augment)

API:

    ctx = init_distributed(device="auto")    # idempotent; reads MPI via mpi4py or env vars
    ctx = init_distributed("cpu", torch_group=False)   # MPI only: objects, barriers, stop check
    ctx.rank, ctx.world_size, ctx.local_rank, ctx.device, ctx.is_distributed
    ctx.local_world_size, ctx.n_nodes, ctx.backend ("gloo"/"nccl"/None), ctx.launcher
    ctx.all_reduce_sum(tensor) / ctx.all_reduce_max(tensor)   # in place (float64 recommended)
    ctx.broadcast_object(obj, src=0) ; ctx.all_gather_object(obj) -> list
    ctx.barrier() ; ctx.barrier(sleep=True)  # the latter waits without spinning a core
    with Heartbeat(shared_folder, rank, world, timeout_s) as hb:   # a frozen partner ends the wait
        ctx.barrier(sleep=True, watch=hb.check)
    g, gctx = ctx.split(G)                   # rank groups g, g+G, ...: same interface, group only
    allreduce_gradients(parameters, ctx, scale=None)   # ONE flat all-reduce of all .grad: SUM
    install_stop_handlers()                  # SIGTERM / SIGUSR1 -> stop flag; 2nd SIGTERM exits
    ctx.stop_requested() -> bool             # collective: True on every rank if any rank got a signal
    ctx.stop_reason() -> str | None          # e.g. "SIGTERM on rank 1"
    ctx.stop_exit_status() -> int            # 128 + signal (143): a command left incomplete (md-check)
    run_guarded(fn, *args)                   # an exception on any rank ends the job (MPI_Abort)
    split_range(n, rank, world) ; balanced_partition(costs, world)
    shutdown()

The names are loaded on first use, so that importing the package does not import torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "DistContext": "context",
    "Heartbeat": "liveness",
    "allreduce_gradients": "context",
    "get_context": "context",
    "init_distributed": "context",
    "shutdown": "context",
    "exit_process": "context",
    "DistributedError": "distmlip.errors",
    "detect_launcher": "distmlip.utils.launch",
    "placement": "distmlip.utils.launch",
    "balanced_partition": "partition",
    "split_range": "partition",
    "install_stop_handlers": "signals",
    "report_error": "signals",
    "reset_stop_flag": "signals",
    "run_guarded": "signals",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(mod if "." in mod else f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
