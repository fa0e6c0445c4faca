"""Worker for tests/test_mpi_distributed.py and tests/test_distributed.py: the MPI-only context
(``init_distributed("cpu", torch_group=False)``, as convert and augment use it), run under real
``mpirun -n N`` (N = 4 in the test) or alone.

usage: python mpi_only_check.py
Prints one ``RESULT {json}`` line per rank with:
  env_*            rank/size/local rank read by launch.placement() BEFORE MPI is initialised
  rank, world, local_rank, backend, pg_initialised, mpi_loaded   of the context
  bcast            broadcast_object from the LAST rank
  gathered         all_gather_object(rank * rank)
  tensor_sum/max   all_reduce_sum of rank + 1 and all_reduce_max of a bool tensor (over MPI)
  tensor_error     the error of a tensor collective, if any (none expected)
  wait_wall/cpu    seconds (wall, CPU of this process) spent in barrier(sleep=True) while the
                   last rank sleeps 1.5 s before reaching it
  group_*          ctx.split(G) (G = 2 for an even world, else 1): group index, rank and size in
                   the group, its job ranks, all_gather_object of the job ranks in the group,
                   broadcast_object from group rank 1 (or 0)
  group_stop, group_reason, world_stop, world_reason   the last rank raises SIGUSR1 on itself:
                   only its group sees a stop in the group check, every rank in the world check
  upgraded_sum     after init_distributed() with a torch group on the same context: the sum of
                   rank + 1 over the world (all_reduce_sum), and the backend
  mpi_loaded_end   whether mpi4py was imported at all (alone: never)
And ``LOG <rank>`` lines printed through distmlip.utils.log.log (rank 0 only).
"""
import json
import os
import signal
import sys
import time

import torch

from distmlip.distributed import (DistributedError, init_distributed, install_stop_handlers, placement,
                                  shutdown)
from distmlip.utils.log import log


def main():
    env = placement()   # before MPI_Init: the launcher's environment only
    ctx = init_distributed("cpu", torch_group=False)
    r, W = ctx.rank, ctx.world_size
    res = dict(rank=r, world=W, local_rank=ctx.local_rank, local_world=ctx.local_world_size,
               env_launcher=env.launcher, env_rank=env.rank, env_world=env.world_size,
               env_local_rank=env.local_rank, env_local_world=env.local_world_size,
               backend=ctx.backend, launcher=ctx.launcher,
               pg_initialised=torch.distributed.is_initialized(), mpi_loaded="mpi4py.MPI" in sys.modules)
    log(f"LOG {r}")

    res["bcast"] = ctx.broadcast_object({"from": r, "list": [r] * 3}, src=W - 1)
    res["gathered"] = ctx.all_gather_object(r * r)
    try:   # CPU tensors are summed over MPI, no torch group needed
        t = torch.full((3,), float(r + 1), dtype=torch.float64)
        ctx.all_reduce_sum(t)
        m = torch.tensor([r % 3 == 1, False])
        ctx.all_reduce_max(m)
        res["tensor_sum"], res["tensor_max"], res["tensor_error"] = t.tolist(), m.tolist(), None
    except DistributedError as exc:
        res["tensor_error"] = str(exc)

    if r == W - 1:
        time.sleep(1.5)
    w0, c0 = time.perf_counter(), time.process_time()
    ctx.barrier(sleep=True)
    res["wait_wall"], res["wait_cpu"] = time.perf_counter() - w0, time.process_time() - c0

    G = 2 if W % 2 == 0 else 1
    g, sub = ctx.split(G)
    res.update(group=g, group_rank=sub.rank, group_world=sub.world_size, group_job_ranks=sub.job_ranks,
               group_job_rank=sub.job_rank, group_gathered=sub.all_gather_object(ctx.rank),
               group_bcast=sub.broadcast_object(ctx.rank, src=min(1, sub.world_size - 1)))
    sub.barrier(sleep=True)
    sub.barrier()

    install_stop_handlers()
    if r == W - 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    res["group_stop"], res["group_reason"] = sub.stop_requested(), sub.stop_reason()
    res["world_stop"], res["world_reason"] = ctx.stop_requested(), ctx.stop_reason()

    same = init_distributed("cpu")   # now with a torch process group, on the same context
    t = torch.tensor([float(r + 1)], dtype=torch.float64)
    same.all_reduce_sum(t)
    res.update(same_object=same is ctx, upgraded_sum=float(t.item()), upgraded_backend=same.backend,
               mpi_loaded_end="mpi4py" in sys.modules)
    print("RESULT " + json.dumps(res), flush=True)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
