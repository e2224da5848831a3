"""The same test bodies against ``multiprocessing.Pool`` and ``distripool.Pool``.

Every test takes ``make``, a pool factory with the signature of
``multiprocessing.Pool``; it is run three times: with the standard library's
pool, with distripool's embedded default, and with distripool on a remote
worker (another process connected over TCP, two executors). A difference in
behaviour shows up here as a failing test. Deliberate differences are listed
in docs/api.md and tested in test_embedded.py instead.
"""

from __future__ import annotations

import gc
import logging
import logging.handlers
import multiprocessing
import multiprocessing.pool
import os
import pickle
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.pool import MaybeEncodingError, RemoteTraceback

import pytest

import distripool
from conftest import TESTS, ReadAhead, alive, wait_until

KINDS = ["multiprocessing", "distripool", "distripool-remote"]


@pytest.fixture(params=KINDS)
def make(request):
    """``make(processes=2, ...)`` builds a pool of the kind under test; every
    pool made is terminated at the end of the test."""
    made = []

    def factory(processes=2, *args, **kwargs):
        if request.param == "multiprocessing":
            pool = multiprocessing.pool.Pool(processes, *args, **kwargs)
        elif request.param == "distripool":
            pool = distripool.Pool(processes, *args, **kwargs)
        else:
            orch = request.getfixturevalue("remote_orchestrator")
            pool = distripool.Pool(processes, *args, orchestrator=orch, **kwargs)
        made.append(pool)
        return pool

    factory.kind = request.param
    factory.forget = lambda pool: made.remove(pool)
    yield factory
    for pool in made:
        pool.terminate()
        pool.join()


# -- functions the tests run (module level, so multiprocessing can pickle them) --


def square(x):
    return x * x


def add(x, y=0):
    return x + y


def pid_and_item(x):
    return os.getpid(), x


def getpid(_=None):
    return os.getpid()


def sleep_and_return(t):
    time.sleep(t)
    return t


def fail_on(x, bad=3, delay=0.0):
    if x == bad:
        time.sleep(delay)
        raise KeyError(f"bad item {x}")
    return x


def fail_odd(x):
    """Items 1 and 3 fail, in that order when one executor runs them all."""
    if x in (1, 3):
        raise ValueError("first" if x == 1 else "second")
    return x


def make_lock(_=None):
    return threading.Lock()


INIT_CALLS = 0
INIT_VALUE = None


def initializer(value):
    global INIT_CALLS, INIT_VALUE
    INIT_CALLS += 1
    INIT_VALUE = value


def read_init(_=None):
    return os.getpid(), INIT_CALLS, INIT_VALUE


def record_pid_and_stall(path):
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(path + ".tmp", path)
    time.sleep(300)


class Payload:
    """A result whose copies in the driver can be watched with weakrefs."""

    def __init__(self, n):
        self.n = n


def identity(x):
    return x


def failing_source(n):
    yield from range(n)
    raise RuntimeError("the input broke")


# -- constructor -----------------------------------------------------------


def test_constructor_rejects_bad_arguments(make):
    with pytest.raises(ValueError):
        make(0)
    with pytest.raises(ValueError):
        make(-1)
    with pytest.raises(TypeError):
        make(2, initializer=3)
    with pytest.raises(ValueError):
        make(2, maxtasksperchild=0)
    with pytest.raises(ValueError):
        make(2, maxtasksperchild="3")


def test_context_is_accepted(make):
    pool = make(2, context=multiprocessing.get_context("spawn"))
    assert pool.apply(square, (4,)) == 16


# -- initializer and maxtasksperchild ----------------------------------------


def test_initializer_runs_once_per_executor_before_its_tasks(make):
    pool = make(2, initializer=initializer, initargs=("ready",))
    seen = pool.map(read_init, range(40), chunksize=1)
    assert {value for _, _, value in seen} == {"ready"}
    calls_per_pid = {pid: calls for pid, calls, _ in seen}
    assert set(calls_per_pid.values()) == {1}


def test_maxtasksperchild_replaces_executors(make):
    pool = make(2, maxtasksperchild=1)
    pids = pool.map(getpid, range(6), chunksize=1)
    assert len(set(pids)) == 6
    assert pool.map(square, range(4)) == [0, 1, 4, 9]


