"""Ctrl-C and exits: a blocked caller is interrupted, nothing is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from conftest import TESTS, alive, free_port, wait_until

# Prints the executors' pids, then blocks in map() (or apply(), if
# $BLOCKING_CALL says so) on tasks that never end.
BLOCKED_DRIVER = r"""
import os, sys, time
from distripool import Pool

MARKS = sys.argv[1]  # captured by value when forever() is pickled

def forever(i):
    open(os.path.join(MARKS, str(i)), "w").close()
    time.sleep(3600)

if len(sys.argv) > 2:  # remote: an orchestrator on this address, one worker
    from distripool import make_orchestrator
    orch = make_orchestrator(sys.argv[2])
    assert orch.wait_for_workers(1, timeout=60)
pool = Pool(2)
pids = sorted(set(pool.map(lambda _: os.getpid(), range(40), chunksize=1)))
print(" ".join(map(str, pids)), flush=True)
try:
    with pool:
        if os.environ.get("BLOCKING_CALL") == "apply":
            pool.apply(forever, (0,))
        else:
            pool.map(forever, range(4))
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(0)
"""

# Leaves a running pool behind on purpose and exits.
ABANDONING_DRIVER = r"""
import os
from distripool import Pool
pool = Pool(2)
print(" ".join(map(str, sorted(set(pool.map(lambda _: os.getpid(), range(40), chunksize=1))))), flush=True)
pool.apply_async(__import__("time").sleep, (3600,))
"""


def _start(code: str, *args: str, **extra_env: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    env.update(extra_env)
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.parametrize("call", ["map", "apply"])
@pytest.mark.parametrize("where", ["embedded", "remote"])
def test_ctrl_c_interrupts_a_blocking_call_and_stops_the_executors(tmp_path, where, call, spawn_worker):
    marks = tmp_path / "marks"  # apart from the worker's log file
    marks.mkdir()
    args = [str(marks)]
    if where == "remote":
        # Picked before it is bound: the worker starts before the driver's
        # orchestrator exists.
        address = f"127.0.0.1:{free_port()}"
        spawn_worker(address, processes=2)  # retries until the driver's orchestrator is up
        args.append(address)
    proc = _start(BLOCKED_DRIVER, *args, BLOCKING_CALL=call)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids, proc.stderr.read()
        # Tasks only start after the call submitted them, so once they are
        # running, the caller is blocked inside the call.
        started = 1 if call == "apply" else 2
        wait_until(lambda: len(os.listdir(marks)) >= started, 30, "tasks to start")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "interrupted" in out
        # Leaving the with-block terminated the pool: its executors, local or
        # remote, running the endless tasks are gone.
        wait_until(lambda: not any(alive(p) for p in pids), 30, "executors to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_driver_exit_with_a_running_pool_leaves_no_executor():
    proc = _start(ABANDONING_DRIVER)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        wait_until(lambda: not any(alive(p) for p in pids), 30, "executors to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_killed_driver_takes_its_executors_along():
    proc = _start(ABANDONING_DRIVER.replace("(3600,))", "(3600,)); __import__('time').sleep(3600)"))
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids
        proc.kill()
        proc.wait(30)
        wait_until(lambda: not any(alive(p) for p in pids), 30, "executors to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("where", ["embedded", "remote"])
def test_sigterm_to_the_driver_leaves_no_executor_and_the_worker_goes_on(tmp_path, where, spawn_worker):
    # SIGTERM (a batch system's, a `kill`), unlike Ctrl-C, runs no Python
    # handler: the driver is simply gone. Its executors, local or on a
    # worker, busy with endless tasks, go with it; a worker stays, for the
    # next driver.
    marks = tmp_path / "marks"
    marks.mkdir()
    args = [str(marks)]
    worker = None
    if where == "remote":
        address = f"127.0.0.1:{free_port()}"
        worker = spawn_worker(address, processes=2)
        args.append(address)
    with _start(BLOCKED_DRIVER, *args) as proc:
        try:
            pids = [int(p) for p in proc.stdout.readline().split()]
            assert pids, proc.stderr.read()
            wait_until(lambda: len(os.listdir(marks)) >= 2, 30, "tasks to start")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == -signal.SIGTERM
            wait_until(lambda: not any(alive(p) for p in pids), 30, "executors to exit")
            if worker is not None:
                assert worker.proc.poll() is None, worker.log()
        finally:
            if proc.poll() is None:
                proc.kill()


class _InterruptedAsItReturns:
    """The client, but Ctrl-C comes in the main thread just as
    ``wait_offered`` returns a completion it took."""

    def __init__(self, client, main):
        self._client, self._main = client, main

    def __getattr__(self, name):
        return getattr(self._client, name)

    def wait_offered(self, *args):
        taken = self._client.wait_offered(*args)
        if taken is not None and threading.current_thread() is self._main:
            raise KeyboardInterrupt
        return taken


@pytest.mark.parametrize("kind", ["apply_async", "submit"])
@pytest.mark.parametrize("when", ["returning", "setting"])
def test_ctrl_c_while_the_caller_takes_its_completion_still_ends_the_job(tmp_path, kind, when):
    # Ctrl-C's KeyboardInterrupt is raised wherever the main thread is: here,
    # just after the caller waiting in get()/result() took its task's
    # completion from the orchestrator, as the call returns it or while it
    # is being set. The job must end all the same, or the pool's join would
    # wait for it for ever.
    import threading

    import distripool
    from workloads import wait_for_file

    gate = tmp_path / "go"
    main = threading.main_thread()

    def release_once_waiting():
        wait_until(
            lambda: any(f.f_code.co_name == "_take" for f in _frames(sys._current_frames()[main.ident])),
            30,
            "the caller waiting for its completion",
        )
        gate.touch()

    make = distripool.ProcessPoolExecutor if kind == "submit" else distripool.Pool
    pool = make(1)
    shared = pool._pool._shared if kind == "submit" else pool._shared
    decode = shared.decode

    def interrupted_decode(*args):
        if threading.current_thread() is main:
            raise KeyboardInterrupt
        return decode(*args)

    client = shared.client
    if when == "setting":
        shared.decode = interrupted_decode
    else:
        shared.client = _InterruptedAsItReturns(client, main)
    releaser = threading.Thread(target=release_once_waiting)
    releaser.start()
    if kind == "submit":
        future = pool.submit(wait_for_file, str(gate), 7)
        with pytest.raises(KeyboardInterrupt):
            future.result(60)
        assert isinstance(future.exception(0), KeyboardInterrupt)
        shared.decode, shared.client = decode, client
        assert pool.submit(abs, -5).result(60) == 5
        pool.shutdown(wait=True)  # returns: no job is left waiting
    else:
        result = pool.apply_async(wait_for_file, (str(gate), 7))
        with pytest.raises(KeyboardInterrupt):
            result.get(60)
        assert result.ready() and not result.successful()
        shared.decode, shared.client = decode, client
        assert pool.apply(abs, (-5,)) == 5
        pool.close()
        pool.join()  # returns: no job is left waiting
    releaser.join()
    assert not shared.cache


def _frames(frame):
    while frame is not None:
        yield frame
        frame = frame.f_back
