"""Orchestrators and workers: ``make_orchestrator`` and ``make_worker``."""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from . import _main, _native
from ._config import (
    DEFAULT_PORTS,
    SLURM_END_MARGIN,
    executor_env,
    normalize_addresses,
    normalize_labels,
    resolve_cluster,
    resolve_dashboard,
    resolve_key,
    resolve_memory_limit,
    resolve_timing,
    resolve_tls,
    slurm_time_left,
    with_environment_labels,
)

EXECUTOR_MODULE = "distripool._executor"

if os.environ.get("DISTRIPOOL_LOG"):
    _native.enable_logging(os.environ["DISTRIPOOL_LOG"])

_default_lock = threading.Lock()
_default: Orchestrator | None = None
_live: weakref.WeakSet[Orchestrator] = weakref.WeakSet()
_O = TypeVar("_O", bound="Orchestrator")


class JoinSettings:
    """What a worker needs to join an orchestrator, besides its address."""

    __slots__ = ("key", "cluster", "encrypt", "tls")

    def __init__(self, key: bytes, cluster: str, encrypt: bool, tls: bool):
        self.key = key
        self.cluster = cluster
        self.encrypt = encrypt
        self.tls = tls

    def __repr__(self):  # never the key
        return f"<JoinSettings cluster={self.cluster!r} encrypt={self.encrypt} tls={self.tls}>"


