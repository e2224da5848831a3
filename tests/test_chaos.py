"""Chaos: a 10 000-task map while executors and whole worker agents are
SIGKILLed at random and replaced. The result must equal the serial one."""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time

from conftest import TESTS, Worker
from distripool import Orchestrator, Pool
from workloads import spin_then_scale as work


def children_of(pid: int) -> list[int]:
    """Child processes of ``pid``, whichever of its threads started them."""
    out = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return out


def test_map_survives_random_kills_of_executors_and_agents(tmp_path):
    key = os.urandom(16).hex().encode()
    key_file = tmp_path / "key"
    key_file.write_bytes(key)
    key_file.chmod(0o600)
    orch = Orchestrator("127.0.0.1:0", authkey=key, max_crashes=5)
    env = dict(os.environ, DISTRIPOOL_LOG="warn")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    argv = [sys.executable, "-m", "distripool", "worker", "--processes", "2"]
    argv += ["--connect", orch.addresses[0], "--authkey-file", str(key_file)]
    workers: list[Worker] = []

    def start_agent():
        workers.append(Worker(argv, tmp_path / f"agent{len(workers)}.log", env))

    for _ in range(3):
        start_agent()
    kills = {"executor": 0, "agent": 0, "gave up": 0}
    done = threading.Event()
    rng = random.Random(1234)

    def killer():
        while not done.is_set():
            time.sleep(rng.uniform(0.03, 0.1))  # pacing, not synchronisation
            live = [w for w in workers if w.proc.poll() is None]
            # An agent whose executors are killed five times in a row before
            # they start gives up, by design: an operator would start another.
            if len(live) < 3 and kills["gave up"] < 6:
                kills["gave up"] += 1
                start_agent()
            if not live:
                continue
            if rng.random() < 0.15 and kills["agent"] < 4:
                victim = rng.choice(live)
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait(10)
                kills["agent"] += 1
                start_agent()
            else:
                pids = children_of(rng.choice(live).pid)
                if pids:
                    try:
                        os.kill(rng.choice(pids), signal.SIGKILL)
                        kills["executor"] += 1
                    except ProcessLookupError:
                        pass

    try:
        assert orch.wait_for_workers(3, timeout=60)
        with Pool(orchestrator=orch) as pool:
            assert pool.map(work, range(100)) == [work(x) for x in range(100)]  # warm
            chaos = threading.Thread(target=killer, daemon=True)
            chaos.start()
            try:
                result = pool.map(work, range(10_000), chunksize=5)
            finally:
                done.set()
                chaos.join(30)
        assert result == [work(x) for x in range(10_000)]
        assert kills["executor"] >= 5 and kills["agent"] >= 1, f"too little chaos to mean anything: {kills}"
        assert orch.stats()["crashes"] >= 1
    finally:
        orch.close()
        for w in workers:
            w.stop()
