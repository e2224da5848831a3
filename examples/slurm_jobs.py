"""Two Slurm jobs as workers: a map whose tasks say which job ran them.

Run it where Slurm's commands work (a login node):

    python examples/slurm_jobs.py

It prints the job script, the jobs' status, squeue during the map, the
map's jobs, and squeue after close(): no job is left.
"""

from __future__ import annotations

import logging
import os
import subprocess

from distripool import Pool
from distripool.deploy import SlurmCluster


def which_job(x: int) -> tuple[str | None, int]:
    return os.environ.get("SLURM_JOB_ID"), x * x


def squeue(title: str) -> None:
    out = subprocess.run(["squeue", "--me"], capture_output=True, text=True).stdout
    print(f"--- squeue {title}\n{out}", end="", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cluster = SlurmCluster(jobs=2, walltime="00:10:00")
    print(cluster.job_script())
    assert cluster.orchestrator.wait_for_workers(2, timeout=300), cluster.status()
    for row in cluster.status():
        print(row)
    with Pool() as pool:
        result = pool.map_async(which_job, range(20), chunksize=1)
        squeue("during the map")
        out = result.get()
    print("squares:", [sq for _, sq in out])
    print("jobs that ran tasks:", sorted({str(job) for job, _ in out}))
    cluster.close()
    squeue("after close()")
