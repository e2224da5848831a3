"""``distripool.ProcessPoolExecutor``: the ``concurrent.futures`` interface on
the same engine as :class:`distripool.Pool`.

Futures are real :class:`concurrent.futures.Future` objects, so
``concurrent.futures.wait`` and ``as_completed`` work with them. A future
whose task no worker has been given yet can be cancelled; once its task has
been handed to a worker, ``cancel()`` returns False, as with the standard
library's executor.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import multiprocessing
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from multiprocessing.pool import MaybeEncodingError, RemoteTraceback
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from . import _progress
from ._executor import ExceptionParts
from ._orchestrator import Orchestrator
from .pool import APPLY, STARMAP, ApplyResult, Pool, _desc, _feed, _IMapJob, _task, check_buffersize

__all__ = ["ProcessPoolExecutor", "Executor"]

_T = TypeVar("_T")
if TYPE_CHECKING:
    from typing import ParamSpec

    _P = ParamSpec("_P")


class _Future(cf.Future):
    """A future that can withdraw its task from the orchestrator's queue."""

    def __init__(self, executor: ProcessPoolExecutor):
        super().__init__()
        self._client = executor._pool._shared.client
        self._shared = executor._pool._shared
        self._job: int | None = None
        self._result: _FutureResult | None = None

    def result(self, timeout: float | None = None):
        r = self._result
        if r is not None and self._state in ("PENDING", "RUNNING"):
            # Wait for the completion in this thread, straight from the
            # orchestrator, rather than for the result thread to pass it on.
            start = time.monotonic()
            if not r._take(timeout) and timeout is not None:
                timeout = max(0.0, timeout - (time.monotonic() - start))
        return super().result(timeout)

    def cancel(self) -> bool:
        with self._condition:
            if self._state != "PENDING" or self._job is None:
                return super().cancel()
        if self._shared.stopping:
            withdrawn = False
        else:
            withdrawn = bool(self._client.withdraw(self._job))
        if withdrawn:
            self._client.forget(self._job)
            self._shared.forget(self._job)
            self._shared.job_done(self._job)
            return super().cancel()
        with self._condition:
            # Handed to a worker already: it is running (or about to).
            if self._state == "PENDING":
                self._state = "RUNNING"
        return False


class _FutureResult(ApplyResult):
    """Routes one task's completion into its future."""

    def __init__(self, shared, future: _Future):
        super().__init__(shared, offered=True)
        self._future = future
        future._job = self._job
        future._result = self

    def _set(self, index, item):
        success, value = item
        if not success:
            value = _as_executor_error(value)
        if not self._future.cancelled():
            try:
                if success:
                    self._future.set_result(value)
                else:
                    self._future.set_exception(value)
            except cf.InvalidStateError:
                pass
        self._shared.job_done(self._job)

    def _interrupted(self, exc):
        if not self._future.done():
            try:
                self._future.set_exception(exc)
            except cf.InvalidStateError:
                pass
        self._shared.job_done(self._job)

    def _abort(self, exc):
        self._shared.client.forget(self._job)
        if not self._future.done():
            try:
                self._future.set_exception(exc)
            except cf.InvalidStateError:
                pass


def _as_executor_error(exc: BaseException) -> BaseException:
    """The exception ``concurrent.futures`` raises where ``multiprocessing``
    raises ``exc``: a result that could not be pickled raises what pickling
    raised, with the executor's traceback as its cause."""
    cause = getattr(exc, "cause", None) if isinstance(exc, MaybeEncodingError) else None
    if cause is None:
        return exc
    if isinstance(cause, ExceptionParts):
        cause = cause.rebuild()
    tb = getattr(exc, "cause_tb", None)
    if tb is not None:
        cause.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    return cause


