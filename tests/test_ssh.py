"""Workers on SSH hosts: the driver runs on one network-namespace host and
starts workers with the system ``ssh`` on others, each running a real sshd.
Each test's driver prints what it saw as JSON; the test checks it."""

from __future__ import annotations

import json
import os
import sys

import pytest

import ssh_hosts

_MISSING = ssh_hosts.missing()

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(_MISSING is not None and not os.environ.get("CI"), reason=str(_MISSING)),
]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    if _MISSING is not None:
        pytest.fail(f"the SSH tests {_MISSING}; CI is set, so this is a failure, not a skip")
    h = ssh_hosts.Hosts(tmp_path_factory.mktemp("ssh"), 3)
    try:
        yield h.start()
    finally:
        h.stop()


PRELUDE = r"""
import json, logging, os, sys, time
logging.basicConfig(level=logging.INFO, format="%(name)s: %(levelname)s: %(message)s")
from distripool import Pool
from distripool.deploy import SSHCluster, _cluster
options = json.loads(sys.argv[1])
hosts = json.loads(sys.argv[2])
env = {"PYTHONPATH": os.environ["PYTHONPATH"]}

def wait(pred, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)

def where(x):
    return os.readlink("/proc/self/ns/net"), x * x
"""

MAP = (
    PRELUDE
    + r"""
cluster = SSHCluster(hosts, processes=1, python=sys.executable, env=env, ssh_options=options)
assert cluster.orchestrator.wait_for_workers(2, timeout=60), cluster.logs()
status = cluster.status()
pids = [w["pid"] for w in cluster.orchestrator.workers_info()]
with Pool() as pool:
    out = pool.map(where, range(40), chunksize=1)
log_dir = os.path.dirname(status[0]["log"])
had_logs = sorted(os.listdir(log_dir))
cluster.close()
alive = []
for pid in pids:
    try:
        os.kill(pid, 0)
        alive.append(pid)
    except ProcessLookupError:
        pass
print(json.dumps({
    "status": status,
    "after": cluster.status(),
    "squares": [sq for _, sq in out],
    "namespaces": sorted({ns for ns, _ in out}),
    "mine": os.readlink("/proc/self/ns/net"),
    "alive": alive,
    "had_logs": had_logs,
    "logs_left": os.path.exists(log_dir),
}))
"""
)


def run(hosts, code: str, targets: list[str], timeout: float = 150) -> dict:
    out = hosts.run_driver(code, json.dumps(hosts.ssh_options()), json.dumps(targets), timeout=timeout)
    assert out.returncode == 0, f"driver failed:\n{out.stderr}"
    sys.stderr.write(out.stderr)  # what the user sees: the launcher's log
    return json.loads(out.stdout)


def test_a_map_runs_on_two_ssh_hosts_and_close_stops_their_workers(hosts):
    two = list(hosts.hosts.values())[:2]
    seen = run(hosts, MAP, two)
    print(json.dumps(seen["status"], indent=1))
    assert [r["state"] for r in seen["status"]] == ["connected", "connected"]
    assert sorted(r["host"] for r in seen["status"]) == sorted(two)
    assert seen["squares"] == [x * x for x in range(40)]
    assert len(seen["namespaces"]) == 2 and seen["mine"] not in seen["namespaces"]
    assert {r["state"] for r in seen["after"]} == {"gone"}
    assert seen["alive"] == [], "a worker outlived close()"
    assert len(seen["had_logs"]) == 2, seen["had_logs"]
    assert not seen["logs_left"], "the workers' log directory outlived close()"


FAILURES = (
    PRELUDE
    + r"""
_cluster.CONNECT_GRACE = float(sys.argv[3])
case = sys.argv[4]
# The system's own Python, which has no distripool.
python = "/usr/bin/python3" if case == "no-distripool" else sys.executable
cluster = SSHCluster(hosts, python=python, env=env, ssh_options=options)
def settled():
    rows = cluster.status()
    return all(r["state"] == "gone" or r["error"] for r in rows) and rows
wait(settled, "every host to fail or say why", timeout=90)
status = cluster.status()
logs = cluster.logs()
cluster.close()
print(json.dumps({"status": status, "logs": logs}))
"""
)


