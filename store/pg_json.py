"""JSON as jsonb keeps it exactly: the one encoder of values for PostgreSQL."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import orjson


def to_jsonb(value: Any) -> str:
    """A normalized JSON value as text that jsonb keeps exactly: jsonb stores numbers as
    numeric, which prints `1e20` back as `100000000000000000000` (an int to a JSON reader), so
    floats are written in positional notation, which keeps their decimal point."""
    text = orjson.dumps(value).decode()
    if not _EXPONENT.search(text):  # the common case: no number (nor string) like 1e20
        return text
    return _NUMBER_OR_STRING.sub(_positional, text)


_EXPONENT = re.compile(r"\d[eE][-+\d]")
_NUMBER_OR_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?[eE][-+]?\d+')


def _positional(match: re.Match[str]) -> str:
    token = match.group()
    if token.startswith('"'):
        return token
    text = format(Decimal(token), "f")  # the same shortest digits, without the exponent
    return text if "." in text else f"{text}.0"
