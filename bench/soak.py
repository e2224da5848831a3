"""A long run under steady faults, for ``make soak`` (not CI).

1. A million tasks through ``imap_unordered`` on remote workers (loopback
   TCP, sealed) while an executor is SIGKILLed every second and the oldest
   worker is SIGKILLed and replaced by a new one every 30 s. Every result is
   checked and counted once; the driver's RSS is sampled every second and its
   growth after the warm-up reported; the driver's file descriptors at the
   start and end, and those of one worker that is never replaced, are
   compared.
2. 10 000 pools on an orchestrator, then 10 000 embedded ``Pool(1)``,
   opened, used once and closed in a loop: the driver's RSS, descriptors,
   threads and child processes (the worker agent, and executors left
   behind if any) before and after.
3. The driver's memory for ``map`` over 10 million small items (in a fresh
   process: its peak RSS above what it had before the input existed),
   against the memory of the input and output lists alone.
4. ``imap`` over an endless generator for 10 minutes: the driver's RSS
   every second, its growth after the first minute.

``python bench/soak.py [--tasks N] [--pools N] [--items N] [--imap-minutes M]
[--json FILE]``; exits 1 if a promise of docs/reliability.md ("Soak") does
not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

import distripool

PAGE = os.sysconf("SC_PAGE_SIZE")
RSS_GROWTH_LIMIT = 50 << 20


def work(x, seconds=0.0005):
    """Half a millisecond of CPU (a task of a real map), then a checkable value."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return x, x * x


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (its executors, for a worker)."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


