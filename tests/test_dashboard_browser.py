"""The dashboard in a real browser (headless Chromium: each page loaded
during a running map, its JavaScript run, the DOM read and a screenshot
taken) and ``/metrics`` scraped by a real Prometheus.

With ``DISTRIPOOL_SCREENSHOTS=DIR`` the screenshots are also written to DIR
(``make screenshots`` refreshes the ones in docs/images)."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import wait_until
from distripool import Pool, make_orchestrator
from real_parts import Prometheus, dom, screenshot
from workloads import crash_first, gated, identity, raise_on_multiples_of_ten

KEY = b"dashboard-browser-key"
# The overview last, once its chart has a few seconds to show.
PAGES = ("workers", "jobs", "events", "overview")


@pytest.fixture
def busy_cluster(spawn_worker, tmp_path):
    """An orchestrator with a dashboard and two workers, a finished map, a
    failed one, a retried task, and a map of 200 items that runs for about
    ten seconds and then waits for the test to let its last 20 go."""
    orch = make_orchestrator("127.0.0.1:0", KEY, dashboard="127.0.0.1:0")
    workers = [
        spawn_worker(orch.addresses[0], key=KEY, processes=2, extra=["--label", f"rack=r{i}"]) for i in (1, 2)
    ]
    assert orch.wait_for_workers(2, timeout=60), [w.log() for w in workers]
    pool = Pool(orchestrator=orch)
    assert pool.map(identity, range(100), chunksize=5) == list(range(100))
    with pytest.raises(ValueError):
        pool.map(raise_on_multiples_of_ten, range(1, 31), chunksize=3)
    assert pool.starmap(crash_first, [(str(tmp_path / "crash"), 1), (None, 2)]) == [1, 2]
    gate = tmp_path / "gate"
    running = pool.starmap_async(gated, [(str(gate), i) for i in range(200)], chunksize=1)
    yield orch, running
    gate.touch()
    assert running.get(120) == list(range(200))
    pool.close()
    pool.join()
    for w in workers:
        w.stop()
    orch.close()


def api(url: str, path: str):
    with urllib.request.urlopen(url + "api/v1/" + path, timeout=30) as r:
        return json.load(r)


def wait_for_progress(url: str) -> None:
    def forty_done():
        return any(j["name"] == "gated" and j["done"] >= 40 for j in api(url, "jobs"))

    wait_until(forty_done, 60, "the first 40 items of the running map")


def check_page(page: str, html: str) -> None:
    """What each page must show once its script has run (none of it is in
    the page as served)."""
    cards = dict(re.findall(r'data-stat="([^"]+)"><div class="n">([0-9,]+)<', html))
    assert cards.get("workers") == "2" and cards.get("executors busy") == "4", cards
    if page == "overview":
        bars = re.findall(r'progress-text">([0-9,]+)/([0-9,]+)<', html)
        assert any(int(d) >= 40 and t == "200" for d, t in bars), bars
        assert "<path d=" in html, "the throughput chart is drawn"
    elif page == "workers":
        rows = re.findall(r'<tr class="worker" data-worker="(\d+)">', html)
        assert len(rows) == 2, html
        assert "rack=r1" in html and "rack=r2" in html
        assert " %</td>" in html and "MiB</td>" in html, "the executors' CPU and memory"
    elif page == "jobs":
        names = re.findall(r'<tr class="job" data-job="[^"]+"><td>(\w+)</td><td><b>(\w+)</b>', html)
        assert ("starmap", "gated") in names, names
        assert ("map", "identity") in names and ("map", "raise_on_multiples_of_ten") in names
        assert "is a multiple of ten" in html and "Traceback" in html
    elif page == "events":
        assert html.count("worker joined") >= 2 and "task retried" in html


def test_every_page_shows_the_running_map_in_chromium(busy_cluster, tmp_path):
    orch, _ = busy_cluster
    url = orch.dashboard_url
    wait_for_progress(url)
    keep = os.environ.get("DISTRIPOOL_SCREENSHOTS")
    for page in PAGES:
        if page == "overview":
            wait_until(
                lambda: len(api(url, "overview")["throughput"]) >= 8, 60, "eight seconds of throughput"
            )
        check_page(page, dom(f"{url}#{page}"))
        shot = screenshot(f"{url}#{page}", tmp_path / f"dashboard-{page}.png")
        assert shot.stat().st_size > 20_000, "a page with content, not a blank one"
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(keep) / shot.name)


class _Prefixed(BaseHTTPRequestHandler):
    """A reverse proxy that serves the dashboard under ``/under/a/prefix``."""

    upstream = ""
    prefix = "/under/a/prefix"

    def do_GET(self):  # noqa: N802 - the handler's name
        if not self.path.startswith(self.prefix):
            self.send_error(404)
            return
        rest = self.path[len(self.prefix) :].lstrip("/")
        try:
            with urllib.request.urlopen(self.upstream + rest, timeout=30) as r:
                body, ctype, status = r.read(), r.headers["Content-Type"], r.status
        except urllib.error.HTTPError as e:
            with e:
                body, ctype, status = e.read(), e.headers["Content-Type"], e.code
        self.send_response(status)
        self.send_header("Content-Type", ctype or "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_the_dashboard_works_behind_a_path_prefix(busy_cluster):
    orch, _ = busy_cluster
    wait_for_progress(orch.dashboard_url)
    handler = type("Handler", (_Prefixed,), {"upstream": orch.dashboard_url})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        proxy = f"http://127.0.0.1:{server.server_address[1]}{_Prefixed.prefix}"
        for url in (proxy + "/#workers", proxy + "#workers", proxy + "/index.html#workers"):
            check_page("workers", dom(url))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(30)


def test_a_real_prometheus_scrapes_the_metrics(spawn_worker, tmp_path):
    with make_orchestrator("127.0.0.1:0", KEY, dashboard="127.0.0.1:0") as orch:
        w = spawn_worker(orch.addresses[0], key=KEY, processes=2)
        assert orch.wait_for_workers(1, timeout=60), w.log()
        with Pool(orchestrator=orch) as pool:
            assert pool.map(identity, range(60), chunksize=2) == list(range(60))
        target = orch.dashboard_url.split("//", 1)[1].rstrip("/")
        prom = Prometheus(target, tmp_path)
        try:
            api = wait_until(prom.ready, 60, "Prometheus to be ready")

            def query(expr: str):
                q = urllib.parse.quote(expr)
                with urllib.request.urlopen(f"http://{api}/api/v1/query?query={q}", timeout=30) as r:
                    result = json.load(r)["data"]["result"]
                return result[0]["value"][1] if result else None

            wait_until(lambda: query('up{job="distripool"}') == "1", 90, f"a scrape:\n{prom.log()}")
            assert query("distripool_tasks_completed_total") == "30"
            assert query("distripool_tasks_submitted_total") == "30"
            assert query("distripool_workers") == "1"
            assert query('distripool_executors{state="idle"}') == "2"
            assert query("distripool_task_duration_seconds_count") == "30"
        finally:
            prom.stop()
        w.stop()
