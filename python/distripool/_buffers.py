"""Large buffers beside the pickle, not inside it (pickle protocol 5).

A task's arguments and its outcome travel as a *payload*: either a plain
pickle, or an envelope whose bulk is kept out of band::

    0x01 ‖ meta length: u32 LE ‖ meta ‖ inline buffers, back to back

``meta`` is the pickle of ``(pickle, descriptors, extra)``. Each descriptor is
``(readonly, length, where)``: ``where`` is None for the next inline buffer, or
``(pid, fd, inode, offset)`` for a buffer in a memfd that process ``pid`` holds
open as ``fd`` (offsets are page aligned; the inode tells a reused descriptor
number from the memfd meant). Buffers of at least ``THRESHOLD`` bytes go
out of band: whatever pickles through ``PickleBuffer`` (NumPy arrays and the
like), and ``bytes``/``bytearray`` objects passed at the top level (an argument,
a return value, an item of a short chunk).

Inline buffers spare the copies that pickling them in band would cost. In an
embedded pool the executors run on the driver's machine, so the driver puts
large arguments in memfds of its own, which the executors map straight from
``/proc/<driver>/fd``, and gives each such task an empty memfd for its reply.
The driver owns both, so a result survives its executor's death; it reuses
them once the task is over (unless something still uses the mapping: an
argument the task kept, a result the caller holds) and keeps at most
``RETAIN`` bytes of them idle.

This module is imported by executors: standard library only.
"""

import collections
import mmap
import os
import pickle
import struct
import threading
import weakref

THRESHOLD = 1 << 20
ENVELOPE = 1
SMALL_ITEMS = 16
RETAIN = 256 << 20
# Tasks in flight that may hold memfds at once (two descriptors each).
MAX_PENDING = 128
# Reply memfds kept open while the caller's results map them, to be reused
# after (past this many, they are closed instead).
MAX_LENT = 64
# Memfds this large are written through a mapping the driver keeps.
MAP_AT_LEAST = 8 << 20
PROBING = "probing"
_META = struct.Struct("<I")
_PAGE = mmap.ALLOCATIONGRANULARITY
_MEMFD_NAME = "distripool"


class _Big:
    """A top-level ``bytes``/``bytearray`` pickled out of band."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __reduce_ex__(self, protocol):
        rebuild = _bytes_from if type(self.obj) is bytes else bytearray
        return (rebuild, (pickle.PickleBuffer(self.obj),))


# The shared-memory buffers of the payload this thread is unpickling: id of
# the buffer object -> (object, fd, offset, length).
_loading = threading.local()


def _bytes_from(buf):
    """Rebuild a large ``bytes``: straight from its memfd into the new object
    when it is in shared memory (one copy, by the kernel), else a copy."""
    where = getattr(_loading, "where", None)
    if where:
        loc = where.get(id(buf))
        if loc is not None and loc[0] is buf:
            from distripool import _native

            return _native.read_bytes(*loc[1:])
    return bytes(buf)


def _wrap(x):
    t = type(x)
    if (t is bytes or t is bytearray) and len(x) >= THRESHOLD:
        return _Big(x)
    return x


def any_big(items) -> bool:
    """True if some item of ``items`` is a large ``bytes``/``bytearray``."""
    for x in items:
        t = type(x)
        if (t is bytes or t is bytearray) and len(x) >= THRESHOLD:
            return True
    return False


def _wrap_all(items):
    """``items`` (a list or tuple) with its large bytes wrapped, or itself."""
    if len(items) > SMALL_ITEMS or not any_big(items):
        return items
    return type(items)(_wrap(x) for x in items)


def wrap_task(mode, items, apply_mode, starmap_mode):
    """The task ``(mode, items)`` ready to pickle with its large top-level bytes
    out of band."""
    if mode == apply_mode:
        args, kwargs = items
        if kwargs and len(kwargs) <= SMALL_ITEMS and any_big(kwargs.values()):
            kwargs = {k: _wrap(v) for k, v in kwargs.items()}
        return (mode, (_wrap_all(args), kwargs))
    if len(items) > SMALL_ITEMS:
        return (mode, items)
    if mode == starmap_mode:
        return (mode, [_wrap_all(t) if type(t) is tuple else t for t in items])
    return (mode, _wrap_all(items))


def wrap_value(value, many: bool):
    """A task's return value (a chunk's list of values if ``many``), ready to
    pickle with large top-level bytes out of band."""
    if many:
        return _wrap_all(value) if type(value) is list else value
    return _wrap(value)


def dumps(obj, fallback=None):
    """``(pickle, buffers)``: ``obj`` pickled with protocol 5, its large
    contiguous buffers left out as ``memoryview`` objects. ``fallback`` (a
    module with ``dumps``, e.g. cloudpickle) is tried when pickle refuses."""
    try:
        # First with every PickleBuffer out of band, which costs next to
        # nothing; most objects have none, and that is the answer.
        found = []
        main = pickle.dumps(obj, protocol=5, buffer_callback=found.append)
        if not found:
            return main, found
        keep_out = _KeepOut()
        return pickle.dumps(obj, protocol=5, buffer_callback=keep_out), keep_out.bufs
    except Exception:
        if fallback is None:
            raise
        keep_out = _KeepOut()
        return fallback.dumps(obj, protocol=5, buffer_callback=keep_out), keep_out.bufs


class _KeepOut:
    """The pickler's buffer callback: large contiguous buffers out of band."""

    __slots__ = ("bufs",)

    def __init__(self):
        self.bufs = []

    def __call__(self, pb):
        try:
            raw = pb.raw()
        except BufferError:  # not contiguous: in band
            return True
        if raw.nbytes < THRESHOLD:
            return True
        self.bufs.append(raw)
        return False


