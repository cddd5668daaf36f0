"""Promise ids, the one place their format is known.

A root workflow's id is chosen by the caller and has no `.`; the n-th durable call a workflow
makes (counting from 0) gets `<its id>.<n>`, so a replay meets the same ids again. Everything
else builds, parses and checks ids through these functions.
"""

from __future__ import annotations

SEPARATOR = "."


class InvalidRootIdError(ValueError):
    """A root id that is empty or has a `.`; the message says which and why."""


MAX_ROOT_ID_BYTES = 512  # the ids of its calls must fit a database index key (2.7 KB) with room


def check_root_id(root_id: str) -> str:
    """Return `root_id` if it can name a root workflow; else InvalidRootIdError."""
    if not isinstance(root_id, str) or not root_id or SEPARATOR in root_id:
        raise InvalidRootIdError(
            f"a root id is non-empty and has no '{SEPARATOR}', which separates the ids of calls "
            f"(use an id without '{SEPARATOR}'): "
            f"{root_id!r}"
        )
    if len(root_id.encode(errors="surrogatepass")) > MAX_ROOT_ID_BYTES:  # an index key has a limit
        raise InvalidRootIdError(
            f"a root id is at most {MAX_ROOT_ID_BYTES} bytes (UTF-8), not "
            f"{len(root_id.encode(errors='surrogatepass'))}: {root_id[:40]!r}..."
        )
    return root_id


def children_prefix(parent_id: str) -> str:
    """What the id of every call under `parent_id`, at any depth, starts with (for store.list)."""
    return parent_id + SEPARATOR


def child_id(parent_id: str, n: int) -> str:
    """The id of the n-th durable call (from 0) made by the workflow `parent_id`.

    Context.run inlines it (the prefix, then n), being the hot path of replay.
    """
    return f"{children_prefix(parent_id)}{n}"


PATCH_MARKER = "patch:"


def check_patch_name(name: object) -> str:
    """Return `name` if it can name a patch (it becomes part of a marker's id)."""
    if type(name) is not str or not name or SEPARATOR in name:
        raise ValueError(f"a patch name is a non-empty str without '{SEPARATOR}', not {name!r}")
    return name


def patch_marker_id(workflow_id: str, name: str) -> str:
    """The id of the marker the patch `name` leaves in the workflow `workflow_id`: under it,
    but not a call (parse and step_index give None), so it takes no call position."""
    return f"{children_prefix(workflow_id)}{PATCH_MARKER}{name}"


def parse(promise_id: str) -> tuple[str, int] | None:
    """`(parent id, n)` of a call's id; None for a root id."""
    parent, sep, n = promise_id.rpartition(SEPARATOR)
    if not sep or not parent or not _is_count(n):
        return None
    return parent, int(n)


def _is_count(text: str) -> bool:
    """Whether `text` is n as child_id writes it: ASCII digits, no leading zero."""
    return text.isascii() and text.isdigit() and (text == "0" or text[0] != "0")


def parent_id(promise_id: str) -> str:
    """The id of the workflow that made the call `promise_id`; ValueError for a root id."""
    parsed = parse(promise_id)
    if parsed is None:
        raise ValueError(f"{promise_id!r} is a root id: no workflow made it")
    return parsed[0]


def is_root(promise_id: str) -> bool:
    """Whether `promise_id` names a root workflow (it has no `.`)."""
    return SEPARATOR not in promise_id


def step_index(root_id: str, promise_id: str) -> int | None:
    """n if `promise_id` is `<root_id>.<n>`, a direct call of the root; else None."""
    parsed = parse(promise_id)
    if parsed is None or parsed[0] != root_id:
        return None
    return parsed[1]


def top_step(root_id: str, promise_id: str) -> int | None:
    """n of the direct step `<root_id>.<n>` that `promise_id` is or is under; None for anything
    else (the root, a patch marker, another root's id)."""
    prefix = children_prefix(root_id)
    if not promise_id.startswith(prefix):
        return None
    first = promise_id[len(prefix):].split(SEPARATOR, 1)[0]
    return int(first) if _is_count(first) else None


def moved(promise_id: str, old_root: str, new_root: str) -> str:
    """The id `promise_id` (the root `old_root` or under it) has under `new_root` instead."""
    if promise_id != old_root and not promise_id.startswith(children_prefix(old_root)):
        raise ValueError(f"{promise_id!r} is not {old_root!r} nor under it")
    return new_root + promise_id[len(old_root):]


def patch_marker_name(workflow_id: str, promise_id: str) -> str | None:
    """The patch name of a marker `patch_marker_id(workflow_id, name)`; None for any other id."""
    prefix = f"{children_prefix(workflow_id)}{PATCH_MARKER}"
    return promise_id[len(prefix):] if promise_id.startswith(prefix) else None
