"""Row-level validation of input records: each problem has a short, countable reason.

Emails are checked by `email-validator`, for syntax only (no DNS): a hand-written pattern let
through addresses such as `x@example.net.` and `hsmith,@example.com`. The library costs ~30 µs
an address, six times the rest of a record's import, so the plainest addresses (PLAIN_EMAIL:
letters and digits joined by single `. _ + -`, a domain of such labels, 64 characters at most,
not a special-use domain) are accepted without it; test_wf_email_fast_path.py checks against the
library that it accepts every address of that shape. Every other address is the library's call.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import orjson

REQUIRED_FIELDS = ("id", "name", "email")
_REQUIRED = frozenset(REQUIRED_FIELDS)
MAX_FIELD_CHARS = 65_536

# Reasons a record is skipped (counted in the summary, stored in the sink's `skipped` table).
MISSING_ID = "missing_id"
MISSING_NAME = "missing_name"
INVALID_EMAIL = "invalid_email"
FIELD_TOO_LARGE = "field_too_large"
WRONG_FIELD_COUNT = "wrong_field_count"
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
DUPLICATE_ID = "duplicate_id"  # an earlier record of the same input has this id
ALREADY_IMPORTED = "already_imported"  # another import into the same database has this id
INVALID_ID = "invalid_id"  # an id that is not text or a whole number (true, 1.5, {...})
UNSTORABLE_VALUE = "unstorable_value"  # JSON cannot write it back (nested > 254 deep, int > 64 bits)


def tidy(record: dict[str, Any]) -> dict[str, Any]:
    """`record` with its id trimmed, so that " 3 " and "3" are one id (the second a duplicate)."""
    record_id = record.get("id")
    if type(record_id) is str and record_id != (trimmed := record_id.strip()):
        record["id"] = trimmed
    return record


def problem_with(record: dict[str, Any]) -> str | None:
    """Why `record` cannot be imported, or None if it can."""
    record_id = record.get("id")
    if record_id is None or (type(record_id) is str and not record_id.strip()):
        return MISSING_ID
    if type(record_id) not in (str, int):  # checked before any str(): it may be nested deep
        return INVALID_ID
    if any(isinstance(v, str) and len(v) > MAX_FIELD_CHARS for v in record.values()):
        return FIELD_TOO_LARGE
    name = record.get("name")
    if not isinstance(name, str) or not name.strip():
        return MISSING_NAME
    email = record.get("email")
    if not isinstance(email, str) or not valid_email(email):
        return INVALID_EMAIL
    if len(record) > len(REQUIRED_FIELDS) and not _writable(extra_fields(record)):
        return UNSTORABLE_VALUE
    return None


PLAIN_EMAIL = re.compile(r"[a-z0-9]+(?:[._+-][a-z0-9]+)*@(?:[a-z0-9]+(?:-[a-z0-9]+)*\.)+[a-z]{2,63}", re.I)
PLAIN_EMAIL_MAX = 64  # characters: within every length limit of an address, its parts and labels


def valid_email(email: str) -> bool:
    """Whether `email` is a well-formed address (syntax only: no DNS lookup)."""
    if "@" not in email:  # no address at all: the library would say so, 30 µs later
        return False
    validate, invalid, special_use = _email_validator()
    if len(email) <= PLAIN_EMAIL_MAX and PLAIN_EMAIL.fullmatch(email) and not special_use.search(email):
        return True
    try:
        validate(email, check_deliverability=False)
    except invalid:
        return False
    return True


@functools.cache
def _email_validator() -> tuple[Any, type[Exception], re.Pattern[str]]:
    """email-validator's check, its error, and a pattern finding a domain that is (or is under)
    a special-use domain it refuses; imported on first use: importing it takes ~0.1 s, which
    the supervisor's commands need not pay."""
    import email_validator

    names = "|".join(re.escape(name) for name in email_validator.SPECIAL_USE_DOMAIN_NAMES)
    return (email_validator.validate_email, email_validator.EmailNotValidError,
            re.compile(rf"[@.](?:{names})\Z", re.I))


def extra_fields(record: dict[str, Any]) -> dict[str, Any]:
    """The fields beyond the required ones (the sink keeps them as one JSON value)."""
    return {k: v for k, v in record.items() if k not in _REQUIRED}


def _writable(value: Any) -> bool:
    """Whether orjson can write `value`; checked only for records with extra fields, so the
    common record pays nothing."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return True
