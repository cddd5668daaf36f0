"""store.failpoints names every failpoint and builds its keys; the code that hits a failpoint and
the code that arms it meet through these builders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from store import JsonlStore, failpoints


def arm_entries(monkeypatch: pytest.MonkeyPatch, entries: list[dict[str, str]]) -> None:
    """Arm `entries` as a child process would find them in its environment."""
    monkeypatch.setenv(failpoints.ENV_POINTS, failpoints.environment(entries)[failpoints.ENV_POINTS])
    points, delays = failpoints._load()
    monkeypatch.setattr(failpoints, "_points", points)
    monkeypatch.setattr(failpoints, "_delays", delays)
    monkeypatch.setattr(failpoints, "armed", True)


def test_the_store_append_key_is_the_one_the_store_hits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = failpoints.store_append_key("resolve", "wf/x.1")
    arm_entries(monkeypatch, [failpoints.entry(failpoints.STORE_APPEND, key, "raise")])
    with JsonlStore(tmp_path / "s.jsonl") as store:
        store.create("wf/x.0", 1)
        store.resolve("wf/x.0", 0)  # another promise: not armed
        store.create("wf/x.1", 1)
        with pytest.raises(failpoints.InjectedFault, match=r"store\.append resolve:wf/x\.1"):
            store.resolve("wf/x.1", 1)


def test_keys_and_entries() -> None:
    assert failpoints.batch_mid_key(3) == "3"
    assert failpoints.batch_fail_key(3, 2) == "3/2"
    assert failpoints.step_started_key("wf/x.3") == "wf/x.3"
    entry = failpoints.entry(failpoints.BATCH_MID, "3", "pause")
    assert entry == {"name": "batch.mid", "key": "3", "action": "pause"}
    assert json.loads(failpoints.environment([entry])[failpoints.ENV_POINTS]) == [entry]
    assert failpoints.environment([]) == {}
    with pytest.raises(ValueError, match="unknown failpoint action 'explode'"):
        failpoints.entry(failpoints.BATCH_MID, "3", "explode")
