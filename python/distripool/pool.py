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

import itertools
import multiprocessing
import os
import threading
import types
import warnings
import weakref
from collections.abc import Iterable, Mapping
from multiprocessing.pool import ThreadPool
from types import TracebackType
from typing import Any, Callable, TypeVar, Union

from . import _envelope, _functions, _inherited, _main, _progress
from ._config import process_cpus
from ._executor import APPLY, MAP, STARMAP, Authkey
from ._orchestrator import Orchestrator, default_orchestrator
from ._results import (  # noqa: F401  (AsyncResult is public, as in multiprocessing.pool)
    ApplyResult,
    AsyncResult,
    IMapIterator,
    IMapUnorderedIterator,
    MapResult,
    _IMapJob,
)
from ._shared import _POLL, CLOSE, RUN, TERMINATE, _decode, _desc, _plain_task, _Shared, _task, _Waiting  # noqa: F401
from .exceptions import (
    NoWorkersError,
    OrchestratorClosedError,
    PoolTerminatedError,
)

__all__ = [
    "Pool",
    "ThreadPool",
    "AsyncResult",
    "ApplyResult",
    "MapResult",
    "IMapIterator",
    "IMapUnorderedIterator",
]


_live_pools: weakref.WeakSet = weakref.WeakSet()

_T = TypeVar("_T")
_S = TypeVar("_S")
# progress=: False or None (no bar), True, or a style: "tqdm", "rich", "notebook", "plain".
Progress = Union[bool, str, None]


_P = TypeVar("_P", bound="Pool")


