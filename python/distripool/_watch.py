"""What an orchestrator's driver is told: workers joining, leaving and lost,
connections refused, and tasks that wait with no worker to run them.

One thread per orchestrator with ports reads its event log and counters a
few times a second and logs to the ``distripool`` logger. A program that
has configured no logging still sees it: the logger then has a handler of
its own on stderr, silent once the root logger has one. Pools made with
``wait_for_workers`` fail their pending tasks, with the diagnosis, when no
worker has been connected for that long.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from .exceptions import NoWorkersError

if TYPE_CHECKING:
    from ._orchestrator import Orchestrator
    from ._shared import _Shared

log = logging.getLogger("distripool")

# Tasks waiting this long with no worker connected are reported, and again
# every REPEAT_S while it lasts.
WAITING_S = 10.0
REPEAT_S = 60.0
POLL_S = 0.25  # reading counters that the core updates


class _UnlessConfigured(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not logging.getLogger().handlers


def _ensure_visible() -> None:
    """Give the logger a stderr handler when nothing else would show its
    records (no handler here, none on the root)."""
    if log.handlers or any(isinstance(f, _UnlessConfigured) for f in log.filters):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("distripool: %(message)s"))
    handler.addFilter(_UnlessConfigured())
    log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)


class Watch:
    """The watcher of one orchestrator."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        _ensure_visible()
        self._orchestrator = weakref.ref(orchestrator)
        self._native = orchestrator._native
        self.refusals: collections.Counter[str] = collections.Counter()
        self._since = 0
        self._no_workers_since: float | None = None
        self._reported_at: float | None = None
        self._strict: weakref.WeakKeyDictionary[_Shared, float] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distripool-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def fail_after(self, shared: _Shared, seconds: float) -> None:
        """Fail the pending tasks of ``shared`` once no worker has been
        connected for ``seconds``."""
        with self._lock:
            self._strict[shared] = seconds

    def diagnosis(self) -> str:
        """Why no worker may be there: where they must connect, and what
        was refused."""
        orchestrator = self._orchestrator()
        addresses = ", ".join(orchestrator.addresses) if orchestrator is not None else "(closed)"
        text = f"workers connect to {addresses} (start one with `distripool worker --connect HOST:PORT`)"
        with self._lock:
            refusals = list(self.refusals.items())
        if refusals:
            total = sum(n for _, n in refusals)
            reasons = "; ".join(f"{reason} (x{n})" for reason, n in refusals)
            text += f"; {total} connection{'s' if total != 1 else ''} refused: {reasons}"
        else:
            text += "; no connection was refused"
        return text

    # -- the thread ------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self._step(time.monotonic())
            except Exception:  # noqa: BLE001 - closed under us, say
                if self._native.closed:
                    return
                log.debug("watch step failed", exc_info=True)

    def _step(self, now: float) -> None:
        if self._native.closed:
            self._stop.set()
            return
        for event in self._native.events(self._since):
            self._since = event["seq"] + 1
            self._log(event)
        # The worker count is a counter; the queue needs the core's snapshot,
        # asked for only once no worker has been there for a while.
        if self._native.workers > 0:
            self._no_workers_since = self._reported_at = None
            return
        if self._no_workers_since is None:
            self._no_workers_since = now
        alone = now - self._no_workers_since
        queued = self._native.stats().get("tasks_queued", 0) if alone >= WAITING_S else 0
        if (
            queued
            and alone >= WAITING_S
            and (self._reported_at is None or now - self._reported_at >= REPEAT_S)
        ):
            self._reported_at = now
            log.warning(
                "%d task%s waiting for a worker; none has been connected for %.0f s: %s",
                queued,
                "s are" if queued != 1 else " is",
                alone,
                self.diagnosis(),
            )
        with self._lock:
            strict = [(shared, s) for shared, s in self._strict.items() if alone >= s]
        for shared, seconds in strict:
            if shared.cache:
                message = f"no worker was connected for {seconds:g} s (wait_for_workers): {self.diagnosis()}"
                shared.fail_waiting(lambda message=message: NoWorkersError(message))

    def _log(self, event: dict[str, Any]) -> None:
        kind = event["kind"]
        if kind == "worker_joined":
            log.info("worker %s joined", event["name"])
        elif kind == "worker_draining":
            log.info("worker %s is draining", event["name"])
        elif kind == "worker_left":
            log.info("worker %s left: %s", event["name"], event["reason"])
        elif kind == "worker_lost":
            log.warning(
                "worker %s was lost (%s); %d task%s put back in line",
                event["name"],
                event["reason"],
                event["tasks"],
                "s" if event["tasks"] != 1 else "",
            )
        elif kind == "connection_refused":
            reason = event["reason"]
            with self._lock:
                first = reason not in self.refusals
                self.refusals[reason] += 1
            if first:  # a rogue peer must not flood the log
                log.warning("refused a worker from %s: %s", event["peer"], reason)
        elif kind == "task_retried":
            log.info("task %d of job %d is retried: %s", event["index"], event["job"], event["reason"])
