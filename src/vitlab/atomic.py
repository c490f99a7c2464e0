"""Atomic outputs for writers that want a path (matplotlib, PIL, csv, torch.save): write to a
temporary name in the same folder, then rename, so a killed run never leaves half a file that
looks whole. Bytes, text and JSON go through `atomic_write_bytes` / `atomic_write_text`, whose
temp names (`temp_path`) carry their writer's host, pid namespace, pid and thread.

A write that fails says which file: `write_error` gives an OSError from `write()` (which names
no file) the path being written, and turns a full disk or quota (ENOSPC, EDQUOT) into an
`OutOfSpaceError` with a one-line message."""

from __future__ import annotations

import errno
import os
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import pyarrow as pa

OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class OutOfSpaceError(OSError):
    """No space left (disk full or quota exceeded) writing `filename`: the message names it.
    An OSError, so `except OSError` still catches it."""

    def __str__(self) -> str:
        what = "disk quota exceeded" if self.errno == errno.EDQUOT else "no space left on device"
        where = f"in {self.filename}" if Path(self.filename).is_dir() else str(self.filename)
        return f"{what} writing {where}: free space there or write elsewhere"


def is_out_of_space(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in OUT_OF_SPACE


def write_error(err: OSError, path: str | Path, tmp: str | Path | None = None) -> OSError:
    """`err`, raised while writing `path` (through its temp file `tmp`), as an error naming
    `path`: an OSError that names no file (or only the temp name) is given `path`; no space left
    becomes an `OutOfSpaceError`. One that names another file (an input read while writing) or
    has no errno is returned as it is."""
    if isinstance(err, OutOfSpaceError):
        return err
    named = err.filename is not None and str(err.filename) != str(tmp)
    if err.errno is None or (named and not is_out_of_space(err)):
        return err
    target = str(err.filename) if named else str(path)
    if is_out_of_space(err):
        return OutOfSpaceError(err.errno, os.strerror(err.errno), target)
    # OSError(errno, ...) builds the matching subclass (PermissionError, ...)
    return OSError(err.errno, err.strerror or os.strerror(err.errno), target)


def raise_naming(err: OSError, path: str | Path, tmp: str | Path | None = None) -> NoReturn:
    """Raise `write_error(err, path, tmp)` (from `err` when it is a new error)."""
    named = write_error(err, path, tmp)
    if named is err:
        raise err
    raise named from err


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers infer the format); on
    success it replaces `path`, on error it is removed and `path` is left as it was. An OSError
    names `path` (see `write_error`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{socket.gethostname()}-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise_naming(err, path, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _writer_host() -> str:
    """This machine and pid namespace as one file-name token: pids are comparable only within
    it (two containers may share a host name but not their pids)."""
    host = re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname()) or "localhost"
    try:
        return f"{host}.ns{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return host


WRITER_HOST = _writer_host()


def temp_path(final: Path) -> Path:
    """The temp name a writer in this process/thread uses for `final` (same folder)."""
    name = f".{final.name}.tmp-{WRITER_HOST}-{os.getpid()}-{threading.get_ident()}"
    return final.with_name(name)


def atomic_write_bytes(path: Path, data: bytes | memoryview | pa.Buffer) -> None:
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
