"""The hang matrix: every way to submit, crossed with what goes wrong and how
the caller ends, each cell in an interpreter of its own (``hang_cell.py``).

Run as a script to print the whole table, distripool beside the standard
library::

    python tests/hang_matrix.py [--jobs 3] [--lib embedded,remote,stdlib]

``tests/test_hang_matrix.py`` runs the same cells and checks them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CELL = TESTS / "hang_cell.py"

POOL_SUBMITS = ("map", "map_async", "imap", "imap_unordered", "starmap", "apply_async")
EXECUTOR_SUBMITS = ("ex_map", "submit")
SUBMITS = POOL_SUBMITS + EXECUTOR_SUBMITS
FAULTS = ("raise", "segfault", "exit", "task_timeout", "get_timeout", "stop_reading", "cancel", "interrupt")
POOL_ENDINGS = ("close_join", "terminate", "with", "exit")
EXECUTOR_ENDINGS = ("shutdown_wait", "shutdown_cancel", "with", "exit")

# Hard limits per cell, in seconds. Every legitimate cell ends in a few
# seconds; the standard library's own hangs are cut short sooner.
LIMIT = {"embedded": 30.0, "remote": 30.0, "stdlib": 6.0}
# Where a process of the cell may linger after it exits, at most this long.
LINGER = 10.0


def applies(submit: str, fault: str) -> bool:
    if fault in ("get_timeout", "stop_reading"):
        return submit not in ("map", "starmap")  # no timeout, nothing to stop reading
    if fault == "cancel":
        return submit == "submit"  # the only way a caller holds futures to cancel
    return True


def endings(submit: str) -> tuple[str, ...]:
    return EXECUTOR_ENDINGS if submit in EXECUTOR_SUBMITS else POOL_ENDINGS


def cells() -> list[tuple[str, str, str]]:
    return [
        (submit, fault, ending)
        for submit in SUBMITS
        for fault in FAULTS
        if applies(submit, fault)
        for ending in endings(submit)
    ]


# What distripool's caller sees for each fault (the ending does not change it).
EXPECTED = {
    "raise": "ValueError",
    "segfault": "WorkerLostError",
    "exit": "WorkerLostError",
    "task_timeout": "TaskTimeoutError",
    "get_timeout": "TimeoutError",
    "stop_reading": "ok",
    "cancel": "ok",
    "interrupt": "KeyboardInterrupt",
}


@dataclasses.dataclass
class Result:
    lib: str
    submit: str
    fault: str
    ending: str
    outcome: str | None = None  # what the caller saw; None if the cell never got that far
    usable: object = None  # whether a new task ran after the fault
    end_seconds: float | None = None  # how long the ending took
    hung: bool = False  # cut at the hard limit (or by faulthandler)
    left: int = 0  # processes of the cell still alive after it exited
    returncode: int | None = None
    stderr: str = ""

    @property
    def cell(self) -> str:
        return f"{self.lib}/{self.submit}/{self.fault}/{self.ending}"

    def summary(self) -> str:
        if self.hung:
            where = "ending" if self.outcome is not None else "fault"
            return f"HANG in {where}"
        if self.returncode != 0:
            return f"exit {self.returncode}"
        return f"{self.outcome}, {'usable' if self.usable is True else 'unusable'}, {self.end_seconds:.1f}s"


def _group(pgid: int) -> list[int]:
    """Processes still alive in process group ``pgid`` (zombies excluded)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry))
    return found


def run_cell(lib: str, submit: str, fault: str, ending: str) -> Result:
    result = Result(lib, submit, fault, ending)
    limit = LIMIT[lib]
    env = dict(os.environ)
    env.pop("DISTRIPOOL_AUTHKEY", None)
    env.pop("DISTRIPOOL_AUTHKEY_FILE", None)
    proc = subprocess.Popen(
        [sys.executable, str(CELL), lib, submit, fault, ending, str(limit)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        result.hung = True
    exited = time.monotonic()
    result.returncode = proc.returncode
    result.stderr = err.decode(errors="replace")[-6000:]
    if "Timeout (" in result.stderr:  # faulthandler's dump before the limit
        result.hung = True
    exiting = None
    for line in out.decode(errors="replace").splitlines():
        if not line.startswith("CELL "):
            continue
        fields = json.loads(line[5:])
        if "outcome" in fields:
            result.outcome, result.usable = fields["outcome"], fields["usable"]
        if "ended" in fields:
            result.end_seconds = fields["ended"]
        if "exiting" in fields:
            exiting = fields["exiting"]
    if exiting is not None and not result.hung:
        result.end_seconds = exited - exiting
    # Every process the cell started must be gone soon after it exits.
    deadline = time.monotonic() + LINGER
    while _group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling /proc: no event to wait on for another's child
    left = _group(proc.pid)
    result.left = len(left)
    if left:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return result


def run_all(todo, jobs: int = 3) -> list[Result]:
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda args: run_cell(*args), todo))


def table(results: list[Result]) -> str:
    by_cell: dict[tuple[str, str, str], dict[str, Result]] = {}
    libs: list[str] = []
    for r in results:
        by_cell.setdefault((r.submit, r.fault, r.ending), {})[r.lib] = r
        if r.lib not in libs:
            libs.append(r.lib)
    lines = ["| submit | fault | ending | " + " | ".join(libs) + " |", "|---" * (3 + len(libs)) + "|"]
    for (submit, fault, ending), row in by_cell.items():
        cols = [row[lib].summary() if lib in row else "" for lib in libs]
        lines.append(f"| {submit} | {fault} | {ending} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--lib", default="embedded,remote,stdlib")
    ap.add_argument("--submit", default=",".join(SUBMITS))
    args = ap.parse_args()
    libs = args.lib.split(",")
    submits = args.submit.split(",")
    todo = [
        (lib, *cell)
        for cell in cells()
        if cell[0] in submits
        for lib in libs
        if not (lib == "stdlib" and cell[1] == "task_timeout")
    ]
    started = time.monotonic()
    results = run_all(todo, args.jobs)
    print(table(results))
    ours = [r for r in results if r.lib != "stdlib"]
    hangs = [r for r in ours if r.hung]
    print(
        f"\n{len(results)} cells in {time.monotonic() - started:.0f} s; "
        f"distripool: {len(ours)} cells, {len(hangs)} hung, "
        f"{sum(1 for r in ours if r.left)} left processes behind"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