# -- chunksize ---------------------------------------------------------------


def _assert_runs_of(results, chunksize):
    for start in range(0, len(results), chunksize):
        block = results[start : start + chunksize]
        assert len({pid for pid, _ in block}) == 1, f"chunk at {start} was split: {block}"
    assert [x for _, x in results] == list(range(len(results)))


def test_explicit_chunksize_keeps_each_chunk_in_one_process(make):
    pool = make(2)
    _assert_runs_of(pool.map(pid_and_item, range(40), chunksize=7), 7)
    _assert_runs_of(list(pool.imap(pid_and_item, range(40), chunksize=6)), 6)


def test_default_chunksize_rule(make):
    # 40 items on 2 processes: chunks of ceil(40 / (2 * 4)) = 5.
    pool = make(2)
    _assert_runs_of(pool.map(pid_and_item, range(40)), 5)
    _assert_runs_of(pool.starmap(pid_and_item, [(x,) for x in range(40)]), 5)


def test_imap_chunksize_below_one_is_an_error(make):
    pool = make(2)
    with pytest.raises(ValueError):
        pool.imap(square, range(3), chunksize=0)
    with pytest.raises(ValueError):
        pool.imap_unordered(square, range(3), chunksize=-1)


# -- results -------------------------------------------------------------------


def test_every_method_returns_the_right_results(make):
    pool = make(2)
    assert pool.apply(add, (1,), {"y": 2}) == 3
    assert pool.apply_async(add, (2, 3)).get(30) == 5
    assert pool.map(square, range(100)) == [x * x for x in range(100)]
    assert pool.map_async(square, range(10)).get(30) == [x * x for x in range(10)]
    assert pool.starmap(add, [(1, 2), (3, 4)]) == [3, 7]
    assert pool.starmap_async(add, [(5, 6)]).get(30) == [11]
    assert list(pool.imap(square, range(50))) == [x * x for x in range(50)]
    assert sorted(pool.imap_unordered(square, range(50))) == [x * x for x in range(50)]


def test_empty_iterables_give_empty_results(make):
    pool = make(2)
    assert pool.map(square, []) == []
    assert pool.starmap(add, []) == []
    assert pool.map_async(square, []).get(30) == []
    assert list(pool.imap(square, [])) == []
    assert list(pool.imap_unordered(square, iter([]))) == []


def test_async_result_protocol(make):
    pool = make(2)
    r = pool.apply_async(sleep_and_return, (1.0,))
    assert not r.ready()
    with pytest.raises(ValueError):
        r.successful()
    with pytest.raises(multiprocessing.TimeoutError):
        r.get(timeout=0.01)
    assert r.wait(0.01) is None
    assert r.get(timeout=60) == 1.0
    assert r.ready() and r.successful()
    failed = pool.apply_async(fail_on, (3,))
    failed.wait(60)
    assert failed.ready() and not failed.successful()


def test_callbacks_run_once_on_a_result_thread(make):
    pool = make(2)
    calls = []
    r = pool.map_async(square, range(8), callback=lambda v: calls.append((v, threading.current_thread())))
    assert r.get(60) == [x * x for x in range(8)]
    assert len(calls) == 1
    value, thread = calls[0]
    assert value == [x * x for x in range(8)]
    assert thread is not threading.main_thread()

    errors = []
    e = pool.apply_async(fail_on, (3,), error_callback=errors.append)
    with pytest.raises(KeyError):
        e.get(60)
    assert len(errors) == 1 and isinstance(errors[0], KeyError)

    ok = []
    pool.apply_async(add, (1, 1), callback=ok.append).get(60)
    assert ok == [2]


def test_map_async_first_error_wins(make, spawn_worker):
    # One executor runs the items in order, so item 1's failure arrives
    # before item 3's; the shared remote worker has two, so the remote case
    # gets a worker of its own with one.
    if make.kind == "remote":
        orch = distripool.Orchestrator("127.0.0.1:0", authkey=b"first-error")
        spawn_worker(orch.addresses[0], key=b"first-error", processes=1)
        assert orch.wait_for_workers(1, timeout=60)
        pool = distripool.Pool(orchestrator=orch)
    else:
        orch = None
        pool = make(1)
    try:
        errors = []
        r = pool.map_async(fail_odd, range(6), chunksize=1, error_callback=errors.append)
        with pytest.raises(ValueError, match="first"):
            r.get(60)
        assert len(errors) == 1 and str(errors[0]) == "first"
    finally:
        if orch is not None:
            pool.terminate()
            orch.close()


