"""Large buffers out of band: through shared memory in an embedded pool,
inline beside the pickle on a remote worker. Exact data, the types the caller
passed, memory reused only when nothing maps it, nothing left open."""

from __future__ import annotations

import functools
import os
import pickle
import subprocess
import sys

import pytest

import distripool
from conftest import TESTS, wait_until
from distripool import Pool, _envelope, _functions, _native, _replies
from distripool import _memfds as memfds_module
from workloads import (
    Blob,
    blob_home,
    crash_first_time,
    function_memfds,
    identity,
    keep,
    kept,
    made_until_memfds_fill,
    poke,
    refuse_memfds,
)

MIB = 1 << 20


def _memfds() -> int:
    """The driver's memfds that carry data (not the one probe memfd its
    embedded pools' executors open as they start, made once)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
            if name.startswith("/memfd:distripool") and not name.startswith("/memfd:distripool-agent-probe"):
                n += 1
        except OSError:
            pass
    return n


def _big(n: int, seed: int) -> bytes:
    return bytes((seed + i * 7) % 251 for i in range(256)) * (n // 256)


@pytest.fixture(scope="module")
def pool():
    with Pool(2) as p:
        yield p


@pytest.fixture(params=["embedded", "remote"])
def any_pool(request, pool):
    """The module's embedded pool, or a pool on a remote worker."""
    if request.param == "embedded":
        yield pool
        return
    with Pool(orchestrator=request.getfixturevalue("remote_orchestrator")) as p:
        yield p


def test_large_bytes_keep_their_type_and_content(any_pool):
    pool = any_pool
    data = _big(3 * MIB, 1)
    out = pool.apply(identity, (data,))
    assert type(out) is bytes and out == data
    out = pool.apply(identity, (bytearray(data),))
    assert type(out) is bytearray and out == data
    assert pool.apply(dict, (), {"x": data}) == {"x": data}
    assert pool.map(len, [data, data[:-1], b"small"], chunksize=1) == [len(data), len(data) - 1, 5]
    assert pool.starmap(max, [(data, data[:-1])]) == [data]
    assert list(pool.imap(identity, [data], chunksize=1)) == [data]


def test_out_of_band_objects_round_trip_writable_or_read_only_as_sent(any_pool):
    pool = any_pool
    data = _big(2 * MIB, 2)
    out = pool.apply(identity, (Blob(bytearray(data)),))
    assert bytes(out.data) == data and out.writable()
    out = pool.apply(identity, (Blob(data),))
    assert bytes(out.data) == data and not out.writable()
    # The executor's copy is its own: changing it there changes nothing here.
    original = bytearray(data)
    out = pool.apply(poke, (Blob(original), 5))
    assert out.data[5] == data[5] ^ 0xFF and original == data


def test_large_buffers_in_a_function_arrive_writable_or_read_only_as_sent(any_pool):
    pool = any_pool
    data = _big(2 * MIB, 3)
    writable = functools.partial(blob_home, Blob(bytearray(data)))
    for _, can_write, content in pool.map(writable, [False] * 4, chunksize=1):
        assert can_write and content == data
    # A change a task makes stays in its executor, as to an unpickled copy.
    _, _, changed = pool.apply(writable, (True,))
    assert changed[0] == data[0] ^ 0xFF and changed[1:] == data[1:]
    assert bytes(writable.args[0].data) == data
    read_only = functools.partial(blob_home, Blob(data))
    for _, can_write, content in pool.map(read_only, [True] * 4, chunksize=1):
        assert not can_write and content == data


def test_a_large_function_reaches_both_embedded_executors_through_one_memfd_of_the_drivers(tmp_path):
    big = _big(4 * MIB, 9)
    meet, met = tmp_path / "first", tmp_path / "then"
    meet.mkdir()
    met.mkdir()
    with Pool(2) as p:
        # Both executors have run a task, so each has said whether it can
        # open the driver's memfds (it says so before its first task).
        first = p.map(functools.partial(function_memfds, b"x"), [(str(meet), 2)] * 2, chunksize=1)
        assert len({pid for pid, _, _ in first}) == 2
        # Each task waits until both executors have run one.
        out = p.map(functools.partial(function_memfds, big), [(str(met), 2)] * 8, chunksize=1)
        ours = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:distripool-agent"):
                    ours.add(os.stat(f"/proc/self/fd/{fd}").st_ino)
            except OSError:
                pass
    assert all(n == len(big) for _, _, n in out)
    by_executor = {pid: inodes for pid, inodes, _ in out}
    assert len(by_executor) == 2, f"the tasks ran on {sorted(by_executor)} only"
    # Each maps the function's memfd (not a copy read from its socket), the
    # same one for both, and it is one the driver holds.
    assert all(len(inodes) == 1 for inodes in by_executor.values()), by_executor
    (inode,) = {inodes[0] for inodes in by_executor.values()}
    assert inode in ours, f"memfd {inode} is not one of the driver's: {sorted(ours)}"


