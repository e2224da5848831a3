"""SSH hosts made of network namespaces: a driver's host and a few others,
each joined to it by a veth pair on private addresses that exist only
inside them, each running its own sshd (started here, stopped by PID) that
lets in one key made for the test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from conftest import TESTS


def missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables"), ("ssh", "openssh-client")):
        if shutil.which(tool) is None:
            return f"needs {package} ({tool})"
    if not os.path.exists("/usr/sbin/sshd"):
        return "needs openssh-server (sshd)"
    return None


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=30).stdout


class Hosts:
    """``driver``, the namespace the driver runs in; ``hosts``: name ->
    address of each SSH host (their sshd listens on port 22)."""

    def __init__(self, root: Path, count: int):
        self.root = root
        self.tag = uuid.uuid4().hex[:6]
        self.driver = f"dpD{self.tag}"
        self.net = int(self.tag[:2], 16) % 200 + 20
        self.names = [f"dpH{i}{self.tag}" for i in range(count)]
        self.hosts: dict[str, str] = {}
        self.sshd: list[subprocess.Popen] = []
        self.key = root / "id_ed25519"

    def address(self, i: int, side: int) -> str:
        return f"10.214.{self.net + i}.{side}"

    def unreachable(self) -> str:
        """An address on host 0's link that no host has."""
        return self.address(0, 99)

    def start(self) -> Hosts:
        r = self.root
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(r / "host_key"))
        (r / "authorized_keys").write_text((r / "id_ed25519.pub").read_text())
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        sh("ip", "netns", "add", self.driver)
        sh("ip", "-n", self.driver, "link", "set", "lo", "up")
        for i, ns in enumerate(self.names):
            sh("ip", "netns", "add", ns)
            d, h = f"vd{i}{self.tag}", f"vh{i}{self.tag}"
            sh("ip", "link", "add", d, "netns", self.driver, "type", "veth", "peer", "name", h, "netns", ns)
            sh("ip", "-n", self.driver, "addr", "add", f"{self.address(i, 1)}/24", "dev", d)
            sh("ip", "-n", ns, "addr", "add", f"{self.address(i, 2)}/24", "dev", h)
            sh("ip", "-n", self.driver, "link", "set", d, "up")
            sh("ip", "-n", ns, "link", "set", h, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            conf = r / f"sshd-{i}.conf"
            conf.write_text(
                "\n".join(
                    [
                        "Port 22",
                        "ListenAddress 0.0.0.0",
                        f"HostKey {r / 'host_key'}",
                        f"PidFile {r / f'sshd-{i}.pid'}",
                        f"AuthorizedKeysFile {r / 'authorized_keys'}",
                        "PermitRootLogin prohibit-password",
                        "PasswordAuthentication no",
                        "KbdInteractiveAuthentication no",
                        "UsePAM no",
                        "StrictModes no",
                        "",
                    ]
                )
            )
            with open(r / f"sshd-{i}.log", "wb") as log:
                self.sshd.append(
                    subprocess.Popen(
                        ["ip", "netns", "exec", ns, "/usr/sbin/sshd", "-D", "-e", "-f", str(conf)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
            self.hosts[ns] = self.address(i, 2)
        for i, addr in enumerate(self.hosts.values()):
            self.wait_for_sshd(i, addr)
        return self

    def wait_for_sshd(self, i: int, addr: str) -> None:
        import time

        deadline = time.monotonic() + 30
        while True:
            ok = subprocess.run(
                ["ip", "netns", "exec", self.driver, "ssh", *self.ssh_options(), addr, "true"],
                capture_output=True,
                timeout=30,
            )
            if ok.returncode == 0:
                return
            if self.sshd[i].poll() is not None or time.monotonic() > deadline:
                log = (self.root / f"sshd-{i}.log").read_text(errors="replace")
                raise RuntimeError(f"sshd on {addr} did not come up: {ok.stderr!r}\n{log}")
            time.sleep(0.1)  # sshd starting: nothing to wait on but its port

    def ssh_options(self) -> list[str]:
        return [
            "-i",
            str(self.key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "LogLevel=ERROR",
        ]

    def block_outgoing(self, i: int) -> None:
        """Host ``i`` can be reached (its sshd answers), but cannot open
        connections: its workers cannot reach the orchestrator."""
        sh(
            "ip",
            "netns",
            "exec",
            self.names[i],
            "iptables",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "--syn",
            "-j",
            "DROP",
        )

    def run_driver(self, code: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
        return subprocess.run(
            ["ip", "netns", "exec", self.driver, sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )

    def stop(self) -> None:
        for p in self.sshd:
            if p.poll() is None:
                p.terminate()
        for p in self.sshd:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        for ns in [self.driver, *self.names]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
