"""Progress bars with rate and ETA for long stages (tqdm; plain periodic lines when not a TTY)."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def progress(total: int, desc: str, unit: str = "img", **kwargs: Any) -> tqdm:
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        dynamic_ncols=True,
        leave=True,
        mininterval=0.5 if interactive else 10.0,
        file=sys.stderr,
        **kwargs,
    )
