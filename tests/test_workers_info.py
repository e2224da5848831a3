"""What the orchestrator shows of its workers, and workers that leave on
purpose: drained by the orchestrator, or stopped with Ctrl-C."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from conftest import wait_until
from distripool import Orchestrator, Pool, make_orchestrator
from workloads import slow_square


@pytest.fixture
def orch():
    o = Orchestrator("127.0.0.1:0", authkey=b"workers-info-key")
    yield o
    o.close()


def test_workers_info_shows_labels_host_pid_cpus_and_counts(orch, spawn_worker):
    w = spawn_worker(
        orch.addresses[0],
        key=b"workers-info-key",
        processes=2,
        extra=["--label", "slurm_job=123", "--label", "rack=b"],
    )
    assert orch.wait_for_workers(1, timeout=60), w.log()
    with Pool(orchestrator=orch) as pool:
        assert pool.map(abs, range(-50, 0)) == list(range(50, 0, -1))
    [info] = orch.workers_info()
    assert info["labels"] == {"slurm_job": "123", "rack": "b"}
    assert info["host"] == socket.gethostname()
    assert info["pid"] == w.pid
    assert info["cpus"] == len(os.sched_getaffinity(0))
    assert info["slots"] == 2
    assert info["state"] == "connected"
    assert info["tasks_done"] >= 1 and info["crashes"] == 0 and info["tasks_running"] == 0
    assert info["address"].startswith("127.0.0.1:")
    assert 0 <= info["last_heard"] < 5 and info["connected_for"] > 0
    kinds = [e["kind"] for e in orch.events()]
    assert kinds == ["worker_joined"], kinds
    stats = orch.stats()
    assert stats["tasks_queued"] == stats["tasks_running"] == 0
    assert stats["workers"] == 1 and stats["workers_lost"] == stats["workers_left"] == 0


def test_a_worker_in_a_slurm_job_labels_itself_from_its_environment(orch, spawn_worker, monkeypatch):
    """``srun distripool worker ...`` inside an allocation: the job id and
    node come from Slurm's variables; a label given explicitly wins."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURMD_NODENAME", "node07")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    w = spawn_worker(orch.addresses[0], key=b"workers-info-key", extra=["--label", "slurm_node=renamed"])
    assert orch.wait_for_workers(1, timeout=60), w.log()
    [info] = orch.workers_info()
    assert info["labels"] == {"slurm_node": "renamed", "slurm_job_id": "4242", "slurm_procid": "3"}


def test_a_worker_runs_one_executor_per_cpu_it_may_use(orch, spawn_worker):
    """Not one per CPU of the machine: a worker started on one CPU (``taskset``,
    a Slurm step, a container) runs one executor."""
    mine = os.sched_getaffinity(0)
    assert len(mine) >= 2, "this test needs a machine with two CPUs"
    os.sched_setaffinity(0, {min(mine)})
    try:
        w = spawn_worker(orch.addresses[0], key=b"workers-info-key", processes=None)
    finally:
        os.sched_setaffinity(0, mine)
    assert orch.wait_for_workers(1, timeout=60), w.log()
    [info] = orch.workers_info()
    assert info["cpus"] == 1 and info["slots"] == 1, info


def test_bad_labels_are_refused_before_the_worker_starts(spawn_worker, orch):
    w = spawn_worker(orch.addresses[0], key=b"workers-info-key", extra=["--label", "no-equals-sign"])
    assert w.proc.wait(60) == 2, w.log()
    assert "not of the form key=value" in w.log()


def test_a_drained_worker_finishes_its_tasks_takes_no_more_and_exits(orch, spawn_worker):
    key = b"workers-info-key"
    far = spawn_worker(orch.addresses[0], key=key, processes=1)
    assert orch.wait_for_workers(1, timeout=60), far.log()
    with Pool(orchestrator=orch) as pool:
        result = pool.map_async(slow_square, range(40), chunksize=1)
        wait_until(lambda: orch.stats()["tasks_done"] >= 2, 60, "the first worker to run tasks")
        near = spawn_worker(orch.addresses[0], key=key, processes=1)
        wait_until(lambda: orch.workers == 2, 60, "the second worker")
        first = next(w for w in orch.workers_info() if w["pid"] == far.pid)
        assert orch.drain(first["id"])
        assert far.proc.wait(60) == 0, far.log()
        assert result.get(120) == [i * i for i in range(40)]
    assert "drained" in far.log()
    stats = orch.stats()
    assert stats["workers_left"] == 1 and stats["workers_lost"] == 0 and stats["crashes"] == 0
    assert [w["pid"] for w in orch.workers_info()] == [near.pid]
    kinds = [e["kind"] for e in orch.events() if e.get("worker") == first["id"]]
    assert kinds == ["worker_joined", "worker_draining", "worker_left"], kinds
    assert not orch.drain(first["id"]), "gone"


def test_a_worker_stopped_with_ctrl_c_says_goodbye_and_its_tasks_run_elsewhere(orch, spawn_worker):
    key = b"workers-info-key"
    stays = spawn_worker(orch.addresses[0], key=key, processes=1)
    leaves = spawn_worker(orch.addresses[0], key=key, processes=1)
    wait_until(lambda: orch.workers == 2, 60, "both workers")
    with Pool(orchestrator=orch) as pool:
        result = pool.map_async(slow_square, range(40), chunksize=1)
        wait_until(
            lambda: any(w["pid"] == leaves.pid and w["tasks_done"] >= 1 for w in orch.workers_info()),
            60,
            "the second worker to run a task",
        )
        leaves.stop()  # SIGINT, as Ctrl-C
        assert leaves.proc.returncode == 130, leaves.log()
        assert result.get(120) == [i * i for i in range(40)]
    stats = orch.stats()
    assert stats["workers_left"] == 1 and stats["workers_lost"] == 0, (stats, stays.log())
    [left] = [e for e in orch.events() if e["kind"] == "worker_left"]
    assert left["reason"] == "the worker is stopping", left


def test_an_address_in_use_is_an_os_error_with_its_errno():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        address = f"127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(OSError) as info:
            make_orchestrator(address)
    assert info.value.errno == errno.EADDRINUSE
    assert address in str(info.value) and "in use" in str(info.value)


def test_a_worker_whose_executors_cannot_start_stops_with_the_reason(orch, tmp_path):
    import subprocess
    import sys

    from conftest import TESTS, Worker

    # Every executor of this worker dies as its interpreter starts.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os\nif os.environ.get('DISTRIPOOL_EXECUTOR_FD'):\n    os._exit(3)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(TESTS)]), DISTRIPOOL_LOG="info")
    key_file = tmp_path / "key"
    key_file.write_bytes(b"workers-info-key")
    key_file.chmod(0o600)
    argv = [sys.executable, "-m", "distripool", "worker", "-p", "1", "--connect", orch.addresses[0]]
    w = Worker(argv + ["--authkey-file", str(key_file)], tmp_path / "worker.log", env)
    try:
        code = w.proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker kept retrying:\n{w.log()}")
    finally:
        log = w.log()
        w.stop()
    assert code == 1, log
    assert "executors in a row died before they started" in log and "exited with code 3" in log, log
    assert "cannot run tasks, stopping" in log, log
