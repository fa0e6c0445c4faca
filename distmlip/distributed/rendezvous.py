"""How the ranks of a job find each other and their devices: MPI world, device choice, TCPStore
rendezvous and the torch process group.

Why a module of its own: this is the part that runs once per process and talks to the outside
(mpi4py, sockets, CUDA), with the failure modes that go with it (ports, interfaces, GPU binding,
a rank failing while the others wait).  Keeping it apart from the context lets the collectives be
read without the start-up, and lets convert/augment use MPI without any of the torch part.

Order of preference (decided by ``context.init_distributed``):

1. Launched by an MPI starter (``mpirun``/``mpiexec``/``srun``, see ``launch``) with mpi4py
   usable: :func:`init_mpi` takes rank and size from ``MPI.COMM_WORLD`` and the local rank from the
   node-local communicator ``COMM_WORLD.Split_type(COMM_TYPE_SHARED)`` (right however the ranks are
   placed on the nodes).  :func:`connect_mpi` then lets rank 0 open the rendezvous store (a
   ``TCPStore`` on a port chosen by the OS: no race for "free" ports) and broadcast its address and
   port over MPI.  An MPI-only context (convert, augment) stops after :func:`init_mpi`.
2. No mpi4py (``DISTMLIP_USE_MPI4PY=0``, import failure) or torchrun: :func:`init_env` takes
   rank/size/local rank from the launcher's variables and the master address/port from
   MASTER_ADDR/MASTER_PORT or from the job (SLURM node list, job id).

Every step that can fail on one rank first agrees on success with the others (an allgather of
the error), so that no rank is left waiting in a collective.  Environment knobs:
``DISTMLIP_DIST_TIMEOUT`` (seconds, default 300) for the rendezvous and the collectives of a
training step (a frozen rank ends the job after that long);
``DISTMLIP_MASTER_ADDR``/``DISTMLIP_MASTER_PORT`` to override the rendezvous address;
``DISTMLIP_ALLOW_GPU_SHARING=1`` to let several local ranks share a GPU.  See docs/distributed.md.

The functions fill in the fields of the ``DistContext`` they are given (this module does not import
``context``: the context imports it).
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import zlib

import torch

from ..errors import DistmlipError
from ..errors import DistributedError
from ..utils.launch import placement, pmix_without_server, size_source

DEFAULT_TIMEOUT_S = 300.0

# set once a torch process group with more than one rank existed in this process (exit_process)
_PROCESS_GROUP_USED = [False]


def process_group_used() -> bool:
    """True once this process has run a torch process group of more than one rank."""
    return _PROCESS_GROUP_USED[0]


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


# ------------------------------------------------------------------------------------ addresses
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


# --------------------------------------------------------------------------------------- device
def wanted_device(device: str) -> str:
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


def choose_device(device: str, local_rank: int, local_size: int, comm_local) -> torch.device:
    """The device of this rank.  With ``comm_local`` (node-local communicator) every local rank
    takes part in one allgather whatever happens, so an error on one rank cannot leave the
    others waiting."""
    err, want, key, n_gpu = None, "cpu", None, 0
    try:
        want = wanted_device(device)
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


# ----------------------------------------------------------------------------- process group
def _init_process_group(ctx, store) -> None:
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


def _make_store(ctx, is_master_picks_port: bool):
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=ctx.timeout_s)
    if ctx.rank == 0:
        # the server listens on every interface; rank 0's own client connects to master_addr
        store = dist.TCPStore(ctx.master_addr, 0 if is_master_picks_port else ctx.master_port,
                              ctx.world_size, True, timeout=timeout, wait_for_workers=False)
        return store, store.port
    return None, None


# ---------------------------------------------------------------------------------------- MPI
def import_mpi4py() -> bool:
    """Import mpi4py (this is where MPI_Init happens); False, with a note on stderr, if unusable."""
    if pmix_without_server():
        # Open MPI's MPI_Init looks for the PMIx server of PMIX_RANK and, finding none, one task
        # died of a segfault and the other exited 14 with "help file not found" text (sweep 19)
        sys.stderr.write("distmlip: PMIX_RANK is set but no PMIx server address (PMIX_SERVER_URI*) is: "
                         "MPI cannot start here; using the launcher's environment variables\n")
        return False
    try:
        import mpi4py

        mpi4py.rc.recv_mprobe = False  # robust on networks without matched probes
        from mpi4py import MPI  # noqa: F401  (MPI_Init happens here)
        return True
    except (ImportError, RuntimeError) as exc:
        sys.stderr.write(f"distmlip: mpi4py unusable ({exc}); using the launcher's "
                         f"environment variables\n")
        return False


def init_mpi(ctx, device: str) -> bool:
    """Fill ``ctx`` from ``MPI.COMM_WORLD``: rank, size, node-local rank, number of nodes, the
    communicator and the device (agreed on by every rank).  Collective over COMM_WORLD; starts no
    torch process group (see :func:`connect_mpi`).

    Returns False, leaving ``ctx`` untouched, when MPI sees a world of one while the launcher says
    it started several tasks: an MPI that cannot talk to this launcher (``srun`` without a PMI
    plugin this MPI understands, e.g. Open MPI from PyPI under ``srun --mpi=none``) initialises
    each task as a singleton.  Each would then train alone on the whole data set as "rank 0 of
    1", writing the same output, and the log (printed by the launcher's rank 0 only) would not
    say so (sweep 19).  The caller meets through the launcher's variables instead (``init_env``),
    as it does without mpi4py."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    launched = placement()
    if size == 1 and (launched.world_size > 1 or launched.rank != 0):
        sys.stderr.write(f"distmlip: rank {launched.rank}: MPI sees one process but the launcher started "
                         f"{launched.world_size} ({size_source()}): this MPI is not wired to the launcher "
                         f"(srun needs --mpi=pmix or pmi2 for this MPI); meeting through the launcher's "
                         f"environment variables instead\n")
        return False
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    # number of nodes: one leader (local rank 0) per node
    n_nodes = comm.allreduce(1 if local_rank == 0 else 0, op=MPI.SUM)
    ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size = rank, size, local_rank, local_size
    ctx.n_nodes, ctx.launcher, ctx._comm = n_nodes, "mpi", comm
    # Errors in device selection must not leave a peer waiting: agree on success first.
    err = None
    try:
        ctx.device = choose_device(device, local_rank, local_size, local)
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
    return True


