"""The plain-address fast path of records.valid_email never accepts what email-validator refuses:
every address of its shape (that is not a special-use domain) is one the library accepts."""

from __future__ import annotations

import string

import email_validator
from hypothesis import given, settings
from hypothesis import strategies as st

from workflow.importer.records import PLAIN_EMAIL, PLAIN_EMAIL_MAX, valid_email


def _library_accepts(email: str) -> bool:
    try:
        email_validator.validate_email(email, check_deliverability=False)
    except email_validator.EmailNotValidError:
        return False
    return True


_RUN = st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=5)


def _joined(separators: str, most: int) -> st.SearchStrategy[str]:
    """Runs of letters and digits, joined by single separators."""
    return st.lists(st.tuples(st.sampled_from(separators), _RUN), max_size=most).flatmap(
        lambda rest: _RUN.map(lambda first: first + "".join(sep + run for sep, run in rest)))


_PLAIN = st.builds(
    lambda local, labels, tld: f"{local}@{'.'.join(labels)}.{tld}",
    _joined("._+-", 4), st.lists(_joined("-", 2), min_size=1, max_size=3),
    st.text(alphabet=string.ascii_letters, min_size=2, max_size=6),
).filter(lambda e: len(e) <= PLAIN_EMAIL_MAX)


@settings(max_examples=3000, deadline=None)
@given(_PLAIN)
def test_every_plain_address_is_one_the_library_decides_alike(email: str) -> None:
    assert PLAIN_EMAIL.fullmatch(email)
    assert valid_email(email) == _library_accepts(email)


@settings(max_examples=1500, deadline=None)
@given(st.text(alphabet="aZ09._+-@,; \"'é.-", min_size=0, max_size=40))
def test_any_address_is_decided_as_the_library_decides(email: str) -> None:
    assert valid_email(email) == _library_accepts(email)


def test_special_use_domains_are_left_to_the_library() -> None:
    for email in ["ann@example.test", "ann@mail.LOCALHOST", "bo@onion", "cy@host.invalid", "di@x.local"]:
        assert PLAIN_EMAIL.fullmatch(email) or "@onion" in email
        assert not valid_email(email)
