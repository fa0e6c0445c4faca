"""Worker script for tests/test_distributed*.py, run under real `mpirun -n 2` (or alone).

usage: python dist_check.py MODE [ARGS...]
  info [grads] [groups]     rank/size/local rank + collectives; prints one RESULT json per rank
                            (then the 'grads' and 'groups' checks too if asked)
  groups                    ctx.split(1) and ctx.split(world): tensor and object collectives and
                            the stop check inside each rank group
  grads                     allreduce_gradients vs. the sum of every rank's own gradients
  device [grads]            tensor collectives on the context's device (DIST_CHECK_DEVICE=cuda:
                            NCCL, GPU tensors); then the 'grads' check if asked
  stop DIR SELF_KILL_STEP   loop of steps calling stop_requested(); writes DIR/pid.<rank>;
                            the last rank sends itself SIGTERM at SELF_KILL_STEP (-1: wait for
                            the test); with a 4th argument 'twice' it sends two
  fail STEP [uncaught]      rank 1 raises at STEP while rank 0 waits in an all-reduce
  die STEP                  rank 1 calls os._exit(3) at STEP (a crash without Python's help)
"""
import json
import os
import signal
import sys
import time

import numpy as np
import torch

from distmlip.distributed import (allreduce_gradients, init_distributed, install_stop_handlers,
                                  placement, run_guarded, shutdown)

ENV = placement()  # read from the launcher's environment before any MPI or torch set-up


def out(ctx, **kw):
    kw.update(rank=ctx.rank, kind=sys._getframe(1).f_code.co_name)
    print("RESULT " + json.dumps(kw), flush=True)


def values(rank, n=1000):
    # awkward float64 values with wide exponents: any reduction in lower precision would differ
    rng = np.random.default_rng(1234 + rank)
    return rng.standard_normal(n) * 10.0 ** rng.integers(-12, 12, n)


def mode_info(ctx):
    mpi_loaded = "mpi4py.MPI" in sys.modules
    t = torch.tensor(values(ctx.rank), dtype=torch.float64)
    ctx.all_reduce_sum(t)
    expect = np.zeros(1000)
    for r in range(ctx.world_size):
        expect = expect + values(r)  # same order of additions as a 2-term sum
    m = torch.tensor([float(ctx.rank) * 3.5 - 1.0, -float(ctx.rank)], dtype=torch.float64)
    ctx.all_reduce_max(m)
    obj = ctx.broadcast_object({"from": ctx.rank, "arr": [1, 2, 3]} if ctx.rank == 0 else None)
    gathered = ctx.all_gather_object(ctx.rank * 10)
    ctx.barrier()
    out(ctx, world=ctx.world_size, local_rank=ctx.local_rank, local_world=ctx.local_world_size,
        n_nodes=ctx.n_nodes, backend=ctx.backend, launcher=ctx.launcher,
        is_distributed=ctx.is_distributed, mpi_loaded=mpi_loaded,
        env_local_rank=os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK"),
        placement=[ENV.launcher, ENV.rank, ENV.world_size],
        omp=os.environ.get("OMP_NUM_THREADS"),
        sum_exact=bool(np.array_equal(t.numpy(), expect)),
        sum_maxdiff=float(np.max(np.abs(t.numpy() - expect))),
        max=m.tolist(), bcast=obj, gathered=gathered, stop=ctx.stop_requested(),
        pid=os.getpid())


def mode_device(ctx):
    """Sum and max of tensors on the context's device (NCCL for GPUs, where mode_info's CPU
    tensors go over the gloo group beside it)."""
    dev = ctx.device
    t = torch.tensor(values(ctx.rank), dtype=torch.float64, device=dev)
    ctx.all_reduce_sum(t)
    expect = np.zeros(1000)
    for r in range(ctx.world_size):
        expect = expect + values(r)
    m = torch.tensor([float(ctx.rank) * 3.5 - 1.0, -float(ctx.rank)], dtype=torch.float64, device=dev)
    ctx.all_reduce_max(m)
    got = t.cpu().numpy()
    out(ctx, backend=ctx.backend, device=str(t.device), sum_exact=bool(np.array_equal(got, expect)),
        sum_maxdiff=float(np.max(np.abs(got - expect))), max=m.cpu().tolist())


def make_model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    extra = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))   # used on rank 1 only
    unused = torch.nn.Parameter(torch.randn(2, dtype=torch.float64))  # used nowhere
    return model, extra, unused


def local_grads(rank):
    model, extra, unused = make_model()
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(5 + rank, 4, generator=g, dtype=torch.float64)
    loss = (model(x) ** 2).sum()
    if rank == 1:
        loss = loss + (extra ** 3).sum()
    loss.backward()
    return model, extra, unused


