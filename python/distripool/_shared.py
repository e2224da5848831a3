"""What a pool's result thread, its result objects and its callers share:
the ``_Shared`` state (client, cache of pending jobs, shared memory, the
result thread), and turning a completion into a value or an exception.
Kept apart from the pool so that an abandoned pool can be collected.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
import traceback
from multiprocessing.pool import RemoteTraceback

import cloudpickle

from . import _envelope, _main, _memfds, _native, _replies
from ._executor import APPLY, STARMAP, ExceptionParts
from ._orchestrator import Orchestrator
from .exceptions import (
    DistripoolError,
    OrchestratorClosedError,
    PoolTerminatedError,
    TaskTimeoutError,
    WorkerLostError,
)

RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"
# How long the result thread waits for completions before checking for shutdown.
_POLL = 0.05
_STATUS_DONE = _native.STATUS_DONE
# Functions remembered for returning large results.
_LARGE_FNS = 64


def _task(mode, items):
    return _envelope.wrap_task(mode, items, APPLY, STARMAP)


def _plain_task(mode, items):
    return (mode, items)


def _decode(status: int, data, buffers=None, ticket=None) -> tuple[bool, object]:
    """Turn one completion into ``(success, value_or_exception)``.

    ``status`` 0 carries the task's pickled outcome; the others say why the
    task could not be completed (see ``_native.Client.recv``). ``ticket`` is
    the task's shared memory, if it had any (``buffers`` is its owner)."""
    if status == _native.STATUS_TIMEOUT:
        return False, TaskTimeoutError(data)
    if status != _native.STATUS_DONE:
        return False, WorkerLostError(data)
    try:
        if _envelope.is_envelope(data):
            opener = buffers.opener(ticket) if buffers is not None else _no_shared_memory
            outcome, mapped, extra = _envelope.load(data, opener)
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


def _desc(func) -> str:
    """A job's label (a progress bar's, the dashboard's): the function's name."""
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or "map"


