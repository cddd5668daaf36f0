"""store.codec: one compact JSON object per line, ending in a CRC-32 of the rest."""

from __future__ import annotations

import json
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from store_helpers import checksum_is_valid

from store.codec import DamagedRecordError, decode, encode, normalize

RECORD = {"op": "resolve", "id": "import/x.3", "value": {"rows": [1, 2]}, "t": 1.5}

# A str with a NUL is unstorable (see below); surrogates are not UTF-8.
texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(texts.filter(lambda t: len(t) <= 8), children, max_size=4),
    max_leaves=12,
)
json_records = st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=5).filter(
    lambda record: "crc" not in record
)


def test_encode_makes_one_newline_terminated_line() -> None:
    line = encode(RECORD)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1


def test_encoded_line_is_plain_json_with_crc_as_last_field() -> None:
    parsed = json.loads(encode(RECORD))
    assert list(parsed) == [*RECORD, "crc"]
    assert {k: v for k, v in parsed.items() if k != "crc"} == RECORD


def test_crc_is_crc32_of_the_record_without_it() -> None:
    line = encode(RECORD)
    body = json.dumps(RECORD, separators=(",", ":")).encode()
    assert json.loads(line)["crc"] == f"{zlib.crc32(body):08x}"
    assert checksum_is_valid(line[:-1])


def test_newlines_inside_values_are_escaped() -> None:
    line = encode({"op": "create", "id": "a\nb", "param": "x\ny"})
    assert line.count(b"\n") == 1
    assert decode(line[:-1])["id"] == "a\nb"


@given(json_records)
def test_decode_returns_what_was_encoded(record: dict) -> None:
    assert decode(encode(record)[:-1]) == record


@given(json_records)
def test_every_line_is_valid_json_with_a_valid_checksum(record: dict) -> None:
    assert checksum_is_valid(encode(record)[:-1])


def test_every_truncation_is_detected() -> None:
    line = encode(RECORD)[:-1]
    for cut in range(len(line)):
        with pytest.raises(DamagedRecordError):
            decode(line[:cut])


def test_every_single_bit_flip_in_the_body_is_detected() -> None:
    line = encode(RECORD)[:-1]
    body_end = len(line) - len(b',"crc":"12345678"}')
    for pos in range(body_end):
        for bit in range(8):
            damaged = bytearray(line)
            damaged[pos] ^= 1 << bit
            with pytest.raises(DamagedRecordError):
                decode(bytes(damaged))


def test_every_single_bit_flip_in_the_checksum_is_detected() -> None:
    line = encode(RECORD)[:-1]
    digits = line[-10:-2]
    assert any(c in b"abcdef" for c in digits), "pick a record whose crc has a letter"
    for pos in range(len(line) - 10, len(line) - 2):
        for bit in range(8):
            damaged = bytearray(line)
            damaged[pos] ^= 1 << bit
            with pytest.raises(DamagedRecordError):
                decode(bytes(damaged))


def test_line_without_checksum_is_damaged() -> None:
    with pytest.raises(DamagedRecordError, match="no checksum"):
        decode(b'{"op":"create","id":"a"}')


def test_non_hexadecimal_checksum_is_damaged() -> None:
    line = encode(RECORD)[:-1]
    with pytest.raises(DamagedRecordError, match="not hexadecimal"):
        decode(line[:-10] + b'zzzzzzzz"}')


def test_checksum_mismatch_is_damaged() -> None:
    line = encode(RECORD)[:-1].replace(b'"rows"', b'"rowz"')
    with pytest.raises(DamagedRecordError, match="mismatch"):
        decode(line)


def test_non_json_body_with_matching_checksum_is_damaged() -> None:
    body = b'{"op":}'
    line = b'{"op":,"crc":"%08x"}' % zlib.crc32(body)
    with pytest.raises(DamagedRecordError, match="not JSON"):
        decode(line)


def test_empty_line_is_damaged() -> None:
    with pytest.raises(DamagedRecordError):
        decode(b"")


def test_damaged_record_error_is_a_value_error() -> None:
    assert issubclass(DamagedRecordError, ValueError)


def test_encode_refuses_values_that_are_not_json() -> None:
    with pytest.raises(TypeError):
        encode({"op": "create", "id": "a", "param": object()})


def test_normalize_turns_tuples_into_lists() -> None:
    assert normalize({"a": (1, (2, 3))}) == {"a": [1, [2, 3]]}


@pytest.mark.parametrize("value", [object(), {1, 2}, b"bytes", {"k": object()}])
def test_normalize_refuses_values_that_are_not_json(value: object) -> None:
    with pytest.raises(TypeError):
        normalize(value)


@given(json_values)
def test_normalize_is_idempotent(value: object) -> None:
    assert normalize(normalize(value)) == normalize(value)


@given(st.text(), st.text())
def test_normalize_refuses_a_nul_anywhere_and_only_a_nul(before: str, after: str) -> None:
    text = before + "\x00" + after
    for value in (text, [1, {"k": text}], {text: 1}):
        with pytest.raises(TypeError, match="NUL"):
            normalize(value)
    clean = (before + "\\u0000" + after).replace("\x00", "")  # the six characters \u0000 are fine
    assert normalize([clean]) == [clean]
