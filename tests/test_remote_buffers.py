"""Large buffers to and from remote workers: the parts of a task go to the
runtime unjoined (a ``bytes`` held, anything writable copied once, at
submit), and a large result's inline buffers come out of the runtime's
memory one by one, as objects of the types the task returned. On the
worker's machine they reach executors, and come back, through memfds the
agent owns."""

from __future__ import annotations

import functools

import pytest

from distripool import Pool, _native
from workloads import (
    Blob,
    blob_home,
    crash_first_time,
    function_memfds,
    identity,
    keep,
    kept,
    made,
    poke,
    reply_memfd_owners,
    where_it_lives,
)

MIB = 1 << 20


def _big(n: int, seed: int) -> bytes:
    return bytes((seed + i * 7) % 251 for i in range(256)) * (n // 256)


@pytest.fixture(scope="module")
def remote(remote_orchestrator):
    with Pool(orchestrator=remote_orchestrator) as p:
        assert p._shared.buffers is None
        yield p


@pytest.fixture
def one_executor(keyed, spawn_worker):
    """A pool on a remote worker of one executor, up and ready."""
    orch, key = keyed
    worker = spawn_worker(orch.addresses[0], key=key, processes=1)
    if not orch.wait_for_workers(1, timeout=60):
        pytest.fail(f"the worker did not connect:\n{worker.log()}")
    with Pool(orchestrator=orch) as p:
        # Its first answer comes after it said it can open the agent's memfds.
        assert p.map(abs, [-1]) == [1]
        yield p


def test_large_buffers_reach_the_executor_and_come_back_through_the_agents_memfds(one_executor):
    p = one_executor
    assert p.apply(where_it_lives, (Blob(bytearray(_big(2 * MIB, 1))),)) == "mmap"
    # Below the threshold, in the pickle as before.
    assert p.apply(where_it_lives, (Blob(bytearray(_big(64 * 1024, 1))),)) != "mmap"
    # A result the task makes: the first comes back inline, and its
    # function's next tasks get a reply memfd, which the executor maps to
    # write into once it has all its pages (the second result on).
    for seed in range(3):
        assert p.apply(made, (16 * MIB, seed)) == _big(16 * MIB, seed)
    owners, agent = p.apply(reply_memfd_owners)
    assert owners == [agent]
    # A large buffer bound into the function is a view of the agent's
    # memfd (copy-on-write), not a copy.
    home, writable, content = p.apply(
        functools.partial(blob_home, Blob(bytearray(_big(2 * MIB, 4)))), (False,)
    )
    assert (home, writable, content) == ("mmap", True, _big(2 * MIB, 4))
    # Changed in place and returned: the caller sees the change, the next
    # task a fresh argument.
    for seed in range(2):
        out = p.apply(poke, (Blob(bytearray(_big(2 * MIB, seed))), 5))
        assert bytes(out.data[:5]) == _big(2 * MIB, seed)[:5] and out.data[5] == _big(2 * MIB, seed)[5] ^ 0xFF


def test_an_argument_a_remote_task_keeps_is_never_overwritten(one_executor):
    p = one_executor
    first = _big(2 * MIB, 3)
    assert p.apply(keep, (Blob(bytearray(first)),)) == 1
    for s in range(4, 8):  # same size: the agent's memfd would be reused if free
        assert bytes(p.apply(identity, (Blob(bytearray(_big(2 * MIB, s))),)).data) == _big(2 * MIB, s)
    assert p.apply(kept, (0,)) == first


def test_a_large_function_reaches_every_executor_through_one_memfd_of_the_agents(
    keyed, spawn_worker, tmp_path
):
    orch, key = keyed
    worker = spawn_worker(orch.addresses[0], key=key, processes=2)
    if not orch.wait_for_workers(1, timeout=60):
        pytest.fail(f"the worker did not connect:\n{worker.log()}")
    big = _big(4 * MIB, 9)
    with Pool(orchestrator=orch) as p:
        # Both executors up, and each has said it can open the agent's memfds.
        assert p.map(abs, range(-8, 0), chunksize=1) == list(range(8, 0, -1))
        # Each task waits until both executors have run one.
        out = p.map(functools.partial(function_memfds, big), [(str(tmp_path), 2)] * 8, chunksize=1)
    assert all(n == len(big) for _, _, n in out)
    by_executor = {pid: inodes for pid, inodes, _ in out}
    assert len(by_executor) == 2, f"the tasks ran on {sorted(by_executor)} only"
    # Each maps the function's memfd, and it is the same one: the agent
    # copied the function once for both.
    assert all(len(inodes) == 1 for inodes in by_executor.values()), by_executor
    assert len({inodes[0] for inodes in by_executor.values()}) == 1, by_executor


def test_several_large_buffers_in_one_payload_keep_their_places(remote):
    items = [_big(MIB + 4096 * i + 3, i) for i in range(4)] + [b"small", bytearray(_big(2 * MIB, 9))]
    # One chunk of six: four large bytes, a small one and a bytearray, all
    # out of band or in the pickle, each back in its place.
    out = remote.map(identity, items, chunksize=len(items))
    assert out == items
    assert [type(x) for x in out] == [bytes] * 5 + [bytearray]
    assert remote.starmap(max, [(items[0], items[1])]) == [max(items[0], items[1])]
    assert remote.apply(dict, (), {"x": items[2], "y": 1}) == {"x": items[2], "y": 1}


def test_a_writable_argument_changed_after_submit_does_not_change_the_task(remote):
    data = bytearray(_big(2 * MIB, 3))
    original = bytes(data)
    result = remote.apply_async(identity, (Blob(data),))
    data[:] = bytes(len(data))  # the caller reuses its buffer at once
    assert bytes(result.get(timeout=60).data) == original


def test_a_retried_attempt_gets_the_same_large_argument(remote, tmp_path):
    data = _big(2 * MIB, 5)
    assert remote.apply(crash_first_time, (str(tmp_path / "marker"), data)) == len(data)


def test_a_payload_of_another_type_is_refused_with_a_type_error(remote):
    client = remote._shared.client
    with pytest.raises(TypeError, match="bytes or a list of buffers, not int"):
        client.submit(client.new_job(), b"f", [(0, 123)])
    with pytest.raises(TypeError):
        client.submit(client.new_job(), b"f", [(0, [b"head", object()])])


def test_a_large_result_arrives_as_a_received_payload(remote_orchestrator):
    # What the client hands out for a large envelope: the runtime's memory,
    # read from by copies of its parts.
    data = _big(2 * MIB, 4)
    with Pool(orchestrator=remote_orchestrator) as p:
        seen = []
        decode = p._shared.decode

        def spy(job, index, status, payload):
            seen.append(payload)
            return decode(job, index, status, payload)

        p._shared.decode = spy
        assert p.apply(identity, (data,)) == data
    (payload,) = seen
    assert type(payload) is _native.Received
    assert payload[0] == 1 and payload[-1] == data[-1] and len(payload) > len(data)
    start = len(payload) - len(data)
    assert payload.take(start, len(data), False) == data
    assert type(payload.take(start, 10, True)) is bytearray
    with pytest.raises(ValueError, match="past the end"):
        payload.take(start, len(data) + 1, False)
    with pytest.raises(IndexError):
        payload[len(payload)]
