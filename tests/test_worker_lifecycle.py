"""How a launched worker ends: SIGTERM drains it, ``--idle-timeout`` lets it
go when there is nothing to do, and its exit status says which."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from conftest import free_port, wait_until
from distripool import Pool
from workloads import nap_square, slow_square


def _left_once_cleanly(orch, why: str) -> None:
    """One worker left, saying ``why``; no task was retried, none lost."""
    events = orch.events()
    kinds = [e["kind"] for e in events]
    assert "task_retried" not in kinds and "worker_lost" not in kinds, events
    left = [e for e in events if e["kind"] == "worker_left"]
    assert len(left) == 1 and why in left[0]["reason"], events


def test_sigterm_mid_map_drains_the_worker_nothing_lost_nothing_retried(keyed, spawn_worker):
    orch, key = keyed
    leaving = spawn_worker(orch.addresses[0], key=key)
    staying = spawn_worker(orch.addresses[0], key=key)
    assert orch.wait_for_workers(2, timeout=60)
    with Pool(orchestrator=orch) as pool:
        result = pool.map_async(slow_square, range(200), chunksize=1)
        wait_until(
            lambda: any(w["pid"] == leaving.pid and w["tasks_running"] for w in orch.workers_info()),
            60,
            "the worker to hold tasks",
        )
        leaving.proc.send_signal(signal.SIGTERM)
        assert result.get(timeout=120) == [x * x for x in range(200)]
    assert leaving.proc.wait(60) == 0, leaving.log()
    assert staying.proc.poll() is None
    _left_once_cleanly(orch, "SIGTERM")
    stats = orch.stats()
    assert (stats["crashes"], stats["workers_left"]) == (0, 1), stats


def test_an_idle_worker_leaves_with_status_3(keyed, spawn_worker):
    orch, key = keyed
    worker = spawn_worker(orch.addresses[0], key=key, extra=["--idle-timeout", "1.5"])
    assert orch.wait_for_workers(1, timeout=60)
    with Pool(orchestrator=orch) as pool:
        assert pool.map(slow_square, range(4)) == [0, 1, 4, 9]
    assert worker.proc.wait(60) == 3, worker.log()
    assert "nothing to do for 1.5 s, leaving" in worker.log()
    wait_until(lambda: orch.workers == 0, 30, "the orchestrator to see it leave")
    left = [e for e in orch.events() if e["kind"] == "worker_left"]
    assert left and "idle for 1.5 s" in left[0]["reason"], orch.events()


def test_a_worker_with_no_orchestrator_to_reach_leaves_when_idle(spawn_worker):
    worker = spawn_worker(f"127.0.0.1:{free_port()}", key=b"k" * 32, extra=["--idle-timeout", "1"])
    assert worker.proc.wait(60) == 3, worker.log()


def test_a_worker_leaves_before_its_time_limit_with_nothing_lost(keyed, spawn_worker):
    orch, key = keyed
    limited = spawn_worker(orch.addresses[0], key=key, processes=1, extra=["--time-limit", "3"])
    staying = spawn_worker(orch.addresses[0], key=key, processes=1)
    assert orch.wait_for_workers(2, timeout=60)
    with Pool(orchestrator=orch) as pool:
        assert pool.map(nap_square, range(40), chunksize=1) == [x * x for x in range(40)]
    assert limited.proc.wait(60) == 4, limited.log()
    assert "time limit reached, leaving" in limited.log()
    assert staying.proc.poll() is None
    _left_once_cleanly(orch, "time limit is near")
    done = {w["pid"]: w["tasks_done"] for w in orch.workers_info()}
    assert done[staying.pid] < 40, "the limited worker ran tasks too"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5", 300), ("01:30", 90), ("2:03:04", 7384), ("1-00:00:10", 86410), ("UNLIMITED", None), ("", None)],
)
def test_slurm_time_left_is_read_as_slurm_writes_it(text, seconds):
    from distripool._config import parse_slurm_duration

    assert parse_slurm_duration(text) == seconds


@pytest.mark.parametrize("option", ["--idle-timeout", "--time-limit"])
@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf"])
def test_a_bad_idle_timeout_or_time_limit_is_refused(option, value):
    out = subprocess.run(
        [sys.executable, "-m", "distripool", "worker", "--connect", "127.0.0.1:1", option, value],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert option in out.stderr and "seconds" in out.stderr


def test_a_worker_without_a_key_is_told_so_once_and_keeps_retrying(keyed, spawn_worker):
    orch, _ = keyed
    worker = spawn_worker(orch.addresses[0], key=None, extra=["--idle-timeout", "3"])
    assert worker.proc.wait(60) == 3, worker.log()
    log = worker.log()
    assert log.count("this worker has no key set, and the orchestrator requires one") == 1, log
    assert "keys differ" not in log
    refused = [e for e in orch.events() if e["kind"] == "connection_refused"]
    assert len(refused) >= 2, "it retried"
    assert all("the worker has no key set" in e["reason"] for e in refused), refused


def test_the_ready_file_exists_while_the_worker_is_connected(keyed, spawn_worker, tmp_path):
    orch, key = keyed
    ready = tmp_path / "ready"
    worker = spawn_worker(orch.addresses[0], key=key, extra=["--ready-file", str(ready)])
    assert orch.wait_for_workers(1, timeout=60)
    wait_until(ready.exists, 30, "the ready file")
    assert ready.read_text().startswith("connected to ")
    orch.close()
    wait_until(lambda: not ready.exists(), 30, "the ready file to go when the orchestrator does")
    assert worker.proc.poll() is None, "the worker keeps retrying"


def test_the_next_worker_removes_the_directory_of_one_killed_outright_and_no_other(
    keyed, spawn_worker, tmp_path, monkeypatch
):
    orch, key = keyed
    base = tmp_path / "tmp"
    base.mkdir()
    monkeypatch.setenv("TMPDIR", str(base))
    # Named like a worker's, but without its lock file: not ours to remove.
    (base / "distripool-worker-other").mkdir()

    def workers_dirs() -> set[str]:
        return {p.name for p in base.glob("distripool-worker-*") if (p / "worker.lock").exists()}

    killed = spawn_worker(orch.addresses[0], key=key, processes=1)
    assert orch.wait_for_workers(1, timeout=60), killed.log()
    (killed_dir,) = workers_dirs()
    running = spawn_worker(orch.addresses[0], key=key, processes=1)
    assert orch.wait_for_workers(2, timeout=60), running.log()
    (running_dir,) = workers_dirs() - {killed_dir}

    killed.proc.kill()
    killed.proc.wait(60)
    wait_until(lambda: orch.workers == 1, 60, "the orchestrator to see the killed worker go")
    assert workers_dirs() == {killed_dir, running_dir}, "a worker killed outright leaves its directory"

    after = spawn_worker(orch.addresses[0], key=key, processes=1)
    assert orch.wait_for_workers(2, timeout=60), after.log()
    left = workers_dirs()
    assert killed_dir not in left and running_dir in left and len(left) == 2, left
    assert (base / "distripool-worker-other").is_dir()
    assert "removed 1 directory that workers killed outright left" in after.log()
    with Pool(orchestrator=orch) as pool:
        assert pool.map(nap_square, range(8)) == [x * x for x in range(8)]
