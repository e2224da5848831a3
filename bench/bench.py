"""distripool against the pools a Python user would otherwise pick, in one run.

Peers measured beside each other on the same machine, each figure the median
of ROUNDS rounds:

- ``multiprocessing``: ``multiprocessing.Pool`` (fork), the reference for ratios;
- ``ProcessPoolExecutor``: ``concurrent.futures`` (fork);
- ``loky``: ``loky.ProcessPoolExecutor``;
- ``Ray Pool``: ``ray.util.multiprocessing.Pool`` on a local Ray instance;
- ``Dask``: a ``distributed`` ``LocalCluster`` of worker processes, one thread each;
- ``distripool``: the embedded default, ``Pool(processes)``;
- ``distripool remote``: a worker agent in another process, over TCP on
  loopback, authenticated and encrypted, with the same number of executors;
- ``remote, clear``: the same with encryption turned off on both sides
  (still authenticated), to show what sealing every byte costs.

loky, Ray and Dask are not distripool's dependencies: ``make bench`` installs
them into the bench's own environment (``target/bench-venv``, from
``bench/requirements.txt``). Run elsewhere, peers that are not installed are
left out of the table. Each of the peers on this machine is measured in a
process of its own (this script again, with ``--peer``), so that none runs in
a process another one has left its threads, memory and imports in.

Usage::

    python bench/bench.py [--processes N] [--rounds R] [--quick]
                          [--only PEER]... [--json FILE]

``--only`` (repeated) measures the named peers alone, to compare two builds
of distripool in turns: ``--only distripool --only "distripool remote"
--only "remote, clear"`` is every distripool row. ``--json`` writes the
medians, in seconds per item, to a file.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import json
import logging
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import distripool


def tiny(x):
    return x + 1


def identity(x):
    return x


def burn(x, seconds=0.02):
    """CPU-bound work: spin for ``seconds`` of this process's CPU time."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    return x


def nap(x, seconds=0.01):
    time.sleep(seconds)
    return x


def make_bytes(mib):
    """A result the task creates: ``mib`` MiB of bytes."""
    return b"\x07" * (mib << 20)


def make_array(mib):
    """A result the task creates: a NumPy array of ``mib`` MiB."""
    import numpy

    return numpy.full(mib << 20, 7, dtype=numpy.uint8)


def read_fully(buf) -> int:
    """Read every byte of a result (its nonzero words), as a caller would."""
    import numpy

    return int(numpy.count_nonzero(numpy.frombuffer(buf, dtype=numpy.uint64)))


def first_byte(blob, i):
    return blob[i % len(blob)]


def _run_chunk(fn, chunk):
    return [fn(x) for x in chunk]


def default_chunksize(n_items, processes):
    """multiprocessing's rule, so that every peer cuts the same chunks."""
    chunksize, extra = divmod(n_items, processes * 4)
    return max(1, chunksize + bool(extra))


