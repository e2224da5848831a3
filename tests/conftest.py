"""Shared fixtures: free ports, worker processes with their own log files."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# Short time limits for every orchestrator and worker of the suite (they
# inherit the environment), so that a lost peer is found in seconds. Tests
# about a limit read it from here.
HEARTBEAT = 0.2
SILENCE = 2.0
os.environ["DISTRIPOOL_TIMING"] = f"heartbeat={HEARTBEAT},silence={SILENCE},handshake=3,backoff_max=0.5"


def emulated_hosts_missing(*tools: str) -> str | None:
    """Why the hosts of ``netlab`` (network namespaces, links emulated
    through TAP devices) cannot be made here, or None; ``tools`` are other
    commands the test needs."""
    import shutil

    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", *tools):
        if shutil.which(tool) is None:
            return f"needs {'iproute2 (ip)' if tool == 'ip' else tool}"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.01):
    """Poll ``predicate`` until true; fail the test with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class ReadAhead:
    """An input of ``n`` numbers that records how far it was read ahead of
    what the caller has taken (the caller counts with :meth:`took`)."""

    def __init__(self, n: int):
        self.n = n
        self.pulled = 0
        self.taken = 0
        self.lead = 0

    def __iter__(self):
        for i in range(self.n):
            self.pulled += 1
            self.lead = max(self.lead, self.pulled - self.taken)
            yield i

    def took(self) -> None:
        self.taken += 1


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        # Gone before the open, or between the open and the read.
        return False


class Worker:
    """A worker agent in its own process, logging to a file of its own."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]):
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture
def spawn_worker(tmp_path):
    """Start worker agents: ``spawn_worker(addresses, key=..., processes=..., via=...)``
    (``processes=None``: the worker's default).

    ``via`` is ``"cli"`` (``python -m distripool worker``, with ``extra`` arguments) or
    ``"make_worker"``.
    Every worker started is stopped at the end of the test, by its PID.
    """
    workers: list[Worker] = []

    def spawn(
        addresses,
        key: bytes | None = None,
        processes: int = 2,
        via: str = "cli",
        netns=None,
        extra: list[str] = (),
    ):
        if isinstance(addresses, str):
            addresses = [addresses]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
        env["DISTRIPOOL_LOG"] = "info"
        env.pop("DISTRIPOOL_AUTHKEY", None)
        env.pop("DISTRIPOOL_AUTHKEY_FILE", None)
        if via == "cli":
            argv = [sys.executable, "-m", "distripool", "worker"]
            argv += ["--processes", str(processes)] if processes is not None else []
            for a in addresses:
                argv += ["--connect", a]
            if key is not None:
                key_file = tmp_path / f"worker{len(workers)}.key"
                key_file.write_bytes(key)
                key_file.chmod(0o600)
                argv += ["--authkey-file", str(key_file)]
            argv += list(extra)
        elif via == "make_worker":
            if key is not None:
                env["DISTRIPOOL_AUTHKEY"] = key.decode()
            code = (
                "import sys\nfrom distripool import make_worker\n"
                f"make_worker({tuple(addresses)!r}, processes={processes})\n"
            )
            argv = [sys.executable, "-c", code]
        else:
            raise ValueError(via)
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        w = Worker(argv, tmp_path / f"worker{len(workers)}.log", env)
        workers.append(w)
        return w

    yield spawn
    for w in workers:
        w.stop()


@pytest.fixture
def orchestrator():
    """A loopback orchestrator on two free ports, closed after the test."""
    from distripool import make_orchestrator

    orch = make_orchestrator(("127.0.0.1:0", "127.0.0.1:0"))
    yield orch
    orch.close()


@pytest.fixture
def keyed():
    """``(orchestrator, key)``: an orchestrator on a free loopback port with a
    random key, closed after the test."""
    from distripool import Orchestrator

    key = os.urandom(16).hex().encode()
    orch = Orchestrator("127.0.0.1:0", authkey=key)
    yield orch, key
    orch.close()


@pytest.fixture(scope="session")
def remote_orchestrator(tmp_path_factory):
    """An orchestrator with one remote worker (2 executors, over TCP), shared by
    the tests that run the same bodies against remote workers.

    Made with ``Orchestrator(...)``, not ``make_orchestrator``, so it never
    becomes the process default that a plain ``Pool()`` would pick up.
    """
    from distripool import Orchestrator

    key = os.urandom(16).hex().encode()
    orch = Orchestrator("127.0.0.1:0", authkey=key)
    log_dir = tmp_path_factory.mktemp("remote-worker")
    key_file = log_dir / "key"
    key_file.write_bytes(key)
    key_file.chmod(0o600)
    env = dict(os.environ, DISTRIPOOL_LOG="info")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    argv = [sys.executable, "-m", "distripool", "worker", "--processes", "2"]
    argv += ["--connect", orch.addresses[0], "--authkey-file", str(key_file)]
    worker = Worker(argv, log_dir / "worker.log", env)
    try:
        if not orch.wait_for_workers(1, timeout=60):
            pytest.fail(f"remote worker did not connect:\n{worker.log()}")
        yield orch
    finally:
        orch.close()
        worker.stop()
