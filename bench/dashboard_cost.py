"""What the dashboard costs: ``map`` with ``chunksize=1`` of a tiny function,
with the dashboard off, and on with a browser open on it.

Two pools of the same size live side by side, one without a dashboard and
one with it; they take turns, round by round, so that the machine's drift
falls on both alike. The browser is headless Chromium showing the overview
page (which reads the API once a second, as it does for a user), started
before the rounds and left open through them; without Chromium, a thread
makes the page's requests instead (said in the output). Embedded pools and
pools on a remote worker (another process, TCP on loopback, sealed).
Reported: medians, the spread, and the ratio on/off (goal: at least 0.95).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import distripool


def tiny(x):
    return x + 1


class Browser:
    """Something reading the dashboard as an open page does."""

    def __init__(self, url: str):
        exe = shutil.which("chromium-headless-shell") or shutil.which("chromium")
        self.kind = "headless Chromium" if exe else "a thread making the page's requests"
        self.proc = None
        self.stop = threading.Event()
        if exe:
            self.profile = tempfile.TemporaryDirectory(prefix="distripool-bench-chromium-")
            self.proc = subprocess.Popen(
                [
                    exe,
                    "--no-sandbox",
                    "--disable-gpu",
                    f"--user-data-dir={self.profile.name}",
                    "--remote-debugging-port=0",
                    url + "#overview",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                # The command may be a script that starts the browser as a
                # child: a session of its own, ended whole by its group.
                start_new_session=True,
            )
        else:
            self.thread = threading.Thread(target=self._poll, args=(url,), daemon=True)
            self.thread.start()

    def _poll(self, url: str) -> None:
        while not self.stop.wait(1.0):
            for path in ("api/v1/overview", "api/v1/jobs"):
                with urllib.request.urlopen(url + path, timeout=10) as r:
                    r.read()

    def close(self) -> None:
        self.stop.set()
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
            self.profile.cleanup()


def rate(pool, n: int) -> float:
    t0 = time.perf_counter()
    out = pool.map(tiny, range(n), chunksize=1)
    dt = time.perf_counter() - t0
    assert out[-1] == n
    return n / dt


def compare(off, on, n: int, rounds: int) -> tuple[list[float], list[float]]:
    for pool in (off, on):
        rate(pool, n // 4)  # warm: executors up, functions loaded
    rates_off, rates_on = [], []
    for _ in range(rounds):
        rates_off.append(rate(off, n))
        rates_on.append(rate(on, n))
    return rates_off, rates_on


def report(what: str, off: list[float], on: list[float]) -> float:
    m_off, m_on = statistics.median(off), statistics.median(on)
    ratio = m_on / m_off
    print(
        f"| {what} | {m_off / 1e3:.1f} k/s ({min(off) / 1e3:.1f}–{max(off) / 1e3:.1f}) "
        f"| {m_on / 1e3:.1f} k/s ({min(on) / 1e3:.1f}–{max(on) / 1e3:.1f}) | {ratio:.3f} "
        f"| ≥ 0.95 | {'yes' if ratio >= 0.95 else 'no'} |"
    )
    return ratio


def remote_worker(orch, processes: int, key: str):
    env = dict(os.environ, DISTRIPOOL_AUTHKEY=key)
    proc = subprocess.Popen(
        [sys.executable, "-m", "distripool", "worker", "--connect", orch.addresses[0], "-p", str(processes)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if not orch.wait_for_workers(1, timeout=60):
        proc.kill()
        raise RuntimeError("the remote worker did not connect within 60 s")
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--items", type=int, default=20000)
    args = ap.parse_args()
    logging.getLogger("distripool").setLevel(logging.WARNING)  # the table alone
    n, rounds = args.items, args.rounds
    print(
        f"\ndashboard cost: map(tiny, range({n}), chunksize=1), {args.processes} executors, "
        f"median of {rounds} alternating rounds (spread: min–max), {os.cpu_count()} CPUs\n"
    )
    print("| pools | dashboard off | on, browser open | on/off | goal | met |")
    print("|---|---:|---:|---:|---:|:---:|")

    with (
        distripool.Pool(args.processes) as off,
        distripool.Pool(args.processes, dashboard="127.0.0.1:0") as on,
    ):
        browser = Browser(on._orchestrator.dashboard_url)
        try:
            report("embedded", *compare(off, on, n, rounds))
        finally:
            browser.close()

    key = os.urandom(16).hex()
    orch_off = distripool.Orchestrator("127.0.0.1:0", key)
    orch_on = distripool.Orchestrator("127.0.0.1:0", key, dashboard="127.0.0.1:0")
    workers = [remote_worker(o, args.processes, key) for o in (orch_off, orch_on)]
    browser = Browser(orch_on.dashboard_url)
    try:
        with distripool.Pool(orchestrator=orch_off) as off, distripool.Pool(orchestrator=orch_on) as on:
            report("remote worker", *compare(off, on, n, rounds))
    finally:
        browser.close()
        for w in workers:
            w.terminate()
            w.wait(30)
        orch_off.close()
        orch_on.close()
    print(f"\nthe browser: {browser.kind}, on the overview page (it reads the API once a second)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
