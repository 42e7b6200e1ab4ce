"""Flags and behaviour every script shares: device, precision, toml config, verbosity, overwrite,
dry run, checked outputs, and the mapping of user errors to one line on stderr with exit status 2.

Scripts call `add_common_args(parser)` in `setup_parser()` and end with
`if __name__ == "__main__": run_cli(setup_parser, main)`. Notebooks call `main(args)` directly and
get a `LoraToolsError` exception instead of an exit.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import sys
import types
from collections.abc import Callable, Iterable, Mapping, Sequence

from library import destination, interrupts
from library.console import warn  # noqa: F401  (scripts import warn from here)
from library.destination import Destination
from library.errors import Interrupted, LoraToolsError
from library.precision import PRECISION_CHOICES, parse_dtype

# Side outputs a script may have besides its main one (`args.<dest>` → flag): prepare_output checks them
# with the main output, before any work, against the inputs and against each other.
SIDE_OUTPUTS = {"report": "--report"}


# ---- argparse types that refuse nonsense in one line -------------------------------------------------------

def finite_float(text: str) -> float:
    """A float that is neither NaN nor ±inf (a NaN ratio would silently poison every tensor)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"value {text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"value {text!r} is not a finite number")
    return value


def ratio_value(text: str) -> float | str:
    """A --ratios value: a finite number, or the word `auto` (inverse delta norms, library/auto_ratios.py)."""
    return "auto" if text.strip().lower() == "auto" else finite_float(text)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"value {text!r} is not an integer") from None


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"value {text!r} must be a positive integer (1 or more)")
    return value


def nonnegative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"value {text!r} must be an integer of 0 or more")
    return value


def density(text: str) -> float:
    """A fraction of entries to keep: in (0, 1]."""
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"value {text!r} must be in (0, 1]: the fraction of entries kept")
    return value


# ---- one-line argparse errors ----------------------------------------------------------------------------

