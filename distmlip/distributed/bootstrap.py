"""MPI bootstrap of torch.distributed, collectives, stop signals and fail-fast error handling.

How a process finds its place in the job (first match wins):

1. Launched by an MPI starter (``mpirun``/``mpiexec``/``srun``): detected from environment
   variables *before* mpi4py is imported, so that a plain single process never initialises MPI.
   Rank and world size come from ``MPI.COMM_WORLD``; the local rank is the rank inside the
   node-local communicator ``COMM_WORLD.Split_type(COMM_TYPE_SHARED)``.  Rank 0 opens the
   rendezvous store (a ``TCPStore`` on a free port chosen by the OS) and broadcasts its address
   and port over MPI.  If mpi4py cannot be used (``DISTMLIP_USE_MPI4PY=0`` or import failure),
   rank/size/local rank are read from the OMPI_/PMI_/PMIX_/SLURM_ variables and the master
   address/port from MASTER_ADDR/MASTER_PORT or derived from the job (SLURM node list, job id).
2. torchrun-style environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).
3. Otherwise: one process, no process group, all collectives are no-ops.

Environment knobs: ``DISTMLIP_DIST_TIMEOUT`` (seconds, default 1800) for the rendezvous and
collectives; ``DISTMLIP_MASTER_ADDR``/``DISTMLIP_MASTER_PORT`` to override the rendezvous
address; ``DISTMLIP_ALLOW_GPU_SHARING=1`` to let several local ranks share a GPU;
``DISTMLIP_USE_MPI4PY=0`` to skip mpi4py; ``DISTMLIP_STOP_FILE`` a path whose existence
requests a stop like SIGUSR1 does.  See docs/distributed.md.
"""
from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import threading
import traceback
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch

from ..errors import DistmlipError

# Variables set by MPI launchers for every process they start.  SLURM_NTASKS alone is not used:
# it is also set inside a batch script that runs python without srun.
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE",
                  "MPI_LOCALNRANKS", "SLURM_STEP_NUM_TASKS")
_MPI_MARKER_VARS = _MPI_SIZE_VARS + ("PMIX_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK")
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID")
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE",
              "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK",
                    "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK")
_LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE",
                    "MV2_COMM_WORLD_LOCAL_SIZE", "SLURM_STEP_TASKS_PER_NODE", "LOCAL_WORLD_SIZE")

DEFAULT_TIMEOUT_S = 1800.0

_CTX: Optional["DistContext"] = None
_LOCK = threading.Lock()
# local stop state: set by the signal handlers (or a stop file), reduced by stop_requested()
_STOP = {"flag": False, "signal": 0, "count": 0}


class DistributedError(DistmlipError):
    """The parallel environment is inconsistent (e.g. more local ranks than GPUs)."""


# ----------------------------------------------------------------------------------- detection
def _env_int(names: Iterable[str], default: Optional[int] = None) -> Optional[int]:
    for n in names:
        v = os.environ.get(n)
        if v is None or v == "":
            continue
        try:
            # SLURM_STEP_TASKS_PER_NODE may read "4(x2)" or "4,3": the first figure is ours or
            # at least an upper bound; only used when MPI is not available.
            return int(v.split("(")[0].split(",")[0])
        except ValueError:
            continue
    return default


def detect_launcher(environ=None) -> str:
    """'mpi' when started by an MPI launcher, 'torchrun' for RANK/WORLD_SIZE env, else 'none'."""
    env = os.environ if environ is None else environ
    if any(env.get(v) for v in _MPI_MARKER_VARS):
        return "mpi"
    if env.get("RANK") is not None and env.get("WORLD_SIZE") is not None:
        return "torchrun"
    return "none"


