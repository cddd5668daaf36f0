"""One store record per line: compact JSON ending in a CRC-32 of the rest of the object.

A line looks like `{"op":"resolve","id":"import/x.3","value":…,"t":…,"crc":"1a2b3c4d"}`, so `jq`
reads it, and a torn or altered line is detected without parsing the JSON first.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import orjson

_CRC_KEY = b',"crc":"'
_SUFFIX_LEN = len(_CRC_KEY) + 8 + 2  # ,"crc":"xxxxxxxx"}


class DamagedRecordError(ValueError):
    """A line that is not a whole record (torn, truncated or altered)."""


def encode(record: dict[str, Any]) -> bytes:
    """Serialise a non-empty record to one newline-terminated, checksummed line.

    Raises TypeError (orjson's JSONEncodeError) when a value is not JSON-serialisable.
    """
    body = orjson.dumps(record)
    return b'%s%s%08x"}\n' % (body[:-1], _CRC_KEY, zlib.crc32(body))


def decode(line: bytes) -> dict[str, Any]:
    """Parse one line (without its newline), verifying its checksum first."""
    try:
        if (
            line[-_SUFFIX_LEN:-10] == _CRC_KEY
            and b"%08x" % zlib.crc32(line[:-_SUFFIX_LEN] + b"}") == line[-10:-2]
        ):
            record = orjson.loads(line)
            if type(record) is dict:
                del record["crc"]
                return record
    except orjson.JSONDecodeError:
        pass
    raise DamagedRecordError(_why_damaged(line))


def _why_damaged(line: bytes) -> str:
    if len(line) <= _SUFFIX_LEN or line[-_SUFFIX_LEN:-10] != _CRC_KEY or line[-2:] != b'"}':
        return "no checksum at the end of the line"
    if not all(c in b"0123456789abcdef" for c in line[-10:-2]):
        return "checksum is not hexadecimal (8 lower-case digits)"
    if b"%08x" % zlib.crc32(line[:-_SUFFIX_LEN] + b"}") != line[-10:-2]:
        return "checksum mismatch"
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return f"not JSON ({exc})"
    return "not a JSON object"


def normalize(value: Any) -> Any:
    """The value as it reads back from the store: JSON, as orjson writes it.

    So a tuple comes back a list, a datetime/date/time an ISO string, a UUID a string, an enum
    its value, a dataclass a dict. A value JSON cannot hold (a set, bytes, an arbitrary object,
    a dict key that is not a str, an int beyond 64 bits, nesting deeper than 254 levels), or
    a str with a NUL character (which no PostgreSQL text or jsonb can hold, so that a value is
    storable in every backend or in none) raises TypeError; `unstorable_part` says where it is.
    For the same reason -0.0 comes back 0.0: PostgreSQL's numbers have no negative zero.
    """
    raw = orjson.dumps(value)
    if b"\\u0000" in raw and _NUL.search(raw):
        raise TypeError("a str with a NUL character")
    if b"-0.0" in raw:
        raw = _NEGATIVE_ZERO.sub(lambda m: b"0.0" if m.group(0) == b"-0.0" else m.group(0), raw)
    return orjson.loads(raw)


# An escaped NUL in orjson's output: \u0000 after an even number of backslashes (an odd
# number would make it the text "\u0000", an escaped backslash and "u0000").
_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
# A string (kept as it is), or the number -0.0 (as orjson writes it) outside of one.
_NEGATIVE_ZERO = re.compile(rb'"(?:[^"\\]|\\.)*"|-0\.0(?![0-9])')


def unstorable_part(value: Any) -> str:
    """Where in `value` the part JSON cannot hold is, and what it is: `$["a"][2]: a set`."""
    stack: list[tuple[str, Any, int]] = [("$", value, 0)]
    while stack:
        path, part, depth = stack.pop()
        if depth > _MAX_DEPTH:
            return f"{path[:40]}...: nested deeper than {_MAX_DEPTH} levels"
        if isinstance(part, dict):
            for key, item in part.items():
                if isinstance(key, str) and "\x00" in key:
                    return f"{path}: a key with a NUL character (no backend can store one)"
                if not isinstance(key, str):
                    return f"{path}: a key that is not a str ({type(key).__name__} {key!r})"
                stack.append((f"{path}[{orjson.dumps(key).decode()}]", item, depth + 1))
        elif isinstance(part, list | tuple):
            stack.extend((f"{path}[{i}]", item, depth + 1) for i, item in enumerate(part))
        else:
            if isinstance(part, str) and "\x00" in part:
                return f"{path}: a str with a NUL character (no backend can store one)"
            try:
                orjson.dumps(part)
            except TypeError as exc:
                return f"{path}: {_kind(part)} ({exc})"
    return "$: not JSON"


_MAX_DEPTH = 254  # orjson's limit when writing


def _kind(part: Any) -> str:
    name = type(part).__name__
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def same_json(a: Any, b: Any) -> bool:
    """Whether two values are the same JSON document (so `True` is not `1`, nor `1.0`)."""
    return orjson.dumps(a, option=orjson.OPT_SORT_KEYS) == orjson.dumps(b, option=orjson.OPT_SORT_KEYS)
