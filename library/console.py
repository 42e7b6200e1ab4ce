"""Messages to the terminal that library code may print without importing the CLI layer (torch-free)."""

from __future__ import annotations

import sys


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
