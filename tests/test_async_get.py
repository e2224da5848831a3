"""apply_async().get() and submit().result(): a caller waiting when the
completion arrives takes it itself; one nobody waits for reaches the result
thread, so join, ready() and callbacks see it. Never lost, never a hang."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from multiprocessing import TimeoutError as MpTimeoutError

import pytest

from conftest import wait_until
from distripool import Pool, PoolTerminatedError, ProcessPoolExecutor
from workloads import identity, wait_for_file


@pytest.fixture
def pool():
    with Pool(2) as p:
        yield p


def test_a_result_nobody_waits_for_is_ready_after_join():
    pool = Pool(2)
    results = [pool.apply_async(identity, (i,)) for i in range(50)]
    pool.close()
    pool.join()
    assert all(r.ready() for r in results)
    assert [r.get(0) for r in results] == list(range(50))


def test_get_times_out_then_gets_the_value(pool, tmp_path):
    gate = tmp_path / "gate"
    r = pool.apply_async(wait_for_file, (str(gate), 7))
    with pytest.raises(MpTimeoutError):
        r.get(0.05)
    assert not r.ready()
    gate.touch()
    assert r.get(60) == 7
    assert r.ready() and r.successful()
    assert r.get(0) == 7  # again, from the result


def test_every_thread_waiting_for_one_result_gets_it(pool, tmp_path):
    gate = tmp_path / "gate"
    r = pool.apply_async(wait_for_file, (str(gate), 11))
    got = []
    threads = [threading.Thread(target=lambda: got.append(r.get(60))) for _ in range(4)]
    for t in threads:
        t.start()
    gate.touch()
    for t in threads:
        t.join(90)
    assert got == [11] * 4


def test_callbacks_still_run_and_errors_still_raise(pool):
    seen = []
    done = threading.Event()
    r = pool.apply_async(identity, (3,), callback=lambda v: (seen.append(v), done.set()))
    assert r.get(60) == 3
    assert done.wait(60) and seen == [3]
    r = pool.apply_async(int, ("not a number",))
    with pytest.raises(ValueError, match="invalid literal"):
        r.get(60)
    assert r.ready() and not r.successful()


def test_terminate_ends_a_wait_in_get(tmp_path):
    pool = Pool(1)
    r = pool.apply_async(wait_for_file, (str(tmp_path / "never"), 1))
    outcome = []

    def waiter():
        try:
            outcome.append(r.get())
        except BaseException as exc:  # noqa: BLE001 - what get() raised is the point
            outcome.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    pool.terminate()
    pool.join()
    t.join(60)
    assert not t.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], PoolTerminatedError)


def test_future_result_times_out_then_returns_and_runs_done_callbacks(tmp_path):
    gate = tmp_path / "gate"
    with ProcessPoolExecutor(2) as ex:
        f = ex.submit(wait_for_file, str(gate), 5)
        called = []
        f.add_done_callback(lambda fut: called.append(fut.result()))
        with pytest.raises(cf.TimeoutError):
            f.result(timeout=0.05)
        gate.touch()
        assert f.result(timeout=60) == 5
        wait_until(lambda: called == [5], 60, "the done callback")
        assert [ex.submit(identity, i).result() for i in range(20)] == list(range(20))
        assert ex.submit(int, "x").exception(60).__class__ is ValueError
        with pytest.raises(ValueError):
            ex.submit(int, "y").result(60)
