"""The orchestrator's dashboard, JSON API and ``/metrics``: exact counts of
what ran, who may read them, how it is turned on, and ``distripool status``."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from conftest import wait_until
from distripool import Pool, make_orchestrator
from distripool._status import token_of
from workloads import crash_first, identity, raise_on_multiples_of_ten, slow_square

KEY = b"dashboard-test-key"


def get(url: str, headers: dict[str, str] | None = None):
    """``(status, headers (any case), body)`` of a GET."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, e.read().decode()


def metrics(url: str) -> dict[str, float]:
    """Every sample of ``/metrics``, by name and labels, as the official
    parser reads it."""
    status, headers, text = get(url + "metrics")
    assert status == 200, text
    assert headers["Content-Type"].startswith("application/openmetrics-text"), headers
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def port_of(url: str) -> int:
    return int(url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


def api(url: str, path: str):
    status, _, text = get(url + "api/v1/" + path)
    assert status == 200, text
    return json.loads(text)


@pytest.fixture
def orch():
    o = make_orchestrator("127.0.0.1:0", KEY, dashboard="127.0.0.1:0")
    yield o
    o.close()


def test_metrics_count_exactly_what_ran(orch, spawn_worker, tmp_path):
    url = orch.dashboard_url
    assert url.startswith("http://127.0.0.1:") and url.endswith("/") and "token" not in url
    w = spawn_worker(orch.addresses[0], key=KEY, processes=2)
    assert orch.wait_for_workers(1, timeout=60), w.log()
    # 40 tasks of one item; 4 of them kill their executor once, and run again.
    crashing = {3, 11, 22, 37}
    args = [(str(tmp_path / f"m{i}") if i in crashing else None, i) for i in range(40)]
    with Pool(orchestrator=orch) as pool:
        assert pool.starmap(crash_first, args, chunksize=1) == list(range(40))
        m = metrics(url)
        assert m["distripool_tasks_submitted_total"] == 40
        assert m["distripool_tasks_completed_total"] == 40
        assert m["distripool_tasks_retried_total"] == len(crashing)
        assert m["distripool_tasks_failed_total"] == 0
        assert m["distripool_task_duration_seconds_count"] == 40
        assert m['distripool_task_duration_seconds_bucket{le="+Inf"}'] == 40
        assert m["distripool_tasks_queued"] == 0 and m["distripool_tasks_running"] == 0
        assert m["distripool_workers"] == 1
        assert m['distripool_executors{state="busy"}'] == 0
        assert m['distripool_executors{state="idle"}'] == 2
        assert m["distripool_bytes_sent_total"] > 0 and m["distripool_bytes_received_total"] > 0
        # 20 more tasks of five items, of which two raise.
        with pytest.raises(ValueError, match="multiple of ten"):
            pool.map(raise_on_multiples_of_ten, range(1, 101), chunksize=5)
    m = metrics(url)
    assert m["distripool_tasks_submitted_total"] == 60
    assert m["distripool_tasks_completed_total"] == 50
    assert m["distripool_tasks_failed_total"] == 10
    assert m["distripool_task_duration_seconds_count"] == 60
    assert m['distripool_worker_connections_refused_total{reason="auth"}'] == 0
    # A worker with another key is refused, and counted by its reason.
    bad = spawn_worker(orch.addresses[0], key=b"not the key", processes=1)
    wait_until(
        lambda: metrics(url)['distripool_worker_connections_refused_total{reason="auth"}'] >= 1,
        60,
        "the refusal to be counted",
    )
    bad.stop()
    w.stop()


def test_the_api_shows_workers_jobs_with_their_tracebacks_and_events(orch, spawn_worker):
    url = orch.dashboard_url
    w = spawn_worker(orch.addresses[0], key=KEY, processes=2, extra=["--label", "rack=b7"])
    assert orch.wait_for_workers(1, timeout=60), w.log()
    with Pool(orchestrator=orch) as pool:
        assert pool.map(identity, range(30), chunksize=3) == list(range(30))
        with pytest.raises(ValueError):
            pool.map(raise_on_multiples_of_ten, range(1, 21), chunksize=5)
        assert pool.apply(slow_square, (3,)) == 9
    [worker] = api(url, "workers")
    assert worker["labels"] == {"rack": "b7"} and worker["pid"] == w.pid and worker["slots"] == 2
    assert worker["tasks_done"] == 10 + 4 + 1
    # The executors' CPU and memory are reported once a second.
    worker = wait_until(
        lambda: (api(url, "workers") or [{}])[0].get("executors_memory") and api(url, "workers")[0],
        30,
        "the worker's executors' usage",
    )
    assert worker["executors_memory"] > 1 << 20 and worker["executors_cpu"] >= 0
    jobs = api(url, "jobs")
    assert [(j["kind"], j["name"], j["items"], j["tasks"]) for j in jobs] == [
        ("apply", "slow_square", 1, 1),
        ("map", "raise_on_multiples_of_ten", 20, 4),
        ("map", "identity", 30, 10),
    ]
    failed = jobs[1]
    assert (failed["state"], failed["done"], failed["failed"], failed["pending"]) == ("failed", 2, 2, 0)
    texts = [e["text"] for e in failed["errors"]]
    assert sorted(e["index"] for e in failed["errors"]) == [1, 3]
    assert all("Traceback" in t and t.endswith("is a multiple of ten") for t in texts), texts
    assert "workloads.py" in texts[0]
    assert jobs[2]["state"] == "done" and jobs[2]["done"] == 10 and jobs[2]["elapsed"] > 0
    events = api(url, "events")
    assert events[0]["kind"] == "worker_joined" and events[0]["seq"] == 0
    assert api(url, f"events?since={events[-1]['seq'] + 1}") == []
    status, _, text = get(url + "api/v1/events?since=x")
    assert status == 400 and "whole number" in text
    overview = api(url, "overview")
    assert overview["tasks"]["completed"] == 13 and overview["tasks"]["failed"] == 2
    assert api(url, "status")["overview"]["workers"] == 1
    status, _, text = get(url + "nothing-here")
    assert status == 404 and "api/v1" in text
    w.stop()


def test_the_page_uses_only_relative_urls(orch):
    status, headers, page = get(orch.dashboard_url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "api/v1/" in page
    # Nothing from elsewhere (no CDN), and no path from the root, so that a
    # proxy's prefix or a tunnel keeps working.
    for absolute in ('src="/', 'href="/', "http://", "https://", 'fetch("/', "'/api"):
        assert absolute not in page, absolute


def test_a_dashboard_on_another_address_than_loopback_needs_its_token():
    with make_orchestrator("127.0.0.1:0", KEY, dashboard="0.0.0.0:0") as o:
        url = o.dashboard_url
        token = token_of(KEY)
        assert url.endswith(f"/?token={token}"), url
        base = f"http://127.0.0.1:{port_of(url)}/"
        for path in ("", "metrics", "api/v1/status"):
            status, _, text = get(base + path)
            assert status == 401 and "token" in text, (path, status)
        assert get(base + "metrics?token=" + "0" * 32)[0] == 401
        status, headers, _ = get(base + f"?token={token}")
        assert status == 200
        cookie = headers["Set-Cookie"]
        assert cookie.startswith(f"distripool_token={token};") and "HttpOnly" in cookie
        assert get(base + "api/v1/overview", {"Cookie": f"distripool_token={token}"})[0] == 200
        assert get(base + "metrics", {"Authorization": f"Bearer {token}"})[0] == 200
        # Read-only: nothing but GET.
        req = urllib.request.Request(base + f"api/v1/status?token={token}", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 405
        e.value.close()


def test_an_address_in_use_is_an_oserror_but_the_variables_gives_way(monkeypatch, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = f"127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(OSError) as e:
            make_orchestrator("127.0.0.1:0", KEY, dashboard=taken)
        assert e.value.errno == errno.EADDRINUSE and taken in str(e.value)
        monkeypatch.setenv("DISTRIPOOL_DASHBOARD", taken)
        with caplog.at_level(logging.INFO, logger="distripool"):
            with Pool(1) as pool:
                url = pool._orchestrator.dashboard_url
                assert url is not None and taken not in url
                assert pool.apply(identity, (5,)) == 5
        assert f"{taken} is in use" in caplog.text and f"dashboard at {url}" in caplog.text


def test_it_is_off_unless_asked_and_bad_values_are_refused(monkeypatch):
    monkeypatch.delenv("DISTRIPOOL_DASHBOARD", raising=False)
    with Pool(1) as pool:
        assert pool._orchestrator.dashboard_url is None
        assert not pool._shared.observed
    monkeypatch.setenv("DISTRIPOOL_DASHBOARD", "0")
    with Pool(1) as pool:
        assert pool._orchestrator.dashboard_url is None
    monkeypatch.delenv("DISTRIPOOL_DASHBOARD")
    for bad in ("localhost", "1.2.3.4:99999", 3.5, -1):
        with pytest.raises(ValueError, match="dashboard"):
            Pool(1, dashboard=bad)
    monkeypatch.setenv("DISTRIPOOL_DASHBOARD", "nonsense")
    with pytest.raises(ValueError, match="DISTRIPOOL_DASHBOARD"):
        Pool(1)
    monkeypatch.delenv("DISTRIPOOL_DASHBOARD")
    with make_orchestrator("127.0.0.1:0", KEY) as o:
        assert o.dashboard_url is None
        with pytest.raises(ValueError, match="make_orchestrator"):
            Pool(orchestrator=o, dashboard=True)


def run_status(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distripool", "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_distripool_status_prints_the_numbers_as_a_table(orch, spawn_worker):
    w = spawn_worker(orch.addresses[0], key=KEY, processes=2)
    assert orch.wait_for_workers(1, timeout=60), w.log()
    with Pool(orchestrator=orch) as pool:
        pool.map(identity, range(12), chunksize=3)
    r = run_status(orch.dashboard_url)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("distripool ") and orch.dashboard_url in lines[0]
    assert "workers 1   executors 0 busy, 2 idle" in lines[1]
    assert "4 completed" in lines[2]
    header = next(i for i, line in enumerate(lines) if line.startswith("WORKER"))
    assert str(w.pid) in lines[header + 1] and "connected" in lines[header + 1]
    job = next(line for line in lines if " identity " in line)
    assert "[####################]" in job and "4/4" in job and "done" in job
    # HOST:PORT alone works too.
    assert run_status(orch.dashboard_url.split("//")[1]).returncode == 0
    w.stop()


def test_distripool_status_watch_refreshes_until_interrupted(orch):
    argv = [sys.executable, "-m", "distripool", "status", orch.dashboard_url, "--watch", "0.2"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            seen = b""
            while seen.count(b"\x1b[2J") < 3:
                chunk = os.read(proc.stdout.fileno(), 65536)
                assert chunk, proc.stderr.read().decode()
                seen += chunk
            assert b"no worker connected" in seen
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_distripool_status_says_what_is_wrong():
    with make_orchestrator("127.0.0.1:0", KEY, dashboard="0.0.0.0:0") as o:
        port = port_of(o.dashboard_url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIPOOL_AUTHKEY")}
        r = run_status(f"127.0.0.1:{port}", env=env)
        assert r.returncode == 1 and "needs the dashboard's token" in r.stderr, r.stderr
        # The token is derived from the key, when that is all one has.
        r = run_status(f"127.0.0.1:{port}", env={**env, "DISTRIPOOL_AUTHKEY": KEY.decode()})
        assert r.returncode == 0, r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_status(f"127.0.0.1:{port}")
    assert r.returncode == 1 and "cannot reach" in r.stderr, r.stderr
    r = run_status("ftp://x")
    assert r.returncode == 1 and "not a dashboard URL" in r.stderr