def mode_grads(ctx):
    model, extra, unused = local_grads(ctx.rank)
    params = list(model.parameters()) + [extra, unused]
    allreduce_gradients(params, ctx)
    # independent reference: every rank's gradient computed here, summed in rank order
    ref = None
    for r in range(ctx.world_size):
        m, e, u = local_grads(r)
        gs = [p.grad.clone() for p in m.parameters()] + [e.grad.clone() if e.grad is not None else torch.zeros(3, dtype=torch.float64)]
        ref = gs if ref is None else [a + b for a, b in zip(ref, gs)]
    got = [p.grad for p in model.parameters()] + [extra.grad]
    diffs = [float((a - b).abs().max()) if a is not None else None for a, b in zip(got, ref)]
    # the trainer's path (every rank has every grad): reduced where they lie, the extra numbers
    # summed in float64 beside them
    m2, _, _ = local_grads(ctx.rank)
    ps2 = list(m2.parameters())
    ex = torch.tensor([float(ctx.rank), 0.1 * (ctx.rank + 1)], dtype=torch.float64)
    ex_sum = allreduce_gradients(ps2, ctx, extra=ex, every_rank_has_grads=True)
    diffs_flat = [float((p.grad - r).abs().max()) for p, r in zip(ps2, ref)]
    out(ctx, diffs=diffs, extra_has_grad=extra.grad is not None, unused_grad_none=unused.grad is None,
        checksum=float(sum(g.double().sum() for g in got if g is not None)), diffs_flat=diffs_flat,
        extra_sum=ex_sum.tolist(), extra_want=[float(sum(range(ctx.world_size))),
                                               sum(0.1 * (r + 1) for r in range(ctx.world_size))],
        checksum_flat=float(sum(p.grad.sum() for p in ps2)))


def mode_groups(ctx):
    res = {}
    for G in sorted({1, ctx.world_size}):  # one group of every rank, one group per rank
        g, sub = ctx.split(G)
        t = torch.tensor([float(ctx.rank + 1)], dtype=torch.float64)
        sub.all_reduce_sum(t)
        m = torch.tensor([float(ctx.rank)], dtype=torch.float64)
        sub.all_reduce_max(m)
        res[str(G)] = dict(g=g, rank=sub.rank, world=sub.world_size, job_ranks=sub.job_ranks,
                           sum=float(t.item()), max=float(m.item()), gathered=sub.all_gather_object(ctx.rank),
                           bcast=sub.broadcast_object(ctx.rank, src=sub.world_size - 1),
                           stop=sub.stop_requested())
        sub.barrier()
    out(ctx, groups=res)


def mode_stop(ctx, directory, self_kill_step, twice=False):
    install_stop_handlers()
    with open(os.path.join(directory, f"pid.{ctx.rank}.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(directory, f"pid.{ctx.rank}.tmp"), os.path.join(directory, f"pid.{ctx.rank}"))
    acc = torch.zeros(1, dtype=torch.float64)
    for step in range(1200):  # at most ~60 s
        if ctx.rank == ctx.world_size - 1 and step == self_kill_step:
            os.kill(os.getpid(), signal.SIGTERM)
            if twice:  # a second SIGTERM must end the process at once
                os.kill(os.getpid(), signal.SIGTERM)
        acc += 1.0
        ctx.all_reduce_sum(acc)  # the "training step" collective
        if ctx.stop_requested():
            out(ctx, stopped_at=step, reason=ctx.stop_reason())
            shutdown()
            return 0
        time.sleep(0.05)
    out(ctx, stopped_at=None)
    return 3


def mode_fail(ctx, step_fail):
    t = torch.ones(4, dtype=torch.float64)
    for step in range(100000):
        if ctx.rank == 1 and step == step_fail:
            raise RuntimeError(f"injected failure at step {step}")
        ctx.all_reduce_sum(t)
        t.fill_(1.0)
        if step > step_fail + 5:
            time.sleep(0.01)  # rank 0 should never get here for long
    return 0


def mode_die(ctx, step_die):
    t = torch.ones(4, dtype=torch.float64)
    for step in range(100000):
        if ctx.rank == 1 and step == step_die:
            sys.stderr.write(f"rank 1 dies at step {step}\n")
            sys.stderr.flush()
            os._exit(3)
        ctx.all_reduce_sum(t)
        time.sleep(0.001)
    return 0


def main():
    mode = sys.argv[1]
    ctx = init_distributed(device=os.environ.get("DIST_CHECK_DEVICE", "cpu"))
    if mode == "info":
        mode_info(ctx)
        if "grads" in sys.argv[2:]:
            mode_grads(ctx)
        if "groups" in sys.argv[2:]:
            mode_groups(ctx)
    elif mode == "grads":
        mode_grads(ctx)
    elif mode == "device":
        mode_device(ctx)
        if "grads" in sys.argv[2:]:
            mode_grads(ctx)
    elif mode == "groups":
        mode_groups(ctx)
    elif mode == "stop":
        return mode_stop(ctx, sys.argv[2], int(sys.argv[3]), twice="twice" in sys.argv[4:])
    elif mode == "fail":
        if len(sys.argv) > 3 and sys.argv[3] == "uncaught":
            return mode_fail(ctx, int(sys.argv[2]))  # relies on the excepthook
        return run_guarded(mode_fail, ctx, int(sys.argv[2]))
    elif mode == "die":
        return mode_die(ctx, int(sys.argv[2]))
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