def test_imap_next_timeout_and_end(make):
    pool = make(2)
    it = pool.imap(sleep_and_return, [0.5])
    with pytest.raises(multiprocessing.TimeoutError):
        it.next(timeout=0.01)
    assert it.next(timeout=60) == 0.5
    with pytest.raises(StopIteration):
        it.next(timeout=60)


def test_imap_unordered_yields_results_as_they_finish(make):
    pool = make(2)
    it = pool.imap_unordered(sleep_and_return, [2.0, 0.0])
    assert it.next(timeout=60) == 0.0
    assert it.next(timeout=60) == 2.0


# -- errors --------------------------------------------------------------------


def test_task_exception_has_its_type_and_a_remote_traceback(make):
    pool = make(2)
    with pytest.raises(KeyError) as info:
        pool.map(fail_on, range(10))
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "fail_on" in str(info.value.__cause__)
    with pytest.raises(KeyError):
        pool.apply(fail_on, (3,))
    it = pool.imap(fail_on, range(5))
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(KeyError):
        next(it)
    assert pool.map(square, [2]) == [4]


def test_unpicklable_result_is_a_maybe_encoding_error(make):
    pool = make(2)
    with pytest.raises(MaybeEncodingError):
        pool.apply(make_lock)
    with pytest.raises(MaybeEncodingError):
        pool.map(make_lock, range(3))
    assert pool.apply(add, (2, 2)) == 4


def test_errors_of_the_input_iterable_reach_the_caller(make):
    pool = make(2)
    with pytest.raises(RuntimeError, match="input broke"):
        pool.map(square, failing_source(3))
    it = pool.imap(square, failing_source(2))
    assert next(it) == 0 and next(it) == 1
    with pytest.raises(RuntimeError, match="input broke"):
        next(it)


# -- lifecycle -------------------------------------------------------------------


def test_close_and_join_state_machine(make):
    pool = make(2)
    with pytest.raises(ValueError):
        pool.join()  # still running
    r = pool.map_async(square, range(20), chunksize=1)
    pool.close()
    for call in (
        lambda: pool.apply_async(square, (1,)),
        lambda: pool.map(square, [1]),
        lambda: pool.starmap(add, [(1, 2)]),
        lambda: pool.imap(square, [1]),
        lambda: pool.imap_unordered(square, [1]),
    ):
        with pytest.raises(ValueError, match="Pool not running"):
            call()
    with pytest.raises(ValueError):
        pool.__enter__()
    pool.join()
    assert r.get(0) == [x * x for x in range(20)]
    pool.terminate()  # after close and join: harmless


def _stall_and_find(pool, tmp_path):
    marker = str(tmp_path / "pid")
    pool.apply_async(record_pid_and_stall, (marker,))
    wait_until(lambda: os.path.exists(marker), 60, "the task to start")
    with open(marker) as f:
        return int(f.read())


def test_terminate_stops_running_tasks(make, tmp_path):
    pool = make(2)
    pid = _stall_and_find(pool, tmp_path)
    pool.terminate()
    pool.join()
    wait_until(lambda: not alive(pid), 60, f"the executor {pid} running the task to stop")


def test_exit_of_with_block_terminates(make, tmp_path):
    with make(2) as pool:
        pid = _stall_and_find(pool, tmp_path)
    wait_until(lambda: not alive(pid), 60, f"the executor {pid} running the task to stop")


def test_garbage_collected_running_pool_warns(make):
    pool = make(2)
    assert pool.apply(square, (3,)) == 9
    make.forget(pool)
    with pytest.warns(ResourceWarning):
        del pool
        gc.collect()


