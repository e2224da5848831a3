"""The hang matrix (see ``hang_matrix.py``): every way to submit work, crossed
with every way it can go wrong and every way the caller ends the pool, each
cell in an interpreter of its own under a hard limit.

For distripool, embedded and with a remote worker, every cell must end well
within its limit, show the caller the expected exception, leave the pool
usable, and leave no process behind. The same cell runs against the standard
library's pool or executor; where its outcome differs from ours, the
difference must be one of the deliberate ones below (each is a line of
``docs/api.md``).
"""

from __future__ import annotations

import pytest

from hang_matrix import EXECUTOR_SUBMITS, EXPECTED, SUBMITS, Result, cells, run_all, table

# Deliberate differences from the standard library, as (faults, submits,
# endings, what the standard library does); None matches any.
POOL, EXECUTOR = tuple(s for s in SUBMITS if s not in EXECUTOR_SUBMITS), EXECUTOR_SUBMITS
DELIBERATE = [
    # multiprocessing.Pool loses the task of a worker that dies: get() waits for ever.
    (("segfault", "exit"), POOL, None, "hangs"),
    # ProcessPoolExecutor breaks for good: every pending future fails.
    (("segfault", "exit"), EXECUTOR, None, "BrokenProcessPool, unusable"),
]


def _differs(ours: Result, std: Result) -> bool:
    """Whether the caller saw something else. A standard-library cell that
    got through the fault and then hung or lingered in its ending is not a
    difference to declare: ours must end anyway (``_problems``), and the
    standard library's exit path does hang now and then."""
    return std.outcome != ours.outcome or (std.usable is True) != (ours.usable is True)


def _deliberate(r: Result) -> bool:
    return any(
        (faults is None or r.fault in faults)
        and (submits is None or r.submit in submits)
        and (endings is None or r.ending in endings)
        for faults, submits, endings, _ in DELIBERATE
    )


def _problems(r: Result) -> list[str]:
    problems = []
    if r.hung:
        problems.append("hung")
    elif r.returncode != 0:
        problems.append(f"exited with {r.returncode}")
    if r.outcome != EXPECTED[r.fault]:
        problems.append(f"caller saw {r.outcome}, expected {EXPECTED[r.fault]}")
    if r.usable is not True:
        problems.append(f"pool unusable after the fault ({r.usable})")
    if r.left:
        problems.append(f"{r.left} processes left behind")
    return problems


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("submit", SUBMITS)
def test_hang_matrix(submit):
    todo = [
        (lib, *cell)
        for cell in cells()
        if cell[0] == submit
        for lib in ("embedded", "remote", "stdlib")
        # The standard library has no task_timeout to compare with.
        if not (lib == "stdlib" and cell[1] == "task_timeout")
    ]
    results = run_all(todo, jobs=4)
    report = []
    std = {(r.submit, r.fault, r.ending): r for r in results if r.lib == "stdlib"}
    for r in results:
        if r.lib == "stdlib":
            continue
        for problem in _problems(r):
            report.append(f"{r.cell}: {problem}\n{r.stderr}")
        s = std.get((r.submit, r.fault, r.ending))
        if s is not None and r.lib == "embedded" and _differs(r, s) and not _deliberate(r):
            report.append(
                f"{r.cell}: differs from the standard library ({s.summary()} there, {r.summary()} here) "
                "and is not a declared difference"
            )
    assert not report, "\n".join(report) + "\n\n" + table(results)