class Pool:
    """A process pool with the interface of ``multiprocessing.Pool``.

    Without ``orchestrator`` (and when no default one was made with
    :func:`~distripool.make_orchestrator`), the pool runs ``processes``
    executors on this machine, like ``multiprocessing.Pool``. With one, tasks
    go to the worker agents connected to it, wherever they run.

    Args:
        processes: local executors to start (default: the CPUs this process
            may run on, as ``os.process_cpu_count()`` counts them).
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
        wait_for_workers: with an orchestrator, seconds to wait for a worker:
            the pool raises :class:`~distripool.NoWorkersError` if none is
            connected by then, and its pending tasks fail with it whenever no
            worker has been connected for that long. Without it, tasks wait
            for workers as long as it takes, and the ``distripool`` logger
            says every minute that they wait, and why.
        ship_modules: on an orchestrator, send the driver's own modules
            (imported from files outside site-packages and the standard
            library) to workers that cannot import them (default). False
            sends only the functions.
        dashboard: for the embedded default, serve a dashboard, its JSON
            API and Prometheus ``/metrics`` on this ``"host:port"`` (``True``:
            ``127.0.0.1:8787``; default ``$DISTRIPOOL_DASHBOARD``, else
            none) while the pool lives. An orchestrator has its own (see
            :func:`~distripool.make_orchestrator`).
    """

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        context: Any = None,
        *,
        orchestrator: Orchestrator | None = None,
        max_crashes: int = 3,
        task_timeout: float | None = None,
        max_message_size: int | None = None,
        wait_for_workers: float | None = None,
        ship_modules: bool = True,
        dashboard: str | int | bool | None = None,
    ) -> None:
        self._state = None  # so that __del__ works if the checks below raise
        _main.check_not_loading("a Pool")
        if task_timeout is not None and not (isinstance(task_timeout, (int, float)) and task_timeout > 0):
            raise ValueError(
                f"task_timeout must be a positive number of seconds or None, not {task_timeout!r}"
            )
        if processes is not None and processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if wait_for_workers is not None and not (
            isinstance(wait_for_workers, (int, float)) and wait_for_workers > 0
        ):
            raise ValueError(
                f"wait_for_workers must be a positive number of seconds or None, not {wait_for_workers!r}"
            )
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
        if orchestrator is not None and dashboard not in (None, False):
            raise ValueError(
                "dashboard= is for the embedded default; this pool runs on an orchestrator, "
                "which has its own: make_orchestrator(..., dashboard=...)"
            )
        owns = orchestrator is None
        if owns:
            self._processes = processes or process_cpus()
            orchestrator = Orchestrator._embedded(self._processes, max_crashes, max_message_size, dashboard)
        else:
            self._processes = None
        self._orchestrator = orchestrator
        watch = orchestrator._watch
        if wait_for_workers is not None and watch is not None:
            if not orchestrator.wait_for_workers(1, timeout=wait_for_workers):
                raise NoWorkersError(
                    f"no worker connected within {wait_for_workers:g} s (wait_for_workers): {watch.diagnosis()}"
                )
        self._shared = _Shared(
            orchestrator._open_client(),
            orchestrator,
            owns,
            task_timeout,
            max_message_size if owns else None,
            bool(ship_modules),
        )
        # Travels with every function: which pool, its initializer, its task
        # limit, and this process's multiprocessing authkey, which executors
        # take on for the pool's tasks (so that Manager() proxies connect).
        init = (initializer, tuple(initargs)) if initializer is not None else None
        self._popen = None if init is None else self._inheriting(*init)
        self._authkey = Authkey(bytes(multiprocessing.current_process().authkey))
        self._settings = (os.urandom(8).hex(), init, maxtasksperchild)
        # Plain functions' pickles, with what they were made from.
        self._blobs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._state = RUN
        self._result_thread = threading.Thread(
            target=self._shared.handle_results, name="distripool-results", daemon=True
        )
        self._result_thread.start()
        if wait_for_workers is not None and watch is not None:
            watch.fail_after(self._shared, wait_for_workers)
        if self._shared.buffers is not None:
            # Ask now whether executors can open our memfds, so that the
            # first large task need not go inline while the probe runs.
            self._shared._shared_memory_works()
        _live_pools.add(self)

    # -- helpers -----------------------------------------------------------

    def _inheriting(self, initializer, initargs):
        """How the initargs pickle, as for processes this pool spawns:
        multiprocessing's queues, locks and shared memory reach embedded
        executors as they reach a spawned child (see ``_inherited``), and are
        refused, by name, on an orchestrator. Checked now, as the standard
        pool's processes take their initargs as they start."""
        init = (initializer, initargs)
        if not self._shared.owns_orchestrator:
            refusing = _inherited.Refusing()
            try:
                _functions.dumps_inherited(init, refusing)
            except _inherited.CannotTravel:
                for i, arg in enumerate(initargs):
                    try:
                        _functions.dumps_inherited(arg, refusing)
                    except _inherited.CannotTravel:
                        raise _inherited.remote_error(i, arg) from None
                raise _inherited.remote_error(None, initializer) from None
            return None
        sharer = _inherited.Sharer()
        _functions.dumps_inherited(init, sharer)
        if not sharer.used:
            return None
        self._shared.sharer = sharer
        return sharer

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
        blob = (self._authkey, func, *self._settings)
        if self._popen is not None:
            return _functions.dumps_inherited(blob, self._popen)
        if type(func) is not types.FunctionType:
            return _functions.dumps(blob)
        # A plain function's pickle is made again only when something it
        # refers to was rebound since (or could have changed in place).
        fingerprint = _functions.fingerprint(func)
        if fingerprint is None:
            return _functions.dumps(blob)
        known = self._blobs.get(func)
        if known is not None and _functions.same(known[0], fingerprint):
            return known[1]  # type: ignore[no-any-return]
        pickled = _functions.dumps(blob)
        self._blobs[func] = (fingerprint, pickled)
        return pickled

    @staticmethod
    def _check_chunksize(chunksize) -> None:
        if chunksize is not None and chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")

    # -- apply -------------------------------------------------------------

    def apply(self, func: Callable[..., _T], args: Iterable[Any] = (), kwds: Mapping[str, Any] = {}) -> _T:
        """Call ``func(*args, **kwds)`` in an executor and return its result."""
        self._check_running()
        blob = self._function_blob(func)
        shared = self._shared
        client = shared.client
        job = client.new_job()
        payload = shared.dumps(_task(APPLY, (tuple(args), dict(kwds))), job, 0, blob)
        # The caller waits for this job itself, woken straight from the
        # orchestrator rather than through the result thread.
        shared.cache[job] = _Waiting
        try:
            shared.describe(job, "apply", func, 1)
            client.expect(job)
            shared.submit(job, blob, [(0, payload)])
            try:
                _, index, status, data = client.wait(job)
            except OrchestratorClosedError:
                raise PoolTerminatedError("the pool was terminated") from None
            success, value = shared.decode(job, index, status, data)
        finally:
            shared.job_done(job)
        if success:
            return value  # type: ignore[no-any-return]
        raise value

    def apply_async(
        self,
        func: Callable[..., _T],
        args: Iterable[Any] = (),
        kwds: Mapping[str, Any] = {},
        callback: Callable[[_T], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> ApplyResult[_T]:
        """Like :meth:`apply`, but return an :class:`AsyncResult` at once."""
        self._check_running()
        blob = self._function_blob(func)
        offered = callback is None and error_callback is None
        result = ApplyResult(self._shared, callback, error_callback, offered)
        try:
            payload = self._shared.dumps(_task(APPLY, (tuple(args), dict(kwds))), result._job, 0, blob)
        except BaseException:
            self._shared.client.forget(result._job)
            self._shared.job_done(result._job)
            raise
        self._shared.describe(result._job, "apply", func, 1)
        self._shared.submit(result._job, blob, [(0, payload)])
        return result

    # -- map ---------------------------------------------------------------

    def map(
        self,
        func: Callable[[_S], _T],
        iterable: Iterable[_S],
        chunksize: int | None = None,
        *,
        progress: Progress = False,
    ) -> list[_T]:
        """Apply ``func`` to every item; return the results in order.

        ``progress=True`` shows a bar of the items done (tqdm when installed,
        else a line on stderr), with the tasks retried and the items failed;
        ``"rich"`` and ``"notebook"`` pick those. The same holds for every
        map and imap method."""
        return self._map_async(func, iterable, MAP, chunksize, progress=progress).get()

    def starmap(
        self,
        func: Callable[..., _T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        *,
        progress: Progress = False,
    ) -> list[_T]:
        """Like :meth:`map`, calling ``func(*item)`` for each argument tuple."""
        return self._map_async(func, iterable, STARMAP, chunksize, progress=progress).get()

    def map_async(
        self,
        func: Callable[[_S], _T],
        iterable: Iterable[_S],
        chunksize: int | None = None,
        callback: Callable[[list[_T]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        progress: Progress = False,
    ) -> MapResult[_T]:
        return self._map_async(func, iterable, MAP, chunksize, callback, error_callback, progress)

    def starmap_async(
        self,
        func: Callable[..., _T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[list[_T]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        progress: Progress = False,
    ) -> MapResult[_T]:
        return self._map_async(func, iterable, STARMAP, chunksize, callback, error_callback, progress)

    def _map_async(
        self,
        func: Callable[..., _T],
        iterable: Iterable[Any],
        mode: int,
        chunksize: int | None = None,
        callback: Callable[[list[_T]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        progress: Progress = False,
    ) -> MapResult[_T]:
        self._check_running()
        self._check_chunksize(chunksize)
        _progress.check(progress)
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
            result._bar = _progress.make(progress, n, _desc(func), self._shared, result._job)
            items = list(iterable) if not isinstance(iterable, list) else iterable
            job, dumps = result._job, self._shared.dumps
            # Only short chunks have their large top-level bytes wrapped, and
            # only if the input has any: no scan of a long input.
            short = chunksize <= _envelope.SMALL_ITEMS
            wrap = _task if short and (mode == STARMAP or _envelope.any_big(items)) else _plain_task
            try:
                tasks = [
                    (i, dumps(wrap(mode, items[start : start + chunksize]), job, i, blob))
                    for i, start in enumerate(range(0, n, chunksize))
                ]
            except BaseException:
                self._shared.forget(job)
                self._shared.job_done(job)
                raise
            self._shared.describe(job, "starmap" if mode == STARMAP else "map", func, n)
            self._shared.submit(job, blob, tasks)
        return result

    # -- imap --------------------------------------------------------------

    def imap(
        self,
        func: Callable[[_S], _T],
        iterable: Iterable[_S],
        chunksize: int = 1,
        buffersize: int | None = None,
        *,
        progress: Progress = False,
    ) -> IMapIterator[_T]:
        """Lazy :meth:`map`: an iterator over the results, in order.

        At most ``buffersize`` chunks (default: 4 per executor, at least 16)
        are submitted and not yet handed to the caller; the input is read no
        further ahead than that."""
        return self._imap(IMapIterator, func, iterable, chunksize, buffersize, progress)

    def imap_unordered(
        self,
        func: Callable[[_S], _T],
        iterable: Iterable[_S],
        chunksize: int = 1,
        buffersize: int | None = None,
        *,
        progress: Progress = False,
    ) -> IMapIterator[_T]:
        """Like :meth:`imap`, yielding results as they finish."""
        return self._imap(IMapUnorderedIterator, func, iterable, chunksize, buffersize, progress)

    def _imap(
        self,
        cls: Any,
        func: Callable[..., _T],
        iterable: Iterable[Any],
        chunksize: int,
        buffersize: int | None,
        progress: Progress = False,
    ) -> Any:
        self._check_running()
        check_buffersize(buffersize)
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        _progress.check(progress)
        blob = self._function_blob(func)
        it = cls(self._shared, buffersize or max(16, 4 * self._slots()))
        try:
            it._items_total = len(iterable)
        except TypeError:
            pass  # a generator or other input without a length
        job = it._imap
        job._chunksize = chunksize
        job._bar = _progress.make(progress, it._items_total, _desc(func), self._shared, job._job)
        kind = "imap_unordered" if cls is IMapUnorderedIterator else "imap"
        self._shared.describe(job._job, kind, func, it._items_total)
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
        self._shared.shutdown(graceful=False)
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

    def __enter__(self: _P) -> _P:
        self._check_running()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.terminate()

    def __reduce__(self) -> Any:
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def __del__(self, _warn=warnings.warn, RUN=RUN):
        if getattr(self, "_state", None) == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)
            shared = getattr(self, "_shared", None)
            if shared is not None:
                shared.shutdown(graceful=False)

    def __repr__(self):
        where = "embedded" if self._shared.owns_orchestrator else repr(self._orchestrator)
        return f"<distripool.Pool state={self._state} {where}>"


def check_buffersize(buffersize) -> None:
    """The standard library's checks of ``buffersize`` (Python 3.14's
    ``Executor.map``, and ``Pool.imap`` after it)."""
    if buffersize is not None:
        if not isinstance(buffersize, int):
            raise TypeError("buffersize must be an integer or None")
        if buffersize < 1:
            raise ValueError("buffersize must be None or > 0")


def _feed(shared: _Shared, it: _IMapJob, blob: bytes, source, chunksize: int, mode: int = MAP) -> None:
    """Feeder thread of one imap: pull chunks lazily, submit with backpressure.

    It holds only the job, never the caller's iterator, so that dropping the
    iterator stops it."""
    index = 0
    try:
        while not it._abandoned:
            if it._input_end is not None:
                raise it._input_end
            chunk = list(itertools.islice(source, chunksize))
            if not chunk:
                break
            while not (it._unbounded or it._permits.acquire(timeout=_POLL)):
                if shared.stopping:
                    return
            if it._input_end is not None:
                raise it._input_end
            if shared.stopping:
                return
            if it._abandoned:
                break
            shared.submit(it._job, blob, [(index, shared.dumps(_task(mode, chunk), it._job, index, blob))])
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
