"""The examples of the original design document, run as written.

They use the fixed ports 1337 and 1338 of the original, with the worker
started by ``make_worker`` in a process of its own on 127.0.0.1.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

SEED = Path(__file__).resolve().parent / "seed"


@pytest.fixture
def seed_worker(tmp_path):
    log = open(tmp_path / "worker.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, str(SEED / "worker.py")],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    yield proc
    proc.terminate()
    proc.wait(10)
    log.close()


def run(script: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, str(SEED / script)],
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_original_examples_with_a_make_worker_worker(seed_worker):
    lines = run("orchestrator.py")
    squares = str([x * x for x in range(20)])
    assert lines[0] == squares
    assert lines[1] == str([math.log(x, 2) for x in [1, 2, 3]])
    assert lines[2] == squares
    assert lines[3] == str([2 * i + 1 for i in range(20)])
    assert seed_worker.poll() is None, "the worker keeps running after the driver leaves"


def test_original_multiple_orchestrators_example(seed_worker):
    assert run("multiple.py") == ["[1, 2, 3]", "closed"]