class PeerPool:
    """A peer behind the few Pool methods the bench uses (``map``, ``apply``),
    as a context manager that calls ``close``."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ExecutorAsPool(PeerPool):
    """A ``concurrent.futures`` executor."""

    def __init__(self, executor, processes):
        self.ex = executor
        self.processes = processes

    def map(self, fn, data, chunksize=None):
        chunksize = chunksize or default_chunksize(len(data), self.processes)
        return list(self.ex.map(fn, data, chunksize=chunksize))

    def apply(self, fn, args):
        return self.ex.submit(fn, *args).result()

    def apply_async(self, fn, args):
        return Got(self.ex.submit(fn, *args))

    def close(self):
        self.ex.shutdown(wait=True)


class Got:
    """A future as an ``AsyncResult``: ``get`` is ``result``."""

    def __init__(self, future):
        self.get = future.result


def process_pool_executor(n):
    return ExecutorAsPool(cf.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork")), n)


def loky_pool(n):
    import loky

    return ExecutorAsPool(loky.ProcessPoolExecutor(n), n)


class RayPool(PeerPool):
    """``ray.util.multiprocessing.Pool`` with its own local Ray instance."""

    def __init__(self, n):
        import ray
        from ray.util.multiprocessing import Pool

        self.ray = ray
        ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        self.pool = Pool(n)

    def map(self, fn, data, chunksize=None):
        return self.pool.map(fn, data, chunksize)

    def apply(self, fn, args):
        return self.pool.apply(fn, args)

    def apply_async(self, fn, args):
        return self.pool.apply_async(fn, args)

    def close(self):
        self.pool.terminate()
        self.ray.shutdown()


class DaskPool(PeerPool):
    """A ``distributed`` client on a local cluster of worker processes."""

    def __init__(self, n):
        from distributed import Client, LocalCluster

        self.n = n
        self.cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        self.client = Client(self.cluster)

    def map(self, fn, data, chunksize=None):
        chunksize = chunksize or default_chunksize(len(data), self.n)
        if chunksize == 1:
            return self.client.gather(self.client.map(fn, list(data), pure=False))
        chunks = [data[i : i + chunksize] for i in range(0, len(data), chunksize)]
        parts = self.client.gather(self.client.map(functools.partial(_run_chunk, fn), chunks, pure=False))
        return [y for part in parts for y in part]

    def apply(self, fn, args):
        return self.client.submit(fn, *args, pure=False).result()

    def apply_async(self, fn, args):
        return Got(self.client.submit(fn, *args, pure=False))

    def close(self):
        self.client.close()
        self.cluster.close()


class RemoteWorker:
    """An orchestrator in this process and ``agents`` worker agents, each in
    a process of its own with ``processes`` executors."""

    def __init__(self, processes, encrypt=True, agents=1):
        key = os.urandom(16).hex()
        self.dir = tempfile.TemporaryDirectory()
        key_file = os.path.join(self.dir.name, "key")
        with open(os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(key)
        self.orch = distripool.Orchestrator("127.0.0.1:0", authkey=key, encrypt=encrypt)
        here = os.path.dirname(os.path.abspath(__file__))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
        argv = [sys.executable, "-m", "distripool", "worker", "--processes", str(processes)]
        argv += ["--connect", self.orch.addresses[0], "--authkey-file", key_file]
        argv += [] if encrypt else ["--no-encrypt"]
        self.procs = [
            subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(agents)
        ]
        if not self.orch.wait_for_workers(agents, timeout=120):
            raise RuntimeError("the bench's workers did not connect")

    def pool(self, processes):
        return distripool.Pool(orchestrator=self.orch)

    def close(self):
        self.orch.close()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(30)
        self.dir.cleanup()


def startup(make, processes):
    t0 = time.perf_counter()
    with make(processes) as pool:
        pool.apply(tiny, (1,))
    return time.perf_counter() - t0


# Items per figure; peers that take milliseconds per task get fewer, since
# every figure is a rate.
SIZES = {
    "map_default": 200_000,
    "map_chunk1": 20_000,
    "apply_latency": 2_000,
    "async_get": 2_000,
    "async_get_p90": 2_000,
    "cpu_bound": 100,
}
SLOW = {"map_chunk1": 2_000, "apply_latency": 200, "async_get": 200, "async_get_p90": 200}
SLOW_PEERS = ("ProcessPoolExecutor", "loky", "Ray Pool", "Dask")


# Figures whose first rounds find caches cold on every peer (buffers to
# allocate, memory to fault in): each gets one round, unmeasured, first, and
# at least 5 measured rounds (the next one may still be warming up).
WARM_UP = ("payload", "payload_np", "made_bytes", "made_np")


def items(peer, name, scale):
    n = SIZES.get(name, 1)
    if peer in SLOW_PEERS:
        n = SLOW.get(name, n)
    return max(4, n // scale)


def measure(pool, name, n, payload_mib, processes):
    """One round of figure ``name`` on ``pool``: seconds per item (payload:
    seconds for the round trip; cpu_bound: parallel efficiency)."""
    if name in ("map_default", "map_chunk1"):
        data = range(n)
        t0 = time.perf_counter()
        out = pool.map(tiny, data, None if name == "map_default" else 1)
        dt = time.perf_counter() - t0
        assert len(out) == n and out[-1] == n
        return dt / n
    if name == "apply_latency":
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
    if name == "payload_np":
        import numpy

        array = numpy.frombuffer(os.urandom(payload_mib << 20), dtype=numpy.uint8).copy()
        t0 = time.perf_counter()
        out = pool.apply(identity, (array,))
        dt = time.perf_counter() - t0
        assert out.nbytes == array.nbytes and out[-1] == array[-1]
        return dt
    if name in ("async_get", "async_get_p90"):
        # Each call timed alone: the median (or 90th percentile) of n.
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            pool.apply_async(tiny, (i,)).get()
            times.append(time.perf_counter() - t0)
        times.sort()
        return times[len(times) // 2] if name == "async_get" else times[len(times) * 9 // 10]
    if name in ("made_bytes", "made_np"):
        t0 = time.perf_counter()
        out = pool.apply(make_bytes if name == "made_bytes" else make_array, (payload_mib,))
        assert read_fully(out) == payload_mib << 17
        return time.perf_counter() - t0
    if name == "cpu_bound":
        t0 = time.perf_counter()
        out = pool.map(burn, range(n), 1)
        dt = time.perf_counter() - t0
        assert out == list(range(n))
        return (n * 0.02 / processes) / dt
    raise ValueError(name)


def shared_input(remote: RemoteWorker, mib: int) -> tuple[float, float]:
    """Bytes sent to the remote worker for ``map(partial(f, big), range(64))``,
    as a multiple of ``big``'s size; and the seconds it took."""
    big = os.urandom(mib << 20)
    before = remote.orch.stats()["bytes_sent"]
    t0 = time.perf_counter()
    with distripool.Pool(orchestrator=remote.orch) as pool:
        out = pool.map(functools.partial(first_byte, big), range(64), chunksize=1)
    dt = time.perf_counter() - t0
    assert out == [big[i] for i in range(64)]
    return (remote.orch.stats()["bytes_sent"] - before) / len(big), dt


