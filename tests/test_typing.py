"""The package's types, as a user's checker sees them: ``mypy --strict`` on a
file that uses every public name (tests/typecheck/public_api.py, never run) and
on the examples."""

from __future__ import annotations

import subprocess
import sys

from conftest import TESTS

ROOT = TESTS.parent


def mypy_strict(*paths: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_public_api_and_examples_pass_mypy_strict():
    done = mypy_strict("tests/typecheck/public_api.py", "examples")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found in 3 source files" in done.stdout


def test_a_wrong_type_is_caught(tmp_path):
    """The check can fail: the same file with one inferred type changed."""
    source = (TESTS / "typecheck" / "public_api.py").read_text()
    wrong = source.replace(
        "assert_type(pool.map(square, range(10)), list[int])",
        "assert_type(pool.map(square, range(10)), list[str])",
    )
    assert wrong != source
    path = tmp_path / "wrong_api.py"
    path.write_text(wrong)
    done = mypy_strict(str(path))
    assert done.returncode == 1, done.stdout + done.stderr
    assert 'Expression is of type "list[int]", not "list[str]"' in done.stdout
