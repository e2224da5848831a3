"""``distripool.Pool``: the interface of ``multiprocessing.Pool``, run on
local executors or on worker agents anywhere.

::

    caller thread                      result thread              Rust core
    map(f, xs) ── pickle f once ──┐
               ── pickle chunks ──┴─► client.submit ───────────►  scheduler ─► agents
    get() ◄── Event ◄── _set() ◄── unpickle ◄── client.recv ◄───  completions ◄─┘

Functions are pickled with cloudpickle, so lambdas, closures and functions
defined in ``__main__`` work. Arguments and results use pickle protocol 5
(cloudpickle only when plain pickle cannot). Results are unpickled and
callbacks run on the pool's result thread, as in the standard library.
"""

from __future__ import annotations

import collections
import itertools
import os
import pickle
import sys
import threading
import traceback
import types
import warnings
import weakref
from multiprocessing import TimeoutError
from multiprocessing.pool import RemoteTraceback, ThreadPool

import cloudpickle

from . import _buffers, _native
from ._executor import ExceptionParts
from ._orchestrator import Orchestrator, default_orchestrator
from .exceptions import DistripoolError, PoolTerminatedError, TaskTimeoutError, WorkerLostError

__all__ = [
    "Pool",
    "ThreadPool",
    "AsyncResult",
    "ApplyResult",
    "MapResult",
    "IMapIterator",
    "IMapUnorderedIterator",
]

RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"
MAP, STARMAP, APPLY = 0, 1, 2
# How long the result thread waits for completions before checking for shutdown.
_POLL = 0.05

_live_pools: weakref.WeakSet = weakref.WeakSet()


def _task(mode, items):
    return _buffers.wrap_task(mode, items, APPLY, STARMAP)


def _plain_task(mode, items):
    return (mode, items)


def _decode(status: int, data, buffers=None, ticket=None) -> tuple[bool, object]:
    """Turn one completion into ``(success, value_or_exception)``.

    ``status`` 0 carries the task's pickled outcome; the others say why the
    task could not be completed (see ``_native.Client.recv``). ``ticket`` is
    the task's shared memory, if it had any (``buffers`` is its owner)."""
    if status == 3:
        return False, TaskTimeoutError(data)
    if status != 0:
        return False, WorkerLostError(data)
    try:
        if _buffers.is_envelope(data):
            opener = buffers.opener(ticket) if buffers is not None else _no_shared_memory
            outcome, mapped, extra = _buffers.load(data, opener)
        else:
            outcome, mapped, extra = pickle.loads(data), None, None
    except BaseException as exc:  # noqa: BLE001 - any unpickling failure is the task's
        if ticket is not None:
            buffers.done(ticket, True, True)
        err = DistripoolError(f"the task's outcome could not be unpickled in the driver: {exc!r}")
        err.__cause__ = exc
        return False, err
    if ticket is not None:
        # Each memfd is reused unless something still maps it: the argument,
        # if the task kept it; the reply, if the result lives in it.
        reply_kept = mapped.release() if mapped is not None else False
        buffers.done(ticket, bool(extra and extra.get("kept")), reply_kept)
    if outcome[0]:
        return True, outcome[1]
    exc, tb = outcome[1], outcome[2]
    if isinstance(exc, ExceptionParts):
        exc = exc.rebuild()
    if tb is not None:
        exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    return False, exc


def _no_shared_memory(pid, fd, inode):
    raise DistripoolError("the task's result points at shared memory, which this pool does not use")


class _Waiting:
    """Stands in the result cache for a job its caller waits for itself (so
    that ``join`` waits for it too). A completion that reaches the result
    thread anyway (its caller was interrupted) is dropped."""

    @staticmethod
    def _abort(exc) -> None:
        pass

    @staticmethod
    def _set(index, item) -> None:
        pass