class Orchestrator:
    """Accepts worker agents and schedules the tasks of the pools that use it.

    Runs on background threads of this process until :meth:`close`. Make one
    with :func:`make_orchestrator` and pass it as ``Pool(orchestrator=...)``.
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        authkey: bytes | str | None = None,
        *,
        max_crashes: int = 3,
        max_message_size: int | None = None,
        cluster: str | None = None,
        encrypt: bool = True,
        tls: tuple[str, str, str] | None = None,
        dashboard: str | int | bool | None = None,
    ) -> None:
        _main.check_not_loading("an Orchestrator")
        _check_limits(max_crashes, max_message_size)
        key = resolve_key(authkey)
        listen = normalize_addresses(addresses)
        self._native = _with_dashboard(
            dashboard,
            lambda where: _native.Orchestrator(
                listen,
                key,
                max_crashes,
                max_message_size,
                resolve_cluster(cluster),
                bool(encrypt),
                tls,
                resolve_timing(),
                where,
            ),
        )
        self._uploads: dict[str, Any] = {}  # name -> _native.Blob of an Upload
        self._uploads_version = 0
        # What a launcher (distripool.deploy) hands the workers it starts.
        self._join = JoinSettings(key, resolve_cluster(cluster), bool(encrypt), tls is not None)
        _live.add(self)
        from ._watch import Watch

        self._watch: Watch | None = Watch(self)

    @classmethod
    def _embedded(
        cls,
        processes: int,
        max_crashes: int = 3,
        max_message_size: int | None = None,
        dashboard: str | int | bool | None = None,
    ) -> Orchestrator:
        """A private orchestrator with ``processes`` local executors and no port."""
        _main.check_not_loading("a Pool")
        _check_limits(max_crashes, max_message_size)
        self = cls.__new__(cls)
        key, timing = os.urandom(32), resolve_timing()
        self._native = _with_dashboard(
            dashboard,
            lambda where: _native.Orchestrator(
                [], key, max_crashes, max_message_size, timing=timing, dashboard=where
            ),
        )
        self._native.start_local_agent(processes, sys.executable, EXECUTOR_MODULE, executor_env())
        self._join = None
        self._uploads = {}
        self._uploads_version = 0
        self._watch = None  # its own agent is always there
        _live.add(self)
        return self

    @property
    def addresses(self) -> list[str]:
        """The ``host:port`` addresses workers can connect to."""
        return self._native.addresses

    @property
    def closed(self) -> bool:
        return self._native.closed

    @property
    def dashboard_url(self) -> str | None:
        """The URL of this orchestrator's dashboard (with ``?token=...`` on an
        address other than loopback), or None if it has none. Its
        ``metrics`` page (the same URL, ``metrics`` in place of the query)
        serves Prometheus."""
        return self._native.dashboard_url

    @property
    def workers(self) -> int:
        """Number of worker agents connected now."""
        return self._native.workers

    @property
    def slots(self) -> int:
        """Executors available across all connected workers."""
        return self._native.slots

    def stats(self) -> dict[str, int]:
        """Counters: ``workers``, ``slots``, ``auth_failures``,
        ``handshake_failures``, ``tasks_submitted``, ``tasks_done`` (tasks
        that returned a value or an exception), ``tasks_failed`` (raised, or
        given up), ``tasks_retried``, ``tasks_queued``, ``tasks_running``,
        ``crashes``, ``workers_lost`` (gone without a
        word), ``workers_left`` (drained or stopped, saying so), ``bytes_sent``
        and ``bytes_received`` (message bytes to and from workers, before
        encryption), ``functions_fetched`` (large functions workers fetched
        from one another instead of from here). Empty once closed."""
        return dict(self._native.stats())

    def workers_info(self) -> list[dict[str, Any]]:
        """One dict per connected worker, in the order they joined.

        Keys: ``id``; ``name``; ``address`` it connected from (``"local"``
        for the executors of an embedded pool); ``host``, ``pid`` and ``cpus``
        (the CPUs its affinity and cgroup quota allow) as the worker reports
        them; ``labels``, the ``key=value`` pairs it was started with
        (``distripool worker --label``); ``slots`` (executors); ``state``
        (``"connected"``, ``"draining"`` or ``"leaving"``); ``tasks_running``
        (held now, running or prefetched), ``tasks_done`` and ``crashes``;
        ``connected_for`` and ``last_heard`` in seconds; ``executors_cpu``
        (CPUs busy) and ``executors_memory`` (resident bytes) of its
        executors while a dashboard is on, else None. Empty once closed.
        """
        return list(self._native.workers_info())

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        """Events numbered ``since`` and after, oldest first, of the newest
        4096: workers joined, draining, left and lost; tasks retried and
        failed. Each is a dict with ``seq`` (from 0, without gaps), ``time``
        (as ``time.time()``), ``kind`` and its own fields. Pass the last
        ``seq`` seen plus one to get only what is new."""
        return list(self._native.events(since))

    def drain(self, worker: int) -> bool:
        """Ask worker ``worker`` (an ``id`` from :meth:`workers_info`) to
        finish the tasks it holds, take no new ones and exit. Its leaving is
        not counted as a loss. Returns False if no such worker is connected.

        Raises:
            ValueError: the orchestrator is closed.
        """
        if self.closed:
            raise ValueError("orchestrator is closed")
        return self._native.drain(worker)

    def upload(self, path: str | os.PathLike[str]) -> None:
        """Put the file or directory ``path`` next to every worker: each
        gets it once, before its first task of any pool on this
        orchestrator, in a directory of its own that becomes its executors'
        working directory and the first entry of their ``sys.path`` (so an
        uploaded ``.py`` file or package is importable, and data files open
        by their relative names). Uploading the same name again replaces
        it. Workers remove the directory when they stop.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: the orchestrator is closed, or ``path`` is larger than 512 MiB.
        """
        if self.closed:
            raise ValueError("orchestrator is closed")
        import pickle

        from . import _modules

        up = _modules.pack(path)
        self._uploads[up.name] = _native.Blob(pickle.dumps(up, protocol=5))
        self._uploads_version += 1

    def wait_for_workers(self, n: int = 1, timeout: float | None = None) -> bool:
        """Block until at least ``n`` workers are connected; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while self.workers < n:
            if self.closed:
                return False
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(delay)  # polling a counter owned by another thread
            delay = min(delay * 2, 0.1)
        return True

    def _open_client(self):
        if self.closed:
            raise ValueError("orchestrator is closed")
        return self._native.open_client()

    def close(self) -> None:
        """Stop accepting workers, cancel the tasks of its pools and free the ports."""
        self._close(True)

    def _close(self, graceful: bool) -> None:
        """``close``; ``graceful=False`` kills the idle executors of an
        embedded pool at once instead of letting them exit (``terminate``)."""
        global _default
        with _default_lock:
            if _default is self:
                _default = None
        if self._watch is not None:
            self._watch.stop()
        self._native.close(graceful)

    def __enter__(self: _O) -> _O:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else f"addresses={self.addresses}, workers={self.workers}"
        return f"<distripool.Orchestrator {state}>"


