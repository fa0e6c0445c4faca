"""Distributed runtime under real `mpirun -n 2`: start-up (mpi4py, environment, torchrun), exact
float64 reductions, the flat gradient all-reduce, rank groups, the MPI-only context of convert and
augment (`mpirun -n 4`), stop signals reaching every rank, and fail-fast when a rank raises or dies."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from helpers import REPO, mpirun

SCRIPT = str(REPO / "tests" / "mpi_scripts" / "dist_check.py")
MPI_ONLY = str(REPO / "tests" / "mpi_scripts" / "mpi_only_check.py")


def results(text, n=2, kind=None):
    rows = [json.loads(l[7:]) for l in text.splitlines() if l.startswith("RESULT ")]
    rows = sorted((r for r in rows if kind is None or r["kind"] == kind), key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == list(range(n)), text
    return rows


def check_info(rows, launcher, backend="gloo"):
    for r in rows:
        assert r["world"] == 2 and r["is_distributed"] and r["backend"] == backend
        assert r["launcher"] == launcher
        assert r["local_world"] == 2 and r["n_nodes"] == 1
        assert r["local_rank"] == r["rank"]          # one node: local rank = rank
        assert r["sum_exact"], r["sum_maxdiff"]      # float64 sum bit-identical to numpy's a+b
        assert r["max"] == [2.5, -0.0]
        assert r["bcast"] == {"from": 0, "arr": [1, 2, 3]}
        assert r["gathered"] == [0, 10]
        assert r["stop"] is False
        # launch.placement() (the environment, read before any set-up) names the same rank
        assert r["placement"] == [{"torchrun": "torchrun"}.get(launcher, "mpi"), r["rank"], 2]


def check_groups(rows):
    """dist_check 'groups' on 2 ranks: split(1) is one group of both, split(2) one group per rank."""
    for r in rows:
        one, own = r["groups"]["1"], r["groups"]["2"]
        assert (one["g"], one["rank"], one["world"], one["job_ranks"]) == (0, r["rank"], 2, [0, 1])
        assert (one["sum"], one["max"], one["gathered"], one["bcast"]) == (3.0, 1.0, [0, 1], 1)
        assert (own["g"], own["rank"], own["world"], own["job_ranks"]) == (r["rank"], 0, 1, [r["rank"]])
        assert (own["sum"], own["max"], own["gathered"], own["bcast"]) == \
            (r["rank"] + 1.0, float(r["rank"]), [r["rank"]], r["rank"])
        assert one["stop"] is False and own["stop"] is False


@pytest.mark.parametrize("gloo", [False, True])
def test_start_collectives_gradients_and_groups_mpi4py(gloo):
    """A CPU job under MPI runs every collective over MPI and starts no torch process group;
    DISTMLIP_GLOO=1 starts one anyway: the same results either way."""
    out = mpirun(2, [SCRIPT, "info", "grads", "groups"], timeout=120,
                 env={"DISTMLIP_GLOO": "1" if gloo else "0"}).stdout
    rows = results(out, kind="mode_info")
    check_info(rows, "mpi", backend="gloo" if gloo else None)
    for r in rows:
        assert r["mpi_loaded"]
        assert int(r["env_local_rank"]) == r["local_rank"]  # node communicator agrees with mpirun
    check_groups(results(out, kind="mode_groups"))
    assert rows[0]["pid"] != rows[1]["pid"]
    # allreduce_gradients equals the sum of every rank's own gradients (computed independently)
    rows = results(out, kind="mode_grads")
    for r in rows:
        assert all(d is not None and d <= 1e-12 for d in r["diffs"]), r["diffs"]
        assert r["extra_has_grad"]      # grad None on rank 0, present on rank 1 -> summed everywhere
        assert r["unused_grad_none"]    # no grad on any rank -> stays None
    assert rows[0]["checksum"] == rows[1]["checksum"]  # bit-identical on both ranks
    for r in rows:    # the trainer's in-place path: the same sums, the extra numbers in float64
        assert max(r["diffs_flat"]) <= 1e-12, r["diffs_flat"]
        assert r["extra_sum"] == r["extra_want"]
    assert rows[0]["checksum_flat"] == rows[1]["checksum_flat"]


def test_local_wrapper_and_start_from_environment_without_mpi4py():
    """launch/mpirun_local.sh: ranks started, OMP_NUM_THREADS = cores / ranks; with
    DISTMLIP_USE_MPI4PY=0 rank/size/local rank come from the launcher's variables."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["DISTMLIP_USE_MPI4PY"] = "0"
    res = subprocess.run(["bash", str(REPO / "launch" / "mpirun_local.sh"), "-n", "2", "python", SCRIPT, "info"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = results(res.stdout)
    check_info(rows, "mpi-env")
    assert not any(r["mpi_loaded"] for r in rows)
    want = str(max(1, len(os.sched_getaffinity(0)) // 2))  # what nproc reports
    assert all(r["omp"] == want for r in rows), (rows, want)


def test_start_from_torchrun_style_environment():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("OMPI_", "PMI", "PMIX_", "SLURM_"))}
    base.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port), WORLD_SIZE="2", DISTMLIP_DIST_TIMEOUT="60")
    procs = [subprocess.Popen([sys.executable, SCRIPT, "info", "groups"],
                              env=dict(base, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    text = outs[0][0] + "\n" + outs[1][0]
    check_info(results(text, kind="mode_info"), "torchrun")
    check_groups(results(text, kind="mode_groups"))   # no MPI: objects travel over torch groups


def _step_env(rank, size, kind, **extra):
    """The environment a Slurm step gives task ``rank`` (no mpirun, no OMPI_* variables):
    'slurm' = srun's variables, 'pmix' = those of srun --mpi=pmix (without the PMIx server srun
    would run), 'partial' = SLURM_PROCID/SLURM_NTASKS and the step's node list only."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMI", "PMIX_", "SLURM_", "PRTE", "MASTER_", "RANK", "WORLD_SIZE"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DISTMLIP_DIST_TIMEOUT="60")
    base = dict(SLURM_PROCID=str(rank), SLURM_NTASKS=str(size), SLURM_LOCALID=str(rank), SLURM_NODEID="0",
                SLURM_JOB_ID=str(os.getpid()), SLURM_STEP_NODELIST="localhost", SLURM_NODELIST="localhost")
    if kind == "slurm":
        env.update(base, SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS=str(size), SLURM_STEP_TASKS_PER_NODE=str(size))
    elif kind == "partial":
        env.update(base)
    elif kind == "pmix":     # srun --mpi=pmix sets both kinds of variables
        env.update(base, SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS=str(size), PMIX_RANK=str(rank),
                   PMIX_SIZE=str(size), PMIX_NAMESPACE=f"slurm.pmix.{os.getpid()}.0")
    env.update(extra)
    return env


@pytest.mark.parametrize("kind", ["slurm", "partial", "pmix"])
def test_start_from_a_slurm_step_without_mpirun(kind):
    """Two tasks started as srun starts them, mpi4py importable but no PMI for it: Open MPI then
    made each task a world of one, and each trained alone as "rank 0 of 1" (SLURM_PROCID > 0
    without SLURM_STEP_NUM_TASKS was not even taken for a task of a step); with PMIX_RANK and no
    PMIx server MPI_Init segfaulted.  Now the tasks meet through the launcher's variables."""
    procs = [subprocess.Popen([sys.executable, SCRIPT, "info", "groups"], env=_step_env(r, 2, kind),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    text = outs[0][0] + "\n" + outs[1][0]
    check_info(results(text, kind="mode_info"), "mpi-env")
    check_groups(results(text, kind="mode_groups"))


@pytest.mark.parametrize("missing", [0, 1])
def test_slurm_step_task_that_never_comes_is_a_clear_error_within_the_timeout(missing):
    """SLURM_STEP_NUM_TASKS=2 but one task started: the other ends after DISTMLIP_DIST_TIMEOUT
    with an error naming the rendezvous and the variable that promised a partner (it was a torch
    traceback, 'wait timeout after 10000ms, keys: /0//cpu//0/1')."""
    rank = 1 - missing
    t0 = time.time()
    res = subprocess.run([sys.executable, SCRIPT, "info"], capture_output=True, text=True, timeout=120,
                         env=_step_env(rank, 2, "slurm", DISTMLIP_DIST_TIMEOUT="4"))
    elapsed = time.time() - t0
    assert res.returncode != 0 and "RESULT" not in res.stdout, res.stdout
    want = "not every rank joined the rendezvous" if rank == 0 else "no rendezvous with rank 0"
    assert want in res.stderr and "SLURM_STEP_NUM_TASKS=2" in res.stderr, res.stderr[-3000:]
    assert elapsed < 60, elapsed


def test_two_slurm_steps_of_one_identity_on_a_node(tmp_path):
    """Two steps of one job whose step ids were not passed on meet at one port: the second job's
    rank 0 cannot open it and its rank 1 reaches the first job's store.  Both end at once with
    errors that say so (rank 1 joined the running job and died after the timeout with gloo's
    'Connection reset by peer'), and the first job goes on undisturbed."""
    env = lambda r: _step_env(r, 2, "partial", SLURM_JOB_ID="777", DISTMLIP_DIST_TIMEOUT="30")  # noqa: E731
    first = [subprocess.Popen([sys.executable, SCRIPT, "stop", str(tmp_path), "-1"], env=env(r),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        deadline = time.time() + 90
        while not all((tmp_path / f"pid.{r}").exists() for r in range(2)) and time.time() < deadline:
            assert all(p.poll() is None for p in first), [p.communicate() for p in first]
            time.sleep(0.05)
        t0 = time.time()
        second = [subprocess.Popen([sys.executable, SCRIPT, "info"], env=env(r), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for r in range(2)]
        outs = [p.communicate(timeout=120) for p in second]
        assert time.time() - t0 < 25, outs
        assert all(p.returncode != 0 for p in second) and not any("RESULT" in o for o, _ in outs), outs
        assert "could not open the rendezvous" in outs[0][1] and "MASTER_PORT" in outs[0][1], outs[0][1][-2000:]
        assert "already has its 2 ranks" in outs[1][1], outs[1][1][-2000:]
        assert all(p.poll() is None for p in first)      # the first job still runs
        os.kill(int((tmp_path / "pid.0").read_text()), signal.SIGUSR1)
        res = [p.communicate(timeout=120) for p in first]
        assert all(p.returncode == 0 for p in first), res
        rows = results(res[0][0] + "\n" + res[1][0])
        assert rows[0]["stopped_at"] is not None and rows[0]["stopped_at"] == rows[1]["stopped_at"]
    finally:
        for p in first:
            if p.poll() is None:
                p.kill()


def test_mpi_only_context_four_ranks():
    """The context of convert/augment: no torch process group, object collectives and barriers over
    MPI, a barrier that sleeps, rank groups with their own stop check, the environment's rank equal
    to MPI's, logging on rank 0 only; a later init_distributed() on the CPU adds no torch group
    (its tensors go over MPI) and its collectives work."""
    res = mpirun(4, [MPI_ONLY], timeout=240)
    rows = results(res.stdout, n=4)
    for r in rows:
        rank = r["rank"]
        assert (r["world"], r["launcher"], r["backend"], r["pg_initialised"], r["mpi_loaded"]) == \
            (4, "mpi", None, False, True)
        # launch.placement() before MPI_Init == MPI.COMM_WORLD (rank, size) and the node communicator's size
        assert (r["env_launcher"], r["env_rank"], r["env_world"], r["env_local_world"]) == \
            ("mpi", rank, 4, r["local_world"])
        assert r["bcast"] == {"from": 3, "list": [3, 3, 3]}
        assert r["gathered"] == [0, 1, 4, 9]
        assert r["tensor_error"] is None and r["tensor_sum"] == [10.0] * 3 and r["tensor_max"] == [True, False]
        if rank != 3:   # waited ~1.5 s for rank 3, sleeping: almost no CPU time (a blocking barrier spins)
            assert r["wait_wall"] > 1.0, r
            assert r["wait_cpu"] < 0.15 * r["wait_wall"], r
        g = rank % 2    # split(2): groups {0, 2} and {1, 3}
        assert (r["group"], r["group_rank"], r["group_world"], r["group_job_rank"]) == (g, rank // 2, 2, rank)
        assert r["group_job_ranks"] == r["group_gathered"] == [g, g + 2]
        assert r["group_bcast"] == g + 2
        # rank 3 raised SIGUSR1: its group stops, the other group does not; the world check sees it
        assert (r["group_stop"], r["group_reason"]) == ((True, "SIGUSR1 on rank 3") if g == 1 else (False, None))
        assert (r["world_stop"], r["world_reason"]) == (True, "SIGUSR1 on rank 3")
        assert (r["same_object"], r["upgraded_sum"], r["upgraded_backend"]) == (True, 10.0, None)
    assert sorted(r["local_rank"] for r in rows) == [0, 1, 2, 3]   # one node
    assert [l for l in res.stdout.splitlines() if l.startswith("LOG")] == ["LOG 0"]


def test_sigterm_on_one_rank_stops_both_at_the_same_step(tmp_path):
    res = mpirun(2, [SCRIPT, "stop", str(tmp_path), "5"], timeout=120)
    rows = results(res.stdout)
    assert [r["stopped_at"] for r in rows] == [5, 5]
    assert all(r["reason"] == "SIGTERM on rank 1" for r in rows)


def test_external_sigusr1_to_rank0_stops_both(tmp_path):
    box = {}
    th = threading.Thread(target=lambda: box.setdefault(
        "res", mpirun(2, [SCRIPT, "stop", str(tmp_path), "-1"], timeout=120, check=False)))
    th.start()
    pidfile = tmp_path / "pid.0"
    deadline = time.time() + 90
    while not (pidfile.exists() and (tmp_path / "pid.1").exists()) and time.time() < deadline and th.is_alive():
        time.sleep(0.05)
    assert pidfile.exists(), "ranks did not start"
    time.sleep(0.3)
    os.kill(int(pidfile.read_text()), signal.SIGUSR1)   # like a walltime warning
    th.join(120)
    res = box["res"]
    assert res.returncode == 0, res.stderr
    rows = results(res.stdout)
    assert rows[0]["stopped_at"] is not None and rows[0]["stopped_at"] == rows[1]["stopped_at"]
    assert all(r["reason"] == "SIGUSR1 on rank 0" for r in rows)


def _assert_fails_fast(args, message, env=None):
    t0 = time.time()
    res = mpirun(2, args, timeout=120, check=False, env=env)
    elapsed = time.time() - t0
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert elapsed < 60, f"job took {elapsed:.1f} s to end"
    assert message in out, out
    return out


def test_rank_raising_in_step_k_ends_the_job():
    out = _assert_fails_fast([SCRIPT, "fail", "3"], "injected failure at step 3")
    assert "error on rank 1" in out


def test_uncaught_exception_ends_the_job_without_run_guarded():
    out = _assert_fails_fast([SCRIPT, "fail", "2", "uncaught"], "injected failure at step 2")
    assert "error on rank 1" in out


def test_rank_dying_ends_the_job():
    _assert_fails_fast([SCRIPT, "die", "3"], "rank 1 dies at step 3")


def test_bad_device_is_a_clear_error_on_every_rank():
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("CUDA present")
    out = _assert_fails_fast([SCRIPT, "info"], "CUDA is not available", env={"DIST_CHECK_DEVICE": "cuda"})
    assert "RESULT" not in out


def test_ranks_share_the_cores_without_omp_num_threads():
    """Without OMP_NUM_THREADS each rank's OpenBLAS started one thread per core of the node beside
    torch's pool (sweep 25: augment 7x slower on two ranks of two cores).  Every pool of a rank,
    loaded before or after the start, now runs the rank's share of the cores it may use; with
    OMP_NUM_THREADS given, that count."""
    script = str(REPO / "tests" / "mpi_scripts" / "threads_check.py")
    for env, want in (({"OMP_NUM_THREADS": ""}, None), ({"OMP_NUM_THREADS": "1"}, 1)):
        res = mpirun(2, [script], env=env, timeout=120)
        rows = [json.loads(l[8:]) for l in res.stdout.splitlines() if l.startswith("THREADS ")]
        assert len(rows) == 2
        for r in rows:
            n = r["torch"]
            assert r["pools"] == [n] and r["env"] == str(n), (env, r)
            if want:
                assert n == want
            else:       # bound ranks: their own cores; unbound ones: half the node's each
                assert 1 <= n <= (max(1, r["cpus"] // 2) if r["cpus"] == os.cpu_count() else r["cpus"]), r
