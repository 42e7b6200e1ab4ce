"""The non-finite tensor policy of every script: NaN/inf found while reading is named once, then either
refused (a LoraToolsError naming the file and the first tensors) or warned about.

Refusing is the rule where the values feed an SVD (resize, svd_merge, extract: the decomposition of a
non-finite matrix is undefined, so the output would be garbage or a LinAlgError). Warning is the opt-in
kept for the element-wise merges, where NaN/inf carry into the result but the user may mean it.

A tracker takes its policy explicitly (`refuse=`) or from the innermost `refusing_nonfinite()` block, so a
script can make the shared readers (formats.read_lora) refuse without threading a flag through them.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from library import console
from library.errors import LoraToolsError

if TYPE_CHECKING:  # torch-free at import: scripts import this before `--help` is answered
    import torch

SHOWN_IN_ERROR = 5
SHOWN_IN_WARNING = 20

_REFUSE = contextvars.ContextVar("refuse_nonfinite", default=False)


@contextmanager
def refusing_nonfinite() -> Iterator[None]:
    """Inside this block, trackers made without an explicit policy refuse NaN/inf instead of warning."""
    token = _REFUSE.set(True)
    try:
        yield
    finally:
        _REFUSE.reset(token)


def is_finite(tensor: torch.Tensor) -> bool:
    """True for non-float tensors and for float tensors without NaN or inf."""
    if not tensor.is_floating_point():
        return True
    if tensor.element_size() == 1:  # torch has no isfinite for fp8; float16 holds every fp8 value, NaN and inf
        tensor = tensor.half()
    # A sum is finite only when every term is (NaN and inf propagate), and costs a fifth of isfinite().all(),
    # which builds a bool tensor first (1.2 against 6.9 ns per fp16 element, one thread). A non-finite sum of
    # finite terms (float32 overflow past 3.4e38) is told apart by the exact test.
    import torch  # loaded already (a tensor exists); this module stays importable without it

    total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(tensor.isfinite().all())


def listed(keys: list[str], shown: int) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


class NonFiniteTracker:
    """Collects the keys whose tensors hold NaN or inf; `finish()` then refuses or warns by name.

    `what` names the file (or "merged" for a result); `refuse` picks the policy (None: refuse inside a
    `refusing_nonfinite()` block, else warn); `warn` prints a warning (console.warn by default, so this
    module needs no CLI import).
    """

    def __init__(self, what: str, *, refuse: bool | None = None, warn: Callable[[str], None] = console.warn):
        self.what = what
        self.refuse = _REFUSE.get() if refuse is None else refuse
        self._warn = warn
        self.keys: list[str] = []

    def check(self, key: str, tensor: torch.Tensor) -> bool:
        """True when `tensor` is all finite; otherwise remember `key`."""
        if is_finite(tensor):
            return True
        self.keys.append(key)
        return False

    def error(self) -> LoraToolsError:
        return LoraToolsError(f"{len(self.keys)} tensor(s) contain NaN or inf: {listed(self.keys, SHOWN_IN_ERROR)}; "
                              "a low-rank decomposition of such a layer is undefined (repair or drop these modules)",
                              file=self.what)

    def finish(self) -> None:
        """Apply the policy to what was found: raise `error()` when refusing, else warn (nothing when clean)."""
        if not self.keys:
            return
        if self.refuse:
            raise self.error()
        self._warn(f"{self.what}: {len(self.keys)} tensor(s) contain NaN or inf, which carry into the result: "
                   f"{listed(self.keys, SHOWN_IN_WARNING)}")

    # formats.read_lora and checkpoint_apply end with warn(): the same policy applies.
    warn = finish
