"""Authentication keys, addresses, and the settings of workers and launchers."""

from __future__ import annotations

import os
import re
import stat
import sys

DEFAULT_PORTS = (1337, 1338)


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
# An executor's interpreter alone takes tens of MiB: a lower limit would
# kill every executor before its first task.
MIN_MEMORY_LIMIT = 64 << 20

DEFAULT_CLUSTER = "default"
MAX_CLUSTER = 64


def _check_private(path: str | os.PathLike, what: str) -> None:
    st = os.stat(path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(
            f"{what} {os.fspath(path)!r} is accessible by other users (mode "
            f"{stat.S_IMODE(st.st_mode):o}); restrict it with: chmod 600 {os.fspath(path)}"
        )


def read_key_file(path: str | os.PathLike) -> bytes:
    """Read a key file, refusing one that other users can read.

    Raises:
        PermissionError: the file is readable by group or others.
        ValueError: the file is empty.
    """
    _check_private(path, "key file")
    with open(path, "rb") as f:
        key = f.read().strip()
    if not key:
        raise ValueError(f"key file {os.fspath(path)!r} is empty")
    return key


def resolve_key(authkey: bytes | str | None = None, key_file: str | None = None) -> bytes:
    """The key to use: explicit argument, key file, then the environment.

    Order: ``authkey``, ``key_file``, ``$DISTRIPOOL_AUTHKEY``,
    ``$DISTRIPOOL_AUTHKEY_FILE``. Returns ``b""`` when none is set.
    """
    if authkey is not None:
        if isinstance(authkey, str):
            authkey = authkey.encode()
        if not isinstance(authkey, (bytes, bytearray)):
            raise TypeError(f"authkey must be bytes or str, not {type(authkey).__name__}")
        return bytes(authkey)
    if key_file is not None:
        return read_key_file(key_file)
    env = os.environ.get("DISTRIPOOL_AUTHKEY")
    if env:
        return env.encode()
    path = os.environ.get("DISTRIPOOL_AUTHKEY_FILE")
    if path:
        return read_key_file(path)
    return b""


def resolve_cluster(cluster: str | None = None) -> str:
    """The cluster name: the argument, else ``$DISTRIPOOL_CLUSTER``, else ``"default"``."""
    if cluster is None:
        cluster = os.environ.get("DISTRIPOOL_CLUSTER") or DEFAULT_CLUSTER
    if not isinstance(cluster, str):
        raise TypeError(f"cluster must be a str, not {type(cluster).__name__}")
    if not cluster or len(cluster.encode()) > MAX_CLUSTER:
        raise ValueError(f"cluster name must be 1 to {MAX_CLUSTER} bytes of UTF-8, not {cluster!r}")
    return cluster


def resolve_tls(ca=None, cert=None, key=None) -> tuple[str, str, str] | None:
    """Mutual-TLS files: the arguments, else ``$DISTRIPOOL_TLS_CA``,
    ``$DISTRIPOOL_TLS_CERT`` and ``$DISTRIPOOL_TLS_KEY``. All three or none.

    Raises:
        ValueError: only some of the three are given.
        FileNotFoundError: a file does not exist.
        PermissionError: the private key file is readable by other users.
    """
    given = {"ca": ca, "cert": cert, "key": key}
    if all(v is None for v in given.values()):
        given = {n: os.environ.get(f"DISTRIPOOL_TLS_{n.upper()}") or None for n in given}
    if all(v is None for v in given.values()):
        return None
    missing = [n for n, v in given.items() if v is None]
    if missing:
        raise ValueError(
            "mutual TLS needs a CA file, a certificate and a private key; missing: "
            + ", ".join(f"tls_{n}" for n in missing)
        )
    paths = {n: os.fspath(v) for n, v in given.items()}
    for n, path in paths.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"TLS {n} file {path!r} does not exist")
    _check_private(paths["key"], "TLS private key file")
    return paths["ca"], paths["cert"], paths["key"]


def process_cpus() -> int:
    """CPUs this process may run on, as ``os.process_cpu_count()`` counts
    them (Python 3.13): its affinity mask, not every CPU of the machine."""
    count = getattr(os, "process_cpu_count", None)
    if count is not None:
        return count() or 1
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def split_addresses(items: list[str]) -> list[str]:
    """``--connect`` values as given on a command line: repeated, or
    separated by commas."""
    return [a for item in items for a in item.split(",") if a]


def normalize_addresses(addresses) -> list[str]:
    """Accept ``"host:port"`` or a tuple/list of them."""
    if isinstance(addresses, str):
        addresses = [addresses]
    try:
        out = [str(a) for a in addresses]
    except TypeError:
        raise TypeError(
            f"addresses must be 'host:port' or a tuple of such strings, not {type(addresses).__name__}"
        ) from None
    if not out:
        raise ValueError("at least one 'host:port' address is required")
    for a in out:
        host, sep, port = a.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"invalid address {a!r}: expected 'host:port', e.g. '127.0.0.1:1337'")
    return out


