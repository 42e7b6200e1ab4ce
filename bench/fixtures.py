"""LoRA generators with real key names and shapes for the benchmarks (no download, no model needed).

They live in tests/helpers.py, shared with the tests that check them; this module only names what the
benchmarks use, so `from bench.fixtures import make_lora` keeps working.
"""

from tests.helpers import LoraModule, dense_delta, flux_modules, kohya_metadata, make_lora, sdxl_modules, write_lora

__all__ = ["LoraModule", "dense_delta", "flux_modules", "kohya_metadata", "make_lora", "sdxl_modules", "write_lora"]