def _failure_text(exc) -> str:
    """What a dashboard shows of a task's exception: the remote traceback,
    which ends with the exception itself."""
    if isinstance(exc.__cause__, RemoteTraceback):
        return str(exc.__cause__).strip().strip('"').strip()
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


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
            blob = cloudpickle.dumps(
                (None, shared.probe_function, "distripool-probe", None, None), protocol=5
            )
            payload = pickle.dumps((APPLY, (where, {})), protocol=5)
            shared.cache[self.job] = self
            shared.submit(self.job, blob, [(0, payload)], needs=[])
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
        ship_modules: bool = True,
    ):
        self.client = client
        # The driver builds and takes apart every chunk: its freed
        # small-object arenas are kept for the next (up to 32 MiB, once per
        # process; see arenas.rs).
        _native.keep_arenas()
        # Executors of an embedded pool share this machine: large arguments
        # and their results travel in shared memory.
        self.buffers = _memfds.SharedBuffers() if owns_orchestrator and _memfds.available() else None
        self.sharer = None  # a pool's _inherited.Sharer, when its initargs need one
        self.max_message_size = max_message_size or _native.DEFAULT_MAX_FRAME
        self.probe_lock = threading.Lock()
        # What the probe runs in an executor (tests put a refusal here).
        self.probe_function = _replies.can_open
        self.task_timeout = task_timeout
        # What executors load before every function of this pool: the
        # driver's main module, if it has a file.
        main = _main.driver_blob()
        self.main_needs = [main] if main is not None else []
        # Executors on an orchestrator get the driver's own modules too,
        # unless the pool says not to.
        self.ship_modules = ship_modules and not owns_orchestrator
        self._needs_key: tuple | None = None
        self._needs: list = []
        self.orchestrator = orchestrator
        self.owns_orchestrator = owns_orchestrator
        # A dashboard watches the orchestrator: describe each job to it.
        self.observed = orchestrator.dashboard_url is not None
        self.cache: dict[int, object] = {}
        # Large results: the function (its blob) of each job in flight, and
        # the functions whose last result was large, with its size. Their
        # tasks get a reply memfd even when their arguments are small.
        self.job_fns: dict[int, bytes] = {}
        self.large_fns: dict[bytes, int] = {}
        self.idle = threading.Condition(threading.Lock())
        self.stopping = False
        self.shutdown_done = False

    @property
    def needs(self) -> list:
        """What executors load before a function of this pool: the driver's
        main module, its own modules (see ``_modules``) and the
        orchestrator's uploads. Made again only when one of them may have
        changed: a submit pays a comparison."""
        key = (len(sys.modules) if self.ship_modules else 0, self.orchestrator._uploads_version)
        if key != self._needs_key:
            from . import _modules

            shipped = _modules.shipped() if self.ship_modules else []
            self._needs = self.main_needs + shipped + list(self.orchestrator._uploads.values())
            self._needs_key = key
        return self._needs

    def submit(self, job: int, blob: bytes, tasks, needs=None) -> None:
        """Queue ``tasks`` calling the function ``blob``; executors load
        ``needs`` (by default :attr:`needs`) before it."""
        self.client.submit(job, blob, tasks, self.task_timeout, self.needs if needs is None else needs)

    def describe(self, job: int, kind: str, func, items: int | None) -> None:
        """Tell the orchestrator's dashboard what ``job`` is (nothing
        happens without one)."""
        if self.observed:
            self.client.describe(job, kind, _desc(func), items)

    def decode(self, job: int, index: int, status: int, data) -> tuple[bool, object]:
        """One completion as ``(success, value_or_exception)``; a task whose
        function raised is counted by the orchestrator (see :meth:`raised`)."""
        buffers = self.buffers
        ticket = buffers.take((job, index)) if buffers is not None else None
        item = _decode(status, data, buffers, ticket)
        if buffers is not None and (ticket is not None or len(data) >= _envelope.THRESHOLD):
            self._learn(job, data, ticket)
        if not item[0] and status == _STATUS_DONE:
            self.raised(job, index, item[1])
        return item

    def _learn(self, job: int, data, ticket) -> None:
        """Note whether a result of the job's function was large: one that
        came inline gets its function's next tasks a reply memfd of its size;
        one that was small with a reply memfd given stops that."""
        fn = self.job_fns.get(job)
        if fn is None or isinstance(data, str):
            return
        if len(data) >= _envelope.THRESHOLD:
            self.large_fns.pop(fn, None)
            self.large_fns[fn] = len(data)
            while len(self.large_fns) > _LARGE_FNS:
                self.large_fns.pop(next(iter(self.large_fns)), None)
        elif ticket[0] is None and not _envelope.is_envelope(data):
            self.large_fns.pop(fn, None)

    def raised(self, job: int, index: int, exc) -> None:
        """Tell the orchestrator that task ``(job, index)`` raised ``exc``:
        it counts it, and its dashboard, if there is one, shows the
        traceback."""
        text = _failure_text(exc) if self.observed else ""
        try:
            self.client.raised(job, index, text)
        except OrchestratorClosedError:
            pass

    def dumps(self, task, job: int, index: int, fn: bytes | None = None) -> bytes | list:
        """The payload of task ``(job, index)`` of function ``fn`` (its
        blob): large buffers out of band, in shared memory when the executors
        are local, else inline. Local tasks of a function whose last result
        was large get shared memory for their result, too."""
        main, bufs = _envelope.dumps(task, cloudpickle)
        buffers = self.buffers
        if buffers is None:
            # The parts go to the runtime as they are: joined, each large
            # buffer would be copied once more, into new memory.
            return _envelope.inline(main, bufs) if bufs else main
        if fn is not None and index == 0:
            self.job_fns[job] = fn
        if not bufs:
            size = self.large_fns.get(fn) if self.large_fns and fn is not None else None
            if size is None or not buffers.has_room() or not self._shared_memory_works():
                return main
            try:
                return buffers.put_reply(main, (job, index), size)
            except OSError:
                return main  # out of descriptors or memory for memfds: inline
        if buffers.has_room() and self._shared_memory_works():
            # The orchestrator checks the frames it carries; bytes in shared
            # memory count against the same limit here.
            size = _envelope.size(main, bufs)
            if size > self.max_message_size:
                raise ValueError(
                    f"a task of {size} bytes exceeds the frame limit of {self.max_message_size} bytes"
                )
            try:
                return self.buffers.put(main, bufs, (job, index))
            except OSError:
                pass  # out of descriptors or memory for memfds: inline instead
        return _envelope.inline(main, bufs)

    def _shared_memory_works(self) -> bool:
        """Whether the executors can open the driver's memfds. A new pool
        asks one (a tiny task of its own); large tasks go inline until the
        answer is in, and for good if it is no."""
        usable = self.buffers.usable
        if usable is None:
            with self.probe_lock:
                if self.buffers.usable is None:
                    self.buffers.usable = _memfds.PROBING
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
        self.job_fns.pop(job, None)
        with self.idle:
            self.cache.pop(job, None)
            if not self.cache:
                self.idle.notify_all()

    def fail_waiting(self, exc_factory) -> None:
        """Take back the pending tasks no worker has started and fail their
        results with ``exc_factory()`` (the pool goes on)."""
        for job in list(self.cache):
            try:
                self.client.withdraw(job)
            except Exception:  # noqa: BLE001 - closed meanwhile: nothing to take back
                pass
            r = self.cache.get(job)
            if r is not None:
                r._abort(exc_factory())
                self.job_done(job)

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
            except OrchestratorClosedError:
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
        # decode(), inlined: this loop runs once per task.
        buffers = self.buffers
        for job, index, status, data in batch:
            ticket = buffers.take((job, index)) if buffers is not None else None
            item = _decode(status, data, buffers, ticket)
            if buffers is not None and (ticket is not None or len(data) >= _envelope.THRESHOLD):
                self._learn(job, data, ticket)
            if not item[0] and status == _STATUS_DONE:
                self.raised(job, index, item[1])
            r = cache.get(job)
            if r is not None:
                r._set(index, item)

    def shutdown(self, graceful: bool = True) -> None:
        """Cancel remote work, stop the result thread's source, free
        executors: the idle ones of an embedded pool exit by themselves (their
        exit handlers run, as at ``join``), or, not ``graceful``, are killed
        at once (as at ``terminate``)."""
        if self.shutdown_done:
            return
        self.shutdown_done = True
        self.stopping = True
        self.client.close()
        if self.owns_orchestrator:
            self.orchestrator._close(graceful)
        if self.buffers is not None:
            self.buffers.close()
        if self.sharer is not None:
            self.sharer.close()