def test_a_function_blob_keeps_its_large_buffers_beside_the_pickle_aligned():
    data = _big(2 * MIB, 4)
    fn = functools.partial(blob_home, Blob(bytearray(data)))
    blob = _functions.dumps(fn)
    assert blob[0] == _envelope.FUNCTION and len(blob) < len(data) + 4096
    # Loaded from writable memory, the buffer is a view of it, 64-byte aligned.
    memory = bytearray(blob)
    loaded = _envelope.load_function(memory)
    view = memoryview(loaded.args[0].data)
    assert view.obj is memory and not view.readonly and bytes(view) == data
    start = blob.index(data[:4096])
    assert start % 64 == 0 and bytes(memory[start : start + len(data)]) == data
    # From read-only memory, a copy; small buffers stay in the pickle.
    assert type(memoryview(_envelope.load_function(blob).args[0].data).obj) is bytearray
    # Its parts are joined by the extension, as b"".join would.
    parts = [b"ab", memoryview(bytearray(b"cd")), b"", bytearray(_big(2 * MIB, 5))]
    assert _native.join_buffers(parts) == b"".join(parts)
    with pytest.raises(TypeError):
        _native.join_buffers([b"ab", 3])
    small = _functions.dumps(functools.partial(blob_home, Blob(bytearray(b"x" * 100))))
    assert small[0] == pickle.PROTO[0] and bytes(_envelope.load_function(small).args[0].data) == b"x" * 100


def test_a_result_the_caller_holds_is_never_overwritten(pool):
    held = [pool.apply(identity, (Blob(bytearray(_big(2 * MIB, s))),)) for s in range(4)]
    for s, out in enumerate(held):
        assert bytes(out.data) == _big(2 * MIB, s)


def test_a_reply_memfd_is_reused_once_the_results_mapping_it_are_gone(monkeypatch):
    made = []
    memfd_create = os.memfd_create

    def counted(*args):
        made.append(args)
        return memfd_create(*args)

    monkeypatch.setattr(os, "memfd_create", counted)
    with Pool(1) as p:
        wait_until(lambda: p._shared.buffers.usable is True, 30, "the probe's answer")
        held = p.apply(identity, (Blob(bytearray(_big(2 * MIB, 1))),))
        for s in range(2, 22):
            out = p.apply(identity, (Blob(bytearray(_big(2 * MIB, s))),))
            assert bytes(out.data) == _big(2 * MIB, s)
            del out
        assert bytes(held.data) == _big(2 * MIB, 1)  # never overwritten while held
    assert len(made) <= 6, f"{len(made)} memfds made for 21 results: dropped results' memfds not reused"


def test_past_a_bound_reply_memfds_results_hold_are_closed_not_kept(monkeypatch):
    monkeypatch.setattr(memfds_module, "MAX_LENT", 1)
    with Pool(1) as p:
        wait_until(lambda: p._shared.buffers.usable is True, 30, "the probe's answer")
        held = [p.apply(identity, (Blob(bytearray(_big(2 * MIB, s))),)) for s in range(3)]
        assert len(p._shared.buffers.lent) == 1
        for s, out in enumerate(held):
            assert bytes(out.data) == _big(2 * MIB, s)


@pytest.fixture(params=["embedded", "remote"])
def one_executor(request):
    """A pool of one executor, embedded or on a remote worker, that can
    open the reply memfds offered to it (the driver's, or its agent's)."""
    if request.param == "embedded":
        with Pool(1) as p:
            wait_until(lambda: p._shared.buffers.usable is True, 30, "the probe's answer")
            yield p
        return
    orch, key = request.getfixturevalue("keyed")
    worker = request.getfixturevalue("spawn_worker")(orch.addresses[0], key=key, processes=1)
    if not orch.wait_for_workers(1, timeout=60):
        pytest.fail(f"the worker did not connect:\n{worker.log()}")
    with Pool(orchestrator=orch) as p:
        assert p.map(abs, [-1]) == [1]  # after its executor said it can open them
        yield p


