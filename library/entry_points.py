"""The console commands of `pip install .` (pyproject.toml [project.scripts]): `loratools-merge-lora` runs
merge_lora.py's main exactly as `python merge_lora.py` does (library.cli.run_cli: one-line errors, exit 2).

Each command is a function named after its script; the script module is imported only when the command
runs, so a command costs what `python script.py` costs (torch-free --help included).
"""

from __future__ import annotations

import importlib
import sys

# Every root script with a command; pyproject.toml lists the same names (tests/test_packaging.py checks it).
SCRIPTS = ("merge_lora", "svd_merge_lora", "resize_lora", "extract_lora_from_models", "flux_merge_lora",
           "convert_lora", "lora_info", "quickstart", "merge_models", "make_mask", "lora_compare", "merge_grid",
           "wan22_merge_lora")


def run_script(name: str, argv: list[str] | None = None) -> int:
    """Run root script `name` as its command: its parser and main through run_cli (the script's own, if any)."""
    module = importlib.import_module(name)
    if hasattr(module, "setup_parser") and hasattr(module, "main"):
        from library.cli import run_cli

        sys.argv[0] = f"{name}.py"  # errors and --version name the script, as when it is run directly
        return run_cli(module.setup_parser, module.main, argv) or 0
    return module.main() or 0  # a script without flags of its own (quickstart)


def _command(name: str):
    def command() -> int:
        return run_script(name)

    command.__name__ = command.__qualname__ = name
    command.__doc__ = f"the `loratools-{name.replace('_', '-')}` command: {name}.py"
    return command


globals().update({name: _command(name) for name in SCRIPTS})