def timeout_seconds() -> float:
    v = os.environ.get("DISTMLIP_DIST_TIMEOUT", "")
    if not v:
        return DEFAULT_TIMEOUT_S
    try:
        t = float(v)
    except ValueError:
        raise DistributedError(f"DISTMLIP_DIST_TIMEOUT={v!r}: expected a number of seconds") from None
    if t <= 0:
        raise DistributedError(f"DISTMLIP_DIST_TIMEOUT={v!r}: must be > 0 seconds")
    return t


def _expand_first_host(nodelist: str) -> str:
    """First host name of a SLURM node list such as 'cn[012-015,020],gpu7' -> 'cn012'."""
    nodelist = nodelist.strip()
    head = ""
    depth = 0
    for ch in nodelist:
        if ch == "," and depth == 0:
            break
        depth += ch == "["
        depth -= ch == "]"
        head += ch
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    first = rest.split("]", 1)[0].split(",")[0].split("-")[0]
    return prefix + first


def _routable_ip() -> str:
    """An address of this host that other nodes can reach (not loopback) or the host name."""
    host = socket.gethostname()
    try:
        ip = socket.gethostbyname(socket.getfqdn())
        if not ip.startswith("127."):
            return ip
    except OSError:
        pass
    try:  # the interface of the default route; a UDP connect sends no packet
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.254.254.254", 1))
            ip = s.getsockname()[0]
            if not ip.startswith("127.") and ip != "0.0.0.0":
                return ip
    except OSError:
        pass
    return host


def _job_port(*keys: str) -> int:
    """Deterministic port in [20000, 50000) from job identifiers (no MPI to broadcast one)."""
    s = "|".join(k for k in keys if k)
    return 20000 + zlib.crc32(s.encode()) % 30000


