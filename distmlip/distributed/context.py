"""The one distributed context: where this process stands in the job (or in a rank group of it)
and the collectives every stage uses.

Why one class: training, committees, ``featurize``, ``convert`` and ``augment`` all need the
same few things (rank and size, object broadcast/gather, barriers, a collective stop check,
tensor sums for gradients).  One ``DistContext`` gives them to all, whatever carries them:

- ``init_distributed(device)`` (training): MPI for Python objects, the stop flag and CPU tensors
  when mpi4py is there (cheap, shared memory on a node), a torch process group (gloo on CPU,
  NCCL on CUDA) for device tensors and for jobs without mpi4py.
- ``init_distributed(device="cpu", torch_group=False)`` (convert, augment): MPI only, no torch
  process group; CPU tensors, objects, barriers and the stop check work, GPU tensors do not.
  Without mpi4py (torchrun, ``DISTMLIP_USE_MPI4PY=0``) there is no MPI to carry the objects, so a
  torch gloo group is started anyway.
- ``ctx.split(G)`` (committees): G rank groups (ranks g, g+G, ...), each a ``DistContext`` of the
  same interface restricted to its ranks: an MPI sub-communicator and torch subgroups, its own
  stop check.  Groups never wait for each other.
- No launcher (a plain ``python``/``distmlip`` process) or ``mpirun -n 1``: a world of one; every
  collective returns at once, mpi4py is not imported.

All collectives must be called by every rank of the context in the same order.  The start-up is in
``rendezvous``, the stop flags and abort in ``signals``, the launcher's environment in ``launch``.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch

from . import rendezvous, signals
from ..errors import DistributedError
from ..utils.launch import detect_launcher, single_rank_mpi, use_mpi4py

_CTX: Optional["DistContext"] = None
_LOCK = threading.Lock()
_SLEEPING_BARRIER_POLL_S = 0.05
_SPIN_S = 0.005          # a tensor collective polls without sleeping for this long, then sleeps


@dataclass
class DistContext:
    """Where this process stands in the job (or in one rank group of it), and the collectives.

    All collectives must be called by every rank of the context in the same order.  With
    ``world_size == 1`` they return immediately (the tensors are left unchanged).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    is_distributed: bool = False
    local_world_size: int = 1
    n_nodes: int = 1
    backend: Optional[str] = None          # "gloo" | "nccl" | None (no torch process group)
    launcher: str = "none"                 # "mpi" | "mpi-env" | "torchrun" | "none"
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    hostname: str = field(default_factory=socket.gethostname)
    timeout_s: float = rendezvous.DEFAULT_TIMEOUT_S
    _comm: Any = field(default=None, repr=False)        # mpi4py communicator of these ranks, or None
    _group: Any = field(default=None, repr=False)       # torch group of these ranks (None: default)
    _cpu_group: Any = field(default=None, repr=False)   # gloo group for CPU tensors/objects
    _job_ranks: Optional[tuple] = field(default=None, repr=False)  # job ranks of a group context
    rendezvous: Optional[str] = None       # how the ranks met: "file:PATH" (one node) or "tcp:..."
    _rendezvous_dir: Optional[str] = field(default=None, repr=False)
    _stop_reason: Optional[str] = field(default=None, repr=False)
    _stop_generation: int = field(default=0, repr=False)
    _stop_code: int = field(default=0, repr=False)

    @property
    def job_ranks(self) -> list[int]:
        """Ranks in the whole job of this context's ranks, in context-rank order."""
        return list(self._job_ranks) if self._job_ranks is not None else list(range(self.world_size))

    @property
    def job_rank(self) -> int:
        """This process's rank in the whole job (``rank`` unless this is a group context)."""
        return self._job_ranks[self.rank] if self._job_ranks is not None else self.rank

    # -- tensors ----------------------------------------------------------------------------
    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        try:
            return self._reduce_impl(t, op)
        except RuntimeError as exc:      # gloo/NCCL report a partner that does not come as errors
            text = str(exc).lower()
            if "timed out" in text or "timeout" in text or "connection closed" in text or "reset by peer" in text:
                raise self._timed_out(exc) from None
            raise

    def _reduce_impl(self, t: torch.Tensor, op) -> torch.Tensor:
        if self.world_size == 1:
            return t
        if self._comm is not None and t.device.type == "cpu":
            return self._mpi_reduce(t, op)
        if self.backend is None:
            raise DistributedError("tensor collectives need a torch process group; this context was "
                                   "started with torch_group=False (objects and barriers only)")
        import torch.distributed as dist

        if self.backend == "nccl" and t.device.type != "cuda":
            if self._cpu_group is not None:
                dist.all_reduce(t, op=op, group=self._cpu_group)
                return t
            tmp = t.to(self.device)
            dist.all_reduce(tmp, op=op, group=self._group)
            t.copy_(tmp)
            return t
        if t.dtype == torch.bool:
            tmp = t.to(torch.int32)
            dist.all_reduce(tmp, op=op, group=self._group)
            t.copy_(tmp.bool())
            return t
        dist.all_reduce(t, op=op, group=self._group)
        return t

    def _mpi_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        """CPU tensors go through MPI where the job has it: on one node its shared-memory
        collectives take microseconds where gloo's sockets took 1-2 ms per all-reduce on the test
        machine (two ranks then trained at 33-50 % of two independent processes).  Non-blocking,
        polled against the same deadline as the torch group's collectives (a frozen partner must
        end the job, not hang it): a spin of up to _SPIN_S first (a partner behind by a step's
        jitter is not slept past), then sleeps of growing length (up to 0.5 ms) so that a rank
        waiting long for a slower one does not hold a core.
        With more than two ranks the result is rank 0's, broadcast: every rank then holds
        bitwise the same sum whatever order MPI's algorithm added in."""
        from mpi4py import MPI

        import torch.distributed as dist

        mop = MPI.SUM if op == dist.ReduceOp.SUM else MPI.MAX if op == dist.ReduceOp.MAX else None
        if mop is None:
            raise DistributedError(f"reduction {op} is not supported over MPI")
        work = t.detach()
        if work.dtype == torch.bool:
            work = work.to(torch.int32)
        elif not work.is_contiguous():
            work = work.contiguous()
        arr = work.numpy()
        self._wait(self._comm.Iallreduce(MPI.IN_PLACE, arr, op=mop))
        if self.world_size > 2:
            self._wait(self._comm.Ibcast(arr, root=0))
        if work.data_ptr() != t.data_ptr():
            t.copy_(work if t.dtype != torch.bool else work.bool())
        return t

    def all_reduce_sum_together(self, tensors) -> None:
        """Sum each of ``tensors`` over the ranks, in place, with their reductions in flight
        together.  Over MPI, contiguous CPU tensors are reduced where they lie (no packing copy)
        and waited for once; elsewhere one reduction after the other."""
        if self.world_size == 1:
            return
        if self._comm is None or any(t.device.type != "cpu" or not t.is_contiguous() or t.dtype == torch.bool
                                     for t in tensors):
            for t in tensors:
                self.all_reduce_sum(t)
            return
        from mpi4py import MPI

        arrs = [t.detach().numpy() for t in tensors]
        self._wait([self._comm.Iallreduce(MPI.IN_PLACE, a, op=MPI.SUM) for a in arrs])
        if self.world_size > 2:    # rank 0's sums everywhere, bit for bit (see _mpi_reduce)
            self._wait([self._comm.Ibcast(a, root=0) for a in arrs])

    def _wait(self, req) -> None:
        """Wait for one request or a list of them, polled (see _mpi_reduce)."""
        if isinstance(req, list):
            from mpi4py import MPI

            reqs = req

            def done():
                return MPI.Request.Testall(reqs)
        else:
            done = req.Test
        if done():
            return
        t0 = time.monotonic()
        pause = 5e-5
        while not done():
            waited = time.monotonic() - t0
            if waited > _SPIN_S:    # spin first: a partner a step's jitter behind is not slept past
                time.sleep(pause)
                pause = min(pause * 2, 5e-4)
                if waited > self.timeout_s:
                    raise self._timed_out(TimeoutError(f"MPI collective not completed in {self.timeout_s:.0f} s"))

    def _timed_out(self, exc: BaseException) -> DistributedError:
        return DistributedError(f"rank {self.job_rank} ({self.hostname}): a collective found no partner within "
                                f"{self.timeout_s:.0f} s (DISTMLIP_DIST_TIMEOUT): another rank is frozen, dead or "
                                f"far behind ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns ``t``.  Use float64 for energies and counts."""
        if self.world_size == 1:
            return t
        import torch.distributed as dist

        return self._reduce(t, dist.ReduceOp.SUM)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Maximum over ranks, in place; returns ``t``."""
        if self.world_size == 1:
            return t
        import torch.distributed as dist

        return self._reduce(t, dist.ReduceOp.MAX)

    # -- python objects ---------------------------------------------------------------------
    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s (picklable) object on every rank (``src`` is a rank of this context)."""
        if self.world_size == 1:
            return obj
        if self._comm is not None:
            return self._comm.bcast(obj, root=src)
        import torch.distributed as dist

        lst = [obj]
        dist.broadcast_object_list(lst, src=self.job_ranks[src], group=self._cpu_group)
        return lst[0]

    def all_gather_object(self, obj: Any) -> list:
        """List of every rank's object, in rank order."""
        if self.world_size == 1:
            return [obj]
        if self._comm is not None:
            return self._comm.allgather(obj)
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._cpu_group)
        return out

    def barrier(self, sleep: bool = False, watch=None, deadline: bool = False) -> None:
        """Wait until every rank of the context got here.  ``sleep=True``: wait without spinning a
        core (a blocking MPI barrier busy-polls), for ranks that may wait long while another still
        works, e.g. augment's ranks that finished their subsets.  ``watch``: a callable run about
        once a second while waiting, which raises to end the wait (e.g. ``Heartbeat.check``: such
        a wait has no deadline of its own, a partner may legitimately work for hours).
        ``deadline=True``: for waits bounded by a short piece of work (a block of the descriptor
        cache): a partner that does not arrive within ``DISTMLIP_DIST_TIMEOUT`` is frozen or dead,
        and the wait ends with an error naming this rank instead of hanging the job."""
        if self.world_size == 1:
            return
        if self._comm is not None:
            if deadline:
                self._wait(self._comm.Ibarrier())
            elif sleep:
                req = self._comm.Ibarrier()
                next_watch = time.monotonic() + 1.0
                while not req.Test():
                    time.sleep(_SLEEPING_BARRIER_POLL_S)
                    if watch is not None and time.monotonic() >= next_watch:
                        watch()
                        next_watch = time.monotonic() + 1.0
            else:
                self._comm.Barrier()
            return
        import torch.distributed as dist

        dist.barrier(group=self._cpu_group)

    # -- stop -------------------------------------------------------------------------------
    def stop_requested(self) -> bool:
        """True on every rank if any rank of this context received SIGTERM/SIGUSR1 (or the stop
        file exists).

        Collective (one tiny all-reduce): call it at the same point on every rank, e.g. at each
        step boundary.  The reason is available afterwards from ``stop_reason()``.
        """
        local = signals.local_stop_code(self.job_rank)
        code = local
        if self.world_size > 1:
            # under the collectives' deadline (a frozen rank must end the job, not hang it): MPI
            # where the job has it (_mpi_reduce), else the torch group
            import torch.distributed as dist

            t = torch.tensor([local], dtype=torch.int64)
            self._reduce(t, dist.ReduceOp.MAX)
            code = int(t.item())
        if code and self.stop_reason() is None:
            self._stop_reason = signals.describe_stop(code)
            self._stop_code = code
            self._stop_generation = signals.stop_generation()
        return bool(code)

    def stop_reason(self) -> Optional[str]:
        """e.g. 'SIGTERM on rank 1' once stop_requested() returned True (until reset_stop_flag())."""
        if self._stop_reason is not None and self._stop_generation != signals.stop_generation():
            self._stop_reason, self._stop_code = None, 0
        return self._stop_reason

    def stop_exit_status(self) -> int:
        """The exit status of a command that the stop of stop_reason() left without a complete
        result (``signals.stop_exit_status``: 143 for SIGTERM); 0 when no stop was requested."""
        return signals.stop_exit_status(self._stop_code) if self.stop_reason() is not None else 0

    # -- rank groups ------------------------------------------------------------------------
    def split(self, n_groups: int) -> tuple[int, "DistContext"]:
        """Cut this context into ``n_groups`` rank groups: group g holds the ranks g, g+G, g+2G, ...

        Returns (g, the context of this rank's group): a DistContext whose rank, world size and
        collectives (tensors, objects, barriers, stop check) are those of the group only.
        Collective over every rank of this context (each creates every group, in the same order).
        """
        G, W = int(n_groups), self.world_size
        if G < 1 or W % G:
            raise DistributedError(f"cannot split {W} rank(s) into {G} equal groups")
        members = [list(range(g, W, G)) for g in range(G)]
        g = self.rank % G
        mine = members[g]
        job = self.job_ranks
        sub = replace(self, rank=mine.index(self.rank), world_size=len(mine), is_distributed=len(mine) > 1,
                      _comm=None, _group=None, _cpu_group=None, _job_ranks=tuple(job[r] for r in mine),
                      _stop_reason=None, _stop_generation=0, _stop_code=0)
        if W == 1:
            return 0, sub
        if self._comm is not None:
            sub._comm = self._comm.Split(color=g, key=self.rank)
        if self.backend is not None:
            if self._job_ranks is not None:
                raise DistributedError("a rank group cannot be split again: torch groups are created "
                                       "by every rank of the job")
            import torch.distributed as dist

            handles, cpu_handles = [], []
            for ranks in members:   # every rank creates every group, in the same order
                handles.append(dist.new_group(ranks))
                cpu_handles.append(dist.new_group(ranks, backend="gloo") if self.backend == "nccl" else None)
            sub._group = handles[g]
            sub._cpu_group = cpu_handles[g] if cpu_handles[g] is not None else handles[g]
        return g, sub


