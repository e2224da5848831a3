"""Orchestrator and worker on two hosts: network namespaces joined by a veth pair.

The addresses exist only inside the two namespaces this test creates; both
namespaces (and with them the veth pair) are removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pytest

from conftest import SILENCE, TESTS

_MISSING = (
    "needs root" if os.geteuid() != 0 else "needs iproute2 (ip)" if shutil.which("ip") is None else None
)

pytestmark = [
    pytest.mark.netns,
    # Under CI (which installs everything) a missing component fails the test
    # (see `require_namespaces`); elsewhere it is skipped.
    pytest.mark.skipif(_MISSING is not None and not os.environ.get("CI"), reason=str(_MISSING)),
]


@pytest.fixture(autouse=True)
def require_namespaces():
    if _MISSING is not None:
        pytest.fail(f"network-namespace tests {_MISSING}; CI is set, so this is a failure, not a skip")


DRIVER = r"""
import os, sys
from distripool import Pool, make_orchestrator

def where(x):
    return x * x, os.readlink("/proc/self/ns/net")

orch = make_orchestrator((sys.argv[1],), authkey=sys.argv[2].encode())
assert orch.wait_for_workers(1, timeout=60), "no worker joined"
with Pool(orchestrator=orch) as pool:
    out = pool.map(where, range(100), chunksize=5)
peer = orch.workers_info()[0]["address"].rpartition(":")[0]
orch.close()
mine = os.readlink("/proc/self/ns/net")
assert [v for v, _ in out] == [x * x for x in range(100)], out
assert {ns for _, ns in out} != {mine}, "tasks ran in the driver's namespace"
print("ok", len(out), peer)
"""


def run_driver(ns: str, code: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """Run a driver script (``python -c code args``) on the host ``ns``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


@pytest.fixture
def two_hosts():
    tag = uuid.uuid4().hex[:6]
    a, b = f"dpA{tag}", f"dpB{tag}"
    octet = int(tag[:2], 16) % 250 + 1
    addr_a, addr_b = f"10.213.{octet}.1", f"10.213.{octet}.2"
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh(
            "ip",
            "link",
            "add",
            f"va{tag}",
            "netns",
            a,
            "type",
            "veth",
            "peer",
            "name",
            f"vb{tag}",
            "netns",
            b,
        )
        sh("ip", "-n", a, "addr", "add", f"{addr_a}/24", "dev", f"va{tag}")
        sh("ip", "-n", b, "addr", "add", f"{addr_b}/24", "dev", f"vb{tag}")
        for ns, dev in ((a, f"va{tag}"), (b, f"vb{tag}")):
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield (a, addr_a), (b, addr_b)
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def test_orchestrator_and_worker_on_two_hosts(two_hosts, spawn_worker, tmp_path):
    (ns_a, addr_a), (ns_b, addr_b) = two_hosts
    key = uuid.uuid4().hex
    address = f"{addr_a}:1337"
    worker = spawn_worker(address, key=key.encode(), processes=2, netns=ns_b)
    out = run_driver(ns_a, DRIVER, address, key, timeout=120)
    assert out.returncode == 0, f"driver: {out.stderr}\nworker: {worker.log()}"
    # The orchestrator saw the worker connect from the other host's address.
    assert out.stdout.strip() == f"ok 100 {addr_b}", out.stdout
    assert "connected to orchestrator" in worker.log()


PARTITION_DRIVER = r"""
import subprocess, sys, time
from distripool import Orchestrator, Pool
from workloads import spin_then_scale

address, key, ns_b, dev_b, mode = sys.argv[1:6]
orch = Orchestrator((address,), authkey=key.encode())
assert orch.wait_for_workers(2, timeout=60), "workers did not join"

def ip(*args):
    subprocess.run(args, check=True, capture_output=True, timeout=30)

def cut():
    if mode == "link":
        ip("ip", "-n", ns_b, "link", "set", dev_b, "down")
    else:
        for chain in ("INPUT", "OUTPUT"):
            ip("ip", "netns", "exec", ns_b, "iptables", "-I", chain, "-j", "DROP")

def heal():
    if mode == "link":
        ip("ip", "-n", ns_b, "link", "set", dev_b, "up")
    else:
        for chain in ("INPUT", "OUTPUT"):
            ip("ip", "netns", "exec", ns_b, "iptables", "-D", chain, "-j", "DROP")

def wait(pred, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)

def slow(x):
    import time
    time.sleep(0.02)
    return spin_then_scale(x)

with Pool(orchestrator=orch) as pool:
    result = pool.map_async(slow, range(3000), chunksize=1)
    wait(lambda: orch.stats()["tasks_done"] >= 100, "no progress before the partition")
    cut()
    t0 = time.monotonic()
    wait(lambda: orch.workers == 1, "the partitioned worker was never declared lost")
    detected = time.monotonic() - t0
    heal()
    t1 = time.monotonic()
    wait(lambda: orch.workers == 2, "the worker did not come back")
    rejoined = time.monotonic() - t1
    out = result.get(180)
orch.close()
assert out == [spin_then_scale(x) for x in range(3000)], "wrong result"
print(f"ok detected={detected:.1f}s rejoined={rejoined:.1f}s", flush=True)
"""


