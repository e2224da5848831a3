"""``progress=`` on the map methods: a bar that counts items (not chunks),
with retries and failures, drawn by tqdm, rich or a plain line."""

from __future__ import annotations

import re

import pytest

from distripool import Pool, ProcessPoolExecutor
from workloads import crash_once, identity


def fail_on_13(x):
    if x == 13:
        raise ValueError("13 is unlucky")
    return x


def final_line(err: str) -> str:
    """The last state of a bar drawn with carriage returns."""
    return err.replace("\r", "\n").strip().splitlines()[-1]


@pytest.fixture(scope="module")
def pool():
    with Pool(2) as p:
        yield p


def test_tqdm_counts_items_not_chunks(pool, capfd):
    assert pool.map(identity, range(100), chunksize=7, progress="tqdm") == list(range(100))
    line = final_line(capfd.readouterr().err)
    assert "100/100" in line and "identity" in line, line


def test_true_uses_tqdm_when_it_is_installed(pool, capfd):
    pool.map(identity, range(30), progress=True)
    assert "30/30" in final_line(capfd.readouterr().err)


def test_the_plain_bar_is_one_line_on_stderr(pool, capfd):
    pool.starmap(max, [(i, 2) for i in range(50)], chunksize=5, progress="plain")
    err = capfd.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)
    assert re.search(r"100%\|#{20}\| 50/50 \[[0-9.]+ items/s\]", final_line(err)), err


def test_failed_items_are_shown(pool, capfd):
    with pytest.raises(ValueError, match="unlucky"):
        pool.map(fail_on_13, range(40), chunksize=4, progress="plain")
    line = final_line(capfd.readouterr().err)
    assert "40/40" in line and "failed=4" in line, line


def test_retried_tasks_are_shown(tmp_path, capfd):
    with Pool(2) as p:
        p.map(identity, range(4))  # the pool's own first task is done before the crash
        out = p.starmap(
            crash_once, [(str(tmp_path / "marker"), i) for i in range(6)], chunksize=1, progress="plain"
        )
    assert out == list(range(6))
    line = final_line(capfd.readouterr().err)
    assert "6/6" in line and "retried=1" in line, line


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_imap_bars_count_items(pool, capfd, method):
    got = list(getattr(pool, method)(identity, range(25), chunksize=3, progress="tqdm"))
    assert sorted(got) == list(range(25))
    assert "25/25" in final_line(capfd.readouterr().err)


def test_an_imap_of_a_generator_counts_without_a_total(pool, capfd):
    assert sum(pool.imap(identity, (x for x in range(12)), progress="plain")) == 66
    line = final_line(capfd.readouterr().err)
    assert line.startswith("identity: 12 ["), line


def test_map_async_and_the_executor_map(capfd):
    with Pool(2) as p:
        assert p.map_async(identity, range(10), progress="plain").get(60) == list(range(10))
    assert "10/10" in final_line(capfd.readouterr().err)
    with ProcessPoolExecutor(2) as ex:
        assert list(ex.map(identity, range(9), progress="plain")) == list(range(9))
        assert list(ex.map(identity, range(5), buffersize=2, progress="plain")) == list(range(5))
    err = capfd.readouterr().err
    assert "9/9" in err and "identity: 5 [" in err


def test_rich_draws_its_bar(pool, capfd):
    pool.map(identity, range(20), progress="rich")
    captured = capfd.readouterr()
    assert "identity" in captured.out + captured.err


@pytest.mark.parametrize(("value", "error"), [("fancy", ValueError), (3, ValueError)])
def test_a_bad_progress_value_is_refused(pool, value, error):
    with pytest.raises(error, match="progress must be"):
        pool.map(identity, range(3), progress=value)


def test_no_progress_draws_nothing(pool, capfd):
    pool.map(identity, range(10))
    assert capfd.readouterr().err == ""
