"""A large function (a ``partial`` over a large array, say) crosses the
driver's link once: the first worker that needs it gets it from the
driver, every other one from a worker that holds it."""

from __future__ import annotations

import functools
import zlib

import pytest

from distripool import Pool
from workloads import crc_plus

MIB = 1 << 20


def test_a_large_function_crosses_the_drivers_link_once(keyed, spawn_worker):
    orch, key = keyed
    workers = [spawn_worker(orch.addresses[0], key=key, processes=1) for _ in range(3)]
    if not orch.wait_for_workers(3, timeout=60):
        pytest.fail("the workers did not connect:\n" + "\n".join(w.log() for w in workers))
    data = bytes(range(256)) * (16 * MIB // 256)
    with Pool(orchestrator=orch) as p:
        sent = orch.stats()["bytes_sent"]
        # Two tasks for each worker at once, from the start: all three need it.
        out = p.map(functools.partial(crc_plus, data), range(30), chunksize=1)
        sent = orch.stats()["bytes_sent"] - sent
    assert out == [zlib.crc32(data) + x for x in range(30)]
    assert orch.stats()["functions_fetched"] == 2, "two workers fetched it from another"
    assert len(data) < sent < 1.5 * len(data), f"{sent} bytes sent for a function of {len(data)}"
    assert sorted(t["tasks_done"] > 0 for t in orch.workers_info()) == [True] * 3


def test_a_small_function_comes_from_the_driver(keyed, spawn_worker):
    orch, key = keyed
    workers = [spawn_worker(orch.addresses[0], key=key, processes=1) for _ in range(2)]
    if not orch.wait_for_workers(2, timeout=60):
        pytest.fail("the workers did not connect:\n" + "\n".join(w.log() for w in workers))
    data = b"x" * (MIB // 2)
    with Pool(orchestrator=orch) as p:
        assert p.map(functools.partial(crc_plus, data), range(8), chunksize=1) == [
            zlib.crc32(data) + x for x in range(8)
        ]
    assert orch.stats()["functions_fetched"] == 0
