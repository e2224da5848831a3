"""Attacks on the wire and at the door.

A man in the middle who flips a bit, replays a record or injects one makes the
connection close (every byte after the handshake travels in sealed records),
the tasks it carried are rescheduled, and the map still completes correctly. A flood of
idle unauthenticated sockets and a client sending one byte a second do not
keep a real worker out.
"""

from __future__ import annotations

import os
import socket
import struct
import threading

import pytest

from conftest import wait_until
from distripool import Orchestrator, Pool
from distripool._native import PROTOCOL_VERSION


def square(x):
    return x * x


class Proxy:
    """A TCP relay that tampers with the first connection it carries.

    Handshake frames and the sealed records after them are all `len: u32 LE`
    + body. ``attack`` is applied once, to the ``nth`` record after the
    handshake in the chosen direction; later connections are relayed untouched.
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
    orch = Orchestrator("127.0.0.1:0", authkey=key)
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
    orch = Orchestrator("127.0.0.1:0", authkey=key)
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
    orch = Orchestrator("127.0.0.1:0", authkey=key)
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
    orch = Orchestrator("127.0.0.1:0", authkey=key)
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


# -- raw handshakes: the wire format spoken by hand ------------------------------

HELLO, CHALLENGE, REJECT = 0, 1, 4
# RejectReason variants
VERSION, ROLE, AUTH, MALFORMED, CLUSTER, SEALING = range(6)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def frame(header: bytes) -> bytes:
    return struct.pack("<II", 4 + len(header), len(header)) + header


def hello(version=PROTOCOL_VERSION, role=0, magic=b"DSTRPOOL", cluster=b"default", sealed=True) -> bytes:
    body = magic + varint(version) + varint(role) + varint(len(cluster)) + cluster + bytes([sealed])
    return frame(bytes([HELLO]) + body + os.urandom(32))


def read_frame_header(sock) -> bytes | None:
    head = sock.recv(4, socket.MSG_WAITALL)
    if len(head) < 4:
        return None
    body = sock.recv(struct.unpack("<I", head)[0], socket.MSG_WAITALL)
    hlen = struct.unpack("<I", body[:4])[0]
    return body[4 : 4 + hlen]


@pytest.mark.parametrize(
    "message, reply",
    [
        (hello(version=99), bytes([REJECT, VERSION]) + varint(PROTOCOL_VERSION)),
        (hello(role=1), bytes([REJECT, ROLE])),  # only agents connect here
        (hello(magic=b"GET / HT"), bytes([REJECT, MALFORMED])),
        (hello(cluster=b"another"), bytes([REJECT, CLUSTER])),
        (hello(sealed=False), bytes([REJECT, SEALING, 1])),  # orchestrator_seals: true
    ],
    ids=["wrong-version", "wrong-role", "not-distripool", "wrong-cluster", "sealing-off"],
)
def test_orchestrator_refuses_wrong_version_role_or_protocol(message, reply):
    orch = Orchestrator("127.0.0.1:0", authkey=b"k")
    host, port = orch.addresses[0].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(message)
            assert read_frame_header(s) == reply
            assert s.recv(1) == b"", "the connection is closed after the refusal"
        wait_until(lambda: orch.stats()["handshake_failures"] >= 1, 30, "the refusal to be counted")
        assert orch.workers == 0
    finally:
        orch.close()


class FakeOrchestrator:
    """Accepts one worker and answers its Hello with ``answer``."""

    def __init__(self, answer: bytes):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.replies: list[bytes] = []
        self.answer = answer
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            if read_frame_header(conn) is None:
                return
            conn.sendall(self.answer)
            conn.settimeout(5)
            try:
                header = read_frame_header(conn)
                if header is not None:
                    self.replies.append(header)
            except OSError:
                pass

    def close(self):
        self.listener.close()


@pytest.mark.parametrize(
    "answer, logged",
    [
        (
            frame(bytes([CHALLENGE]) + varint(99) + os.urandom(64)),
            f"protocol version mismatch: we speak {PROTOCOL_VERSION}, the peer speaks 99",
        ),
        (
            frame(bytes([REJECT, 0]) + varint(99)),
            f"protocol version mismatch: we speak {PROTOCOL_VERSION}, the peer speaks 99",
        ),
        (struct.pack("<I", 40) + os.urandom(40), "not available"),
        (hello(), "the peer speaks as Agent, but only an Orchestrator is accepted here"),
    ],
    ids=["wrong-version", "refused", "garbage", "wrong-role"],
)
def test_worker_refuses_a_wrong_orchestrator_and_keeps_trying(spawn_worker, answer, logged):
    fake = FakeOrchestrator(answer)
    try:
        worker = spawn_worker(fake.address, key=b"k", processes=1)
        wait_until(lambda: logged in worker.log(), 60, f"the worker to log {logged!r}")
        # Whatever the worker said back, it was never a Proof (variant 2):
        # nothing derived from its key reaches an orchestrator that did not prove its own.
        assert all(h[:1] != bytes([2]) for h in fake.replies), fake.replies
        wait_until(lambda: worker.log().count(fake.address) >= 2, 60, "the worker to try again")
        assert worker.proc.poll() is None, "the worker keeps running"
    finally:
        fake.close()


def test_key_files_readable_by_others_are_refused(tmp_path, monkeypatch):
    import subprocess
    import sys

    from distripool import make_orchestrator

    key_file = tmp_path / "cluster.key"
    key_file.write_text("secret\n")
    key_file.chmod(0o644)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "distripool",
            "worker",
            "--connect",
            "127.0.0.1:1",
            "--authkey-file",
            str(key_file),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "accessible by other users" in out.stderr and "chmod 600" in out.stderr
    monkeypatch.delenv("DISTRIPOOL_AUTHKEY", raising=False)
    monkeypatch.setenv("DISTRIPOOL_AUTHKEY_FILE", str(key_file))
    with pytest.raises(PermissionError, match="chmod 600"):
        make_orchestrator("127.0.0.1:0")
    key_file.chmod(0o600)
    make_orchestrator("127.0.0.1:0").close()


def test_keygen_writes_a_private_random_key(tmp_path):
    import stat
    import subprocess
    import sys

    path = tmp_path / "k"
    out = subprocess.run(
        [sys.executable, "-m", "distripool", "keygen", str(path)], capture_output=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_text().strip()
    assert len(key) == 64 and int(key, 16) >= 0
    again = subprocess.run(
        [sys.executable, "-m", "distripool", "keygen", str(path)], capture_output=True, timeout=60
    )
    assert again.returncode == 2, "an existing key file is never overwritten"


def test_the_command_says_its_version_and_protocol():
    import subprocess
    import sys

    import distripool

    out = subprocess.run(
        [sys.executable, "-m", "distripool", "--version"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert (
        out.stdout.strip()
        == f"distripool {distripool.__version__} (wire protocol {distripool._native.PROTOCOL_VERSION})"
    )


def test_a_worker_of_another_cluster_is_refused_before_any_key_is_used(spawn_worker):
    key = os.urandom(16).hex().encode()
    orch = Orchestrator("127.0.0.1:0", authkey=key, cluster="blue")
    try:
        worker = spawn_worker(orch.addresses[0], key=key, processes=1, extra=["--cluster", "green"])
        wait_until(lambda: "serves another cluster" in worker.log(), 60, "the worker to log the refusal")
        assert "green" in worker.log()
        wait_until(lambda: orch.stats()["handshake_failures"] >= 1, 30, "the refusal to be counted")
        assert orch.stats()["auth_failures"] == 0 and orch.workers == 0
        assert worker.proc.poll() is None, "the worker keeps running"
        spawn_worker(orch.addresses[0], key=key, processes=1, extra=["--cluster", "blue"])
        assert orch.wait_for_workers(1, timeout=60)
        with Pool(orchestrator=orch) as pool:
            assert pool.map(square, range(10)) == [x * x for x in range(10)]
    finally:
        orch.close()


def test_encryption_off_needs_both_sides_and_then_works(spawn_worker):
    key = os.urandom(16).hex().encode()
    orch = Orchestrator("127.0.0.1:0", authkey=key, encrypt=False)
    try:
        sealed = spawn_worker(orch.addresses[0], key=key, processes=1)
        wait_until(lambda: "encryption settings differ" in sealed.log(), 60, "the worker to log the mismatch")
        assert orch.workers == 0
        sealed.stop()
        spawn_worker(orch.addresses[0], key=key, processes=2, extra=["--no-encrypt"])
        assert orch.wait_for_workers(1, timeout=60)
        with Pool(orchestrator=orch) as pool:
            assert pool.map(square, range(500), chunksize=3) == [x * x for x in range(500)]
    finally:
        orch.close()
