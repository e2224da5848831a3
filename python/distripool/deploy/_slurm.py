"""Workers as Slurm jobs: one worker per job, submitted with ``sbatch``,
watched with ``squeue``, stopped with ``scancel``."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .._config import parse_bytes, parse_slurm_duration
from ..exceptions import DistripoolError
from ._address import check_connect, choose_connect
from ._cluster import Launch, LaunchError, Unit, check_count, check_env
from ._public import Cluster

log = logging.getLogger("distripool.deploy")

# squeue states after which a job holds nothing any more.
ENDED = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
}
ENGINE_TIMEOUT = 60  # seconds an sbatch, squeue or scancel may take


def parse_memory(memory: int | str) -> int:
    """Mebibytes for ``--mem``, from bytes (an int) or ``"4GB"``, ``"512 MiB"``,
    ``"1.5G"`` (powers of 1024, as Slurm counts)."""
    n = parse_bytes(memory, "memory")
    mib = -(-n // (1 << 20))
    if mib < 1:
        raise ValueError(f"memory must be at least 1 MiB, not {memory!r}")
    return mib


def format_walltime(walltime: int | float | str) -> str:
    """``[D-]HH:MM:SS`` for ``--time``, from seconds or Slurm's own forms."""
    if isinstance(walltime, bool):
        raise TypeError("walltime must be seconds or 'HH:MM:SS', not a bool")
    if isinstance(walltime, (int, float)):
        seconds = walltime
    elif isinstance(walltime, str):
        seconds = parse_slurm_duration(walltime)
        if seconds is None:
            raise ValueError(f"walltime must be like '01:30:00', '2-00:00:00' or seconds, not {walltime!r}")
    else:
        raise TypeError(f"walltime must be seconds or 'HH:MM:SS', not {type(walltime).__name__}")
    if not 0 < seconds < float("inf"):
        raise ValueError(f"walltime must be positive, not {walltime!r}")
    total = max(60, int(-(-seconds // 60)) * 60)  # Slurm counts whole minutes
    days, rest = divmod(total, 86400)
    h, rest = divmod(rest, 3600)
    text = f"{h:02d}:{rest // 60:02d}:00"
    return f"{days}-{text}" if days else text


def _word(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{name} must be one word, not {value!r}")
    return value


def _lines(name: str, values: Sequence[str]) -> list[str]:
    if isinstance(values, str):
        raise TypeError(f"{name} must be a list of strings, not one string")
    out = []
    for v in values:
        if not isinstance(v, str):
            raise TypeError(f"{name} must hold strings, not {type(v).__name__}")
        if "\n" in v or "\r" in v or not v.strip():
            raise ValueError(f"each of {name} must be one non-empty line, not {v!r}")
        out.append(v.strip())
    return out


def run_engine(argv: list[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=ENGINE_TIMEOUT, env=env)
    except FileNotFoundError:
        raise LaunchError(
            f"{argv[0]} is not installed here (or not on PATH): Slurm's commands are needed"
        ) from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{argv[0]} did not answer within {ENGINE_TIMEOUT} s; is slurmctld up?") from None


def submit_env() -> dict[str, str]:
    """sbatch's environment (jobs inherit it): the driver's, without its key."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DISTRIPOOL_AUTHKEY")}


class SlurmLaunch(Launch):
    kind = "job"
    unit_label = "slurm_job_id"

    def __init__(
        self,
        *,
        processes,
        cores,
        memory,
        walltime,
        partition,
        account,
        directives,
        skip_directives,
        python,
        env,
        connect,
        orchestrator,
        log_dir,
    ):
        check_count("processes", processes, 1)
        self.cores = processes if cores is None else check_count("cores", cores, 1)
        self.memory = None if memory is None else parse_memory(memory)
        self.walltime = None if walltime is None else format_walltime(walltime)
        self.partition = _word("partition", partition)
        self.account = _word("account", account)
        self.directives = _lines("directives", directives)
        self.skip = _lines("skip_directives", skip_directives)
        if python is not None and not isinstance(python, str):
            raise TypeError(f"python must be a str, not {type(python).__name__}")
        self.python = python or sys.executable
        self.env = check_env(env)
        self.log_dir = os.path.abspath(os.path.expanduser(log_dir or "~/.distripool/slurm"))
        super().__init__(processes=processes, orchestrator=orchestrator)
        try:
            os.makedirs(self.log_dir, mode=0o700, exist_ok=True)
            self.name = f"distripool-{self.id}"
            self.key_path = os.path.join(self.log_dir, f"{self.name}.key")
            fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self.join.key + b"\n")
            self.connect = check_connect(connect) if connect is not None else self.default_connect()
            self.script_path = os.path.join(self.log_dir, f"{self.name}.sh")
            fd = os.open(self.script_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
            with os.fdopen(fd, "w") as f:
                f.write(self.job_script())
        except BaseException:
            self.cleanup()
            self.close_orchestrator()
            raise

    def default_connect(self) -> list[str]:
        """Toward a node of the partition, as Slurm names its address."""
        argv = ["sinfo", "--noheader", "--Node", "--format=%o"]
        if self.partition:
            argv.append(f"--partition={self.partition}")
        toward = None
        try:
            out = run_engine(argv)
            addrs = [a for a in out.stdout.split() if a]
            toward = addrs[0] if out.returncode == 0 and addrs else None
        except LaunchError:
            pass
        if toward is None:
            import socket

            toward = socket.gethostname()
            return choose_connect(
                self.orchestrator.addresses, toward, f"this host {toward} (sinfo lists no node)"
            )
        return choose_connect(self.orchestrator.addresses, toward, f"node {toward} of the partition")

    def job_script(self) -> str:
        lines = [
            f"--job-name={self.name}",
            f"--output={os.path.join(self.log_dir, self.name)}-%j.log",
            "--nodes=1",
            "--ntasks=1",
            f"--cpus-per-task={self.cores}",
        ]
        if self.memory is not None:
            lines.append(f"--mem={self.memory}M")
        if self.walltime is not None:
            lines.append(f"--time={self.walltime}")
        if self.partition:
            lines.append(f"--partition={self.partition}")
        if self.account:
            lines.append(f"--account={self.account}")
        header = [f"#SBATCH {d}" for d in lines if not any(s in d for s in self.skip)]
        header += [d if d.startswith("#") else f"#SBATCH {d}" for d in self.directives]
        argv = [self.python, "-m", "distripool", "worker"]
        for a in self.connect:
            argv += ["--connect", a]
        argv += ["--processes", str(self.processes), "--authkey-file", self.key_path]
        argv += ["--cluster", self.join.cluster]
        for label in self.labels():
            argv += ["--label", label]
        if not self.join.encrypt:
            argv.append("--no-encrypt")
        body = [f"export {k}={shlex.quote(v)}" for k, v in self.env.items()]
        body.append("exec " + " ".join(shlex.quote(a) for a in argv))
        return "\n".join(["#!/usr/bin/env bash", *header, "", *body, ""])

    def dry_run(self) -> str:
        out = run_engine(["sbatch", "--test-only", self.script_path], submit_env())
        said = (out.stderr + out.stdout).strip()
        if out.returncode != 0:
            raise LaunchError(self.refused(said))
        return said

    def refused(self, said: str) -> str:
        return (
            f"sbatch refused the job: {said or 'no reason given'}. The script is {self.script_path} "
            "(job_script()); drop a generated directive with skip_directives=[...] or add one with "
            "directives=[...]"
        )

    def launch(self, where: str) -> Unit:
        out = run_engine(["sbatch", "--parsable", self.script_path], submit_env())
        if out.returncode != 0:
            raise LaunchError(self.refused((out.stderr + out.stdout).strip()))
        job = out.stdout.strip().split(";")[0]
        if not job.isdigit():
            raise LaunchError(f"sbatch answered {out.stdout.strip()!r}, not a job id")
        return Unit(job, "", os.path.join(self.log_dir, f"{self.name}-{job}.log"))

    def poll(self, units: list[Unit]) -> None:
        out = run_engine(["squeue", "--noheader", f"--name={self.name}", "--format=%i|%T|%r|%N"])
        if out.returncode != 0:
            raise LaunchError(f"squeue failed: {out.stderr.strip()}")
        listed = {}
        for line in out.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 4:
                listed[parts[0]] = parts[1:]
        for u in units:
            row = listed.get(u.name)
            if row is None:
                if u.state != "submitted" or time.time() - u.started > 30:
                    self.ended(
                        u,
                        "cancelled"
                        if u.stopped
                        else self.exit_reason(u, "ended (no longer listed by squeue)"),
                    )
                continue
            state, reason, node = row
            u.where = node if node and node != "(null)" else u.where
            if state in ENDED:
                self.ended(u, "cancelled" if u.stopped else state.lower())
            elif state == "PENDING":
                u.state = "queued"
                u.reason = reason if reason != "None" else ""
            else:
                if u.state != "running":
                    u.running_since = time.time()
                u.state = "running"
                if not u.stopped:
                    u.reason = "" if state == "RUNNING" else state.lower()

    def stop(self, units: list[Unit]) -> None:
        ids = [u.name for u in units if u.state != "gone"]
        if not ids:
            return
        out = run_engine(["scancel", *ids])
        if out.returncode != 0:
            log.warning("scancel %s: %s", " ".join(ids), out.stderr.strip())
        for u in units:
            u.reason = "cancelled"

    def row(self, unit: Unit) -> dict[str, Any]:
        return {"node": unit.where or None}

    def cleanup(self) -> None:
        try:
            os.unlink(self.key_path)
        except (OSError, AttributeError):
            pass


class SlurmCluster(Cluster):
    """Workers as Slurm jobs: ``jobs`` jobs now, one worker each, with
    ``processes`` executors per worker.

    Each job asks for ``cores`` CPUs (default ``processes``), ``memory``
    (bytes, or ``"4GB"``), ``walltime`` (seconds, or ``"HH:MM:SS"``), and
    runs in ``partition`` under ``account``. ``directives`` are added to the
    generated ``#SBATCH`` lines (``"--qos=long"``); ``skip_directives``
    drops each generated line that contains one of its strings
    (``"--mem"``), for sites whose policy rejects it. ``python`` is the
    interpreter the jobs run (default: this one, as a shared filesystem
    has it); ``env`` the variables they get.

    The key reaches the jobs as a mode-600 file in ``log_dir`` (default
    ``~/.distripool/slurm``; it must be on a filesystem the nodes share),
    never on a command line or in the jobs' environment; their output goes
    to ``log_dir`` too. ``orchestrator``, ``connect``: see the module.

    A worker leaves before its job's time limit, finishing the tasks it
    holds and taking none that would not finish: nothing is lost at the
    walltime. ``close()`` cancels every job.

    Raises:
        LaunchError: sbatch refused the first jobs (its answer is in the message).
        ValueError, TypeError: a bad argument.
    """

    def __init__(
        self,
        jobs: int = 0,
        *,
        processes: int = 1,
        cores: int | None = None,
        memory: int | str | None = None,
        walltime: int | float | str | None = None,
        partition: str | None = None,
        account: str | None = None,
        directives: Sequence[str] = (),
        skip_directives: Sequence[str] = (),
        python: str | None = None,
        env: Mapping[str, str] | None = None,
        connect: str | Sequence[str] | None = None,
        orchestrator=None,
        log_dir: str | os.PathLike[str] | None = None,
    ):
        check_count("jobs", jobs)
        state = SlurmLaunch(
            processes=processes,
            cores=cores,
            memory=memory,
            walltime=walltime,
            partition=partition,
            account=account,
            directives=directives,
            skip_directives=skip_directives,
            python=python,
            env=env,
            connect=connect,
            orchestrator=orchestrator,
            log_dir=None if log_dir is None else os.fspath(log_dir),
        )
        self._setup(state)
        if jobs:
            try:
                state.scale(jobs)
            except (DistripoolError, OSError):
                self.close()
                raise

    def job_script(self) -> str:
        """The batch script each job runs (it names the key file, never the key)."""
        return self._state.job_script()

    def dry_run(self) -> str:
        """Ask Slurm whether it would run the job now (``sbatch
        --test-only``); returns its answer (when and where it would start).

        Raises:
            LaunchError: Slurm would refuse it; the message says why.
        """
        return self._state.dry_run()
