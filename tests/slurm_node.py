"""A one-node Slurm cluster on this machine, for the tests: munged,
slurmctld and slurmd, each started here and stopped by its PID.

The node runs as root with ``proctrack/pgid``, ``task/none`` and no
accounting; it declares 4 CPUs and 4000 MB whatever the machine has
(``config_overrides``), so that four one-CPU jobs run at once. A
``job_submit.lua`` plays a site's policy in the partition ``policed`` (the
same node): jobs may not ask for memory (``--mem``), and must name their
project (``--comment``).

Also runs by itself (``python tests/slurm_node.py DIR``) for a shell to try
things in: it prints the ``SLURM_CONF`` to export and waits for Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")

POLICY = """\
function slurm_job_submit(job_desc, part_list, submit_uid)
   if job_desc.partition == "policed" then
      if job_desc.pn_min_memory ~= slurm.NO_VAL64 then
         slurm.log_user("this site does not take --mem: memory comes with the CPUs")
         return slurm.ERROR
      end
      if job_desc.comment == nil or job_desc.comment == "" then
         slurm.log_user("every job must name its project with --comment=PROJECT")
         return slurm.ERROR
      end
   end
   return slurm.SUCCESS
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
   return slurm.SUCCESS
end
"""


def missing() -> str | None:
    """Why a Slurm node cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    absent = [d for d in DAEMONS if shutil.which(d) is None and not os.path.exists(f"/usr/sbin/{d}")]
    if absent:
        return f"needs slurm-wlm and munge ({', '.join(absent)} not found)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmNode:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout: float = 60.0) -> SlurmNode:
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        sock = r / "munge.sock"
        self._spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                "--force",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--pid-file={r / 'munged.pid'}",
                f"--log-file={r / 'log' / 'munged.log'}",
                f"--seed-file={r / 'munged.seed'}",
            ],
        )
        self._wait(lambda: sock.exists(), timeout, "munged's socket")
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=distripooltest",
                    f"SlurmctldHost={host}(127.0.0.1)",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    f"AuthInfo=socket={sock}",
                    "CredType=cred/munge",
                    f"StateSaveLocation={r / 'state'}",
                    f"SlurmdSpoolDir={r / 'spool'}",
                    f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                    f"SlurmdPidFile={r / 'slurmd.pid'}",
                    f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
                    "ProctrackType=proctrack/pgid",
                    "TaskPlugin=task/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "JobCompType=jobcomp/none",
                    "JobSubmitPlugins=lua",
                    "SchedulerType=sched/backfill",
                    "SchedulerParameters=sched_interval=1",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "SlurmdParameters=config_overrides",
                    "ReturnToService=2",
                    "MpiDefault=none",
                    "KillWait=5",
                    "MinJobAge=2",
                    "InactiveLimit=0",
                    "NodeName=dpnode NodeAddr=127.0.0.1 CPUs=4 RealMemory=4000 State=UNKNOWN",
                    "PartitionName=debug Nodes=dpnode Default=YES MaxTime=INFINITE State=UP",
                    "PartitionName=policed Nodes=dpnode MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        (r / "job_submit.lua").write_text(POLICY)
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", "dpnode"])
        self._wait(self._node_idle, timeout, "the node to be idle in sinfo")
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.root / "log" / f"{name}.out", "wb") as out:
            self.procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env))

    def _node_idle(self) -> bool:
        out = self.run("sinfo", "--noheader", "--format=%t")
        return out.returncode == 0 and set(out.stdout.split()) == {"idle"}

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                logs = "\n".join(
                    f"--- {f.name}\n{f.read_text(errors='replace')[-2000:]}"
                    for f in (self.root / "log").iterdir()
                )
                raise RuntimeError(f"Slurm did not start ({what}; exited: {dead}):\n{logs}")
            time.sleep(0.1)  # daemons starting: nothing to wait on but their state

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), capture_output=True, text=True, env=self.env, timeout=60)

    def jobs(self) -> list[str]:
        """``squeue`` as lines ``id state reason name``, every job of the node."""
        out = self.run("squeue", "--noheader", "--format=%i %T %r %j")
        assert out.returncode == 0, out.stderr
        return [line.strip() for line in out.stdout.splitlines() if line.strip()]

    def stop(self) -> None:
        if any(p.poll() is None for p in self.procs):
            self.run("scancel", "--full", f"--user={os.geteuid()}")
            # Until every job has ended: slurmd's job steps outlive it otherwise.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                out = self.run("squeue", "--noheader", "--format=%i")
                if out.returncode != 0 or not out.stdout.strip():
                    break
                time.sleep(0.2)  # Slurm ending its jobs: nothing to wait on but squeue
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self.procs.clear()


if __name__ == "__main__":
    node = SlurmNode(Path(sys.argv[1]).resolve()).start()
    print(f"export SLURM_CONF={node.conf}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
