"""Real programs the dashboard tests drive: headless Chromium (the pages,
with their JavaScript) and Prometheus (a scrape of ``/metrics``). Both are
Debian packages that ``tools/system-deps.sh`` installs; under CI a missing
one fails its tests instead of skipping them."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium-headless-shell") or shutil.which("chromium")
PROMETHEUS = shutil.which("prometheus")


def require(path: str | None, what: str) -> str:
    if path is None:
        message = f"{what} is not installed (tools/system-deps.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI is set, so this is a failure, not a skip")
        pytest.skip(message)
    return path


def _chromium(url: str, *args: str, budget_ms: int) -> subprocess.CompletedProcess:
    """Load ``url`` in a fresh headless Chromium, letting its scripts run for
    ``budget_ms`` of virtual time (requests in flight hold that time still)."""
    exe = require(CHROMIUM, "headless Chromium (chromium-headless-shell)")
    argv = [
        exe,
        "--no-sandbox",  # the tests run as root
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1280,860",
        f"--virtual-time-budget={budget_ms}",
        *args,
        url,
    ]
    with tempfile.TemporaryDirectory(prefix="distripool-chromium-") as profile:
        argv.insert(1, f"--user-data-dir={profile}")
        # Debian's command is a shell script that starts the browser as its
        # child, which starts more: a session of their own, so that a
        # browser that hangs is ended whole, by the group of the process
        # started here.
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            out, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def dom(url: str, budget_ms: int = 3000) -> str:
    """The page's DOM after its scripts ran."""
    r = _chromium(url, "--dump-dom", budget_ms=budget_ms)
    assert r.returncode == 0 and "<html" in r.stdout, r.stderr[-2000:]
    return r.stdout


def screenshot(url: str, path: Path, budget_ms: int = 3000) -> Path:
    r = _chromium(url, f"--screenshot={path}", budget_ms=budget_ms)
    assert r.returncode == 0 and path.exists(), r.stderr[-2000:]
    return path


class Prometheus:
    """A Prometheus server scraping ``target`` (``host:port``) every second,
    listening on a port of its own choosing on loopback."""

    def __init__(self, target: str, workdir: Path):
        exe = require(PROMETHEUS, "Prometheus (the prometheus package)")
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: distripool\n    metrics_path: /metrics\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                exe,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                "--web.listen-address=127.0.0.1:0",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def address(self) -> str | None:
        """Where its HTTP API listens, once it says so."""
        found = re.search(r'msg="Listening on" address=(127\.0\.0\.1:\d+)', self.log())
        return found.group(1) if found else None

    def ready(self) -> str | None:
        """Its address, once it answers that it is ready (it listens a
        little before its storage is open, answering 503 meanwhile)."""
        import urllib.error
        import urllib.request

        address = self.address()
        if address is None:
            return None
        try:
            with urllib.request.urlopen(f"http://{address}/-/ready", timeout=10) as r:
                return address if r.status == 200 else None
        except urllib.error.HTTPError as e:
            e.close()
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._log.close()
