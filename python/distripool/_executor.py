"""Executor process: runs the tasks its agent sends over file descriptor 3.

Started by the agent as ``python -m distripool._executor`` in a process group
of its own. It reads frames (see ``crates/runtime/src/executor.rs`` for the
layout), runs each task, and answers with one RESULT frame per task, in order.
It exits when the agent closes the socket. Imports are kept to a minimum so
that a new executor is ready quickly.
"""

import os
import pickle
import select
import socket
import struct
import sys
import time

from distripool import _envelope, _replies

HEADER = struct.Struct("<IBQQ")
BODY_HEADER = 17
# Frame kinds; the runtime's `executor.rs` defines them, and a test checks
# these against `_native.EXECUTOR_FRAME_KINDS` (the executor does not load
# the extension just for them).
FUNCTION, TASK, FORGET, RESULT, RETIRE, READY, TASK_SHARED, FUNCTION_SHARED = 1, 2, 3, 4, 5, 6, 7, 8
# A FUNCTION_SHARED frame's memfd, after the ids it needs: fd, inode, length.
SHARED_FUNCTION = struct.Struct("<IQQ")
# A TASK_SHARED frame's memfds: args fd, reply fd, their inodes, the length of
# the buffers in the args memfd (fd NO_MEMFD: none).
SHARED = struct.Struct("<IIQQQ")
NO_MEMFD = 0xFFFFFFFF
# A RESULT's ``b``: its buffers are in the agent's reply memfd (the payload
# starts with their places), and the task kept a view of its arguments.
IN_REPLY, KEPT = 1, 2
PLACES = struct.Struct("<I")
PLACE = struct.Struct("<QQ")
MAP, STARMAP, APPLY = 0, 1, 2


def _encode(outcome, max_frame):
    """Pickle an outcome tuple, falling back to cloudpickle, then to an error.
    Returns ``(pickle, out-of-band buffers)``."""
    try:
        main, bufs = _envelope.dumps(outcome)
    except BaseException:  # noqa: BLE001 - even SystemExit raised by a __reduce__
        try:
            import cloudpickle

            main, bufs = _envelope.dumps(outcome, cloudpickle)
        except BaseException as exc:  # noqa: BLE001
            from multiprocessing.pool import MaybeEncodingError

            err = MaybeEncodingError(exc, outcome[1])
            # What pickling raised, for ProcessPoolExecutor (which raises
            # that, as the standard one does), with its traceback.
            _, err.cause, err.cause_tb = _failure(exc)
            main, bufs = pickle.dumps((False, err, None), protocol=5), []
    size = _envelope.size(main, bufs) if bufs else len(main)
    if size + BODY_HEADER > max_frame:
        from distripool.exceptions import ResultTooLargeError

        err = ResultTooLargeError(
            f"the task's result pickles to {size} bytes, more than the frame limit of {max_frame} bytes"
        )
        main, bufs = pickle.dumps((False, err, None), protocol=5), []
    return main, bufs


def _payload(main, bufs, task):
    """``(RESULT payload, b)``: the pickle alone, or an envelope whose buffers
    are in the driver's reply memfd (or inline), saying whether the task kept
    its shared arguments (then the driver must not reuse their memfd); or,
    given the agent's reply memfd, the buffers' places there and the envelope."""
    if task.agent_reply is not None and task.reply is None:
        return _agent_payload(main, bufs, task)
    if not bufs and task.mapped is None:
        return main, 0
    descs = None
    if bufs and task.reply is not None:
        descs = _replies.write_reply(task.reply, bufs)
        if descs is not None:
            bufs.clear()
    # Whatever the task left referring to its shared arguments keeps them.
    kept = task.release()
    extra = {"kept": True} if kept else None
    # The agent's memfd too, if the arguments came in one.
    flags = KEPT if kept and task.tail is not None else 0
    if descs is not None:
        return _envelope.envelope(main, descs, extra), flags
    return _envelope.inline(main, bufs, extra), flags


