"""Messages to the user on stderr, torch-free so that any module (and `--help`) can use them."""

from __future__ import annotations

import sys


def warn(message: str) -> None:
    """One `warning: ...` line on stderr, so stdout stays clean for --json and pipelines."""
    print(f"warning: {message}", file=sys.stderr)
