"""Through the real CLI: a store whose history is impossible is refused at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from supervisor_helpers import (
    STORE_FILE,
    assert_finished,
    root_id,
    run_import,
)

from store.codec import decode, encode

RECORDS, BATCH_SIZE = 20, 5
SIZES = ("--records", str(RECORDS), "--batch-size", str(BATCH_SIZE))
FAST = ("--max-restarts", "2", "--restart-backoff", "0", "--max-attempts", "2")


# -- an impossible store -----------------------------------------------------------------------


# Each damage keeps the store's first lines (root created; batch 0 created, attempted and
# resolved; batch 1 created and attempted, then resolved on line 5), adds one impossible
# line, and returns the lines with the number of the impossible one.


def attempt_number_not_a_number(lines: list[bytes], batch_1: str) -> tuple[list[bytes], int]:
    return [*lines[:4], encode({"op": "attempt", "id": batch_1, "n": "abc", "t": 1.0})], 5


def resolved_twice_with_different_values(
    lines: list[bytes], batch_1: str
) -> tuple[list[bytes], int]:
    first = decode(lines[4].rstrip(b"\n"))
    assert (first["op"], first["id"]) == ("resolve", batch_1)
    other = {**first, "value": {**first["value"], "records": 0}}
    return [*lines[:5], encode(other), *lines[5:]], 6


@pytest.mark.parametrize("damage", [attempt_number_not_a_number, resolved_twice_with_different_values])
def test_impossible_store_is_a_one_line_error_without_a_worker_or_a_restart(
    tmp_path: Path, damage: Any
) -> None:
    state_dir = tmp_path / "state"
    assert_finished(run_import(state_dir, *SIZES), RECORDS, BATCH_SIZE)
    store = (state_dir / STORE_FILE).resolve()
    lines = store.read_bytes().splitlines(keepends=True)
    damaged, bad_line = damage(lines, f"{root_id(RECORDS, BATCH_SIZE)}.1")
    store.write_bytes(b"".join(damaged))
    before = store.read_bytes()

    done = run_import(state_dir, *SIZES, *FAST)

    assert done.returncode == 1, done.describe()
    assert "Traceback" not in done.stderr, done.describe()
    assert "supervisor: worker" not in done.stderr, "a worker ran: " + done.describe()
    assert done.last_error_line.startswith(f"error: {store}:{bad_line}: store is damaged"), done.describe()
    assert done.report == {"ok": False, "error": done.last_error_line.removeprefix("error: ")}
    assert store.read_bytes() == before
