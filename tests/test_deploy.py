"""The launchers without an engine: their arguments, the job script they
write, the address workers dial, and what they refuse."""

from __future__ import annotations

import logging
import os

import pytest

from distripool import Orchestrator
from distripool._orchestrator import default_orchestrator
from distripool.deploy import SlurmCluster, SSHCluster
from distripool.deploy._address import choose_connect
from distripool.deploy._cluster import last_error
from distripool.deploy._slurm import format_walltime, parse_memory


@pytest.fixture
def orch():
    o = Orchestrator(("0.0.0.0:0",), authkey="k" * 32)
    yield o
    o.close()


@pytest.mark.parametrize(
    ("memory", "mib"),
    [("4GB", 4096), ("512MiB", 512), ("1.5G", 1536), (" 2 gb ", 2048), (1 << 30, 1024), ("100M", 100)],
)
def test_memory_is_read_as_slurm_counts_it(memory, mib):
    assert parse_memory(memory) == mib


@pytest.mark.parametrize("memory", ["lots", "4 apples", "12", "-1GB", 0, True, 1.5])
def test_bad_memory_is_refused(memory):
    with pytest.raises((ValueError, TypeError), match="memory"):
        parse_memory(memory)


@pytest.mark.parametrize(
    ("walltime", "text"),
    [
        (60, "00:01:00"),
        (90, "00:02:00"),
        ("01:30:00", "01:30:00"),
        ("2-00:00:00", "2-00:00:00"),
        ("45", "00:45:00"),
    ],
)
def test_walltime_becomes_slurm_s_form(walltime, text):
    assert format_walltime(walltime) == text


@pytest.mark.parametrize("walltime", ["soon", "1:2:3:4", 0, -5, float("inf"), True])
def test_bad_walltime_is_refused(walltime):
    with pytest.raises((ValueError, TypeError), match="walltime"):
        format_walltime(walltime)


def test_the_job_script_names_the_key_file_and_follows_the_directives(orch, tmp_path):
    cluster = SlurmCluster(
        processes=4,
        memory="2GB",
        walltime="00:30:00",
        partition="gpu",
        account="proj",
        directives=["--qos=long", "#SBATCH --exclusive"],
        skip_directives=["--account"],
        env={"OMP_NUM_THREADS": "1"},
        orchestrator=orch,
        connect="10.0.0.5:4000",
        log_dir=tmp_path,
    )
    with cluster:
        script = cluster.job_script()
        key_file = cluster._state.key_path
        assert os.stat(key_file).st_mode & 0o077 == 0, "the key file is private"
        with open(key_file, "rb") as f:
            assert f.read().strip() == b"k" * 32
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    for want in (
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=2048M",
        "#SBATCH --time=00:30:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --qos=long",
        "#SBATCH --exclusive",
        "export OMP_NUM_THREADS=1",
    ):
        assert want in lines, (want, script)
    assert "--account" not in script
    assert "k" * 32 not in script
    assert f"--authkey-file {key_file}" in script and "--connect 10.0.0.5:4000" in script
    assert "--processes 4" in script
    assert not os.path.exists(key_file), "close() removes the key file"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"jobs": -1}, ValueError, "jobs"),
        ({"jobs": "2"}, TypeError, "jobs"),
        ({"processes": 0}, ValueError, "processes"),
        ({"cores": 0}, ValueError, "cores"),
        ({"partition": "a b"}, ValueError, "partition"),
        ({"directives": "--qos=x"}, TypeError, "directives"),
        ({"directives": ["a\nb"]}, ValueError, "directives"),
        ({"env": {"DISTRIPOOL_AUTHKEY": "x"}}, ValueError, "key"),
        ({"env": {"1X": "x"}}, ValueError, "environment variable"),
        ({"connect": "nohost"}, ValueError, "host:port"),
        ({"orchestrator": "localhost:1337"}, TypeError, "Orchestrator"),
    ],
)
def test_bad_slurm_arguments_are_refused_and_leave_nothing(kwargs, error, match, tmp_path):
    with pytest.raises(error, match=match):
        SlurmCluster(log_dir=tmp_path, **kwargs)
    assert default_orchestrator() is None, "no orchestrator left behind"
    assert not list(tmp_path.glob("*.key"))


@pytest.mark.parametrize(
    ("hosts", "kwargs", "error"),
    [
        ([], {}, ValueError),
        (["-oProxyCommand=x"], {}, ValueError),
        ([3], {}, TypeError),
        (["h"], {"ssh_options": "-p 22"}, TypeError),
        (["h"], {"processes": 0}, ValueError),
    ],
)
def test_bad_ssh_arguments_are_refused(hosts, kwargs, error):
    with pytest.raises(error):
        SSHCluster(hosts, **kwargs)
    assert default_orchestrator() is None


def test_a_tls_orchestrator_is_refused_with_the_reason(tmp_path):
    orch = Orchestrator.__new__(Orchestrator)
    from distripool._orchestrator import JoinSettings

    orch._join = JoinSettings(b"", "default", True, True)
    orch._native = Orchestrator(("127.0.0.1:0",))._native
    try:
        with pytest.raises(ValueError, match="TLS"):
            SlurmCluster(orchestrator=orch, log_dir=tmp_path)
    finally:
        orch._native.close()


def test_workers_on_this_host_dial_loopback_and_the_choice_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="distripool.deploy"):
        assert choose_connect(["0.0.0.0:4000"], "127.0.0.1", "node n1") == ["127.0.0.1:4000"]
    assert "workers will dial 127.0.0.1:4000: node n1 (127.0.0.1) is this host" in caplog.text


def test_loopback_is_never_chosen_for_another_host():
    with pytest.raises(ValueError, match="listens only on 127.0.0.1:4000"):
        choose_connect(["127.0.0.1:4000"], "192.0.2.77", "host far")


def test_the_error_a_worker_logged_is_found_in_its_log():
    log = (
        "2026-12-01T22:08:06.878548Z  INFO connecting\n"
        "2026-12-01T22:08:07.878548Z ERROR authentication with orchestrator 10.0.0.1:1337 failed: "
        "this worker has no key set; retrying with backoff\n"
        "2026-12-01T22:08:08.878548Z DEBUG refused again\n"
    )
    assert last_error(log).startswith("authentication with orchestrator 10.0.0.1:1337 failed")
    assert last_error("/usr/bin/python3: No module named distripool\n") == (
        "/usr/bin/python3: No module named distripool"
    )
    assert last_error("") == ""


@pytest.mark.parametrize("command", ["slurm", "ssh", "kubernetes"])
def test_each_launcher_command_has_help_with_examples(command):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "distripool", command, "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "examples:" in out.stdout and f"distripool {command} " in out.stdout