class _Probe:
    """Asks an executor whether it can open the driver's memfds: one task,
    run under a pool key of its own (no initializer, not counted towards
    ``maxtasksperchild``). Its answer sets ``buffers.usable``."""

    def __init__(self, shared: _Shared):
        self.shared = shared
        self.lock = threading.Lock()
        self.fd, where = shared.buffers.probe_memfd()
        try:
            self.job = shared.client.new_job()
            blob = cloudpickle.dumps((shared.probe_function, "distripool-probe", None, None), protocol=5)
            payload = pickle.dumps((APPLY, (where, {})), protocol=5)
            shared.cache[self.job] = self
            shared.submit(self.job, blob, [(0, payload)])
        except BaseException:
            shared.cache.pop(getattr(self, "job", None), None)
            os.close(self.fd)
            raise

    def _set(self, index, item) -> None:
        ok, value = item
        self.shared.buffers.usable = bool(ok and value is True)
        self._done()

    def _abort(self, exc) -> None:
        self.shared.buffers.usable = None  # ask again, if the pool goes on
        self._done()

    def _done(self) -> None:
        # The answer (result thread) and a terminate (caller) may both get
        # here: the descriptor is closed once, never a reused number.
        with self.lock:
            fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)
        self.shared.job_done(self.job)


def _report_callback_error(kind: str) -> None:
    print(f"distripool: exception in {kind} (ignored):", file=sys.stderr)
    traceback.print_exc()


class _Shared:
    """What the result thread and the result objects need, without the pool
    itself, so that an abandoned pool can be garbage-collected."""

    def __init__(
        self,
        client,
        orchestrator: Orchestrator,
        owns_orchestrator: bool,
        task_timeout=None,
        max_message_size=None,
    ):
        self.client = client
        # Executors of an embedded pool share this machine: large arguments
        # and their results travel in shared memory.
        self.buffers = _buffers.SharedBuffers() if owns_orchestrator and _buffers.available() else None
        self.max_message_size = max_message_size or _native.DEFAULT_MAX_FRAME
        self.probe_lock = threading.Lock()
        # What the probe runs in an executor (tests put a refusal here).
        self.probe_function = _buffers.can_open
        self.task_timeout = task_timeout
        self.orchestrator = orchestrator
        self.owns_orchestrator = owns_orchestrator
        self.cache: dict[int, object] = {}
        self.idle = threading.Condition(threading.Lock())
        self.stopping = False
        self.shutdown_done = False

    def submit(self, job: int, blob: bytes, tasks) -> None:
        self.client.submit(job, blob, tasks, self.task_timeout)

    def dumps(self, task, job: int, index: int) -> bytes:
        """The payload of task ``(job, index)``: large buffers out of band, in
        shared memory when the executors are local, else inline."""
        main, bufs = _buffers.dumps(task, cloudpickle)
        if not bufs:
            return main
        if self.buffers is not None and self.buffers.has_room() and self._shared_memory_works():
            # The orchestrator checks the frames it carries; bytes in shared
            # memory count against the same limit here.
            size = _buffers.size(main, bufs)
            if size > self.max_message_size:
                raise ValueError(
                    f"a task of {size} bytes exceeds the frame limit of {self.max_message_size} bytes"
                )
            try:
                return self.buffers.put(main, bufs, (job, index))
            except OSError:
                pass  # out of descriptors or memory for memfds: inline instead
        return b"".join(_buffers.inline(main, bufs))

    def _shared_memory_works(self) -> bool:
        """Whether the executors can open the driver's memfds. A new pool
        asks one (a tiny task of its own); large tasks go inline until the
        answer is in, and for good if it is no."""
        usable = self.buffers.usable
        if usable is None:
            with self.probe_lock:
                if self.buffers.usable is None:
                    self.buffers.usable = _buffers.PROBING
                    try:
                        _Probe(self)
                    except BaseException:
                        self.buffers.usable = None
                        raise
            return False
        return usable is True

    def forget(self, job: int, indexes=None) -> None:
        """Free the shared memory of a job's tasks that will get no result:
        ``indexes`` (those withdrawn), or all of them."""
        if self.buffers is not None:
            self.buffers.forget_job(job, indexes)

    def job_done(self, job: int) -> None:
        with self.idle:
            self.cache.pop(job, None)
            if not self.cache:
                self.idle.notify_all()

    def fail_pending(self, exc_factory) -> None:
        for job in list(self.cache):
            r = self.cache.get(job)
            if r is not None:
                r._abort(exc_factory())
        with self.idle:
            self.cache.clear()
            self.idle.notify_all()

    def handle_results(self) -> None:
        client, cache = self.client, self.cache
        while True:
            try:
                batch = client.recv(_POLL)
            except RuntimeError:
                self.fail_pending(lambda: PoolTerminatedError("the pool's orchestrator was closed"))
                return
            if not batch:
                if self.stopping:
                    return
                continue
            self._deliver(batch, cache)
            # Nothing of a delivered batch stays referenced from here while
            # the next one is awaited: a result the caller drops is freed
            # (as the standard library does since bpo-29861).
            del batch

    def _deliver(self, batch, cache) -> None:
        buffers = self.buffers
        for job, index, status, data in batch:
            ticket = buffers.take((job, index)) if buffers is not None else None
            item = _decode(status, data, buffers, ticket)
            r = cache.get(job)
            if r is not None:
                r._set(index, item)

    def shutdown(self) -> None:
        """Cancel remote work, stop the result thread's source, free executors."""
        if self.shutdown_done:
            return
        self.shutdown_done = True
        self.stopping = True
        self.client.close()
        if self.owns_orchestrator:
            self.orchestrator.close()
        if self.buffers is not None:
            self.buffers.close()


