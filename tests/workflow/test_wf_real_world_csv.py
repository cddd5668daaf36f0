"""Real-world inputs read in process from real files: mapped and case-insensitive CSV headers,
trimmed ids, `;` `|` and tab delimiters (given or sniffed), other encodings, gzip, and emails
checked by email-validator."""

from __future__ import annotations

import gzip
import random
import re
from pathlib import Path

import pytest

from workflow.importer import SourceError, file_source, plan_batches
from workflow.importer.file_format import FormatError, column_map, delimiter_char, encoding_name
from workflow.importer.records import INVALID_EMAIL, valid_email
from workflow.importer.sources import Row, plan_segment, read_batch, verify_source

PEOPLE = [("1", "Ann", "ann@example.com"), ("2", "Bo", "bo@example.org"), ("3", "Cy", "cy@example.net")]


def write(path: Path, text: str, encoding: str = "utf-8", gzipped: bool = False) -> Path:
    data = text.encode(encoding)
    path.write_bytes(gzip.compress(data) if gzipped else data)
    return path


def table(header: list[str], rows: list[tuple[str, ...]], delimiter: str = ",") -> str:
    return "".join(delimiter.join(cells) + "\n" for cells in [header, *rows])


def read_rows(source: dict, batch_size: int = 2) -> list[Row]:
    return [row for batch in plan_batches(source, batch_size) for row in read_batch(batch)]


def fields(rows: list[Row]) -> list[tuple[str, str, str]]:
    return [(r.record["id"], r.record["name"], r.record["email"]) for r in rows]


# -- headers ----------------------------------------------------------------------------------


def test_map_names_the_columns_that_hold_the_fields_and_keeps_the_others(tmp_path: Path) -> None:
    path = write(tmp_path / "in.csv", table(["user_id", "full_name", "mail", "city"],
                                            [(*p, "Oslo") for p in PEOPLE]))
    source = file_source(path, columns=column_map("id=user_id,name=full_name,email=mail"))
    rows = read_rows(source)
    assert fields(rows) == PEOPLE
    assert rows[0].record["city"] == "Oslo"
    assert [r.problem for r in rows] == [None] * 3


def test_header_names_match_trimmed_and_in_any_case(tmp_path: Path) -> None:
    header = [" ID ", "Name", "EMAIL", " City "]
    path = write(tmp_path / "in.csv", table(header, [(*p, "Rome") for p in PEOPLE]))
    rows = read_rows(file_source(path))
    assert fields(rows) == PEOPLE
    assert rows[0].record["City"] == "Rome"  # an extra column keeps its (trimmed) header text


def test_a_header_without_the_fields_shows_what_it_found_and_suggests_map(tmp_path: Path) -> None:
    path = write(tmp_path / "in.csv", table(["user_id", "full_name", "mail"], PEOPLE))
    with pytest.raises(SourceError) as caught:
        plan_batches(file_source(path), 2)
    assert str(caught.value) == (
        f"{path}:1: header lacks the column(s) id, name, email (found: user_id,full_name,mail); "
        "name the columns with --map id=COLUMN,name=COLUMN,email=COLUMN")


def test_a_map_to_a_column_the_header_lacks_says_which(tmp_path: Path) -> None:
    path = write(tmp_path / "in.csv", table(["user_id", "name", "email"], PEOPLE))
    with pytest.raises(SourceError, match=re.escape("lacks the column(s) uid (--map id=uid) (found: ")):
        plan_batches(file_source(path, columns={"id": "uid"}), 2)


def test_a_one_column_header_holding_another_delimiter_suggests_it(tmp_path: Path) -> None:
    path = write(tmp_path / "in.csv", table(["id", "name", "email"], PEOPLE, ";"))
    with pytest.raises(SourceError, match=re.escape("is it delimited by ';'? give --delimiter ';'")):
        plan_batches(file_source(path, delimiter=","), 2)


def test_a_mapped_field_whose_own_name_is_another_column_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "in.csv", table(["id", "user_id", "name", "email"], [("a", *p) for p in PEOPLE]))
    with pytest.raises(SourceError, match=re.escape("the column 'id' clashes with --map id=user_id")):
        plan_batches(file_source(path, columns={"id": "user_id"}), 2)


def test_columns_repeated_in_another_case_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "in.csv", table(["id", "name", "email", "Email"], [(*p, "x") for p in PEOPLE]))
    with pytest.raises(SourceError, match=re.escape(f"{path}:1: header repeats the column(s) email, Email")):
        plan_batches(file_source(path), 2)


