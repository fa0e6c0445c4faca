"""Process-group bootstrap and collective helpers for data-parallel stages.

API used by training, augment and convert (the implementation in ``bootstrap.py`` fills it in;
single-process runs without mpirun work with no change):

    ctx = init_distributed(device="auto")    # idempotent; reads MPI via mpi4py or env vars
    ctx.rank, ctx.world_size, ctx.local_rank, ctx.device, ctx.is_distributed
    ctx.all_reduce_sum(tensor)               # in place, returns tensor (float64 recommended)
    ctx.all_reduce_max(tensor)
    ctx.broadcast_object(obj, src=0)
    ctx.barrier()
    allreduce_gradients(parameters, ctx)     # one flat all-reduce of all .grad, averaged? no: SUM
    install_stop_handlers()                  # SIGTERM / SIGUSR1 -> stop flag
    ctx.stop_requested() -> bool             # True on every rank if any rank got a signal
    shutdown()
"""
from .bootstrap import (  # noqa: F401
    DistContext,
    allreduce_gradients,
    get_context,
    init_distributed,
    install_stop_handlers,
    shutdown,
)
