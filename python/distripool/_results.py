"""The result objects of ``distripool.Pool``: ``ApplyResult``
(``AsyncResult``), ``MapResult`` and the imap iterators, with the
``_IMapJob`` state that the result thread and an iterator's feeder share.
"""

from __future__ import annotations

import collections
import threading
import time
import weakref
from multiprocessing import TimeoutError
from typing import TYPE_CHECKING, Any, Callable, Generic, TypeVar

from ._shared import _report_callback_error
from .exceptions import (
    OrchestratorClosedError,
)

if TYPE_CHECKING:
    from ._shared import _Shared

_T = TypeVar("_T")
_I = TypeVar("_I", bound="IMapIterator[Any]")


class ApplyResult(Generic[_T]):
    """Handle of one ``apply_async`` call (``multiprocessing.pool.AsyncResult``)."""

    def __init__(
        self,
        shared: _Shared,
        callback: Callable[[_T], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        offered: bool = False,
    ) -> None:
        self._shared = shared
        self._event = threading.Event()
        self._job = shared.client.new_job()
        self._callback = callback
        self._error_callback = error_callback
        self._success = False
        self._value = None
        shared.cache[self._job] = self
        # One task without callbacks: a caller waiting in get() when its
        # completion arrives takes it straight from the orchestrator, a
        # thread wake-up sooner than through the result thread (which gets
        # it when nobody waits). Call before submitting.
        self._offered = offered
        self._taken = None  # the completion wait_offered took, as it returns
        if offered:
            shared.client.offer(self._job)

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        if self._offered and not self._event.is_set():
            start = time.monotonic()
            if self._take(timeout):
                return
            if timeout is not None:
                timeout = max(0.0, timeout - (time.monotonic() - start))
        self._event.wait(timeout)

    def _take(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` for the offered completion; True if this
        caller took it (the result is then set), False if it is not in yet or
        went the result thread's way (or another caller's)."""
        self._taken = None
        try:
            self._shared.client.wait_offered(self._job, timeout, self)
        except OrchestratorClosedError:
            return False  # the pool's end fails the result
        except BaseException as exc:
            # Ctrl-C may come just as the call returns, with the completion
            # taken (the call put it in _taken first): the job must end.
            if self._taken is not None:
                self._interrupted(exc)
            raise
        c, self._taken = self._taken, None
        if c is None:
            return False
        # The completion is this caller's alone now: whatever interrupts
        # setting it (Ctrl-C's KeyboardInterrupt, raised wherever the main
        # thread is when it comes), the job must end, or join would wait
        # for it for ever.
        try:
            _, index, status, data = c
            self._set(index, self._shared.decode(self._job, index, status, data))
        except BaseException as exc:
            self._interrupted(exc)
            raise
        return True

    def _interrupted(self, exc: BaseException) -> None:
        """End the job with ``exc`` (what interrupted the caller taking its
        completion), unless it ended before that came."""
        if not self._event.is_set():
            self._success, self._value = False, exc
            self._finish()

    def get(self, timeout: float | None = None) -> _T:
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError
        if self._success:
            return self._value  # type: ignore[return-value]
        raise self._value  # type: ignore[misc]

    def _finish(self) -> None:
        self._event.set()
        self._shared.job_done(self._job)

    def _set(self, index: int, item) -> None:
        self._success, self._value = item
        self._run_callback()
        self._finish()

    def _run_callback(self) -> None:
        """Call the callback or error callback with the final value. An
        exception there is reported and does not stop the result thread."""
        callback, kind = (
            (self._callback, "callback") if self._success else (self._error_callback, "error_callback")
        )
        if callback is not None:
            try:
                callback(self._value)
            except Exception:
                _report_callback_error(kind)

    def _abort(self, exc: BaseException) -> None:
        bar = getattr(self, "_bar", None)
        if bar is not None:
            bar.close()
        if self._offered:
            # A caller waiting for the completion itself waits for this instead.
            self._shared.client.forget(self._job)
        if not self._event.is_set():
            self._success, self._value = False, exc
            self._event.set()


AsyncResult = ApplyResult


class MapResult(ApplyResult[list[_T]]):
    """Handle of a ``map_async``/``starmap_async`` call: one list, in order."""

    def __init__(
        self,
        shared: _Shared,
        chunksize: int,
        length: int,
        callback: Callable[[list[_T]], object] | None,
        error_callback: Callable[[BaseException], object] | None,
    ) -> None:
        super().__init__(shared, callback, error_callback)
        self._success = True
        self._value = [None] * length
        self._length = length
        self._chunksize = chunksize
        if chunksize <= 0:
            self._number_left = 0
            self._finish()
        else:
            self._number_left = length // chunksize + bool(length % chunksize)

    _bar = None  # a _progress.Bar, with progress=...
    _length = 0

    def _set(self, index: int, item) -> None:
        self._number_left -= 1
        success, result = item
        if self._bar is not None:
            start = index * self._chunksize
            self._bar.advance(min(self._chunksize, self._length - start), failed=not success)
            if self._number_left == 0:
                self._bar.close()
        if success and self._success:
            self._value[index * self._chunksize : (index + 1) * self._chunksize] = result
        elif not success and self._success:
            # The first error wins; the result is ready once every chunk is back.
            self._success = False
            self._value = result
        if self._number_left == 0:
            self._run_callback()
            self._finish()


class _IMapJob:
    """The results of one ``imap`` job, as they arrive: what the result
    thread, the feeder and the iterator the caller holds share.

    The feeder keeps at most ``max_in_flight`` chunks submitted and not yet
    handed out. Every submitted chunk is accounted for once: it completes
    (``_received``) or is withdrawn before any worker got it
    (``_withdrawn``); the job is done when the two cover its length.
    """

    def __init__(self, shared: _Shared, max_in_flight: int, ordered: bool):
        self._shared = shared
        self._ordered = ordered
        self._cond = threading.Condition(threading.Lock())
        self._job = shared.client.new_job()
        self._items: collections.deque = collections.deque()  # decoded chunks ready to hand out
        self._current = iter(())
        self._unsorted: dict[int, tuple] = {}
        self._next_chunk = 0  # ordered: index of the next chunk to hand out
        self._received = 0
        self._withdrawn = 0
        self._taken = 0  # chunks handed to the consumer
        self._length: int | None = None  # number of chunks, once the input is exhausted
        self._permits = threading.Semaphore(max_in_flight)
        # Set when nobody will read the results: the feeder stops reading
        # the input, and what no worker has started is withdrawn.
        self._abandoned = False
        # Set by Pool.join: the feeder no longer waits for the caller.
        self._unbounded = False
        # Set when the input must not be read further: the caller finds
        # this error where the next chunk would have been.
        self._input_end: BaseException | None = None
        self._buffered = False  # an Executor.map with a buffersize
        shared.cache[self._job] = self

    def next(self, timeout: float | None = None):
        while True:
            for value in self._current:
                return value
            with self._cond:
                if not self._cond.wait_for(lambda: self._items or self._exhausted(), timeout):
                    raise TimeoutError
                if not self._items:
                    raise StopIteration
                success, value = self._items.popleft()
                self._taken += 1
            self._permits.release()
            if not success:
                raise value
            self._current = iter(value)

    def _exhausted(self) -> bool:
        return self._length is not None and self._taken >= self._length

    def _push(self, item) -> None:
        # Caller holds self._cond.
        self._items.append(item)
        self._cond.notify()

    _bar = None  # a _progress.Bar, with progress=...
    _chunksize = 1

    def _set(self, index: int, item) -> None:
        if self._bar is not None:
            success, value = item
            n = len(value) if success and isinstance(value, list) else self._chunksize
            self._bar.advance(n, failed=not success)
        with self._cond:
            if not self._abandoned:
                self._accept(index, item)
            self._received += 1
            self._maybe_done()

    def _accept(self, index: int, item) -> None:
        if not self._ordered:
            self._push(item)
            return
        if index != self._next_chunk:
            self._unsorted[index] = item
            return
        self._push(item)
        self._next_chunk += 1
        while self._next_chunk in self._unsorted:
            self._push(self._unsorted.pop(self._next_chunk))
            self._next_chunk += 1

    def _complete(self) -> bool:
        """Every chunk has come back or was withdrawn (caller holds self._cond)."""
        return self._length is not None and self._received + self._withdrawn >= self._length

    def _maybe_done(self) -> None:
        # Caller holds self._cond. job_done may be called more than once.
        if self._complete():
            if self._bar is not None:
                self._bar.close()
            self._shared.job_done(self._job)

    def _set_length(self, length: int) -> None:
        """The feeder is done: ``length`` chunks were submitted."""
        with self._cond:
            self._length = length
            self._cond.notify_all()
            abandoned = self._abandoned
            self._maybe_done()
        if abandoned:
            self._withdraw(cancelled=False)

    def _set_input_error(self, index: int, exc: BaseException) -> None:
        # The input iterable raised after `index` chunks: deliver it in its place.
        with self._cond:
            if not self._abandoned:
                self._accept(index, (False, exc))
            self._received += 1
        self._set_length(index + 1)

    def _withdraw(self, cancelled: bool) -> None:
        """Take back the chunks no worker has started. With ``cancelled``, a
        caller still reading finds ``CancelledError`` in their place."""
        if self._shared.stopping:
            return
        try:
            indexes = self._shared.client.withdraw(self._job)
        except OrchestratorClosedError:
            return  # the orchestrator is gone: the pool fails what is pending
        if indexes:
            self._shared.forget(self._job, indexes)
        with self._cond:
            if cancelled and not self._abandoned:
                for index in indexes:
                    self._accept(index, (False, _cancelled()))
                self._received += len(indexes)
            else:
                self._withdrawn += len(indexes)
            self._cond.notify_all()
            self._maybe_done()

    def _abandon(self) -> None:
        """Nobody reads these results any more (the caller's iterator was
        dropped, or ``Executor.map`` stopped early): stop reading the input
        and withdraw what has not started. Running chunks finish; their
        results are dropped."""
        with self._cond:
            if self._abandoned or self._complete():
                return
            self._abandoned = True
            self._items.clear()
            self._unsorted.clear()
            self._current = iter(())
            feeding = self._length is None
        if feeding:
            self._permits.release()  # the feeder, if it waits for room, sees the flag
        else:
            self._withdraw(cancelled=False)

    def _end_input(self, exc: BaseException) -> None:
        """Read no more of the input; what was submitted still completes."""
        self._input_end = exc
        self._permits.release()

    def _unbound(self) -> None:
        """Let the feeder submit the rest of the input without waiting for
        the caller to read (``Pool.join`` waits for all of it)."""
        self._unbounded = True
        self._permits.release()

    def _abort(self, exc: BaseException) -> None:
        if self._bar is not None:
            self._bar.close()
        with self._cond:
            self._items.append((False, exc))
            self._length = 0
            self._cond.notify_all()


def _cancelled() -> BaseException:
    import concurrent.futures

    return concurrent.futures.CancelledError()


class IMapIterator(Generic[_T]):
    """Results of ``imap``, in input order, as they become available.

    The input is consumed lazily by a feeder thread that keeps a bounded
    number of chunks in flight, so an endless generator is fine. An iterator
    that is dropped unfinished stops the feeder: the rest of its input is
    not read, and its chunks that no worker has started are withdrawn.
    """

    _ordered = True

    def __init__(self, shared: _Shared, max_in_flight: int) -> None:
        self._imap = imap = _IMapJob(shared, max_in_flight, self._ordered)
        weakref.finalize(self, imap._abandon)

    def __iter__(self: _I) -> _I:
        return self

    def next(self, timeout: float | None = None) -> _T:
        return self._imap.next(timeout)  # type: ignore[no-any-return]

    def __next__(self) -> _T:
        return self._imap.next()  # type: ignore[no-any-return]

    # The number of items of the input, when it has a length (so that
    # ``tqdm(pool.imap(f, xs))`` knows its total); None otherwise.
    _items_total: int | None = None

    def __len__(self) -> int:
        if self._items_total is None:
            raise TypeError(f"{type(self).__name__} has no len(): its input has no length")
        return self._items_total

    def __bool__(self) -> bool:
        return True  # an iterator is true, whatever its length


class IMapUnorderedIterator(IMapIterator[_T]):
    """Results of ``imap_unordered``, in completion order."""

    _ordered = False
