"""The executor's side of the driver's memfds: opening them through
``/proc/<driver>/fd`` (checked to be distripool's and the inode meant), and
writing large results into the reply memfd the driver gave a task, through a
mapping kept from one reply to the next.

Imported by executors: standard library only.
"""

import os

from ._envelope import MAP_AT_LEAST, MEMFD_NAME, _layout, _write_buffers


def open_foreign(pid: int, fd: int, inode: int):
    """Open another process's memfd through ``/proc``."""
    path = f"/proc/{int(pid)}/fd/{int(fd)}"
    try:
        if not os.readlink(path).startswith(f"/memfd:{MEMFD_NAME}"):
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
    descriptors, or None if the memfd cannot be opened or written (the
    buffers then go inline)."""
    key = tuple(reply)
    need = _layout(bufs)[1]
    mapping = _reply_maps.pop(key, None)
    if mapping is not None:
        if mapping.length >= need:
            # The same inode, which our mapping keeps alive: the same memfd.
            try:
                descs = _write_buffers(None, bufs, reply, mapping)
            except OSError:
                mapping.close()
                return None
            _reply_maps[key] = mapping
            return descs
        mapping.close()  # the driver grew it: map it again
    _drop_stale_reply_maps()
    try:
        fd, _ = open_foreign(*reply)
    except Exception:
        return None
    mapping = None
    try:
        if need >= MAP_AT_LEAST and os.fstat(fd).st_size >= need:
            from distripool import _native

            mapping = _native.SharedMapping.of_resident(fd)
        descs = _write_buffers(fd, bufs, reply, mapping)
    except OSError:
        # No room for it (a full tmpfs, a memory limit on shared memory):
        # the result still goes, inline, and the executor goes on.
        if mapping is not None:
            mapping.close()
        return None
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