def _agent_payload(main, bufs, task):
    """The RESULT of a task the agent gave a reply memfd: its buffers written
    there (or inline, if it cannot be opened), the ``b`` flags saying so."""
    descs = _replies.write_reply(task.agent_reply, bufs) if bufs else None
    if descs is not None:
        bufs.clear()
    flags = KEPT if task.release() else 0
    if descs is None:
        return (_envelope.inline(main, bufs) if bufs else main), flags
    places = [PLACES.pack(len(descs))]
    places += [PLACE.pack(where[3], n) for _, n, where in descs]
    head = _envelope.envelope(main, [(ro, n, None) for ro, n, _ in descs], {})
    return [b"".join(places), *head], flags | IN_REPLY


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

    if "distripool._functions" in sys.modules:
        # Source lines sent with functions, for files this machine lacks.
        sys.modules["distripool._functions"].restore_lines()
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
    ``maxtasksperchild``; and the driver's main module its names live in
    (None: the driver has none with a file)."""

    __slots__ = ("fn", "pool_key", "init", "maxtasks", "authkey", "main")

    def __init__(self, blob, main):
        self.main = main
        _use_main(main)
        # The authkey comes first and is taken on as it is unpickled (see
        # Authkey): proxies in the function or initargs connect at once.
        self.authkey, self.fn, self.pool_key, self.init, self.maxtasks = _envelope.load_function(blob)


# The multiprocessing authkey this executor's tasks run with: the driver's,
# so that the Manager() proxies its tasks unpickle can connect.
_authkey = None


def _use_authkey(authkey):
    """Take on the driver's authkey: now if multiprocessing is loaded, else
    as it loads (most tasks never need it; loading it costs milliseconds)."""
    global _authkey
    _authkey = authkey
    process = sys.modules.get("multiprocessing.process")
    if process is not None:
        process.current_process().authkey = authkey
    elif not any(type(f) is _AuthkeyOnImport for f in sys.meta_path):
        sys.meta_path.insert(0, _AuthkeyOnImport())


class Authkey:
    """The driver's multiprocessing authkey, in a pool's function blob; the
    executor takes it on as the blob is unpickled, before the function and
    its initargs (Manager() proxies connect as they are unpickled)."""

    __slots__ = ("key",)

    def __init__(self, key: bytes):
        self.key = key

    def __reduce__(self):
        return (take_authkey, (self.key,))


def take_authkey(key):
    _use_authkey(key)
    return key


class _AuthkeyOnImport:
    """Sets the authkey the moment ``multiprocessing.process`` is imported
    (a task unpickling a proxy imports it), before anything reads it."""

    def find_spec(self, name, path=None, target=None):
        if name != "multiprocessing.process":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            if _authkey is not None:
                module.current_process().authkey = _authkey

        spec.loader.exec_module = exec_module
        return spec


def _enter(entry):
    """Put in place what the tasks of ``entry`` run with: its driver's main
    module and authkey (another driver's may be there)."""
    _use_main(entry.main)
    if entry.authkey is not None and entry.authkey != _authkey:
        _use_authkey(entry.authkey)


def _use_main(main):
    """Make ``main`` (a driver's main module, or None) this executor's
    ``__main__``, for the tasks of the functions that came with it."""
    if main is not None or "distripool._main" in sys.modules:
        from distripool import _main

        _main.use(main)


def _load(fn_id, blobs, mains):
    """The function ``fn_id``, with what it needs: the driver's main module,
    and its own modules (see ``_modules``), made importable first."""
    blob, needs = blobs[fn_id]
    main = None
    for need in needs:
        loaded = mains.get(need)
        if loaded is None:
            loaded = mains[need] = _need(pickle.loads(_held(blobs[need][0])))
        if loaded is not _MODULES:
            main = loaded
    return _Function(_held(blob), main)


def _held(blob):
    """A blob's pickle; raises what went wrong if it could not be had."""
    if isinstance(blob, BaseException):
        raise blob
    return blob


def _shared_blob(payload, n):
    """From a FUNCTION_SHARED frame: the ids it needs, and a copy-on-write
    view of the agent's memfd holding the function's blob (or what went
    wrong opening it, raised when a task needs it)."""
    view = memoryview(payload)
    needs = struct.unpack_from(f"<{n}Q", view)
    fd, inode, length = SHARED_FUNCTION.unpack_from(view, 8 * n)
    try:
        import mmap

        opened, _ = _replies.open_foreign(AGENT_PID, fd, inode)
        try:
            # Copy-on-write: the function's large buffers are views of it,
            # writable as an unpickled copy would be, and shared until written.
            mapped = mmap.mmap(opened, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(opened)
        return memoryview(mapped), needs
    except Exception as exc:  # noqa: BLE001
        return exc, needs


_MODULES = object()  # what a need that brought modules is remembered as


def _need(obj):
    from distripool import _main

    if isinstance(obj, _main.MainSource):
        return _main.MainModule(obj)
    from distripool import _modules

    if isinstance(obj, _modules.Upload):
        _modules.unpack(obj)
    else:
        _modules.install(obj)
    return _MODULES


def _run(entry, payload, initialized, task):
    """Run one task; returns its outcome. ``task`` collects the shared
    mappings of its arguments and where its reply goes."""
    try:
        if entry.init is not None and entry.pool_key not in initialized:
            initializer, initargs = entry.init
            initialized.add(entry.pool_key)
            initializer(*initargs)
        if payload[0] == _envelope.ENVELOPE:
            (mode, items), task.mapped, extra = _envelope.load(payload, _replies.open_foreign, task.tail)
            task.reply = extra.get("reply") if extra else None
        else:
            mode, items = pickle.loads(payload)
        fn = entry.fn
        if mode == MAP:
            value = _envelope.wrap_value([fn(x) for x in items], True)
        elif mode == STARMAP:
            value = _envelope.wrap_value([fn(*x) for x in items], True)
        else:
            args, kwargs = items
            value = _envelope.wrap_value(fn(*args, **kwargs), False)
        return (True, value)
    except BaseException as exc:  # noqa: BLE001 - every failure belongs to the task
        return _failure(exc)


class _Task:
    """The shared memory of the task at hand: mappings of its arguments, and
    where its reply goes. One per executor, reset for every task."""

    __slots__ = ("mapped", "reply", "tail", "agent_reply")

    def __init__(self):
        self.reset()

    def reset(self):
        self.mapped = None
        self.reply = None  # the driver's reply memfd
        self.tail = None  # the agent's memfd holding the inline buffers
        self.agent_reply = None  # the agent's reply memfd

    def shared(self, payload):
        """Take the agent's memfds from a TASK_SHARED frame; its payload
        (the envelope's head) after them."""
        args_fd, reply_fd, args_inode, reply_inode, length = SHARED.unpack_from(payload)
        if args_fd != NO_MEMFD:
            self.tail = (AGENT_PID, args_fd, args_inode, length)
        self.agent_reply = (AGENT_PID, reply_fd, reply_inode)
        return memoryview(payload)[SHARED.size :]

    def release(self) -> bool:
        """Unmap the task's arguments; True if it kept a view of them."""
        return bool(self.mapped.release()) if self.mapped is not None else False


# Results of short tasks are held back while more tasks are already here, and
# sent together before the executor would wait: one send for a burst of tiny
# tasks. A task that ran longer than this, or a result this large, is sent at once.
HOLD_SECONDS = 0.0005
HOLD_BYTES = 1 << 16
# A frame body at least this large is read straight into its own buffer.
DIRECT_READ = 1 << 20
# After this many seconds without a task, kept mappings of reply memfds go.
IDLE_RELEASE = 1.0


class _Link:
    """The socket to the agent: frames in from a buffer, results out in batches."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.pos = 0
        self.out = []
        self.out_bytes = 0

    def frame(self):
        """The next ``(kind, a, b, payload)``, or None when the agent is gone.
        Held results are sent before waiting for the socket."""
        while True:
            if len(self.buf) - self.pos >= HEADER.size:
                length, kind, a, b = HEADER.unpack_from(self.buf, self.pos)
                end = self.pos + 4 + length
                if end <= len(self.buf):
                    with memoryview(self.buf) as view:
                        payload = bytes(view[self.pos + HEADER.size : end])
                    self.pos = end
                    return kind, a, b, payload
                if length - BODY_HEADER >= DIRECT_READ:
                    return kind, a, b, self._read_large(length - BODY_HEADER)
            self.flush()
            del self.buf[: self.pos]
            self.pos = 0
            if _replies.holds_reply_maps() and not select.select([self.sock], [], [], IDLE_RELEASE)[0]:
                _replies.release_idle()
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                return None
            self.buf += chunk

    def _frame_end(self):
        """Where the frame at ``pos`` ends, if all of it is buffered."""
        if len(self.buf) - self.pos < HEADER.size:
            return None
        end = self.pos + 4 + HEADER.unpack_from(self.buf, self.pos)[0]
        return end if end <= len(self.buf) else None

    def _read_large(self, size):
        """The payload of the frame whose header is at ``pos``, read into a
        buffer of its own (no second copy of a large argument)."""
        payload = bytearray(size)
        have = len(self.buf) - self.pos - HEADER.size
        payload[:have] = self.buf[self.pos + HEADER.size :]
        del self.buf[:]
        self.pos = 0
        view = memoryview(payload)
        while have < size:
            n = self.sock.recv_into(view[have:])
            if n == 0:
                raise ConnectionError("the agent closed the connection mid-frame")
            have += n
        return payload

    def ready(self):
        """True when a whole frame is already buffered."""
        return self._frame_end() is not None

    def send(self, kind, a, data=b"", hold=False, b=0):
        """Send one frame; ``data`` is bytes or a list of parts."""
        if type(data) is list:
            if len(data) > 1:
                length = sum(memoryview(p).nbytes for p in data)
                self.flush()
                self.sock.sendall(HEADER.pack(BODY_HEADER + length, kind, a, b))
                for part in data:
                    self.sock.sendall(part)
                return
            data = data[0]
        header = HEADER.pack(BODY_HEADER + len(data), kind, a, b)
        if len(data) >= HOLD_BYTES:
            self.flush()
            self.sock.sendall(header)
            self.sock.sendall(data)
            return
        self.out.append(header + data)
        self.out_bytes += len(header) + len(data)
        if not hold or self.out_bytes >= HOLD_BYTES:
            self.flush()

    def flush(self):
        if self.out:
            self.sock.sendall(b"".join(self.out))
            self.out.clear()
            self.out_bytes = 0


def serve(sock, max_frame):
    link = _Link(sock)
    link.send(READY, os.getpid(), b=_agent_memfds())
    # Freed small-object arenas are kept for the next tasks (`arenas.rs`): a
    # chunk of many small values reuses the pages of the last. After READY:
    # the agent sends the first task meanwhile.
    from distripool import _native

    _native.keep_arenas()
    blobs = {}  # id -> (pickled function or main module, ids of what it needs)
    loaded = {}
    mains = {}  # id -> a driver's main module, run on first use
    current = None  # the function whose __main__ and authkey are in place
    initialized = set()
    tasks_run = {}  # pool key -> tasks this executor ran for that pool
    task = _Task()
    while True:
        frame = link.frame()
        if frame is None:
            return  # the agent is gone
        kind, a, b, payload = frame
        if kind == TASK or kind == TASK_SHARED:
            started = time.perf_counter()
            entry = loaded.get(b)
            task.reset()
            if kind == TASK_SHARED:
                payload = task.shared(payload)
            if entry is None:
                # A function not run here yet may kill this process: results
                # held back for batching must be out first, or the agent
                # would blame the task whose result was lost.
                link.flush()
                current = None  # loading may change __main__ and the authkey
                try:
                    entry = loaded[b] = _load(b, blobs, mains)
                except BaseException as exc:  # noqa: BLE001
                    outcome = _failure(exc)
                    entry = None
            if entry is not None:
                if entry is not current:
                    _enter(entry)
                    current = entry
                outcome = _run(entry, payload, initialized, task)
            del payload
            main, bufs = _encode(outcome, max_frame)
            del outcome
            data, flags = _payload(main, bufs, task)
            del bufs
            quick = time.perf_counter() - started < HOLD_SECONDS
            link.send(RESULT, a, data, hold=quick and link.ready(), b=flags)
            if entry is not None and entry.maxtasks is not None:
                done = tasks_run[entry.pool_key] = tasks_run.get(entry.pool_key, 0) + 1
                if done >= entry.maxtasks:
                    # Tell the agent this is a recycle, not a crash, and leave.
                    link.send(RETIRE, 0)
                    return
        elif kind == FUNCTION:
            if b:
                # The ids of what it needs come first: b of them.
                view = memoryview(payload)
                blobs[a] = (view[8 * b :], struct.unpack_from(f"<{b}Q", view))
            else:
                blobs[a] = (payload, ())
        elif kind == FUNCTION_SHARED:
            blobs[a] = _shared_blob(payload, b)
        elif kind == FORGET:
            blobs.pop(a, None)
            loaded.pop(a, None)
            mains.pop(a, None)


# The agent's pid, when it offers its memfds (``shared_mem.rs``).
AGENT_PID = None


def _agent_memfds() -> int:
    """1 if the probe memfd the agent names can be opened (its large
    buffers then come through memfds), else 0."""
    global AGENT_PID
    try:
        pid, fd, inode = (int(x) for x in os.environ["DISTRIPOOL_AGENT_MEMFD"].split(":"))
    except (KeyError, ValueError):
        return 0
    if not _replies.can_open(pid, fd, inode):
        return 0
    AGENT_PID = pid
    return 1


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