# ------------------------------------------------------------------------------ process state
def init_distributed(device: str = "auto", torch_group: bool = True) -> DistContext:
    """Set up (once) and return this process's DistContext.  Later calls return the same
    context; ``device``: 'auto' (CUDA if available; on a later call: the context's device), 'cpu',
    'cuda' or 'cuda:N'.  A later call that names another device moves a process that runs alone
    (no process group, nothing bound to the device) to it, and is an error in a job of several
    ranks, whose communicators are bound to the first device: silently keeping the first device
    would run a `training.device: cuda` job on the CPU.  ``torch_group=False``: MPI only
    (objects, barriers, stop check), no torch process group; a later call with
    ``torch_group=True`` starts it on the same context."""
    global _CTX
    with _LOCK:
        if _CTX is not None:
            if device not in (None, "auto"):
                _switch_device(_CTX, device)
            if torch_group and _CTX.world_size > 1 and _CTX.backend is None and _torch_group_needed(_CTX):
                rendezvous.connect_mpi(_CTX)
            return _CTX
        launcher = detect_launcher()
        if launcher == "mpi" and single_rank_mpi():
            launcher = "none"       # one rank: the world of one, without MPI_Init's start-up cost
        ctx = DistContext(timeout_s=rendezvous.timeout_seconds())
        if launcher == "mpi" and use_mpi4py() and rendezvous.import_mpi4py() and rendezvous.init_mpi(ctx, device):
            if torch_group and _torch_group_needed(ctx):
                rendezvous.connect_mpi(ctx)
        elif launcher in ("mpi", "torchrun"):
            # no mpi4py, torchrun, or an MPI that does not see the launcher's other tasks (init_mpi
            # returned False): the launcher's variables and a TCPStore rendezvous
            rendezvous.init_env(ctx, device)
        else:
            ctx.device = rendezvous.choose_device(device, 0, 1, None)
        _CTX = ctx
        signals.set_world(ctx)
        if ctx.world_size > 1:
            signals.install_excepthook()
            if ctx.device is not None and ctx.device.type == "cpu":
                from .cores import threads_per_rank
                threads_per_rank(ctx)
        return ctx


