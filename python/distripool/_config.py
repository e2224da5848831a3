"""Authentication keys and addresses."""

from __future__ import annotations

import os
import stat
import sys

DEFAULT_PORTS = (1337, 1338)


def read_key_file(path: str | os.PathLike) -> bytes:
    """Read a key file, refusing one that other users can read.

    Raises:
        PermissionError: the file is readable by group or others.
        ValueError: the file is empty.
    """
    st = os.stat(path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(
            f"key file {os.fspath(path)!r} is accessible by other users (mode "
            f"{stat.S_IMODE(st.st_mode):o}); restrict it with: chmod 600 {os.fspath(path)}"
        )
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


def executor_env() -> list[tuple[str, str]]:
    """Environment for executors: make the driver's import path theirs too, so
    functions defined in importable modules can be found by reference."""
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    if "" in sys.path or not sys.path or sys.path[0] == "":
        paths.insert(0, os.getcwd())
    extra = os.environ.get("PYTHONPATH")
    if extra:
        paths.append(extra)
    return [("PYTHONPATH", os.pathsep.join(dict.fromkeys(paths)))]
