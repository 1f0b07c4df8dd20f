"""The base of dtrain's own errors: input that cannot run (a config, data, a checkpoint, a spec, a key).

Each module raises its own subclass with a message that names the problem; the CLI catches this base
once and prints the message as one line (exit status 2), so no command needs its own handler.
"""
from __future__ import annotations


class DtrainError(Exception):
    """Bad input, named in the message; never a bug in dtrain itself."""