def _switch_device(ctx: DistContext, device: str) -> None:
    """``device`` asked for after the context was made: see init_distributed."""
    want = rendezvous.wanted_device(device)
    same = (want == ctx.device.type) if ":" not in want else (torch.device(want) == ctx.device)
    if same:
        return
    if ctx.world_size == 1 and ctx.backend is None:
        ctx.device = rendezvous.choose_device(device, 0, 1, None)
        return
    raise DistributedError(
        f"device {device!r} asked for, but this process is rank {ctx.rank} of a {ctx.world_size}-rank "
        f"job already set up on {ctx.device}: a job keeps the device it started on; start a new job "
        f"with --device {device}")


def _torch_group_needed(ctx: DistContext) -> bool:
    """A CPU job under MPI sends its tensors (``_mpi_reduce``), objects and barriers over MPI and
    splits its groups as MPI communicators, so it starts no torch process group: no gloo
    rendezvous, no full mesh of sockets between every pair of ranks (a start-up cost that grows
    with the job), and no gloo event-loop thread, which woke about 100 times a second on every
    rank and preempted the training thread (two ranks, 10 s of energy training: 800-1400
    involuntary context switches per rank with the group, 200-400 without).  GPU jobs (NCCL)
    and jobs without mpi4py (torchrun) keep theirs; ``DISTMLIP_GLOO=1`` starts it anyway (the
    CPU tensors then still go over MPI; for sites whose MPI lacks something the group gives)."""
    if os.environ.get("DISTMLIP_GLOO") == "1":
        return True
    return not (ctx._comm is not None and ctx.device is not None and ctx.device.type == "cpu")


