"""Which address workers dial: this host's address on the interface that
routes to them, never loopback for another host. The choice, and why, is
logged."""

from __future__ import annotations

import ipaddress
import logging
import socket
import subprocess
from collections.abc import Sequence

log = logging.getLogger("distripool.deploy")


def resolve_host(host: str) -> str | None:
    """An IP address of ``host``, or None when it does not resolve."""
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
    except (OSError, IndexError):
        return None


def route_source(ip: str) -> tuple[str, str]:
    """This host's address on the route to ``ip``, and the interface's name
    (empty when unknown). No packet is sent: a UDP socket is only connected."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((ip, 9))
        source = s.getsockname()[0]
    dev = ""
    try:
        out = subprocess.run(
            ["ip", "-o", "route", "get", ip], capture_output=True, text=True, timeout=5
        ).stdout
        words = out.split()
        if "dev" in words:
            dev = words[words.index("dev") + 1]
    except (OSError, subprocess.SubprocessError):
        pass
    return source, dev


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def _wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "[::]", "")


def choose_connect(listening: Sequence[str], toward: str, what: str) -> list[str]:
    """The addresses workers at ``toward`` (a host name or address; ``what``,
    like ``"host n1"``, names it in messages) dial to reach an orchestrator listening on
    ``listening``.

    Raises:
        ValueError: the orchestrator listens only on loopback and the workers
            are on another host, or ``toward`` does not resolve.
    """
    ip = resolve_host(toward)
    if ip is None:
        raise ValueError(
            f"cannot resolve {what} {toward!r} to choose the address its workers dial; pass connect="
        )
    local = _is_loopback(ip)
    source, dev = route_source(ip) if not local else ("127.0.0.1", "lo")
    if not local and _is_loopback(source):
        local = True  # an address of this very host
    out, why = [], ""
    for addr in listening:
        host, _, port = addr.rpartition(":")
        if _wildcard(host):
            out.append(f"{'127.0.0.1' if local else source}:{port}")
        elif _is_loopback(host) and not local:
            continue
        else:
            out.append(addr)
    if not out:
        raise ValueError(
            f"the orchestrator listens only on {', '.join(listening)}, which {what} ({ip}) cannot "
            "reach: make it on all interfaces (addresses='0.0.0.0:PORT', with a key), or pass connect="
        )
    named = what if ip in what else f"{what} ({ip})"
    if local:
        why = f"{named} is this host"
    else:
        on = f"interface {dev}" if dev else "the interface"
        why = f"this host's address on {on}, which routes to {named}"
    log.info("workers will dial %s: %s", ", ".join(out), why)
    return out


def check_connect(connect: str | Sequence[str]) -> list[str]:
    from .._config import normalize_addresses

    addrs = normalize_addresses(connect)
    for a in addrs:
        if a.rpartition(":")[2] == "0":
            raise ValueError(f"connect address {a!r} has port 0; give the port the orchestrator listens on")
    log.info("workers will dial %s (connect= given)", ", ".join(addrs))
    return addrs
