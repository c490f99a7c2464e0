"""Text inputs users bring (metadata CSVs, ground truths): UTF-8 is required, and a file that is
not says which line and byte, whatever the dataset."""

from __future__ import annotations

import codecs
from pathlib import Path

from vitlab.errors import DatasetFormatError


def first_non_utf8(path: str | Path, chunk_size: int = 1 << 24) -> tuple[int, int] | None:
    """(line, byte value) of the first byte that is not UTF-8, or None when the file is valid
    UTF-8. Reads the file once in chunks (well under a second per GB)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_size)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:  # err.object: this chunk (+ a pending partial char)
                return line + err.object.count(b"\n", 0, err.start), err.object[err.start]
            if not chunk:
                return None
            line += chunk.count(b"\n")


def not_utf8_error(path: Path) -> DatasetFormatError:
    found = first_non_utf8(path)
    where = f"{path}: not UTF-8"
    if found:
        where = f"{path}:{found[0]}: not UTF-8 (byte 0x{found[1]:02X})"
    return DatasetFormatError(
        f"{where}; re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)"
    )


def require_utf8(path: str | Path) -> None:
    """DatasetFormatError naming the file and line of the first non-UTF-8 byte."""
    if first_non_utf8(path):
        raise not_utf8_error(Path(path))
