"""A 10 000-task map across hosts whose links lose, delay, reorder and
duplicate frames, or are cut for a while, in one direction or both.

The hosts are network namespaces joined by links that ``netlab`` emulates in
this process (the kernel here has no ``sch_netem``): a driver host and two
worker hosts, each worker with two executors. In every case the result is
exact; while a link only drops packets, no worker is declared lost. Each
test prints the times it measured (run with ``-s`` to see them; they are in
docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

from conftest import TESTS, emulated_hosts_missing

_MISSING = emulated_hosts_missing()

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(_MISSING is not None and not os.environ.get("CI"), reason=str(_MISSING)),
    pytest.mark.timeout(300),
]

if _MISSING is None:
    from netlab import Lab, Link

# The driver: an orchestrator on its host's address, a 10 000-task map once
# both workers are in, progress lines while it runs, then what happened.
DRIVER = r"""
import json, sys, time
from distripool import Orchestrator, Pool

address, key, nap = sys.argv[1], sys.argv[2], float(sys.argv[3])
orch = Orchestrator((address,), authkey=key.encode())
print("listening", orch.addresses[0], flush=True)
assert orch.wait_for_workers(2, timeout=120), "workers did not join"
print("joined", flush=True)
sys.stdin.readline()  # the test's "go", once the link is set
def square(x):
    if nap:
        time.sleep(nap)
    return x * x

started = time.time()
with Pool(orchestrator=orch) as pool:
    result = pool.map_async(square, range(10000), chunksize=1)
    while not result.ready():
        print("done", orch.stats().get("tasks_done", 0), flush=True)
        result.wait(0.25)
    out = result.get()
