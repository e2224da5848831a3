"""``multiprocessing``'s own shared objects in a pool's ``initargs``.

``multiprocessing.Queue``, ``Lock``, ``Semaphore``, ``Value``, ``Array``,
``Pipe`` connections and their kin refuse to be pickled except while a
process is being spawned: they are handed to a child as it starts, as
duplicated file descriptors and named semaphores. The embedded default
hands them to its executors the same way, with a :class:`Sharer` standing
in for the spawning ``Popen``:

- a file descriptor (a queue's pipe, a ``Value``'s shared memory) is kept,
  duplicated, by the sharer, and each executor that unpickles the initargs
  receives its own copy over a Unix socket (``SCM_RIGHTS``);
- a named semaphore (made in the ``spawn`` or ``forkserver`` context) is
  opened by name, as spawn does;
- a semaphore made in the ``fork`` context (the default one on Linux before
  Python 3.14) has no name and lives only in memory this process and its
  forks share, so spawn refuses it. The executors reach it through the
  sharer instead: each of their threads has a connection on which the
  sharer acquires and releases it, in a thread of its own, so that owning
  a lock (an ``RLock``'s count, ``_is_mine``) means what it means locally.

Executors on other machines cannot reach any of these: for pools on an
orchestrator, :func:`refusing` makes pickling them fail with an error that
names the object and points to ``multiprocessing.Manager()``, whose proxies
work everywhere.

Everything the sharer serves is behind a key that travels only inside the
initargs, in the pool's function blob.
"""

from __future__ import annotations

import os
import socket
import threading
from multiprocessing import connection, reduction

# Until the pool closes, the sharer keeps what it shares alive: executors
# that start later (a crash, maxtasksperchild) unpickle the initargs again.


class Sharer:
    """Serves a pool's inherited objects to the executors of this machine."""

    def __init__(self):
        self.key = os.urandom(32)
        # Abstract Unix socket: nothing on disk to clean up; executors share
        # the driver's network namespace.
        self.address = "\0distripool-inherit-" + os.urandom(12).hex()
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}
        self._fd_ids: dict[int, int] = {}  # the driver's fd -> its id here
        self._sems: dict[int, object] = {}
        self._ids: dict[int, int] = {}  # id(semaphore) -> its id here
        self._next = 0
        self._closed = False
        self._sock = None  # listening once something is shared

    def _listen(self) -> None:
        if self._closed:
            raise RuntimeError("the pool is closed")
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(self.address)
            sock.listen(128)
            self._sock = sock
            threading.Thread(
                target=self._accept, args=(sock,), name="distripool-inherit", daemon=True
            ).start()

    @property
    def used(self) -> bool:
        return self._sock is not None

    # -- what the pickler asks for -----------------------------------------

    def share_fd(self, fd: int) -> int:
        """Keep a duplicate of ``fd``; returns its id. The pool pickles its
        initargs at every call and holds them, so a descriptor number
        stands for one file while the pool lives, and has one id."""
        with self._lock:
            ident = self._fd_ids.get(fd)
            if ident is None:
                self._listen()
                self._next += 1
                self._fds[self._next] = os.dup(fd)
                ident = self._fd_ids[fd] = self._next
            return ident

    def share_semaphore(self, sem) -> int:
        with self._lock:
            self._listen()
            ident = self._ids.get(id(sem))
            if ident is None:
                self._next += 1
                ident = self._ids[id(sem)] = self._next
                self._sems[ident] = sem
            return ident

    # -- serving ---------------------------------------------------------------

    def _accept(self, listening):
        while True:
            try:
                sock, _ = listening.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(sock,), name="distripool-inherit", daemon=True).start()

    def _serve(self, sock):
        conn = connection.Connection(sock.detach())
        try:
            with conn:
                connection.deliver_challenge(conn, self.key)
                connection.answer_challenge(conn, self.key)
                what, ident = conn.recv()
                if what == "fd":
                    with self._lock:
                        fd = self._fds.get(ident)
                    if fd is None:
                        conn.send(False)
                    else:
                        conn.send(True)
                        reduction.send_handle(conn, fd, None)
                elif what == "semaphore":
                    with self._lock:
                        sem = self._sems.get(ident)
                    conn.send(sem is not None)
                    if sem is not None:
                        _serve_semaphore(conn, sem._semlock)
        except (EOFError, OSError, connection.AuthenticationError):
            pass  # the executor went away, or was never ours

    def close(self) -> None:
        """Stop serving and close the duplicated descriptors."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            fds, self._fds = self._fds, {}
            self._sems.clear()
            self._ids.clear()
            self._fd_ids.clear()
            sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            except OSError:
                pass
            sock.close()
        for fd in fds.values():
            os.close(fd)

    # -- the stand-in for a spawning Popen ---------------------------------------

    def duplicate_for_child(self, fd: int) -> int:
        return self.share_fd(fd)

    def DupFd(self, ident: int) -> SharedFd:  # noqa: N802 - multiprocessing's name
        return SharedFd(self.address, self.key, ident)


def _serve_semaphore(conn, semlock) -> None:
    """Run one executor thread's operations on ``semlock``, in this thread,
    so that what the executor's thread owns, this thread owns."""
    while True:
        op, args = conn.recv()
        try:
            if op == "acquire":
                value = _acquire(conn, semlock, *args)
            elif op == "release":
                value = semlock.release()
            elif op in ("_count", "_is_mine", "_get_value", "_is_zero"):
                value = getattr(semlock, op)()
            else:
                raise ValueError(f"unknown semaphore operation {op!r}")
        except Exception as exc:  # noqa: BLE001 - it belongs to the executor's caller
            conn.send((False, exc))
            continue
        try:
            conn.send((True, value))
        except OSError:
            if op == "acquire" and value:
                semlock.release()  # nobody is left to release it
            raise


