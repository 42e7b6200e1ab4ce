"""Precision names users type (`fp16`, `bf16`, `float`, sd-scripts' `fp8`, ...) and the torch dtypes they mean.

Torch-free at import: the names are what `--help` and argparse `choices` need, and `--help` must not pay
for importing torch. `parse_dtype` imports torch when a name is actually resolved.
"""

from __future__ import annotations

from library.errors import LoraToolsError

# user's name -> torch dtype attribute name
PRECISION_ALIASES = {
    "fp32": "float32", "float": "float32", "float32": "float32",
    "fp16": "float16", "half": "float16", "float16": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    # sd-scripts spells e4m3fn plain `fp8`
    "fp8": "float8_e4m3fn", "fp8_e4m3fn": "float8_e4m3fn", "float8_e4m3fn": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2", "float8_e5m2": "float8_e5m2",
    "fp64": "float64", "float64": "float64",
}
PRECISION_CHOICES = ["fp32", "float", "fp16", "bf16", "fp8", "fp8_e4m3fn", "fp8_e5m2"]


def parse_dtype(name: str | None):
    """Map a user's precision name to a torch dtype; None stays None."""
    if name is None:
        return None
    try:
        attribute = PRECISION_ALIASES[name.lower()]
    except KeyError:
        raise LoraToolsError(f"unknown precision {name!r}; use one of {', '.join(PRECISION_CHOICES)}") from None
    import torch

    return getattr(torch, attribute)
