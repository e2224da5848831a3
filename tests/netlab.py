"""Hosts in network namespaces, joined by links this process emulates.

Each host is a network namespace with one TAP device, ``eth0``, on a private
address that exists only inside it. The other end of every TAP is this
process: a switch that learns which host has which MAC address and forwards
each frame through the sender's link and then the receiver's. A link has a
rate, a delay, jitter (which reorders, as netem's does), loss, duplication,
and can drop everything in either direction (a partition, or a one-way one).
Links change while traffic flows (``host.link = Link(...)``).

This kernel has no ``sch_netem`` (CONFIG_NET_SCH_NETEM is not set), so the
links are emulated here, in user space, rather than with ``tc netem``. With
a 65 000-byte MTU a link carries about 1 GB/s on this machine; benchmarks
measure a plain TCP stream through the same links beside the figures, and
state figures as fractions of it.

Needs root and iproute2. Use as a context manager::

    with Lab(["driver", "w1", "w2"]) as lab:
        lab.hosts["w1"].link = Link(loss=0.05)
        lab.run("w1", [sys.executable, "-m", "distripool", "worker", ...])
"""

from __future__ import annotations

import dataclasses
import fcntl
import heapq
import itertools
import os
import random
import select
import struct
import subprocess
import threading
import time
import uuid

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
MTU = 65000
BROADCAST = b"\xff" * 6


@dataclasses.dataclass(frozen=True)
class Link:
    """One host's link: applied to what it sends and to what it receives."""

    rate: float | None = None  # bits per second, each direction; None: unlimited
    delay: float = 0.0  # seconds, each way
    jitter: float = 0.0  # ± seconds, uniform, per frame (reorders)
    loss: float = 0.0  # probability a frame is lost, each way
    duplicate: float = 0.0  # probability a frame arrives twice
    drop_out: bool = False  # everything the host sends is lost
    drop_in: bool = False  # everything sent to the host is lost


class Host:
    def __init__(self, name: str, netns: str, address: str, fd: int):
        self.name = name
        self.netns = netns
        self.address = address
        self.fd = fd
        self.link = Link()
        # When each direction's wire is next free (rate limiting).
        self.out_free = 0.0
        self.in_free = 0.0
        self.sent = 0  # bytes of frames the host sent
        self.received = 0  # bytes of frames delivered to it

    def _through(self, now: float, size: int, outbound: bool, rng: random.Random) -> float | None:
        """When a frame of ``size`` bytes leaves this link, or None if lost."""
        link = self.link
        if (link.drop_out if outbound else link.drop_in) or (link.loss and rng.random() < link.loss):
            return None
        t = now
        if link.rate:
            start = max(now, self.out_free if outbound else self.in_free)
            t = start + size * 8 / link.rate
            if outbound:
                self.out_free = t
            else:
                self.in_free = t
        t += link.delay
        if link.jitter:
            t += rng.uniform(-link.jitter, link.jitter)
        return max(t, now)


class Lab:
    """Namespaces ``names`` (one host each, on 10.<net>.0.<i>/24), switched
    and shaped by a thread of this process until the lab is closed."""

    def __init__(self, names, net: int = 77, seed: int = 1):
        self.tag = uuid.uuid4().hex[:6]
        self.net = net
        self.rng = random.Random(seed)
        self.hosts: dict[str, Host] = {}
        self._names = list(names)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._macs: dict[bytes, Host] = {}
        self._queue: list = []
        self._seq = itertools.count()
        self._procs: list[subprocess.Popen] = []
        self._files: list = []

    # -- set-up ------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            for i, name in enumerate(self._names, start=1):
                self._add(name, i)
        except BaseException:
            self.close()
            raise
        self._thread = threading.Thread(target=self._switch, name="netlab", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _add(self, name: str, i: int) -> None:
        netns = f"dpl-{self.tag}-{name}"
        tap = f"dpl{self.tag}{i}"
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tap.encode(), IFF_TAP | IFF_NO_PI))
        except OSError:
            os.close(fd)
            raise
        host = Host(name, netns, f"10.{self.net}.0.{i}", fd)
        self.hosts[name] = host
        _ip("netns", "add", netns)
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("link", "set", tap, "netns", netns)
        _ip("-n", netns, "link", "set", tap, "name", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "mtu", str(MTU), "up")
        _ip("-n", netns, "addr", "add", f"{host.address}/24", "dev", "eth0")

    def close(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                pass
            for pipe in (p.stdin, p.stdout, p.stderr):
                if pipe is not None:
                    pipe.close()
        for f in self._files:
            f.close()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        for host in self.hosts.values():
            os.close(host.fd)
            subprocess.run(["ip", "netns", "del", host.netns], check=False, capture_output=True)
        self.hosts.clear()

    # -- processes ---------------------------------------------------------

    def argv(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.hosts[host].netns, *argv]

    def run(self, host: str, argv: list[str], log=None, **kwargs) -> subprocess.Popen:
        """Start ``argv`` in ``host``, its output to the file ``log`` if
        given; it is killed (and ``log`` closed) when the lab closes."""
        if log is not None:
            f = open(log, "w")  # noqa: SIM115 - closed with the lab
            self._files.append(f)
            kwargs.setdefault("stdout", f)
            kwargs.setdefault("stderr", f if kwargs["stdout"] is f else subprocess.STDOUT)
        p = subprocess.Popen(self.argv(host, argv), **kwargs)
        self._procs.append(p)
        return p

    # -- the switch --------------------------------------------------------

    def _switch(self) -> None:
        by_fd = {h.fd: h for h in self.hosts.values()}
        fds = list(by_fd)
        queue = self._queue
        while not self._stop.is_set():
            wait = 0.2
            if queue:
                wait = max(0.0, min(wait, queue[0][0] - time.monotonic()))
            try:
                ready, _, _ = select.select(fds, [], [], wait)
            except OSError:
                return
            for fd in ready:
                # Several frames per wake-up, but never one host for ever.
                for _ in range(64):
                    try:
                        frame = os.read(fd, MTU + 64)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        return  # the namespace is gone: the lab is closing
                    self._forward(by_fd[fd], frame)
            now = time.monotonic()
            while queue and queue[0][0] <= now:
                _, _, dest, frame = heapq.heappop(queue)
                try:
                    os.write(dest.fd, frame)
                    dest.received += len(frame)
                except OSError:
                    pass  # the host's device is down or gone: lost

    def _forward(self, src: Host, frame: bytes) -> None:
        if len(frame) < 14:
            return
        now = time.monotonic()
        src.sent += len(frame)
        self._macs[frame[6:12]] = src
        dest = self._macs.get(frame[:6])
        if frame[:6] == BROADCAST or dest is None or frame[0] & 1:
            dests = [h for h in self.hosts.values() if h is not src]
        elif dest is src:
            return
        else:
            dests = [dest]
        rng = self.rng
        left = src._through(now, len(frame), True, rng)
        if left is None:
            return
        copies = 2 if src.link.duplicate and rng.random() < src.link.duplicate else 1
        for dest in dests:
            for _ in range(copies):
                arrives = dest._through(left, len(frame), False, rng)
                if arrives is not None:
                    heapq.heappush(self._queue, (arrives, next(self._seq), dest, frame))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)