@pytest.mark.parametrize("mode", ["link", "firewall"])
def test_partitioned_worker_mid_map(two_hosts, spawn_worker, mode):
    if mode == "firewall" and shutil.which("iptables") is None:
        if os.environ.get("CI"):
            pytest.fail("iptables is not installed (.ci/run installs it)")
        pytest.skip("iptables is not installed (.ci/run installs it)")
    (ns_a, addr_a), (ns_b, _) = two_hosts
    dev_b = next(d for d in _links(ns_b) if d.startswith("vb"))
    key = uuid.uuid4().hex
    address = f"{addr_a}:1337"
    spawn_worker(address, key=key.encode(), processes=2, netns=ns_a)
    far = spawn_worker(address, key=key.encode(), processes=2, netns=ns_b)
    out = run_driver(ns_a, PARTITION_DRIVER, address, key, ns_b, dev_b, mode, timeout=240)
    assert out.returncode == 0, f"driver: {out.stderr}\nfar worker: {far.log()}"
    assert out.stdout.startswith("ok"), out.stdout
    print(mode, out.stdout.strip())
    log = far.log()
    assert log.count("connected to orchestrator") >= 2, f"the far worker never reconnected:\n{log}"


def _links(ns: str) -> list[str]:
    out = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True, check=True).stdout
    return [line.split(": ")[1].split("@")[0] for line in out.splitlines()]


SLOW_LINK_DRIVER = r"""
import sys, time
from distripool import Orchestrator, Pool

address, key = sys.argv[1:3]
orch = Orchestrator((address,), authkey=key.encode())
assert orch.wait_for_workers(1, timeout=60), "the worker did not join"
size = 8 << 20
with Pool(orchestrator=orch) as pool:
    t0 = time.monotonic()
    assert pool.apply(len, (b"x" * size,)) == size  # a big task over the slow link
    up = time.monotonic() - t0
    t0 = time.monotonic()
    assert len(pool.apply(bytes, (size,))) == size  # a big result back over it
    down = time.monotonic() - t0
stats = orch.stats()
orch.close()
print(f"ok up={up:.1f}s down={down:.1f}s lost={stats['workers_lost']} crashes={stats['crashes']}", flush=True)
"""


def test_a_large_payload_on_a_slow_link_is_not_a_lost_worker(two_hosts, spawn_worker):
    """Each 8 MiB transfer takes longer than the silence limit at 16 Mbit/s;
    bytes keep arriving, so neither side may declare the other gone."""
    (ns_a, addr_a), (ns_b, _) = two_hosts
    for ns, prefix in ((ns_a, "va"), (ns_b, "vb")):
        dev = next(d for d in _links(ns) if d.startswith(prefix))
        sh(
            "ip",
            "netns",
            "exec",
            ns,
            "tc",
            "qdisc",
            "add",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            "16mbit",
            "burst",
            "64kbit",
            "latency",
            "1s",
        )
    key = uuid.uuid4().hex
    address = f"{addr_a}:1337"
    far = spawn_worker(address, key=key.encode(), processes=1, netns=ns_b)
    out = run_driver(ns_a, SLOW_LINK_DRIVER, address, key, timeout=240)
    assert out.returncode == 0, f"driver: {out.stderr}\nworker: {far.log()}"
    print(out.stdout.strip())
    fields = dict(item.split("=") for item in out.stdout.split()[1:])
    assert fields["lost"] == "0" and fields["crashes"] == "0", out.stdout
    # The scenario only means something if each transfer outlasted the timeout.
    assert float(fields["up"].rstrip("s")) > SILENCE and float(fields["down"].rstrip("s")) > SILENCE, (
        out.stdout
    )
