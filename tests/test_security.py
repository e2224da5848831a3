"""Attacks on the wire and at the door.

A man in the middle who flips a bit, replays a frame or injects one makes the
connection close (every frame after the handshake is sealed), the tasks it
carried are rescheduled, and the map still completes correctly. A flood of
idle unauthenticated sockets and a client sending one byte a second do not
keep a real worker out.
"""

from __future__ import annotations

import os
import socket
import struct
import threading

import pytest

from conftest import free_port, wait_until
from distripool import Orchestrator, Pool


def square(x):
    return x * x


class Proxy:
    """A TCP relay that tampers with the first connection it carries.

    Frames are `len: u32 LE` + body in both directions, handshake included.
    ``attack`` is applied once, to the ``nth`` frame after the handshake in
    the chosen direction; later connections are relayed untouched.
    """

    HANDSHAKE_FRAMES = 2  # per direction: Hello, Proof / Challenge, Accept

    def __init__(self, target: tuple[str, int], attack: str, direction: str, nth: int = 6):
        self.target, self.attack, self.direction, self.nth = target, attack, direction, nth
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.attacked = threading.Event()
        self.connections = 0
        self.closed = False
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            tamper = self.connections == 0
            self.connections += 1
            for src, dst, way in ((client, upstream, "up"), (upstream, client, "down")):
                evil = tamper and way == self.direction
                threading.Thread(target=self._pump, args=(src, dst, evil), daemon=True).start()

    @staticmethod
    def _read_exact(sock, n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError
            buf += chunk
        return buf

    def _pump(self, src, dst, evil):
        seen = 0
        previous = None
        try:
            while True:
                head = self._read_exact(src, 4)
                body = self._read_exact(src, struct.unpack("<I", head)[0])
                frame = head + body
                seen += 1
                if evil and seen == self.HANDSHAKE_FRAMES + self.nth and not self.attacked.is_set():
                    self.attacked.set()
                    if self.attack == "flip":
                        i = 4 + len(body) // 2
                        frame = frame[:i] + bytes([frame[i] ^ 0x01]) + frame[i + 1 :]
                    elif self.attack == "replay":
                        dst.sendall(frame)
                        frame = previous  # the frame before it, once more
                    elif self.attack == "inject":
                        junk = os.urandom(64)
                        dst.sendall(struct.pack("<I", len(junk)) + junk)
                dst.sendall(frame)
                previous = head + body
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.closed = True
        self.listener.close()
        for s in self.sockets:
            s.close()


@pytest.mark.parametrize("attack", ["flip", "replay", "inject"])
@pytest.mark.parametrize("direction", ["up", "down"])
def test_tampering_closes_the_connection_and_the_map_still_completes(spawn_worker, attack, direction):
    key = os.urandom(16).hex().encode()
    orch = Orchestrator(f"127.0.0.1:{free_port()}", authkey=key)
    host, port = orch.addresses[0].rsplit(":", 1)
    proxy = Proxy((host, int(port)), attack, direction)
    try:
        spawn_worker(proxy.address, key=key, processes=2)
        assert orch.wait_for_workers(1, timeout=60)
        with Pool(orchestrator=orch) as pool:
            result = pool.map(square, range(2000), chunksize=1)
        assert result == [x * x for x in range(2000)]
        assert proxy.attacked.is_set(), "the attack never happened"
        wait_until(lambda: orch.stats()["workers_lost"] >= 1, 30, "the tampered connection to be dropped")
        assert proxy.connections >= 2, "the worker did not come back through a fresh connection"
    finally:
        orch.close()
        proxy.close()


def test_idle_and_slow_unauthenticated_sockets_do_not_keep_a_worker_out(spawn_worker):
    key = os.urandom(16).hex().encode()
    orch = Orchestrator(f"127.0.0.1:{free_port()}", authkey=key)
    host, port = orch.addresses[0].rsplit(":", 1)
    idle = []
    stop = threading.Event()

    def byte_a_second():
        s = socket.create_connection((host, int(port)))
        hello = struct.pack("<I", 60) + os.urandom(60)
        for b in hello:
            if stop.wait(1.0):
                break
            try:
                s.send(bytes([b]))
            except OSError:
                break
        s.close()

    slow = threading.Thread(target=byte_a_second, daemon=True)
    try:
        for _ in range(1000):
            idle.append(socket.create_connection((host, int(port))))
        slow.start()
        worker = spawn_worker(orch.addresses[0], key=key, processes=2)
        assert orch.wait_for_workers(1, timeout=60), worker.log()
        with Pool(orchestrator=orch) as pool:
            assert pool.map(square, range(100)) == [x * x for x in range(100)]
        assert orch.stats()["auth_failures"] == 0
    finally:
        stop.set()
        for s in idle:
            s.close()
        orch.close()


def test_an_oversized_length_prefix_is_refused_before_the_handshake(spawn_worker):
    key = os.urandom(16).hex().encode()
    orch = Orchestrator(f"127.0.0.1:{free_port()}", authkey=key)
    host, port = orch.addresses[0].rsplit(":", 1)
    try:
        s = socket.create_connection((host, int(port)))
        s.sendall(struct.pack("<I", 0xFFFF_FFF0))  # "4 GiB follow"
        s.settimeout(30)
        assert s.recv(1) == b"", "the orchestrator should hang up"
        s.close()
        wait_until(lambda: orch.stats()["handshake_failures"] >= 1, 30, "the refusal to be counted")
        # A real worker still gets in.
        spawn_worker(orch.addresses[0], key=key, processes=1)
        assert orch.wait_for_workers(1, timeout=60)
    finally:
        orch.close()


def test_traffic_after_the_handshake_is_not_readable(spawn_worker):
    """What a passive eavesdropper sees contains none of the task's data."""
    key = os.urandom(16).hex().encode()
    orch = Orchestrator(f"127.0.0.1:{free_port()}", authkey=key)
    host, port = orch.addresses[0].rsplit(":", 1)
    proxy = Recorder((host, int(port)))
    try:
        spawn_worker(proxy.address, key=key, processes=1)
        assert orch.wait_for_workers(1, timeout=60)
        secret = "the-secret-argument-" + os.urandom(8).hex()
        with Pool(orchestrator=orch) as pool:
            assert pool.apply(str.upper, (secret,)) == secret.upper()
        # The relay records each chunk before forwarding it, so everything that
        # made the result arrive is in the copy already.
        seen = proxy.seen()
        assert len(seen) > 300  # handshake, function, task, result and heartbeats
        assert secret.encode() not in seen and secret.upper().encode() not in seen
        assert b"upper" not in seen
    finally:
        orch.close()
        proxy.close()


class Recorder(Proxy):
    """A relay that keeps a copy of every byte in both directions."""

    def __init__(self, target):
        self.copy = bytearray()
        self.lock = threading.Lock()
        super().__init__(target, attack="none", direction="none")

    def _pump(self, src, dst, evil):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self.lock:
                    self.copy += data
                dst.sendall(data)
        except OSError:
            pass

    def seen(self) -> bytes:
        with self.lock:
            return bytes(self.copy)
