"""The one exception type for problems the user can fix (bad input, bad flags).

Scripts print it as a single line on stderr and exit with status 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import os


class LoraToolsError(Exception):
    """A user-facing error that names the file and the key it is about."""

    def __init__(self, message: str, *, file: str | os.PathLike | None = None, key: str | None = None):
        super().__init__(message)
        self.message = message
        self.file = os.fspath(file) if file is not None else None
        self.key = key

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.key) if p]
        # Keep it to one line: embedded newlines would break pipelines that grep stderr.
        text = ": ".join(parts + [self.message])
        return " ".join(text.split("\n"))


class AmbiguousFamilyError(LoraToolsError):
    """The keys fit several model families equally well: a caller may retry with a family it knows."""
