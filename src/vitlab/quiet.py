"""Silence the lines every run printed that say nothing about this run (advertising, library
deprecations a user cannot act on, a tagger's training iterations). Each entry is exact: a
warning or log line that could signal a real problem is never hidden."""

from __future__ import annotations

import logging
import warnings

# (message regex, category): library-internal deprecations, not the user's code
IGNORED_WARNINGS = (
    # Lightning's own use of torch's pytree API (pytorch_lightning/utilities/_pytree.py)
    (r".*isinstance\(treespec, LeafSpec\)` is deprecated.*", None),
)
# (logger name, text in the message): advertising
DROPPED_LOG_LINES = (("pytorch_lightning.utilities.rank_zero", "litlogger"),)
# loggers whose INFO lines are a library's internal progress (NLTK: 10 "Iter N" lines when the
# quickstart trains its tagger)
QUIET_LOGGERS = ("nltk.tag.perceptron",)


class _DropContaining(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# (message regex): warnings worth seeing once per run, not from every call site
ONCE_WARNINGS = (r"PySpark does not yet fully support pandas",)  # 4+ lines per Spark stage


def quiet_known_noise() -> None:
    """Idempotent; called by every pipeline at its start."""
    for message, category in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category or Warning)
    for message in ONCE_WARNINGS:
        warnings.filterwarnings("once", message=message)
    for name, text in DROPPED_LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropContaining) and f.text == text for f in logger.filters):
            logger.addFilter(_DropContaining(text))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
