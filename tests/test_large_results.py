"""Large results a task creates from small arguments: after the first one,
the function's tasks get a reply memfd of the size it returned, so the
results come back through shared memory, exactly, held results intact."""

from __future__ import annotations

import pytest

from conftest import wait_until
from distripool import Pool
from workloads import made

MIB = 1 << 20


def _expected(n: int, seed: int) -> bytes:
    return bytes((seed + i * 7) % 251 for i in range(256)) * (n // 256)


@pytest.fixture
def pool():
    with Pool(1) as p:
        wait_until(lambda: p._shared.buffers.usable is True, 30, "the probe's answer")
        yield p


def _reply_only_tasks(p) -> int:
    return sum(1 for args, _ in p._shared.buffers.pending.values() if args is None)


def test_a_function_that_returned_a_large_result_gets_reply_memfds(pool, monkeypatch):
    shared = pool._shared
    given = []
    put_reply = shared.buffers.put_reply
    monkeypatch.setattr(
        shared.buffers, "put_reply", lambda main, key, size: given.append(size) or put_reply(main, key, size)
    )
    # The first large result comes inline and teaches the pool its size.
    assert pool.apply(made, (3 * MIB, 1)) == _expected(3 * MIB, 1)
    assert given == []
    assert list(shared.large_fns.values()) == [pytest.approx(3 * MIB, abs=4096)]
    # The next ones are written into the reply memfd each task is given.
    for seed in range(2, 6):
        assert pool.apply(made, (3 * MIB, seed)) == _expected(3 * MIB, seed)
    assert len(given) == 4
    # Held results (out of band, zero-copy) are never overwritten.
    held = [pool.apply(made, (2 * MIB, s, True)) for s in range(3)]
    for s, out in enumerate(held):
        assert bytes(out.data) == _expected(2 * MIB, s)
    # A result larger than the memfd given grows it; async and map alike.
    assert pool.apply_async(made, (5 * MIB, 9)).get(60) == _expected(5 * MIB, 9)
    assert pool.map(made, [4 * MIB] * 3, chunksize=1) == [_expected(4 * MIB, 0)] * 3
    assert shared.job_fns == {}, "jobs over are forgotten"


def test_a_function_whose_results_turn_small_stops_getting_reply_memfds(pool):
    shared = pool._shared
    assert pool.apply(made, (2 * MIB, 1)) == _expected(2 * MIB, 1)
    assert len(shared.large_fns) == 1
    assert pool.apply(made, (512, 1)) == _expected(512, 1)  # with a reply memfd, unused
    assert shared.large_fns == {}
    assert pool.apply(made, (512, 2)) == _expected(512, 2)
    assert _reply_only_tasks(pool) == 0


def test_functions_remembered_for_large_results_are_bounded(pool, monkeypatch):
    from distripool import _shared as shared_module

    monkeypatch.setattr(shared_module, "_LARGE_FNS", 2)
    for seed in range(4):
        # functools.partial objects with other arguments: four functions.
        import functools

        assert pool.apply(functools.partial(made, 2 * MIB, seed)) == _expected(2 * MIB, seed)
    assert len(pool._shared.large_fns) == 2


def test_remote_workers_return_large_results_inline(remote_orchestrator):
    with Pool(orchestrator=remote_orchestrator) as p:
        for seed in range(3):
            assert p.apply(made, (2 * MIB, seed)) == _expected(2 * MIB, seed)
        assert p._shared.buffers is None and p._shared.large_fns == {}
