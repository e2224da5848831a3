"""Mutual TLS 1.3: both sides present certificates signed by the site's CA.

The certificates are made for each test module with the ``openssl`` command
(``.ci/run`` installs it):
a CA, an orchestrator certificate for 127.0.0.1, a worker certificate, and a
worker certificate from another CA that must be refused.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import wait_until
from distripool import Orchestrator, Pool, make_orchestrator
from test_security import Recorder, square


def _openssl(command: str, cwd):
    subprocess.run(["openssl", *command.split()], cwd=cwd, check=True, capture_output=True, timeout=60)


EC = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"


def _issue(d, name, ca, ext):
    _openssl(f"req {EC} -keyout {name}.key -out {name}.csr -subj /CN={name}", cwd=d)
    (d / f"{name}.ext").write_text(ext)
    _openssl(
        f"x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial "
        f"-out {name}.pem -days 2 -extfile {name}.ext",
        cwd=d,
    )
    (d / f"{name}.key").chmod(0o600)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        _openssl(
            f"req -x509 {EC} -keyout {ca}.key -out {ca}.pem -days 2 -subj /CN={ca} "
            "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign",
            cwd=d,
        )
    leaf = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
    _issue(d, "orchestrator", "ca", leaf + "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n")
    _issue(d, "worker", "ca", leaf + "extendedKeyUsage=clientAuth\n")
    _issue(d, "rogue", "rogue-ca", leaf + "extendedKeyUsage=clientAuth\n")
    return d


def orchestrator_files(pki):
    return str(pki / "ca.pem"), str(pki / "orchestrator.pem"), str(pki / "orchestrator.key")


def worker_args(pki, cert="worker", ca="ca"):
    return [
        "--tls-ca",
        str(pki / f"{ca}.pem"),
        "--tls-cert",
        str(pki / f"{cert}.pem"),
        "--tls-key",
        str(pki / f"{cert}.key"),
    ]


def test_workers_with_certificates_from_the_ca_run_the_map(pki, spawn_worker):
    orch = Orchestrator("127.0.0.1:0", tls=orchestrator_files(pki))
    host, port = orch.addresses[0].rsplit(":", 1)
    recorder = Recorder((host, int(port)))
    try:
        spawn_worker(recorder.address, processes=2, extra=worker_args(pki))
        assert orch.wait_for_workers(1, timeout=60)
        secret = "tls-secret-" + os.urandom(8).hex()
        with Pool(orchestrator=orch) as pool:
            assert pool.map(square, range(300), chunksize=2) == [x * x for x in range(300)]
            assert pool.apply(str.upper, (secret,)) == secret.upper()
        seen = recorder.seen()
        assert seen[:1] == b"\x16", "the connection starts with a TLS handshake record"
        assert secret.encode() not in seen and secret.upper().encode() not in seen
    finally:
        orch.close()
        recorder.close()


def test_a_certificate_from_another_ca_is_refused(pki, spawn_worker):
    orch = Orchestrator("127.0.0.1:0", tls=orchestrator_files(pki))
    try:
        rogue = spawn_worker(orch.addresses[0], processes=1, extra=worker_args(pki, cert="rogue"))
        wait_until(
            lambda: orch.stats()["handshake_failures"] >= 2, 60, "the rogue worker to be refused twice"
        )
        assert orch.workers == 0
        assert "TLS handshake with" in rogue.log()
        assert rogue.proc.poll() is None, "the worker keeps retrying"
        # A worker that trusts another CA refuses the real orchestrator.
        wrong_trust = spawn_worker(orch.addresses[0], processes=1, extra=worker_args(pki, ca="rogue-ca"))
        wait_until(
            lambda: "TLS handshake with" in wrong_trust.log(), 60, "the worker to refuse the orchestrator"
        )
        assert orch.workers == 0
    finally:
        orch.close()


def test_tls_on_one_side_only_is_refused_with_a_clear_reason(pki, spawn_worker):
    tls_orch = Orchestrator("127.0.0.1:0", tls=orchestrator_files(pki))
    plain_orch = Orchestrator("127.0.0.1:0")
    try:
        plain = spawn_worker(tls_orch.addresses[0], processes=1)
        wait_until(
            lambda: "speaks TLS, but this side is not" in plain.log(), 60, "the plain worker to explain"
        )
        tls_worker = spawn_worker(plain_orch.addresses[0], processes=1, extra=worker_args(pki))
        wait_until(lambda: "TLS handshake with" in tls_worker.log(), 60, "the TLS worker to explain")
        wait_until(lambda: plain_orch.stats()["handshake_failures"] >= 1, 30, "the refusal to be counted")
        assert tls_orch.workers == 0 and plain_orch.workers == 0
    finally:
        tls_orch.close()
        plain_orch.close()


def test_tls_settings_are_checked_before_anything_listens(pki, tmp_path):
    ca, cert, key = orchestrator_files(pki)
    with pytest.raises(ValueError, match="missing: tls_key"):
        make_orchestrator("127.0.0.1:0", tls_ca=ca, tls_cert=cert)
    with pytest.raises(FileNotFoundError):
        make_orchestrator("127.0.0.1:0", tls_ca=ca, tls_cert=cert, tls_key=tmp_path / "nope")
    loose = tmp_path / "loose.key"
    loose.write_bytes((pki / "orchestrator.key").read_bytes())
    loose.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        make_orchestrator("127.0.0.1:0", tls_ca=ca, tls_cert=cert, tls_key=loose)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    with pytest.raises(ValueError, match="TLS"):
        make_orchestrator("127.0.0.1:0", tls_ca=not_pem, tls_cert=cert, tls_key=key)
