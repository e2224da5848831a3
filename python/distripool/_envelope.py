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

This module is the codec; the driver's memfds are in ``_memfds``, and the
executor's side of them (opening the driver's memfds, writing replies) in
``_replies``. Imported by executors: standard library only.
"""

import mmap
import os
import pickle
import struct
import threading

THRESHOLD = 1 << 20
ENVELOPE = 1
# A pool function's blob with its large buffers beside the pickle (see
# ``function_blob``); a blob without starts as a pickle does, with 0x80.
FUNCTION = 2
_FUNCTION_ALIGN = 64
SMALL_ITEMS = 16
# Memfds this large are written through a mapping kept for them.
MAP_AT_LEAST = 8 << 20
# The name every memfd of distripool's has, checked before one is opened.
MEMFD_NAME = "distripool"
_META = struct.Struct("<I")
_PAGE = mmap.ALLOCATIONGRANULARITY


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
    when it is in shared memory (one copy, by the kernel); a ``bytes`` taken
    out of a received payload is that object; else a copy."""
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


def function_blob(main, bufs) -> bytes:
    """A pool function's blob: its pickle alone, or, when it has large
    buffers (a NumPy array in a ``partial``, say), ``0x02 ‖ meta length: u32
    LE ‖ meta`` then each buffer at the next offset that is a multiple of
    64, where ``meta`` is the pickle of ``(pickle, [(readonly, length)])``.
    An executor loads them as views of the memory it got the blob in (a
    memfd its agent shares among its executors), not as copies."""
    if not bufs:
        return main
    from distripool import _native

    meta = pickle.dumps((main, [(b.readonly, b.nbytes) for b in bufs]), protocol=5)
    parts = [bytes((FUNCTION,)) + _META.pack(len(meta)), meta]
    at = 5 + len(meta)
    for b in bufs:
        pad = -at % _FUNCTION_ALIGN
        parts += [bytes(pad), b]
        at += pad + b.nbytes
    # Joined without the GIL, by several threads (the buffers are large).
    return _native.join_buffers(parts)


def load_function(blob):
    """Unpickle a pool function's blob (``function_blob``). Its buffers are
    views of ``blob`` where that is writable memory (a copy-on-write
    mapping, a buffer of the executor's own), else copies; a buffer that was
    read-only stays so."""
    view = memoryview(blob)
    if len(view) == 0 or view[0] != FUNCTION:
        return pickle.loads(blob)
    (n,) = _META.unpack_from(view, 1)
    main, descs = pickle.loads(view[5 : 5 + n])
    at = 5 + n
    buffers = []
    for readonly, length in descs:
        at += -at % _FUNCTION_ALIGN
        if at + length > len(view):
            raise ValueError("a function's blob is cut short")
        b = view[at : at + length]
        at += length
        if readonly:
            b = b.toreadonly()
        elif b.readonly:
            b = bytearray(b)
        buffers.append(b)
    return pickle.loads(main, buffers=buffers)


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


def _prefix(payload, n: int):
    """At least the first ``n`` bytes of ``payload``, as a buffer. A large
    payload the driver received stays in the runtime's memory
    (``_native.Received``), which gives out copies of its parts instead."""
    head = getattr(payload, "head", None)
    return head(n) if head is not None else payload


def parse(payload):
    """``(pickle, descriptors, extra, offset of the first inline buffer)``."""
    (n,) = _META.unpack_from(_prefix(payload, 5), 1)
    with memoryview(_prefix(payload, 5 + n)) as view:
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


def load(payload, opener=None, tail=None):
    """Unpickle a payload. Returns ``(obj, mapped, extra)``; ``mapped`` holds
    the mappings of shared buffers (release it when done with ``obj``).
    ``opener(pid, fd, inode)`` returns ``(file descriptor, owned)`` to map
    (an owned descriptor is closed after mapping), or raises. ``tail``,
    ``(pid, fd, inode, length)``, is a memfd holding the inline buffers that
    would otherwise follow ``payload`` (the agent's: ``shared_mem.rs``)."""
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
        if tail is not None:
            tail_fd, own = opener(*tail[:3])
            if own:
                owned.append(tail_fd)
            tail_view = mapped.map(tail_fd, tail[3])
            payload, pos = b"", 0
        take = getattr(payload, "take", None)
        whole = memoryview(payload) if take is None and pos < len(payload) else None
        for readonly, n, where in descs:
            if where is None and tail is not None:
                # Copy-on-write, as a memfd buffer is: writable unless read-only.
                view = tail_view[pos : pos + n]
                if readonly:
                    view = view.toreadonly()
                where_is[id(view)] = (view, tail_fd, pos, n)
                pos += n
            elif where is None:
                if take is not None:
                    # Each inline buffer out of the runtime's memory, once:
                    # a read-only one as bytes (what a large bytes result
                    # is rebuilt from as it is), else as a bytearray.
                    view = take(pos, n, not readonly)
                else:
                    view = whole[pos : pos + n]
                    if not readonly and view.readonly:
                        view = bytearray(view)
                pos += n
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
        tail_view = None
        return obj, mapped, extra
    except BaseException:
        mapped.release()
        raise
    finally:
        for fd in owned:
            os.close(fd)