# ------------------------------------------------------------------------------------ context
@dataclass
class DistContext:
    """Where this process stands in the job, and the collectives the stages use.

    All collectives must be called by every rank in the same order.  With ``world_size == 1`` they
    return immediately (the tensors are left unchanged).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    is_distributed: bool = False
    local_world_size: int = 1
    n_nodes: int = 1
    backend: Optional[str] = None          # "gloo" | "nccl" | None
    launcher: str = "none"                 # "mpi" | "mpi-env" | "torchrun" | "none"
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    hostname: str = field(default_factory=socket.gethostname)
    timeout_s: float = DEFAULT_TIMEOUT_S
    _comm: Any = field(default=None, repr=False)       # mpi4py COMM_WORLD or None
    _cpu_group: Any = field(default=None, repr=False)  # gloo group for CPU tensors under NCCL
    _stop_reason: Optional[str] = field(default=None, repr=False)

    # -- tensors ----------------------------------------------------------------------------
    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        if self.world_size == 1:
            return t
        import torch.distributed as dist

        if self.backend == "nccl" and t.device.type != "cuda":
            if self._cpu_group is not None:
                dist.all_reduce(t, op=op, group=self._cpu_group)
                return t
            tmp = t.to(self.device)
            dist.all_reduce(tmp, op=op)
            t.copy_(tmp)
            return t
        if t.dtype == torch.bool:
            tmp = t.to(torch.int32)
            dist.all_reduce(tmp, op=op)
            t.copy_(tmp.bool())
            return t
        dist.all_reduce(t, op=op)
        return t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns ``t``.  Use float64 for energies and counts."""
        import torch.distributed as dist

        return self._reduce(t, dist.ReduceOp.SUM) if self.world_size > 1 else t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        return self._reduce(t, dist.ReduceOp.MAX) if self.world_size > 1 else t

    def all_reduce_min(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        return self._reduce(t, dist.ReduceOp.MIN) if self.world_size > 1 else t

    # -- python objects ---------------------------------------------------------------------
    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s (picklable) object on every rank."""
        if self.world_size == 1:
            return obj
        if self._comm is not None:
            return self._comm.bcast(obj, root=src)
        import torch.distributed as dist

        lst = [obj]
        dist.broadcast_object_list(lst, src=src, group=self._cpu_group)
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

    def barrier(self) -> None:
        if self.world_size == 1:
            return
        if self._comm is not None:
            self._comm.Barrier()
            return
        import torch.distributed as dist

        dist.barrier(group=self._cpu_group)

    # -- stop / abort -----------------------------------------------------------------------
    def stop_requested(self) -> bool:
        """True on every rank if any rank received SIGTERM/SIGUSR1 (or the stop file exists).

        Collective (one tiny all-reduce): call it at the same point on every rank, e.g. at each
        step boundary.  The reason is available afterwards from ``stop_reason()``.
        """
        local = _local_stop_code(self.rank)
        code = local
        if self.world_size > 1:
            if self._comm is not None:
                import numpy as np
                from mpi4py import MPI

                buf = np.array([local], dtype=np.int64)
                out = np.zeros(1, dtype=np.int64)
                self._comm.Allreduce(buf, out, op=MPI.MAX)
                code = int(out[0])
            else:
                t = torch.tensor([local], dtype=torch.int64)
                self._reduce(t, _max_op())
                code = int(t.item())
        if code and self._stop_reason is None:
            self._stop_reason = _describe_stop(code)
        return bool(code)

    def stop_reason(self) -> Optional[str]:
        """e.g. 'SIGTERM on rank 1' once stop_requested() returned True, else None."""
        return self._stop_reason

    def abort(self, code: int = 1) -> None:
        """End the whole job now (MPI_Abort under MPI; exit of this process otherwise)."""
        _abort(self, code)

    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size} local {self.local_rank}/{self.local_world_size} "
                f"on {self.hostname} ({self.n_nodes} node(s)), device {self.device}, "
                f"backend {self.backend or 'none'}, launcher {self.launcher}")


def _max_op():
    import torch.distributed as dist

    return dist.ReduceOp.MAX


# encoding of the stop flag: 1000 * (rank + 1) + signal number, max over ranks is one of them
_STOP_FILE_PERIOD_S = 5.0
_last_stop_file_check = [float("-inf")]


def _local_stop_code(rank: int) -> int:
    stop_file = os.environ.get("DISTMLIP_STOP_FILE")
    # only rank 0 looks, at most every few seconds: no metadata storm on a parallel file system
    if not _STOP["flag"] and stop_file and rank == 0:
        import time

        now = time.monotonic()
        if now - _last_stop_file_check[0] >= _STOP_FILE_PERIOD_S:
            _last_stop_file_check[0] = now
            if os.path.exists(stop_file):
                _STOP["flag"] = True
                _STOP["signal"] = 999
    if not _STOP["flag"]:
        return 0
    return 1000 * (rank + 1) + int(_STOP["signal"] or 0) % 1000


def _describe_stop(code: int) -> str:
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


# ---------------------------------------------------------------------------------- bootstrap
def _wanted_device(device: str) -> str:
    """'cpu', 'cuda' or 'cuda:N' from the user's choice; raises if CUDA is asked for but absent."""
    want = (device or "auto").lower()
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cpu"):
        return "cpu"
    if not want.startswith("cuda"):
        raise DistributedError(f"device {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise DistributedError(f"device {device!r} requested but CUDA is not available on "
                               f"{socket.gethostname()} (torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
                               f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return want


def _visible_gpus_key(n_gpu: int) -> str:
    """Identity of the GPU set this process sees: UUIDs (right even when every task sees its own
    GPU as "0"), else CUDA_VISIBLE_DEVICES."""
    try:
        return "|".join(str(torch.cuda.get_device_properties(i).uuid) for i in range(n_gpu))
    except Exception:
        return os.environ.get("CUDA_VISIBLE_DEVICES", "<all>")


def _choose_device(device: str, local_rank: int, local_size: int, comm_local) -> torch.device:
    """The device of this rank.  With ``comm_local`` (node-local communicator) every local rank
    takes part in one allgather whatever happens, so an error on one rank cannot leave the
    others waiting."""
    err, want, key, n_gpu = None, "cpu", None, 0
    try:
        want = _wanted_device(device)
        if want == "cuda":
            n_gpu = torch.cuda.device_count()
            key = _visible_gpus_key(n_gpu)
    except DistributedError as exc:
        err = exc
    keys = comm_local.allgather(key) if comm_local is not None else None
    if err is not None:
        raise err
    if want == "cpu":
        return torch.device("cpu")
    if want != "cuda":  # explicit cuda:N: the user knows best
        dev = torch.device(want)
        torch.cuda.set_device(dev)
        return dev
    # Ranks on this node that see the same set of GPUs share them; a launcher that binds one GPU
    # per task (srun --gpus-per-task=1 / --gpu-bind) gives each task its own set.
    if keys is not None:
        same = [r for r, k in enumerate(keys) if k == key]
        index, sharing = same.index(comm_local.Get_rank()), len(same)
    else:
        index, sharing = local_rank, local_size
    if sharing > n_gpu:
        if os.environ.get("DISTMLIP_ALLOW_GPU_SHARING", "0").lower() not in ("1", "true", "yes"):
            raise DistributedError(
                f"{sharing} ranks on node {socket.gethostname()} share {n_gpu} visible GPU(s) "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): start one rank "
                f"per GPU (e.g. srun --ntasks-per-node=<GPUs> --gpus-per-task=1, or mpirun with "
                f"<GPUs> ranks per node), use --device cpu, or set DISTMLIP_ALLOW_GPU_SHARING=1 to "
                f"place several ranks on one GPU")
        index = index % n_gpu
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


# set once a torch process group existed in this process (see exit_process)
_PROCESS_GROUP_USED = [False]


def exit_process(code: int) -> None:
    """End a process that ran a torch process group: flush, finalise MPI, and leave without the
    interpreter's finalisation.  Gloo's worker threads can still release tensors while Python
    shuts down, which aborts the process (SIGABRT) after all work is done; skipping finalisation
    avoids that race.  Returns normally when no process group was used."""
    if not _PROCESS_GROUP_USED[0]:
        return
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    if "mpi4py.MPI" in sys.modules:
        MPI = sys.modules["mpi4py.MPI"]
        try:
            if MPI.Is_initialized() and not MPI.Is_finalized():
                MPI.Finalize()
        except Exception:  # pragma: no cover - best effort at exit
            pass
    os._exit(code)


def _init_process_group(ctx: DistContext, store) -> None:
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=ctx.timeout_s)
    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    if backend == "nccl" and not dist.is_nccl_available():
        raise DistributedError("CUDA device selected but this torch has no NCCL; use --device cpu")
    dist.init_process_group(backend=backend, store=store, rank=ctx.rank,
                            world_size=ctx.world_size, timeout=timeout)
    ctx.backend = backend
    _PROCESS_GROUP_USED[0] = _PROCESS_GROUP_USED[0] or ctx.world_size > 1
    if backend == "nccl" and ctx._comm is None and dist.is_gloo_available():
        # CPU-side coordination (stop flags, objects) without MPI: a gloo group beside NCCL
        ctx._cpu_group = dist.new_group(backend="gloo", timeout=timeout)