_TYPE_WORDS = {"int": "an integer", "float": "a number"}


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make the parser's errors one line naming the flag, the value and what is allowed, instead of argparse's
    usage block (8-23 lines that bury the one that matters). Idempotent."""
    parser.error = types.MethodType(_one_line_error, parser)  # an instance attribute wins over the method
    return parser


def _one_line_error(parser: argparse.ArgumentParser, message: str):
    parser.exit(2, f"{parser.prog}: error: {_rephrase(parser, message)}\n")


def _rephrase(parser: argparse.ArgumentParser, message: str) -> str:
    message = " ".join(message.split())
    argument = re.fullmatch(r"argument (?P<names>[^:]+): (?P<rest>.*)", message)
    if argument:
        names, rest = argument["names"], argument["rest"]
        spellings = names.split("/")
        # the first long spelling: "-v/--verbose" → --verbose, "--new_rank/--svd_rank" → the main name
        flag = next((n for n in spellings if n.startswith("--")), spellings[-1])
        action = next((a for a in parser._actions if "/".join(a.option_strings) == names
                       or (not a.option_strings and (a.metavar or a.dest) == names)), None)
        choice = re.match(r"invalid choice: (?P<value>.*?) \(choose from", rest)
        if choice and action is not None and action.choices is not None:
            allowed = ", ".join(str(c) for c in action.choices)
            return f"{flag}: value {choice['value']} is not allowed; use one of {allowed}"
        typed = re.fullmatch(r"invalid (?P<type>\w+) value: (?P<value>.*)", rest)
        if typed:
            word = _TYPE_WORDS.get(typed["type"], f"a valid {typed['type']}")
            return f"{flag}: value {typed['value']} is not {word}"
        if rest.startswith("expected"):
            return f"{flag}: {rest.replace('argument', 'value')}"
        return f"{flag}: {rest.replace('argument ', '')}"
    required = re.fullmatch(r"the following arguments are required: (?P<names>.*)", message)
    if required:
        return f"{required['names']}: required but not given (see --help)"
    unknown = re.fullmatch(r"unrecognized arguments: (?P<args>.*)", message)
    if unknown:
        options = [s for a in parser._actions for s in a.option_strings]
        hints = []
        for arg in unknown["args"].split():
            close = difflib.get_close_matches(arg.split("=")[0], options, n=1) if arg.startswith("-") else []
            hints.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
        return f"unknown argument(s): {', '.join(hints)}"
    return message


# ---- shared flags, config, parsing -------------------------------------------------------------------------

def add_dynamic_rank_args(parser: argparse.ArgumentParser, method_help: str) -> None:
    """--dynamic_method / --dynamic_param, as resize_lora.py and svd_merge_lora.py share them (sd-scripts' names);
    the range of p per method is checked by `lowrank_rules.check_dynamic_flags` once both are known."""
    from library.lowrank_rules import DYNAMIC_METHODS

    parser.add_argument("--dynamic_method", default=None, choices=DYNAMIC_METHODS, help=method_help)
    parser.add_argument("--dynamic_param", type=finite_float, default=None,
                        help="p for --dynamic_method: ≥ 1 for sv_ratio, in (0, 1] for sv_fro and sv_cumulative")


def add_singular_args(parser: argparse.ArgumentParser) -> None:
    """The singular-space methods' hyperparameters (svd_merge_lora.py, flux_merge_lora.py): methods.SingularParams."""
    from library.methods import KNOTS_METHODS

    group = parser.add_argument_group("singular-space modes (tsv, iso_c, iso_cts, knots, np_lora)")
    group.add_argument("--merge_alpha", type=finite_float, default=1.0,
                       help="tsv/iso_c/iso_cts/knots: scale of the merged delta (the papers' alpha; default 1)")
    group.add_argument("--tsv_fraction", type=finite_float, default=1.0,
                       help="tsv: each of T inputs keeps floor(fraction*D/T) singular vectors, D = sum of ranks "
                            "(default 1: the paper's 1/T)")
    group.add_argument("--common_space_fraction", type=finite_float, default=0.8,
                       help="iso_cts: share of the rank given to the common subspace of the sum (default 0.8)")
    group.add_argument("--knots_method", default="ties", choices=KNOTS_METHODS,
                       help="knots: merge of the aligned task coordinates (default ties; uses --density, "
                            "--majority_sign_method, --seed)")
    group.add_argument("--np_rank", type=positive_int, default=None,
                       help="np_lora: style directions projected out of the subject (default: all of the style's rank)")
    group.add_argument("--np_mu", type=float, default=math.inf,
                       help="np_lora: soft projection, 0 = plain sum, inf = hard null-space projection (default inf)")


def add_lora_merge_args(parser: argparse.ArgumentParser, *, singular: bool = False) -> None:
    """The LoRA+LoRA flags merge_lora.py and flux_merge_lora.py share (sd-scripts' names and meanings);
    `singular` adds add_singular_args (flux_merge_lora.py's delta-space modes)."""
    from library.methods import SIGN_METHODS

    if singular:
        add_singular_args(parser)

    parser.add_argument("--concat", action="store_true", help="same as --mode concat (sd-scripts flag)")
    parser.add_argument("--shuffle", action="store_true",
                        help="mix the rank columns of each merged module with a seeded random orthogonal matrix "
                             "(the delta is unchanged)")
    parser.add_argument("--density", type=density, default=1.0, help="ties/dare/magnitude_prune: share kept (0…1]")
    parser.add_argument("--majority_sign_method", default="total", choices=SIGN_METHODS,
                        help="ties/dare_ties sign election (default total)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of DARE masks, --shuffle and R/U block weights (drawn per target)")
    add_method_param_args(parser)


def add_method_param_args(parser: argparse.ArgumentParser) -> None:
    """Parameters of della and breadcrumbs (library/merge_methods_sparse.py), mergekit's names."""
    group = parser.add_argument_group("della / breadcrumbs", "entry-wise, dense per layer: each input's full "
                                      "delta is formed and its entries ranked (time grows with out·in)")
    group.add_argument("--epsilon", type=finite_float, default=0.1,
                       help="della: keep probabilities spread over [density − epsilon, density + epsilon] (default 0.1)")
    group.add_argument("--lambda", dest="lambda_", type=finite_float, default=1.0,
                       help="della: scale of the merged delta (default 1)")
    group.add_argument("--gamma", type=finite_float, default=0.01,
                       help="breadcrumbs: share of the largest magnitudes dropped per tensor (default 0.01)")


def add_svd_merge_args(parser: argparse.ArgumentParser) -> None:
    """svd_merge_lora.py's merge flags (sd-scripts' names, Power-Merge's aliases), shared with merge_grid.py,
    which sweeps them; `library.svd_merge_io.merge_settings` turns them into MergeSettings."""
    from library.formats.specs import FORMATS
    from library.methods import DELTA, SIGN_METHODS, mode_choices

    parser.add_argument("--new_rank", "--svd_rank", type=positive_int, default=4,
                        help="rank of Linear and 1×1 conv layers; the cap when --dynamic_method is used (default 4)")
    parser.add_argument("--new_conv_rank", "--svd_conv_rank", type=positive_int, default=None,
                        help="rank of k×k conv layers (default: --new_rank)")
    parser.add_argument("--mode", default="add", choices=mode_choices(DELTA),
                        help="how the per-layer deltas ratioᵢ·ΔWᵢ are combined before the SVD (default add)")
    parser.add_argument("--density", type=finite_float, default=1.0,
                        help="ties/dare/magnitude_prune: share of entries kept, in (0, 1] (default 1)")
    parser.add_argument("--majority_sign_method", default="total", choices=SIGN_METHODS,
                        help="ties/dare_ties sign election (default total)")
    parser.add_argument("--seed", type=int, default=0, help="seed of DARE masks and of the randomized SVD")
    add_method_param_args(parser)  # della / breadcrumbs: --epsilon, --lambda, --gamma
    add_singular_args(parser)  # tsv / iso_c / iso_cts / knots / np_lora
    add_dynamic_rank_args(parser, "per-layer rank as resize_lora.py: sv_ratio, sv_fro or sv_cumulative (capped by "
                               "--new_rank / --new_conv_rank)")
    parser.add_argument("--clamp_quantile", type=finite_float, default=None,
                        help="clip both factors to ±this quantile of their entries (sd-scripts used 0.99 always; "
                             "off by default because it adds error, reported with -v)")
    parser.add_argument("--svd_oversample", type=nonnegative_int, default=None,
                        help="randomized SVD oversampling for dense layers (default max(rank, 10))")
    parser.add_argument("--svd_power_iters", type=nonnegative_int, default=2,
                        help="randomized SVD power iterations for dense layers (default 2)")
    parser.add_argument("--lbws", nargs="*", default=None,
                        help="block weights per model: a webui lora-block-weight string, a JSON list (sd-scripts) "
                             "or a preset name; '-' for none")
    parser.add_argument("--lbw_presets", default=None, help="toml (NAME = \"1,0,…\") or webui lbwpresets.txt file")
    parser.add_argument("--lbw_x", type=finite_float, default=1.0, help="value of X in block-weight strings (default 1)")
    parser.add_argument("--format", default=None, choices=tuple(FORMATS),
                        help="output LoRA format (default: that of the first input; LyCORIS and others → kohya)")
    parser.add_argument("--family", default=None, help="model family when detection is ambiguous (sd1, sd2, sdxl, flux1…)")
    parser.add_argument("--allow_unmatched", action="store_true", help="skip input keys that map to no layer")
    parser.add_argument("--no_metadata", action="store_true", help="write only the metadata a loader needs")


def add_version(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--version`: prints "<script> <loratools version>" (idempotent; parse_args adds it to every parser)."""
    if "--version" not in parser._option_string_actions:
        from library import __version__

        parser.add_argument("--version", action="version", version=f"%(prog)s (loratools) {__version__}")
    return parser


def add_common_args(parser: argparse.ArgumentParser, *, writes: bool = True, device: bool = True,
                    precision: bool = True, save_default: str = "that of the input") -> argparse.ArgumentParser:
    one_line_errors(parser)
    add_version(parser)
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
    """Parse flags, taking defaults from `--config_file` when one is given, so the command line wins.

    This, not `parser.parse_args`, is the call for notebooks: argparse alone ignores --config_file."""
    one_line_errors(parser)
    add_version(parser)
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
    return config_values(data, parser, path)


def config_values(data: Mapping, parser: argparse.ArgumentParser, path: str) -> dict:
    """Flag values from a toml mapping (a --config_file, a merge_grid recipe) by dest, each checked as the
    command line would check it."""
    # Sections are allowed for readability ([model], [output], ...): their keys are flattened.
    flat: dict = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    actions = {action.dest: action for action in parser._actions}
    for key in flat:
        if key not in actions:
            raise LoraToolsError(f"unknown option {key!r} in config file", file=path, key=key)
        flat[key] = _config_value(actions[key], flat[key], path, key)
    return flat


def _config_value(action: argparse.Action, value, path: str, key: str):
    """A toml value checked as the command line would check it: argparse applies neither `type` nor
    `choices` to non-string defaults, so `ratio = nan` or `mode = "bogus"` would pass unseen."""
    def one(item):
        if action.type is not None and not isinstance(item, (dict, bool)):
            try:
                item = action.type(item if isinstance(item, str) else str(item))
            except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
                raise LoraToolsError(str(exc) or f"invalid value {item!r}", file=path, key=key) from None
        if action.choices is not None and item not in action.choices:
            allowed = ", ".join(str(c) for c in action.choices)
            raise LoraToolsError(f"value {item!r} is not allowed; use one of {allowed}", file=path, key=key)
        return item

    return [one(item) for item in value] if isinstance(value, list) else one(value)


def resolve_device(name: str | None):
    """`auto` → CUDA when available (asked through accelerate), else CPU; `cuda[:N]` must exist."""
    import torch

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


def compute_dtype(args: argparse.Namespace):
    import torch

    dtype = parse_dtype(getattr(args, "precision", None) or "float")
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise LoraToolsError("--precision cannot be fp8: fp8 is a storage type; use it with --save_precision")
    return dtype


def unused_compute_flags(args: argparse.Namespace, what: str, *, device_used: bool) -> list[str]:
    """Warnings for --precision / --device values a run does not use, so that no flag is silently ignored.

    `what` names the work ("a LoRA+LoRA merge", "resize"). Its QR/SVD and factor sums always run in float32
    (float64 for small cores): fp16/bf16 have no CPU kernels for them and would only round more, so a
    --precision other than fp32 is said to be unused (--save_precision sets the stored dtype). `device_used`
    False: the work runs on the CPU, so an explicit --device/--working_device other than cpu/auto is named."""
    notes = []
    precision = getattr(args, "precision", None)
    if precision not in (None, "float", "fp32"):
        notes.append(f"--precision {precision} is not used by {what}: its maths runs in float32 (no rounding beyond "
                     "the inputs'); --save_precision sets the dtype written")
    device = getattr(args, "device", None) or getattr(args, "working_device", None)
    if not device_used and device not in (None, "auto", "cpu"):
        notes.append(f"--device {device} is not used by {what}: stacking and summing small factors is done on the "
                     "CPU (moving them to the GPU costs more); it is used when merging into a checkpoint and by the "
                     "delta-space (svd) modes")
    return notes


# ---- outputs ---------------------------------------------------------------------------------------------

def prepare_output(path: str | None, inputs: Iterable[str], args: argparse.Namespace, flag: str = "--save_to",
                   other_outputs: Mapping[str, str | None] | None = None) -> str | None:
    """Check the output path, and the side outputs in SIDE_OUTPUTS (--report, ...), before any long work starts,
    so a bad path fails in a second, not after an hour. `other_outputs` (flag → path) are the run's other main
    outputs, which this one must differ from. Returns the absolute output path (None in a dry run without one)."""
    inputs = list(inputs)
    overwrite = getattr(args, "overwrite", False)
    checked = None
    if path is None:
        if not getattr(args, "dry_run", False):
            raise LoraToolsError(f"{flag} is required")
    else:
        if not path.endswith(".safetensors"):
            raise LoraToolsError(not_safetensors_message(path, flag), file=path)
        checked = Destination(path, inputs, overwrite, flag=flag, other_outputs=other_outputs).check()
    side_outputs(args, inputs, {**(other_outputs or {}), flag: path})
    return checked


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def not_safetensors_message(path: str, flag: str) -> str:
    """Why an output must be .safetensors, and the name to use instead (sd-scripts also writes .ckpt/.pt)."""
    stem, suffix = os.path.splitext(path)
    instead = f"{stem if suffix.lower() in PICKLE_SUFFIXES else path}.safetensors"
    if suffix.lower() in PICKLE_SUFFIXES:
        return (f"{flag} must end in .safetensors: we write safetensors only. A {suffix} file is a pickle, "
                "which can run code when it "
                "is loaded; every tool that reads .ckpt (A1111, ComfyUI, diffusers, sd-scripts, kohya_ss) reads "
                f".safetensors too, so use {flag} {instead}")
    return f"{flag} must end in .safetensors (we only write safetensors): use {instead}"


def side_outputs(args: argparse.Namespace, inputs: Iterable[str], outputs: Mapping[str, str | None]) -> dict[str, Destination]:
    """The run's side outputs (SIDE_OUTPUTS present on `args`) as checked Destinations, keyed by flag; each
    must differ from every input, from `outputs` (flag → path) and from each other."""
    inputs = list(inputs)
    given = {flag: getattr(args, dest) for dest, flag in SIDE_OUTPUTS.items() if getattr(args, dest, None)}
    found = {}
    for flag, path in given.items():
        others = {**outputs, **{f: p for f, p in given.items() if f != flag}}
        found[flag] = Destination(path, inputs, getattr(args, "overwrite", False), flag=flag, other_outputs=others)
        found[flag].check()
    return found


def check_counts(values: Sequence | None, models: Sequence, flag: str) -> None:
    if values is not None and len(values) != len(models):
        raise LoraToolsError(f"{flag} has {len(values)} values but {len(models)} models were given")


def progress(iterable=None, *, desc: str, total: int | None = None, enabled: bool = True,
             interval: float | None = None):
    """Progress on stderr (stdout stays clean for --json and pipelines), in the form the reader expects:
    a tqdm.auto bar in a terminal and in Jupyter/Colab (a widget there, whose stderr is no terminal), and in a
    log file or pipe plain lines ("desc: 120/788 (15%), 42 s") at most every `interval` seconds
    (LORATOOLS_PROGRESS_INTERVAL, default 15) and a last one if any was printed, never a `\r` redraw. Returns an iterable with
    tqdm's update() and close()."""
    if enabled and not in_notebook() and not _isatty(sys.stderr):
        if interval is None:
            interval = float(os.environ.get("LORATOOLS_PROGRESS_INTERVAL", "15"))
        return PlainProgress(iterable, desc=desc, total=total, interval=interval)
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                leave=False)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def in_notebook() -> bool:
    """True inside a Jupyter/Colab kernel (where tqdm.auto draws a widget)."""
    shell = sys.modules.get("IPython")
    get_ipython = getattr(shell, "get_ipython", None)
    try:
        return get_ipython is not None and get_ipython() is not None and "IPKernelApp" in get_ipython().config
    except Exception:  # an odd IPython must never break a run
        return False


class PlainProgress:
    """tqdm's small surface (iteration, update, close, context manager) as plain, periodic lines."""

    def __init__(self, iterable=None, *, desc: str, total: int | None = None, interval: float = 15.0,
                 file=None):
        import time

        self._clock = time.monotonic
        self.iterable, self.desc, self.interval, self.file = iterable, desc, interval, file or sys.stderr
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.closed, self.printed = total, 0, False, 0
        self.start = self._last = self._clock()

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._clock()
        if now - self._last >= self.interval and (self.total is None or self.n < self.total):
            self._last = now
            self._line(now)

    def close(self) -> None:
        # A run shorter than one interval says nothing (a log needs no bar for a 2-second resize); a longer one
        # ends with its total.
        if not self.closed:
            self.closed = True
            if self.printed:
                self._line(self._clock(), done=True)

    def _line(self, now: float, done: bool = False) -> None:
        self.printed += 1
        count = f"{self.n}/{self.total} ({100 * self.n // self.total}%)" if self.total else f"{self.n}"
        print(f"{self.desc}: {count}, {now - self.start:.0f} s{' (done)' if done else ''}", file=self.file,
              flush=True)


def run_cli(setup_parser: Callable[[], argparse.ArgumentParser], main: Callable[[argparse.Namespace], object],
            argv: Sequence[str] | None = None) -> int:
    """Parse, run, and turn user errors into one line on stderr with exit status 2.

    SIGTERM and SIGHUP unwind like Ctrl-C (temporary files are removed) and end the run with one line and
    status 128 + the signal number; Ctrl-C gives 130.
    """
    parser = setup_parser()  # parse_args makes its errors one line
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    prog = os.path.basename(sys.argv[0]) if argv is None else parser.prog
    mark = destination.committed_count()
    with interrupts.signals_as_exceptions():
        try:
            args = parse_args(parser, argv)
            debug = debug or getattr(args, "debug", False)
            main(args)
        except LoraToolsError as exc:
            if debug:
                raise
            print(f"{prog}: error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as exc:
            what = f"terminated by {exc.name}" if isinstance(exc, Interrupted) else "interrupted"
            written = destination.committed_since(mark)
            done = f"only {', '.join(written)} was written" if written else "no output was written"
            print(f"{prog}: {what}; {done}, no temporary file left", file=sys.stderr)
            sys.exit(exc.exit_status if isinstance(exc, Interrupted) else 130)
    return 0