class ApplyResult:
    """Handle of one ``apply_async`` call (``multiprocessing.pool.AsyncResult``)."""

    def __init__(self, shared: _Shared, callback=None, error_callback=None):
        self._shared = shared
        self._event = threading.Event()
        self._job = shared.client.new_job()
        self._callback = callback
        self._error_callback = error_callback
        self._success = False
        self._value = None
        shared.cache[self._job] = self

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        self._event.wait(timeout)

    def get(self, timeout: float | None = None):
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError
        if self._success:
            return self._value
        raise self._value

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
        if not self._event.is_set():
            self._success, self._value = False, exc
            self._event.set()

    __class_getitem__ = classmethod(types.GenericAlias)


AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """Handle of a ``map_async``/``starmap_async`` call: one list, in order."""

    def __init__(self, shared, chunksize: int, length: int, callback, error_callback):
        super().__init__(shared, callback, error_callback)
        self._success = True
        self._value = [None] * length
        self._chunksize = chunksize
        if chunksize <= 0:
            self._number_left = 0
            self._finish()
        else:
            self._number_left = length // chunksize + bool(length % chunksize)

    def _set(self, index: int, item) -> None:
        self._number_left -= 1
        success, result = item
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

    def _set(self, index: int, item) -> None:
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
        except RuntimeError:
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

    def _unbound(self) -> None:
        """Let the feeder submit the rest of the input without waiting for
        the caller to read (``Pool.join`` waits for all of it)."""
        self._unbounded = True
        self._permits.release()

    def _abort(self, exc: BaseException) -> None:
        with self._cond:
            self._items.append((False, exc))
            self._length = 0
            self._cond.notify_all()


def _cancelled() -> BaseException:
    import concurrent.futures

    return concurrent.futures.CancelledError()


