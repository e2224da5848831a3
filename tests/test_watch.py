"""What the driver is told about its workers (the ``distripool`` logger), and
``Pool(wait_for_workers=...)``: never a silent wait."""

from __future__ import annotations

import logging
import signal
import time

import pytest

import distripool
from conftest import wait_until
from distripool import NoWorkersError, Pool, _watch
from workloads import pid_after


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "distripool"]


def seen(caplog, text: str) -> bool:
    return any(text in m for m in messages(caplog))


def square(x):
    return x * x


def test_tasks_without_a_worker_say_what_they_wait_for(keyed, monkeypatch, caplog):
    orch, _ = keyed
    monkeypatch.setattr(_watch, "WAITING_S", 0.5)
    caplog.set_level(logging.INFO, logger="distripool")
    with Pool(orchestrator=orch) as pool:
        result = pool.map_async(square, range(3))
        wait_until(lambda: seen(caplog, "waiting for a worker"), 30, "the waiting message")
        (message,) = [m for m in messages(caplog) if "waiting for a worker" in m]
        assert message.startswith("3 tasks are waiting for a worker; none has been connected for")
        assert f"workers connect to {orch.addresses[0]}" in message
        assert "no connection was refused" in message
        assert not result.ready()


def test_joins_refusals_and_losses_are_logged(keyed, spawn_worker, caplog):
    orch, key = keyed
    caplog.set_level(logging.INFO, logger="distripool")
    spawn_worker(orch.addresses[0], key=b"not-the-key" * 3)
    wait_until(lambda: seen(caplog, "refused a worker from 127.0.0.1:"), 60, "the refusal")
    assert any("authentication" in m for m in messages(caplog) if "refused a worker" in m), messages(caplog)
    good = spawn_worker(orch.addresses[0], key=key)
    wait_until(lambda: seen(caplog, "joined"), 60, "the join")
    good.proc.send_signal(signal.SIGKILL)
    good.proc.wait(30)
    wait_until(lambda: seen(caplog, "was lost"), 60, "the loss")
    # Refusals are logged once per reason, and counted for the diagnosis.
    assert sum("refused a worker" in m for m in messages(caplog)) == 1
    watch = orch._watch
    assert watch is not None
    wait_until(lambda: sum(watch.refusals.values()) >= 1, 30, "the refusal count")
    assert "connection refused: " in watch.diagnosis() or "connections refused: " in watch.diagnosis()


def test_wait_for_workers_raises_with_the_diagnosis(keyed, spawn_worker):
    orch, _ = keyed
    spawn_worker(orch.addresses[0], key=b"not-the-key" * 3)
    wait_until(lambda: sum(orch._watch.refusals.values()) >= 1, 60, "the refusal")
    started = time.monotonic()
    with pytest.raises(NoWorkersError, match=r"no worker connected within 1\.5 s") as info:
        Pool(orchestrator=orch, wait_for_workers=1.5)
    assert time.monotonic() - started >= 1.5
    assert orch.addresses[0] in str(info.value)
    assert "refused: " in str(info.value) and "authentication" in str(info.value)
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, distripool.DistripoolError)


def test_wait_for_workers_fails_pending_tasks_once_the_workers_are_gone(keyed, spawn_worker):
    orch, key = keyed
    worker = spawn_worker(orch.addresses[0], key=key)
    pool = Pool(orchestrator=orch, wait_for_workers=2)
    try:
        assert pool.map(square, range(4)) == [0, 1, 4, 9]
        result = pool.apply_async(pid_after, (300,))
        wait_until(lambda: orch.stats()["tasks_running"] == 1, 60, "the task to run")
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(30)
        with pytest.raises(NoWorkersError, match="no worker was connected for 2 s"):
            result.get(timeout=60)
        assert orch.stats()["tasks_queued"] == 0  # taken back, not left to run later
    finally:
        pool.terminate()
        pool.join()


def test_wait_for_workers_is_checked():
    with pytest.raises(ValueError, match="wait_for_workers must be a positive number"):
        Pool(1, wait_for_workers=0)
    with pytest.raises(ValueError, match="wait_for_workers must be a positive number"):
        Pool(1, wait_for_workers="soon")


def test_counters_read_from_several_threads_at_once(keyed):
    """Readers of the orchestrator's state (the watch, a pool, the caller)
    never deadlock on its lock and the GIL."""
    import threading

    orch, _ = keyed
    errors = []

    def read():
        try:
            for _ in range(3000):
                orch.stats()
                orch.events(0)
                orch.workers_info()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(90)
    assert not any(t.is_alive() for t in readers), "readers deadlocked"
    assert errors == []
