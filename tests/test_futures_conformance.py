"""The same test bodies against ``concurrent.futures.ProcessPoolExecutor`` and
``distripool.ProcessPoolExecutor`` (embedded, and on a remote worker)."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import multiprocessing
import os
import sys
import threading
import time
import weakref
from concurrent.futures.process import BrokenProcessPool

import pytest

import distripool
from conftest import ReadAhead, wait_until

KINDS = ["concurrent.futures", "distripool", "distripool-remote"]


@pytest.fixture(params=KINDS)
def make(request):
    made = []

    def factory(max_workers=2, **kwargs):
        if request.param == "concurrent.futures":
            ex = cf.ProcessPoolExecutor(max_workers, **kwargs)
        elif request.param == "distripool":
            ex = distripool.ProcessPoolExecutor(max_workers, **kwargs)
        else:
            orch = request.getfixturevalue("remote_orchestrator")
            ex = distripool.ProcessPoolExecutor(max_workers, orchestrator=orch, **kwargs)
        made.append(ex)
        return ex

    factory.kind = request.param
    yield factory
    for ex in made:
        ex.shutdown(wait=True, cancel_futures=True)


def square(x):
    return x * x


def add(x, y=0):
    return x + y


def fail(x):
    raise KeyError(f"bad {x}")


def sleep_and_return(t):
    time.sleep(t)
    return t


def wait_for_file(path, started=None, late=None):
    """Create ``started`` (if given), then block until ``path`` exists
    (bounded); create ``late`` (if given) once it has run 0.2 s."""
    if started:
        open(started, "w").close()
    t0 = time.monotonic()
    while not os.path.exists(path):
        if late and time.monotonic() > t0 + 0.2 and not os.path.exists(late):
            open(late, "w").close()
        if time.monotonic() > t0 + 60:
            raise TimeoutError(path)
        time.sleep(0.01)
    return "released"


def touch(path):
    open(path, "w").close()
    return path


INIT_VALUE = None


def initializer(v):
    global INIT_VALUE
    INIT_VALUE = v


def read_init(_=None):
    return INIT_VALUE


def getpid(_=None):
    return os.getpid()


def test_constructor_checks(make):
    with pytest.raises(ValueError):
        make(0)
    with pytest.raises(TypeError):
        make(2, initializer=3)


def test_submit_returns_real_futures(make):
    ex = make()
    futures = [ex.submit(square, i) for i in range(20)]
    assert all(isinstance(f, cf.Future) for f in futures)
    assert sorted(f.result(timeout=60) for f in cf.as_completed(futures, timeout=60)) == [
        i * i for i in range(20)
    ]
    done, not_done = cf.wait(futures, timeout=60)
    assert len(done) == 20 and not not_done
    assert ex.submit(add, 1, y=2).result(60) == 3


def test_task_exception_is_the_futures_exception(make):
    ex = make()
    f = ex.submit(fail, 7)
    exc = f.exception(timeout=60)
    assert isinstance(exc, KeyError) and "bad 7" in str(exc)
    assert "Traceback" in str(exc.__cause__)
    with pytest.raises(KeyError):
        f.result()
    assert ex.submit(square, 3).result(60) == 9


def test_map_in_order_with_chunks_and_several_iterables(make):
    ex = make()
    assert list(ex.map(square, range(30))) == [i * i for i in range(30)]
    assert list(ex.map(square, range(30), chunksize=7)) == [i * i for i in range(30)]
    assert list(ex.map(add, [1, 2, 3], [10, 20])) == [11, 22]
    assert list(ex.map(square, [])) == []


def test_map_raises_at_the_failing_item(make):
    ex = make()
    it = ex.map(fail, [1])
    with pytest.raises(KeyError):
        next(it)


def test_map_timeout(make):
    ex = make()
    it = ex.map(sleep_and_return, [2.0], timeout=0.05)
    with pytest.raises(cf.TimeoutError):  # the builtin TimeoutError from Python 3.11 on
        next(it)


def executors(ex) -> int:
    """How many tasks ``ex`` runs at once."""
    if isinstance(ex, cf.ProcessPoolExecutor):
        return ex._max_workers
    return ex._pool._slots()


def test_cancel_a_queued_future(make, tmp_path):
    ex = make(1)
    gate = str(tmp_path / "gate")
    blockers = [
        ex.submit(wait_for_file, gate, str(tmp_path / f"started{i}"), str(tmp_path / f"late{i}"))
        for i in range(executors(ex))
    ]
    # Busy for 0.2 s: long enough that a worker whose earlier tasks were short
    # has gone back to holding one task per executor beside the running one
    # (it does after 2 ms), so that the tasks below stay queued.
    wait_until(
        lambda: all(os.path.exists(str(tmp_path / f"late{i}")) for i in range(len(blockers))),
        60,
        "every executor to be busy",
    )
    others = [ex.submit(touch, str(tmp_path / f"ran{i}")) for i in range(10)]
    last = others[-1]
    assert last.cancel()
    assert last.cancelled() and last.done()
    with pytest.raises(cf.CancelledError):
        last.result()
    touch(gate)
    assert [b.result(60) for b in blockers] == ["released"] * len(blockers)
    for f in others[:-1]:
        f.result(60)
    assert not os.path.exists(str(tmp_path / "ran9")), "a cancelled task ran"
    assert not blockers[0].cancel(), "a finished future cannot be cancelled"


def test_tasks_queued_behind_a_long_one_stay_cancellable_after_short_ones(tmp_path):
    # Thousands of tiny tasks first: the executor then holds many at once.
    # Once a long task shows itself, the queue behind it shrinks back, so the
    # tasks submitted after it stay with the orchestrator and can be cancelled.
    with distripool.ProcessPoolExecutor(1) as ex:
        assert list(ex.map(abs, range(-3000, 0))) == list(range(3000, 0, -1))
        gate, late = str(tmp_path / "gate"), str(tmp_path / "late")
        blocker = ex.submit(wait_for_file, gate, None, late)
        wait_until(lambda: os.path.exists(late), 60, "the long task to have run 0.2 s")
        others = [ex.submit(touch, str(tmp_path / f"ran{i}")) for i in range(10)]
        assert others[-1].cancel()
        touch(gate)
        assert blocker.result(60) == "released"
        assert [f.result(60) for f in others[:-1]] == [str(tmp_path / f"ran{i}") for i in range(9)]
        assert not os.path.exists(str(tmp_path / "ran9"))


def test_shutdown_cancel_futures_and_submit_after_shutdown(make, tmp_path):
    import threading

    ex = make(1)
    gate = str(tmp_path / "gate")
    blockers = [ex.submit(wait_for_file, gate) for _ in range(executors(ex))]
    others = [ex.submit(touch, str(tmp_path / f"ran{i}")) for i in range(10)]

    def open_gate_once_cancelled():
        # shutdown(wait=True) blocks on the blocker: release it from here,
        # once shutdown has cancelled what was still queued.
        deadline = time.monotonic() + 60
        while not any(f.cancelled() for f in others) and time.monotonic() < deadline:
            time.sleep(0.01)
        touch(gate)

    opener = threading.Thread(target=open_gate_once_cancelled)
    opener.start()
    ex.shutdown(wait=True, cancel_futures=True)
    opener.join(60)
    assert [b.result(0) for b in blockers] == ["released"] * len(blockers)
    assert any(f.cancelled() for f in others), "nothing was cancelled"
    for i, f in enumerate(others):
        assert f.done()
        if f.cancelled():
            assert not os.path.exists(str(tmp_path / f"ran{i}")), f"cancelled task {i} ran"
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)


def test_context_manager_waits_for_the_work(make):
    with make() as ex:
        f = ex.submit(sleep_and_return, 0.2)
    assert f.done() and f.result() == 0.2


def test_initializer_and_max_tasks_per_child(make):
    ctx = multiprocessing.get_context("spawn")
    ex = make(2, mp_context=ctx, initializer=initializer, initargs=("ok",))
    assert set(ex.map(read_init, range(10))) == {"ok"}
    if make.kind == "concurrent.futures" and sys.version_info < (3, 11):
        # This Python's standard library predates max_tasks_per_child.
        with pytest.raises(TypeError, match="max_tasks_per_child"):
            make(1, mp_context=ctx, max_tasks_per_child=1)
        return
    ex2 = make(1, mp_context=ctx, max_tasks_per_child=1)
    pids = [ex2.submit(getpid).result(60) for _ in range(3)]
    assert len(set(pids)) == 3


def has_buffersize(ex) -> bool:
    """distripool's executors have it on every Python; the standard one
    from 3.14 on."""
    return isinstance(ex, distripool.ProcessPoolExecutor) or sys.version_info >= (3, 14)


def test_map_buffersize_is_checked_and_bounds_how_far_the_input_is_read(make):
    """Python 3.14's ``buffersize``: checked as the standard library does,
    and at most that many calls are submitted and not yet yielded."""
    ex = make(2)
    if not has_buffersize(ex):
        # This Python's standard library predates it: its map refuses the
        # argument, which is the one behaviour to compare with.
        with pytest.raises(TypeError, match="buffersize"):
            ex.map(square, range(4), buffersize=2)
        return
    for bad in ("foo", 2.0):
        with pytest.raises(TypeError, match="^buffersize must be an integer or None$"):
            ex.map(square, range(4), buffersize=bad)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=r"^buffersize must be None or > 0$"):
            ex.map(square, range(4), buffersize=bad)
    source = ReadAhead(40)
    out = []
    for y in ex.map(square, iter(source), buffersize=2):
        out.append(y)
        source.took()
    assert out == [x * x for x in range(40)]
    # Two submitted and not yielded, one more once a result is taken (before
    # the loop counts it), and one read while waiting for room.
    assert source.lead <= 2 + 2, vars(source)


def test_map_with_buffersize_reads_no_more_after_shutdown(make):
    ex = make(2)
    if not has_buffersize(ex):
        with pytest.raises(TypeError, match="buffersize"):
            ex.map(square, range(4), buffersize=2)
        return
    results = ex.map(square, iter(range(1000)), buffersize=2)
    assert next(results) == 0
    ex.shutdown(wait=True)
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        list(results)


# -- the executor's own exceptions (as CPython's test_concurrent_futures has them)


def identity(x):
    return x


def make_lock(_=None):
    return threading.Lock()


class Held:
    """A result whose copies in the driver can be watched with weakrefs."""

    def __init__(self, n):
        self.n = n


def test_a_task_whose_worker_dies_raises_broken_process_pool(make):
    ex = make(2)
    with pytest.raises(BrokenProcessPool):
        ex.submit(os._exit, 1).result(timeout=60)


def test_a_result_that_cannot_be_pickled_raises_what_pickling_raised(make):
    ex = make(2)
    with pytest.raises(TypeError, match="pickle") as caught:
        ex.submit(make_lock).result(timeout=60)
    assert "Traceback" in str(caught.value.__cause__)
    with pytest.raises(TypeError, match="pickle"):
        list(ex.map(make_lock, [1], timeout=60))


def test_an_argument_that_cannot_be_pickled_raises_from_result(make):
    ex = make(2)
    future = ex.submit(identity, threading.Lock())
    with pytest.raises(TypeError, match="pickle"):
        future.result(timeout=60)
    results = ex.map(identity, [1, threading.Lock(), 3], timeout=60)
    assert next(results) == 1
    with pytest.raises(TypeError, match="pickle"):
        next(results)


def test_a_finished_future_frees_its_result_once_dropped(make):
    ex = make(2)
    future = ex.submit(Held, 7)
    ref = weakref.ref(future.result(timeout=60))
    del future
    wait_until(lambda: gc.collect() is not None and ref() is None, 10, "the result to be freed")
    assert ex.submit(identity, 1).result(timeout=60) == 1
