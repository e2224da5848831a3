"""The crash matrix: an error, ``sys.exit``, ``os._exit`` or a segfault at each
stage of a task's life, and the other ways a task can go wrong.

Each case checks the error type the caller gets for that one task, that the
pool still works afterwards, and that no executor process and no file
descriptor is left behind once the pool is gone.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import subprocess
import sys
import threading

import pytest

import distripool
from conftest import TESTS, alive, wait_until
from distripool import MaybeEncodingError, Pool, WorkerLostError
from workloads import crash_once

ACTIONS = ["error", "exit", "os_exit", "segfault"]


def act(action: str):
    """Do the harm: raise, exit, leave at once, or crash the interpreter."""
    if action == "error":
        raise ValueError("planned failure")
    if action == "exit":
        sys.exit(3)
    if action == "os_exit":
        os._exit(3)
    if action == "segfault":
        ctypes.string_at(0)
    raise AssertionError(action)


class HarmOnUnpickle:
    """Pickles fine; unpickling it does the harm (wherever that happens)."""

    def __init__(self, action):
        self.action = action

    def __reduce__(self):
        return act, (self.action,)


class HarmOnPickle:
    """Pickling it does the harm (wherever that happens)."""

    def __init__(self, action):
        self.action = action

    def __reduce__(self):
        act(self.action)


def identity(x):
    return x


def run_action(action):
    act(action)


def return_harm_on_pickle(action):
    return HarmOnPickle(action)


def return_harm_on_unpickle(action):
    return HarmOnUnpickle(action)


def square(x):
    return x * x


def executor_children() -> set[int]:
    """This process's executor children, alive."""
    me = os.getpid()
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        fields = stat.rsplit(") ", 1)[1].split()
        if int(fields[1]) == me and fields[0] != "Z" and b"distripool._executor" in cmd:
            out.add(int(entry))
    return out


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def warmed_up():
    # The first pool in a process sets up process-wide state that stays (the
    # runtime's signal pipe for child processes); count descriptors after it.
    with Pool(1) as p:
        p.apply(square, (1,))


@pytest.fixture
def pool(warmed_up):
    """A 2-executor pool; afterwards, no executor and no descriptor may remain."""
    gc.collect()
    children, fds = executor_children(), open_fds()
    p = Pool(2, max_crashes=3)
    yield p
    assert p.map(square, range(10)) == [x * x for x in range(10)], "the pool is unusable afterwards"
    p.terminate()
    p.join()
    del p
    gc.collect()
    wait_until(lambda: executor_children() <= children, 30, "the pool's executors to exit")
    wait_until(lambda: open_fds() <= fds, 30, f"descriptors to return to {fds} (now {open_fds()})")


# Stage 2: unpickling the task's arguments in the executor.
@pytest.mark.parametrize(
    "action, expected",
    [
        ("error", ValueError),
        ("exit", SystemExit),
        ("os_exit", WorkerLostError),
        ("segfault", WorkerLostError),
    ],
)
def test_unpickling_the_task_in_the_executor(pool, action, expected):
    with pytest.raises(expected):
        pool.apply(identity, (HarmOnUnpickle(action),))


# Stage 3: running the task.
@pytest.mark.parametrize(
    "action, expected",
    [
        ("error", ValueError),
        ("exit", SystemExit),
        ("os_exit", WorkerLostError),
        ("segfault", WorkerLostError),
    ],
)
def test_running_the_task(pool, action, expected):
    with pytest.raises(expected) as info:
        pool.apply(run_action, (action,))
    if expected is WorkerLostError:
        message = str(info.value)
        assert "after 3 attempts" in message
        cause = "exited with code 3" if action == "os_exit" else "signal 11 (SIGSEGV)"
        assert message.count(cause) == 3, message
        assert "on worker" in message and "agent pid" in message


# Stage 4: pickling the result in the executor.
@pytest.mark.parametrize(
    "action, expected",
    [
        ("error", MaybeEncodingError),
        ("exit", MaybeEncodingError),
        ("os_exit", WorkerLostError),
        ("segfault", WorkerLostError),
    ],
)
def test_pickling_the_result_in_the_executor(pool, action, expected):
    with pytest.raises(expected):
        pool.apply(return_harm_on_pickle, (action,))


# Stage 5: unpickling the result in the driver (error and exit; the others
# end the driver itself, see below).
@pytest.mark.parametrize("action", ["error", "exit"])
def test_unpickling_the_result_in_the_driver(pool, action):
    with pytest.raises(distripool.DistripoolError, match="could not be unpickled in the driver"):
        pool.apply(return_harm_on_unpickle, (action,))


# Stage 1: pickling the task in the driver (error and exit; likewise).
@pytest.mark.parametrize("action, expected", [("error", ValueError), ("exit", SystemExit)])
def test_pickling_the_task_in_the_driver(pool, action, expected):
    with pytest.raises(expected):
        pool.apply(identity, (HarmOnPickle(action),))
    with pytest.raises(expected):
        pool.map(identity, [1, HarmOnPickle(action)])


