"""The driver side of ``bench/cluster.py``: runs on the driver's host, with
distripool or Dask, and runs each job the controller names on its stdin.

    python cluster_driver.py distripool ADDRESS KEY WORKERS
    python cluster_driver.py dask SCHEDULER WORKERS

It prints ``ready`` once every worker is in, then, for each line ``JOB``
read (``a``, ``a1``, ``b``, ``c``), ``result {json}`` with the wall time and
whether the result was exact. The task functions live here, so the workers
import them from this file (the controller puts ``bench/`` on their path).
"""

from __future__ import annotations

import functools
import json
import sys
import time

import numpy

# (a) 20 000 tasks of 1 ms each.
SHORT_TASKS = 20_000
# (b) 200 tasks with a 16 MiB NumPy argument and a 16 MiB result.
LARGE_TASKS = 200
LARGE_MIB = 16
# (c) one 256 MiB array beside every task of a 64-item map.
SHARED_MIB = 256
SHARED_ITEMS = 64


def one_ms(x):
    time.sleep(0.001)
    return x


def flip(a):
    """A new array of the argument's size (each byte inverted)."""
    return numpy.invert(a)


def pick(big, i):
    """One byte of the shared array: the task reads it, sends back little."""
    return int(big[i * 4096])


def _run_chunk(fn, chunk):
    return [fn(x) for x in chunk]


class Distripool:
    def __init__(self, address, key, workers):
        from distripool import Orchestrator, Pool

        self.orch = Orchestrator((address,), authkey=key.encode())
        print("listening", self.orch.addresses[0], flush=True)
        if not self.orch.wait_for_workers(workers, timeout=300):
            raise SystemExit(f"only {self.orch.stats()} joined")
        self.pool = Pool(orchestrator=self.orch)

    def short(self, chunked):
        items = range(SHORT_TASKS)
        if chunked:
            return self.pool.map(one_ms, items)
        return self.pool.map(one_ms, items, chunksize=1)

    def large(self, arrays):
        return self.pool.map(flip, arrays, chunksize=1)

    def shared(self, big):
        return self.pool.map(functools.partial(pick, big), range(SHARED_ITEMS))

    def close(self):
        self.pool.close()
        self.pool.join()
        self.orch.close()


class Dask:
    def __init__(self, scheduler, workers):
        from distributed import Client

        self.client = Client(scheduler, timeout=120)
        self.client.wait_for_workers(workers, timeout=300)

    def short(self, chunked):
        items = list(range(SHORT_TASKS))
        if not chunked:
            return self.client.gather(self.client.map(one_ms, items, pure=False))
        # The chunks distripool's default map would cut, one task each.
        threads = sum(w["nthreads"] for w in self.client.scheduler_info()["workers"].values())
        size = -(-SHORT_TASKS // (threads * 4))
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        parts = self.client.gather(self.client.map(functools.partial(_run_chunk, one_ms), chunks, pure=False))
        return [y for p in parts for y in p]

    def large(self, arrays):
        return self.client.gather(self.client.map(flip, arrays, pure=False))

    def shared(self, big):
        [handle] = self.client.scatter([big], broadcast=True)
        futures = self.client.map(pick, [handle] * SHARED_ITEMS, range(SHARED_ITEMS), pure=False)
        return self.client.gather(futures)

    def close(self):
        self.client.close()


def run(system, job):
    if job in ("a", "a1"):
        chunked = job == "a"
        t0 = time.perf_counter()
        out = system.short(chunked)
        wall = time.perf_counter() - t0
        return {"wall": wall, "exact": out == list(range(SHORT_TASKS))}
    if job == "b":
        # Distinct arrays: nothing can be sent once for several tasks.
        arrays = [numpy.full(LARGE_MIB << 20, i % 251, dtype=numpy.uint8) for i in range(LARGE_TASKS)]
        t0 = time.perf_counter()
        out = system.large(arrays)
        wall = time.perf_counter() - t0
        exact = len(out) == LARGE_TASKS and all(
            o.shape == a.shape and bool((o == 255 - (i % 251)).all())
            for i, (o, a) in enumerate(zip(out, arrays))
        )
        del arrays, out
        return {"wall": wall, "exact": exact, "bytes_each_way": LARGE_TASKS * (LARGE_MIB << 20)}
    if job == "c":
        big = (numpy.arange(SHARED_MIB << 20, dtype=numpy.uint64) % 251).astype(numpy.uint8)
        t0 = time.perf_counter()
        out = system.shared(big)
        wall = time.perf_counter() - t0
        exact = out == [int(big[i * 4096]) for i in range(SHARED_ITEMS)]
        return {"wall": wall, "exact": exact, "object_bytes": big.nbytes}
    raise SystemExit(f"unknown job {job!r}")


def main():
    kind = sys.argv[1]
    if kind == "distripool":
        system = Distripool(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        system = Dask(sys.argv[2], int(sys.argv[3]))
    print("ready", flush=True)
    try:
        for line in sys.stdin:
            job = line.strip()
            if not job:
                continue
            print("result", json.dumps(run(system, job)), flush=True)
    finally:
        system.close()


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    # Run the importable copy, so that the functions pickle by reference to
    # a module the workers import too.
    import cluster_driver

    cluster_driver.main()