def _make_store(ctx: DistContext, is_master_picks_port: bool):
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=ctx.timeout_s)
    if ctx.rank == 0:
        # the server listens on every interface; rank 0's own client connects to master_addr
        store = dist.TCPStore(ctx.master_addr, 0 if is_master_picks_port else ctx.master_port,
                              ctx.world_size, True, timeout=timeout, wait_for_workers=False)
        return store, store.port
    return None, None


def _bootstrap_mpi(device: str) -> DistContext:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    # number of nodes: one leader (local rank 0) per node
    n_nodes = comm.allreduce(1 if local_rank == 0 else 0, op=MPI.SUM)
    ctx = DistContext(rank=rank, world_size=size, local_rank=local_rank, local_world_size=local_size,
                      n_nodes=n_nodes, launcher="mpi", timeout_s=timeout_seconds(), _comm=comm)
    # Errors in device selection must not leave a peer waiting: agree on success first.
    err = None
    try:
        ctx.device = _choose_device(device, local_rank, local_size, local)
    except DistmlipError as exc:
        err = f"rank {rank} ({ctx.hostname}): {exc}"
    local.Free()
    gathered = comm.allgather((err, str(ctx.device.type)))
    errs = [e for e, _ in gathered if e]
    if errs:
        raise DistributedError(err if err is not None else errs[0])
    kinds = sorted({k for _, k in gathered})
    if len(kinds) > 1:
        raise DistributedError(f"ranks disagree on the device type ({', '.join(kinds)}): some nodes "
                               f"have no usable GPU; choose --device cpu or cuda explicitly")
    ctx.is_distributed = size > 1
    if size == 1:
        return ctx
    store = port = None
    if rank == 0:
        addr = os.environ.get("DISTMLIP_MASTER_ADDR") or ("127.0.0.1" if n_nodes == 1 else _routable_ip())
        ctx.master_addr = addr
        fixed = os.environ.get("DISTMLIP_MASTER_PORT")
        if fixed:
            ctx.master_port = int(fixed)
        try:
            store, port = _make_store(ctx, is_master_picks_port=not fixed)
            info = (addr, port, None)
        except Exception as exc:  # tell the others instead of leaving them waiting
            info = (addr, None, f"rank 0 ({ctx.hostname}) could not open the rendezvous store on "
                                f"{addr}: {exc}")
    else:
        info = None
    addr, port, err = comm.bcast(info, root=0)
    if err:
        raise DistributedError(err)
    ctx.master_addr, ctx.master_port = addr, int(port)
    if rank != 0:
        import torch.distributed as dist

        store = dist.TCPStore(addr, int(port), size, False,
                              timeout=datetime.timedelta(seconds=ctx.timeout_s))
    _init_process_group(ctx, store)
    return ctx