class ProcessPoolExecutor(cf.Executor):
    """An executor with the interface of ``concurrent.futures.ProcessPoolExecutor``.

    Args:
        max_workers: local executors for the embedded default (default: the
            CPUs this process may run on, as ``os.process_cpu_count()``
            counts them). Ignored with an orchestrator.
        mp_context: accepted for compatibility; executors are always fresh
            interpreters.
        initializer: called as ``initializer(*initargs)`` in each executor
            before its first task of this executor.
        initargs: arguments for ``initializer``.
        max_tasks_per_child: an executor process is replaced after this many tasks.
        orchestrator: run on this :class:`~distripool.Orchestrator`'s workers
            (default: the one made by :func:`~distripool.make_orchestrator`, if any).
        max_crashes: how many times a task may kill its executor before it fails.
        task_timeout: seconds a task may run before its executor is killed and
            its future fails with :class:`~distripool.TaskTimeoutError`.
        dashboard: for the embedded default, a dashboard on this
            ``"host:port"`` (see :class:`distripool.Pool`).
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        *,
        max_tasks_per_child: int | None = None,
        orchestrator: Orchestrator | None = None,
        max_crashes: int = 3,
        task_timeout: float | None = None,
        max_message_size: int | None = None,
        ship_modules: bool = True,
        dashboard: str | int | bool | None = None,
    ) -> None:
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        self._pool = Pool(
            max_workers,
            initializer,
            initargs,
            max_tasks_per_child,
            orchestrator=orchestrator,
            max_crashes=max_crashes,
            task_timeout=task_timeout,
            max_message_size=max_message_size,
            ship_modules=ship_modules,
            dashboard=dashboard,
        )
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._futures: weakref.WeakSet[_Future] = weakref.WeakSet()
        self._maps: weakref.WeakSet[_IMapJob] = weakref.WeakSet()

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> cf.Future[_T]:
        """Schedule ``fn(*args, **kwargs)``; return its future."""
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            pool = self._pool
            blob = pool._function_blob(fn)
            future = _Future(self)
            result = _FutureResult(pool._shared, future)
            try:
                payload = pool._shared.dumps(_task(APPLY, (args, kwargs)), result._job, 0, blob)
            except Exception as exc:
                # As the standard executor: arguments that cannot be pickled
                # fail the future, raised by result().
                pool._shared.client.forget(result._job)
                pool._shared.job_done(result._job)
                future.set_exception(exc)
                return future
            except BaseException:
                pool._shared.client.forget(result._job)
                pool._shared.job_done(result._job)
                raise
            pool._shared.describe(result._job, "submit", fn, 1)
            pool._shared.submit(result._job, blob, [(0, payload)])
            self._futures.add(future)
            return future

    def map(
        self,
        fn: Callable[..., _T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
        progress: bool | str | None = False,
    ) -> Iterator[_T]:
        """Like ``map(fn, *iterables)``, run in parallel; results in order.

        The inputs are read at once, as the standard library does, unless
        ``buffersize`` is given (Python 3.14): then at most that many chunks
        are submitted and not yet yielded, and the inputs are read as the
        results are. Iterating the result raises ``TimeoutError`` if a
        result is not ready within ``timeout`` seconds of this call, and
        re-raises a task's exception at its position. ``progress=True``
        shows a bar of the items done (see :meth:`distripool.Pool.map`).
        """
        check_buffersize(buffersize)
        _progress.check(progress)
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end_time = None if timeout is None else timeout + time.monotonic()
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if buffersize is not None:
                return self._lazy_map(fn, iterables, end_time, chunksize, buffersize, progress)
            items = list(zip(*iterables))
            pool = self._pool
            blob = pool._function_blob(fn)
            shared = pool._shared
            it = _IMapJob(shared, len(items) + 1, ordered=True)
            it._chunksize = chunksize
            it._bar = _progress.make(progress, len(items), _desc(fn), shared, it._job)
            chunks = [items[i : i + chunksize] for i in range(0, len(items), chunksize)]
            tasks = []
            unpicklable = None
            try:
                for i, c in enumerate(chunks):
                    tasks.append((i, shared.dumps(_task(STARMAP, c), it._job, i, blob)))
            except Exception as exc:
                # As the standard executor: the map raises it where that
                # chunk's results would be, and nothing after it runs.
                unpicklable = exc
            except BaseException:
                # Nothing was submitted: the job must not keep shutdown waiting.
                shared.forget(it._job)
                shared.job_done(it._job)
                raise
            if tasks:
                shared.describe(it._job, "map", fn, len(items))
                shared.submit(it._job, blob, tasks)
            if unpicklable is not None:
                it._set_input_error(len(tasks), unpicklable)
            else:
                it._set_length(len(chunks))
            self._maps.add(it)
        return _results(it, len(items), end_time, shared)

    def _lazy_map(self, fn, iterables, end_time, chunksize, buffersize, progress=False):
        """``map`` with a ``buffersize``: a feeder reads the inputs as the
        results are yielded. Call with the shutdown lock held."""
        pool = self._pool
        blob = pool._function_blob(fn)
        shared = pool._shared
        it = _IMapJob(shared, buffersize, ordered=True)
        it._buffered = True
        it._chunksize = chunksize
        it._bar = _progress.make(progress, None, _desc(fn), shared, it._job)
        shared.describe(it._job, "map", fn, None)
        feeder = threading.Thread(
            target=_feed,
            args=(shared, it, blob, zip(*iterables), chunksize, STARMAP),
            name="distripool-feeder",
            daemon=True,
        )
        feeder.start()
        self._maps.add(it)
        return _results(it, None, end_time, shared)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Accept no more work; optionally cancel what has not started; wait."""
        with self._shutdown_lock:
            self._shutdown = True
        for job in list(self._maps):
            # A map with a buffersize reads its input as it is read, and no
            # more once the executor is shut down, as the standard library's.
            if job._buffered:
                job._end_input(RuntimeError("cannot schedule new futures after shutdown"))
        if cancel_futures:
            for f in list(self._futures):
                f.cancel()
            # The items of a map that no worker has started are cancelled
            # too: reading them raises CancelledError, as for their futures.
            for job in list(self._maps):
                job._withdraw(cancelled=True)
        self._pool.close()
        if wait:
            self._pool.join()
        else:
            threading.Thread(target=self._pool.join, name="distripool-shutdown", daemon=True).start()


Executor = ProcessPoolExecutor


def _results(it: _IMapJob, n: int, end_time: float | None, shared):
    """The generator behind ``map``: ``n`` results (None: until the input
    ends) in order, with a deadline."""
    try:
        for _ in range(n) if n is not None else itertools.count():
            try:
                if end_time is None:
                    yield it.next()
                else:
                    yield it.next(end_time - time.monotonic())
            except multiprocessing.TimeoutError:
                raise cf.TimeoutError from None
            except StopIteration:
                return
            except MaybeEncodingError as exc:
                err = _as_executor_error(exc)
                if err is exc:
                    raise
                raise err from err.__cause__
    finally:
        if not it._exhausted():
            # Abandoned early (a task raised, a timeout, or the caller
            # stopped): what has not started will not run.
            it._abandon()
