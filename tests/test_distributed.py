"""Distributed runtime in one process: no MPI initialised, collectives are no-ops (also in the
MPI-only context of convert/augment), stop flags, launcher detection and placement, partition
helpers, the layer's import layering (the multi-rank tests are in test_mpi_distributed.py)."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from helpers import REPO
from distmlip.distributed import context as C, partition as P, rendezvous as R, signals as S
from distmlip.utils import launch as L

SCRIPT = REPO / "tests" / "mpi_scripts" / "dist_check.py"
MPI_ONLY = REPO / "tests" / "mpi_scripts" / "mpi_only_check.py"
_LAUNCH_VARS = [k for k in os.environ if k.startswith(("OMPI_", "PMI", "PMIX_", "SLURM_", "MV2_"))] + \
    ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def results(text):
    return sorted((json.loads(l[7:]) for l in text.splitlines() if l.startswith("RESULT ")),
                  key=lambda r: r["rank"])


def test_single_process_without_mpirun():
    res = subprocess.run([sys.executable, str(SCRIPT), "info"], capture_output=True, text=True,
                         env=clean_env(), timeout=120)
    assert res.returncode == 0, res.stderr
    (r,) = results(res.stdout)
    assert (r["rank"], r["world"], r["local_rank"], r["is_distributed"]) == (0, 1, 0, False)
    assert r["backend"] is None and r["launcher"] == "none"
    assert r["mpi_loaded"] is False          # a plain process never initialises MPI
    assert r["sum_exact"] and r["max"] == [-1.0, -0.0]
    assert r["bcast"] == {"from": 0, "arr": [1, 2, 3]} and r["gathered"] == [0]
    assert r["stop"] is False


def test_single_process_mpi_only_context_without_mpirun():
    """convert/augment's context alone: a world of one, every collective a no-op, mpi4py never
    imported, split(1) a group of one with its own stop check."""
    res = subprocess.run([sys.executable, str(MPI_ONLY)], capture_output=True, text=True,
                         env=clean_env(), timeout=120)
    assert res.returncode == 0, res.stderr
    (r,) = results(res.stdout)
    assert (r["rank"], r["world"], r["backend"], r["launcher"], r["pg_initialised"]) == (0, 1, None, "none", False)
    assert (r["env_launcher"], r["env_rank"], r["env_world"]) == ("none", 0, 1)
    assert r["mpi_loaded"] is False and r["mpi_loaded_end"] is False
    assert r["bcast"] == {"from": 0, "list": [0, 0, 0]} and r["gathered"] == [0]
    assert r["tensor_error"] is None and r["wait_wall"] < 0.5
    assert (r["group"], r["group_rank"], r["group_world"], r["group_job_ranks"], r["group_gathered"]) == \
        (0, 0, 1, [0], [0])
    assert (r["group_stop"], r["group_reason"]) == (True, "SIGUSR1 on rank 0")
    assert (r["world_stop"], r["world_reason"]) == (True, "SIGUSR1 on rank 0")
    assert (r["same_object"], r["upgraded_sum"], r["upgraded_backend"]) == (True, 1.0, None)
    assert [l for l in res.stdout.splitlines() if l.startswith("LOG")] == ["LOG 0"]


def test_a_later_device_request_is_honoured_or_refused_never_ignored():
    """A process that made its context on the CPU and then asks for another device (a script or
    notebook training twice; benchmarks/epoch.py --devices cpu,cuda) used to get the CPU context
    back silently: its `training.device: cuda` run trained on the CPU.  Alone in its job the
    process moves (here, without CUDA, that is the clear CUDA error); 'auto' and the same device
    keep the context."""
    code = """
import torch
from distmlip.distributed import context as C
from distmlip.errors import DistributedError
c = C.init_distributed("cpu")
assert C.init_distributed("auto") is c and C.init_distributed("cpu").device.type == "cpu"
try:
    C.init_distributed("cuda")
    moved = True
except DistributedError as e:
    moved = False
    assert not torch.cuda.is_available() and "CUDA is not available" in str(e), e
assert moved == torch.cuda.is_available()
if moved:
    assert C.init_distributed("cuda").device.type == "cuda"
    assert C.init_distributed("cpu").device.type == "cpu"
print("OK")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "OK", res.stderr


