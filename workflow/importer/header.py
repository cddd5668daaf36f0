"""A CSV header turned into the field names of its records. Pure: the caller names file and line.

Header cells are matched to the fields `id`, `name`, `email` trimmed and case-insensitively;
`--map id=user_id,...` (a descriptor's `columns`) names the column that holds a field. Other
columns are kept, under their trimmed header text, as the record's extra fields.
"""

from __future__ import annotations

from collections import Counter

from . import records
from .file_format import SNIFFED_DELIMITERS, Format

MAX_CSV_COLUMNS = 10_000  # a wider header is refused: no real import has that many columns
_REPEATS_NAMED = 5  # a header's repeated columns named in its error, at most
_HEADER_SHOWN = 200  # characters of a header an error shows, at most


class HeaderError(ValueError):
    """A header that cannot give the import its fields; the message says what was found."""


def field_names(header: list[str], fmt: Format) -> list[str]:
    """The name each column's cell gets in a record: a field's for the columns that hold one
    (per `fmt.columns`, else by name), the trimmed header text for the others."""
    if len(header) > MAX_CSV_COLUMNS:
        raise HeaderError(f"header has {len(header)} columns, more than the {MAX_CSV_COLUMNS} allowed")
    names = [cell.strip() for cell in header]
    keys = [name.casefold() for name in names]
    _refuse_repeats(names, keys)
    wanted = {f: fmt.columns.get(f, f).strip().casefold() for f in records.REQUIRED_FIELDS}
    present = set(keys)
    missing = [f for f, key in wanted.items() if key not in present]
    if missing:
        raise HeaderError(_missing(header, missing, fmt))
    field_of = {key: f for f, key in wanted.items()}
    for name, key in zip(names, keys, strict=True):
        if key in records.REQUIRED_FIELDS and field_of.get(key) != key:
            raise HeaderError(f"the column {name!r} clashes with --map {key}={fmt.columns[key]} "
                              "(rename one of them)")
    return [field_of.get(key, name) for name, key in zip(names, keys, strict=True)]


def _refuse_repeats(names: list[str], keys: list[str]) -> None:
    counts = Counter(keys)
    repeated = list(dict.fromkeys(name for name, key in zip(names, keys, strict=True) if counts[key] > 1))
    if repeated:
        named = ", ".join(repeated[:_REPEATS_NAMED])
        more = len(repeated) - _REPEATS_NAMED
        raise HeaderError(f"header repeats the column(s) {named}" + (f" and {more} more" if more > 0 else ""))


def _missing(header: list[str], missing: list[str], fmt: Format) -> str:
    found = fmt.delimiter.replace("\t", "\\t").join(header)
    if len(found) > _HEADER_SHOWN:
        found = found[:_HEADER_SHOWN] + "..."
    wanted = ", ".join(f"{fmt.columns[f]} (--map {f}={fmt.columns[f]})" if f in fmt.columns else f
                       for f in missing)
    message = f"header lacks the column(s) {wanted} (found: {found})"
    others = [d for d in SNIFFED_DELIMITERS if d != fmt.delimiter and len(header) == 1 and d in header[0]]
    if others:
        shown = "tab" if others[0] == "\t" else others[0]
        return f"{message}; is it delimited by {shown!r}? give --delimiter {shown!r}"
    mapping = ",".join(f"{f}=COLUMN" if f in missing else f"{f}={fmt.columns[f]}"
                       for f in records.REQUIRED_FIELDS if f in missing or f in fmt.columns)
    return f"{message}; name the columns with --map {mapping}"
