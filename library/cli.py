"""Flags and behaviour every script shares: device, precision, toml config, verbosity, overwrite,
dry run, and the mapping of user errors to one line on stderr with exit status 2.

Scripts call `add_common_args(parser)` in `setup_parser()` and end with
`if __name__ == "__main__": run_cli(setup_parser, main)`. Notebooks call `main(args)` directly and
get a `LoraToolsError` exception instead of an exit.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence

import torch

from library.errors import LoraToolsError
from library.safetensors_io import PRECISION_CHOICES, check_output_path, parse_dtype


def add_common_args(parser: argparse.ArgumentParser, *, writes: bool = True, device: bool = True,
                    precision: bool = True, save_default: str = "that of the input") -> argparse.ArgumentParser:
    group = parser.add_argument_group("common options")
    if device:
        group.add_argument("--device", default="auto",
                           help="where to compute: auto (CUDA when present), cpu, cuda or cuda:N (default: auto)")
    if precision:
        group.add_argument("--precision", default="float", choices=PRECISION_CHOICES,
                           help="dtype for the maths (default: float = fp32)")
    if writes:
        group.add_argument("--save_precision", default=None, choices=PRECISION_CHOICES,
                           help=f"dtype of the saved tensors (default: {save_default})")
        group.add_argument("--overwrite", action="store_true", help="replace an existing output file (never an input)")
        group.add_argument("--dry_run", action="store_true", help="print what would be done and write nothing")
    group.add_argument("--config_file", default=None,
                       help="toml file whose keys are flag names (without dashes); command-line flags win")
    group.add_argument("-v", "--verbose", action="count", default=0, help="more detail (repeat for even more)")
    group.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags, taking defaults from `--config_file` when one is given, so the command line wins."""
    known, _ = parser.parse_known_args(argv)
    config_path = getattr(known, "config_file", None)
    if config_path:
        parser.set_defaults(**load_config(config_path, parser))
    return parser.parse_args(argv)


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    import toml

    try:
        with open(path, encoding="utf-8") as f:
            data = toml.load(f)
    except FileNotFoundError:
        raise LoraToolsError("config file not found", file=path) from None
    except toml.TomlDecodeError as exc:
        raise LoraToolsError(f"invalid toml: {exc}", file=path) from None
    # Sections are allowed for readability ([model], [output], ...): their keys are flattened.
    flat: dict = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    known = {action.dest for action in parser._actions}
    for key in flat:
        if key not in known:
            raise LoraToolsError(f"unknown option {key!r} in config file", file=path, key=key)
    return flat


def resolve_device(name: str | None) -> torch.device:
    """`auto` → CUDA when available (asked through accelerate), else CPU; `cuda[:N]` must exist."""
    name = (name or "auto").lower()
    if name == "cpu":
        return torch.device("cpu")
    from accelerate.utils import is_cuda_available

    if name == "auto":
        return torch.device("cuda") if is_cuda_available() else torch.device("cpu")
    if name.startswith("cuda"):
        if not is_cuda_available():
            raise LoraToolsError(f"--device {name} was given but CUDA is not available on this machine")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LoraToolsError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        return device
    raise LoraToolsError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N")


def compute_dtype(args: argparse.Namespace) -> torch.dtype:
    dtype = parse_dtype(getattr(args, "precision", None) or "float")
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise LoraToolsError("--precision cannot be fp8: fp8 is a storage type; use it with --save_precision")
    return dtype


def prepare_output(path: str | None, inputs: Iterable[str], args: argparse.Namespace, flag: str = "--save_to") -> str | None:
    """Check the output path before any long work starts, so a bad path fails in a second, not an hour."""
    if path is None:
        if getattr(args, "dry_run", False):
            return None
        raise LoraToolsError(f"{flag} is required")
    if not path.endswith(".safetensors"):
        raise LoraToolsError(f"{flag} must end in .safetensors (we only write safetensors)", file=path)
    return check_output_path(path, inputs, getattr(args, "overwrite", False))


def check_counts(values: Sequence | None, models: Sequence, flag: str) -> None:
    if values is not None and len(values) != len(models):
        raise LoraToolsError(f"{flag} has {len(values)} values but {len(models)} models were given")


def progress(iterable, *, desc: str, total: int | None = None, enabled: bool = True):
    """A tqdm progress bar on stderr (so stdout stays clean for --json and pipelines)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                leave=False)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def run_cli(setup_parser: Callable[[], argparse.ArgumentParser], main: Callable[[argparse.Namespace], object],
            argv: Sequence[str] | None = None) -> int:
    """Parse, run, and turn user errors into one line on stderr with exit status 2."""
    parser = setup_parser()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        args = parse_args(parser, argv)
        debug = debug or getattr(args, "debug", False)
        main(args)
    except LoraToolsError as exc:
        if debug:
            raise
        prog = os.path.basename(sys.argv[0]) if argv is None else parser.prog
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; no output was written", file=sys.stderr)
        sys.exit(130)
    return 0
