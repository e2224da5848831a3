"""distripool against Dask distributed across emulated hosts (``make
bench-cluster``; needs root, iproute2 and /dev/net/tun).

Five network namespaces (``tests/netlab.py``): a driver host, and four
worker hosts with one worker each (distripool: ``distripool worker
--processes 2``; Dask: ``dask worker --nthreads 2``, its scheduler on the
driver's host). Every host's link is emulated with a rate and a delay, first
10 Gbit/s and 0.2 ms, then 1 Gbit/s and 1 ms; a frame between two hosts
crosses both their links. The kernel here has no ``sch_netem``, so the links
are emulated in user space by this process, which carries about 1 GB/s in
all: a plain TCP stream through the same links is measured first, and the
large-data job is stated as a fraction of it.

The jobs (``cluster_driver.py``), each timed in the driver:

- (a) ``map`` over 20 000 tasks of 1 ms: each system as its users call it
  (``Pool.map``, default chunks; ``client.map``, a task per item), and both
  with one task per item and both with distripool's default chunks;
- (b) 200 tasks, each with a distinct 16 MiB NumPy argument and a 16 MiB
  NumPy result: bytes each way over the driver's link, per second;
- (c) ``map(partial(f, a 256 MiB array), range(64))`` for distripool, and
  the array scattered with ``broadcast=True`` then mapped over for Dask:
  the wall time and the bytes each worker's link carried.

Prints one table per link setting (they are in docs/performance.md) and
exits 1 if a result was wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

WORKERS = ("w1", "w2", "w3", "w4")
JOBS = ("a", "a1", "b", "c")
PROCESSES = 2  # executors per distripool worker, threads per Dask worker
STREAM_MIB = 256
# A job still running after this long is stopped and reported as such.
JOB_LIMIT = 300
MIB = 1 << 20


def missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


RECEIVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7399)); s.listen(1); print("listening", flush=True)
c, _ = s.accept(); n = 0
while True:
    b = c.recv(1 << 20)
    if not b: break
    n += len(b)
c.sendall(b"k"); c.close(); print(n, flush=True)
"""

SENDER = r"""
import socket, sys, time
n = int(sys.argv[2]) << 20; block = b"\x01" * (1 << 20)
c = socket.create_connection((sys.argv[1], 7399)); t0 = time.perf_counter()
for _ in range(n >> 20): c.sendall(block)
c.shutdown(socket.SHUT_WR); c.recv(1); print(time.perf_counter() - t0, flush=True)
"""