def test_leave_process_keeps_what_finalisation_would_have_saved(tmp_path):
    """launch.leave_process ends the program without CPython's finalisation (0.7-0.8 s with torch
    imported), so it must itself flush what a normal exit would: a Python file left open with
    buffered text, an HDF5 file left open for writing, atexit handlers, a non-daemon thread's
    last write; and the exit code must survive."""
    script = tmp_path / "leave.py"
    script.write_text(f"""
import atexit, threading, time, h5py, numpy as np
import torch.distributed      # its deprecated reduce_op warned when the scan met it (a FutureWarning per command)
from distmlip.utils.launch import leave_process
out = open({str(tmp_path / 'buffered.txt')!r}, "w")
out.write("kept" * 1000)                                   # in the buffer, never flushed
h = h5py.File({str(tmp_path / 'open.h5')!r}, "w")
h["x"] = np.arange(5.0)                                    # never closed
atexit.register(lambda: open({str(tmp_path / 'atexit.txt')!r}, "w").write("ran"))
def late():
    time.sleep(0.3)
    open({str(tmp_path / 'thread.txt')!r}, "w").write("joined")
threading.Thread(target=late).start()
leave_process(7)
raise SystemExit("not reached")
""")
    r = subprocess.run([sys.executable, "-W", "error::FutureWarning", str(script)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 7 and "Warning" not in r.stderr, r.stderr
    assert (tmp_path / "buffered.txt").read_text() == "kept" * 1000
    import h5py
    with h5py.File(tmp_path / "open.h5", "r") as h:
        assert h["x"][:].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert (tmp_path / "thread.txt").read_text() == "joined"
    # the program itself: a clean error keeps its exit status and message
    r = subprocess.run([sys.executable, "-m", "distmlip.cli", "info", str(tmp_path / "missing.h5")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "missing.h5" in r.stderr, (r.returncode, r.stderr)


def test_placement_from_environment():
    """launch.placement: the one reader of the launchers' variables (logging, error messages)."""
    assert L.placement({}) == ("none", 0, 1, 0, 1)
    assert L.placement({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}) == ("none", 0, 1, 0, 1)  # batch script
    # a batch script is task 0: task 2 is a task of an srun step whose step variables did not
    # come through (a wrapper or container passing on some variables); it ran alone (sweep 19)
    assert L.placement({"SLURM_NTASKS": "4", "SLURM_PROCID": "2"}) == ("mpi", 2, 4, 2, 4)
    assert L.placement({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "cn1"}) == ("mpi", 0, 2, 0, 2)
    with pytest.raises(L.DistributedError, match="disagree: rank 2 in a job of 2"):   # a task too many
        L.placement({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "2"}, strict=True)
    with pytest.raises(L.DistributedError, match="disagree: RANK=2"):
        L.placement({"RANK": "2", "WORLD_SIZE": "2"}, strict=True)
    assert L.placement({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3",
                        "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}) == ("mpi", 3, 4, 1, 2)
    assert L.placement({"SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
                        "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}) == ("mpi", 5, 8, 1, 4)
    # no local-rank variable, every rank on this node: the local rank is the rank (all were local
    # rank 0, so every rank of a GPU node took GPU 0); with a local size below the job's, unknown
    assert L.placement({"PMI_SIZE": "3", "PMI_RANK": "2"}) == ("mpi", 2, 3, 2, 3)
    assert L.placement({"PMIX_RANK": "1", "PMIX_SIZE": "2"})[3] == 1
    assert L.placement({"PMI_SIZE": "4", "PMI_RANK": "3", "PMI_LOCAL_SIZE": "2"}) == ("mpi", 3, 4, 0, 2)
    assert L.placement({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == ("torchrun", 1, 2, 1, 2)
    assert L.placement({"MPI_LOCALNRANKS": "2"}) == ("mpi", 0, 1, 0, 1)   # marker without a rank
    with pytest.raises(L.DistributedError, match="rank/size"):
        L.placement({"MPI_LOCALNRANKS": "2"}, strict=True)


def test_single_process_second_sigterm_exits_at_once(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "stop", str(tmp_path), "2", "twice"],
                         capture_output=True, text=True, env=clean_env(), timeout=120)
    assert res.returncode == -signal.SIGTERM, (res.returncode, res.stdout, res.stderr)
    assert "RESULT" not in res.stdout
    assert "second SIGTERM" in res.stderr


def test_detect_launcher():
    assert L.detect_launcher({}) == "none"
    assert L.detect_launcher({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}) == "none"  # batch script
    assert L.detect_launcher({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "1"}) == "mpi"  # srun
    assert L.detect_launcher({"OMPI_COMM_WORLD_SIZE": "2"}) == "mpi"
    assert L.detect_launcher({"PMI_SIZE": "2", "PMI_RANK": "1"}) == "mpi"
    assert L.detect_launcher({"PMIX_RANK": "0"}) == "mpi"
    # srun's step variables without SLURM_STEP_NUM_TASKS, or a task number only a step has
    for step in ({"SLURM_STEP_ID": "0"}, {"SLURM_STEPID": "3"}, {"SLURM_STEP_NODELIST": "cn[1-2]"}):
        assert L.detect_launcher({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", **step}) == "mpi", step
    assert L.detect_launcher({"SLURM_NTASKS": "2", "SLURM_PROCID": "1"}) == "mpi"
    assert L.detect_launcher({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_NODELIST": "cn1",
                              "SLURM_JOB_ID": "7", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}) == "none"  # batch
    # a job of one: no MPI needed, unless a rank above 0 says the variables contradict each other
    assert L.single_rank_mpi({"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"})
    assert not L.single_rank_mpi({"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "1"})
    with pytest.raises(L.DistributedError, match="disagree: rank 1 in a job of 1"):
        L.placement({"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "1"}, strict=True)
    # PMIx without a server to talk to: MPI_Init cannot work (Open MPI segfaulted), mpirun's has one
    assert L.pmix_without_server({"PMIX_RANK": "1", "PMIX_SIZE": "2"})
    assert not L.pmix_without_server({"PMIX_RANK": "1", "PMIX_SERVER_URI41": "prterun-vm-1@0.0;tcp4://127.0.0.1:1"})
    assert not L.pmix_without_server({"OMPI_COMM_WORLD_RANK": "0"})
    assert L.detect_launcher({"RANK": "0", "WORLD_SIZE": "2"}) == "torchrun"


def test_first_host_of_slurm_nodelist():
    assert R._expand_first_host("cn[012-015,020],gpu7") == "cn012"
    assert R._expand_first_host("gpu7,cn[1-2]") == "gpu7"
    assert R._expand_first_host("node-a[3,5]") == "node-a3"


def test_timeout_from_environment(monkeypatch):
    monkeypatch.setenv("DISTMLIP_DIST_TIMEOUT", "42")
    assert R.timeout_seconds() == 42.0
    monkeypatch.setenv("DISTMLIP_DIST_TIMEOUT", "soon")
    with pytest.raises(L.DistributedError, match="DISTMLIP_DIST_TIMEOUT"):
        R.timeout_seconds()
    monkeypatch.delenv("DISTMLIP_DIST_TIMEOUT")
    assert R.timeout_seconds() == R.DEFAULT_TIMEOUT_S


def test_split_range_covers_everything_once():
    for n in (0, 1, 7, 10, 101):
        for w in (1, 2, 3, 8):
            parts = [P.split_range(n, r, w) for r in range(w)]
            flat = [i for a, b in parts for i in range(a, b)]
            assert flat == list(range(n))
            sizes = [b - a for a, b in parts]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        P.split_range(5, 2, 2)


def test_balanced_partition_by_atoms():
    costs = [1, 50, 3, 3, 40, 12, 7, 7, 30, 2, 9, 22]
    parts = P.balanced_partition(costs, 3)
    assert sorted(i for p in parts for i in p) == list(range(len(costs)))
    loads = [sum(costs[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(costs) and max(loads) <= sum(costs) / 3 + 12
    assert parts == P.balanced_partition(list(costs), 3)  # deterministic


def test_allreduce_gradients_single_process_is_identity_and_scales():
    ctx = C.DistContext()  # world of one
    lin = torch.nn.Linear(3, 2).double()
    lin(torch.ones(4, 3, dtype=torch.float64)).sum().backward()
    g = lin.weight.grad.clone()
    C.allreduce_gradients(lin.parameters(), ctx)
    assert torch.equal(lin.weight.grad, g)
    C.allreduce_gradients(lin.parameters(), ctx, scale=0.25)
    assert torch.equal(lin.weight.grad, g * 0.25)


def test_stop_flag_from_signal_in_one_process():
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    ctx = C.DistContext()
    try:
        S.reset_stop_flag()
        S.install_stop_handlers()
        assert ctx.stop_requested() is False
        os.kill(os.getpid(), signal.SIGUSR1)
        assert ctx.stop_requested() is True
        assert ctx.stop_reason() == "SIGUSR1 on rank 0"
        S.reset_stop_flag()   # forgets the request and the reason
        assert ctx.stop_reason() is None and ctx.stop_requested() is False
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        S.reset_stop_flag()


def test_stop_file(tmp_path, monkeypatch):
    ctx = C.DistContext()
    S.reset_stop_flag()
    stop = tmp_path / "STOP"
    monkeypatch.setenv("DISTMLIP_STOP_FILE", str(stop))
    monkeypatch.setattr(S, "_STOP_FILE_PERIOD_S", 0.0)
    try:
        assert ctx.stop_requested() is False
        stop.write_text("")
        assert ctx.stop_requested() is True
        assert str(stop) in ctx.stop_reason()
        assert C.DistContext(rank=1).stop_reason() is None
    finally:
        S.reset_stop_flag()


def test_gpu_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(L.DistributedError, match="CUDA is not available"):
        R.choose_device("cuda", 0, 1, None)


def _distmlip_imports(path):
    """Every distmlip module a file imports, at module level or inside functions."""
    import ast

    pkg = list(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(pkg[:len(pkg) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                else node.module
            found |= {f"{base}.{a.name}" for a in node.names} if node.module is None else {base}
    return {m for m in found if m == "distmlip" or m.startswith("distmlip.")}


def test_import_layering_of_the_distributed_layer():
    """distributed builds on the foundation only (errors, utils); utils.launch, which logging
    uses for the rank, imports nothing of distmlip but errors (no cycles)."""
    allowed = ("distmlip.errors", "distmlip.utils", "distmlip.distributed")
    pkg = REPO / "distmlip"
    for f in sorted((pkg / "distributed").glob("*.py")):
        bad = {m for m in _distmlip_imports(f) if not m.startswith(allowed)}
        assert not bad, (f.name, bad)
    assert _distmlip_imports(pkg / "utils" / "launch.py") == {"distmlip.errors"}
    for f in sorted((pkg / "utils").glob("*.py")):
        dist = {m for m in _distmlip_imports(f) if m.startswith("distmlip.distributed")}
        assert not dist, (f.name, dist)
    # the rank for logging costs neither torch nor mpi4py
    code = ("import sys, distmlip.utils.log, distmlip.cli; "
            "print(sorted(m for m in ('torch', 'mpi4py', 'distmlip.distributed.context') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(),
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", (res.stdout, res.stderr)


def test_heartbeat_watches_a_ring_of_two_and_names_the_silent_rank(tmp_path):
    """A waiting rank reads only the next two ranks' beats (two reads per check at any rank
    count) and names the one that stopped; a beating partner keeps it quiet."""
    import time as _t

    from distmlip.distributed.liveness import Heartbeat
    from distmlip.errors import DistributedError

    hb = Heartbeat(tmp_path, rank=3, world=6, timeout_s=0.6, interval_s=0.1)
    with hb:
        for r in (0, 2, 5):                       # 4 (watched) gets a file that never changes
            (tmp_path / f".alive.{r}").write_text(f"{100 + r} host 1\n")
        (tmp_path / ".alive.4").write_text("104 nodeX 1\n")
        t0 = _t.monotonic()
        with pytest.raises(DistributedError, match=r"rank 4 \(pid 104 on nodeX\) has given no sign of life"):
            while _t.monotonic() - t0 < 5:
                (tmp_path / ".alive.5").write_text(f"105 host {int(_t.monotonic() * 100)}\n")   # alive
                hb.check()
                _t.sleep(0.05)
        assert _t.monotonic() - t0 >= 0.6
    assert not (tmp_path / ".alive.3").exists()     # its own beat removed on exit


def _claim_all(folder, names, out):
    from distmlip.distributed.claims import claim

    with open(out, "w") as f:
        f.write("\n".join(n for n in names if claim(folder, n)))


def test_claims_give_each_unit_to_exactly_one_of_racing_processes(tmp_path):
    """augment's dynamic sharing: three processes walk the same list of 300 units at the same
    time; every unit is taken by exactly one of them, and a new run's folder replaces the old
    one (a claim means taken in this run, never done)."""
    import multiprocessing as mp

    from distmlip.distributed import claims as Q
    from distmlip.errors import StorageError

    folder = Q.new_claims_folder(tmp_path)
    names = [f"a_{i}" for i in range(300)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_claim_all, args=(folder, names, tmp_path / f"got{k}.txt")) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    got = [set(filter(None, (tmp_path / f"got{k}.txt").read_text().split("\n"))) for k in range(3)]
    assert sum(len(g) for g in got) == 300 and set().union(*got) == set(names)
    assert Q.claimed(folder, "a_") == set(names) and Q.claimed(folder, "b_") == set()
    again = Q.new_claims_folder(tmp_path)
    assert again != folder and not folder.exists() and Q.claim(again, "a_0")
    with pytest.raises(StorageError, match="claim file"):
        Q.claim(tmp_path / "missing", "a_0")
