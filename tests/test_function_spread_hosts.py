"""A large function across hosts: a driver host and three worker hosts
(network namespaces, links emulated by ``netlab``). The driver's link
carries the function once and every worker's link about once each way;
where workers refuse connections from one another, the driver sends the
function to each, and the result is the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from conftest import TESTS, emulated_hosts_missing

_MISSING = emulated_hosts_missing("iptables")

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(_MISSING is not None and not os.environ.get("CI"), reason=str(_MISSING)),
    pytest.mark.timeout(240),
]

if _MISSING is None:
    from netlab import Lab

WORKERS = ("w1", "w2", "w3")
SIZE = 16 << 20

DRIVER = r"""
import functools, json, sys, zlib
from distripool import Orchestrator, Pool
from workloads import crc_plus

address, key, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
orch = Orchestrator((address,), authkey=key.encode())
print("listening", flush=True)
assert orch.wait_for_workers(3, timeout=120), "workers did not join"
print("joined", flush=True)
sys.stdin.readline()  # the test's "go", once it has read the links' counters
data = bytes(range(256)) * (size // 256)
with Pool(orchestrator=orch) as pool:
    # Two tasks for each worker from the start: every worker needs it.
    out = pool.map(functools.partial(crc_plus, data), range(30), chunksize=1)
exact = out == [zlib.crc32(data) + x for x in range(30)]
busy = sum(w["tasks_done"] > 0 for w in orch.workers_info())
print("result", json.dumps({"exact": exact, "busy": busy, "stats": orch.stats()}), flush=True)
sys.stdin.readline()
orch.close()
"""


@pytest.fixture
def lab():
    if _MISSING is not None:
        pytest.fail(f"cross-host tests {_MISSING}; CI is set, so this is a failure, not a skip")
    with Lab(["driver", *WORKERS], net=int(uuid.uuid4().hex[:2], 16) % 200 + 20) as lab:
        yield lab


def _run(lab, tmp_path) -> tuple[dict, dict, str]:
    """The map of a large partial across the lab; ``(what the driver said,
    bytes each host's link sent and received meanwhile, the driver's log)``."""
    key = uuid.uuid4().hex
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    env.pop("DISTRIPOOL_AUTHKEY", None)
    env["DISTRIPOOL_LOG"] = "info"
    address = f"{lab.hosts['driver'].address}:7412"
    log = tmp_path / "driver.log"
    with open(log, "w") as stderr:
        driver = lab.run(
            "driver",
            [sys.executable, "-c", DRIVER, address, key, str(SIZE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )

    def expect(word: str) -> str:
        while True:
            line = driver.stdout.readline()
            if not line:
                raise AssertionError(f"the driver ended before {word!r}; its log: {log.read_text()[-4000:]}")
            if line.startswith(word):
                return line

    expect("listening")
    key_file = tmp_path / "key"
    key_file.write_text(key)
    key_file.chmod(0o600)
    for host in WORKERS:
        argv = [sys.executable, "-m", "distripool", "worker", "--processes", "1"]
        argv += ["--connect", address, "--authkey-file", str(key_file)]
        lab.run(host, argv, log=tmp_path / f"{host}.log", env=env)
    expect("joined")
    before = {h: (lab.hosts[h].sent, lab.hosts[h].received) for h in lab.hosts}
    driver.stdin.write("go\n")
    driver.stdin.flush()
    out = json.loads(expect("result").split(" ", 1)[1])
    moved = {h: (lab.hosts[h].sent - before[h][0], lab.hosts[h].received - before[h][1]) for h in lab.hosts}
    driver.stdin.write("end\n")
    driver.stdin.flush()
    assert driver.wait(60) == 0, log.read_text()[-4000:]
    return out, moved, log.read_text()


def test_the_drivers_link_carries_a_large_function_once(lab, tmp_path):
    out, moved, log = _run(lab, tmp_path)
    assert out["exact"] and out["busy"] == 3, out
    assert out["stats"]["functions_fetched"] == 2, log[-4000:]
    per = {h: (sent / SIZE, received / SIZE) for h, (sent, received) in moved.items()}
    assert 1.0 < per["driver"][0] < 1.3, per
    for h in WORKERS:
        assert 1.0 < per[h][1] < 1.3, per  # each received it once
        assert per[h][0] < 1.3, per  # and passed it on at most once
    print("\nlinks, ÷ the function (sent, received):", {h: f"{s:.2f}, {r:.2f}" for h, (s, r) in per.items()})


def test_workers_that_cannot_reach_one_another_get_it_from_the_driver(lab, tmp_path):
    # Every worker host refuses connections made to it (a firewall): each
    # fetch fails, is reported, and the driver sends the function itself.
    for host in WORKERS:
        reject = [
            "iptables",
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--syn",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ]
        subprocess.run(lab.argv(host, reject), check=True, capture_output=True, timeout=30)
    out, moved, log = _run(lab, tmp_path)
    assert out["exact"] and out["busy"] == 3, out
    assert out["stats"]["functions_fetched"] == 0
    assert 2.9 < moved["driver"][0] / SIZE < 3.3, moved
    assert all(moved[h][0] / SIZE < 0.3 for h in WORKERS), f"a worker passed it on: {moved}"
    assert log.count("sending the function itself") == 2, log[-3000:]