@pytest.mark.parametrize("how", ["map", "map_async", "imap", "imap_unordered", "starmap"])
def test_results_are_freed_once_the_caller_drops_them(make, how):
    """Nothing of the pool keeps a delivered result alive (bpo-29861)."""
    pool = make(2)
    objs = [Payload(i) for i in range(10)]
    if how == "map":
        r = pool.map(identity, objs)
    elif how == "map_async":
        r = pool.map_async(identity, objs).get(60)
    elif how == "starmap":
        r = pool.starmap(identity, [(o,) for o in objs])
    else:
        r = list(getattr(pool, how)(identity, objs))
    assert sorted(x.n for x in r) == list(range(10))
    refs = [weakref.ref(x) for x in r]
    del r, objs
    # The pool's result thread may still be finishing the batch it delivered.
    wait_until(
        lambda: gc.collect() is not None and all(ref() is None for ref in refs), 10, "the results to be freed"
    )
    assert pool.apply(square, (4,)) == 16


def test_pool_cannot_be_pickled(make):
    pool = make(2)
    with pytest.raises(NotImplementedError):
        pickle.dumps(pool)


def test_classes_of_the_drivers_script_are_arguments_and_results(make, tmp_path):
    """A script's own classes go in and come back as the script's classes;
    its ``if __name__ == "__main__":`` block runs once, in the driver; the
    traceback of its function names its file and shows the line. The
    executors get its source from the driver (the file is gone by then)."""
    script = tmp_path / "script.py"
    script.write_text((TESTS / "scripts" / "main_classes.py").read_text())
    marker = tmp_path / "marker"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(script), make.kind, str(marker)],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
    assert len(marker.read_text().splitlines()) == 1, "the script's main block ran in an executor"


# -- buffersize (Python 3.14's imap argument) -----------------------------
# The standard library of the Python this suite runs on may lack it; these
# bodies check distripool's pools against what CPython's does.


@pytest.fixture(params=["distripool", "distripool-remote"])
def make_dp(request):
    """Like ``make``, for distripool's kinds only."""
    made = []

    def factory(processes=2):
        if request.param == "distripool":
            pool = distripool.Pool(processes)
        else:
            pool = distripool.Pool(processes, orchestrator=request.getfixturevalue("remote_orchestrator"))
        made.append(pool)
        return pool

    yield factory
    for pool in made:
        pool.terminate()
        pool.join()


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_imap_buffersize_is_checked_as_the_standard_library_does(make_dp, method):
    pool = make_dp()
    imap = getattr(pool, method)
    for bad in ("foo", 2.0):
        with pytest.raises(TypeError, match="^buffersize must be an integer or None$"):
            imap(square, range(4), buffersize=bad)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=r"^buffersize must be None or > 0$"):
            imap(square, range(4), buffersize=bad)
    assert sorted(imap(square, range(10), buffersize=1)) == [x * x for x in range(10)]


@pytest.mark.parametrize("chunksize", [1, 3])
def test_imap_buffersize_bounds_how_far_the_input_is_read(make_dp, chunksize):
    """At most ``buffersize`` chunks are submitted and not yet handed out:
    the input runs no further ahead of the caller than that, one chunk more
    once a result is taken (before the loop counts it), and one read while
    waiting for room."""
    pool = make_dp()
    buffersize = 2
    source = ReadAhead(60)
    it = pool.imap(square, iter(source), chunksize=chunksize, buffersize=buffersize)
    out = []
    for _ in range(60):
        # Let the feeder fill the buffer before taking the next result.
        wait_until(lambda: source.pulled >= min(60, source.taken + buffersize * chunksize), 30, "the feeder")
        out.append(it.next(timeout=30))
        source.took()
    assert out == [x * x for x in range(60)]
    assert source.lead <= (buffersize + 2) * chunksize, vars(source)


# -- multiprocessing.Manager() proxies --------------------------------------

PROXY = None


def keep_proxy(proxy):
    global PROXY
    PROXY = proxy


def record_square(args):
    shared, x = args
    shared[x] = x * x
    return x


def note_in_kept_proxy(x):
    PROXY.append(x)
    return x


def put_on(queue, value):
    queue.put(value)


