"""The embedded default: ``Pool()`` with local executors and no cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import distripool
from conftest import TESTS, alive, wait_until
from distripool import Pool


def square(x):
    return x * x


def add(x, y):
    return x + y


def sleep_and_square(seconds, x):
    time.sleep(seconds)
    return x * x


def fail_on(x, bad=3):
    if x == bad:
        raise KeyError(f"bad item {x}")
    return x


def pid_of(_):
    return os.getpid()


@pytest.fixture(scope="module")
def pool():
    with Pool(2) as p:
        yield p


def test_map_returns_results_in_order(pool):
    assert pool.map(square, range(100)) == [x * x for x in range(100)]


def test_map_with_explicit_chunksizes(pool):
    for chunksize in (1, 3, 7, 100, 1000):
        assert pool.map(square, range(50), chunksize) == [x * x for x in range(50)]


def test_map_over_a_generator(pool):
    assert pool.map(square, (x for x in range(10))) == [x * x for x in range(10)]


def test_empty_iterables_return_empty_lists(pool):
    assert pool.map(square, []) == []
    assert pool.starmap(add, []) == []
    assert list(pool.imap(square, [])) == []
    assert list(pool.imap_unordered(square, [])) == []


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_imap_iterators_have_the_length_of_their_input(pool, method):
    it = getattr(pool, method)(square, range(7), 3)
    assert len(it) == 7  # the items, not the chunks
    assert sorted(it) == [x * x for x in range(7)]
    empty = getattr(pool, method)(square, [])
    assert len(empty) == 0 and bool(empty) is True and list(empty) == []
    lazy = getattr(pool, method)(square, (x for x in range(3)))
    with pytest.raises(TypeError, match="no len"):
        len(lazy)
    assert bool(lazy) is True
    assert sorted(lazy) == [0, 1, 4]


def test_apply_and_starmap(pool):
    assert pool.apply(add, (2, 3)) == 5
    assert pool.apply(add, (), {"x": 1, "y": 2}) == 3
    assert pool.starmap(add, [(i, i + 1) for i in range(20)]) == [2 * i + 1 for i in range(20)]


def test_lambdas_and_closures_work(pool):
    offset = 1000
    assert pool.map(lambda x: x + offset, range(5)) == [1000, 1001, 1002, 1003, 1004]

    def make_adder(n):
        def adder(x):
            return x + n

        return adder

    assert pool.map(make_adder(7), [1, 2]) == [8, 9]
    assert pool.apply(lambda: __import__("math").log2(8)) == 3.0


def test_imap_is_ordered_and_imap_unordered_complete(pool):
    assert list(pool.imap(square, range(30), chunksize=4)) == [x * x for x in range(30)]
    assert sorted(pool.imap_unordered(square, range(30))) == [x * x for x in range(30)]


def test_imap_next_with_timeout(pool):
    it = pool.imap(square, range(3))
    assert [it.next(timeout=30) for _ in range(3)] == [0, 1, 4]
    with pytest.raises(StopIteration):
        it.next(timeout=30)


def test_async_results(pool):
    r = pool.map_async(square, range(10))
    assert r.get(timeout=30) == [x * x for x in range(10)]
    assert r.ready() and r.successful()
    a = pool.apply_async(add, (1, 2))
    a.wait(30)
    assert a.get() == 3


def test_get_timeout_raises_multiprocessing_timeout_error(pool):
    import multiprocessing

    r = pool.apply_async(time.sleep, (1.0,))
    with pytest.raises(multiprocessing.TimeoutError):
        r.get(timeout=0.01)
    with pytest.raises(ValueError):
        # not ready yet
        r.successful()
    assert r.get(timeout=30) is None


def test_callbacks_run_once(pool):
    got, errors = [], []
    done = threading.Event()
    r = pool.map_async(square, range(5), callback=lambda v: (got.append(v), done.set()))
    r.get(30)
    assert done.wait(30)
    assert got == [[0, 1, 4, 9, 16]]
    e = pool.apply_async(fail_on, (3,), error_callback=errors.append)
    with pytest.raises(KeyError):
        e.get(30)
    assert len(errors) == 1 and isinstance(errors[0], KeyError)


def test_task_exception_keeps_type_and_remote_traceback(pool):
    with pytest.raises(KeyError) as info:
        pool.map(fail_on, range(10))
    cause = info.value.__cause__
    assert isinstance(cause, distripool.RemoteTraceback)
    assert "fail_on" in str(cause) and "bad item 3" in str(cause)
    # The pool keeps working afterwards.
    assert pool.map(square, [3]) == [9]


def test_imap_raises_at_the_failing_item(pool):
    it = pool.imap(fail_on, range(6))
    assert [next(it), next(it), next(it)] == [0, 1, 2]
    with pytest.raises(KeyError):
        next(it)
    assert list(it) == [4, 5]


def test_error_in_input_iterable_reaches_the_caller(pool):
    def source():
        yield 1
        yield 2
        raise RuntimeError("input broke")

    it = pool.imap(square, source())
    assert next(it) == 1 and next(it) == 4
    with pytest.raises(RuntimeError, match="input broke"):
        next(it)


def test_unpicklable_result_gives_maybe_encoding_error(pool):
    from multiprocessing.pool import MaybeEncodingError

    with pytest.raises(MaybeEncodingError):
        pool.apply(lambda: threading.Lock())
    assert pool.apply(add, (1, 1)) == 2


def test_base_exceptions_in_tasks_are_results(pool):
    with pytest.raises(SystemExit):
        pool.apply(lambda: exit(3))
    with pytest.raises(KeyboardInterrupt):
        pool.apply(lambda: (_ for _ in ()).throw(KeyboardInterrupt))
    assert pool.apply(add, (2, 2)) == 4


def test_uses_the_requested_number_of_processes():
    with Pool(3) as p:
        barrier_pids = set(p.map(pid_of, range(300), chunksize=1))
    assert 1 <= len(barrier_pids) <= 3
    assert os.getpid() not in barrier_pids


def test_initializer_runs_before_tasks():
    with Pool(2, initializer=_set_global, initargs=(41,)) as p:
        assert set(p.map(_read_global, range(10))) == {42}


_GLOBAL = None


def _set_global(v):
    global _GLOBAL
    _GLOBAL = v + 1


def _read_global(_):
    return _GLOBAL


def test_lifecycle_errors():
    p = Pool(1)
    with pytest.raises(ValueError, match="still running"):
        p.join()
    p.close()
    with pytest.raises(ValueError, match="Pool not running"):
        p.map(square, [1])
    p.join()
    with pytest.raises(ValueError, match="Pool not running"):
        p.apply_async(square, (1,))


def test_close_then_join_waits_for_queued_work():
    p = Pool(2)
    r = p.map_async(square, range(40), chunksize=1)
    p.close()
    p.join()
    assert r.ready() and r.get(0) == [x * x for x in range(40)]


def test_terminate_fails_pending_results():
    p = Pool(1)
    r = p.apply_async(time.sleep, (60,))
    p.terminate()
    p.join()
    with pytest.raises(distripool.PoolTerminatedError):
        r.get(timeout=10)


def test_apply_from_many_threads_at_once_gets_each_caller_its_own_result():
    with Pool(2) as p:
        results = {}

        def caller(t):
            results[t] = [p.apply(add, (i, t * 1000)) for i in range(200)]

        threads = [threading.Thread(target=caller, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == {t: [i + t * 1000 for i in range(200)] for t in range(8)}


def test_terminate_wakes_a_caller_blocked_in_apply():
    p = Pool(1)
    errors = []

    def blocked():
        try:
            p.apply(time.sleep, (60,))
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)

    t = threading.Thread(target=blocked)
    t.start()
    wait_until(lambda: p._shared.cache, 30, "apply to be submitted")
    p.terminate()
    t.join(30)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], distripool.PoolTerminatedError)


def test_close_then_join_waits_for_a_caller_blocked_in_apply():
    p = Pool(1)
    out = []
    t = threading.Thread(target=lambda: out.append(p.apply(sleep_and_square, (0.3, 7))))
    t.start()
    wait_until(lambda: p._shared.cache, 30, "apply to be submitted")
    p.close()
    p.join()
    t.join(30)
    assert out == [49]


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError):
        Pool(0)
    with pytest.raises(TypeError):
        Pool(1, initializer=3)
    with Pool(1) as p:
        with pytest.raises(ValueError, match="Chunksize"):
            p.map(square, [1, 2], chunksize=0)
        with pytest.raises(ValueError, match="Chunksize"):
            p.imap(square, [1, 2], chunksize=0)
        with pytest.raises(TypeError):
            p.map(3, [1])


def test_pool_cannot_be_pickled():
    import pickle

    with Pool(1) as p, pytest.raises(NotImplementedError):
        pickle.dumps(p)


def test_abandoned_running_pool_warns_and_frees_its_executors():
    import gc

    p = Pool(1)
    pid = p.apply(os.getpid)
    with pytest.warns(ResourceWarning):
        del p
        gc.collect()
    wait_until(lambda: not alive(pid), 30, f"executor {pid} to exit")


def _stall_once(x, marker):
    """Item 5 records its executor's pid and stalls, once; a retry just runs."""
    if x == 5 and not os.path.exists(marker):
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(marker + ".tmp", marker)
        time.sleep(120)  # killed long before this ends
    return x * x


