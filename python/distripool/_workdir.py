"""A worker's own directory, and the ones workers killed outright left.

A worker keeps what it is sent to disk (uploads) in a directory of its own
under the temporary directory, removed when it stops. A worker that is
killed outright (SIGKILL, the kernel's out-of-memory killer, a preempted
node) cannot remove it; on a node that runs workers for months those pile
up. So each worker holds a lock on a file in its directory for as long as
it runs, and as it starts removes every directory of a worker whose lock
nobody holds any more, as Dask's workers do with their spill directories.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator

log = logging.getLogger("distripool")

PREFIX = "distripool-worker-"
# Present only while locked: made under another name, locked, then renamed.
LOCK = "worker.lock"


@contextlib.contextmanager
def work_dir() -> Iterator[str]:
    """A new directory for this worker, locked while the block runs and
    removed after it; the directories dead workers left are removed first."""
    base = tempfile.gettempdir()
    removed = remove_stale(base)
    if removed:
        dirs = "directory" if removed == 1 else "directories"
        log.info("removed %d %s that workers killed outright left in %s", removed, dirs, base)
    path = tempfile.mkdtemp(prefix=PREFIX, dir=base)
    try:
        lock = _lock(path)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
        raise
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(lock)


def _lock(path: str) -> int:
    """Lock a new file in ``path`` and give it the name others look for:
    nobody finds it unlocked while this process lives."""
    pending = os.path.join(path, LOCK + ".new")
    fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(pending, os.path.join(path, LOCK))
    except OSError:
        os.close(fd)
        raise
    return fd


def remove_stale(base: str) -> int:
    """Remove each worker directory in ``base`` of this user whose lock is
    free (its worker is gone); the number removed. Directories without a
    lock file (one being made, or not a worker's) are left alone."""
    try:
        names = [n for n in os.listdir(base) if n.startswith(PREFIX)]
    except OSError:
        return 0
    removed = 0
    for name in names:
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        try:
            fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its worker runs
            os.close(fd)
            continue
        try:
            # Held by us while it goes, so that two workers starting at once
            # do not both work on it.
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        if not os.path.exists(path):
            removed += 1
    return removed