def get_context() -> DistContext:
    """The context of init_distributed() (initialising it with device='auto' if needed)."""
    return _CTX if _CTX is not None else init_distributed()


def shutdown() -> None:
    """Tear down the process group (collective: call on every rank at the end)."""
    global _CTX
    with _LOCK:
        ctx, _CTX = _CTX, None
        signals.set_world(None)
    if ctx is None or ctx.backend is None:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # pragma: no cover - best effort at exit
            pass
    # Rank 0 removes the one-node rendezvous folder.  On a normal end it first waits for every
    # rank to have released the FileStore: a store whose file vanishes while a peer's destructor
    # is about to update it makes that peer retry the open for the whole store timeout (a
    # two-rank run hung at exit after finishing its work).  While an exception ends this rank
    # there is no barrier: the others are being aborted, not waited for.
    if sys.exc_info()[0] is None and ctx._comm is not None and ctx.world_size > 1:
        try:
            ctx._comm.Barrier()
        except Exception:  # pragma: no cover - best effort at exit
            pass
    rendezvous.remove_rendezvous_dir(ctx)


def exit_process(code: int) -> None:
    """End a process that ran a torch process group: flush, finalise MPI, and leave without the
    interpreter's finalisation.  Gloo's worker threads can still release tensors while Python
    shuts down, which aborts the process (SIGABRT) after all work is done; skipping finalisation
    avoids that race.  Returns normally when no process group was used."""
    if not rendezvous.process_group_used():
        return
    if _CTX is not None:
        rendezvous.remove_rendezvous_dir(_CTX)
    from ..utils.launch import leave_process
    leave_process(code, always=True)