def test_sigkill_of_an_executor_mid_map_gives_a_complete_result(tmp_path):
    marker = str(tmp_path / "stalled")
    with Pool(2) as p:
        r = p.map_async(lambda x: _stall_once(x, marker), range(40), chunksize=1)
        wait_until(lambda: os.path.exists(marker), 60, "item 5 to start")
        with open(marker) as f:
            victim = int(f.read())
        os.kill(victim, signal.SIGKILL)
        assert r.get(timeout=60) == [x * x for x in range(40)]
        assert p._orchestrator.stats()["crashes"] == 1
        wait_until(lambda: not alive(victim), 30, "the killed executor to be reaped")
        # The replacement executor serves later work.
        assert p.map(square, range(10)) == [x * x for x in range(10)]


def test_default_executors_are_the_cpus_this_process_may_run_on():
    """``Pool()`` counts CPUs as ``os.process_cpu_count()`` does (and
    Python 3.13's ``multiprocessing``): a driver limited to one CPU gets one
    executor, not one per CPU of the machine."""
    script = (
        "import os\n"
        "import distripool\n"
        "from workloads import pid_after\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "with distripool.Pool() as pool:\n"
        "    print(len(set(pool.map(pid_after, [0.05] * 8, chunksize=1))))\n"
    )
    assert len(os.sched_getaffinity(0)) >= 2, "this test needs a machine with two CPUs"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=100,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1", done.stdout + done.stderr
