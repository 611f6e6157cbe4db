"""The project's error types: what a user can mend (bad input, bad config), as opposed to programming errors.

Entry points (``pipelines.*``, through ``pipelines/_cli.py``) catch :class:`UserError` alone and print it as one
line (exit code 2), as they do Hydra's own config errors; every other exception keeps its traceback (exit 1).
Raise a :class:`UserError` subclass only where the message names the file, column, key or value at fault and
what is allowed. This module imports nothing, so any layer may use it.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or configuration; the message alone tells the user what to change."""


class ConfigError(UserError, ValueError):
    """A config key holds a value that is not allowed (the message names the key, the value, what is allowed)."""


class DataValidationError(UserError, ValueError):
    """A data file does not follow the documented schema (the message names the file and the column)."""


class CheckpointError(UserError):
    """A checkpoint (file or sharded folder) is unreadable, untrusted or does not fit the model."""


class BundleError(UserError):
    """A model bundle is incomplete, damaged, or names something the package does not build."""


class InputNotFound(UserError, FileNotFoundError):
    """An input the user named (``data.path``, ``input=``, a prepared dataset folder) does not exist.

    Kept apart from :class:`DataValidationError`, which is about the contents of a file that exists; it is
    also a ``FileNotFoundError``, so callers that test for a missing file keep working.
    """
