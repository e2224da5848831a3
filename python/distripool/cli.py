"""The ``distripool`` command: run a worker agent, launch workers, show an
orchestrator's status, or make a key."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys

from . import _native
from ._config import normalize_addresses, split_addresses
from .exceptions import DistripoolError

WORKER_HELP = """\
Run a worker agent on this machine. It connects to the orchestrator that a
program started with distripool.make_orchestrator(), authenticates with the
shared key, and runs the tasks of that program's pools on PROCESSES local
executor processes. It keeps retrying until the orchestrator is up, reconnects
when it goes away, and runs until interrupted (Ctrl-C), drained by the
orchestrator, or sent SIGTERM (it finishes the tasks it holds, then leaves).

exit status: 0 drained or SIGTERM (nothing lost), 3 idle (--idle-timeout),
4 time limit (--time-limit, or the end of the Slurm job it runs in), 1 a fatal
local error (an unreadable key file, executors that cannot start), 2 bad
arguments, 130 Ctrl-C.

example:
  distripool keygen cluster.key        # once; copy the file to every machine
  distripool worker --connect 10.0.0.5:1337 --authkey-file cluster.key
"""


EXIT_IDLE = 3
EXIT_TIME_LIMIT = 4


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


class _LikeTheAgent(logging.Formatter):
    """The worker's Python-side records, in the agent's format, on the
    same stream: ``2026-12-06T17:11:33.772621Z  INFO message``."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        level = {"WARNING": "WARN", "CRITICAL": "ERROR"}.get(record.levelname, record.levelname)
        return f"{when.strftime('%Y-%m-%dT%H:%M:%S.%f')}Z {level:>5} {record.getMessage()}"


def _worker_logging(spec: str) -> None:
    """Log the agent's records and the ``distripool`` logger's to stderr, at
    the level ``spec`` (``DISTRIPOOL_LOG``: a level, or the agent's
    ``target=level,...`` filter, whose bare level applies here)."""
    _native.enable_logging(spec)
    levels = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO}
    levels |= {"warn": logging.WARNING, "error": logging.ERROR, "off": logging.CRITICAL + 1}
    bare = [levels[p.strip().lower()] for p in spec.split(",") if p.strip().lower() in levels]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LikeTheAgent())
    logger = logging.getLogger("distripool")
    logger.addHandler(handler)
    logger.setLevel(bare[-1] if bare else logging.INFO)


def _cmd_worker(args: argparse.Namespace) -> int:
    from ._orchestrator import make_worker

    _worker_logging(os.environ.get("DISTRIPOOL_LOG", "info"))
    addrs = split_addresses(args.connect)
    normalize_addresses(addrs)
    key, key_file = None, args.authkey_file
    if key_file == "-":
        key, key_file = _key_from_stdin(), None
    try:
        why = make_worker(
            addrs,
            processes=args.processes,
            authkey=key,
            key_file=key_file,
            cluster=args.cluster,
            encrypt=args.encrypt,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            labels=args.labels,
            idle_timeout=args.idle_timeout,
            time_limit=args.time_limit,
            ready_file=args.ready_file,
            memory_limit=args.memory_limit,
            serve_peers=args.serve_peers,
        )
    except KeyboardInterrupt:
        print("distripool worker: interrupted, executors stopped", file=sys.stderr)
        return 130
    if why == "idle":
        print(f"distripool worker: nothing to do for {args.idle_timeout:g} s, leaving", file=sys.stderr)
        return EXIT_IDLE
    if why == "time-limit":
        print("distripool worker: time limit reached, leaving", file=sys.stderr)
        return EXIT_TIME_LIMIT
    print("distripool worker: drained (by the orchestrator, or SIGTERM), leaving", file=sys.stderr)
    return 0


def _key_from_stdin() -> bytes:
    """The key as the first line of standard input (what an SSH launcher
    sends); the worker then leaves, as on SIGTERM, when its standard input
    closes: the session that started it is gone."""
    import signal
    import threading

    line = b""
    while not line.endswith(b"\n"):  # unbuffered: nothing past the line is taken
        chunk = os.read(0, 1)
        if not chunk:
            break
        line += chunk
    key = line.strip()
    if not key:
        raise ValueError("--authkey-file -: no key on the first line of standard input")

    def leave_at_eof():
        # The descriptor, not sys.stdin: a daemon thread blocked inside the
        # buffered reader would hold its lock when the interpreter exits.
        try:
            while os.read(0, 1 << 16):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=leave_at_eof, name="distripool-stdin", daemon=True).start()
    return key