def _private_dir() -> str:
    """A folder only this user can enter, in node-local memory where there is some; folders left
    by rank-0 processes of this host that are gone (killed jobs) are removed first."""
    import glob
    import shutil
    import tempfile

    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    for old in glob.glob(os.path.join(base, "distmlip-rendezvous-*")):
        pid = os.path.basename(old).split("-")[2]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(old, ignore_errors=True)
            except PermissionError:
                pass
    return tempfile.mkdtemp(prefix=f"distmlip-rendezvous-{os.getpid()}-", dir=base)   # mode 0700


def _loopback_interface() -> str | None:
    try:
        return next((name for _, name in socket.if_nameindex() if name == "lo" or name.startswith("lo")), None)
    except OSError:
        return None


def remove_rendezvous_dir(ctx) -> None:
    d = getattr(ctx, "_rendezvous_dir", None)
    if d:
        import shutil

        shutil.rmtree(d, ignore_errors=True)
        ctx._rendezvous_dir = None


def connect_mpi(ctx) -> None:
    """Start the torch process group of a context filled by :func:`init_mpi`.  Collective; nothing
    to do for one rank.

    One node: the rendezvous is a FileStore in a folder only this user can enter (its path travels
    over MPI) and gloo's sockets are bound to the loopback interface: nothing of the job listens
    on the network.  Several nodes: rank 0 opens a TCPStore (torch binds it to every interface),
    and every key lives under a random per-job prefix broadcast over MPI, so that another host
    can neither read nor overwrite what the ranks exchange."""
    if ctx.world_size == 1:
        return
    comm, rank, size = ctx._comm, ctx.rank, ctx.world_size
    import secrets

    import torch.distributed as dist

    if ctx.n_nodes == 1 and not os.environ.get("DISTMLIP_MASTER_ADDR"):
        info = None
        if rank == 0:
            try:
                info = (os.path.join(_private_dir(), "store"), None)
            except OSError as exc:
                info = (None, f"rank 0 could not create the rendezvous folder: {exc}")
        path, err = comm.bcast(info, root=0)
        if err:
            raise DistributedError(err)
        lo = _loopback_interface()
        if lo and ctx.device.type == "cpu":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)
        ctx.master_addr, ctx.master_port, ctx.rendezvous = "localhost", None, f"file:{path}"
        if rank == 0:
            # the store serves every later group creation (committees): removed at shutdown
            import atexit

            ctx._rendezvous_dir = os.path.dirname(path)
            atexit.register(remove_rendezvous_dir, ctx)
        _init_process_group(ctx, dist.FileStore(path, size))
        # no rank leaves before every rank has its group: a rank 0 that ended right after its
        # own init (a script that never calls shutdown) removed the folder while rank 1 was still
        # reading the store, and rank 1 failed after the whole store timeout (seen once in 4
        # launches of benchmarks/scale.py's start-up stage)
        comm.Barrier()
        return
    secret = comm.bcast(secrets.token_hex(16) if rank == 0 else None, root=0)
    store = port = None
    if rank == 0:
        addr = os.environ.get("DISTMLIP_MASTER_ADDR") or ("127.0.0.1" if ctx.n_nodes == 1 else _routable_ip())
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
        store = dist.TCPStore(addr, int(port), size, False,
                              timeout=datetime.timedelta(seconds=ctx.timeout_s))
    ctx.rendezvous = f"tcp:{addr}:{port} (keys under a per-job secret prefix)"
    _init_process_group(ctx, dist.PrefixStore(f"distmlip/{secret}/", store))


