"""workflow/ids.py, the one owner of the promise-id format."""

from __future__ import annotations

import pytest

from workflow import Context, ids


def test_a_child_id_parses_back() -> None:
    child = ids.child_id("wf/x", 3)
    assert child == "wf/x.3"
    assert ids.parse(child) == ("wf/x", 3)
    assert ids.parent_id(ids.child_id(child, 0)) == child
    assert ids.children_prefix("wf/x") == "wf/x."


@pytest.mark.parametrize("promise_id", ["wf/x", "wf/x.", "wf/x.a", "wf/x.03", "wf/x.-1", "wf/x.³", ".3"])
def test_only_canonical_call_ids_parse(promise_id: str) -> None:
    assert ids.parse(promise_id) is None


def test_step_index_is_for_direct_steps_of_that_root_only() -> None:
    assert ids.step_index("wf/x", "wf/x.12") == 12
    assert ids.step_index("wf/x", "wf/x.1.2") is None  # a step of the sub-workflow wf/x.1
    assert ids.step_index("wf/x", "wf/xy.1") is None
    assert ids.step_index("wf/x", "wf/x") is None


@pytest.mark.parametrize("root_id", ["", "wf/a.b", "."])
def test_a_root_id_is_non_empty_without_a_dot(root_id: str) -> None:
    with pytest.raises(ValueError, match=r"without '\.'"):
        ids.check_root_id(root_id)
    assert ids.check_root_id("wf/ok") == "wf/ok"
    assert ids.is_root("wf/ok") and not ids.is_root("wf/ok.0")


def test_a_root_id_has_no_parent() -> None:
    with pytest.raises(ValueError, match="is a root id"):
        ids.parent_id("wf/x")


def test_context_hands_out_the_ids_child_id_builds() -> None:
    ctx = Context("wf/x")
    assert [ctx.run(print).promise_id for _ in range(12)] == [ids.child_id("wf/x", n) for n in range(12)]
