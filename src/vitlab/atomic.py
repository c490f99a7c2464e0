"""Atomic outputs for writers that want a path (matplotlib, PIL, csv, torch.save): write to a
temporary name in the same folder, then rename, so a killed run never leaves half a file that
looks whole. Text/JSON go through `vitlab.data.shards.atomic_write_text`."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers infer the format); on
    success it replaces `path`, on error it is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{socket.gethostname()}-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