def make_orchestrator(
    addresses: str | Sequence[str] | None = None,
    authkey: bytes | str | None = None,
    *,
    max_crashes: int = 3,
    max_message_size: int | None = None,
    cluster: str | None = None,
    encrypt: bool = True,
    tls_ca: str | os.PathLike[str] | None = None,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
    dashboard: str | int | bool | None = None,
) -> Orchestrator:
    """Start an orchestrator that worker agents can connect to.

    Args:
        addresses: ``"host:port"`` or a tuple of them. Default: ports 1337 and
            1338 on 127.0.0.1, or on all interfaces (0.0.0.0) when a key is set.
            Workers may connect to any of them.
        authkey: shared secret; default ``$DISTRIPOOL_AUTHKEY`` or the file
            named by ``$DISTRIPOOL_AUTHKEY_FILE``. Required for any address
            that is not loopback.
        max_crashes: times a task may kill its executor before it fails with
            :class:`~distripool.WorkerLostError`.
        max_message_size: largest message (a pickled chunk of arguments, a
            function or a result) in bytes; default 1 GiB.
        cluster: name of this cluster (default ``$DISTRIPOOL_CLUSTER``, else
            ``"default"``); only workers started with the same name join.
        encrypt: seal every message after the handshake (default). Turn it
            off only on a network you trust, and on the workers too
            (``--no-encrypt``): both sides must agree.
        tls_ca, tls_cert, tls_key: PEM files for mutual TLS 1.3 instead of
            distripool's own encryption (default ``$DISTRIPOOL_TLS_CA``,
            ``$DISTRIPOOL_TLS_CERT``, ``$DISTRIPOOL_TLS_KEY``). Workers must
            present a certificate signed by the CA. With TLS a key is
            optional; if set, workers must hold it too.
        dashboard: ``"host:port"`` to serve the dashboard, its JSON API and
            Prometheus ``/metrics`` on (``True``: ``127.0.0.1:8787``; a
            port: that port on 127.0.0.1); default ``$DISTRIPOOL_DASHBOARD``,
            else none. Its URL is logged and kept in
            :attr:`Orchestrator.dashboard_url`. On an address other than
            loopback, requests need the token that URL carries.

    Returns:
        The :class:`Orchestrator`. The first one made (while open) is also the
        default that ``Pool()`` uses when no ``orchestrator`` is given.

    Raises:
        ValueError: a non-loopback address without a key or TLS, a bad
            address, or an incomplete set of TLS files.
        PermissionError: a key file readable by other users.
        OSError: an address (of the workers' or the dashboard's) is
            already in use.
    """
    global _default
    key = resolve_key(authkey)
    tls = resolve_tls(tls_ca, tls_cert, tls_key)
    if addresses is None:
        host = "0.0.0.0" if key or tls else "127.0.0.1"
        addresses = tuple(f"{host}:{p}" for p in DEFAULT_PORTS)
    orch = Orchestrator(
        addresses,
        key,
        max_crashes=max_crashes,
        max_message_size=max_message_size,
        cluster=cluster,
        encrypt=encrypt,
        tls=tls,
        dashboard=dashboard,
    )
    become_default(orch)
    return orch


def become_default(orch: Orchestrator) -> None:
    """Make ``orch`` the default for ``Pool()``, unless another open one is."""
    global _default
    with _default_lock:
        if _default is None or _default.closed:
            _default = orch


MIN_MESSAGE_SIZE = 4096


def _with_dashboard(dashboard, start):
    """``start(address)``: a native orchestrator with its dashboard on
    ``address`` (None: none), as ``dashboard`` or ``$DISTRIPOOL_DASHBOARD``
    ask. An address from the variable that is in use (another program, or
    another orchestrator of this one) gives way to a free port on the same
    host; an address passed explicitly raises. The URL is logged once."""
    import errno

    from ._watch import _ensure_visible, log

    address, from_env = resolve_dashboard(dashboard)
    try:
        native = start(address)
    except OSError as e:
        if not (from_env and e.errno == errno.EADDRINUSE and address is not None):
            raise
        native = start(address.rpartition(":")[0] + ":0")
        log.warning("DISTRIPOOL_DASHBOARD: %s is in use, so this dashboard took another port", address)
    if native.dashboard_url is not None:
        _ensure_visible()
        log.info("dashboard at %s", native.dashboard_url)
    return native


def _check_limits(max_crashes: int, max_message_size: int | None) -> None:
    if not isinstance(max_crashes, int) or max_crashes < 1:
        raise ValueError(f"max_crashes must be an int of at least 1, not {max_crashes!r}")
    if max_message_size is not None and (
        not isinstance(max_message_size, int) or not MIN_MESSAGE_SIZE <= max_message_size <= 2**32 - 1
    ):
        raise ValueError(
            f"max_message_size must be an int from {MIN_MESSAGE_SIZE} to 2**32 - 1 bytes, not {max_message_size!r}"
        )


def default_orchestrator() -> Orchestrator | None:
    with _default_lock:
        if _default is not None and not _default.closed:
            return _default
        return None