def scale_out(agents: int, per_agent: int) -> float:
    """Parallel efficiency of ``agents`` agents with one executor each,
    running tasks that sleep 10 ms, ``per_agent`` tasks per agent."""
    cluster = RemoteWorker(1, agents=agents)
    try:
        with distripool.Pool(orchestrator=cluster.orch) as pool:
            pool.map(nap, range(agents * 2), chunksize=1)  # every executor warm
            n = agents * per_agent
            t0 = time.perf_counter()
            out = pool.map(nap, range(n), chunksize=1)
            dt = time.perf_counter() - t0
        assert out == list(range(n))
        return (per_agent * 0.01) / dt
    finally:
        cluster.close()


def available(module):
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def local_peers():
    """The peers measured on this machine: name -> factory (None when the
    peer is not installed)."""
    return {
        "multiprocessing": lambda n: multiprocessing.get_context("fork").Pool(n),
        "ProcessPoolExecutor": process_pool_executor,
        "loky": loky_pool if available("loky") else None,
        "Ray Pool": RayPool if available("ray") else None,
        "Dask": DaskPool if available("distributed") else None,
        "distripool": lambda n: distripool.Pool(n),
        "distripool executor": lambda n: ExecutorAsPool(distripool.ProcessPoolExecutor(n), n),
    }


# Peers measured on some figures only.
ONLY_FIGURES = {"distripool executor": ("async_get", "async_get_p90")}


def figures_measured():
    figures = ["map_default", "map_chunk1", "apply_latency", "async_get", "async_get_p90"]
    figures += ["payload", "payload_np", "made_bytes", "made_np", "cpu_bound"]
    if not available("numpy"):
        # Every large figure but one needs it (to make or to read the data).
        figures = [f for f in figures if f not in ("payload_np", "made_bytes", "made_np")]
    return figures


