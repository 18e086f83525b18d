"""The exceptions that mean "your input is wrong", not "FisherKD has a bug".

The CLI prints any of them as one line, ``error: ...``, with exit status 2 (``FISHERKD_DEBUG=1`` keeps the
traceback). A leaf module, so that low-level code (checkpoint loading) can raise them without importing the config.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a config, data or checkpoint file, a name or an option. The message is one line that names the
    problem (the file, key or shapes at fault) and how to fix it."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read, is not a FisherKD checkpoint, or belongs to another model."""