DRIVER = r"""
import os, sys
sys.path.insert(0, sys.argv[3])
from distripool import Pool
import test_faults as t
pool = Pool(2)
print(" ".join(map(str, sorted(set(pool.map(lambda _: os.getpid(), range(40), chunksize=1))))), flush=True)
stage, action = sys.argv[1], sys.argv[2]
if stage == "pickle":
    pool.apply(t.identity, (t.HarmOnPickle(action),))
else:
    pool.apply(t.return_harm_on_unpickle, (action,))
print("survived", flush=True)
"""


@pytest.mark.parametrize("stage", ["pickle", "unpickle"])
@pytest.mark.parametrize("action", ["os_exit", "segfault"])
def test_harm_that_ends_the_driver_leaves_no_executor(stage, action):
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, stage, action, str(TESTS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=60)
    pids = [int(p) for p in out.split("\n")[0].split()]
    assert pids, err
    assert "survived" not in out
    assert proc.returncode == (3 if action == "os_exit" else -signal.SIGSEGV), err
    wait_until(lambda: not any(alive(p) for p in pids), 30, "the executors to exit with their driver")


class Unpicklable(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


class NeedsTwo(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")
        self.a, self.b = a, b


def raise_unpicklable(_=None):
    raise Unpicklable("with a lock inside")


def raise_needs_two(_=None):
    raise NeedsTwo(1, 2)


def test_exceptions_that_do_not_pickle_keep_their_type(pool):
    with pytest.raises(Unpicklable, match="with a lock inside") as info:
        pool.apply(raise_unpicklable)
    assert "raise_unpicklable" in str(info.value.__cause__)
    with pytest.raises(NeedsTwo, match="1 and 2") as info:
        pool.apply(raise_needs_two)
    assert (info.value.a, info.value.b) == (1, 2)


def test_results_over_the_size_limit_fail_alone():
    with Pool(1, max_message_size=1 << 20) as p:
        with pytest.raises(distripool.ResultTooLargeError):
            p.apply(bytes, (2 << 20,))
        with pytest.raises(ValueError, match="exceeds the frame limit"):
            p.apply(len, (b"x" * (2 << 20),))
        assert p.apply(len, (b"x" * 1000,)) == 1000


def test_base_exceptions_are_results(pool):
    with pytest.raises(KeyboardInterrupt):
        pool.apply(_raise, (KeyboardInterrupt,))
    with pytest.raises(SystemExit):
        pool.apply(_raise, (SystemExit,))
    with pytest.raises(GeneratorExit):
        pool.apply(_raise, (GeneratorExit,))


def _raise(cls):
    raise cls()


def poison(x):
    if x == 7:
        os._exit(3)
    return x


def test_a_poison_task_fails_alone_while_the_rest_complete(pool):
    it = pool.imap(poison, range(20))
    results = []
    for _ in range(20):
        try:
            results.append(next(it))
        except WorkerLostError as exc:
            results.append(exc)
    assert [r for r in results if not isinstance(r, Exception)] == [x for x in range(20) if x != 7]
    assert isinstance(results[7], WorkerLostError)
    assert "exited with code 3" in str(results[7])


def imports_what_is_missing(_=None):
    import distripool_no_such_module  # noqa: F401


def test_a_missing_module_is_the_tasks_error(pool, tmp_path):
    with pytest.raises(ModuleNotFoundError):
        pool.apply(imports_what_is_missing)
    # A function from a module only the driver can import.
    (tmp_path / "driver_only_mod.py").write_text("def f(x):\n    return x + 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import driver_only_mod

        assert driver_only_mod.f(1) == 2
        with pytest.raises(ModuleNotFoundError, match="driver_only_mod"):
            pool.apply(driver_only_mod.f, (1,))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("driver_only_mod", None)


def sleep_for(t):
    import time

    time.sleep(t)
    return t


def test_task_timeout_kills_the_executor_and_fails_the_task():
    with Pool(2, task_timeout=0.5) as p:
        pid = p.apply(os.getpid)
        with pytest.raises(distripool.TaskTimeoutError, match="time limit") as info:
            p.map(sleep_for, [0.0, 30.0, 0.0], chunksize=1)
        assert isinstance(info.value, TimeoutError)
        assert p.map(sleep_for, [0.0, 0.1]) == [0.0, 0.1]
        del pid


def test_a_crash_is_charged_to_the_task_that_crashed_not_one_before_it(tmp_path):
    with Pool(1) as p:
        p.map(identity, range(3))
        seq = p._shared.orchestrator.events()[-1]["seq"] + 1
        # Both reach the one executor together: the quick one's result is
        # held back for batching while the next, of another function, runs.
        quick = p.apply_async(identity, (5,))
        crash = p.starmap_async(crash_once, [(str(tmp_path / "marker"), 7)], chunksize=1)
        assert (quick.get(60), crash.get(60)) == (5, [7])
        retried = [e for e in p._shared.orchestrator.events(seq) if e["kind"] == "task_retried"]
    assert [(e["job"], e["index"]) for e in retried] == [(crash._job, 0)], retried
