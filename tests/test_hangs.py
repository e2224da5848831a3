"""What the hang matrix does not spell out: an imap whose caller stops
reading, with the iterator dropped or kept; withdrawn work and the waits
that must not count it; an executor map whose submission fails."""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import threading
import time

import pytest

from distripool import Pool, ProcessPoolExecutor


def slow(x):
    time.sleep(0.02)
    return x * 2


def boom(x):
    if x == 0:
        raise ValueError("boom")
    time.sleep(0.02)
    return x


class Counting:
    """An endless input that counts how far it was read."""

    def __init__(self):
        self.pulled = 0
        self.lock = threading.Lock()

    def __iter__(self):
        for i in itertools.count():
            with self.lock:
                self.pulled += 1
            yield i


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_a_dropped_imap_stops_reading_its_endless_input(method):
    source = Counting()
    pool = Pool(2)
    it = getattr(pool, method)(slow, source)
    got = [next(it) for _ in range(5)]
    assert len(got) == 5
    del it  # nobody reads the rest
    pool.close()
    pool.join()  # must not wait for an endless input
    pulled = source.pulled
    # The feeder stopped: at most the chunks in flight were read beyond the five.
    assert pulled <= 5 + max(16, 4 * 2) + 2, pulled


@pytest.mark.timeout(60)
def test_a_dropped_imap_withdraws_what_has_not_started():
    with Pool(2) as pool:
        it = pool.imap(slow, range(10_000))
        assert next(it) == 0
        del it
        # The pool is free again at once: a new task does not queue behind
        # the rest of the dropped imap.
        assert pool.apply(slow, (21,)) == 42


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_join_finishes_a_kept_imap_like_multiprocessing(method):
    pool = Pool(2)
    it = getattr(pool, method)(slow, range(60))
    first = [next(it) for _ in range(3)]
    pool.close()
    pool.join()  # the caller still holds the iterator: the rest of the input runs
    rest = list(it)
    assert sorted(first + rest) == [x * 2 for x in range(60)]


@pytest.mark.timeout(60)
def test_executor_map_that_raises_then_shutdown_returns():
    ex = ProcessPoolExecutor(2)
    with pytest.raises(ValueError):
        list(ex.map(boom, range(20)))
    started = time.monotonic()
    ex.shutdown(wait=True)
    assert time.monotonic() - started < 20


def mark(path):
    def run(x):
        import os
        import time

        open(os.path.join(path, str(x)), "w").close()
        time.sleep(0.05)
        return x

    return run


@pytest.mark.timeout(60)
def test_executor_map_timeout_then_shutdown_returns(tmp_path):
    ex = ProcessPoolExecutor(2)
    with pytest.raises(cf.TimeoutError):
        list(ex.map(mark(str(tmp_path)), range(200), timeout=0.2))
    ex.shutdown(wait=True)
    # The items no executor had started were withdrawn, not run.
    ran = len(list(tmp_path.iterdir()))
    assert 0 < ran < 100, ran


@pytest.mark.timeout(60)
def test_executor_map_with_an_unpicklable_item_raises_and_shutdown_returns():
    ex = ProcessPoolExecutor(2)
    # As the standard executor: the item that cannot be pickled raises where
    # its result would be; what came before it is there.
    results = ex.map(slow, [1, threading.Lock(), 3])
    assert next(results) == 2
    with pytest.raises(TypeError):
        next(results)
    ex.shutdown(wait=True)


@pytest.mark.timeout(60)
def test_shutdown_cancel_futures_cancels_the_unstarted_items_of_a_map():
    ex = ProcessPoolExecutor(2)
    results = ex.map(slow, range(2000))
    assert next(results) == 0
    ex.shutdown(wait=True, cancel_futures=True)
    got = []
    with pytest.raises(cf.CancelledError):
        for value in results:
            got.append(value)
    # What ran came back in order before the first cancelled item.
    assert got == [x * 2 for x in range(1, len(got) + 1)]
    assert len(got) < 1999


@pytest.mark.timeout(60)
def test_a_cancelled_future_does_not_keep_join_waiting():
    with ProcessPoolExecutor(1) as ex:
        blocker = ex.submit(time.sleep, 0.5)
        queued = [ex.submit(slow, i) for i in range(20)]
        cancelled = [f.cancel() for f in queued]
        assert any(cancelled)
        assert blocker.result(30) is None
    for f, was_cancelled in zip(queued, cancelled):
        assert f.cancelled() == was_cancelled
        if not was_cancelled:
            assert f.result(0) is not None
