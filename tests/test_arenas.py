"""Freed small-object arenas are kept for reuse (``_native.keep_arenas``): a
second batch of many small objects lands in the pages of the first instead
of mapping and faulting in fresh ones."""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = """
import json, resource, sys
from distripool import _native

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

if sys.argv[1] == "keep":
    _native.keep_arenas()
    _native.keep_arenas()  # a second call changes nothing
batch = [(i,) for i in range(200_000)]  # ~10 MiB of small objects
del batch
before = faults()
batch = [(i,) for i in range(200_000)]
again = faults() - before
assert batch[-1] == (199_999,)
print(json.dumps(again))
"""


def _faults_of_second_batch(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_second_batch_of_small_objects_reuses_the_arenas_of_the_first():
    kept = _faults_of_second_batch("keep")
    unmapped = _faults_of_second_batch("default")
    # ~10 MiB of arenas is ~2 500 pages to fault in again without; with them
    # kept, only the batch's list (1.6 MB, ~400 pages) is new.
    assert unmapped > 2000, unmapped
    assert kept < unmapped / 3, (kept, unmapped)
