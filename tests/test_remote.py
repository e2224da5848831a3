"""Remote workers: agents in other processes connected over TCP."""

from __future__ import annotations

import multiprocessing
import os
import threading

import pytest

from conftest import SILENCE, alive, free_port, wait_until
from distripool import Pool, make_orchestrator


def square(x):
    return x * x


def cube(x):
    return x * x * x


@pytest.mark.parametrize("via", ["cli", "make_worker"])
def test_remote_worker_runs_a_map(orchestrator, spawn_worker, via):
    worker = spawn_worker(orchestrator.addresses[0], via=via, processes=2)
    assert orchestrator.wait_for_workers(1, timeout=60), worker.log()
    assert orchestrator.slots == 2
    with Pool(orchestrator=orchestrator) as pool:
        assert pool.map(square, range(200)) == [x * x for x in range(200)]
        offset = 5
        assert pool.map(lambda x: x + offset, [1, 2]) == [6, 7]
        assert pool.apply(cube, (3,)) == 27
        assert list(pool.imap(square, range(20))) == [x * x for x in range(20)]


def test_plain_pool_uses_the_default_orchestrator(orchestrator, spawn_worker):
    spawn_worker(orchestrator.addresses[1])
    assert orchestrator.wait_for_workers(1, timeout=60)
    with Pool() as pool:  # no orchestrator argument: the one made above
        pids = set(pool.map(_pid, range(50), chunksize=1))
    assert orchestrator.stats()["tasks_done"] >= 50
    import os

    assert os.getpid() not in pids


def _pid(_):
    import os

    return os.getpid()


