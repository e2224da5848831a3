"""What every launcher shares: the orchestrator its workers join, the units
it started (a Slurm job, an SSH process), scaling to a number or to the
orchestrator's queue, status rows, and stopping everything it started.

A launcher is a thin public object (``_public.Cluster``) around a ``Launch`` state: the
background thread and the exit hook hold only the state, so that the public
object can be garbage-collected, and collecting it stops what it started.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

from .._orchestrator import Orchestrator, become_default, default_orchestrator
from ..exceptions import DistripoolError

log = logging.getLogger("distripool.deploy")

# A unit that runs but whose worker has not connected for this long shows
# the error its worker logged.
CONNECT_GRACE = 60.0
# Units that end in a row without their worker ever connecting, after which
# no more are started until scale() or adapt() is called again.
MAX_FAILURES = 3
# How often the launcher looks at its units and the orchestrator's queue.
TICK = 1.0
# adapt() scales in only after the demand has been lower for this long.
SCALE_IN_AFTER = 3.0
# Most units started in one tick.
BURST = 16


class LaunchError(DistripoolError, RuntimeError):
    """The engine (sbatch, ssh) refused to start a worker; the message says
    what it answered."""


class Unit:
    """One worker started through the engine: a Slurm job, an SSH process."""

    def __init__(self, name: str, where: str = "", log_path: str | None = None):
        self.name = name  # the job id, or host#n
        self.where = where  # the host, for SSH; the node once known, for Slurm
        self.log_path = log_path
        self.started = time.time()
        self.state = "submitted"  # submitted, queued, running, gone
        self.reason = ""  # the scheduler's reason while queued; why it is gone
        self.running_since: float | None = None
        self.worker: int | None = None  # its worker id while connected
        self.connected = False
        self.ever_connected = False
        self.draining = False
        self.stopped = False  # by us
        self.error = ""  # what its worker logged, when it does not connect
        self.handle: Any = None  # the engine's own: a Popen, say

    @property
    def active(self) -> bool:
        """Counts towards the number of workers asked for."""
        return self.state != "gone" and not self.draining and not self.stopped


class Elsewhere:
    """An orchestrator in another process (the shell commands launch for
    one): what its workers need to join it, and nothing it would know."""

    closed = False

    def __init__(self, key: bytes, cluster: str, encrypt: bool):
        from .._orchestrator import JoinSettings

        self._join = JoinSettings(key, cluster, encrypt, False)
        self.addresses: list[str] = []

    def workers_info(self) -> list:
        return []

    def stats(self) -> dict:
        return {}

    def drain(self, worker: int) -> bool:
        return False

    def close(self) -> None:
        pass


def resolve_orchestrator(orchestrator: Orchestrator | None) -> tuple[Orchestrator, bool]:
    """The orchestrator to launch for, and whether the launcher made it (and
    closes it): the one given, else the default, else a new one on all
    interfaces with a random key, which becomes the default."""
    if isinstance(orchestrator, Elsewhere):
        return orchestrator, False  # type: ignore[return-value]
    if orchestrator is not None:
        if not isinstance(orchestrator, Orchestrator):
            raise TypeError(
                f"orchestrator must be a distripool Orchestrator, not {type(orchestrator).__name__}"
            )
        if orchestrator.closed:
            raise ValueError("the orchestrator is closed")
        return orchestrator, False
    found = default_orchestrator()
    if found is not None:
        return found, False
    orch = Orchestrator(("0.0.0.0:0",), os.urandom(32).hex())
    become_default(orch)
    log.info("started an orchestrator for the workers at %s", ", ".join(orch.addresses))
    return orch, True


def check_joinable(orch: Orchestrator) -> None:
    join = orch._join
    if join is None:
        raise ValueError("an embedded pool's orchestrator takes no workers from outside")
    if join.tls:
        raise ValueError(
            "launchers hand workers the orchestrator's key; for an orchestrator with mutual TLS, give "
            "each worker its certificate yourself (distripool worker --tls-ca/--tls-cert/--tls-key)"
        )


def check_env(env: Mapping[str, str] | None) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise TypeError(f"env must be a dict of str to str, not {type(env).__name__}")
    out = {}
    for k, v in env.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"env must map str to str; got {k!r}: {v!r}")
        if (
            not k
            or "=" in k
            or not (k[0].isalpha() or k[0] == "_")
            or not all(c.isalnum() or c == "_" for c in k)
        ):
            raise ValueError(f"not an environment variable name: {k!r}")
        if k.startswith("DISTRIPOOL_AUTHKEY"):
            raise ValueError(f"{k} must not be set through env=: the launcher hands workers the key itself")
        out[k] = v
    return out


def check_count(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, not {value}")
    return value


class Launch:
    """The state behind a launcher; subclasses say how to start, watch and
    stop one unit."""

    kind = "worker"  # what a unit is called in messages: "job", "host"
    unit_label = "distripool_unit"  # the worker label that names its unit

    def __init__(
        self,
        *,
        processes: int | None,
        orchestrator: Orchestrator | None,
    ):
        if processes is not None:
            check_count("processes", processes, 1)
        self.processes = processes
        self.lock = threading.RLock()
        self.units: dict[str, Unit] = {}
        self.id = secrets.token_hex(4)
        self.target = 0
        self.adaptive: tuple[int, int] | None = None
        self.lower_since: float | None = None
        self.failures: dict[str, int] = {}  # by where: units that never connected, in a row
        self.paused: dict[str, str] = {}  # where -> why no more units are started there
        self.closed = False
        self.orchestrator, self.owns = resolve_orchestrator(orchestrator)
        try:
            check_joinable(self.orchestrator)
        except BaseException:
            self.close_orchestrator()
            raise
        self.join = self.orchestrator._join
        self.infos: dict[int, dict[str, Any]] = {}  # the orchestrator's workers, as of the last look
        self.wake = threading.Event()

    # -- for subclasses ----------------------------------------------------

    def launch(self, where: str) -> Unit:
        """Start one unit at ``where``; raise LaunchError when refused."""
        raise NotImplementedError

    def places(self) -> list[str]:
        """Where units may start, in the order to use them ("" for anywhere)."""
        return [""]

    def poll(self, units: list[Unit]) -> None:
        """Update the units' engine states."""
        raise NotImplementedError

    def stop(self, units: list[Unit]) -> None:
        """Stop these units through the engine."""
        raise NotImplementedError

    def row(self, unit: Unit) -> dict[str, Any]:
        return {}

    def explain(self, error: str) -> str:
        """``error``, with what to do about it when that is known."""
        if "No module named distripool" in error:
            return f"{error} (install distripool for that Python, or pass python= the one that has it)"
        return error

    def unit_of(self, labels: Mapping[str, str]) -> str | None:
        return labels.get(self.unit_label)

    # -- shared ------------------------------------------------------------

    def labels(self, unit: str | None = None) -> list[str]:
        out = [f"distripool_launch={self.id}"]
        if unit is not None:
            out.append(f"{self.unit_label}={unit}")
        return out

    def start_thread(self) -> None:
        threading.Thread(
            target=_run, args=(weakref.ref(self),), name="distripool-deploy", daemon=True
        ).start()

    def scale(self, n: int, raise_errors: bool = True) -> None:
        check_count("n", n)
        with self.lock:
            self.check_open()
            self.adaptive = None
            self.target = n
            self.paused.clear()
            self.failures.clear()
            self.converge(time.time(), raise_errors=raise_errors)
        self.wake.set()

    def adapt(self, minimum: int, maximum: int) -> None:
        check_count("minimum", minimum)
        check_count("maximum", maximum)
        if maximum < minimum:
            raise ValueError(f"maximum ({maximum}) must not be below minimum ({minimum})")
        with self.lock:
            self.check_open()
            self.adaptive = (minimum, maximum)
            self.paused.clear()
            self.failures.clear()
        self.wake.set()

    def check_open(self) -> None:
        if self.closed:
            raise ValueError(f"the {type(self).__name__.replace('Launch', '')} cluster is closed")

    def demand(self) -> int:
        """Units the orchestrator's queue asks for, within adapt()'s bounds."""
        lo, hi = self.adaptive
        stats = self.orchestrator.stats()
        tasks = stats.get("tasks_queued", 0) + stats.get("tasks_running", 0)
        per = self.processes or self.slots_per_worker()
        return max(lo, min(hi, math.ceil(tasks / per)))

    def slots_per_worker(self) -> int:
        """Executors per worker, as the connected ones report them (for
        workers started without ``processes``); 1 before any connects."""
        slots = [
            self.infos[u.worker]["slots"]
            for u in self.units.values()
            if u.connected and u.worker in self.infos
        ]
        return max(1, sum(slots) // len(slots)) if slots else 1

    def tick(self) -> None:
        now = time.time()
        with self.lock:
            if self.closed:
                return
            live = [u for u in self.units.values() if u.state != "gone"]
            if live:
                try:
                    self.poll(live)
                except Exception as exc:  # noqa: BLE001 - an engine that does not answer now
                    log.warning("cannot ask the engine about its %ss: %s", self.kind, exc)
            self.match_workers(now)
            if self.adaptive is not None and not self.orchestrator.closed:
                want = self.demand()
                active = sum(u.active for u in self.units.values())
                if want >= active:
                    self.lower_since = None
                    self.target = want
                elif self.lower_since is None:
                    self.lower_since = now
                elif now - self.lower_since >= SCALE_IN_AFTER:
                    self.target = want
            self.converge(now, raise_errors=False)

    def match_workers(self, now: float) -> None:
        """Which units have a connected worker, and what the others logged."""
        try:
            self.infos = {w["id"]: w for w in self.orchestrator.workers_info()}
        except Exception:  # noqa: BLE001 - closed under us
            self.infos = {}
        seen: dict[str, dict[str, Any]] = {}
        for w in self.infos.values():
            labels = w.get("labels") or {}
            if labels.get("distripool_launch") != self.id:
                continue
            name = self.unit_of(labels)
            if name is not None:
                seen[name] = w
        for unit in self.units.values():
            w = seen.get(unit.name)
            was = unit.connected
            unit.connected = w is not None
            if w is not None:
                unit.worker = w["id"]
                if not was:
                    log.info("%s %s: its worker connected (%s)", self.kind, unit.name, w.get("host"))
                unit.ever_connected = True
                unit.error = ""
                self.failures.pop(unit.where, None)
                # Drained through the orchestrator (by its owner, say): one
                # fewer is wanted. A worker that leaves on its own account
                # (its time limit, SIGTERM) is judged when it has ended, by
                # the reason it logged (see ended()).
                if w.get("state") == "draining" and not unit.draining:
                    self.let_go(unit)
            elif unit.state == "running" and unit.running_since and now - unit.running_since >= CONNECT_GRACE:
                if not unit.ever_connected:
                    found = last_error(self.read_log(unit))
                    if found and found != unit.error:
                        log.warning(
                            "%s %s has run for %.0f s and its worker has not connected: %s",
                            self.kind,
                            unit.name,
                            now - unit.running_since,
                            found,
                        )
                    unit.error = found or "its worker has not connected and logged no error"

    def exit_reason(self, unit: Unit, otherwise: str) -> str:
        """Why a unit's worker ended, when it said so as it left (the last
        ``distripool worker:`` line of its log); else ``otherwise``."""
        for line in reversed(self.read_log(unit).splitlines()):
            if line.startswith("distripool worker: "):
                return line[len("distripool worker: ") :].strip()
        return otherwise

    def let_go(self, unit: Unit) -> None:
        """Someone else (the orchestrator's owner, an operator's SIGTERM)
        drained ``unit``: one worker fewer is wanted, not a replacement."""
        unit.draining = True
        if self.adaptive is None:
            self.target = max(0, self.target - 1)

    def ended(self, unit: Unit, reason: str) -> None:
        """The engine says ``unit`` is gone."""
        if unit.state == "gone":
            return
        if reason.startswith("drained") and not (unit.draining or unit.stopped):
            self.let_go(unit)
        unit.state = "gone"
        unit.connected = False
        unit.reason = reason
        if unit.stopped or unit.draining or unit.ever_connected:
            return
        unit.error = unit.error or self.explain(last_error(self.read_log(unit)))
        where = f" on {unit.where}" if unit.where else ""
        log.error(
            "%s %s%s ended before its worker connected (%s)%s",
            self.kind,
            unit.name,
            where,
            reason,
            f": {unit.error}" if unit.error else "",
        )
        self.failed(unit.where, f"ended before their worker connected; the last: {unit.error or reason}")

    def failed(self, where: str, why: str) -> None:
        """One more unit at ``where`` that never worked; after
        ``MAX_FAILURES`` in a row, no more are started there."""
        n = self.failures[where] = self.failures.get(where, 0) + 1
        if n >= MAX_FAILURES:
            self.paused[where] = f"{n} {self.kind}s in a row {why}"
            log.error(
                "starting no more %ss%s: %s; call scale() or adapt() to try again",
                self.kind,
                f" on {where}" if where else "",
                self.paused[where],
            )

    def converge(self, now: float, raise_errors: bool) -> None:
        """Start or stop units until the active ones match the target."""
        active = [u for u in self.units.values() if u.active]
        missing = self.target - len(active)
        started = 0
        refused: set[str] = set()  # places that refused in this round
        while missing > 0 and started < BURST:
            where = self.next_place(refused)
            if where is None:
                break
            try:
                unit = self.launch(where)
            except LaunchError as exc:
                if raise_errors:
                    raise
                refused.add(where)
                log.error("cannot start a %s%s: %s", self.kind, f" on {where}" if where else "", exc)
                self.failed(where, f"could not be started; the last: {exc}")
                continue
            self.units[unit.name] = unit
            log.info("started %s %s%s", self.kind, unit.name, f" on {where}" if where else "")
            missing -= 1
            started += 1
        if missing < 0:
            self.shrink(active, -missing)

    def next_place(self, refused: set[str]) -> str | None:
        places = [p for p in self.places() if p not in self.paused and p not in refused]
        if not places:
            return None
        load = {p: 0 for p in places}
        for u in self.units.values():
            if u.active and u.where in load:
                load[u.where] += 1
        return min(places, key=lambda p: load[p])

    def shrink(self, active: list[Unit], n: int) -> None:
        """Let ``n`` units go: not yet connected first (nothing to lose), then
        idle workers, then busy ones; a connected worker drains (it finishes
        what it holds), the others are stopped."""

        def order(u: Unit):
            held = self.infos.get(u.worker, {}).get("tasks_running", 0) if u.worker is not None else 0
            return (u.connected, held, -u.started)

        victims = sorted(active, key=order)[:n]
        stop = [u for u in victims if not u.connected]
        for u in victims:
            if u.connected and u.worker is not None:
                u.draining = True
                try:
                    self.orchestrator.drain(u.worker)
                except ValueError:
                    pass
                log.info("scaling in: %s %s drains", self.kind, u.name)
        for u in stop:
            u.stopped = True
            log.info("scaling in: stopping %s %s", self.kind, u.name)
        if stop:
            self.stop(stop)

    def status(self) -> list[dict[str, Any]]:
        with self.lock:
            if not self.closed:
                self.tick_now()
            now = time.time()
            rows = []
            for u in self.units.values():
                if u.state == "gone":
                    state = "gone"
                elif u.draining:
                    state = "draining"
                elif u.connected:
                    state = "connected"
                else:
                    state = u.state
                row = {
                    self.kind: u.name,
                    "state": state,
                    "reason": u.reason,
                    "error": u.error,
                    "worker": u.worker if u.connected else None,
                    "age": round(now - u.started, 1),
                    "log": u.log_path,
                }
                row.update(self.row(u))
                rows.append(row)
            return rows

    def tick_now(self) -> None:
        try:
            self.tick()
        except Exception as exc:  # noqa: BLE001
            log.warning("cannot look at the %ss now: %s", self.kind, exc)

    def read_log(self, unit: Unit) -> str:
        if not unit.log_path:
            return ""
        try:
            with open(unit.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - (1 << 20)))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def logs(self) -> dict[str, str]:
        with self.lock:
            return {u.name: self.read_log(u) for u in self.units.values()}

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            live = [u for u in self.units.values() if u.state != "gone" and not u.stopped]
            for u in live:
                u.stopped = True
        self.wake.set()
        try:
            if live:
                self.stop(live)
                self.wait_gone(live, 30.0)
        finally:
            self.cleanup()
            self.close_orchestrator()

    def wait_gone(self, units: list[Unit], timeout: float) -> None:
        """Until the engine no longer lists ``units``, at most ``timeout`` s."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            left = [u for u in units if u.state != "gone"]
            if not left:
                return
            if time.monotonic() >= deadline:
                log.warning(
                    "%d %ss still listed %.0f s after they were stopped: %s",
                    len(left),
                    self.kind,
                    timeout,
                    ", ".join(u.name for u in left),
                )
                return
            time.sleep(delay)  # the engine's own state, polled
            delay = min(delay * 2, 1.0)
            try:
                self.poll(left)
            except Exception:  # noqa: BLE001
                pass

    def cleanup(self) -> None:
        """Remove what the launcher wrote for its workers (the key file)."""

    def close_orchestrator(self) -> None:
        if self.owns:
            self.orchestrator.close()


def last_error(text: str) -> str:
    """The line of a worker's log that says why it is not working: its last
    error or warning, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if any(m in line for m in (" ERROR ", " WARN ", "Error", "error:", "not available")):
            return _without_time(line)
    return _without_time(lines[-1]) if lines else ""


def _without_time(line: str) -> str:
    head, sep, rest = line.partition(" ")
    if sep and head[:4].isdigit() and "T" in head:  # the core's time stamp and level
        level, sep, message = rest.strip().partition(" ")
        return (
            message.strip() if sep and level in ("TRACE", "DEBUG", "INFO", "WARN", "ERROR") else rest.strip()
        )
    return line


def _run(ref: weakref.ref) -> None:
    """The launcher's background thread: it holds the state weakly, so that
    a launcher nobody holds is collected (and stopped)."""
    while True:
        state = ref()
        if state is None or state.closed:
            return
        state.tick_now()
        wake = state.wake
        del state
        wake.wait(TICK)
        wake.clear()
