"""Recovery on open: a torn or garbage last line is moved aside; damage before it is an error."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from store_helpers import flip_byte, line_offset, raw_lines, records, run_python, torn_files

from store import JsonlStore, State, StoreCorruptedError, StoreError
from store.codec import encode

MODES = {
    "shared": {},
    "exclusive": {"exclusive": True},
    "readonly": {"readonly": True},
}
WRITABLE_MODES = {name: kwargs for name, kwargs in MODES.items() if name != "readonly"}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """A store of five lines: a, b and c created; a resolved; b attempted."""
    path = tmp_path / "promises.jsonl"
    with JsonlStore(path) as store:
        for pid in "abc":
            store.create(pid, pid)
        store.resolve("a", "A")
        store.start_attempt("b")
    return path


def half_line(promise_id: str) -> bytes:
    line = encode({"op": "resolve", "id": promise_id, "value": "late", "t": 2.0})
    return line[: len(line) // 2]


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def assert_intact(store: JsonlStore) -> None:
    assert [p.id for p in store.list()] == ["a", "b", "c"]
    assert store.get("a").value == "A"
    assert store.get("b").attempts == 1


# -- a torn or garbage last line ---------------------------------------------------------------


@pytest.mark.parametrize("tail", [
    half_line("c"),
    b"garbage without an end",
    b"garbage with an end\n",
    b"\n",
    encode({"op": "resolve", "id": "c", "value": 1, "t": 2.0}).replace(b'"c"', b'"d"'),
], ids=["half-line", "garbage", "garbage-line", "empty-line", "bad-checksum"])
@pytest.mark.parametrize("mode", WRITABLE_MODES)
def test_torn_last_line_is_cut_off_and_saved_aside(
    path: Path, tail: bytes, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    whole = path.read_bytes()
    append(path, tail)
    with caplog.at_level(logging.WARNING, logger="store"), JsonlStore(path, **MODES[mode]) as s:
        assert_intact(s)
    assert path.read_bytes() == whole
    assert torn_files(path) == [Path(f"{path}.torn-1")]
    assert Path(f"{path}.torn-1").read_bytes() == tail
    warning = caplog.records[-1]
    assert warning.levelno == logging.WARNING
    assert f"{path}:6" in warning.getMessage()
    assert f"{path}.torn-1" in warning.getMessage()


def test_each_torn_tail_gets_its_own_side_file(path: Path) -> None:
    for n in (1, 2, 3):
        append(path, half_line("c") + str(n).encode())
        JsonlStore(path).close()
    sides = [Path(f"{path}.torn-{n}") for n in (1, 2, 3)]
    assert torn_files(path) == sides
    assert [side.read_bytes()[-1:] for side in sides] == [b"1", b"2", b"3"]


def test_store_is_writable_after_its_tail_was_cut(path: Path) -> None:
    append(path, half_line("c"))
    with JsonlStore(path) as store:
        store.resolve("c", "C")
    with JsonlStore(path, readonly=True) as store:
        assert store.get("c").value == "C"
    assert len(records(path)) == 6


def test_readonly_store_leaves_a_torn_tail_alone(path: Path) -> None:
    append(path, half_line("c"))
    before = path.read_bytes()
    with JsonlStore(path, readonly=True) as store:
        assert_intact(store)
    assert path.read_bytes() == before
    assert torn_files(path) == []


def test_a_reader_ignores_a_line_still_being_written(path: Path) -> None:
    line = encode({"op": "resolve", "id": "c", "value": "C", "t": 2.0})
    with JsonlStore(path) as reader:
        append(path, line[:30])  # another process is in the middle of its write
        assert reader.get("c").state is State.PENDING
        assert torn_files(path) == []  # a reader without the lock never cuts
        append(path, line[30:])
        assert reader.get("c").value == "C"


def test_a_shared_writer_cuts_a_torn_tail_left_by_a_dead_process(path: Path) -> None:
    with JsonlStore(path) as store:
        append(path, half_line("c"))  # another appender died mid-write
        store.resolve("b", "B")
        assert_intact(store)
    assert len(torn_files(path)) == 1
    with JsonlStore(path, readonly=True) as store:
        assert store.get("b").value == "B"


OPEN_CHILD = """
import json, sys
from store import JsonlStore, StoreWriteError
try:
    JsonlStore(sys.argv[1]).close()