def _bootstrap_env(device: str, launcher: str) -> DistContext:
    """No mpi4py: rank/size from the launcher's environment, rendezvous at MASTER_ADDR:PORT."""
    env = os.environ
    if launcher == "torchrun":
        rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", "0"))
        local_size = int(env.get("LOCAL_WORLD_SIZE", str(size)))
    else:
        rank, size = _env_int(_RANK_VARS), _env_int(_SIZE_VARS)
        if rank is None or size is None:
            raise DistributedError("started by an MPI launcher but neither mpi4py nor the rank/size "
                                   "environment variables (OMPI_COMM_WORLD_RANK, PMI_RANK, "
                                   "SLURM_PROCID, ...) are usable")
        local_rank = _env_int(_LOCAL_RANK_VARS, 0)
        local_size = _env_int(_LOCAL_SIZE_VARS, size)
    single_node = local_size >= size
    ctx = DistContext(rank=rank, world_size=size, local_rank=local_rank, local_world_size=local_size,
                      n_nodes=1 if single_node else max(1, -(-size // max(local_size, 1))),
                      launcher="torchrun" if launcher == "torchrun" else "mpi-env",
                      timeout_s=timeout_seconds())
    ctx.device = _choose_device(device, local_rank, local_size, None)
    ctx.is_distributed = size > 1
    if size == 1:
        return ctx
    addr = env.get("DISTMLIP_MASTER_ADDR") or env.get("MASTER_ADDR")
    if not addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if single_node:
            addr = "127.0.0.1"
        elif nodelist:
            addr = _expand_first_host(nodelist)
        else:
            raise DistributedError("multi-node job without mpi4py: set MASTER_ADDR (and MASTER_PORT) "
                                   "to rank 0's host, or make mpi4py importable")
    port = env.get("DISTMLIP_MASTER_PORT") or env.get("MASTER_PORT")
    if not port:
        port = _job_port(env.get("SLURM_JOB_ID", ""), env.get("SLURM_STEP_ID", ""),
                         env.get("PMIX_NAMESPACE", ""), env.get("OMPI_MCA_ess_base_jobid", ""),
                         env.get("PBS_JOBID", ""))
    ctx.master_addr, ctx.master_port = addr, int(port)
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=ctx.timeout_s)
    if rank == 0:
        store = dist.TCPStore(addr, ctx.master_port, size, True, timeout=timeout, wait_for_workers=False)
    else:
        store = dist.TCPStore(addr, ctx.master_port, size, False, timeout=timeout)
    _init_process_group(ctx, store)
    return ctx


def init_distributed(device: str = "auto") -> DistContext:
    """Set up (once) and return this process's DistContext.  Idempotent: later calls return the
    same context whatever ``device`` they pass.  ``device``: 'auto' (CUDA if available), 'cpu',
    'cuda' or 'cuda:N'."""
    global _CTX
    with _LOCK:
        if _CTX is not None:
            return _CTX
        launcher = detect_launcher()
        if launcher == "mpi" and os.environ.get("DISTMLIP_USE_MPI4PY", "1") not in ("0", "false", "no"):
            try:
                import mpi4py

                mpi4py.rc.recv_mprobe = False  # robust on networks without matched probes
                from mpi4py import MPI  # noqa: F401  (MPI_Init happens here)
                have_mpi4py = True
            except (ImportError, RuntimeError) as exc:
                have_mpi4py = False
                sys.stderr.write(f"distmlip: mpi4py unusable ({exc}); using the launcher's "
                                 f"environment variables\n")
            ctx = _bootstrap_mpi(device) if have_mpi4py else _bootstrap_env(device, "mpi")
        elif launcher in ("mpi", "torchrun"):
            ctx = _bootstrap_env(device, launcher)
        else:
            ctx = DistContext(device=_choose_device(device, 0, 1, None), timeout_s=timeout_seconds())
        _CTX = ctx
        if ctx.world_size > 1:
            _install_excepthook()
        return ctx


def get_context() -> DistContext:
    """The context of init_distributed() (initialising it with device='auto' if needed)."""
    return _CTX if _CTX is not None else init_distributed()


def shutdown() -> None:
    """Tear down the process group (collective: call on every rank at the end)."""
    global _CTX
    with _LOCK:
        ctx, _CTX = _CTX, None
    if ctx is None or ctx.backend is None:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # pragma: no cover - best effort at exit
            pass


# --------------------------------------------------------------------------------- gradients
def allreduce_gradients(parameters, ctx: Optional[DistContext] = None, *, scale: Optional[float] = None
                        ) -> None:
    """Sum the ``.grad`` of ``parameters`` over all ranks with ONE flat all-reduce (SUM).

    Gradients are packed into one buffer (their common dtype, float64 when they differ), together
    with one presence flag per parameter.  A parameter whose grad is None on some ranks counts as
    zeros there, and gets the summed grad on every rank; a parameter without grad on every rank
    keeps ``grad = None`` (as in a single-process run, the optimizer then skips it).
    ``scale`` (optional) multiplies the sums, e.g. 1/global_count.  No-op for world_size 1 apart
    from ``scale``.
    """
    ctx = ctx or get_context()
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    if ctx.world_size == 1:
        if scale is not None:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        return
    dtypes = {p.dtype for p in params}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float64
    if not dtype.is_floating_point:
        dtype = torch.float64
    dev = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    sizes = [p.numel() for p in params]
    n = sum(sizes)
    buf = torch.zeros(n + len(params), dtype=dtype, device=dev)
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
    present = buf[n:].to("cpu")
    off = 0
    for k, (p, sz) in enumerate(zip(params, sizes)):
        if present[k] > 0:
            g = buf[off:off + sz].view(p.shape)
            if p.grad is None:
                p.grad = g.to(device=p.device, dtype=p.dtype).clone()
            else:
                p.grad.copy_(g)
        off += sz


# -------------------------------------------------------------------------------- partitions
def split_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous block [start, stop) of ``range(n)`` for ``rank``: sizes differ by at most 1."""
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    q, r = divmod(n, world_size)
    start = rank * q + min(rank, r)
    return start, start + q + (1 if rank < r else 0)


def balanced_partition(costs, world_size: int) -> list[list[int]]:
    """Split item indices into ``world_size`` lists with nearly equal summed cost (e.g. atoms).

    Deterministic greedy (largest first to the least loaded, ties by rank); each list is sorted.
    Every rank computing it from the same ``costs`` gets the same answer.
    """
    import heapq

    costs = [float(c) for c in costs]
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    heap = [(0.0, r) for r in range(world_size)]
    parts: list[list[int]] = [[] for _ in range(world_size)]
    for i in order:
        load, r = heapq.heappop(heap)
        parts[r].append(i)
        heapq.heappush(heap, (load + costs[i], r))
    return [sorted(p) for p in parts]


# ------------------------------------------------------------------------------ signals / abort
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
            sys.stderr.write(f"distmlip: {name} received on rank {_rank_guess()}: stopping at the "
                             f"next step boundary\n")
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
    _STOP.update(flag=False, signal=0, count=0)
    _last_stop_file_check[0] = float("-inf")
    if _CTX is not None:
        _CTX._stop_reason = None


def request_stop(signum: int = 0) -> None:
    """Set the local stop flag from code (same effect as a signal)."""
    _STOP["flag"] = True
    _STOP["signal"] = int(signum)


def _rank_guess() -> int:
    if _CTX is not None:
        return _CTX.rank
    return _env_int(_RANK_VARS + ("RANK",), 0)


def _abort(ctx: Optional[DistContext], code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    comm = ctx._comm if ctx is not None else None
    if comm is None and "mpi4py.MPI" in sys.modules:
        MPI = sys.modules["mpi4py.MPI"]
        try:
            if MPI.Is_initialized() and not MPI.Is_finalized():
                comm = MPI.COMM_WORLD
        except Exception:
            comm = None
    if comm is not None and comm.Get_size() > 1:
        comm.Abort(code)
    # torchrun / srun --kill-on-bad-exit / mpirun without mpi4py end the job when a rank exits
    # non-zero; os._exit skips atexit handlers that could block in a collective.
    os._exit(code)


# public names for group-aware contexts (committee rank groups) that run their own stop check
local_stop_code = _local_stop_code
describe_stop = _describe_stop


def report_error(exc: BaseException, ctx: Optional[DistContext] = None) -> str:
    """Format an exception with the rank and host, print it to stderr and return the text."""
    ctx = ctx or _CTX
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
        ctx = _CTX
        if ctx is None or ctx.world_size == 1:
            raise
        report_error(exc, ctx)
        _abort(ctx, exc.code if isinstance(exc.code, int) else exit_code)
    except BaseException as exc:
        ctx = _CTX
        if ctx is None or ctx.world_size == 1:
            raise
        report_error(exc, ctx)
        code = 2 if isinstance(exc, DistmlipError) else (130 if isinstance(exc, KeyboardInterrupt)
                                                          else exit_code)
        _abort(ctx, code)


_PREV_HOOK = None


def _excepthook(tp, value, tb):
    ctx = _CTX
    if ctx is None or ctx.world_size == 1 or issubclass(tp, SystemExit):
        (_PREV_HOOK or sys.__excepthook__)(tp, value, tb)
        return
    report_error(value, ctx)
    _abort(ctx, 1)


def _install_excepthook() -> None:
    """An uncaught exception on one rank aborts the job (else mpi4py's MPI_Finalize at exit or a
    peer's collective would wait forever)."""
    global _PREV_HOOK
    if sys.excepthook is not _excepthook:
        _PREV_HOOK = sys.excepthook
        sys.excepthook = _excepthook
