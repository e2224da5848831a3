"""Errors keep their type across the layers, and the constants the Rust core
and the Python package share are defined once."""

from __future__ import annotations

import pytest

import distripool
from distripool import _executor, _native
from distripool.exceptions import DistripoolError, OrchestratorClosedError


def test_a_closed_orchestrator_raises_distripools_own_error_from_the_core():
    orch = _native.Orchestrator([], b"key")
    client = orch.open_client()
    orch.close()
    with pytest.raises(OrchestratorClosedError, match="the orchestrator is closed") as info:
        orch.open_client()
    assert type(info.value).__module__ == "distripool.exceptions"
    assert isinstance(info.value, DistripoolError) and isinstance(info.value, RuntimeError)
    with pytest.raises(OrchestratorClosedError):
        client.withdraw(1)
    with pytest.raises(OrchestratorClosedError):
        orch.drain(1)
    assert distripool.OrchestratorClosedError is OrchestratorClosedError


def test_the_versions_and_frame_kinds_match_the_core():
    assert distripool.__version__ == _native.VERSION
    ours = {name: getattr(_executor, name) for name in _native.EXECUTOR_FRAME_KINDS}
    assert ours == _native.EXECUTOR_FRAME_KINDS


def test_bad_timing_is_a_value_error_naming_the_setting(monkeypatch):
    monkeypatch.setenv("DISTRIPOOL_TIMING", "heartbeat=1,silence=1.5")
    with pytest.raises(ValueError, match="at least twice the heartbeat"):
        distripool.Pool(1)
    monkeypatch.setenv("DISTRIPOOL_TIMING", "silence=ten")
    with pytest.raises(ValueError, match="invalid entry 'silence=ten'"):
        distripool.Pool(1)
    monkeypatch.setenv("DISTRIPOOL_TIMING", "heartbeet=1")
    with pytest.raises(ValueError, match='unknown timing "heartbeet"; expected one of heartbeat, silence'):
        distripool.Pool(1)
    monkeypatch.setenv("DISTRIPOOL_TIMING", "connect=-1")
    with pytest.raises(ValueError, match="connect must be a number of seconds above 0"):
        distripool.Pool(1)