@pytest.mark.parametrize(("text", "message"), [
    ("id", "expected FIELD=COLUMN pairs"),
    ("id=a,city=b", "not 'city=b'"),
    ("id=a,id=b", "the field id is mapped twice"),
    ("id=a,name=A", "two fields are mapped to one column"),
])
def test_a_malformed_map_is_a_format_error(text: str, message: str) -> None:
    with pytest.raises(FormatError, match=re.escape(message)):
        column_map(text)


# -- ids and emails ---------------------------------------------------------------------------


def test_ids_are_trimmed_in_csv_and_json_lines(tmp_path: Path) -> None:
    csv_rows = read_rows(file_source(write(tmp_path / "in.csv", "id,name,email\n 3 ,Ann,a@example.com\n")))
    jsonl = write(tmp_path / "in.jsonl", '{"id": "\\t4 ", "name": "Bo", "email": "b@example.com"}\n')
    assert [r.record_id for r in csv_rows + read_rows(file_source(jsonl))] == ["3", "4"]
    blank = read_rows(file_source(write(tmp_path / "blank.csv", "id,name,email\n  ,Ann,a@example.com\n")))
    assert blank[0].problem == "missing_id"


@pytest.mark.parametrize("email", ["x@example.net.", "hsmith,@example.com", "a b@example.com", "ann@",
                                   "@example.com", "ann@@example.com", "ann@localhost", "a..b@example.com"])
def test_malformed_emails_are_invalid(email: str, tmp_path: Path) -> None:
    assert not valid_email(email)
    rows = read_rows(file_source(write(tmp_path / "in.csv", f'id,name,email\n1,Ann,"{email}"\n')))
    assert rows[0].problem == INVALID_EMAIL


@pytest.mark.parametrize("email", ["ann@example.com", "ann.lee+tag@mail.example.co.uk", "josé@exämple.com",
                                   "o'brien@example.ie"])
def test_well_formed_emails_are_valid_without_any_dns_lookup(email: str) -> None:
    assert valid_email(email)  # example.com has no mail server: syntax only


# -- delimiters -------------------------------------------------------------------------------


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_the_delimiter_is_sniffed_and_recorded(tmp_path: Path, delimiter: str) -> None:
    path = write(tmp_path / "in.csv", table(["id", "name", "email"], PEOPLE, delimiter))
    source = file_source(path)
    assert source.get("delimiter", ",") == delimiter
    assert fields(read_rows(source)) == PEOPLE


def test_sniffing_is_not_fooled_by_commas_inside_quoted_cells(tmp_path: Path) -> None:
    rows = [(str(i), f'"Lee, Ann {i}"', f"a{i}@example.com") for i in range(30)]
    source = file_source(write(tmp_path / "in.csv", table(["id", "name", "email"], rows, ";")))
    assert source["delimiter"] == ";"
    assert read_rows(source)[3].record["name"] == "Lee, Ann 3"


def test_tsv_means_tab_and_a_given_delimiter_wins(tmp_path: Path) -> None:
    tsv = file_source(write(tmp_path / "in.tsv", table(["id", "name", "email"], PEOPLE, "\t")))
    assert tsv["delimiter"] == "\t" and fields(read_rows(tsv)) == PEOPLE
    piped = file_source(write(tmp_path / "in.csv", table(["id", "name", "email"], PEOPLE, "|")),
                        delimiter=delimiter_char("|"))
    assert fields(read_rows(piped)) == PEOPLE
    assert delimiter_char("tab") == delimiter_char("\\t") == "\t"
    with pytest.raises(FormatError, match="one character"):
        delimiter_char(";;")


def test_a_plain_utf8_csv_is_described_as_earlier_versions_described_it(tmp_path: Path) -> None:
    """So an import an earlier version started replays: its recorded arguments are these."""
    source = file_source(write(tmp_path / "in.csv", table(["id", "name", "email"], PEOPLE)))
    assert set(source) == {"kind", "path", "size", "sha256"}


# -- encodings --------------------------------------------------------------------------------

LATIN = table(["id", "name", "email"],
              [("1", "José Müller", "jose@example.com"), ("2", "Zoë", "zoe@example.com")])


def test_a_latin1_file_reads_with_its_encoding(tmp_path: Path) -> None:
    source = file_source(write(tmp_path / "in.csv", LATIN, "latin-1"), encoding=encoding_name("latin-1"))
    assert source["encoding"] == "iso8859-1"
    assert [r.record["name"] for r in read_rows(source)] == ["José Müller", "Zoë"]


def test_a_utf8_byte_order_mark_read_as_latin1_is_named_not_taken_for_a_missing_column(
    tmp_path: Path,
) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b"\xef\xbb\xbfid,name,email\n1,Jos\xe9,j@example.com\n")
    with pytest.raises(SourceError, match=re.escape(f"{path}:1: starts with a UTF-8 byte-order mark "
                                                    "but is read with --encoding iso8859-1")):
        plan_segment(file_source(path, encoding=encoding_name("latin-1")), 2)