def stream_rates(lab, pairs) -> list[float]:
    """MiB/s of plain TCP streams, one per ``(sender, receiver)`` pair, all
    at once."""
    receivers = []
    for _, to in pairs:
        p = lab.run(
            to, [sys.executable, "-c", RECEIVER, lab.hosts[to].address], stdout=subprocess.PIPE, text=True
        )
        _expect(p, "listening")
        receivers.append(p)
    senders = [
        lab.run(
            frm,
            [sys.executable, "-c", SENDER, lab.hosts[to].address, str(STREAM_MIB)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for frm, to in pairs
    ]
    rates = [STREAM_MIB / float(p.stdout.readline()) for p in senders]
    for p in receivers:
        got = int(_lines(p).get(timeout=600) or -1)
        if got != STREAM_MIB * MIB:
            raise SystemExit(f"a stream carried {got} bytes, not {STREAM_MIB} MiB")
    return rates


def _expect(proc, word: str, what: str = "", timeout: float | None = None) -> str | None:
    """The next line of ``proc``'s output that starts with ``word``; None
    if none came within ``timeout`` seconds."""
    lines = _lines(proc)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None
        if line is None:
            raise SystemExit(f"{what or 'a process'} ended before {word!r}")
        if line.startswith(word):
            return line


def _lines(proc) -> queue.Queue:
    """``proc``'s output lines as a thread reads them (None at the end)."""
    lines = getattr(proc, "lines", None)
    if lines is None:
        lines = proc.lines = queue.Queue()

        def read():
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
    return lines


class System:
    """One system's driver and workers on the lab's hosts."""

    def __init__(self, lab, kind: str, tmp: str, env: dict):
        self.lab = lab
        self.kind = kind
        self.procs = []
        driver = lab.hosts["driver"].address
        script = os.path.join(HERE, "cluster_driver.py")
        pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        if kind in ("distripool", "direct"):
            key = uuid.uuid4().hex
            key_file = os.path.join(tmp, "key")
            with open(os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                f.write(key)
            address = f"{driver}:7500"
            argv = [sys.executable, script, "distripool", address, key, str(len(WORKERS))]
            self.driver = lab.run("driver", argv, **pipes)
            _expect(self.driver, "listening", "the distripool driver")
            for host in WORKERS:
                argv = [sys.executable, "-m", "distripool", "worker", "--processes", str(PROCESSES)]
                argv += ["--connect", address, "--authkey-file", key_file]
                if kind == "direct":
                    argv += ["--no-serve-peers"]
                self.procs.append(lab.run(host, argv, log=os.path.join(tmp, f"{kind}-{host}.log"), env=env))
        else:
            scheduler = f"tcp://{driver}:8786"
            argv = [
                sys.executable,
                "-m",
                "distributed.cli.dask_scheduler",
                "--host",
                driver,
                "--port",
                "8786",
            ]
            argv += ["--no-dashboard"]
            self.procs.append(lab.run("driver", argv, log=os.path.join(tmp, "dask-scheduler.log"), env=env))
            for host in WORKERS:
                argv = [sys.executable, "-m", "distributed.cli.dask_worker", scheduler, "--nworkers", "1"]
                argv += ["--nthreads", str(PROCESSES), "--host", lab.hosts[host].address, "--no-dashboard"]
                self.procs.append(lab.run(host, argv, log=os.path.join(tmp, f"{kind}-{host}.log"), env=env))
            argv = [sys.executable, script, "dask", scheduler, str(len(WORKERS))]
            self.driver = lab.run("driver", argv, **pipes)
        print(f"  {kind}: waiting for its {len(WORKERS)} workers", flush=True)
        _expect(self.driver, "ready", f"the {kind} driver")

    def job(self, name: str) -> dict | None:
        """The job's figures; None if it did not finish within
        ``JOB_LIMIT`` (the system is then stopped)."""
        hosts = self.lab.hosts
        before = {h: (hosts[h].sent, hosts[h].received) for h in hosts}
        self.driver.stdin.write(name + "\n")
        self.driver.stdin.flush()
        line = _expect(self.driver, "result", f"the {self.kind} driver", JOB_LIMIT)
        if line is None:
            print(f"  {self.kind}: job {name} did not finish in {JOB_LIMIT} s", flush=True)
            self.driver.kill()
            return None
        out = json.loads(line.split(" ", 1)[1])
        out["links"] = {h: (hosts[h].sent - before[h][0], hosts[h].received - before[h][1]) for h in hosts}
        return out

    def close(self):
        """End the driver (its input closes), then the workers; whatever is
        left when the lab closes, the lab kills."""
        with contextlib.suppress(BrokenPipeError):
            self.driver.stdin.close()
        self.driver.wait(120)
        for p in self.procs:
            p.terminate()
        deadline = time.monotonic() + 30
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))


def one_setting(label: str, link, tmp: str, env: dict, jobs=JOBS) -> tuple[list, bool]:
    from netlab import Lab

    print(f"links: {label}", flush=True)
    with Lab(["driver", *WORKERS], net=79) as lab:
        for host in lab.hosts.values():
            host.link = link
        [rate] = stream_rates(lab, [("driver", "w1")])
        both = stream_rates(lab, [("driver", "w1"), ("w2", "driver")])
        shown = ", ".join(f"{r:.0f}" for r in both)
        print(
            f"  TCP streams: one {rate:.0f} MiB/s; to and from the driver at once {shown} MiB/s", flush=True
        )
        results = {}
        # "direct": distripool whose workers do not serve one another, for (c).
        for kind in ("distripool", "direct", "dask"):
            results[kind] = {}
            system = None
            try:
                for job in jobs if kind != "direct" else [j for j in jobs if j == "c"]:
                    # A job that ran out of time leaves its system stopped:
                    # the next job gets a fresh one.
                    if system is None:
                        system = System(lab, kind, tmp, env)
                    results[kind][job] = system.job(job)
                    if results[kind][job] is None:
                        system.close()
                        system = None
            finally:
                if system is not None:
                    system.close()
            walls = {j: None if r is None else round(r["wall"], 2) for j, r in results[kind].items()}
            print(f"  {kind}: {json.dumps(walls)}", flush=True)
    exact = all(r["exact"] for s in results.values() for r in s.values() if r is not None)
    return _rows(label, rate, min(both), results, jobs), exact


def _rows(label, rate, each_way, results, jobs=JOBS) -> list:
    """The table's rows for one link setting, of the jobs run; a job that
    ran out of time shows as such, and its ratio as a lower bound."""
    d = {j: results["distripool"].get(j) for j in JOBS}
    direct = results["direct"].get("c")
    k = {j: results["dask"].get(j) for j in JOBS}

    def wall(r) -> str:
        return f">{JOB_LIMIT} s (stopped)" if r is None else f"{r['wall']:.2f} s"

    def faster(ours, theirs) -> str:
        if ours is None:
            return "—"
        if theirs is None:
            return f">{JOB_LIMIT / ours['wall']:.1f}×"
        return f"{theirs['wall'] / ours['wall']:.1f}×"

    def rate_b(r):
        return None if r is None else r["bytes_each_way"] / MIB / r["wall"]

    def shown_b(r) -> str:
        x = rate_b(r)
        if x is None:
            return f"stopped after {JOB_LIMIT} s"
        return f"{x:.0f} MiB/s ({x / each_way:.2f} of two streams, {x / rate:.2f} of one)"

    def links(r) -> tuple[str, str, str]:
        if r is None:
            return "—", "—", "—"
        got = [r["links"][h][1] / r["object_bytes"] for h in WORKERS]
        sent = [r["links"][h][0] / r["object_bytes"] for h in WORKERS]
        driver = f"{r['links']['driver'][0] / r['object_bytes']:.2f}"
        return f"{min(got):.2f}–{max(got):.2f}", f"{min(sent):.2f}–{max(sent):.2f}", driver

    def timed(what, ours, theirs, goal=""):
        return (label, what, wall(ours), wall(theirs), faster(ours, theirs), goal)

    bd, bk = rate_b(d["b"]), rate_b(k["b"])
    (dw, ds, dd), (kw, ks, kd) = links(d["c"]), links(k["c"])
    b_ratio = "—" if bd is None or bk is None else f"{bd / bk:.1f}×"
    rows = [
        (label, "one TCP stream, driver → worker", f"{rate:.0f} MiB/s", "", "", ""),
        (
            label,
            "two TCP streams at once, to and from the driver (the slower)",
            f"{each_way:.0f} MiB/s",
            "",
            "",
            "",
        ),
        timed("(a) 20 000 tasks of 1 ms, as each is called (map / client.map)", d["a"], k["a1"], "≥ 10×"),
        timed("(a) the same, one task per item on both", d["a1"], k["a1"]),
        timed("(a) the same, distripool's default chunks on both", d["a"], k["a"]),
        (
            label,
            "(b) 200 × 16 MiB NumPy in and out, each way",
            shown_b(d["b"]),
            shown_b(k["b"]),
            b_ratio,
            "≥ 0.7 of the link",
        ),
        timed("(c) 256 MiB array beside 64 tasks: wall time", d["c"], k["c"]),
        (label, "(c) bytes each worker's link received, ÷ the array", dw, kw, "", "once per link"),
        (label, "(c) bytes each worker's link sent, ÷ the array", ds, ks, "", ""),
        (label, "(c) bytes the driver's link sent, ÷ the array", dd, kd, "", ""),
        timed("(c) the same, each worker sent it by the driver (--no-serve-peers)", direct, k["c"]),
        (label, "(c) … bytes the driver's link sent, ÷ the array", links(direct)[2], kd, "", ""),
    ]
    # Each job's rows start with its letter.
    return [r for r in rows if not r[1].startswith("(") or r[1][1] in {j[0] for j in jobs}]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", default=",".join(JOBS), help=f"which jobs to run (default: {','.join(JOBS)})")
    args = ap.parse_args()
    jobs = tuple(args.jobs.split(","))
    if not set(jobs) <= set(JOBS):
        ap.error(f"--jobs takes some of {', '.join(JOBS)}")
    why = missing()
    if why is not None:
        print(f"bench-cluster skipped: it {why}")
        return 0
    from netlab import Link

    settings = [
        ("10 Gbit/s, 0.2 ms", Link(rate=10e9, delay=0.0002)),
        ("1 Gbit/s, 1 ms", Link(rate=1e9, delay=0.001)),
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    env.pop("DISTRIPOOL_AUTHKEY", None)
    rows, exact = [], True
    with tempfile.TemporaryDirectory() as tmp:
        for label, link in settings:
            r, ok = one_setting(label, link, tmp, env, jobs)
            rows += r
            exact = exact and ok
    print()
    print("| links | figure | distripool | Dask | distripool, × better | goal |")
    print("|---|---|---:|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if not exact:
        print("a result was wrong")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
