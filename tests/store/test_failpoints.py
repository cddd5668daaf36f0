"""store.failpoints, and the `store.append` failpoint: a deterministic kill in mid-write."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest
from store_helpers import child_env, python_argv, raw_lines, records, torn_files

from store import JsonlStore, State, StoreCorruptedError, failpoints


def arm(monkeypatch: pytest.MonkeyPatch, name: str, key: str, action: str) -> None:
    monkeypatch.setattr(failpoints, "_points", {(name, key): action})
    monkeypatch.setattr(failpoints, "armed", True)


# -- the module --------------------------------------------------------------------------------


def test_failpoints_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(failpoints.ENV_POINTS, json.dumps([
        {"name": "store.append", "key": "resolve:a", "action": "pause"},
        {"name": "batch.mid", "key": 3, "action": "raise"},
    ]))
    assert failpoints._load()[0] == {
        ("store.append", "resolve:a"): "pause",
        ("batch.mid", "3"): "raise",
    }


def test_no_environment_means_no_failpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(failpoints.ENV_POINTS, raising=False)
    assert failpoints._load() == ({}, {})


def test_an_unknown_action_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(failpoints.ENV_POINTS, '[{"name": "x", "key": "1", "action": "explode"}]')
    with pytest.raises(ValueError, match="unknown action 'explode'"):
        failpoints._load()


def test_unarmed_failpoints_do_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(failpoints, "armed", False)
    assert failpoints.action("store.append", "resolve:a") is None
    failpoints.hit("store.append", "resolve:a")


def test_action_names_only_the_armed_key(monkeypatch: pytest.MonkeyPatch) -> None:
    arm(monkeypatch, "batch.mid", "3", "raise")
    assert failpoints.action("batch.mid", "3") == "raise"
    assert failpoints.action("batch.mid", "4") is None
    failpoints.hit("batch.mid", "4")


def test_raise_action_raises_injected_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    arm(monkeypatch, "batch.mid", "3", "raise")
    with pytest.raises(failpoints.InjectedFault, match=r"batch\.mid 3"):
        failpoints.hit("batch.mid", "3")


def test_pause_action_announces_itself_then_gives_up_if_nobody_kills(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    arm(monkeypatch, "batch.mid", "3", "pause")
    read_end, write_end = os.pipe()
    monkeypatch.setenv(failpoints.ENV_FD, str(write_end))
    monkeypatch.setattr(failpoints, "PAUSE_LIMIT_S", 0.01)
    try:
        with pytest.raises(failpoints.FailpointTimeout):
            failpoints.hit("batch.mid", "3")
        announcement = json.loads(os.read(read_end, 4096))
    finally:
        os.close(read_end)
        os.close(write_end)
    assert announcement == {
        "event": "failpoint", "name": "batch.mid", "key": "3", "pid": os.getpid(),
    }


# -- killed in the middle of a write -----------------------------------------------------------

CHILD = """
import sys
from store import JsonlStore
store = JsonlStore(sys.argv[1])
for pid in ("a", "b", "c"):
    store.create(pid, pid)
    store.start_attempt(pid)
store.resolve("a", 1)
store.resolve("b", 2)
store.resolve("c", 3)  # the armed failpoint writes half of this line and pauses
print("the failpoint did not pause", flush=True)
"""


def read_announcement(fd: int, timeout: float = 30) -> dict:
    """The first line on `fd`, which must arrive within `timeout` seconds."""
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, "the child never announced the failpoint"
        chunk = os.read(fd, 4096)
        assert chunk, f"the child exited before the failpoint: {data!r}"
        data += chunk
    return json.loads(data)


def kill_at_failpoint(path: Path, *, on_own_fd: bool) -> tuple[dict, int]:
    """Run CHILD with `store.append` armed for resolve:c; SIGKILL it once it announces.

    Returns the announcement and the child's pid.
    """
    points = [{"name": "store.append", "key": "resolve:c", "action": "pause"}]
    env = child_env(DURABLE_FAILPOINTS=json.dumps(points))
    read_end, write_end = os.pipe()
    if on_own_fd:
        env["DURABLE_FAILPOINT_FD"] = str(write_end)
        pass_fds, stderr = (write_end,), None
    else:
        pass_fds, stderr = (), write_end
    child = subprocess.Popen(python_argv(CHILD, path), env=env, pass_fds=pass_fds,
                             stderr=stderr, stdout=subprocess.DEVNULL)
    os.close(write_end)
    try:
        announcement = read_announcement(read_end)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        os.close(read_end)
    assert child.returncode == -signal.SIGKILL
    return announcement, child.pid


@pytest.mark.parametrize("on_own_fd", [False, True], ids=["stderr", "DURABLE_FAILPOINT_FD"])
def test_failpoint_announces_itself_after_writing_half_the_line(
    tmp_path: Path, on_own_fd: bool
) -> None:
    path = tmp_path / "promises.jsonl"
    announcement, pid = kill_at_failpoint(path, on_own_fd=on_own_fd)
    assert announcement == {"event": "failpoint", "name": "store.append", "key": "resolve:c",
                            "pid": pid}
    data = path.read_bytes()
    tail = data[data.rindex(b"\n") + 1:]
    assert tail.startswith(b'{"op":"resolve","id":"c"')
    assert 10 < len(tail) < 60  # about half of a ~80-byte line


def test_a_store_killed_mid_write_reopens_with_every_earlier_settle(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "promises.jsonl"
    kill_at_failpoint(path, on_own_fd=True)
    data = path.read_bytes()
    whole, tail = data[: data.rindex(b"\n") + 1], data[data.rindex(b"\n") + 1:]
    with JsonlStore(path) as store:
        assert (store.get("a").value, store.get("b").value) == (1, 2)
        assert store.get("c").state is State.PENDING
        assert store.get("c").attempts == 1
        store.resolve("c", 3)  # and the work can go on
    assert torn_files(path) == [Path(f"{path}.torn-1")]
    assert Path(f"{path}.torn-1").read_bytes() == tail
    assert path.read_bytes().startswith(whole)
    assert len(raw_lines(path)) == len(records(path)) == 9
    assert any("torn" in r.getMessage() for r in caplog.records)


# -- the `raise` action at store.append --------------------------------------------------------


def test_after_an_injected_fault_a_shared_store_cuts_the_half_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "promises.jsonl"
    arm(monkeypatch, "store.append", "resolve:b", "raise")
    with JsonlStore(path) as store:
        store.create("a", 1)
        store.create("b", 1)
        with pytest.raises(failpoints.InjectedFault):
            store.resolve("b", 2)
        store.create("c", 3)
        store.resolve("a", 1)
    monkeypatch.setattr(failpoints, "armed", False)
    with JsonlStore(path) as store:
        assert [p.id for p in store.list()] == ["a", "b", "c"]


def test_after_an_injected_fault_an_exclusive_store_keeps_its_next_appends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "promises.jsonl"
    arm(monkeypatch, "store.append", "resolve:b", "raise")
    with JsonlStore(path, exclusive=True) as store:
        store.create("a", 1)
        store.create("b", 1)
        with pytest.raises(failpoints.InjectedFault):
            store.resolve("b", 2)
        store.create("c", 3)
        store.resolve("a", 1)
    monkeypatch.setattr(failpoints, "armed", False)
    try:
        store = JsonlStore(path)
    except StoreCorruptedError as exc:
        pytest.fail(str(exc))
    with store:
        assert [p.id for p in store.list()] == ["a", "b", "c"]