def test_a_reply_memfd_that_cannot_be_written_sends_the_result_inline(one_executor):
    # A large result that came inline gets its function's next task a reply
    # memfd. The executor's first write into one works (and keeps a mapping
    # of it); every later one fails, as on a full tmpfs: through the kept
    # mapping, then opening the memfd anew.
    answers = [one_executor.apply(made_until_memfds_fill, (16 * MIB, seed)) for seed in range(6)]
    for seed, (data, _, _) in enumerate(answers):
        assert bytes(data.data) == _big(16 * MIB, seed)
    writes = [writes for _, _, writes in answers]
    assert writes[-1] >= 3, f"reply memfds offered too seldom to test: writes so far {writes}"
    assert len({pid for _, pid, _ in answers}) == 1, "the executor ended instead of sending inline"


def test_an_argument_a_task_keeps_is_never_overwritten():
    with Pool(1) as p:
        first = _big(2 * MIB, 3)
        assert p.apply(keep, (Blob(bytearray(first)),)) == 1
        for s in range(4, 8):  # same size: the memfds would be reused if free
            assert bytes(p.apply(identity, (Blob(bytearray(_big(2 * MIB, s))),)).data) == _big(2 * MIB, s)
        assert p.apply(kept, (0,)) == first


def test_memory_is_reused_and_released_with_the_pool():
    before = _memfds()
    with Pool(1) as p:
        data = _big(2 * MIB, 4)
        for _ in range(20):
            assert p.apply(identity, (data,)) == data
        # One memfd for the argument, one for the reply, reused task after task.
        assert _memfds() - before == 2
        assert p.map(identity, [data] * 6, chunksize=1) == [data] * 6
        assert _memfds() - before <= 12
    assert _memfds() == before


def test_a_crashed_attempt_is_retried_with_the_same_argument(tmp_path):
    data = _big(2 * MIB, 5)
    with Pool(1) as p:
        assert p.apply(crash_first_time, (str(tmp_path / "marker"), data)) == len(data)


def test_the_frame_limit_counts_out_of_band_bytes():
    with Pool(1, max_message_size=MIB) as p:
        with pytest.raises(ValueError, match="exceeds the frame limit"):
            p.apply(len, (Blob(bytearray(2 * MIB)),))
        with pytest.raises(ValueError, match="exceeds the frame limit"):
            p.map(len, [b"x", bytes(2 * MIB)], chunksize=1)
        with pytest.raises(distripool.ResultTooLargeError):
            p.apply(bytearray, (2 * MIB,))
        assert p.map(len, [b"x"] * 3) == [1, 1, 1]


def test_a_result_pointing_at_memory_it_was_not_given_is_refused(pool):
    main, bufs = _envelope.dumps((True, Blob(bytearray(2 * MIB))))
    forged = b"".join(_envelope.envelope(main, [(False, 2 * MIB, (os.getpid(), 0, 1, 0))], {}))
    shared = pool._shared
    ok, err = distripool.pool._decode(0, forged, shared.buffers, None)
    assert not ok and "shared memory it was not given" in str(err.__cause__)
    ok, err = distripool.pool._decode(0, forged)
    assert not ok and "does not use" in str(err.__cause__)


def test_a_buffer_said_to_run_past_its_memfd_is_refused():
    fd = os.memfd_create("distripool")
    try:
        os.ftruncate(fd, MIB)
        main, _ = _envelope.dumps((True, Blob(bytearray(2 * MIB))))
        ino = os.fstat(fd).st_ino
        payload = b"".join(_envelope.envelope(main, [(False, 2 * MIB, (os.getpid(), fd, ino, 0))], {}))
        with pytest.raises(ValueError, match="past the end of its memfd"):
            _envelope.load(payload, lambda pid, f, inode: (f, False))
    finally:
        os.close(fd)