def test_manager_proxies_work_in_executors(make):
    """Proxies in ``initargs`` and as arguments connect to the driver's
    manager: the executors take on the driver's authkey for its tasks."""
    with multiprocessing.Manager() as manager:
        shared, kept, queue = manager.dict(), manager.list(), manager.Queue()
        pool = make(2, initializer=keep_proxy, initargs=(kept,))
        assert sorted(pool.map(record_square, [(shared, x) for x in range(6)], chunksize=1)) == list(range(6))
        assert dict(shared) == {x: x * x for x in range(6)}
        assert sorted(pool.map(note_in_kept_proxy, range(4), chunksize=1)) == list(range(4))
        assert sorted(kept) == list(range(4))
        pool.apply(put_on, (queue, "hello"))
        assert queue.get(timeout=30) == "hello"
        pool.terminate()
        pool.join()


# -- multiprocessing's own queues, locks and shared memory in initargs -----------

INHERITED = None
LOGGER = "distripool-tests-inherited"


def use_inherited(queue, *rest):
    """The logging cookbook's initializer: log through a queue."""
    global INHERITED
    INHERITED = (queue, *rest)
    logger = logging.getLogger(LOGGER)
    logger.handlers[:] = [logging.handlers.QueueHandler(queue)]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def touch_inherited(i):
    _, lock, counter, plain, array, semaphore, event = INHERITED
    logging.getLogger(LOGGER).info("item %d", i)
    with lock:
        plain.value += 1
    with counter.get_lock():  # the Value's own RLock
        counter.value += 1
    array[i] = i * i
    with semaphore:
        pass
    return event.wait(30)


def log_lines(i):
    for k in range(5):
        logging.getLogger(LOGGER).info("%d.%d %s", i, k, "x" * 3000)
    return i


@pytest.mark.parametrize("context", ["default", "spawn"])
def test_multiprocessing_objects_in_initargs(make, context):
    """Queue, Lock, Semaphore, Value, Array and Event reach the executors
    through ``initargs``, as they reach a spawned child; made in the
    default context (fork, before Python 3.14) or in spawn's. A remote
    worker cannot inherit them: the error names the object and points to
    ``Manager()``."""
    ctx = multiprocessing if context == "default" else multiprocessing.get_context(context)
    initargs = (
        ctx.Queue(),
        ctx.Lock(),
        ctx.Value("i", 0),
        ctx.Value("i", 0, lock=False),
        ctx.Array("i", 8),
        ctx.Semaphore(2),
        ctx.Event(),
    )
    if make.kind == "distripool-remote":
        with pytest.raises(
            RuntimeError, match=r"initargs\[0\] is a multiprocessing\.queues\.Queue.*Manager\(\)"
        ):
            make(2, initializer=use_inherited, initargs=initargs)
        with pytest.raises(RuntimeError, match=r"initargs\[1\] is a multiprocessing\.connection\.Connection"):
            make(2, initializer=use_inherited, initargs=(None, multiprocessing.Pipe()[0]))
        return
    queue, _, counter, plain, array, _, event = initargs
    pool = make(2, initializer=use_inherited, initargs=initargs)
    result = pool.map_async(touch_inherited, range(8), chunksize=1)
    event.set()
    assert result.get(timeout=60) == [True] * 8
    assert sorted(queue.get(timeout=30).getMessage() for _ in range(8)) == sorted(
        f"item {i}" for i in range(8)
    )
    assert (counter.value, plain.value) == (8, 8)
    assert list(array) == [i * i for i in range(8)]


def test_what_tasks_put_on_a_queue_is_there_after_join(make):
    """A task's ``QueueHandler`` puts through a feeder thread; ``join``
    returns once the executors have flushed it, as the standard pool's
    workers do on exit. (On a remote worker, through a Manager() queue.)"""
    with multiprocessing.Manager() as manager:
        queue = manager.Queue() if make.kind == "distripool-remote" else multiprocessing.Queue()
        got = []

        def listen():
            while (record := queue.get(timeout=120)) is not None:
                got.append(record.getMessage())

        listener = threading.Thread(target=listen)
        listener.start()
        try:
            pool = make(2, initializer=use_inherited, initargs=(queue,))
            assert pool.map(log_lines, range(40)) == list(range(40))
            pool.close()
            pool.join()
        finally:
            queue.put(None)
            listener.join(timeout=150)
        assert sorted(got) == sorted(f"{i}.{k} {'x' * 3000}" for i in range(40) for k in range(5))
