"""``distripool status URL``: what an orchestrator's dashboard shows, as a
terminal table; ``--watch`` refreshes it."""

from __future__ import annotations

import argparse
import hmac
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

STATUS_HELP = """\
Show an orchestrator's workers, tasks and jobs, read from its dashboard (an
orchestrator made with make_orchestrator(dashboard=...), a Pool(dashboard=...)
or DISTRIPOOL_DASHBOARD). URL is the one it printed; on an address other
than loopback it carries the token (?token=...), or pass --token, or set the
cluster's key (DISTRIPOOL_AUTHKEY, DISTRIPOOL_AUTHKEY_FILE), from which the
token is derived.

example:
  distripool status http://127.0.0.1:8787/
  distripool status 10.0.0.5:8787 --authkey-file cluster.key --watch
"""


class StatusError(Exception):
    """The dashboard could not be read; the message says why."""


def token_of(key: bytes) -> str:
    """The dashboard token of a cluster key (as the orchestrator derives it)."""
    return hmac.new(key, b"distripool dashboard token v1", "sha256").hexdigest()[:32]


def split_url(url: str) -> tuple[str, str | None]:
    """``(base URL ending in /, token or None)`` of what the user typed:
    a full URL, or ``host:port``."""
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise StatusError(f"not a dashboard URL: {url!r} (expected e.g. http://127.0.0.1:8787/)")
    token = urllib.parse.parse_qs(parts.query).get("token", [None])[0]
    path = parts.path
    for page in ("index.html", "metrics"):
        if path.endswith("/" + page):
            path = path[: -len(page)]
    if not path.endswith("/"):
        path += "/"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", "")), token


def fetch(base: str, token: str | None, timeout: float = 10.0) -> dict[str, Any]:
    """The dashboard's ``api/v1/status``."""
    req = urllib.request.Request(base + "api/v1/status")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)  # type: ignore[no-any-return]
    except urllib.error.HTTPError as e:
        if e.code == 401:
            raise StatusError(
                f"{base} needs the dashboard's token: use the URL it printed (with ?token=...), "
                "--token, or the cluster's key (--authkey-file, DISTRIPOOL_AUTHKEY)"
            ) from None
        raise StatusError(f"{base}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise StatusError(f"cannot reach {base}: {e.reason}") from None
    except (OSError, ValueError) as e:
        raise StatusError(f"cannot read {base}: {e}") from None


def _dur(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


def _bytes(b: float | None) -> str:
    if b is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024:
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TiB"


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    return [line(headers)] + [line(r) for r in rows]


def _bar(done: int, failed: int, total: int, width: int = 20) -> str:
    total = max(total, 1)
    d = round(width * done / total)
    f = min(width - d, round(width * failed / total))
    return "[" + "#" * d + "x" * f + "." * (width - d - f) + "]"


def render(status: dict[str, Any], base: str) -> str:
    """The status as text: a summary, the workers, the newest jobs."""
    o = status["overview"]
    t = o["tasks"]
    rate = o["throughput"][-1][1] if o["throughput"] else 0.0
    lines = [
        f"distripool {o['version']} at {base}  (up {_dur(o['uptime'])})",
        f"workers {o['workers']}   executors {o['executors']['busy']} busy, {o['executors']['idle']} idle",
        f"tasks   {t['queued']} queued, {t['running']} running, {t['completed']} completed, "
        f"{t['failed']} failed, {t['retried']} retried   ({rate:.1f}/s)",
        "",
    ]
    workers = status["workers"]
    if workers:
        rows = [
            [
                str(w["id"]),
                w["host"],
                str(w["pid"]),
                w["state"],
                str(w["slots"]),
                str(w["tasks_running"]),
                str(w["tasks_done"]),
                str(w["crashes"]),
                "-" if w["executors_cpu"] is None else f"{100 * w['executors_cpu']:.0f}%",
                _bytes(w["executors_memory"]),
                _dur(w["last_heard"]),
                " ".join(f"{k}={v}" for k, v in w["labels"].items()),
            ]
            for w in workers
        ]
        head = ["WORKER", "HOST", "PID", "STATE", "EXECUTORS", "HELD", "DONE", "CRASHES", "CPU", "MEMORY"]
        lines += _table(head + ["HEARD", "LABELS"], rows, {0, 2, 4, 5, 6, 7, 8, 9, 10})
    else:
        lines.append("no worker connected")
    jobs = status["jobs"][:10]
    if jobs:
        lines.append("")
        rows = [
            [
                f"{j['client']}.{j['job']}",
                j["kind"],
                j["name"],
                "-" if j["items"] is None else str(j["items"]),
                _bar(j["done"], j["failed"], j["tasks"]),
                f"{j['done']}/{j['tasks']}",
                str(j["failed"]),
                str(j["retried"]),
                j["state"],
                _dur(j["elapsed"] if j["elapsed"] is not None else j["age"]),
            ]
            for j in jobs
        ]
        head = ["JOB", "KIND", "FUNCTION", "ITEMS", "PROGRESS", "DONE", "FAILED", "RETRIED", "STATE", "TIME"]
        lines += _table(head, rows, {3, 5, 6, 7, 9})
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    from ._config import resolve_key

    try:
        base, token = split_url(args.url)
        token = args.token or token
        if token is None:
            key = resolve_key(None, args.authkey_file)
            token = token_of(key) if key else None
        while True:
            text = render(fetch(base, token), base)
            if not args.watch:
                print(text)
                return 0
            # Clear the screen and draw again, as watch(1) does.
            sys.stdout.write("\x1b[H\x1b[2J" + text + f"\n\n(every {args.watch:g} s; Ctrl-C to stop)\n")
            sys.stdout.flush()
            time.sleep(args.watch)
    except StatusError as e:
        print(f"distripool status: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError("the interval must be from 0.1 to 3600 seconds")
    return value


def add_command(sub: Any) -> None:
    s = sub.add_parser(
        "status",
        help="show an orchestrator's workers, tasks and jobs (from its dashboard)",
        description=STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("url", metavar="URL", help="the dashboard's URL, or HOST:PORT")
    s.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        default=None,
        type=_interval,
        metavar="S",
        help="refresh every S seconds (default 2) until Ctrl-C",
    )
    s.add_argument("--token", default=None, help="the dashboard's token (if the URL has none)")
    s.add_argument(
        "--authkey-file",
        metavar="FILE",
        default=None,
        help="the cluster's key file, from which the token is derived (default: $DISTRIPOOL_AUTHKEY, "
        "then $DISTRIPOOL_AUTHKEY_FILE)",
    )
    s.set_defaults(func=_cmd_status)