def _cmd_keygen(args: argparse.Namespace) -> int:
    key = os.urandom(32).hex().encode() + b"\n"
    if args.path in (None, "-"):
        sys.stdout.write(key.decode())
        return 0
    fd = os.open(args.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    print(f"wrote a new key to {args.path} (mode 600)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="distripool",
        description="Distributed multiprocessing.Pool: worker agents, launchers (Slurm, SSH, "
        "Kubernetes) and key management.",
    )
    from . import __version__

    parser.add_argument(
        "--version",
        action="version",
        version=f"distripool {__version__} (wire protocol {_native.PROTOCOL_VERSION})",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    w = sub.add_parser(
        "worker",
        help="run a worker agent that executes tasks for an orchestrator",
        description=WORKER_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w.add_argument(
        "--connect",
        action="append",
        required=True,
        metavar="HOST:PORT",
        help="orchestrator address; repeat (or separate with commas) to give several, tried in turn",
    )
    w.add_argument(
        "--processes",
        "-p",
        type=int,
        default=None,
        metavar="N",
        help="executor processes to run (default: the CPUs this process may use, its affinity within its cgroup quota)",
    )
    w.add_argument(
        "--idle-timeout",
        type=_seconds,
        default=None,
        metavar="S",
        help="leave (exit status 3) after S seconds with nothing to do: no task, or no orchestrator to reach",
    )
    w.add_argument(
        "--time-limit",
        type=_seconds,
        default=None,
        metavar="S",
        help="be gone S seconds from now (exit status 4): take no task that would not finish by then, "
        "judged from recent tasks, and finish the ones held. In a Slurm job, its end does the same",
    )
    w.add_argument(
        "--memory-limit",
        metavar="SIZE",
        default=None,
        help="each executor's memory, enforced by the kernel in a cgroup per executor: bytes, "
        "'4GB', '512MiB' (powers of 1024) or a fraction of this machine's memory ('0.25'). A task "
        "that allocates past it is killed and retried; past max_crashes it fails with "
        "WorkerLostError, 'out of memory'. Needs a writable cgroup (root, or a delegated one)",
    )
    w.add_argument(
        "--ready-file",
        metavar="FILE",
        default=None,
        help="a file that exists while the worker is connected to an orchestrator (for a readiness check)",
    )
    w.add_argument(
        "--authkey-file",
        metavar="FILE",
        default=None,
        help="file holding the shared key (default: $DISTRIPOOL_AUTHKEY, then "
        "$DISTRIPOOL_AUTHKEY_FILE); must not be readable by other users. '-' reads it from the first "
        "line of standard input, and the worker leaves when standard input closes (as SSH launchers use it)",
    )
    w.add_argument(
        "--cluster",
        metavar="NAME",
        default=None,
        help="join only an orchestrator of this cluster (default: $DISTRIPOOL_CLUSTER, else 'default')",
    )
    w.add_argument(
        "--no-encrypt",
        dest="encrypt",
        action="store_false",
        help="do not seal messages after the handshake; the orchestrator must have encrypt=False "
        "too. Only for networks you trust",
    )
    w.add_argument(
        "--no-serve-peers",
        dest="serve_peers",
        action="store_false",
        help="do not serve the large functions this worker holds to other workers (it then listens on "
        "no port); they get them from the driver",
    )
    w.add_argument(
        "--label",
        dest="labels",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label the orchestrator shows for this worker (workers_info()); repeat for several",
    )
    tls = w.add_argument_group(
        "mutual TLS 1.3 (instead of distripool's own encryption; all three, or set "
        "$DISTRIPOOL_TLS_CA, $DISTRIPOOL_TLS_CERT, $DISTRIPOOL_TLS_KEY)"
    )
    tls.add_argument(
        "--tls-ca", metavar="FILE", help="PEM file of the CA that signed the orchestrator's certificate"
    )
    tls.add_argument("--tls-cert", metavar="FILE", help="PEM file of this worker's certificate (chain)")
    tls.add_argument("--tls-key", metavar="FILE", help="PEM file of this worker's private key (mode 600)")
    w.set_defaults(func=_cmd_worker)

    from .deploy._cli import add_commands

    add_commands(sub)

    from ._status import add_command as add_status

    add_status(sub)

    k = sub.add_parser("keygen", help="write a new random key to PATH (mode 600), or print it")
    k.add_argument("path", nargs="?", metavar="PATH", help="file to create; '-' or nothing prints the key")
    k.set_defaults(func=_cmd_keygen)

    args = parser.parse_args(argv)
    if getattr(args, "processes", None) is not None and args.processes < 1:
        parser.error("--processes must be at least 1")
    try:
        return args.func(args)
    except (ValueError, TypeError, PermissionError, FileNotFoundError, FileExistsError) as exc:
        print(f"distripool {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (DistripoolError, OSError) as exc:
        print(f"distripool {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