except StoreWriteError as exc:
    print(json.dumps({"error": str(exc)}))
else:
    print(json.dumps({"error": None}))
"""


def test_a_torn_tail_that_cannot_be_saved_aside_on_a_full_disk_is_not_cut(path: Path) -> None:
    tail = b"garbage without an end " * 200
    append(path, tail)
    before = path.read_bytes()

    child = run_python(OPEN_CHILD, path, file_size_limit=len(tail) // 2)

    assert child.returncode == 0, child.stderr
    error = json.loads(child.stdout)["error"]
    assert error is not None, "the tail was cut although its bytes were not saved"
    assert f"{path}.torn-1" in error
    assert path.read_bytes() == before
    assert torn_files(path) == []
    with JsonlStore(path) as store:  # with room on the disk, the tail is saved, then cut
        assert_intact(store)
    assert Path(f"{path}.torn-1").read_bytes() == tail


# -- damage before the last line ---------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lineno", [1, 3, 4])
def test_one_damaged_byte_in_the_middle_names_the_line_and_changes_nothing(
    path: Path, mode: str, lineno: int
) -> None:
    start = line_offset(path, lineno)
    flip_byte(path, start + 12)  # inside the line's JSON, not its newline
    before = path.read_bytes()
    with pytest.raises(StoreCorruptedError) as info:
        JsonlStore(path, **MODES[mode])
    assert (info.value.path, info.value.line) == (path, lineno)
    assert f"{path}:{lineno}:" in str(info.value)
    assert path.read_bytes() == before
    assert torn_files(path) == []


def test_damage_before_a_torn_tail_is_still_an_error(path: Path) -> None:
    flip_byte(path, line_offset(path, 5) + 3)
    append(path, half_line("c"))
    before = path.read_bytes()
    with pytest.raises(StoreCorruptedError) as info:
        JsonlStore(path)
    assert info.value.line == 5
    assert path.read_bytes() == before


def test_a_valid_line_that_breaks_the_rules_is_an_error(path: Path) -> None:
    data = path.read_bytes()
    ghost = encode({"op": "attempt", "id": "ghost", "n": 1, "t": 2.0})
    path.write_bytes(data[: line_offset(path, 3)] + ghost + data[line_offset(path, 3):])
    with pytest.raises(StoreCorruptedError, match="invalid record") as info:
        JsonlStore(path)
    assert info.value.line == 3


def test_a_missing_newline_in_the_middle_is_an_error(path: Path) -> None:
    data = bytearray(path.read_bytes())
    del data[line_offset(path, 3) - 1]  # lines 2 and 3 run together
    path.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptedError) as info:
        JsonlStore(path)
    assert info.value.line == 2


def test_damage_appearing_later_is_reported_with_its_line_number(path: Path) -> None:
    with JsonlStore(path) as reader:
        append(path, b"garbage\n" + encode({"op": "create", "id": "d", "param": 1, "t": 2.0}))
        with pytest.raises(StoreCorruptedError) as info:
            reader.get("d")
    assert info.value.line == 6


def test_an_upper_cased_checksum_digit_in_the_middle_is_an_error(path: Path) -> None:
    lines = raw_lines(path)
    lineno, line = next((n, line) for n, line in enumerate(lines[:-1], 1)
                        if any(c in b"abcdef" for c in line[-10:-2]))
    digit = next(i for i in range(len(line) - 10, len(line) - 2) if line[i] in b"abcdef")
    flip_byte(path, line_offset(path, lineno) + digit, mask=0x20)
    with pytest.raises(StoreCorruptedError):
        JsonlStore(path)


def test_corrupted_error_is_a_store_error() -> None:
    assert issubclass(StoreCorruptedError, StoreError)


def test_a_store_file_that_disappears_is_an_error(path: Path) -> None:
    with JsonlStore(path) as store:
        path.unlink()
        with pytest.raises(StoreError, match="disappeared"):
            store.get("a")