# --------------------------------------------------------------------------------- gradients
def allreduce_gradients(parameters, ctx: Optional[DistContext] = None, *, scale: Optional[float] = None,
                        extra: Optional[torch.Tensor] = None, every_rank_has_grads: bool = False
                        ) -> Optional[torch.Tensor]:
    """Sum the ``.grad`` of ``parameters`` over all ranks with ONE flat all-reduce (SUM).

    Gradients are packed into one buffer (their common dtype, float64 when they differ), together
    with one presence flag per parameter.  A parameter whose grad is None on some ranks counts as
    zeros there, and gets the summed grad on every rank; a parameter without grad on every rank
    keeps ``grad = None`` (as in a single-process run, the optimizer then skips it).
    ``scale`` (optional) multiplies the sums, e.g. 1/global_count.  ``extra`` (optional, a few
    small numbers: flags, codes, counts) travels in the same buffer and is returned summed over the
    ranks, so that a training step needs this one collective only.  No-op for world_size 1 apart
    from ``scale``.

    ``every_rank_has_grads``: the caller guarantees that every parameter has a ``.grad`` on every
    rank (a :class:`~distmlip.training.flat.FlatParameters` model: its gradient buffers always
    exist), so no presence flags are needed.  On CPU over MPI the gradients and ``extra`` (kept
    in float64) are then reduced where they lie, together (:meth:`DistContext.all_reduce_sum_together`):
    packing them into a fresh buffer and back cost 0.15 ms per step, 7 % of a 2-rank energy
    step that every rank spent outside its compute.  The flag must be the same on every rank.
    """
    ctx = ctx or get_context()
    params = [p for p in parameters if p.requires_grad]
    if ctx.world_size == 1 or not params:
        if scale is not None:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        if ctx.world_size > 1 and extra is not None:
            return ctx.all_reduce_sum(extra.to(torch.float64).clone())
        return None if extra is None else extra.to(torch.float64).clone()
    if every_rank_has_grads and ctx._comm is not None and all(
            p.grad is not None and p.grad.device.type == "cpu" and p.grad.is_contiguous() for p in params):
        ex = None if extra is None else extra.detach().to("cpu", torch.float64).reshape(-1).clone()
        ctx.all_reduce_sum_together([p.grad for p in params] + ([] if ex is None else [ex]))
        if scale is not None:
            for p in params:
                p.grad.mul_(scale)
        return ex
    dtypes = {p.dtype for p in params}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float64
    if not dtype.is_floating_point:
        dtype = torch.float64
    dev = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    sizes = [p.numel() for p in params]
    n = sum(sizes)
    n_extra = 0 if extra is None else int(extra.numel())
    buf = torch.zeros(n + len(params) + n_extra, dtype=dtype, device=dev)
    if n_extra:
        buf[n + len(params):] = extra.reshape(-1).to(dtype=dtype, device=dev)
    off = 0
    for k, (p, sz) in enumerate(zip(params, sizes)):
        if p.grad is not None:
            if p.grad.is_sparse:
                raise DistributedError(f"parameter {k}: sparse gradients are not supported")
            buf[off:off + sz].copy_(p.grad.detach().reshape(-1))
            buf[n + k] = 1
        off += sz
    ctx.all_reduce_sum(buf)
    if scale is not None:
        buf[:n].mul_(scale)
    tail = buf[n:].to("cpu")
    present = tail[:len(params)]
    off = 0
    for k, (p, sz) in enumerate(zip(params, sizes)):
        if present[k] > 0:
            g = buf[off:off + sz].view(p.shape)
            if p.grad is None:
                p.grad = g.to(device=p.device, dtype=p.dtype).clone()
            else:
                p.grad.copy_(g)
        off += sz
    return tail[len(params):].to(torch.float64) if n_extra else None