class IMapIterator:
    """Results of ``imap``, in input order, as they become available.

    The input is consumed lazily by a feeder thread that keeps a bounded
    number of chunks in flight, so an endless generator is fine. An iterator
    that is dropped unfinished stops the feeder: the rest of its input is
    not read, and its chunks that no worker has started are withdrawn.
    """

    _ordered = True

    def __init__(self, shared: _Shared, max_in_flight: int):
        self._imap = imap = _IMapJob(shared, max_in_flight, self._ordered)
        weakref.finalize(self, imap._abandon)

    def __iter__(self):
        return self

    def next(self, timeout: float | None = None):
        return self._imap.next(timeout)

    def __next__(self):
        return self._imap.next()

    # The number of items of the input, when it has a length (so that
    # ``tqdm(pool.imap(f, xs))`` knows its total); None otherwise.
    _items_total: int | None = None

    def __len__(self) -> int:
        if self._items_total is None:
            raise TypeError(f"{type(self).__name__} has no len(): its input has no length")
        return self._items_total

    def __bool__(self) -> bool:
        return True  # an iterator is true, whatever its length


class IMapUnorderedIterator(IMapIterator):
    """Results of ``imap_unordered``, in completion order."""

    _ordered = False


class Pool:
    """A process pool with the interface of ``multiprocessing.Pool``.

    Without ``orchestrator`` (and when no default one was made with
    :func:`~distripool.make_orchestrator`), the pool runs ``processes``
    executors on this machine, like ``multiprocessing.Pool``. With one, tasks
    go to the worker agents connected to it, wherever they run.

    Args:
        processes: local executors to start (default ``os.cpu_count()``).
            Ignored with an orchestrator, whose workers bring their own.
        initializer: called as ``initializer(*initargs)`` in each executor
            before the first task of this pool it runs.
        initargs: arguments for ``initializer``.
        maxtasksperchild: an executor is replaced by a fresh one after running
            this many tasks (chunks) of this pool.
        context: accepted for compatibility; executors are always fresh
            interpreters, never forks of the driver.
        orchestrator: an :class:`~distripool.Orchestrator` to run on.
        max_crashes: for the embedded default, how many times a task may kill
            its executor before it fails with :class:`~distripool.WorkerLostError`.
        max_message_size: for the embedded default, the largest pickled chunk
            of arguments, function or result in bytes (default 1 GiB).
        task_timeout: seconds a task (one chunk) may run; past that its
            executor is killed and the task fails with
            :class:`~distripool.TaskTimeoutError`, without a retry.
    """

    def __init__(
        self,
        processes: int | None = None,
        initializer=None,
        initargs=(),
        maxtasksperchild: int | None = None,
        context=None,
        *,
        orchestrator: Orchestrator | None = None,
        max_crashes: int = 3,
        task_timeout: float | None = None,
        max_message_size: int | None = None,
    ):
        self._state = None  # so that __del__ works if the checks below raise
        if task_timeout is not None and not (isinstance(task_timeout, (int, float)) and task_timeout > 0):
            raise ValueError(
                f"task_timeout must be a positive number of seconds or None, not {task_timeout!r}"
            )
        if processes is not None and processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if maxtasksperchild is not None and (not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if orchestrator is not None and not isinstance(orchestrator, Orchestrator):
            raise TypeError(
                f"orchestrator must be a distripool Orchestrator, not {type(orchestrator).__name__}"
            )
        if orchestrator is None:
            orchestrator = default_orchestrator()
        owns = orchestrator is None
        if owns:
            self._processes = processes or os.cpu_count() or 1
            orchestrator = Orchestrator._embedded(self._processes, max_crashes, max_message_size)
        else:
            self._processes = None
        self._orchestrator = orchestrator
        self._shared = _Shared(
            orchestrator._open_client(), orchestrator, owns, task_timeout, max_message_size if owns else None
        )
        # Travels with every function: which pool, its initializer, its task limit.
        init = (initializer, tuple(initargs)) if initializer is not None else None
        self._settings = (os.urandom(8).hex(), init, maxtasksperchild)
        self._state = RUN
        self._result_thread = threading.Thread(
            target=self._shared.handle_results, name="distripool-results", daemon=True
        )
        self._result_thread.start()
        if self._shared.buffers is not None:
            # Ask now whether executors can open our memfds, so that the
            # first large task need not go inline while the probe runs.
            self._shared._shared_memory_works()
        _live_pools.add(self)

    # -- helpers -----------------------------------------------------------

    def _check_running(self) -> None:
        if self._state != RUN:
            raise ValueError("Pool not running")

    def _slots(self) -> int:
        if self._processes is not None:
            return self._processes
        return max(1, self._orchestrator.slots)

    def _function_blob(self, func) -> bytes:
        if not callable(func):
            raise TypeError(f"{type(func).__name__!r} object is not callable")
        return cloudpickle.dumps((func, *self._settings), protocol=5)

    @staticmethod
    def _check_chunksize(chunksize) -> None:
        if chunksize is not None and chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")

    # -- apply -------------------------------------------------------------

    def apply(self, func, args=(), kwds={}):
        """Call ``func(*args, **kwds)`` in an executor and return its result."""
        self._check_running()
        blob = self._function_blob(func)
        shared = self._shared
        client = shared.client
        job = client.new_job()
        payload = shared.dumps(_task(APPLY, (tuple(args), dict(kwds))), job, 0)
        # The caller waits for this job itself, woken straight from the
        # orchestrator rather than through the result thread.
        shared.cache[job] = _Waiting
        try:
            client.expect(job)
            shared.submit(job, blob, [(0, payload)])
            try:
                _, index, status, data = client.wait(job)
            except RuntimeError:
                raise PoolTerminatedError("the pool was terminated") from None
        finally:
            shared.job_done(job)
        buffers = shared.buffers
        success, value = _decode(
            status, data, buffers, buffers.take((job, 0)) if buffers is not None else None
        )
        if success:
            return value
        raise value

    def apply_async(self, func, args=(), kwds={}, callback=None, error_callback=None) -> ApplyResult:
        """Like :meth:`apply`, but return an :class:`AsyncResult` at once."""
        self._check_running()
        blob = self._function_blob(func)
        result = ApplyResult(self._shared, callback, error_callback)
        try:
            payload = self._shared.dumps(_task(APPLY, (tuple(args), dict(kwds))), result._job, 0)
        except BaseException:
            self._shared.job_done(result._job)
            raise
        self._shared.submit(result._job, blob, [(0, payload)])
        return result

    # -- map ---------------------------------------------------------------

    def map(self, func, iterable, chunksize=None):
        """Apply ``func`` to every item; return the results in order."""
        return self._map_async(func, iterable, MAP, chunksize).get()

    def starmap(self, func, iterable, chunksize=None):
        """Like :meth:`map`, calling ``func(*item)`` for each argument tuple."""
        return self._map_async(func, iterable, STARMAP, chunksize).get()

    def map_async(self, func, iterable, chunksize=None, callback=None, error_callback=None) -> MapResult:
        return self._map_async(func, iterable, MAP, chunksize, callback, error_callback)

    def starmap_async(self, func, iterable, chunksize=None, callback=None, error_callback=None) -> MapResult:
        return self._map_async(func, iterable, STARMAP, chunksize, callback, error_callback)

    def _map_async(self, func, iterable, mode, chunksize=None, callback=None, error_callback=None):
        self._check_running()
        self._check_chunksize(chunksize)
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        n = len(iterable)
        if chunksize is None:
            chunksize, extra = divmod(n, self._slots() * 4)
            if extra:
                chunksize += 1
        if n == 0:
            chunksize = 0
        blob = self._function_blob(func) if n else b""
        result = MapResult(self._shared, chunksize, n, callback, error_callback)
        if n:
            items = list(iterable) if not isinstance(iterable, list) else iterable
            job, dumps = result._job, self._shared.dumps
            # Only short chunks have their large top-level bytes wrapped, and
            # only if the input has any: no scan of a long input.
            short = chunksize <= _buffers.SMALL_ITEMS
            wrap = _task if short and (mode == STARMAP or _buffers.any_big(items)) else _plain_task
            try:
                tasks = [
                    (i, dumps(wrap(mode, items[start : start + chunksize]), job, i))
                    for i, start in enumerate(range(0, n, chunksize))
                ]
            except BaseException:
                self._shared.forget(job)
                self._shared.job_done(job)
                raise
            self._shared.submit(job, blob, tasks)
        return result

    # -- imap --------------------------------------------------------------

    def imap(self, func, iterable, chunksize=1):
        """Lazy :meth:`map`: an iterator over the results, in order."""
        return self._imap(IMapIterator, func, iterable, chunksize)

    def imap_unordered(self, func, iterable, chunksize=1):
        """Like :meth:`imap`, yielding results as they finish."""
        return self._imap(IMapUnorderedIterator, func, iterable, chunksize)

    def _imap(self, cls, func, iterable, chunksize):
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        blob = self._function_blob(func)
        it = cls(self._shared, max(16, 4 * self._slots()))
        try:
            it._items_total = len(iterable)
        except TypeError:
            pass  # a generator or other input without a length
        feeder = threading.Thread(
            target=_feed,
            args=(self._shared, it._imap, blob, iter(iterable), chunksize),
            name="distripool-feeder",
            daemon=True,
        )
        feeder.start()
        return it

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Accept no more work; :meth:`join` then waits for what is queued."""
        if self._state == RUN:
            self._state = CLOSE

    def terminate(self) -> None:
        """Stop at once: running tasks, local and remote, are cancelled."""
        if self._state is None:
            return
        self._state = TERMINATE
        self._shared.shutdown()
        self._shared.fail_pending(lambda: PoolTerminatedError("the pool was terminated"))

    def join(self) -> None:
        """Wait for the pool to finish; call :meth:`close` or :meth:`terminate` first."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        if self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        if self._state == CLOSE:
            shared = self._shared
            # The caller of join reads no more imap results itself: the rest
            # of each live imap's input runs, as in multiprocessing.
            for job in list(shared.cache.values()):
                if isinstance(job, _IMapJob):
                    job._unbound()
            with shared.idle:
                while shared.cache:
                    shared.idle.wait()
            shared.shutdown()
        if self._result_thread is not threading.current_thread():
            self._result_thread.join()

    def __enter__(self):
        self._check_running()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.terminate()

    def __reduce__(self):
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def __del__(self, _warn=warnings.warn, RUN=RUN):
        if getattr(self, "_state", None) == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)
            shared = getattr(self, "_shared", None)
            if shared is not None:
                shared.shutdown()

    def __repr__(self):
        where = "embedded" if self._shared.owns_orchestrator else repr(self._orchestrator)
        return f"<distripool.Pool state={self._state} {where}>"


def _feed(shared: _Shared, it: _IMapJob, blob: bytes, source, chunksize: int) -> None:
    """Feeder thread of one imap: pull chunks lazily, submit with backpressure.

    It holds only the job, never the caller's iterator, so that dropping the
    iterator stops it."""
    index = 0
    try:
        while not it._abandoned:
            chunk = list(itertools.islice(source, chunksize))
            if not chunk:
                break
            while not (it._unbounded or it._permits.acquire(timeout=_POLL)):
                if shared.stopping:
                    return
            if shared.stopping:
                return
            if it._abandoned:
                break
            shared.submit(it._job, blob, [(index, shared.dumps(_task(MAP, chunk), it._job, index))])
            index += 1
    except BaseException as exc:  # noqa: BLE001 - the input's error belongs to the caller
        it._set_input_error(index, exc)
        return
    it._set_length(index)


def _terminate_all() -> None:
    for pool in list(_live_pools):
        try:
            if pool._state != TERMINATE:
                pool.terminate()
        except Exception:
            pass
