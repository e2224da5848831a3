"""``distripool worker --memory-limit``: each executor in a cgroup of its own
with that limit. A task that allocates past it is killed by the kernel,
retried, and after ``max_crashes`` fails with a ``WorkerLostError`` that says
"out of memory"; the other tasks finish. Needs a writable cgroup memory
controller (v2, or v1's hierarchy): in CI this runs as root, and a machine
without one fails the test rather than skipping it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from conftest import wait_until
from distripool import Pool, WorkerLostError
from distripool._config import resolve_memory_limit
from workloads import square_or_hog

LIMIT_MIB = 192


def _cgroup_dir(worker) -> str:
    """The directory of executor cgroups the worker says it made."""
    found = []

    def said():
        found[:] = re.findall(r"in cgroups under (\S+)", worker.log())
        return bool(found)

    wait_until(said, 60, "the worker to say where its executors' cgroups are")
    return found[0]


def test_a_task_past_the_memory_limit_is_retried_then_fails_out_of_memory_and_the_rest_finish(
    keyed, spawn_worker
):
    orch, key = keyed
    worker = spawn_worker(orch.addresses[0], key=key, extra=["--memory-limit", f"{LIMIT_MIB}MiB"])
    assert orch.wait_for_workers(1, timeout=60), worker.log()
    groups = _cgroup_dir(worker)
    assert os.path.isdir(groups), worker.log()
    hog = partial(square_or_hog, 7, 4 * LIMIT_MIB)
    with Pool(orchestrator=orch) as pool:
        results = [pool.apply_async(hog, (x,)) for x in range(40)]
        with pytest.raises(WorkerLostError) as lost:
            results[7].get(timeout=100)
        others = [r.get(timeout=100) for i, r in enumerate(results) if i != 7]
    assert others == [x * x for x in range(40) if x != 7]
    message = str(lost.value)
    # Every attempt (max_crashes: 3) was killed by the kernel at the limit.
    assert message.count("ran out of memory") == 3, message
    assert f"limit of {LIMIT_MIB} MiB" in message, message
    assert "signal 9" not in message, message
    stats = orch.stats()
    # (A quick task's result the executor held back to send with the next
    # may go with it: that task is charged a crash too, and retried.)
    assert stats["crashes"] >= 3 and stats["tasks_failed"] == 1, stats
    # A normal task runs under the limit in a fresh executor afterwards.
    with Pool(orchestrator=orch) as pool:
        assert pool.apply(hog, (8,)) == 64
    worker.stop()
    assert not os.path.exists(groups), f"{groups} left behind:\n{worker.log()}"


def test_a_worker_on_a_machine_without_a_memory_cgroup_says_why_at_its_start(keyed):
    # In a mount namespace of its own with every cgroup hierarchy that could
    # hold the memory controller unmounted, the worker must refuse to start,
    # not run without the limit.
    orch, key = keyed
    mounts = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    hidden = [m[4] for m in mounts if m[m.index("-") + 1] in ("cgroup", "cgroup2")]
    assert hidden, "no cgroup hierarchy mounted: nothing to hide"
    hide = " && ".join(f"umount -l {path}" for path in reversed(hidden))
    worker = f"exec {sys.executable} -m distripool worker --connect {orch.addresses[0]}"
    worker += " --processes 1 --memory-limit 256MiB"
    env = dict(os.environ, DISTRIPOOL_AUTHKEY=key.decode(), DISTRIPOOL_LOG="warn")
    argv = ["unshare", "--mount", "sh", "-c", f"{hide} && {worker}"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "no cgroup memory controller for this process" in done.stderr, done.stderr
    assert orch.stats()["workers"] == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (256 << 20, 256 << 20),
        ("256MiB", 256 << 20),
        ("1.5G", 3 << 29),
        ("268435456", 256 << 20),
    ],
)
def test_memory_limits_read_as_bytes(value, expected):
    assert resolve_memory_limit(value) == expected


def test_a_fraction_is_of_the_machines_memory():
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert resolve_memory_limit("0.5") == int(0.5 * total)
    assert resolve_memory_limit(0.25) == int(0.25 * total)


@pytest.mark.parametrize(
    ("value", "error", "says"),
    [
        ("1MB", ValueError, "at least 64 MiB"),
        ("lots", ValueError, "must be like '4GB'"),
        (1.5, ValueError, "must be in (0, 1]"),
        ("0.0", ValueError, "must be in (0, 1]"),
        (True, TypeError, "not a bool"),
        ([1], TypeError, "not list"),
    ],
)
def test_bad_memory_limits_are_refused(value, error, says):
    with pytest.raises(error) as e:
        resolve_memory_limit(value)
    assert says in str(e.value)


def test_the_command_line_refuses_a_bad_memory_limit_before_connecting():
    argv = [sys.executable, "-m", "distripool", "worker", "--connect", "127.0.0.1:9", "--memory-limit", "1MB"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    assert "memory_limit must be at least 64 MiB" in done.stderr, done.stderr