def failing(hosts, case: str, target: str, grace: float = 60.0) -> dict:
    out = hosts.run_driver(
        FAILURES,
        json.dumps(hosts.ssh_options()),
        json.dumps([target]),
        str(grace),
        case,
        timeout=150,
    )
    assert out.returncode == 0, f"driver failed:\n{out.stderr}"
    seen = json.loads(out.stdout)
    seen["stderr"] = out.stderr
    print(f"--- {case}: status\n{json.dumps(seen['status'], indent=1)}\n--- log\n{out.stderr}")
    return seen


def test_a_host_that_cannot_be_reached_is_named_with_ssh_s_reason(hosts):
    target = hosts.unreachable()
    seen = failing(hosts, "unreachable", target)
    row = seen["status"][0]
    assert row["state"] == "gone" and "255" in row["reason"], row
    assert target in row["error"] and ("No route to host" in row["error"] or "timed out" in row["error"]), row
    assert f"on {target} ended before its worker connected" in seen["stderr"]


def test_a_host_whose_python_lacks_distripool_says_so_and_names_the_host(hosts):
    target = list(hosts.hosts.values())[0]
    seen = failing(hosts, "no-distripool", target)
    row = seen["status"][0]
    assert row["state"] == "gone" and "No module named distripool" in row["error"], row
    assert f"host {target}#" in seen["stderr"] and "No module named distripool" in seen["stderr"]


def test_a_host_that_cannot_reach_the_orchestrator_shows_it_in_status(hosts):
    hosts.block_outgoing(2)
    target = list(hosts.hosts.values())[2]
    seen = failing(hosts, "blocked", target, grace=5.0)
    row = seen["status"][0]
    assert row["state"] == "running", row
    assert "not available" in row["error"] and "retrying" in row["error"], row
    assert "its worker has not connected" in seen["stderr"]


COMMAND = (
    PRELUDE
    + r"""
import subprocess, tempfile
from distripool import Orchestrator
orch = Orchestrator(("0.0.0.0:0",), authkey="c" * 32)
port = orch.addresses[0].rpartition(":")[2]
key_file = os.path.join(tempfile.mkdtemp(), "key")
with open(key_file, "w") as f:
    f.write("c" * 32)
os.chmod(key_file, 0o600)
mine = hosts[0].rsplit(".", 1)[0] + ".1"
argv = [sys.executable, "-m", "distripool", "ssh", *hosts, "--connect", f"{mine}:{port}", "--authkey-file", key_file,
        "--python", sys.executable, "--processes", "1", "--env", "PYTHONPATH=" + os.environ["PYTHONPATH"]]
argv += ["--ssh-option=" + o for o in options]
cli = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
assert orch.wait_for_workers(1, timeout=60), cli.stderr.read() if cli.poll() is not None else "no worker"
with Pool(orchestrator=orch) as pool:
    squares = [sq for _, sq in pool.map(where, range(10))]
orch.drain(orch.workers_info()[0]["id"])
out, err = cli.communicate(timeout=60)
print(json.dumps({"squares": squares, "out": out, "err": err, "rc": cli.returncode}))
"""
)


def test_the_ssh_command_starts_workers_for_an_orchestrator_elsewhere(hosts):
    seen = run(hosts, COMMAND, list(hosts.hosts.values())[:1])
    print(seen["out"])
    assert seen["rc"] == 0, seen["err"]
    assert seen["squares"] == [x * x for x in range(10)]
    lines = seen["out"].splitlines()
    assert lines[0].split() == ["NAME", "HOST", "STATE", "AGE", "DETAIL"], lines
    assert " gone " in lines[-1], lines
