"""Checks on tensor values that scripts run while streaming, reported once at the end."""

from __future__ import annotations

import torch

from library.cli import warn


class NonFiniteTracker:
    """Collects the keys whose tensors hold NaN or inf, so a script can warn by name instead of
    silently propagating them into a merged model."""

    def __init__(self, what: str):
        self.what = what
        self.keys: list[str] = []

    def check(self, key: str, tensor: torch.Tensor) -> bool:
        """True when `tensor` is all finite; otherwise remember `key`."""
        if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
            return True
        self.keys.append(key)
        return False

    def warn(self) -> None:
        if self.keys:
            shown = ", ".join(self.keys[:20])
            more = f" and {len(self.keys) - 20} more" if len(self.keys) > 20 else ""
            warn(f"{self.what}: {len(self.keys)} tensor(s) contain NaN or inf, which carry into the result: {shown}{more}")