def measure_here(peer, args, scale, payload_mib) -> dict[str, float]:
    """Every figure of one local peer, in this process."""
    make = local_peers()[peer]
    result = {"startup": statistics.median(startup(make, args.processes) for _ in range(args.rounds))}
    with make(args.processes) as pool:
        pool.map(tiny, range(1000))  # warm up
        for name in figures_measured():
            if name not in ONLY_FIGURES.get(peer, (name,)):
                continue
            n = items(peer, name, scale)
            rounds = args.rounds
            if name in WARM_UP:
                measure(pool, name, n, payload_mib, args.processes)
                rounds = max(rounds, 5)
            result[name] = statistics.median(
                measure(pool, name, n, payload_mib, args.processes) for _ in range(rounds)
            )
    return result


def measure_elsewhere(peer, args) -> dict[str, float]:
    """Every figure of one local peer, measured in a new process."""
    cmd = [sys.executable, os.path.abspath(__file__), "--peer", peer]
    cmd += ["--processes", str(args.processes), "--rounds", str(args.rounds)]
    if args.quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, timeout=1800).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smaller inputs, for a smoke run")
    ap.add_argument("--only", action="append", help="measure this peer (named as in the table); repeatable")
    ap.add_argument("--json", help="also write the medians (seconds per item) to this file")
    ap.add_argument("--peer", help=argparse.SUPPRESS)  # measure this one peer, print JSON
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.ERROR)
    for noisy in ("distributed", "ray", "tornado", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    scale = 10 if args.quick else 1
    payload_mib = 64 // scale
    shared_mib = 256 // scale

    if args.peer:
        print(json.dumps(measure_here(args.peer, args, scale, payload_mib)))
        return 0
    figures = figures_measured()
    paired = ("distripool remote", "remote, clear")
    peers = dict(local_peers())
    peers.update({p: "remote" for p in paired})
    if args.only:
        unknown = [p for p in args.only if p not in peers]
        if unknown:
            ap.error(
                f"--only: no peer named {', '.join(map(repr, unknown))}; the peers are {', '.join(peers)}"
            )
        peers = {p: make for p, make in peers.items() if p in args.only}
    missing = [p for p, make in peers.items() if make is None]
    peers = {p: make for p, make in peers.items() if make is not None}
    if "payload_np" not in figures:
        missing.append("numpy (the NumPy array figure)")
    results: dict[str, dict[str, float]] = {p: {} for p in peers}
    for peer in peers:
        if peer not in paired:
            results[peer] = measure_elsewhere(peer, args)
            print(f"measured {peer}", file=sys.stderr, flush=True)
    extra: dict[str, float] = {}
    scale_agents = 64 // scale
    if any(p in peers for p in paired):
        remote = RemoteWorker(args.processes)
        clear = RemoteWorker(args.processes, encrypt=False)
        try:
            # Sealed and clear remote workers take turns, round by round, so
            # that the machine's drift falls on both alike; more rounds,
            # since the difference sought is small.
            with remote.pool(args.processes) as sealed_pool, clear.pool(args.processes) as clear_pool:
                for pool in (sealed_pool, clear_pool):
                    pool.map(tiny, range(1000))
                for name in figures:
                    n = items("distripool remote", name, scale)
                    if name in WARM_UP:
                        for pool in (sealed_pool, clear_pool):
                            measure(pool, name, n, payload_mib, args.processes)
                    runs = {peer: [] for peer in paired}
                    for _ in range(max(args.rounds, 7)):
                        for peer, pool in zip(paired, (sealed_pool, clear_pool)):
                            runs[peer].append(measure(pool, name, n, payload_mib, args.processes))
                    for peer in paired:
                        if peer in peers:
                            results[peer][name] = statistics.median(runs[peer])
            print("measured the remote workers", file=sys.stderr, flush=True)
            extra["shared_ratio"], extra["shared_seconds"] = shared_input(remote, shared_mib)
            extra["scale_efficiency"] = scale_out(scale_agents, 50)
        finally:
            remote.close()
            clear.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"version": distripool.__version__, "results": results, "extra": extra}, f, indent=1)

    def rate(per_item, unit, per_unit):
        r = 1 / per_item / per_unit
        return f"{r:.2f} {unit}" if r < 100 else f"{r:.0f} {unit}"

    rows = [
        ("start-up + first task", "startup", lambda s: f"{s * 1e3:.0f} ms"),
        ("map tiny fn, default chunks", "map_default", lambda s: rate(s, "M/s", 1e6)),
        ("map chunksize=1", "map_chunk1", lambda s: rate(s, "k/s", 1e3)),
        ("sequential apply round trip", "apply_latency", lambda s: f"{s * 1e6:.0f} µs"),
        ("apply_async().get() (submit().result()), median", "async_get", lambda s: f"{s * 1e6:.0f} µs"),
        ("the same, 90th percentile", "async_get_p90", lambda s: f"{s * 1e6:.0f} µs"),
        (f"{payload_mib} MiB bytes argument round trip", "payload", lambda s: f"{payload_mib / s:.0f} MiB/s"),
        (f"{payload_mib} MiB NumPy array round trip", "payload_np", lambda s: f"{payload_mib / s:.0f} MiB/s"),
        (
            f"{payload_mib} MiB bytes result the task creates",
            "made_bytes",
            lambda s: f"{payload_mib / s:.0f} MiB/s",
        ),
        (
            f"{payload_mib} MiB NumPy result the task creates",
            "made_np",
            lambda s: f"{payload_mib / s:.0f} MiB/s",
        ),
        ("CPU-bound 20 ms tasks, efficiency", "cpu_bound", lambda e: f"{e:.2f}"),
    ]
    print(
        f"\ndistripool {distripool.__version__}, {args.processes} processes each, median of {args.rounds} "
        f"({payload_mib} MiB figures: of {max(args.rounds, 5)}, after one round unmeasured), "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}\n"
    )
    names = list(peers)
    print("| figure | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for label, key, fmt in rows:
        cells = [fmt(results[p][key]) if key in results[p] else "—" for p in names]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if missing:
        print(f"\nnot installed here, left out: {', '.join(missing)} (make bench installs them)")

    def ratio(a, b, key, higher_is_better):
        """How many times better peer ``a`` is than ``b`` on ``key`` (or on
        a pair of keys: ``a``'s figure, ``b``'s)."""
        ka, kb = key if isinstance(key, tuple) else (key, key)
        if ka not in results.get(a, {}) or kb not in results.get(b, {}):
            return None
        x, y = results[a][ka], results[b][kb]
        return x / y if higher_is_better else y / x

    # Each target: (what, peer, reference, figure, higher is better, goal as "≥ g" times better)
    targets = [
        ("map chunksize=1 vs multiprocessing", "distripool", "multiprocessing", "map_chunk1", False, 2.0),
        (
            "apply latency vs multiprocessing (× faster)",
            "distripool",
            "multiprocessing",
            "apply_latency",
            False,
            2.0,
        ),
        ("map default chunks vs multiprocessing", "distripool", "multiprocessing", "map_default", False, 1.0),
        (
            f"{payload_mib} MiB NumPy array round trip vs multiprocessing",
            "distripool",
            "multiprocessing",
            "payload_np",
            False,
            8.0,
        ),
        (
            f"{payload_mib} MiB NumPy array round trip vs Ray",
            "distripool",
            "Ray Pool",
            "payload_np",
            False,
            1.0,
        ),
        (
            f"{payload_mib} MiB bytes round trip vs multiprocessing",
            "distripool",
            "multiprocessing",
            "payload",
            False,
            8.0,
        ),
        (f"{payload_mib} MiB bytes round trip vs Ray", "distripool", "Ray Pool", "payload", False, 1.0),
        (
            "apply_async().get() median vs multiprocessing",
            "distripool",
            "multiprocessing",
            "async_get",
            False,
            2.0,
        ),
        (
            "submit().result() median vs multiprocessing",
            "distripool executor",
            "multiprocessing",
            "async_get",
            False,
            2.0,
        ),
        (
            "apply_async().get() p90 vs multiprocessing",
            "distripool",
            "multiprocessing",
            "async_get_p90",
            False,
            1.0,
        ),
        (
            f"{payload_mib} MiB NumPy result made by the task vs Ray",
            "distripool",
            "Ray Pool",
            "made_np",
            False,
            1.0,
        ),
        (
            f"{payload_mib} MiB bytes result made by the task vs Ray",
            "distripool",
            "Ray Pool",
            "made_bytes",
            False,
            1.0,
        ),
        (
            "remote apply_async().get() median vs Ray",
            "distripool remote",
            "Ray Pool",
            "async_get",
            False,
            15.0,
        ),
        (
            "remote NumPy result made by the task vs embedded",
            "distripool remote",
            "distripool",
            "made_np",
            False,
            0.6,
        ),
        (
            "remote bytes result made by the task vs embedded",
            "distripool remote",
            "distripool",
            "made_bytes",
            False,
            0.6,
        ),
        (
            f"remote {payload_mib} MiB bytes round trip vs embedded",
            "distripool remote",
            "distripool",
            "payload",
            False,
            0.6,
        ),
        (
            f"remote {payload_mib} MiB NumPy round trip vs embedded bytes",
            "distripool remote",
            "distripool",
            ("payload_np", "payload"),
            False,
            0.6,
        ),
        (
            f"remote {payload_mib} MiB bytes round trip vs Dask",
            "distripool remote",
            "Dask",
            "payload",
            False,
            5.0,
        ),
        (
            f"remote {payload_mib} MiB bytes round trip, sealed vs clear",
            "distripool remote",
            "remote, clear",
            "payload",
            False,
            0.8,
        ),
        ("remote chunksize=1 vs Ray", "distripool remote", "Ray Pool", "map_chunk1", False, 20.0),
        ("remote chunksize=1 vs Dask", "distripool remote", "Dask", "map_chunk1", False, 20.0),
        (
            "remote apply latency vs Ray (× faster)",
            "distripool remote",
            "Ray Pool",
            "apply_latency",
            False,
            10.0,
        ),
        ("remote tiny map, sealed vs clear", "distripool remote", "remote, clear", "map_default", False, 0.9),
        (
            "remote chunksize=1, sealed vs clear",
            "distripool remote",
            "remote, clear",
            "map_chunk1",
            False,
            0.9,
        ),
    ]
    print("\n| target | measured | goal | met |")
    print("|---|---:|---:|:---:|")
    for what, a, b, key, higher, goal in targets:
        r = ratio(a, b, key, higher)
        if r is None:
            print(f"| {what} | — | ≥ {goal:g}× | — |")
        else:
            print(f"| {what} | {r:.2f}× | ≥ {goal:g}× | {'yes' if r >= goal else 'no'} |")
    if "distripool" in results:
        start = results["distripool"]["startup"]
        met = "yes" if start < 0.15 else "no"
        print(f"| start-up + first result, 2 executors | {start * 1e3:.0f} ms | < 150 ms | {met} |")
        for key, what in (("made_np", "NumPy"), ("made_bytes", "bytes")):
            if key in results["distripool"]:
                rate_ = payload_mib / results["distripool"][key]
                met = "yes" if rate_ >= 2048 else "no"
                print(
                    f"| {payload_mib} MiB {what} result made by the task | {rate_:.0f} MiB/s | ≥ 2048 MiB/s | {met} |"
                )
        eff = results["distripool"]["cpu_bound"]
        print(
            f"| CPU-bound 20 ms tasks, efficiency | {eff:.2f} | ≥ 0.95 | {'yes' if eff >= 0.95 else 'no'} |"
        )
    if extra:
        eff = extra["scale_efficiency"]
        print(
            f"| {scale_agents} agents × 1 executor, 10 ms tasks, efficiency | {eff:.2f} | ≥ 0.9 | "
            f"{'yes' if eff >= 0.9 else 'no'} |"
        )
        shared = extra["shared_ratio"]
        print(
            f"| map(partial(f, {shared_mib} MiB), range(64)) on a remote worker, bytes sent | "
            f"{shared:.2f}× the object ({extra['shared_seconds']:.2f} s) | ≤ 2× | {'yes' if shared <= 2.05 else 'no'} |"
        )
    print("\nratios: how many times better the first is than the second (above 1) or worse (below 1).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
