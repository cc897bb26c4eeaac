"""Reading records from jsonl, parquet, csv/tsv and plain text, streamed, with bad records counted by file and line.

Every reader yields (position, record dict): the position is the 1-based line number (jsonl, csv, txt) or row
number (parquet) that error messages and reports name. `read_texts` picks the text field of each record.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from nanomind.corpus import require
from nanomind.jsonl import BadLines, check_text, read_objects

FORMATS = ("auto", "jsonl", "parquet", "csv", "tsv", "txt")
SUFFIXES = {
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv",
    ".txt": "txt", ".text": "txt", ".md": "txt",
}  # fmt: skip
# Field names public corpora use for their text, tried in this order when --text-field is not given.
TEXT_FIELDS = ("text", "content", "document", "passage", "body", "article", "raw_content")
TXT_SPLITS = ("blank", "line", "file")

Progress = Callable[[int], None] | None


def detect_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    found = SUFFIXES.get(Path(path).suffix.lower())
    if found is None:
        raise ValueError(f"{path}: unknown format; name it .jsonl/.parquet/.csv/.tsv/.txt or pass --format")
    return found


def _lines(path: str, progress: Progress) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) of a text file; undecodable bytes become U+FFFD rather than stopping the read."""
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if progress is not None:
                progress(len(raw))
            yield line_no, raw.decode("utf-8", errors="replace").removeprefix("\ufeff" if line_no == 1 else "")


def _read_txt(path: str, split: str, progress: Progress) -> Iterator[tuple[int, dict]]:
    """Plain text as documents: one per paragraph (blank-line separated), per line, or the whole file."""
    start, buf = 0, []
    for line_no, line in _lines(path, progress):
        line = line.replace("\r\n", "\n")
        if split == "line" or (split == "blank" and not line.strip()):
            if split == "line":
                start, buf = line_no, [line]
            if "".join(buf).strip():
                yield start, {"text": "".join(buf).strip("\n")}
            start, buf = 0, []
            continue
        start = start or line_no
        buf.append(line)
    if "".join(buf).strip():
        yield start, {"text": "".join(buf).strip("\n")}


def _read_csv(path: str, delimiter: str, report: BadLines, progress: Progress) -> Iterator[tuple[int, dict]]:
    # The default field limit (128 KiB) is below a long article; raise it for this process.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    lines = (line for _, line in _lines(path, progress))
    reader = csv.DictReader(lines, delimiter=delimiter)
    try:
        for record in reader:
            if None in record:  # more cells than header names
                report.add(path, reader.line_num, "more cells than the header")
                continue
            yield reader.line_num, record
    except csv.Error as e:
        report.add(path, reader.line_num, f"CSV error ({e}); rest of file skipped")


def _read_parquet(path: str, progress: Progress) -> Iterator[tuple[int, dict]]:
    pq = require("pyarrow.parquet", "pyarrow", "reading parquet")
    pf = pq.ParquetFile(path)
    size, rows = Path(path).stat().st_size, max(pf.metadata.num_rows, 1)
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        if progress is not None:  # parquet is compressed: advance by the share of rows read
            progress(size * batch.num_rows // rows)
        for record in batch.to_pylist():
            row += 1
            yield row, record


def read_records(
    path: str, report: BadLines, fmt: str = "auto", txt_split: str = "blank", progress: Progress = None
) -> Iterator[tuple[int, dict]]:
    """(position, record) for every record of `path`; malformed ones are counted in `report`."""
    if not Path(path).is_file():
        raise ValueError(f"file not found: {path}")
    fmt = detect_format(path, fmt)
    if fmt == "jsonl":
        if progress is None:
            yield from read_objects(path, report)
        else:  # read_objects has no progress hook; count bytes line by line alongside it
            with open(path, "rb") as fh:
                sizes = (len(line) for line in fh)
                last = 0
                for line_no, record in read_objects(path, report):
                    progress(sum(next(sizes) for _ in range(line_no - last)))
                    last = line_no
                    yield line_no, record
                progress(sum(sizes))
    elif fmt == "parquet":
        yield from _read_parquet(path, progress)
    elif fmt in ("csv", "tsv"):
        yield from _read_csv(path, "\t" if fmt == "tsv" else ",", report, progress)
    elif fmt == "txt":
        if txt_split not in TXT_SPLITS:
            raise ValueError(f"--txt-split must be one of {TXT_SPLITS}, got {txt_split!r}")
        yield from _read_txt(path, txt_split, progress)
    else:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")


def pick_text_field(record: dict, field: str = "") -> str:
    """`field` if given, else the first of TEXT_FIELDS the record has; a ValueError lists what it does have."""
    if field:
        return field
    for name in TEXT_FIELDS:
        if isinstance(record.get(name), str):
            return name
    raise ValueError(f"no text field among {list(TEXT_FIELDS)}; the records have {sorted(record)}: pass --text-field")


def read_texts(
    path: str,
    report: BadLines,
    field: str = "",
    fmt: str = "auto",
    txt_split: str = "blank",
    progress: Progress = None,
) -> Iterator[tuple[int, str]]:
    """(position, text) for every record with a usable text; the field is chosen from the first record if not given."""
    for pos, record in read_records(path, report, fmt, txt_split, progress):
        if not field:
            try:
                field = pick_text_field(record)
            except ValueError as e:
                raise ValueError(f"{path}:{pos}: {e}") from None
        text, reason = check_text(record, field)
        if text is None:
            report.add(path, pos, reason)
        else:
            yield pos, text


def write_jsonl(fh, record: dict) -> int:
    """Write one record as a jsonl line (UTF-8, not ASCII-escaped); returns the bytes written."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    fh.write(line)
    return len(line)