def size(main, bufs) -> int:
    return len(main) + sum(b.nbytes for b in bufs)


def envelope(main, descs, extra, inline=()) -> list:
    """The payload as a list of parts to send (or join) in order."""
    meta = pickle.dumps((main, descs, extra), protocol=5)
    return [bytes((ENVELOPE,)) + _META.pack(len(meta)) + meta, *inline]


def inline(main, bufs, extra=None) -> list:
    """A payload that carries its buffers after the pickle."""
    if not bufs and not extra:
        return [main]
    descs = [(b.readonly, b.nbytes, None) for b in bufs]
    return envelope(main, descs, extra or {}, bufs)


def is_envelope(payload) -> bool:
    return len(payload) > 0 and payload[0] == ENVELOPE


def parse(payload):
    """``(pickle, descriptors, extra, offset of the first inline buffer)``."""
    (n,) = _META.unpack_from(payload, 1)
    with memoryview(payload) as view:
        main, descs, extra = pickle.loads(view[5 : 5 + n])
    return main, descs, extra, 5 + n


def _aligned(n: int) -> int:
    return (n + _PAGE - 1) // _PAGE * _PAGE


def _layout(bufs):
    """Page-aligned offsets for ``bufs`` in one memfd, and the size it needs."""
    offsets, end = [], 0
    for b in bufs:
        offsets.append(end)
        end = _aligned(end + b.nbytes)
    return offsets, end


def _write_buffers(fd, bufs, where, mapping=None):
    """Write ``bufs`` into memfd ``fd`` at page-aligned offsets, growing it if
    needed, or through ``mapping``, a ``SharedMapping`` of all of it, when
    given (``fd`` may then be None); their descriptors, ``where`` + offset
    naming the memfd."""
    offsets, end = _layout(bufs)
    if mapping is None and os.fstat(fd).st_size < end:
        os.ftruncate(fd, end)
    from distripool import _native

    for b, off in zip(bufs, offsets):
        if mapping is not None:
            mapping.write(off, b)
        else:
            _native.write_buffer(fd, off, b)
    return [(b.readonly, b.nbytes, (*where, off)) for b, off in zip(bufs, offsets)]