# --------------------------------------------------------------------------------- environment
def init_env(ctx, device: str) -> None:
    """No mpi4py: fill ``ctx`` from the launcher's environment (``launch.placement``) and start the
    torch process group with the rendezvous at MASTER_ADDR:PORT (the group then also carries the
    object collectives and the stop flag)."""
    env = os.environ
    where = placement(strict=True)
    rank, size = where.rank, where.world_size
    local_rank, local_size = where.local_rank, where.local_world_size
    single_node = local_size >= size
    ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size = rank, size, local_rank, local_size
    ctx.n_nodes = 1 if single_node else max(1, -(-size // max(local_size, 1)))
    ctx.launcher = "torchrun" if where.launcher == "torchrun" else "mpi-env"
    ctx.device = choose_device(device, local_rank, local_size, None)
    ctx.is_distributed = size > 1
    if size == 1:
        return
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

    # torch's own errors here ("wait timeout after 10000ms, keys: /0//cpu//0/1", "The client
    # socket has timed out ...") came as tracebacks that named neither the missing rank nor why
    # it was expected (sweep 19): a task that never came, a launcher variable that says more
    # tasks than were started, or a port taken by another job on the node.
    timeout = datetime.timedelta(seconds=ctx.timeout_s)
    at, expected = f"{addr}:{ctx.master_port}", f"{size} ranks expected from {size_source()}"
    # under torchrun the agent already serves the store at MASTER_PORT: rank 0 is a client too
    # (a server of its own failed to bind, and torch printed that as an error before going on)
    agent_store = where.launcher == "torchrun" and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    try:
        if rank == 0 and not agent_store:
            store = dist.TCPStore(addr, ctx.master_port, size, True, timeout=timeout, wait_for_workers=False)
        else:
            store = dist.TCPStore(addr, ctx.master_port, size, False, timeout=timeout)
    except (RuntimeError, OSError) as exc:
        if rank == 0:
            raise DistributedError(
                f"rank 0 ({ctx.hostname}) could not open the rendezvous at {at} ({_first_line(exc)}): "
                f"the port is taken, e.g. by another job on this node; give this job its own "
                f"MASTER_PORT (or DISTMLIP_MASTER_PORT)") from None
        raise DistributedError(
            f"rank {rank} ({ctx.hostname}): no rendezvous with rank 0 at {at} within {ctx.timeout_s:.0f} s "
            f"(DISTMLIP_DIST_TIMEOUT; {expected}): rank 0 was not started, failed before opening "
            f"it, or listens elsewhere ({_first_line(exc)})") from None
    # the keys live under the job's identity: a rank of another job that reaches this port (two
    # jobs given the same MASTER_PORT) waits for its own partners instead of joining this group
    store = dist.PrefixStore(f"distmlip/{_job_identity(size)}/", store)
    # A job whose identity is the same (two steps of one Slurm job whose step ids were not passed
    # on) would join the running one: one rank more than the job's size counts itself in here.
    # Its rank 1 ended after the timeout with gloo's "Connection reset by peer ... GLHF!" (sweep 19).
    if store.add("joined", 1) > size:
        raise DistributedError(
            f"rank {rank} ({ctx.hostname}): the rendezvous at {at} already has its {size} ranks: it belongs to "
            f"another job of the same identity (the same job and step ids, or the same MASTER_PORT) on this "
            f"node; give each job its own MASTER_PORT (or DISTMLIP_MASTER_PORT)")
    try:
        _init_process_group(ctx, store)
    except RuntimeError as exc:
        text = str(exc).lower()
        if "timeout" not in text and "timed out" not in text:
            raise
        raise DistributedError(
            f"rank {rank} ({ctx.hostname}): not every rank joined the rendezvous at {at} within "
            f"{ctx.timeout_s:.0f} s (DISTMLIP_DIST_TIMEOUT; {expected}): the launcher started fewer "
            f"processes than its variables say, or one failed at start-up ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _job_identity(size: int) -> str:
    """What the launcher says about this job (job and step ids, the PMIx namespace, the size): a
    job started without MPI has no channel for a random secret, but two jobs whose identities
    differ never read each other's keys even where they reach one store."""
    env = os.environ
    keys = ("SLURM_JOB_ID", "SLURM_STEP_ID", "PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid", "PBS_JOBID",
            "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")   # torchrun keeps its store over restarts
    return f"{zlib.crc32('|'.join(env.get(k, '') for k in keys).encode()):08x}-{size}"
