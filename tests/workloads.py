"""Task functions for tests that start many fresh executors.

This module imports nothing heavy, so an executor that has to import it to
unpickle a task is ready in milliseconds (a test module would pull in pytest).
"""

import os
import time


def spin_then_scale(x):
    """Half a millisecond of busy work, then ``3x + 1``."""
    t = time.perf_counter() + 0.0005
    while time.perf_counter() < t:
        pass
    return x * 3 + 1


class Blob:
    """Bytes that pickle out of band, as NumPy arrays do (protocol 5
    ``PickleBuffer``): writable unless made from read-only memory."""

    def __init__(self, data):
        self.data = data

    def __reduce_ex__(self, protocol):
        import pickle

        if protocol >= 5:
            return (_blob_from_buffer, (pickle.PickleBuffer(self.data),))
        return (Blob, (bytes(self.data),))

    def writable(self) -> bool:
        return not memoryview(self.data).readonly


def _blob_from_buffer(buffer):
    return Blob(memoryview(buffer))


_kept = []


def keep(blob):
    """Keep the argument (a view of shared memory, for a ``Blob``) past the task."""
    _kept.append(blob)
    return len(_kept)


def kept(i):
    """A copy of what ``keep`` kept as its ``i``-th argument."""
    return bytes(memoryview(_kept[i].data))


def identity(x):
    return x


def where_it_lives(blob):
    """What holds a ``Blob`` argument's memory in the executor: ``mmap`` for
    shared memory, else the type of the buffer it was read into."""
    return type(memoryview(blob.data).obj).__name__


def reply_memfd_owners():
    """``(pids of the processes whose reply memfds this executor keeps
    mapped, its parent's pid)``."""
    import os

    from distripool import _replies

    return sorted({key[0] for key in _replies._reply_maps}), os.getppid()


def function_memfds(big, meet):
    """``(this executor's pid, the inodes of the agent memfds it maps that
    are at least as large as big, the length of big)``. ``meet`` is
    ``(directory, n)``: each task leaves its executor's pid there and waits
    (up to 60 s) until n executors have, so that the tasks of a map are
    seen by every executor."""
    import os
    import time

    folder, n = meet
    open(os.path.join(folder, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(folder)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(os.listdir(folder))} of {n} executors ran a task")
        time.sleep(0.01)
    inodes = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith("/memfd:distripool-agent"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if end - start >= len(big):
                    inodes.add(int(fields[4]))
    return os.getpid(), sorted(inodes), len(big)


def blob_home(blob, flip):
    """``(what holds a Blob's memory here, whether it is writable, its bytes)``
    for a ``Blob`` bound into the task's function (``partial``); with
    ``flip``, its first byte is flipped in place first (when writable)."""
    view = memoryview(blob.data)
    if flip and not view.readonly:
        view[0] ^= 0xFF
    return type(view.obj).__name__, not view.readonly, bytes(view)


def poke(blob, at):
    """Flip one byte of a ``Blob`` argument in place; return it."""
    view = memoryview(blob.data)
    view[at] ^= 0xFF
    return blob


def crash_first_time(marker, data):
    """Kill the executor on the first attempt; later attempts return ``len(data)``."""
    import os

    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    return len(data)


def refuse_memfds(pid, fd, inode):
    """Stands in for the executor's memfd probe where /proc is closed to it."""
    return False


def slow_square(x):
    """A task long enough (50 ms) that a map of a few dozen is still running
    while a test acts on a worker."""
    import time

    time.sleep(0.05)
    return x * x


def pid_after(seconds):
    """The executor's pid, after ``seconds`` of sleep (so that every
    executor of a pool gets some of a map's tasks)."""
    time.sleep(seconds)
    return os.getpid()


def nap_square(x):
    """A task of 250 ms: long enough for a worker's time limit to be judged
    from it."""
    import time

    time.sleep(0.25)
    return x * x


def crash_once(marker, x):
    """Kill the executor the first time any executor runs it (only one
    can create the marker); return ``x`` after that."""
    import os

    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return x
    os._exit(3)


def crash_first(marker, x):
    """``x``; with a ``marker`` path, first kill the executor once (see
    :func:`crash_once`)."""
    if marker is None:
        return x
    return crash_once(marker, x)


def raise_on_multiples_of_ten(x):
    if x % 10 == 0:
        raise ValueError(f"{x} is a multiple of ten")
    return x


def gated(gate, x):
    """``x``: after 2 ms for ``x`` below 40, after 0.3 s below 180, and for
    the others once the file ``gate`` exists (a map that runs for a while,
    then holds still until a test lets it finish)."""
    import os
    import time

    if x < 40:
        time.sleep(0.002)
    elif x < 180:
        time.sleep(0.3)
    deadline = time.monotonic() + 120
    while x >= 180 and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return x


def made(n, seed=0, blob=False):
    """A result the task creates: ``n`` bytes from ``seed`` (a ``Blob``,
    pickled out of band, if ``blob``)."""
    data = bytes((seed + i * 7) % 251 for i in range(256)) * (n // 256)
    return Blob(bytearray(data)) if blob else data


def made_until_memfds_fill(n, seed):
    """``(made(n, seed, blob=True), this executor's pid, writes into reply memfds so
    far)``, in an executor whose writes into reply memfds fail, from the
    second on, as on a full tmpfs."""
    import errno

    from distripool import _envelope, _replies

    if _replies._write_buffers is _envelope._write_buffers:
        writes = []

        def filling(*args):
            writes.append(args)
            if len(writes) > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return _envelope._write_buffers(*args)

        filling.writes = writes
        _replies._write_buffers = filling
    return made(n, seed, blob=True), os.getpid(), len(_replies._write_buffers.writes)


def wait_for_file(path, x):
    """``x``, once the file ``path`` exists (at most two minutes)."""
    import os
    import time

    deadline = time.monotonic() + 120
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)
    return x


def square_or_hog(hog_at, mib, x):
    """``x * x``, except for ``x == hog_at``: that one fills ``mib`` MiB of
    memory (every page touched) and holds it."""
    if x == hog_at:
        held = bytearray(b"\x01") * (mib << 20)
        return len(held)
    return x * x


def crc_plus(data, x):
    """The CRC-32 of ``data``, plus ``x``."""
    import zlib

    return zlib.crc32(data) + x
