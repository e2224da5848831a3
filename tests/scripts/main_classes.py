"""A driver script whose classes are arguments and results, and whose
function raises, as users write them: ``python main_classes.py KIND MARKER``. KIND is ``multiprocessing``,
``distripool`` (the embedded default) or ``distripool-remote`` (a worker in
another process and directory, started here). The script deletes itself
before the pool runs anything, so executors can only have its source from
the driver. It prints ``ok`` when every check passed."""

import dataclasses
import multiprocessing
import os
import subprocess
import sys
import tempfile

import distripool


@dataclasses.dataclass
class Job:
    n: int


@dataclasses.dataclass
class Out:
    n: int
    pid: int


def work(job):
    # The argument's class is this module's, as the function sees it.
    assert type(job) is Job, (type(job), Job)
    return Out(job.n * 2, os.getpid())


def fails(x):
    raise ValueError(f"bad item {x}")


def check_traceback(pool, line):
    try:
        pool.apply(fails, (1,))
    except ValueError as exc:
        tb = str(exc.__cause__)
    else:
        raise AssertionError("fails() did not raise")
    assert f'File "{__file__}", line {fails.__code__.co_firstlineno + 1}, in fails' in tb, tb
    assert ('raise ValueError(f"bad item {x}")' in tb) == (line == "line shown"), tb


def remote_pool():
    key = os.urandom(16).hex()
    here = tempfile.mkdtemp()
    key_file = os.path.join(here, "key")
    with open(os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(key)
    orch = distripool.Orchestrator("127.0.0.1:0", authkey=key)
    argv = [sys.executable, "-m", "distripool", "worker", "--processes", "2"]
    argv += ["--connect", orch.addresses[0], "--authkey-file", key_file]
    # Started elsewhere, so that nothing of this script's directory helps it.
    worker = subprocess.Popen(argv, cwd=here, stdin=subprocess.DEVNULL)
    if not orch.wait_for_workers(1, timeout=60):
        worker.kill()
        raise SystemExit("the worker did not connect within 60 s")
    return distripool.Pool(orchestrator=orch), worker


if __name__ == "__main__":
    kind, marker = sys.argv[1], sys.argv[2]
    # Executors must not run this block: each run appends a line.
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\n")
    worker = None
    if kind == "multiprocessing":
        pool = multiprocessing.Pool(2)
    elif kind == "distripool":
        pool = distripool.Pool(2)
    else:
        pool = remote_pool()
        pool, worker = pool
    try:
        # The traceback names this file and shows the line.
        check_traceback(pool, "line shown")
        os.unlink(__file__)
        out = pool.map(work, [Job(1), Job(2), Job(3)], chunksize=1)
        assert [type(r) for r in out] == [Out, Out, Out], [type(r) for r in out]
        assert [r.n for r in out] == [2, 4, 6], out
        assert all(r.pid != os.getpid() for r in out), out
        # Results that hold the script's classes, through every path.
        assert pool.apply(work, (Job(5),)).n == 10
        assert type(pool.apply_async(work, (Job(6),)).get(60)) is Out
        assert sorted(r.n for r in pool.imap_unordered(work, [Job(7), Job(8)])) == [14, 16]
        # With the file gone, multiprocessing's workers can no longer show
        # the line; distripool's show it from the source they were sent.
        check_traceback(pool, "line shown" if kind != "multiprocessing" else "line gone")
        print("ok")
    finally:
        pool.terminate()
        pool.join()
        if worker is not None:
            worker.terminate()
            worker.wait(30)
