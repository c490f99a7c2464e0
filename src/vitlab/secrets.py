"""Passwords in URLs (`sweep.storage=postgresql+psycopg://user:PASSWORD@host/db`) masked as
`***` in everything vitlab writes: trial configs, summaries, logs, the printed config, the W&B
config. Hydra's own `.hydra/` files of a `train.py`/`sweep.py` run are written by Hydra before
vitlab starts and are not masked: give secrets through the environment
(`sweep.storage='${oc.env:VITLAB_SWEEP_STORAGE}'`, libpq's PGPASSWORD or ~/.pgpass)."""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"
# scheme://user:password@ -> scheme://user:***@ (the password is anything up to the last '@'
# before the host, so an '@' inside a password is masked too)
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s'\"]*):[^\s'\"]*@")


def mask_secrets(text: str) -> str:
    """`text` with the password of every `scheme://user:password@host` URL replaced by ***."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group('head')}:{MASK}@", text)


def mask_tree(value: Any) -> Any:
    """A plain config tree (dicts, lists, scalars) with every string masked."""
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, dict):
        return {key: mask_tree(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(mask_tree(item) for item in value)
    return value


class MaskSecrets(logging.Filter):
    """Masks URL passwords in every record a handler writes (console and log files)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def mask_log_handlers() -> None:
    """Idempotent: a `MaskSecrets` filter on every handler of the root logger."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, MaskSecrets) for f in handler.filters):
            handler.addFilter(MaskSecrets())
