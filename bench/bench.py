"""distripool's embedded default against multiprocessing.Pool, in one run.

Each figure is the median of ROUNDS rounds, with the peer measured right
beside it on the same machine. Usage::

    python bench/bench.py [--processes N] [--rounds R] [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time

import distripool


def tiny(x):
    return x + 1


def identity(x):
    return x


def startup(make, processes):
    t0 = time.perf_counter()
    with make(processes) as pool:
        pool.apply(tiny, (1,))
    return time.perf_counter() - t0


def measure(pool, name, n_items, payload_mib):
    """Return the seconds one round of figure ``name`` takes on ``pool``."""
    if name == "map_default":
        data = range(n_items["map_default"])
        t0 = time.perf_counter()
        out = pool.map(tiny, data)
        dt = time.perf_counter() - t0
        assert out[-1] == n_items["map_default"]
        return dt
    if name == "map_chunk1":
        data = range(n_items["map_chunk1"])
        t0 = time.perf_counter()
        out = pool.map(tiny, data, chunksize=1)
        dt = time.perf_counter() - t0
        assert len(out) == n_items["map_chunk1"]
        return dt
    if name == "apply_latency":
        n = n_items["apply_latency"]
        t0 = time.perf_counter()
        for i in range(n):
            pool.apply(tiny, (i,))
        return (time.perf_counter() - t0) / n
    if name == "payload":
        blob = os.urandom(payload_mib << 20)
        t0 = time.perf_counter()
        out = pool.apply(identity, (blob,))
        dt = time.perf_counter() - t0
        assert len(out) == len(blob)
        return dt
    raise ValueError(name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smaller inputs, for a smoke run")
    args = ap.parse_args()
    scale = 10 if args.quick else 1
    n_items = {
        "map_default": 200_000 // scale,
        "map_chunk1": 20_000 // scale,
        "apply_latency": 2_000 // scale,
    }
    payload_mib = 64 // scale

    peers = {
        "multiprocessing": lambda n: multiprocessing.get_context("fork").Pool(n),
        "distripool": lambda n: distripool.Pool(n),
    }
    results: dict[str, dict[str, float]] = {p: {} for p in peers}
    for peer, make in peers.items():
        results[peer]["startup"] = statistics.median(
            startup(make, args.processes) for _ in range(args.rounds)
        )
    for peer, make in peers.items():
        with make(args.processes) as pool:
            pool.map(tiny, range(1000))  # warm up
            for name in ("map_default", "map_chunk1", "apply_latency", "payload"):
                results[peer][name] = statistics.median(
                    measure(pool, name, n_items, payload_mib) for _ in range(args.rounds)
                )

    rows = [
        ("start-up + first task", "startup", lambda s: f"{s * 1e3:.0f} ms"),
        (
            f"map tiny fn, {n_items['map_default']:,} items",
            "map_default",
            lambda s: f"{n_items['map_default'] / s / 1e6:.2f} M items/s",
        ),
        (
            f"map chunksize=1, {n_items['map_chunk1']:,} items",
            "map_chunk1",
            lambda s: f"{n_items['map_chunk1'] / s / 1e3:.1f} k tasks/s",
        ),
        ("sequential apply round trip", "apply_latency", lambda s: f"{s * 1e6:.0f} µs"),
        (f"{payload_mib} MiB argument round trip", "payload", lambda s: f"{payload_mib / s:.0f} MiB/s"),
    ]
    print(
        f"\ndistripool {distripool.__version__} vs multiprocessing.Pool (fork), "
        f"{args.processes} processes, median of {args.rounds}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}\n"
    )
    print(f"| {'figure':<34} | {'multiprocessing':>18} | {'distripool':>18} | {'ratio':>7} |")
    print(f"|{'-' * 36}|{'-' * 20}|{'-' * 20}|{'-' * 9}|")
    for label, key, fmt in rows:
        mp, dp = results["multiprocessing"][key], results["distripool"][key]
        # ratio > 1 means distripool is better
        ratio = mp / dp
        print(f"| {label:<34} | {fmt(mp):>18} | {fmt(dp):>18} | {ratio:>6.2f}x |")
    print("\nratio: how many times better distripool is (above 1) or worse (below 1).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