MAX_LABELS = 64
MAX_LABEL = 256


def normalize_labels(labels) -> list[tuple[str, str]]:
    """Worker labels as ``(key, value)`` pairs, from a dict or ``"key=value"``
    strings. Keys are letters, digits, ``_ . - /``; values any text.

    Raises:
        TypeError: not a dict or an iterable of strings.
        ValueError: a string without ``=``, a bad key, a duplicate, or too many or too long.
    """
    if labels is None:
        return []
    if isinstance(labels, dict):
        items = [(k, v) for k, v in labels.items()]
    elif isinstance(labels, str):
        raise TypeError("labels must be a dict or a list of 'key=value' strings, not a str")
    else:
        items = []
        for item in labels:
            if not isinstance(item, str):
                raise TypeError(f"labels must be 'key=value' strings, not {type(item).__name__}")
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"label {item!r} is not of the form key=value")
            items.append((key, value))
    if len(items) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels, not {len(items)}")
    out, seen = [], set()
    for key, value in items:
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("label keys and values must be str")
        ok = key and all(c.isascii() and (c.isalnum() or c in "_.-/") for c in key)
        if not ok or len(key) > MAX_LABEL:
            raise ValueError(
                f"invalid label key {key!r}: use letters, digits and _ . - / (at most {MAX_LABEL})"
            )
        if len(value.encode()) > MAX_LABEL:
            raise ValueError(f"label {key!r}: value longer than {MAX_LABEL} bytes")
        if key in seen:
            raise ValueError(f"label {key!r} given twice")
        seen.add(key)
        out.append((key, value))
    return out


# What a worker started by Slurm (sbatch, srun) says about itself, from the
# environment Slurm gives it: label -> variable.
SLURM_LABELS = {
    "slurm_job_id": "SLURM_JOB_ID",
    "slurm_array_job_id": "SLURM_ARRAY_JOB_ID",
    "slurm_array_task_id": "SLURM_ARRAY_TASK_ID",
    "slurm_step_id": "SLURM_STEP_ID",
    "slurm_node": "SLURMD_NODENAME",
    "slurm_procid": "SLURM_PROCID",
}


def with_environment_labels(pairs: list[tuple[str, str]], environ=None) -> list[tuple[str, str]]:
    """``pairs`` and, inside a Slurm job, the job's own labels (those given
    explicitly win)."""
    environ = os.environ if environ is None else environ
    given = {k for k, _ in pairs}
    extra = [
        (label, environ[var])
        for label, var in SLURM_LABELS.items()
        if label not in given and environ.get(var) and len(environ[var].encode()) <= MAX_LABEL
    ]
    return (pairs + extra)[: max(MAX_LABELS, len(pairs))]


# A worker in a Slurm job leaves this long before the job's end: time for
# its goodbye, for idle executors to exit, and for clocks that differ.
SLURM_END_MARGIN = 15.0


def parse_slurm_duration(text: str) -> float | None:
    """Seconds in Slurm's ``[D-]HH:MM:SS`` / ``MM:SS`` / ``MM`` form
    (``squeue -o %L``); None for ``UNLIMITED``, ``NOT_SET`` and the like."""
    text = text.strip()
    days, _, rest = text.rpartition("-")
    parts = rest.split(":")
    if not rest or len(parts) > 3 or not all(p.isdigit() for p in parts) or days and not days.isdigit():
        return None
    values = [int(p) for p in parts]
    if len(values) == 1:
        values = [0, values[0], 0]  # minutes
    elif len(values) == 2:
        values = [0, *values]
    h, m, sec = values
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + sec