def test_two_orchestrators_in_parallel_from_several_threads(spawn_worker):
    key = b"parallel-key"
    a = make_orchestrator("127.0.0.1:0", authkey=key)
    b = make_orchestrator("127.0.0.1:0", authkey=key)
    try:
        spawn_worker(a.addresses[0], key=key, processes=1)
        spawn_worker(b.addresses[0], key=key, processes=1)
        assert a.wait_for_workers(1, 60) and b.wait_for_workers(1, 60)
        results, errors = {}, []

        def run(name, orch, fn):
            try:
                with Pool(orchestrator=orch) as pool:
                    results[name] = pool.map(fn, range(300), chunksize=3)
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [
            threading.Thread(target=run, args=(n, o, f))
            for n, o, f in [("a1", a, square), ("a2", a, cube), ("b1", b, square), ("b2", b, cube)]
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        assert results["a1"] == results["b1"] == [x * x for x in range(300)]
        assert results["a2"] == results["b2"] == [x**3 for x in range(300)]
        assert a.stats()["tasks_done"] == b.stats()["tasks_done"] == 200
    finally:
        a.close()
        b.close()


def test_worker_started_before_its_orchestrator(spawn_worker):
    # The one place a port is picked before it is bound: the worker must be
    # told where its orchestrator will be before that exists.
    port = free_port()
    worker = spawn_worker(f"127.0.0.1:{port}")
    wait_until(lambda: "not available" in worker.log(), 30, "the worker to retry")
    orch = make_orchestrator(f"127.0.0.1:{port}")
    try:
        assert orch.wait_for_workers(1, timeout=60), worker.log()
        with Pool(orchestrator=orch) as pool:
            assert pool.map(square, range(10)) == [x * x for x in range(10)]
    finally:
        orch.close()


def test_worker_reconnects_to_a_new_orchestrator_on_the_same_port(spawn_worker):
    first = make_orchestrator("127.0.0.1:0")
    port = first.addresses[0].rpartition(":")[2]
    worker = spawn_worker(f"127.0.0.1:{port}")
    assert first.wait_for_workers(1, 60)
    first.close()  # frees the port
    second = make_orchestrator(f"127.0.0.1:{port}")
    try:
        assert second.wait_for_workers(1, 60), worker.log()
        with Pool(orchestrator=second) as pool:
            assert pool.apply(square, (9,)) == 81
    finally:
        second.close()


def test_wrong_key_is_rejected_on_both_sides(spawn_worker):
    orch = make_orchestrator("127.0.0.1:0", authkey=b"the right key")
    try:
        rogue = spawn_worker(orch.addresses[0], key=b"a wrong key")
        wait_until(lambda: orch.stats()["auth_failures"] >= 1, 60, "the orchestrator to refuse the worker")
        wait_until(lambda: "authentication" in rogue.log(), 60, "the worker to report the failure")
        assert "keys differ" in rogue.log()
        assert orch.workers == 0
        # A keyless worker is refused the same way.
        spawn_worker(orch.addresses[0], key=None)
        wait_until(lambda: orch.stats()["auth_failures"] >= 2, 60, "a keyless worker to be refused")
        assert orch.workers == 0
        # The right key still gets in.
        spawn_worker(orch.addresses[0], key=b"the right key")
        assert orch.wait_for_workers(1, 60)
    finally:
        orch.close()


def test_worker_refuses_a_rogue_orchestrator(spawn_worker):
    rogue = make_orchestrator("127.0.0.1:0", authkey=b"attacker")
    try:
        worker = spawn_worker(rogue.addresses[0], key=b"cluster secret")
        wait_until(
            lambda: "could not prove it holds our authentication key" in worker.log(),
            60,
            "the worker to refuse the orchestrator",
        )
        assert rogue.workers == 0
        with Pool(orchestrator=rogue) as pool:
            r = pool.apply_async(square, (2,))
            with pytest.raises(multiprocessing.TimeoutError):
                r.get(timeout=1)  # no worker will ever run it
    finally:
        rogue.close()


def test_non_loopback_bind_without_a_key_is_refused(monkeypatch):
    monkeypatch.delenv("DISTRIPOOL_AUTHKEY", raising=False)
    monkeypatch.delenv("DISTRIPOOL_AUTHKEY_FILE", raising=False)
    with pytest.raises(ValueError, match="without an authentication key.*DISTRIPOOL_AUTHKEY"):
        make_orchestrator("0.0.0.0:0")
    orch = make_orchestrator("0.0.0.0:0", authkey=b"k")
    orch.close()


def test_bad_addresses_are_rejected():
    with pytest.raises(ValueError, match="host:port"):
        make_orchestrator("no-port-here")
    with pytest.raises(TypeError):
        make_orchestrator(1337)


def test_close_frees_the_ports_and_is_idempotent():
    first = make_orchestrator(("127.0.0.1:0", "127.0.0.1:0"))
    addrs = tuple(first.addresses)
    first.close()
    for _ in range(3):
        orch = make_orchestrator(addrs)
        assert orch.addresses == list(addrs)
        orch.close()
        orch.close()
        assert orch.closed


def test_pool_on_a_closed_orchestrator_is_refused():
    orch = make_orchestrator("127.0.0.1:0")
    orch.close()
    with pytest.raises(ValueError, match="closed"):
        Pool(orchestrator=orch)


def hold_the_gil(seconds):
    import ctypes

    # PyDLL calls keep the GIL: this executor runs no Python at all meanwhile.
    ctypes.PyDLL(None).sleep(seconds)
    return "held"


def test_holding_the_gil_longer_than_the_silence_timeout_is_not_a_death(orchestrator, spawn_worker):
    import ctypes

    spawn_worker(orchestrator.addresses[0], processes=2)
    assert orchestrator.wait_for_workers(1, timeout=60)
    seconds = (
        int(SILENCE) + 2
    )  # libc sleep takes whole seconds; beyond the time after which a silent worker is declared lost
    with Pool(orchestrator=orchestrator) as pool:
        result = pool.map_async(hold_the_gil, [seconds, seconds], chunksize=1)
        # The driver holds its own GIL just as long: the Rust core keeps the
        # heartbeats going without it.
        ctypes.PyDLL(None).sleep(seconds)
        assert result.get(60) == ["held", "held"]
    stats = orchestrator.stats()
    assert stats["workers_lost"] == 0 and stats["crashes"] == 0 and stats["workers"] == 1


def spawn_grandchild_and_wait(marker):
    import subprocess
    import time

    child = subprocess.Popen(["sleep", "3600"])
    with open(marker + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    os.rename(marker + ".tmp", marker)
    time.sleep(3600)


def test_orchestrator_gone_kills_running_tasks_and_their_children(spawn_worker, tmp_path):
    orch = make_orchestrator("127.0.0.1:0")
    try:
        worker = spawn_worker(orch.addresses[0], processes=1)
        assert orch.wait_for_workers(1, timeout=60)
        marker = str(tmp_path / "pids")
        pool = Pool(orchestrator=orch)
        pool.apply_async(spawn_grandchild_and_wait, (marker,))
        wait_until(lambda: os.path.exists(marker), 60, "the task to start its child")
        with open(marker) as f:
            executor, grandchild = (int(p) for p in f.read().split())
        assert alive(executor) and alive(grandchild)
    finally:
        orch.close()
    # The agent ends its session: the executor's whole process group goes.
    wait_until(lambda: not alive(executor) and not alive(grandchild), 60, "the task and its child to die")
    wait_until(lambda: "reconnecting" in worker.log(), 60, "the worker to start reconnecting")
    assert worker.proc.poll() is None, "the worker itself keeps running"
    pool.terminate()