ended = time.time()
print("result", json.dumps({
    "exact": out == [x * x for x in range(10000)],
    "started": started,
    "ended": ended,
    "stats": orch.stats(),
    "events": [e for e in orch.events() if e["kind"].startswith("worker")],
}), flush=True)
orch.close()
"""


class Run:
    """The driver on ``lab``'s host ``driver`` and a worker on each of
    ``w1`` and ``w2``, connected and waiting for ``go``."""

    def __init__(self, lab: Lab, tmp_path, nap: float = 0.0, timing: str | None = None):
        self.lab = lab
        key = uuid.uuid4().hex
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
        env.pop("DISTRIPOOL_AUTHKEY", None)
        # The times measured here are those of the defaults (1 s heartbeat,
        # 10 s silence limit), not the suite's short ones.
        env.pop("DISTRIPOOL_TIMING", None)
        if timing:
            env["DISTRIPOOL_TIMING"] = timing
        env["DISTRIPOOL_LOG"] = "info"
        address = f"{lab.hosts['driver'].address}:7411"
        self.log = tmp_path / "driver.log"
        self.driver = lab.run(
            "driver",
            [sys.executable, "-c", DRIVER, address, key, str(nap)],
            log=self.log,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._expect("listening")
        key_file = tmp_path / "key"
        key_file.write_text(key)
        key_file.chmod(0o600)
        self.workers = []
        for host in ("w1", "w2"):
            argv = [sys.executable, "-m", "distripool", "worker", "--processes", "2"]
            argv += ["--connect", address, "--authkey-file", str(key_file)]
            self.workers.append(lab.run(host, argv, log=tmp_path / f"{host}.log", env=env))
        self._expect("joined")
        self.done = 0

    def _expect(self, word: str) -> str:
        while True:
            line = self.driver.stdout.readline()
            if not line:
                raise AssertionError(f"the driver ended before {word!r}; its log: {self._log()}")
            if line.startswith(word):
                return line

    def _log(self) -> str:
        return self.log.read_text()[-4000:]

    def go(self) -> None:
        self.driver.stdin.write("go\n")
        self.driver.stdin.flush()

    def until_done(self, n: int) -> float:
        """Wait until the driver reports ``n`` tasks done; the time then."""
        while self.done < n:
            line = self._expect("done")
            self.done = int(line.split()[1])
        return time.time()

    def finish(self) -> dict:
        line = self._expect("result")
        out = json.loads(line.split(" ", 1)[1])
        assert self.driver.wait(60) == 0, self._log()
        assert out["exact"], "the map's result is not exact"
        return out


@pytest.fixture
def lab():
    if _MISSING is not None:
        pytest.fail(f"bad-link tests {_MISSING}; CI is set, so this is a failure, not a skip")
    with Lab(["driver", "w1", "w2"], net=int(uuid.uuid4().hex[:2], 16) % 200 + 20) as lab:
        yield lab


def _lost(out: dict) -> list:
    return [e for e in out["events"] if e["kind"] == "worker_lost"]


def _hosts(lab, events) -> set:
    """The worker hosts ``events`` name (a worker's name holds the address
    it connected from)."""
    return {h for h in ("w1", "w2") for e in events if f"({lab.hosts[h].address}:" in e["name"]}


@pytest.mark.parametrize(
    "link",
    [
        pytest.param(Link(loss=0.05) if _MISSING is None else None, id="loss-5%"),
        pytest.param(Link(delay=0.05, jitter=0.02) if _MISSING is None else None, id="50ms-jitter-20ms"),
        pytest.param(Link(duplicate=0.01) if _MISSING is None else None, id="duplicate-1%"),
    ],
)
def test_a_map_over_lossy_slow_or_duplicating_links_is_exact_and_loses_no_worker(lab, tmp_path, link):
    run = Run(lab, tmp_path)
    for host in ("w1", "w2"):
        lab.hosts[host].link = link
    run.go()
    out = run.finish()
    assert _lost(out) == [], f"a worker was declared lost on a link that only drops packets: {out['events']}"
    seconds = out["ended"] - out["started"]
    print(f"\n{link}: 10 000 tasks in {seconds:.1f} s, retried {out['stats']['tasks_retried']}")


def _partition(lab, tmp_path, cut_hosts: dict, seconds: float, what: str) -> list:
    """Mid-map, give ``cut_hosts`` (name -> Link) their links for
    ``seconds``, then heal them; the map is exact, the workers were lost
    and came back; prints the times."""
    run = Run(lab, tmp_path, nap=0.002)  # 10 000 tasks of 2 ms: about 6 s on 4 executors
    run.go()
    run.until_done(2000)
    cut = time.time()
    for host, link in cut_hosts.items():
        lab.hosts[host].link = link
    healed = threading.Timer(seconds, _heal, (lab,))
    healed.start()
    try:
        out = run.finish()
    finally:
        healed.cancel()
    heal_at = cut + seconds
    lost = _lost(out)
    assert lost, f"the workers heard nothing for {seconds} s, yet none was declared lost: {out['events']}"
    joined = [e for e in out["events"] if e["kind"] == "worker_joined" and e["time"] > heal_at]
    assert _hosts(lab, joined) == {"w1", "w2"}, out["events"]
    print(
        f"\n{what}: lost {min(e['time'] for e in lost) - cut:.1f}-{max(e['time'] for e in lost) - cut:.1f} s "
        f"after the cut, rejoined {max(e['time'] for e in joined) - heal_at:.1f} s after the heal, "
        f"map done {out['ended'] - heal_at:.1f} s after it, {sum(e['tasks'] for e in lost)} tasks put back"
    )
    return lost


def test_a_partition_is_detected_and_recovered_from(lab, tmp_path):
    both_ways = Link(drop_out=True, drop_in=True)
    lost = _partition(lab, tmp_path, {"w1": both_ways, "w2": both_ways}, 30, "30 s partition")
    assert _hosts(lab, lost) == {"w1", "w2"}


def test_a_one_way_partition_of_the_orchestrators_frames(lab, tmp_path):
    _partition(lab, tmp_path, {"driver": Link(drop_out=True)}, 20, "one-way partition (20 s)")


def _heal(lab) -> None:
    for host in lab.hosts.values():
        host.link = Link()
