"""store.fsutil on real files: whole writes, files removed on failure, directories synced."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from store.fsutil import make_dirs, write_all, write_synced_file

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Path]]:
    """("mkdir", path) and ("fsync", path) in the order they happen in this process."""
    seen: list[tuple[str, Path]] = []
    real_mkdir, real_fsync = os.mkdir, os.fsync

    def mkdir(path: str | os.PathLike[str], *args: object, **kwargs: object) -> None:
        real_mkdir(path, *args, **kwargs)
        seen.append(("mkdir", Path(path).absolute()))

    def fsync(fd: int) -> None:
        real_fsync(fd)
        seen.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_make_dirs_syncs_the_parent_of_each_directory_it_creates(
    tmp_path: Path, events: list[tuple[str, Path]]
) -> None:
    (tmp_path / "a").mkdir()
    events.clear()
    make_dirs(tmp_path / "a" / "b" / "c" / "d")
    a = tmp_path / "a"
    assert events == [
        ("mkdir", a / "b"), ("fsync", a),
        ("mkdir", a / "b" / "c"), ("fsync", a / "b"),
        ("mkdir", a / "b" / "c" / "d"), ("fsync", a / "b" / "c"),
    ]
    assert (a / "b" / "c" / "d").is_dir()


def test_make_dirs_with_a_relative_path(
    tmp_path: Path, events: list[tuple[str, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    make_dirs(Path("x"))
    assert events == [("mkdir", tmp_path / "x"), ("fsync", tmp_path)]


def test_make_dirs_of_an_existing_directory_does_nothing(
    tmp_path: Path, events: list[tuple[str, Path]]
) -> None:
    make_dirs(tmp_path)
    assert events == []


def test_make_dirs_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        make_dirs(tmp_path / "file")
    with pytest.raises(NotADirectoryError):
        make_dirs(tmp_path / "file" / "below")


def test_write_all_goes_on_after_a_short_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:3])))
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        write_all(fd, b"0123456789")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"0123456789"


def test_write_all_refuses_a_write_that_makes_no_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "write", lambda fd, data: 0)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="no progress"):
            write_all(fd, b"x")
    finally:
        os.close(fd)


def test_a_file_that_cannot_be_written_whole_is_removed(tmp_path: Path) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"first part\n"
        raise OSError(28, "No space left on device")

    path = tmp_path / "f"
    with pytest.raises(OSError, match="No space left"):
        write_synced_file(path, chunks(), overwrite=True)
    assert not path.exists()


def test_a_synced_file_is_written_and_synced(
    tmp_path: Path, events: list[tuple[str, Path]]
) -> None:
    path = tmp_path / "f"
    write_synced_file(path, [b"a", b"b"], overwrite=False)
    assert path.read_bytes() == b"ab"
    assert events == [("fsync", path)]


def test_a_synced_file_that_must_be_new_leaves_an_existing_one_alone(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        write_synced_file(path, [b"other"], overwrite=False)
    assert path.read_bytes() == b"keep"
