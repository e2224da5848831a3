"""Workers on SSH hosts: each is a ``distripool worker`` that the system
``ssh`` starts, so that ``~/.ssh/config``, ProxyJump, agents and Kerberos
work as the user has them. The key travels on the session's standard input;
the worker leaves when that closes."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ._address import check_connect, choose_connect
from ._cluster import Launch, LaunchError, Unit, check_env
from ._public import Cluster

log = logging.getLogger("distripool.deploy")

# ssh's own options, before the user's (which win: ssh takes the first).
SSH_DEFAULTS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15")
# How long a stopped worker has to leave before its ssh is ended.
STOP_GRACE = 10.0


def _hosts(hosts) -> list[str]:
    if isinstance(hosts, str):
        hosts = [hosts]
    try:
        out = list(hosts)
    except TypeError:
        raise TypeError(f"hosts must be a list of host names, not {type(hosts).__name__}") from None
    if not out:
        raise ValueError("hosts must name at least one host")
    for h in out:
        if not isinstance(h, str):
            raise TypeError(f"hosts must hold strings, not {type(h).__name__}")
        if not h or h.startswith("-") or any(c.isspace() for c in h):
            raise ValueError(f"not a host name: {h!r}")
    return out


class SSHLaunch(Launch):
    kind = "host"

    def __init__(self, hosts, *, processes, python, env, connect, orchestrator, ssh_options):
        self.hosts = _hosts(hosts)
        if isinstance(ssh_options, str):
            raise TypeError("ssh_options must be a list of arguments, like ['-p', '2222'], not one string")
        self.ssh_options = [str(o) for o in ssh_options]
        if python is not None and not isinstance(python, str):
            raise TypeError(f"python must be a str, not {type(python).__name__}")
        self.python = python or "python3"
        self.env = check_env(env)
        super().__init__(processes=processes, orchestrator=orchestrator)
        self.log_dir = tempfile.mkdtemp(prefix="distripool-ssh-")
        self.counter = 0
        self.connect_by_host: dict[str, list[str]] = {}
        if connect is not None:
            given = check_connect(connect)
            self.connect_by_host = {h: given for h in self.hosts}

    def places(self) -> list[str]:
        return self.hosts

    def ssh_argv(self, host: str, *command: str) -> list[str]:
        return ["ssh", *SSH_DEFAULTS, *self.ssh_options, host, "--", *command]

    def real_host(self, host: str) -> str:
        """The address ssh dials for ``host`` (its config may rename it)."""
        try:
            out = subprocess.run(
                ["ssh", *self.ssh_options, "-G", host], capture_output=True, text=True, timeout=30
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return host
        for line in out.splitlines():
            k, _, v = line.partition(" ")
            if k == "hostname" and v.strip():
                return v.strip()
        return host

    def connect_for(self, host: str) -> list[str]:
        found = self.connect_by_host.get(host)
        if found is None:
            try:
                found = choose_connect(self.orchestrator.addresses, self.real_host(host), f"host {host}")
            except ValueError as exc:
                raise LaunchError(str(exc)) from None
            self.connect_by_host[host] = found
        return found

    def worker_command(self, host: str, unit: str) -> str:
        argv = [self.python, "-m", "distripool", "worker"]
        for a in self.connect_for(host):
            argv += ["--connect", a]
        if self.processes is not None:
            argv += ["--processes", str(self.processes)]
        argv += ["--authkey-file", "-", "--cluster", self.join.cluster]
        for label in [*self.labels(unit), f"ssh_host={host}"]:
            argv += ["--label", label]
        if not self.join.encrypt:
            argv.append("--no-encrypt")
        env = [f"{k}={v}" for k, v in self.env.items()]
        return "exec " + " ".join(shlex.quote(a) for a in (["env", *env] if env else []) + argv)

    def launch(self, where: str) -> Unit:
        self.counter += 1
        name = f"{where}#{self.counter}"
        path = os.path.join(self.log_dir, f"{where}-{self.counter}.log")
        command = self.worker_command(where, name)
        with open(path, "wb") as out:
            try:
                proc = subprocess.Popen(
                    self.ssh_argv(where, command),
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except FileNotFoundError:
                raise LaunchError("ssh is not installed here (or not on PATH)") from None
        try:
            proc.stdin.write(self.join.key + b"\n")
            proc.stdin.flush()
        except OSError:
            pass  # ssh already ended; poll() reports why
        unit = Unit(name, where, path)
        unit.handle = proc
        unit.state = "running"
        unit.running_since = time.time()
        return unit

    def poll(self, units: list[Unit]) -> None:
        for u in units:
            rc = u.handle.poll()
            if rc is None:
                continue
            if u.stopped:
                self.ended(u, "stopped")
            elif rc == 255:
                self.ended(u, "ssh failed (status 255)")
            elif rc in (0, 3, 4):  # it left, and said why
                self.ended(u, self.exit_reason(u, f"the worker exited with status {rc}"))
            else:
                self.ended(u, f"the worker exited with status {rc}")

    def stop(self, units: list[Unit]) -> None:
        for u in units:
            try:
                u.handle.stdin.close()  # the worker leaves when its stdin closes
            except OSError:
                pass
        deadline = time.monotonic() + STOP_GRACE
        for u in units:
            try:
                u.handle.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(u.handle.pid, signal.SIGTERM)  # its own session: ssh and nothing else
                except ProcessLookupError:
                    pass
                try:
                    u.handle.wait(5)
                except subprocess.TimeoutExpired:
                    u.handle.kill()
                    u.handle.wait()
        self.poll(units)

    def row(self, unit: Unit) -> dict[str, Any]:
        return {"host": unit.where, "name": unit.name, "pid": unit.handle.pid if unit.handle else None}

    def cleanup(self) -> None:
        """The workers' logs live in a directory of our own: gone with us."""
        shutil.rmtree(self.log_dir, ignore_errors=True)


class SSHCluster(Cluster):
    """Workers on SSH hosts: one ``distripool worker`` on each of ``hosts``
    now, started with the system ``ssh`` (``ssh_options`` are passed to it),
    running ``processes`` executors (default: the host's CPUs).

    ``python`` is the interpreter on the hosts (default ``python3``); it
    needs distripool installed. ``env``: variables for the workers (they
    appear on the remote command line: no secrets). The key goes on the
    session's standard input, and a worker leaves when its session ends.
    ``scale(n)`` with more than one worker per host spreads them evenly.
    ``orchestrator``, ``connect``: see the module.
    """

    def __init__(
        self,
        hosts: Sequence[str],
        *,
        processes: int | None = None,
        python: str | None = None,
        env: Mapping[str, str] | None = None,
        connect: str | Sequence[str] | None = None,
        orchestrator=None,
        ssh_options: Sequence[str] = (),
    ):
        state = SSHLaunch(
            hosts,
            processes=processes,
            python=python,
            env=env,
            connect=connect,
            orchestrator=orchestrator,
            ssh_options=ssh_options,
        )
        self._setup(state)
        # A host that cannot be used does not stop the others: it is
        # logged, and its status says why.
        state.scale(len(state.hosts), raise_errors=False)
