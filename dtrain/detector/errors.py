"""The detector's own error: bad input named in the message (the CLI prints it as one line)."""
from __future__ import annotations

from dtrain.errors import DtrainError


class DetectorError(DtrainError, ValueError):
    pass
