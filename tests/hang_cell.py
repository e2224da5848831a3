"""One cell of the hang matrix, run in an interpreter of its own.

    python hang_cell.py LIB SUBMIT FAULT ENDING LIMIT

LIB is ``embedded`` or ``remote`` (distripool) or ``stdlib``
(``multiprocessing.Pool`` or ``concurrent.futures.ProcessPoolExecutor``).
The cell submits 20 items with SUBMIT, lets FAULT happen, records what the
caller saw and whether the pool still runs a task, then ends the pool with
ENDING. It prints JSON lines prefixed with ``CELL``; ``faulthandler`` dumps
every thread's stack and exits shortly before the runner's hard LIMIT.
"""

from __future__ import annotations

import atexit
import faulthandler
import json
import os
import signal
import subprocess
import sys
import threading
import time

LIB, SUBMIT, FAULT, ENDING, LIMIT = sys.argv[1:6]
faulthandler.dump_traceback_later(float(LIMIT) * 0.8, exit=True)

N = 20
# How long the caller waits in get(timeout) / map(timeout=) for item 0.
SHORT_WAIT = 0.3
EXECUTOR_SUBMITS = ("ex_map", "submit")


WORKERS: list[subprocess.Popen] = []


@atexit.register
def stop_workers() -> None:
    """Registered before distripool is imported, so it runs after
    distripool's own exit handler: the driver's pools go first, then the
    remote worker this cell started."""
    for worker in WORKERS:
        started = time.monotonic()
        worker.send_signal(signal.SIGINT)
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
            print(f"remote worker ignored SIGINT for {time.monotonic() - started:.1f}s", file=sys.stderr)


def emit(**fields) -> None:
    print("CELL " + json.dumps(fields), flush=True)


def work(x):
    """Item 0 carries the fault; the others take a little time."""
    if x == 0:
        if FAULT == "raise":
            raise ValueError("boom")
        if FAULT == "segfault":
            import ctypes

            ctypes.string_at(0)
        if FAULT == "exit":
            os._exit(3)
        if FAULT == "task_timeout":
            time.sleep(60)
        if FAULT == "get_timeout":
            time.sleep(1.0)
    if FAULT == "interrupt":
        time.sleep(0.2)  # the caller is still waiting when Ctrl-C comes
    elif FAULT != "get_timeout":
        time.sleep(0.05)  # with get_timeout the rest is quick: only item 0 keeps the caller waiting
    return x


def make_pool():
    executor = SUBMIT in EXECUTOR_SUBMITS
    task_timeout = {"task_timeout": 0.5} if FAULT == "task_timeout" else {}
    if LIB == "stdlib":
        if executor:
            import concurrent.futures

            return concurrent.futures.ProcessPoolExecutor(2)
        import multiprocessing

        return multiprocessing.Pool(2)
    import distripool

    orchestrator = {}
    if LIB == "remote":
        key = os.urandom(16).hex()
        orch = distripool.Orchestrator("127.0.0.1:0", authkey=key)
        env = dict(os.environ, DISTRIPOOL_AUTHKEY=key)
        code = (
            # SIGINT stops the worker even where the runner's shell ignores it.
            "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from distripool import make_worker\ntry:\n"
            f"    make_worker({orch.addresses!r}, processes=2)\nexcept KeyboardInterrupt:\n    pass\n"
        )
        worker = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL)
        emit(worker=worker.pid)

        WORKERS.append(worker)
        if not orch.wait_for_workers(1, timeout=20):
            raise SystemExit("remote worker did not connect")
        orchestrator = {"orchestrator": orch}
    if executor:
        return distripool.ProcessPoolExecutor(2, **orchestrator, **task_timeout)
    return distripool.Pool(2, **orchestrator, **task_timeout)


def observe(pool):
    """Submit the items, let the fault happen, and read as the caller would."""
    xs = range(N)
    wait = SHORT_WAIT if FAULT == "get_timeout" else None
    stop = FAULT == "stop_reading"
    if SUBMIT == "map":
        return pool.map(work, xs, chunksize=1)
    if SUBMIT == "starmap":
        return pool.starmap(work, [(x,) for x in xs], chunksize=1)
    if SUBMIT == "map_async":
        r = pool.map_async(work, xs, chunksize=1)
        return None if stop else r.get(wait)
    if SUBMIT == "apply_async":
        rs = [pool.apply_async(work, (x,)) for x in xs]
        return None if stop else [r.get(wait) for r in rs]
    if SUBMIT in ("imap", "imap_unordered"):
        it = getattr(pool, SUBMIT)(work, xs)
        out = []
        while True:
            try:
                out.append(it.next(wait))
            except StopIteration:
                return out
            if stop and len(out) == 3:
                return out  # the iterator is dropped unfinished
    if SUBMIT == "ex_map":
        out = []
        for value in pool.map(work, xs, timeout=wait):
            out.append(value)
            if stop and len(out) == 3:
                break
        return out
    if SUBMIT == "submit":
        fs = [pool.submit(work, x) for x in xs]
        if FAULT == "cancel":
            return sum(f.cancel() for f in fs)
        return None if stop else [f.result(wait) for f in fs]
    raise ValueError(SUBMIT)


def name_of(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and type(exc).__name__ != "TaskTimeoutError":
        return "TimeoutError"  # multiprocessing's, concurrent.futures' and the builtin
    import multiprocessing

    if isinstance(exc, multiprocessing.TimeoutError):
        return "TimeoutError"
    return type(exc).__name__


armed = False


def on_sigint(signum, frame):
    if armed:
        raise KeyboardInterrupt


def body(pool) -> None:
    global armed
    timer = None
    if FAULT == "interrupt":
        signal.signal(signal.SIGINT, on_sigint)
        armed = True
        timer = threading.Timer(0.4, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
    try:
        observe(pool)
        outcome = "ok"
    except BaseException as exc:  # noqa: BLE001 - the outcome is what the caller saw
        outcome = name_of(exc)
    finally:
        armed = False
        if timer is not None:
            timer.cancel()
    usable = False
    try:
        if SUBMIT in EXECUTOR_SUBMITS:
            usable = pool.submit(abs, -5).result(15) == 5
        else:
            usable = pool.apply_async(abs, (-5,)).get(15) == 5
    except BaseException as exc:  # noqa: BLE001
        usable = name_of(exc)
    emit(outcome=outcome, usable=usable)


def end(pool) -> None:
    if ENDING == "close_join":
        pool.close()
        pool.join()
    elif ENDING == "terminate":
        pool.terminate()
        pool.join()
    elif ENDING == "shutdown_wait":
        pool.shutdown(wait=True)
    elif ENDING == "shutdown_cancel":
        pool.shutdown(wait=True, cancel_futures=True)
    else:
        raise ValueError(ENDING)


def main() -> None:
    pool = make_pool()
    if ENDING == "with":
        with pool:
            body(pool)
            started = time.monotonic()
        emit(ended=time.monotonic() - started)
    elif ENDING == "exit":
        body(pool)
        # The runner times the rest: the interpreter's exit, on this clock.
        emit(exiting=time.monotonic())
    else:
        body(pool)
        started = time.monotonic()
        end(pool)
        emit(ended=time.monotonic() - started)


if __name__ == "__main__":
    main()