def make_worker(
    addresses: str | Sequence[str],
    processes: int | None = None,
    authkey: bytes | str | None = None,
    *,
    key_file: str | os.PathLike[str] | None = None,
    cluster: str | None = None,
    encrypt: bool = True,
    tls_ca: str | os.PathLike[str] | None = None,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
    labels: Mapping[str, str] | Iterable[str] | None = None,
    idle_timeout: float | None = None,
    time_limit: float | None = None,
    ready_file: str | os.PathLike[str] | None = None,
    memory_limit: int | float | str | None = None,
    serve_peers: bool = True,
) -> str:
    """Run a worker agent in this process; blocks and executes work until interrupted.

    The agent dials the orchestrator at ``addresses`` (``"host:port"`` or a
    tuple of them, tried in turn), retrying with backoff until it is up and
    reconnecting whenever it goes away. It runs ``processes`` executors
    (default: the CPUs this process may use: its affinity mask within its
    cgroup's CPU quota). ``cluster``, ``encrypt`` and the TLS
    files must match the orchestrator's (see :func:`make_orchestrator`).
    ``labels`` (a dict, or ``"key=value"`` strings) are shown by the
    orchestrator's :meth:`Orchestrator.workers_info`.

    It returns ``"drained"`` once it has finished the tasks it held and
    left: the orchestrator drained it, or the process got SIGTERM (what
    Slurm and Kubernetes send before SIGKILL; nothing is lost and nothing
    counts as a crash). With ``idle_timeout``, it returns ``"idle"`` after
    that many seconds with nothing to do: no task held, or no orchestrator
    to be reached. With ``time_limit``, or inside a Slurm job with a time
    limit (which it then leaves 15 s before the job's end), it returns
    ``"time-limit"``: from the moment the tasks it holds, judged by how long
    recent tasks took, would no longer finish in time, it takes no new task,
    finishes what it holds and leaves; what it still holds at the limit goes
    to other workers, not lost and not counted as a crash.
    ``ready_file`` exists while the worker is connected (a readiness
    check's file, in Kubernetes). The worker serves the large functions it
    holds (1 MiB or more: a ``partial`` over a large array) to the other
    workers, which fetch them from it rather than from the driver, on a
    port it picks at the address it dials from; ``serve_peers=False``
    listens on no port, and the others get them from the driver.

    With ``memory_limit`` (bytes, ``"4GB"``, ``"512MiB"``, or a fraction of
    the machine's memory such as ``0.25``), each executor runs in a cgroup
    of its own limited to that much memory: a task that allocates past it
    is killed by the kernel and retried like any crash, and after
    ``max_crashes`` fails with a :class:`~distripool.WorkerLostError` that
    says "out of memory". The worker needs a cgroup it may write (cgroup v2
    with the memory controller, or v1's memory hierarchy): as root, or in a
    delegated cgroup; else it raises :class:`OSError` at its start.

    Raises:
        KeyboardInterrupt: on Ctrl-C, after stopping the executors.
        PermissionError: the key file is readable by other users.
        OSError: ``memory_limit`` cannot be enforced on this machine.
    """
    _main.check_not_loading("a worker")
    addrs = normalize_addresses(addresses)
    if processes is None:
        processes = _native.usable_cpus()
    if processes < 1:
        raise ValueError("Number of processes must be at least 1")
    memory = resolve_memory_limit(memory_limit)
    key = resolve_key(authkey, key_file)
    tls = resolve_tls(tls_ca, tls_cert, tls_key)
    pairs = with_environment_labels(normalize_labels(labels))
    for name, value in (("idle_timeout", idle_timeout), ("time_limit", time_limit)):
        if value is not None and not (isinstance(value, (int, float)) and 0 < value < float("inf")):
            raise ValueError(f"{name} must be a positive number of seconds or None, not {value!r}")
    left = slurm_time_left()
    if left is not None:
        left = max(left - SLURM_END_MARGIN, 0.0)
        time_limit = left if time_limit is None else min(time_limit, left)
    from distripool._workdir import work_dir as own_dir

    # The worker's own directory (uploads land there), removed when it stops;
    # those of workers killed outright go as it starts.
    with own_dir() as work_dir:
        return _native.run_agent(
            addrs,
            key,
            processes,
            sys.executable,
            EXECUTOR_MODULE,
            [*executor_env(), ("DISTRIPOOL_WORK_DIR", work_dir)],
            cluster=resolve_cluster(cluster),
            encrypt=bool(encrypt),
            tls=tls,
            timing=resolve_timing(),
            labels=pairs,
            idle_timeout=None if idle_timeout is None else float(idle_timeout),
            time_limit=None if time_limit is None else float(time_limit),
            ready_file=None if ready_file is None else os.fspath(ready_file),
            memory_limit=memory,
            serve_peers=bool(serve_peers),
        )


def _close_all():
    for orch in list(_live):
        try:
            orch.close()
        except Exception:
            pass