def slurm_time_left(environ=None) -> float | None:
    """Inside a Slurm job: seconds until the job's end (from
    ``$SLURM_JOB_END_TIME``, else ``squeue``); None outside one, for a job
    without a limit, or when Slurm cannot say."""
    import subprocess
    import time

    environ = os.environ if environ is None else environ
    job = environ.get("SLURM_JOB_ID")
    if not job:
        return None
    end = environ.get("SLURM_JOB_END_TIME", "")
    if end.isdigit() and int(end) > 0:
        return int(end) - time.time()
    try:
        out = subprocess.run(
            ["squeue", "--noheader", "--jobs", job, "--format", "%L"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_slurm_duration(out)


def resolve_timing() -> list[tuple[str, float]] | None:
    """Time limits from ``$DISTRIPOOL_TIMING``, e.g. ``"heartbeat=0.2,silence=2"``
    (seconds); ``None`` keeps the defaults (1 s heartbeat, 10 s silence limit,
    10 s handshake, 3 s connect, backoff from 0.1 s to 5 s). The names and
    values are checked by the core, which knows them.

    Raises:
        ValueError: an entry that is not ``NAME=SECONDS`` (here), an unknown
            name or a bad value (by the core).
    """
    spec = os.environ.get("DISTRIPOOL_TIMING", "").strip()
    if not spec:
        return None
    out = []
    for item in spec.split(","):
        name, sep, value = item.strip().partition("=")
        try:
            seconds = float(value) if sep else None
        except ValueError:
            seconds = None
        if not name.strip() or seconds is None:
            raise ValueError(f"DISTRIPOOL_TIMING: invalid entry {item.strip()!r}; expected NAME=SECONDS")
        out.append((name.strip(), seconds))
    return out


DEFAULT_DASHBOARD = "127.0.0.1:8787"


def resolve_dashboard(dashboard) -> tuple[str | None, bool]:
    """The dashboard's ``host:port``, or None for none, and whether it came
    from ``$DISTRIPOOL_DASHBOARD`` (used when ``dashboard`` is None).

    ``True`` is ``127.0.0.1:8787``; an int is that port on 127.0.0.1;
    ``False`` turns it off even when the variable is set.

    Raises:
        ValueError: not an address, a port or a bool.
    """
    from_env = False
    if dashboard is None:
        dashboard = os.environ.get("DISTRIPOOL_DASHBOARD", "").strip() or None
        if dashboard is None:
            return None, False
        from_env = True
        if dashboard.lower() in ("1", "true", "yes", "on"):
            dashboard = True
        elif dashboard.lower() in ("0", "false", "no", "off"):
            return None, False
        elif dashboard.isdigit():
            dashboard = int(dashboard)
    if dashboard is False:
        return None, False
    if dashboard is True:
        return DEFAULT_DASHBOARD, from_env
    if isinstance(dashboard, int) and 0 <= dashboard <= 65535:
        return f"127.0.0.1:{dashboard}", from_env
    if isinstance(dashboard, str):
        where = "DISTRIPOOL_DASHBOARD" if from_env else "dashboard"
        try:
            return normalize_addresses(dashboard)[0], from_env
        except ValueError:
            raise ValueError(
                f"{where} must be 'host:port' (e.g. '127.0.0.1:8787'), a port, True or False, not {dashboard!r}"
            ) from None
    raise ValueError(f"dashboard must be 'host:port', a port, True or False, not {dashboard!r}")


EXECUTOR_HEAP_SLACK = 256 << 20


def executor_env() -> list[tuple[str, str]]:
    """Environment for executors: make the driver's import path theirs too, so
    functions defined in importable modules can be found by reference."""
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    if "" in sys.path or not sys.path or sys.path[0] == "":
        paths.insert(0, os.getcwd())
    extra = os.environ.get("PYTHONPATH")
    if extra:
        paths.append(extra)
    env = [("PYTHONPATH", os.pathsep.join(dict.fromkeys(paths)))]
    # glibc maps every allocation over 32 MiB afresh and unmaps it when freed,
    # so each large argument would pay its page faults again. Executors keep
    # up to EXECUTOR_HEAP_SLACK of freed heap for the next task instead.
    if not any(k.startswith("MALLOC_") for k in os.environ):
        env += [("MALLOC_MMAP_MAX_", "0"), ("MALLOC_TRIM_THRESHOLD_", str(EXECUTOR_HEAP_SLACK))]
    return env


def parse_bytes(value: int | str, name: str) -> int:
    """Bytes from an int or ``"4GB"``, ``"512 MiB"``, ``"1.5G"`` (powers of
    1024, as Slurm counts)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number of bytes or a string like '4GB', not a bool")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtTpP]?)(i?[bB])?\s*", value)
        if m is None or (not m.group(2) and not m.group(3)):
            raise ValueError(f"{name} must be like '4GB', '512MiB' or a number of bytes, not {value!r}")
        return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    raise TypeError(f"{name} must be a number of bytes or a string like '4GB', not {type(value).__name__}")


def resolve_memory_limit(value: int | float | str | None) -> int | None:
    """Each executor's memory limit in bytes, or None for none: from bytes
    (an int, or a string of digits), ``"4GB"``/``"512MiB"`` (powers of
    1024), or a fraction of this machine's memory (a float, or a string
    like ``"0.25"``)."""
    if value is None:
        return None
    text = value.strip() if isinstance(value, str) else None
    if text is not None and text.isdigit():
        value = int(text)
    elif text is not None and re.fullmatch(r"[0-9]*\.[0-9]+", text):
        value = float(text)
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise ValueError(
                f"memory_limit as a fraction of this machine's memory must be in (0, 1], not {value!r}"
            )
        n = int(value * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    else:
        n = parse_bytes(value, "memory_limit")
    if n < MIN_MEMORY_LIMIT:
        raise ValueError(
            f"memory_limit must be at least {MIN_MEMORY_LIMIT >> 20} MiB (an executor's interpreter "
            f"alone needs tens of MiB), not {value!r}"
        )
    return n