class Mapped:
    """The shared-memory mappings behind one payload's buffers."""

    __slots__ = ("maps",)

    def __init__(self):
        self.maps = []

    def map(self, fd: int, length: int):
        """A copy-on-write view of the first ``length`` bytes of ``fd``."""
        size = os.fstat(fd).st_size
        if size < length:
            # Reading a mapping past the end of its file would kill the
            # process (SIGBUS): refuse here instead.
            raise ValueError(
                f"a shared buffer ends at byte {length}, past the end of its memfd ({size} bytes)"
            )
        mm = mmap.mmap(fd, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        view = memoryview(mm)
        self.maps.append((mm, view))
        return view

    def release(self) -> list:
        """Unmap what nothing uses any more; the mappings something still
        uses (empty if none; if any, the caller must not rewrite their memfd
        while they live)."""
        kept = []
        for mm, view in self.maps:
            try:
                view.release()
                mm.close()
            except BufferError:
                kept.append(mm)
        self.maps.clear()
        return kept


def load(payload, opener=None):
    """Unpickle a payload. Returns ``(obj, mapped, extra)``; ``mapped`` holds
    the mappings of shared buffers (release it when done with ``obj``).
    ``opener(pid, fd, inode)`` returns ``(file descriptor, owned)`` to map
    (an owned descriptor is closed after mapping), or raises."""
    if not is_envelope(payload):
        return pickle.loads(payload), None, None
    main, descs, extra, pos = parse(payload)
    mapped = Mapped()
    owned = []
    try:
        ends = {}
        for _, n, where in descs:
            if where is not None:
                key = where[:3]
                ends[key] = max(ends.get(key, 0), where[3] + n)
        roots, fds = {}, {}
        for key, end in ends.items():
            fd, own = opener(*key)
            if own:
                owned.append(fd)
            fds[key] = fd
            roots[key] = mapped.map(fd, end)
        buffers = []
        where_is = {}
        whole = memoryview(payload) if pos < len(payload) else None
        for readonly, n, where in descs:
            if where is None:
                view = whole[pos : pos + n]
                pos += n
                if not readonly and view.readonly:
                    view = bytearray(view)
            else:
                view = roots[where[:3]][where[3] : where[3] + n]
                if readonly:
                    view = view.toreadonly()  # as pickle would make it, keeping it the same object
                where_is[id(view)] = (view, fds[where[:3]], where[3], n)
            buffers.append(view)
        _loading.where = where_is
        try:
            obj = pickle.loads(main, buffers=buffers)
        finally:
            _loading.where = None
        del buffers, roots, whole, where_is
        return obj, mapped, extra
    except BaseException:
        mapped.release()
        raise
    finally:
        for fd in owned:
            os.close(fd)


def open_foreign(pid: int, fd: int, inode: int):
    """Open another process's memfd through ``/proc``."""
    path = f"/proc/{int(pid)}/fd/{int(fd)}"
    try:
        if not os.readlink(path).startswith(f"/memfd:{_MEMFD_NAME}"):
            raise OSError(f"{path} is not a distripool buffer")
        opened = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        if os.fstat(opened).st_ino != inode:
            os.close(opened)
            raise OSError(f"{path} is no longer the memfd meant")
        return opened, True
    except OSError as exc:
        from distripool.exceptions import DistripoolError

        raise DistripoolError(f"the task's shared buffers could not be opened ({path}): {exc}") from None


# The executor's mappings of the reply memfds it wrote last, most recent
# last: the driver reuses its memfds, and writing through a mapping kept from
# one reply to the next saves opening, mapping and populating it each time.
# At most REPLY_MAPS are kept, each checked still to be the driver's before
# another is made, and all dropped once the executor idles (``release_idle``):
# a kept mapping keeps its memfd's memory alive after the driver lets it go.
_reply_maps = {}
REPLY_MAPS = 2


def write_reply(reply, bufs):
    """Put ``bufs`` in the reply memfd ``(pid, fd, inode)``; their
    descriptors, or None if the memfd cannot be opened (the buffers then go
    inline)."""
    key = tuple(reply)
    need = _layout(bufs)[1]
    mapping = _reply_maps.pop(key, None)
    if mapping is not None:
        if mapping.length >= need:
            # The same inode, which our mapping keeps alive: the same memfd.
            _reply_maps[key] = mapping
            return _write_buffers(None, bufs, reply, mapping)
        mapping.close()  # the driver grew it: map it again
    _drop_stale_reply_maps()
    try:
        fd, _ = open_foreign(*reply)
    except Exception:
        return None
    try:
        mapping = None
        if need >= MAP_AT_LEAST and os.fstat(fd).st_size >= need:
            from distripool import _native

            mapping = _native.SharedMapping.of_resident(fd)
        descs = _write_buffers(fd, bufs, reply, mapping)
    finally:
        os.close(fd)
    if mapping is not None:
        _reply_maps[key] = mapping
        while len(_reply_maps) > REPLY_MAPS:
            _reply_maps.pop(next(iter(_reply_maps))).close()
    return descs


def _drop_stale_reply_maps() -> None:
    """Drop the kept mappings of memfds the driver no longer has."""
    for key in list(_reply_maps):
        pid, fd, inode = key
        try:
            current = os.stat(f"/proc/{int(pid)}/fd/{int(fd)}").st_ino == inode
        except OSError:
            current = False
        if not current:
            _reply_maps.pop(key).close()


def holds_reply_maps() -> bool:
    return bool(_reply_maps)


def release_idle() -> None:
    """The executor has nothing to do: let every kept mapping go."""
    while _reply_maps:
        _reply_maps.popitem()[1].close()


def can_open(pid: int, fd: int, inode: int) -> bool:
    """Run in an executor once per pool: can it open the driver's memfds?"""
    try:
        opened, _ = open_foreign(pid, fd, inode)
    except Exception:
        return False
    os.close(opened)
    return True


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
                fd, sz = os.memfd_create(_MEMFD_NAME, os.MFD_CLOEXEC), 0
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
        fd = os.memfd_create(_MEMFD_NAME, os.MFD_CLOEXEC)
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
                fds += [a, r]
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
