"""Process-group bootstrap and collective helpers for data-parallel stages.

API used by training, augment and convert (implemented in ``bootstrap.py``; single-process runs
without mpirun work with no change; see docs/distributed.md):

    ctx = init_distributed(device="auto")    # idempotent; reads MPI via mpi4py or env vars
    ctx.rank, ctx.world_size, ctx.local_rank, ctx.device, ctx.is_distributed
    ctx.local_world_size, ctx.n_nodes, ctx.backend ("gloo"/"nccl"/None), ctx.launcher
    ctx.all_reduce_sum(tensor)               # in place, returns tensor (float64 recommended)
    ctx.all_reduce_max(tensor) / ctx.all_reduce_min(tensor)
    ctx.broadcast_object(obj, src=0) ; ctx.all_gather_object(obj) -> list
    ctx.barrier()
    allreduce_gradients(parameters, ctx, scale=None)   # ONE flat all-reduce of all .grad: SUM
    install_stop_handlers()                  # SIGTERM / SIGUSR1 -> stop flag; 2nd SIGTERM exits
    ctx.stop_requested() -> bool             # collective: True on every rank if any rank got a signal
    ctx.stop_reason() -> str | None          # e.g. "SIGTERM on rank 1"
    run_guarded(fn, *args)                   # an exception on any rank ends the job (MPI_Abort)
    split_range(n, rank, world) ; balanced_partition(costs, world)
    shutdown()
"""
from .bootstrap import (  # noqa: F401
    DistContext,
    DistributedError,
    allreduce_gradients,
    balanced_partition,
    detect_launcher,
    get_context,
    init_distributed,
    install_stop_handlers,
    report_error,
    request_stop,
    reset_stop_flag,
    run_guarded,
    shutdown,
    split_range,
)
