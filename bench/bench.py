"""distripool against the pools a Python user would otherwise pick, in one run.

Peers measured beside each other on the same machine, each figure the median
of ROUNDS rounds:

- ``multiprocessing``: ``multiprocessing.Pool`` (fork), the reference for ratios;
- ``ProcessPoolExecutor``: ``concurrent.futures`` (fork);
- ``distripool``: the embedded default, ``Pool(processes)``;
- ``distripool remote``: a worker agent in another process, over TCP on
  loopback, authenticated and encrypted, with the same number of executors;
- ``remote, clear``: the same with encryption turned off on both sides
  (still authenticated), to show what sealing every byte costs.

Usage::

    python bench/bench.py [--processes N] [--rounds R] [--quick]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import distripool


def tiny(x):
    return x + 1


def identity(x):
    return x


class ExecutorAsPool:
    """The few Pool methods the bench uses, on a ProcessPoolExecutor."""

    def __init__(self, processes):
        self.ex = cf.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"))
        self.processes = processes

    def map(self, fn, data, chunksize=None):
        if chunksize is None:  # multiprocessing's default rule, for a fair comparison
            chunksize, extra = divmod(len(data), self.processes * 4)
            chunksize += bool(extra)
        return list(self.ex.map(fn, data, chunksize=max(1, chunksize)))

    def apply(self, fn, args):
        return self.ex.submit(fn, *args).result()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.ex.shutdown(wait=True)


class RemoteWorker:
    """An orchestrator in this process and one worker agent in another."""

    def __init__(self, processes, encrypt=True):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        key = os.urandom(16).hex()
        self.dir = tempfile.TemporaryDirectory()
        key_file = os.path.join(self.dir.name, "key")
        with open(os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(key)
        self.orch = distripool.Orchestrator(f"127.0.0.1:{port}", authkey=key, encrypt=encrypt)
        here = os.path.dirname(os.path.abspath(__file__))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distripool",
                "worker",
                "--processes",
                str(processes),
                "--connect",
                self.orch.addresses[0],
                "--authkey-file",
                key_file,
                *([] if encrypt else ["--no-encrypt"]),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not self.orch.wait_for_workers(1, timeout=60):
            raise RuntimeError("the bench's worker did not connect")

    def pool(self, processes):
        return distripool.Pool(orchestrator=self.orch)

    def close(self):
        self.orch.close()
        self.proc.terminate()
        self.proc.wait(30)
        self.dir.cleanup()


def startup(make, processes):
    t0 = time.perf_counter()
    with make(processes) as pool:
        pool.apply(tiny, (1,))
    return time.perf_counter() - t0


def measure(pool, name, n_items, payload_mib):
    """Seconds one round of figure ``name`` takes on ``pool``."""
    if name in ("map_default", "map_chunk1"):
        data = range(n_items[name])
        chunksize = None if name == "map_default" else 1
        t0 = time.perf_counter()
        out = pool.map(tiny, data, chunksize)
        dt = time.perf_counter() - t0
        assert len(out) == len(data) and out[-1] == len(data)
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

    remote = RemoteWorker(args.processes)
    clear = RemoteWorker(args.processes, encrypt=False)
    peers = {
        "multiprocessing": lambda n: multiprocessing.get_context("fork").Pool(n),
        "ProcessPoolExecutor": ExecutorAsPool,
        "distripool": lambda n: distripool.Pool(n),
        "distripool remote": remote.pool,
        "remote, clear": clear.pool,
    }
    figures = ["map_default", "map_chunk1", "apply_latency", "payload"]
    results: dict[str, dict[str, float]] = {p: {} for p in peers}
    try:
        for peer, make in peers.items():
            if "remote" not in peer:  # its start-up is the worker's, measured apart
                results[peer]["startup"] = statistics.median(
                    startup(make, args.processes) for _ in range(args.rounds)
                )
        for peer, make in peers.items():
            with make(args.processes) as pool:
                pool.map(tiny, range(1000))  # warm up
                for name in figures:
                    results[peer][name] = statistics.median(
                        measure(pool, name, n_items, payload_mib) for _ in range(args.rounds)
                    )
    finally:
        remote.close()
        clear.close()

    rows = [
        ("start-up + first task", "startup", lambda s: f"{s * 1e3:.0f} ms"),
        (
            f"map tiny fn, {n_items['map_default']:,} items",
            "map_default",
            lambda s: f"{n_items['map_default'] / s / 1e6:.2f} M/s",
        ),
        (
            f"map chunksize=1, {n_items['map_chunk1']:,} items",
            "map_chunk1",
            lambda s: f"{n_items['map_chunk1'] / s / 1e3:.1f} k/s",
        ),
        ("sequential apply round trip", "apply_latency", lambda s: f"{s * 1e6:.0f} µs"),
        (f"{payload_mib} MiB argument round trip", "payload", lambda s: f"{payload_mib / s:.0f} MiB/s"),
    ]
    print(
        f"\ndistripool {distripool.__version__}, {args.processes} processes each, median of {args.rounds}, "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}\n"
    )
    names = list(peers)
    print("| figure | " + " | ".join(names) + " | distripool ÷ mp | remote ÷ mp | sealed ÷ clear |")
    print("|---|" + "---:|" * (len(names) + 3))
    for label, key, fmt in rows:
        cells = [fmt(results[p][key]) if key in results[p] else "—" for p in names]
        mp = results["multiprocessing"][key]
        # ratio > 1: distripool is better (faster or more per second)
        local = f"{mp / results['distripool'][key]:.2f}×"
        far = f"{mp / results['distripool remote'][key]:.2f}×" if key in results["distripool remote"] else "—"
        sealing = (
            f"{results['remote, clear'][key] / results['distripool remote'][key]:.2f}×"
            if key in results["remote, clear"]
            else "—"
        )
        print(f"| {label} | " + " | ".join(cells) + f" | {local} | {far} | {sealing} |")
    print("\nratios: how many times better distripool is than multiprocessing (above 1) or worse (below 1);")
    print("sealed ÷ clear: the remote worker with encryption on, relative to off (1.00× = free).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
