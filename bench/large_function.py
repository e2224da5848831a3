"""A large function in an embedded pool: ``map(partial(pick, a), range(64))``
with ``a`` a 256 MiB NumPy array, on ``Pool(2)``.

Each round is a process of its own (a fresh pool, a fresh array): the time
to pickle the function, the first ``map`` (the executors get the function),
the same ``map`` again (they have it; the driver pickles and hashes the
``partial`` again, as for any call), and each executor's anonymous resident
memory after. Reported: medians and the spread over the rounds.

Run it with the bench's environment, which has NumPy:
``target/bench-venv/bin/python bench/large_function.py``; ``PYTHONPATH`` set
to another build's install directory measures that build (see
docs/performance.md, "Comparing two builds").
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

MIB = 1 << 20


def pick(a, i):
    return int(a[i * 4096])


def _children() -> list[int]:
    me, out = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        out.append(int(entry))
            except OSError:
                pass
    return out


def _anon_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one_round(size_mib: int) -> dict:
    import numpy

    import distripool
    from distripool import _functions

    a = numpy.arange(size_mib * MIB, dtype=numpy.uint8)
    with distripool.Pool(2) as pool:
        pool.map(int, range(4), chunksize=1)  # both executors up
        f = functools.partial(pick, a)
        t = time.perf_counter()
        _functions.dumps(f)
        dumps = time.perf_counter() - t
        t = time.perf_counter()
        first = pool.map(f, range(64))
        first_s = time.perf_counter() - t
        t = time.perf_counter()
        again = pool.map(f, range(64))
        again_s = time.perf_counter() - t
        assert first == again == [int(a[i * 4096]) for i in range(64)]
        anon = [_anon_mib(c) for c in _children()]
    return {"dumps": dumps, "first": first_s, "again": again_s, "anon": max(anon)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mib", type=int, default=256, help="the array's size")
    ap.add_argument("--round", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.round:
        print(json.dumps(one_round(args.mib)))
        return
    rounds = []
    for _ in range(args.rounds):
        out = subprocess.run(
            [sys.executable, __file__, "--round", "--mib", str(args.mib)],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
        rounds.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"\nmap(partial(pick, {args.mib} MiB array), range(64)) on an embedded Pool(2), {args.rounds} rounds\n"
    )
    print("| figure | median | spread |")
    print("|---|---:|---:|")
    for key, name, unit in [
        ("dumps", "pickling the function", "s"),
        ("first", "first map", "s"),
        ("again", "the same map again", "s"),
        ("anon", "an executor's anonymous memory, the larger", "MiB"),
    ]:
        xs = [r[key] for r in rounds]
        fmt = "{:.0f}" if unit == "MiB" else "{:.3f}"
        spread = f"{fmt.format(min(xs))}–{fmt.format(max(xs))}"
        print(f"| {name} | {fmt.format(statistics.median(xs))} {unit} | {spread} |")


if __name__ == "__main__":
    main()
