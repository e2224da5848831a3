"""The driver's memfds: in an embedded pool the executors run on the
driver's machine, so the driver puts large arguments in memfds of its own,
which the executors map straight from ``/proc/<driver>/fd``, and gives each
such task an empty memfd for its reply. The driver owns both, so a result
survives its executor's death; it reuses them once the task is over (unless
something still uses the mapping: an argument the task kept, a result the
caller holds) and keeps at most ``RETAIN`` bytes of them idle.
"""

import collections
import os
import threading
import weakref

from ._envelope import MAP_AT_LEAST, MEMFD_NAME, _layout, _write_buffers, envelope

RETAIN = 256 << 20
# Tasks in flight that may hold memfds at once (two descriptors each).
MAX_PENDING = 128
# Reply memfds kept open while the caller's results map them, to be reused
# after (past this many, they are closed instead).
MAX_LENT = 64
PROBING = "probing"


def available() -> bool:
    return hasattr(os, "memfd_create") and os.path.isdir(f"/proc/{os.getpid()}/fd")


class SharedBuffers:
    """The driver's memfds for large arguments and their replies, one set per
    task in flight, reused once the task is over."""

    def __init__(self):
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.free = []  # (fd, size) of idle memfds
        self.inodes = {}  # fd -> inode, for every memfd held
        # fd -> SharedMapping of the whole memfd, for the large idle ones
        # whose pages all exist: writing through it is the fastest way in.
        self.mappings = {}
        self.free_bytes = 0
        self.pending = {}  # (job, index) -> (argument memfd, reply memfd)
        # Reply memfds the caller's results still map (a NumPy array handed
        # out zero-copy): fd -> ids of the mappings alive. When the last one
        # is gone, a weakref callback puts the fd on `returned` (the callback
        # may run in any thread, even during garbage collection inside one of
        # our locks: it only appends), and the next _acquire takes it back.
        self.lent = {}
        self.returned = collections.deque()
        self.closed = False
        # Whether executors can open our memfds: None until asked, PROBING
        # while an executor is being asked, then True or False.
        self.usable = None

    def _acquire(self, need: int) -> int:
        self._take_back()
        with self.lock:
            if self.closed:
                raise ValueError("Pool not running")
            best = None
            for i, (_fd, sz) in enumerate(self.free):
                if sz >= need and (best is None or sz < self.free[best][1]):
                    best = i
            if best is None and need and self.free:
                best = max(range(len(self.free)), key=lambda i: self.free[i][1])
            if best is not None:
                fd, sz = self.free.pop(best)
                self.free_bytes -= sz
            else:
                fd, sz = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC), 0
                self.inodes[fd] = os.fstat(fd).st_ino
        if sz < need:
            self._unmap(fd)
            try:
                os.ftruncate(fd, need)
            except OSError:
                self._close(fd)
                raise
        return fd

    def _mapping(self, fd: int):
        """The memfd's ``SharedMapping``, made now if it is large and all its
        pages exist; else None."""
        mapping = self.mappings.get(fd)
        size = os.fstat(fd).st_size
        if mapping is not None and mapping.length > size:
            # Only we grow our memfds and nothing shrinks them; but writing
            # through a mapping past the end of its file would kill the
            # process (SIGBUS), so one that did shrink is not written through.
            self._unmap(fd)
            mapping = None
        if mapping is None and size >= MAP_AT_LEAST:
            from distripool import _native

            mapping = _native.SharedMapping.of_resident(fd)
            if mapping is not None:
                self.mappings[fd] = mapping
        return mapping

    def _unmap(self, fd: int) -> None:
        mapping = self.mappings.pop(fd, None)
        if mapping is not None:
            mapping.close()

    def _release(self, fd: int, reusable: bool) -> None:
        if reusable:
            try:
                sz = os.fstat(fd).st_size
            except OSError:
                return
            with self.lock:
                if not self.closed and self.free_bytes + sz <= RETAIN:
                    self.free.append((fd, sz))
                    self.free_bytes += sz
                    return
        self._close(fd)

    def _lend(self, fd: int, holders) -> bool:
        """Keep reply memfd ``fd`` open while ``holders`` (mappings of it the
        caller's result uses) live, to reuse it after; False when too many
        are lent already (it is closed instead)."""
        with self.lock:
            if self.closed or len(self.lent) >= MAX_LENT:
                return False
            alive = self.lent[fd] = {id(mm) for mm in holders}
        returned = self.returned

        def gone(key):
            alive.discard(key)
            if not alive:
                returned.append(fd)

        for mm in holders:
            weakref.finalize(mm, gone, id(mm)).atexit = False
        return True

    def _take_back(self) -> None:
        """Lent memfds nothing maps any more are idle again."""
        while self.returned:
            fd = self.returned.popleft()
            with self.lock:
                if self.lent.pop(fd, None) is None:
                    continue  # taken back already, or the pool closed
            self._release(fd, True)

    def _close(self, fd: int) -> None:
        with self.lock:
            self.inodes.pop(fd, None)
            self._unmap(fd)
        os.close(fd)

    def probe_memfd(self):
        """A small memfd for asking an executor whether it can open ours:
        ``(fd, (pid, fd, inode))``."""
        fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
        return fd, (self.pid, fd, os.fstat(fd).st_ino)

    def has_room(self) -> bool:
        """Whether another task may take memfds (each task in flight holds
        two descriptors; past ``MAX_PENDING`` tasks, buffers go inline)."""
        return len(self.pending) < MAX_PENDING

    def put(self, main, bufs, key) -> bytes:
        """The payload of task ``key`` with ``bufs`` in a memfd, and a memfd
        for its reply."""
        fd = self._acquire(_layout(bufs)[1])
        try:
            descs = _write_buffers(fd, bufs, (self.pid, fd, self.inodes[fd]), self._mapping(fd))
            reply = self._acquire(0)
        except BaseException:
            self._close(fd)
            raise
        with self.lock:
            self.pending[key] = (fd, reply)
        return b"".join(envelope(main, descs, {"reply": (self.pid, reply, self.inodes[reply])}))

    def put_reply(self, main, key, size: int) -> bytes:
        """The payload of task ``key``, whose arguments are small, with a
        memfd of at least ``size`` bytes for its reply (one whose pages exist
        already, if one is idle)."""
        reply = self._acquire(size)
        with self.lock:
            self.pending[key] = (None, reply)
        return b"".join(envelope(main, [], {"reply": (self.pid, reply, self.inodes[reply])}))

    def take(self, key):
        """The memfds of task ``key``, now over (None if it had none)."""
        if not self.pending:  # the common case, without the lock
            return None
        with self.lock:
            return self.pending.pop(key, None)

    def opener(self, ticket):
        """An opener for ``load`` that maps only this task's reply memfd."""

        def open_reply(pid, fd, inode):
            if ticket is None or pid != self.pid or fd != ticket[1] or inode != self.inodes.get(fd):
                from distripool.exceptions import DistripoolError

                raise DistripoolError("the task's result points at shared memory it was not given")
            return fd, False

        return open_reply

    def done(self, ticket, args_kept: bool, reply_kept) -> None:
        """Task ``ticket`` is over. ``reply_kept`` is True (the reply memfd
        must never be reused), or the list of its mappings the caller's
        result still uses (empty: none)."""
        if ticket[0] is not None:
            self._release(ticket[0], not args_kept)
        if reply_kept is True or not reply_kept:
            self._release(ticket[1], not reply_kept)
        elif not self._lend(ticket[1], reply_kept):
            self._close(ticket[1])

    def forget_job(self, job: int, indexes=None) -> None:
        """Free the memfds of the job's tasks ``indexes`` (default: all)."""
        with self.lock:
            if indexes is None:
                keys = [k for k in self.pending if k[0] == job]
            else:
                keys = [(job, i) for i in indexes if (job, i) in self.pending]
            tickets = [self.pending.pop(k) for k in keys]
        for ticket in tickets:
            self.done(ticket, True, True)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            fds = [fd for fd, _ in self.free]
            for a, r in self.pending.values():
                fds += [r] if a is None else [a, r]
            fds += list(self.lent)
            self.lent.clear()
            self.free.clear()
            self.pending.clear()
            self.inodes.clear()
            self.free_bytes = 0
            mappings = list(self.mappings.values())
            self.mappings.clear()
        for mapping in mappings:
            mapping.close()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