def test_a_file_invalid_in_its_encoding_names_file_line_and_the_flag(tmp_path: Path) -> None:
    path = write(tmp_path / "in.csv", LATIN, "latin-1")
    with pytest.raises(SourceError) as caught:
        plan_batches(file_source(path), 2)
    assert str(caught.value) == (f"{path}:2: not valid UTF-8 (byte 0xe9 at byte 5 of the line: invalid "
                                 "continuation byte); give the file's encoding with --encoding latin-1")


@pytest.mark.parametrize(("name", "message"),
                         [("utf-16", "is not supported"), ("klingon", "unknown encoding")])
def test_an_encoding_the_reader_cannot_use_is_a_format_error(name: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        encoding_name(name)


# -- gzip -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["in.csv.gz", "in.tsv.gz", "in.jsonl.gz", "in.ndjson.gz"])
def test_gzip_files_read_the_same_rows_as_the_plain_file(tmp_path: Path, name: str) -> None:
    rows = [(str(i), f"Name {i}", f"user{i}@example.com") for i in range(500)]
    if "jsonl" in name or "ndjson" in name:
        text = "".join(f'{{"id": "{i}", "name": "{n}", "email": "{e}"}}\n' for i, n, e in rows)
    else:
        text = table(["id", "name", "email"], rows, "\t" if ".tsv" in name else ",")
    plain = file_source(write(tmp_path / name.removesuffix(".gz"), text))
    packed = file_source(write(tmp_path / name, text, gzipped=True))
    assert packed["compression"] == "gzip"
    assert fields(read_rows(packed, 37)) == fields(read_rows(plain, 37)) == rows
    # Batches are ranges of decompressed bytes: the same as the plain file's.
    assert [(b["offset"], b["end"], b["line"]) for b in plan_batches(packed, 37)] == \
        [(b["offset"], b["end"], b["line"]) for b in plan_batches(plain, 37)]


def test_gzip_batches_read_in_any_order_and_planned_in_segments(tmp_path: Path) -> None:
    rows = [(str(i), f"Name {i}", f"user{i}@example.com") for i in range(3000)]
    source = file_source(write(tmp_path / "in.csv.gz", table(["id", "name", "email"], rows), gzipped=True))
    batches, cursor = [], None
    while True:  # planned a segment at a time, as the workflow plans it
        segment = plan_segment(source, 10, cursor)
        batches += segment["batches"]
        if (cursor := segment["next"]) is None:
            break
    order = list(range(len(batches)))
    random.Random(5).shuffle(order)
    read = {i: fields(list(read_batch(batches[i]))) for i in order}
    assert [row for i in range(len(batches)) for row in read[i]] == rows


def test_a_cut_gzip_file_is_a_source_error_naming_file_and_line(tmp_path: Path) -> None:
    rows = [(str(i), f"Name {i}", f"user{i}@example.com") for i in range(20_000)]
    data = gzip.compress(table(["id", "name", "email"], rows).encode())
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=re.escape(str(path)) + r":\d+: not a valid gzip file \("):
        plan_batches(file_source(path), 1000)


def test_a_file_named_gz_that_is_not_gzip_is_a_source_error(tmp_path: Path) -> None:
    path = write(tmp_path / "in.csv.gz", table(["id", "name", "email"], PEOPLE))
    with pytest.raises(SourceError, match=re.escape(f"{path}:1: not a valid gzip file (Not a gzipped file")):
        file_source(path)


def test_a_changed_gzip_file_is_refused_by_a_joining_machine(tmp_path: Path) -> None:
    path = write(tmp_path / "in.csv.gz", table(["id", "name", "email"], PEOPLE), gzipped=True)
    source = file_source(path)
    verify_source(source)
    write(path, table(["id", "name", "email"], PEOPLE[:2]), gzipped=True)
    with pytest.raises(SourceError, match="input changed since the import started"):
        verify_source(source)


def test_an_unknown_extension_names_what_is_read(tmp_path: Path) -> None:
    path = write(tmp_path / "in.txt.gz", "x")
    with pytest.raises(SourceError, match=re.escape("unknown extension '.txt.gz' (use .csv, .tsv, .jsonl")):
        file_source(path)


def test_map_and_delimiter_do_not_apply_to_json_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", '{"id": "1", "name": "A", "email": "a@example.com"}\n')
    with pytest.raises(FormatError, match="apply to CSV and TSV files"):
        file_source(path, columns={"id": "uid"})