def _acquire(conn, semlock, block=True, timeout=None):
    """Acquire for the executor; a blocking wait gives up when the executor
    is gone (its end of the connection closes)."""
    if not block:
        return semlock.acquire(False)
    import time

    deadline = None if timeout is None else time.monotonic() + max(timeout, 0)
    while True:
        wait = 0.5 if deadline is None else min(0.5, max(deadline - time.monotonic(), 0))
        if semlock.acquire(True, wait):
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        if conn.poll(0):
            raise EOFError  # the executor closed its end while it waited


# -- in the executor ------------------------------------------------------------


class SharedFd:
    """A descriptor the sharer keeps; each unpickled copy receives its own."""

    __slots__ = ("address", "key", "ident")

    def __init__(self, address, key, ident):
        self.address, self.key, self.ident = address, key, ident

    def __reduce__(self):
        return (SharedFd, (self.address, self.key, self.ident))

    def detach(self) -> int:
        with _connect(self.address, self.key, "fd", self.ident) as conn:
            return reduction.recv_handle(conn)


def _connect(address, key, what, ident):
    try:
        conn = connection.Client(address, family="AF_UNIX", authkey=key)
    except OSError as exc:
        raise RuntimeError(
            "the pool that shared this multiprocessing object is closed, or this executor runs on "
            f"another machine than its driver ({exc})"
        ) from None
    conn.send((what, ident))
    if not conn.recv():
        conn.close()
        raise RuntimeError("the pool that shared this multiprocessing object is closed")
    return conn


class SemaphoreProxy:
    """Stands for ``_multiprocessing.SemLock`` in an executor: each call is
    made by the driver's sharer, one connection per executor thread."""

    def __init__(self, address, key, ident, kind, maxvalue):
        self._where = (address, key, ident)
        self.kind, self.maxvalue = kind, maxvalue
        self.name = None
        self.handle = None
        self._local = threading.local()

    def _call(self, op, *args):
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            address, key, ident = self._where
            conn = self._local.conn = _connect(address, key, "semaphore", ident)
            self._local.pid = os.getpid()
        conn.send((op, args))
        ok, value = conn.recv()
        if not ok:
            raise value
        return value

    def acquire(self, block=True, timeout=None):
        return self._call("acquire", block, timeout)

    def release(self):
        return self._call("release")

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        return self.release()

    def _count(self):
        return self._call("_count")

    def _is_mine(self):
        return self._call("_is_mine")

    def _get_value(self):
        return self._call("_get_value")

    def _is_zero(self):
        return self._call("_is_zero")

    def _after_fork(self):
        pass


def rebuild_semaphore(cls, address, key, ident, kind, maxvalue):
    """A fork-context ``Lock``/``RLock``/``Semaphore`` in an executor."""
    obj = cls.__new__(cls)
    obj._semlock = SemaphoreProxy(address, key, ident, kind, maxvalue)
    obj._make_methods()
    obj._is_fork_ctx = False
    return obj


# -- in the driver, while pickling initargs ------------------------------------------


class CannotTravel(RuntimeError):
    pass


class Refusing:
    """The stand-in for a spawning Popen of a pool on an orchestrator: what
    it would have to duplicate cannot reach another machine."""

    def duplicate_for_child(self, fd):
        raise CannotTravel

    def DupFd(self, ident):  # noqa: N802
        raise CannotTravel


def reduce_semaphore(obj, popen):
    """How a ``multiprocessing.synchronize.SemLock`` travels with ``popen``
    (a Sharer or Refusing); NotImplemented: as spawn sends it (by name)."""
    if isinstance(popen, Refusing):
        raise CannotTravel
    sl = obj._semlock
    if sl.name is not None:
        return NotImplemented
    return (
        rebuild_semaphore,
        (type(obj), popen.address, popen.key, popen.share_semaphore(obj), sl.kind, sl.maxvalue),
    )


def spawning(popen):
    """A context in which multiprocessing's objects pickle as for a child
    that ``popen`` starts."""
    from multiprocessing import context

    class _Spawning:
        def __enter__(self):
            self.before = context.get_spawning_popen()
            context.set_spawning_popen(popen)

        def __exit__(self, *exc):
            context.set_spawning_popen(self.before)

    return _Spawning()


def remote_error(index: int | None, obj) -> RuntimeError:
    kind = type(obj)
    what = "the initializer" if index is None else f"initargs[{index}]"
    return RuntimeError(
        f"{what} is a {kind.__module__}.{kind.__qualname__}, which holds (or is) a multiprocessing "
        "object that is shared by inheritance (a Queue, Lock, Semaphore, Value, Array or Pipe connection); "
        "executors on other machines cannot inherit it. Pass a multiprocessing.Manager() proxy instead "
        "(manager.Queue(), manager.Lock(), manager.Value(...)): proxies work on every worker that can reach "
        "the manager's address"
    )
