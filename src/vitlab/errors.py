"""The errors a user can fix: their message names the key, file or line, so the entry points
print it and exit 2 without a traceback (`USER_ERRORS`)."""

from __future__ import annotations

from omegaconf.errors import MissingMandatoryValue


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key."""


class DatasetFormatError(ValueError):
    """The data on disk does not follow the official layout; the message names the culprit."""


def _user_errors() -> tuple[type[Exception], ...]:
    from vitlab.atomic import OutOfSpaceError  # a full disk: the message names the path

    return (ConfigError, DatasetFormatError, MissingMandatoryValue, OutOfSpaceError)


USER_ERRORS: tuple[type[Exception], ...] = _user_errors()
