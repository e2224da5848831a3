"""Executor process: runs the tasks its agent sends over file descriptor 3.

Started by the agent as ``python -m distripool._executor`` in a process group
of its own. It reads frames (see ``crates/runtime/src/executor.rs`` for the
layout), runs each task, and answers with one RESULT frame per task, in order.
It exits when the agent closes the socket. Imports are kept to a minimum so
that a new executor is ready quickly.
"""

import os
import pickle
import socket
import struct
import sys

HEADER = struct.Struct("<IBQQ")
BODY_HEADER = 17
FUNCTION, TASK, FORGET, RESULT, RETIRE, READY = 1, 2, 3, 4, 5, 6
MAP, STARMAP, APPLY = 0, 1, 2


def _encode(outcome, max_frame):
    """Pickle an outcome tuple, falling back to cloudpickle, then to an error."""
    try:
        data = pickle.dumps(outcome, protocol=5)
    except BaseException:  # noqa: BLE001 - even SystemExit raised by a __reduce__
        try:
            import cloudpickle

            data = cloudpickle.dumps(outcome, protocol=5)
        except BaseException as exc:  # noqa: BLE001
            from multiprocessing.pool import MaybeEncodingError

            err = MaybeEncodingError(exc, outcome[1])
            data = pickle.dumps((False, err, None), protocol=5)
    if len(data) + BODY_HEADER > max_frame:
        from distripool.exceptions import ResultTooLargeError

        err = ResultTooLargeError(
            f"the task's result pickles to {len(data)} bytes, more than the frame limit of {max_frame} bytes"
        )
        data = pickle.dumps((False, err, None), protocol=5)
    return data


class ExceptionParts:
    """An exception that would not survive pickling as it is (say, its
    constructor needs arguments its ``args`` do not hold), carried as its class,
    ``args`` and attributes, and rebuilt in the driver without calling
    ``__init__``."""

    __slots__ = ("cls", "args", "state", "message")

    def __init__(self, exc):
        self.cls = type(exc)
        self.message = f"{type(exc).__qualname__}: {exc}"
        self.args = exc.args if _round_trips(exc.args) else (str(exc),)
        state = getattr(exc, "__dict__", None) or None
        self.state = state if state is not None and _round_trips(state) else None

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)

    def rebuild(self):
        try:
            exc = self.cls.__new__(self.cls)
            exc.args = self.args
            if self.state:
                exc.__dict__.update(self.state)
            return exc
        except Exception:
            from distripool.exceptions import DistripoolError

            return DistripoolError(self.message)


def _round_trips(obj) -> bool:
    try:
        pickle.loads(pickle.dumps(obj, protocol=5))
        return True
    except BaseException:  # noqa: BLE001
        return False


def _failure(exc):
    import traceback

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    exc.__traceback__ = None
    exc.__context__ = None
    if not _round_trips(exc):
        try:
            exc = ExceptionParts(exc)
        except BaseException:  # noqa: BLE001 - leave it to _encode's last resort
            pass
    return (False, exc, text)


class _Function:
    """A loaded task function with its pool's settings: the pool's key, its
    initializer (run once per executor before the pool's first task) and its
    ``maxtasksperchild``."""

    __slots__ = ("fn", "pool_key", "init", "maxtasks")

    def __init__(self, blob):
        self.fn, self.pool_key, self.init, self.maxtasks = pickle.loads(blob)


def _run(entry, payload, initialized):
    try:
        if entry.init is not None and entry.pool_key not in initialized:
            initializer, initargs = entry.init
            initialized.add(entry.pool_key)
            initializer(*initargs)
        mode, items = pickle.loads(payload)
        fn = entry.fn
        if mode == MAP:
            value = [fn(x) for x in items]
        elif mode == STARMAP:
            value = [fn(*x) for x in items]
        else:
            args, kwargs = items
            value = fn(*args, **kwargs)
        return (True, value)
    except BaseException as exc:  # noqa: BLE001 - every failure belongs to the task
        return _failure(exc)


def serve(sock, max_frame):
    sock.sendall(HEADER.pack(BODY_HEADER, READY, os.getpid(), 0))
    rfile = sock.makefile("rb", buffering=1 << 16)
    blobs = {}
    loaded = {}
    initialized = set()
    tasks_run = {}  # pool key -> tasks this executor ran for that pool
    while True:
        head = rfile.read(HEADER.size)
        if len(head) < HEADER.size:
            return  # the agent is gone
        length, kind, a, b = HEADER.unpack(head)
        payload = rfile.read(length - BODY_HEADER) if length > BODY_HEADER else b""
        if kind == TASK:
            entry = loaded.get(b)
            if entry is None:
                try:
                    entry = loaded[b] = _Function(blobs[b])
                except BaseException as exc:  # noqa: BLE001
                    data = _encode(_failure(exc), max_frame)
                    entry = None
            if entry is not None:
                data = _encode(_run(entry, payload, initialized), max_frame)
            header = HEADER.pack(BODY_HEADER + len(data), RESULT, a, 0)
            if len(data) < 65536:
                sock.sendall(header + data)
            else:
                sock.sendall(header)
                sock.sendall(data)
            if entry is not None and entry.maxtasks is not None:
                done = tasks_run[entry.pool_key] = tasks_run.get(entry.pool_key, 0) + 1
                if done >= entry.maxtasks:
                    # Tell the agent this is a recycle, not a crash, and leave.
                    sock.sendall(HEADER.pack(BODY_HEADER, RETIRE, 0, 0))
                    return
        elif kind == FUNCTION:
            blobs[a] = payload
        elif kind == FORGET:
            blobs.pop(a, None)
            loaded.pop(a, None)


def main():
    fd = int(os.environ["DISTRIPOOL_EXECUTOR_FD"])
    max_frame = int(os.environ.get("DISTRIPOOL_MAX_FRAME", str(1 << 30)))
    sock = socket.socket(fileno=fd)
    try:
        serve(sock, max_frame)
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass


if __name__ == "__main__":
    # Run the importable copy of this module, so that the classes pickled
    # from here (ExceptionParts) carry the name the driver can import.
    from distripool._executor import main as _main

    _main()
