"""``imap`` pulls its input lazily: an endless generator is fine, and the
driver's memory stays bounded however long the input is."""

from __future__ import annotations

import itertools
import os

import pytest

import distripool

ITEM = 64 * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(params=["embedded", "remote"])
def pool(request):
    if request.param == "embedded":
        p = distripool.Pool(2)
    else:
        p = distripool.Pool(orchestrator=request.getfixturevalue("remote_orchestrator"))
    yield p
    p.terminate()
    p.join()


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_endless_input_uses_bounded_memory(pool, method):
    pulled = itertools.count()

    def endless():
        for _ in itertools.count():
            next(pulled)
            yield os.urandom(ITEM)

    results = getattr(pool, method)(len, endless())
    for _ in range(500):
        assert next(results) == ITEM
    before = rss_bytes()
    for _ in range(2500):
        assert next(results) == ITEM
    grown = rss_bytes() - before
    consumed = 3000
    ahead = next(pulled) - 1 - consumed
    # The feeder may run ahead by the in-flight limit (and one chunk being built).
    limit = max(16, 4 * pool._slots()) + 2
    assert 0 <= ahead <= limit, f"the feeder pulled {ahead} items ahead of the consumer"
    # 2 500 more items of 64 KiB went through; holding them would take 160 MiB.
    assert grown < 48 * 2**20, f"driver memory grew by {grown / 2**20:.1f} MiB"
