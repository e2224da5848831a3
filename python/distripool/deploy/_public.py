"""The launchers' public side: a thin object around a ``Launch`` state,
so that collecting the object stops what it started."""

from __future__ import annotations

import weakref
from typing import Any, TypeVar

from .._orchestrator import Orchestrator
from ._cluster import Launch

_C = TypeVar("_C", bound="Cluster")


class Cluster:
    """Shared by the launchers: a public object around its state."""

    _state: Launch

    def _setup(self, state: Launch) -> None:
        self._state = state
        # Also at exit (finalize's own atexit hook), and when collected.
        self._finalizer = weakref.finalize(self, state.close)
        state.start_thread()

    @property
    def orchestrator(self) -> Orchestrator:
        """The orchestrator the workers join."""
        return self._state.orchestrator

    def scale(self, n: int) -> None:
        """Keep ``n`` workers: start more, or let some go (one not yet
        connected is stopped; a connected one drains, finishing what it
        holds). Ends adaptive scaling.

        Raises:
            LaunchError: the engine refused to start one.
        """
        self._state.scale(n)

    def adapt(self, minimum: int = 0, maximum: int = 0) -> None:
        """Follow the orchestrator's queue: as many workers as its queued and
        running tasks fill (``processes`` each), from ``minimum`` to
        ``maximum``. More start at once; fewer only after the demand has
        been lower for a few seconds, by draining."""
        self._state.adapt(minimum, maximum)

    def status(self) -> list[dict[str, Any]]:
        """One dict per job or host started: its ``state`` (``submitted``,
        ``queued``, ``running``, ``connected``, ``draining``, ``gone``), the
        scheduler's ``reason`` (while queued; why it ended, once gone), the
        ``error`` its worker logged when it has run for a minute without
        connecting or ended before it did, its ``worker`` id while
        connected, its ``age`` in seconds and its ``log`` file."""
        return self._state.status()

    def logs(self) -> dict[str, str]:
        """The workers' stderr, by job or host."""
        return self._state.logs()

    def close(self) -> None:
        """Stop every job and process this started and wait until the engine
        lists none; close the orchestrator if this made it. Idempotent; also
        runs at exit and when the object is garbage-collected."""
        self._finalizer()

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self):
        s = self._state
        if s.closed:
            return f"<{type(self).__name__} closed>"
        with s.lock:
            n = sum(u.active for u in s.units.values())
            conn = sum(u.connected for u in s.units.values())
        mode = f"adapt{s.adaptive}" if s.adaptive else f"target={s.target}"
        return f"<{type(self).__name__} {mode} {s.kind}s={n} connected={conn}>"
