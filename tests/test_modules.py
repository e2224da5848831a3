"""A driver's own modules reach workers that lack them: a script next to
its ``helper.py`` and package ``pkg``, and a worker that has neither on
its path."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import free_port

HELPER = """
def triple(x):
    return 3 * x


class Box:
    def __init__(self, v):
        self.v = v


def fail(x):
    raise ValueError(f"helper refuses {x}")
"""

LAZY = """
def half(x):
    return x / 2
"""

DRIVER = """
import sys
import helper
import pkg
from distripool import Orchestrator, Pool


def uses_helper(x):
    return helper.triple(x)


def uses_lazy(x):
    from pkg import lazy  # never imported by the driver itself
    return lazy.half(x)


def boxed(x):
    return helper.Box(x)


if __name__ == "__main__":
    address, key, ship = sys.argv[1], sys.argv[2], sys.argv[3] == "ship"
    orch = Orchestrator((address,), authkey=key)
    assert orch.wait_for_workers(1, timeout=60), "no worker"
    with Pool(orchestrator=orch, ship_modules=ship) as pool:
        try:
            print("main", pool.map(uses_helper, range(5)))
            print("by-reference", pool.map(helper.triple, range(5)))
            print("lazy", pool.map(uses_lazy, [2, 4]))
            print("class", [b.v for b in pool.map(boxed, [7])], type(pool.apply(boxed, (1,))) is helper.Box)
            try:
                pool.apply(helper.fail, (9,))
            except ValueError as exc:
                print("error", exc, "raise ValueError" in str(exc.__cause__))
        except Exception as exc:
            print("failed", type(exc).__name__, exc)
    orch.close()
"""


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "project"
    (root / "pkg").mkdir(parents=True)
    (root / "helper.py").write_text(HELPER)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "lazy.py").write_text(LAZY)
    (root / "driver.py").write_text(textwrap.dedent(DRIVER))
    return root


def run_driver(project, spawn_worker, ship: str) -> str:
    address = f"127.0.0.1:{free_port()}"
    key = "m" * 32
    worker = spawn_worker(address, key=key.encode(), processes=1)
    out = subprocess.run(
        [sys.executable, str(project / "driver.py"), address, key, ship],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=project,
    )
    assert out.returncode == 0, f"{out.stderr}\nworker: {worker.log()}"
    return out.stdout


def test_the_drivers_own_modules_reach_a_worker_that_lacks_them(project, spawn_worker):
    out = run_driver(project, spawn_worker, "ship")
    print(out)
    assert "main [0, 3, 6, 9, 12]" in out
    assert "by-reference [0, 3, 6, 9, 12]" in out
    assert "lazy [1.0, 2.0]" in out, "a submodule the driver never imported came with its package"
    assert "class [7] True" in out, "results come back as the driver's own class"
    assert "error helper refuses 9 True" in out, "the traceback names the line in helper.py"


def test_ship_modules_false_sends_only_the_functions(project, spawn_worker):
    out = run_driver(project, spawn_worker, "no")
    assert "failed ModuleNotFoundError No module named 'helper'" in out, out


UPLOAD_DRIVER = """
import os, sys
from distripool import Orchestrator, Pool


def read_data(name):
    import tool  # an uploaded module
    with open(os.path.join("assets", name)) as f:  # an uploaded directory, by its relative name
        return tool.shout(f.read()), os.path.basename(os.getcwd())


if __name__ == "__main__":
    address, key = sys.argv[1], sys.argv[2]
    orch = Orchestrator((address,), authkey=key)
    orch.upload(os.path.join(sys.argv[3], "tool.py"))
    orch.upload(os.path.join(sys.argv[3], "assets"))
    try:
        orch.upload(os.path.join(sys.argv[3], "missing"))
    except FileNotFoundError as exc:
        print("missing", exc)
    assert orch.wait_for_workers(1, timeout=60), "no worker"
    with Pool(orchestrator=orch) as pool:
        print("read", pool.map(read_data, ["a.txt", "b.txt"]))
    orch.close()
"""


def test_upload_puts_files_and_a_directory_next_to_the_workers(tmp_path, spawn_worker):
    files = tmp_path / "files"
    (files / "assets").mkdir(parents=True)
    (files / "tool.py").write_text("def shout(s):\n    return s.upper()\n")
    (files / "assets" / "a.txt").write_text("alpha")
    (files / "assets" / "b.txt").write_text("beta")
    (tmp_path / "driver.py").write_text(UPLOAD_DRIVER)
    address = f"127.0.0.1:{free_port()}"
    worker = spawn_worker(address, key=b"u" * 32, processes=1)
    out = subprocess.run(
        [sys.executable, str(tmp_path / "driver.py"), address, "u" * 32, str(files)],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=tmp_path,
    )
    assert out.returncode == 0, f"{out.stderr}\nworker: {worker.log()}"
    assert "read [('ALPHA', 'uploads'), ('BETA', 'uploads')]" in out.stdout, out.stdout
    assert "missing cannot upload" in out.stdout and "no such file or directory" in out.stdout