def test_payload_envelopes_parse_back():
    data = _big(2 * MIB, 6)
    main, bufs = _envelope.dumps(_envelope.wrap_value([data, Blob(bytearray(data)), 1], True))
    assert len(bufs) == 2 and len(main) < 4096
    payload = b"".join(_envelope.inline(main, bufs, {"kept": True}))
    obj, mapped, extra = _envelope.load(payload)
    assert obj[0] == data and bytes(obj[1].data) == data and obj[1].writable() and obj[2] == 1
    assert extra == {"kept": True} and not mapped.release()
    # Small buffers stay in band: a plain pickle.
    main, bufs = _envelope.dumps(_envelope.wrap_value(b"x" * 100, False))
    assert not bufs and pickle.loads(main) == b"x" * 100


def test_remote_workers_get_large_buffers_inline(remote_orchestrator):
    data = _big(3 * MIB, 7)
    with Pool(orchestrator=remote_orchestrator) as p:
        assert p._shared.buffers is None
        assert p.apply(identity, (data,)) == data
        out = p.apply(identity, (Blob(bytearray(data)),))
        assert bytes(out.data) == data and out.writable()
        assert p.map(len, [data] * 3, chunksize=1) == [len(data)] * 3


# Many large tasks in flight with few descriptors to spare: past a bound, the
# buffers travel inline instead of in memfds, and nothing fails.
FEW_DESCRIPTORS = r"""
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (200, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from distripool import Pool
data = bytes(range(256)) * (4096 * 2)  # 2 MiB
with Pool(1) as p:
    assert p.map(len, [data] * 300, chunksize=1) == [len(data)] * 300
    assert p.apply(len, (data,)) == len(data)
print("ok")
"""


def test_many_large_tasks_in_flight_do_not_run_out_of_descriptors():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", FEW_DESCRIPTORS], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_executors_are_asked_once_whether_they_can_open_the_memfds():
    data = _big(2 * MIB, 8)
    with Pool(1) as p:
        wait_until(lambda: p._shared.buffers.usable is True, 30, "the probe's answer")
        assert p.apply(identity, (data,)) == data
        assert p._shared.buffers.pending == {} and p._shared.buffers.free


def test_executors_that_cannot_open_the_memfds_get_buffers_inline():
    before = _memfds()
    data = _big(2 * MIB, 9)
    with Pool(1, maxtasksperchild=2) as p:
        # Ask again, as a pool whose executors cannot open the memfds would.
        wait_until(lambda: p._shared.buffers.usable is True, 30, "the first probe's answer")
        p._shared.probe_function = refuse_memfds
        p._shared.buffers.usable = None
        assert p.apply(identity, (data,)) == data  # inline while the probe runs
        wait_until(lambda: p._shared.buffers.usable is False, 30, "the probe's answer")
        for _ in range(3):
            out = p.apply(identity, (Blob(bytearray(data)),))
            assert bytes(out.data) == data and out.writable()
        assert p.map(len, [data] * 4, chunksize=1) == [len(data)] * 4
        assert _memfds() == before


# The native copies between buffers and memfds. 24 MiB is past the size at
# which several threads share a copy, so both paths are covered.


@pytest.mark.parametrize("size", [3 * MIB + 5, 24 * MIB + 4097])
def test_native_copies_are_exact_into_new_and_existing_pages(size):
    from distripool import _native

    data = os.urandom(size)
    fd = os.memfd_create("distripool-test")
    try:
        os.ftruncate(fd, 4096 + size)
        _native.write_buffer(fd, 4096, data)  # pages the file does not have yet
        assert os.pread(fd, size, 4096) == data
        again = bytes(reversed(data))
        _native.write_buffer(fd, 4096, memoryview(again))  # pages it has
        out = _native.read_bytes(fd, 4096, size)
        assert type(out) is bytes and out == again
        with pytest.raises(OSError):
            _native.read_bytes(fd, 4096, size + 8192)  # past the end of the file
        with pytest.raises(ValueError):
            _native.write_buffer(fd, 100, data)  # not at a page boundary
        with pytest.raises((BufferError, TypeError)):
            _native.write_buffer(fd, 0, memoryview(data)[::2])  # not contiguous
    finally:
        os.close(fd)