class Workers:
    """Worker agents in processes of their own, on one orchestrator."""

    def __init__(self, orch, key: str, processes: int):
        self.dir = tempfile.TemporaryDirectory(prefix="distripool-soak-")
        self.key_file = os.path.join(self.dir.name, "key")
        with open(os.open(self.key_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(key)
        self.address = orch.addresses[0]
        self.processes = processes
        here = os.path.dirname(os.path.abspath(__file__))
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
        self.env["DISTRIPOOL_LOG"] = "warn"
        self.procs: list[subprocess.Popen] = []

    def start(self) -> subprocess.Popen:
        argv = [sys.executable, "-m", "distripool", "worker", "--processes", str(self.processes)]
        argv += ["--connect", self.address, "--authkey-file", self.key_file]
        p = subprocess.Popen(argv, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(30)
        self.dir.cleanup()


def wait_for(orch, n: int, what: str) -> None:
    if not orch.wait_for_workers(n, timeout=120):
        raise SystemExit(f"soak: {what}: {n} workers did not connect in 120 s")


def faults(workers: Workers, steady: subprocess.Popen, stop: threading.Event, counts: dict) -> None:
    """An executor SIGKILLed every second; every 30 s the oldest replaceable
    worker SIGKILLed and a new one started."""
    rng = random.Random(7)
    last_swap = time.monotonic()
    while not stop.wait(1.0):
        live = [p for p in workers.procs if p.poll() is None]
        executors = [c for p in live for c in children(p.pid)]
        if executors:
            try:
                os.kill(rng.choice(executors), signal.SIGKILL)
                counts["executors_killed"] += 1
            except ProcessLookupError:
                pass
        if time.monotonic() - last_swap >= 30:
            last_swap = time.monotonic()
            old = next((p for p in live if p is not steady), None)
            if old is not None:
                workers.start()
                old.kill()
                old.wait()
                counts["workers_replaced"] += 1


def run_tasks(n: int) -> dict:
    key = os.urandom(16).hex()
    orch = distripool.Orchestrator("127.0.0.1:0", authkey=key, max_crashes=10)
    workers = Workers(orch, key, processes=2)
    steady = workers.start()
    workers.start()
    wait_for(orch, 2, "tasks")
    counts = {"executors_killed": 0, "workers_replaced": 0}
    stop = threading.Event()
    seen = bytearray(n)
    samples = []
    t0 = time.monotonic()
    chaos = threading.Thread(target=faults, args=(workers, steady, stop, counts), daemon=True)
    wrong = 0
    try:
        with distripool.Pool(orchestrator=orch) as pool:
            # At rest, before the faults and after them: every executor up.
            pool.map(one_task, range(1000))
            fds_start, steady_fds_start = fds(), fds(steady.pid)
            chaos.start()
            next_sample = t0 = time.monotonic()
            for done, (x, y) in enumerate(pool.imap_unordered(work, range(n), chunksize=50), 1):
                if y != x * x or seen[x]:
                    wrong += 1
                seen[x] = 1
                now = time.monotonic()
                if now >= next_sample:
                    samples.append((now - t0, done, rss()))
                    next_sample = now + 1.0
            elapsed = time.monotonic() - t0
            stop.set()
            chaos.join()
            settle = time.monotonic() + 30
            while len(children(steady.pid)) < workers.processes and time.monotonic() < settle:
                time.sleep(0.05)  # the last executor killed is being replaced
            pool.map(one_task, range(1000))
            fds_end, steady_fds_end = fds(), fds(steady.pid)
    finally:
        stop.set()
        if chaos.is_alive():
            chaos.join()
        stats = orch.stats()
        orch.close()
        workers.close()
    warm = [s for s in samples if s[1] > n // 10]
    growth = (max(s[2] for s in warm) - warm[0][2]) if warm else None
    return {
        "tasks": n,
        "seconds": round(elapsed, 1),
        "missing": seen.count(0),
        "wrong": wrong,
        "executors_killed": counts["executors_killed"],
        "workers_replaced": counts["workers_replaced"],
        "tasks_retried": stats["tasks_retried"],
        "crashes": stats["crashes"],
        "workers_lost": stats["workers_lost"],
        "rss_after_warmup_mib": round(warm[0][2] / 2**20, 1) if warm else None,
        "rss_growth_mib": None if growth is None else round(growth / 2**20, 1),
        "driver_fds": [fds_start, fds_end],
        "steady_worker_fds": [steady_fds_start, steady_fds_end],
    }


def one_task(x):
    return x + 1


def run_pools(n: int) -> dict:
    key = os.urandom(16).hex()
    orch = distripool.Orchestrator("127.0.0.1:0", authkey=key)
    workers = Workers(orch, key, processes=1)
    workers.start()
    out = {}
    try:
        wait_for(orch, 1, "pools")
        for kind, make in (
            ("orchestrator_pools", lambda: distripool.Pool(orchestrator=orch)),
            ("embedded_pools", lambda: distripool.Pool(1)),
        ):
            # A few first, so that what is made once (threads, imports) is made.
            for _ in range(20):
                with make() as pool:
                    pool.apply(one_task, (1,))
            before = (rss(), fds(), threads(), len(children(os.getpid())))
            t0 = time.monotonic()
            for i in range(n):
                with make() as pool:
                    if pool.apply(one_task, (i,)) != i + 1:
                        raise SystemExit(f"soak: {kind}: a wrong result")
            after = (rss(), fds(), threads(), len(children(os.getpid())))
            out[kind] = {
                "pools": n,
                "seconds": round(time.monotonic() - t0, 1),
                "rss_mib": [round(before[0] / 2**20, 1), round(after[0] / 2**20, 1)],
                "fds": [before[1], after[1]],
                "threads": [before[2], after[2]],
                "child_processes": [before[3], after[3]],
            }
            print(f"soak: {kind}: {out[kind]}", file=sys.stderr, flush=True)
    finally:
        orch.close()
        workers.close()
    return out


def plus_one(x):
    return x + 1


def peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def map_memory_child(n: int, what: str) -> None:
    """In a fresh process: the peak RSS of ``what`` over ``n`` items, above
    the RSS before the input list existed (printed as JSON)."""
    pool = distripool.Pool(2) if what == "map" else None
    if pool is not None:
        pool.map(plus_one, range(1000))
    base = rss()
    xs = list(range(n))
    if pool is None:
        ys = [x + 1 for x in xs]
    else:
        ys = pool.map(plus_one, xs)
        assert ys[-1] == n and len(ys) == n
    print(json.dumps({"peak_above_base": peak_rss() - base, "end_above_base": rss() - base}))
    if pool is not None:
        pool.close()
        pool.join()


def run_map_memory(n: int) -> dict:
    def child(what):
        argv = [sys.executable, os.path.abspath(__file__), "--map-memory-child", what, "--items", str(n)]
        return json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)

    lists = child("lists")
    mapped = child("map")
    return {
        "items": n,
        "lists_mib": round(lists["end_above_base"] / 2**20, 1),
        "map_peak_mib": round(mapped["peak_above_base"] / 2**20, 1),
        "ratio": round(mapped["peak_above_base"] / lists["end_above_base"], 2),
    }


def endless_item(x):
    return len(x)


def run_endless_imap(minutes: float) -> dict:
    """imap over an endless generator of 4 KiB items for ``minutes``."""

    def endless():
        while True:
            yield os.urandom(4096)

    samples = []
    done = 0
    with distripool.Pool(2) as pool:
        t0 = time.monotonic()
        next_sample = t0
        for n in pool.imap(endless_item, endless(), chunksize=64):
            done += 1
            assert n == 4096
            now = time.monotonic()
            if now >= next_sample:
                samples.append((now - t0, rss()))
                next_sample = now + 1.0
                if now - t0 >= minutes * 60:
                    break
        pool.terminate()
    after_first = [r for t, r in samples if t >= min(60.0, minutes * 30)]
    return {
        "minutes": minutes,
        "items": done,
        "rss_mib_first_minute": round(after_first[0] / 2**20, 1),
        "rss_mib_max_after": round(max(after_first) / 2**20, 1),
        "rss_growth_mib": round((max(after_first) - after_first[0]) / 2**20, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--pools", type=int, default=10_000)
    parser.add_argument("--items", type=int, default=10_000_000)
    parser.add_argument("--imap-minutes", type=float, default=10.0)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--map-memory-child", choices=["lists", "map"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.map_memory_child:
        map_memory_child(args.items, args.map_memory_child)
        return 0
    print(f"soak: {args.tasks} tasks under faults ...", file=sys.stderr, flush=True)
    tasks = run_tasks(args.tasks)
    print(f"soak: tasks: {tasks}", file=sys.stderr, flush=True)
    pools = run_pools(args.pools)
    print(f"soak: map over {args.items} items ...", file=sys.stderr, flush=True)
    mapped = run_map_memory(args.items)
    print(f"soak: map memory: {mapped}", file=sys.stderr, flush=True)
    print(
        f"soak: imap over an endless generator for {args.imap_minutes:g} min ...", file=sys.stderr, flush=True
    )
    endless = run_endless_imap(args.imap_minutes)
    print(f"soak: endless imap: {endless}", file=sys.stderr, flush=True)
    report = {"tasks": tasks, **pools, "map_memory": mapped, "endless_imap": endless}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    failures = []
    if tasks["missing"] or tasks["wrong"]:
        failures.append(f"{tasks['missing']} results missing, {tasks['wrong']} wrong")
    if tasks["rss_growth_mib"] is None or tasks["rss_growth_mib"] * 2**20 >= RSS_GROWTH_LIMIT:
        failures.append(f"driver RSS grew {tasks['rss_growth_mib']} MiB after the warm-up")
    if tasks["driver_fds"][1] > tasks["driver_fds"][0]:
        failures.append(f"driver descriptors {tasks['driver_fds']}")
    if tasks["steady_worker_fds"][1] != tasks["steady_worker_fds"][0]:
        failures.append(f"the steady worker's descriptors {tasks['steady_worker_fds']}")
    for kind in ("orchestrator_pools", "embedded_pools"):
        r = pools[kind]
        if (
            r["fds"][1] > r["fds"][0]
            or r["threads"][1] > r["threads"][0]
            or r["child_processes"][1] > r["child_processes"][0]
        ):
            failures.append(f"{kind}: {r}")
        if r["rss_mib"][1] - r["rss_mib"][0] >= RSS_GROWTH_LIMIT / 2**20:
            failures.append(f"{kind}: RSS {r['rss_mib']} MiB")
    if mapped["ratio"] > 2:
        failures.append(f"map over {mapped['items']} items: {mapped}")
    if endless["rss_growth_mib"] * 2**20 >= RSS_GROWTH_LIMIT:
        failures.append(f"endless imap: {endless}")
    for f in failures:
        print(f"soak: FAILED: {f}", file=sys.stderr)
    print("soak: " + ("all held" if not failures else f"{len(failures)} failed"), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
