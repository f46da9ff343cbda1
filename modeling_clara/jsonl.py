"""Reading JSONL input the one way every entry point does: line by line, with line numbers for errors.

Each line is decoded on its own, so a byte that is not UTF-8 is reported with its line (and, where skipping is
allowed, costs only that line); a UTF-8 byte-order mark before the first line, which some editors write, is not
part of row 1. Not part of the Hub remote code.
"""

import codecs
import json
from collections.abc import Iterator
from pathlib import Path

__all__ = ["read_jsonl"]


def read_jsonl(path: str | Path) -> Iterator[tuple[int, object, str | None]]:
    """`(line_number, value, problem)` for every non-blank line of a JSONL file: the parsed JSON value and None, or
    None and why the line could not be read (not UTF-8, invalid JSON). Missing files raise `FileNotFoundError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No data file at {path}.")
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if line_number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield line_number, None, f"not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})"
                continue
            if not text.strip():
                continue
            try:
                yield line_number, json.loads(text), None
            except json.JSONDecodeError as error:
                yield line_number, None, f"invalid JSON ({error.msg} at column {error.colno})"