def test_shared_mapping_writes_in_bounds_and_only_while_open():
    from distripool import _native

    fd = os.memfd_create("distripool-test")
    try:
        os.ftruncate(fd, 16 * MIB)
        assert _native.SharedMapping.of_resident(fd) is None  # no pages yet
        _native.write_buffer(fd, 0, bytes(16 * MIB))
        mapping = _native.SharedMapping.of_resident(fd)
        assert mapping is not None and mapping.length == 16 * MIB
        data = os.urandom(12 * MIB)
        mapping.write(MIB, data)
        assert os.pread(fd, len(data), MIB) == data
        with pytest.raises(ValueError):
            mapping.write(8 * MIB, data)  # would reach past its end
        mapping.close()
        mapping.close()
        assert mapping.length == 0
        with pytest.raises(ValueError):
            mapping.write(0, b"x")
    finally:
        os.close(fd)


def test_reused_memfds_are_written_through_a_kept_mapping_with_exact_results(pool):
    wait_until(lambda: pool._shared.buffers.usable is True, 30, "the probe's answer")
    blobs = [os.urandom(9 * MIB) for _ in range(3)]
    for blob in blobs * 2:
        assert pool.apply(identity, (blob,)) == blob
    shared = pool._shared.buffers
    assert shared.mappings, "no memfd was written through a kept mapping"
    assert set(shared.mappings) <= set(shared.inodes)


def test_replies_are_written_through_kept_mappings_checked_against_the_driver():
    pid = os.getpid()
    fd = os.memfd_create(_envelope.MEMFD_NAME)
    other = None
    try:
        key = (pid, fd, os.fstat(fd).st_ino)
        first, second = os.urandom(9 * MIB), os.urandom(9 * MIB)
        # A new memfd has no pages yet: written by pwrite, and not kept.
        descs = _replies.write_reply(key, [memoryview(first)])
        assert descs[0][1] == len(first) and key not in _replies._reply_maps
        assert os.pread(fd, len(first), descs[0][2][3]) == first
        # Its pages exist now: mapped, kept, and used for the next reply.
        _replies.write_reply(key, [memoryview(second)])
        kept = _replies._reply_maps[key]
        _replies.write_reply(key, [memoryview(first)])
        assert _replies._reply_maps[key] is kept
        assert os.pread(fd, len(first), 0) == first
        # A larger reply than the mapping covers: the memfd grows, mapped anew later.
        bigger = os.urandom(12 * MIB)
        descs = _replies.write_reply(key, [memoryview(bigger)])
        assert os.pread(fd, len(bigger), descs[0][2][3]) == bigger
        assert key not in _replies._reply_maps
        _replies.write_reply(key, [memoryview(bigger)])
        assert _replies._reply_maps[key].length >= len(bigger)
        # The driver let the memfd go: its mapping goes at the next reply.
        os.close(fd)
        other = os.memfd_create(_envelope.MEMFD_NAME)
        fd = None
        _replies.write_reply((pid, other, os.fstat(other).st_ino), [memoryview(first)])
        assert key not in _replies._reply_maps
        _replies.write_reply((pid, other, os.fstat(other).st_ino), [memoryview(first)])
        assert _replies.holds_reply_maps()
        _replies.release_idle()
        assert not _replies.holds_reply_maps()
    finally:
        _replies.release_idle()
        for f in (fd, other):
            if f is not None:
                os.close(f)


def _memfd_mappings(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum("/memfd:distripool" in line for line in f)


def test_an_idle_executor_lets_its_reply_mappings_go():
    with Pool(1) as p:
        wait_until(lambda: p._shared.buffers.usable is True, 30, "the probe's answer")
        pid = p.apply(os.getpid)
        blob = os.urandom(9 * MIB)
        for _ in range(3):
            assert p.apply(identity, (blob,)) == blob
        wait_until(lambda: _memfd_mappings(pid) == 0, 30, "the idle executor to unmap the reply memfds")
        assert p.apply(identity, (blob,)) == blob


def test_a_memfd_that_shrank_is_not_written_through_its_old_mapping():
    shared = memfds_module.SharedBuffers()
    try:
        fd = shared._acquire(16 * MIB)
        _envelope._write_buffers(fd, [memoryview(bytes(16 * MIB))], (os.getpid(), fd, 0))
        assert shared._mapping(fd).length == 16 * MIB
        os.ftruncate(fd, 8 * MIB)  # what distripool never does
        mapping = shared._mapping(fd)
        assert mapping is None or mapping.length <= 8 * MIB
        data = os.urandom(8 * MIB)
        _envelope._write_buffers(fd, [memoryview(data)], (os.getpid(), fd, 0), mapping)
        assert os.pread(fd, len(data), 0) == data
    finally:
        shared.close()
