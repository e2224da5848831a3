"""Workers as Slurm jobs, on a real one-node Slurm (``slurm_node.py``):
real ``sbatch``, ``squeue`` and ``scancel``, and jobs whose workers dial
the driver's orchestrator."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import slurm_node
from conftest import TESTS, wait_until
from distripool import Orchestrator, Pool
from distripool.deploy import LaunchError, SlurmCluster, _cluster

_MISSING = slurm_node.missing()

pytestmark = [
    pytest.mark.skipif(_MISSING is not None and not os.environ.get("CI"), reason=str(_MISSING)),
]

ENV = {"PYTHONPATH": str(TESTS)}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if _MISSING is not None:
        pytest.fail(f"the Slurm tests {_MISSING}; CI is set, so this is a failure, not a skip")
    node = slurm_node.SlurmNode(tmp_path_factory.mktemp("slurm")).start()
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(node.conf)
    try:
        yield node
    finally:
        if before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = before
        node.stop()


@pytest.fixture
def orch():
    o = Orchestrator(("0.0.0.0:0",), authkey=os.urandom(16).hex())
    yield o
    o.close()


def job_and_square(x):
    return os.environ.get("SLURM_JOB_ID"), x * x


def nap(x):
    time.sleep(0.5)
    return x


def tiny(x):
    time.sleep(0.002)
    return x * 3


def ours(node, cluster) -> list[str]:
    name = f"distripool-{cluster._state.id}"
    return [line for line in node.jobs() if line.endswith(name)]


def test_two_jobs_run_a_map_and_close_leaves_no_job(slurm, tmp_path, capsys):
    with SlurmCluster(jobs=2, env=ENV, log_dir=tmp_path) as cluster:
        assert cluster.orchestrator.wait_for_workers(2, timeout=60), cluster.logs()
        jobs = {row["job"] for row in cluster.status()}
        assert [row["state"] for row in cluster.status()] == ["connected", "connected"]
        with Pool() as pool:
            result = pool.map_async(job_and_square, range(40), chunksize=1)
            during = ours(slurm, cluster)
            out = result.get(60)
        assert [sq for _, sq in out] == [x * x for x in range(40)]
        assert {job for job, _ in out} == jobs, "the tasks ran in both jobs"
        assert len(during) == 2 and all(" RUNNING " in line for line in during), during
        key_file = cluster._state.key_path
        assert "--authkey-file" in cluster.job_script() and cluster.orchestrator._join.key.decode() not in (
            cluster.job_script() + "".join(slurm.run("scontrol", "show", "job", j).stdout for j in jobs)
        )
    assert ours(slurm, cluster) == []
    assert {row["state"] for row in cluster.status()} == {"gone"}
    assert not os.path.exists(key_file), "the key file is removed"
    assert cluster.orchestrator.closed, "the orchestrator it made is closed with it"
    cluster.close()  # idempotent


def test_a_job_that_cannot_start_shows_the_schedulers_reason(slurm, orch, tmp_path):
    with SlurmCluster(jobs=1, cores=8, orchestrator=orch, log_dir=tmp_path) as cluster:
        with pytest.raises(LaunchError, match="sbatch refused the job"):
            cluster.dry_run()
        rows = wait_until(
            lambda: [r for r in cluster.status() if r["state"] == "queued" and r["reason"]], 30, "a reason"
        )
        assert rows[0]["reason"] in ("PartitionConfig", "Resources", "ReqNodeNotAvail"), rows
        print(rows)
    assert ours(slurm, cluster) == []


def test_a_directive_the_site_rejects_is_fixed_with_skip_and_add(slurm, orch, tmp_path):
    with pytest.raises(LaunchError, match="this site does not take --mem") as refused:
        SlurmCluster(jobs=1, partition="policed", memory="1GB", orchestrator=orch, log_dir=tmp_path)
    assert "skip_directives" in str(refused.value)
    print(refused.value)
    fixed = SlurmCluster(
        partition="policed",
        memory="1GB",
        skip_directives=["--mem"],
        directives=["--comment=proj-42"],
        env=ENV,
        orchestrator=orch,
        log_dir=tmp_path,
    )
    with fixed:
        script = fixed.job_script()
        assert "--mem" not in script and "#SBATCH --comment=proj-42" in script
        assert "would start" in fixed.dry_run() or "to start" in fixed.dry_run()
        fixed.scale(1)
        assert orch.wait_for_workers(1, timeout=60), fixed.logs()
        with Pool(orchestrator=orch) as pool:
            assert pool.map(tiny, range(10)) == [x * 3 for x in range(10)]
    assert ours(slurm, fixed) == []


DRIVER = """
import sys
from distripool.deploy import SlurmCluster
cluster = SlurmCluster(jobs=2, log_dir=sys.argv[1])
assert cluster.orchestrator.wait_for_workers(2, timeout=60), cluster.logs()
print(",".join(r["job"] for r in cluster.status()), flush=True)
# no close(): leaving must stop the jobs
"""


def test_a_driver_that_exits_without_close_leaves_no_job(slurm, tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    jobs = out.stdout.strip().split(",")
    assert len(jobs) == 2
    listed = {line.split()[0] for line in slurm.jobs()}
    assert not listed & set(jobs), slurm.jobs()


def test_a_cluster_nobody_holds_is_collected_and_its_jobs_cancelled(slurm, orch, tmp_path):
    import gc
    import weakref

    def start():
        cluster = SlurmCluster(jobs=1, env=ENV, orchestrator=orch, log_dir=tmp_path)
        assert orch.wait_for_workers(1, timeout=60), cluster.logs()
        return weakref.ref(cluster), f"distripool-{cluster._state.id}"

    ref, name = start()
    gc.collect()
    assert ref() is None
    assert [line for line in slurm.jobs() if line.endswith(name)] == []


@pytest.mark.timeout(300)
def test_the_walltime_loses_nothing(slurm, orch, tmp_path):
    # 160 tasks of 0.5 s on one executor: 80 s, more than a 1-minute job.
    with SlurmCluster(jobs=1, walltime=60, env=ENV, orchestrator=orch, log_dir=tmp_path) as cluster:
        with Pool(orchestrator=orch) as pool:
            assert pool.map(nap, range(160), chunksize=1) == list(range(160))
        rows = cluster.status()
    print(rows)
    assert len(rows) >= 2, "the first job ended at its time limit and another took over"
    first = cluster.logs()[rows[0]["job"]]
    assert "time limit reached" in first, first
    events = orch.events()
    kinds = [e["kind"] for e in events]
    assert "task_retried" not in kinds and "worker_lost" not in kinds, events
    assert orch.stats()["crashes"] == 0


@pytest.mark.timeout(300)
def test_elastic_map_while_adapt_goes_0_4_1_0_is_exact_and_retries_nothing(
    slurm, orch, tmp_path, monkeypatch
):
    monkeypatch.setattr(_cluster, "SCALE_IN_AFTER", 1.0)
    with SlurmCluster(env=ENV, orchestrator=orch, log_dir=tmp_path) as cluster:
        cluster.adapt(minimum=0, maximum=4)
        with Pool(orchestrator=orch) as pool:
            result = pool.map_async(tiny, range(10_000), chunksize=1)
            wait_until(lambda: orch.workers == 4, 90, "4 workers")
            peak = orch.workers
            wait_until(lambda: orch.stats()["tasks_done"] >= 2000, 120, "2000 tasks done")
            cluster.adapt(minimum=0, maximum=1)
            wait_until(lambda: orch.workers == 1, 90, "the cluster to drain down to 1")
            middle = orch.workers
            assert result.get(240) == [x * 3 for x in range(10_000)]
        wait_until(
            lambda: {r["state"] for r in cluster.status()} == {"gone"}, 60, "the cluster to scale to 0"
        )
    stats = orch.stats()
    events = orch.events()
    retried = [e for e in events if e["kind"] == "task_retried"]
    print(f"peak {peak}, middle {middle}, jobs {len(cluster.status())}, retried {len(retried)}, {stats}")
    assert (peak, middle) == (4, 1)
    assert retried == [] and stats["workers_lost"] == 0 and stats["crashes"] == 0, events
    assert stats["workers_left"] == len(cluster.status()) >= 4


def test_the_slurm_command_runs_jobs_for_an_orchestrator_elsewhere(slurm, orch, tmp_path):
    key_file = tmp_path / "cluster.key"
    key_file.write_bytes(orch._join.key)
    key_file.chmod(0o600)
    port = orch.addresses[0].rpartition(":")[2]
    argv = [sys.executable, "-m", "distripool", "slurm", "--jobs", "1", "--connect", f"127.0.0.1:{port}"]
    argv += ["--authkey-file", str(key_file), "--log-dir", str(tmp_path), "--env", f"PYTHONPATH={TESTS}"]
    script = subprocess.run([*argv, "--script"], capture_output=True, text=True, timeout=60)
    assert script.returncode == 0 and script.stdout.startswith("#!/usr/bin/env bash"), script.stderr
    assert orch._join.key.decode() not in script.stdout
    dry = subprocess.run([*argv, "--dry-run"], capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and "to start" in dry.stdout, dry.stderr
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as cli:
        try:
            assert orch.wait_for_workers(1, timeout=60)
            with Pool(orchestrator=orch) as pool:
                assert pool.map(tiny, range(20)) == [x * 3 for x in range(20)]
            assert orch.drain(orch.workers_info()[0]["id"])
            out, err = cli.communicate(timeout=60)
        finally:
            if cli.poll() is None:
                cli.kill()
    print(out)
    assert cli.returncode == 0, err
    assert out.splitlines()[0].split() == ["JOB", "NODE", "STATE", "AGE", "DETAIL"]
    assert " gone " in out.splitlines()[-1] and "drained" in out.splitlines()[-1], out
