"""The sweep a merge_grid.py run makes: its axes (`--x`, `--y` or a toml recipe) and the cells they span.

An axis is `NAME=VALUES`. VALUES is a comma list (`mode=ties,dare_ties`, `ratio_a=0,0.5,1`) or, for numbers,
`START:STOP:COUNT`: COUNT evenly spaced values from START to STOP inclusive (`ratio_a=0:1:5` is 0, 0.25, 0.5,
0.75, 1), the min/max/steps of ComfyUI Power-Merge's XY nodes. Integer parameters (ranks) are rounded and
deduplicated, as Power-Merge's "XY: PM LoRA SVD Rank" does. NAMEs are the merge settings a cell may vary:
`ratio_a`, `ratio_b`, … (the strength of the 1st, 2nd, … --models file) and the PARAMS below.

A recipe is a toml file: `x` and `y` as spec strings or as one-key tables (`[x]` then `ratio_a = [0, 0.5, 1]`),
`models` (a list) and any other merge flag by its name (`new_rank = 16`), used where the command line left
that flag at its default (`--x`/`--y` replace the recipe's axes). Torch-free: a bad spec fails in one
line before anything is read.
"""

from __future__ import annotations

import itertools
import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from library.errors import LoraToolsError
from library.lowrank_rules import DYNAMIC_METHODS
from library.methods import DELTA, SIGN_METHODS, method, mode_choices


@dataclass(frozen=True)
class Param:
    """A settable merge setting: `field` of library.svd_merge.MergeSettings (or a ratio), how to read one value."""

    field: str
    kind: type  # float, int or str
    check: Callable[[object], str | None] = lambda v: None  # an error text for a bad value, None when fine
    choices: tuple[str, ...] = ()


def _fraction(v) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def _positive(v) -> str | None:
    return None if v >= 1 else "must be a positive integer"


PARAMS: dict[str, Param] = {
    "mode": Param("mode", str, choices=mode_choices(DELTA)),
    "density": Param("density", float, _fraction),
    "rank": Param("new_rank", int, _positive),
    "conv_rank": Param("new_conv_rank", int, _positive),
    "seed": Param("seed", int),
    "sign_method": Param("sign_method", str, choices=SIGN_METHODS),
    "dynamic_method": Param("dynamic_method", str, choices=DYNAMIC_METHODS),
    "dynamic_param": Param("dynamic_param", float),
    "clamp_quantile": Param("clamp_quantile", float, _fraction),
}
ALIASES = {"new_rank": "rank", "svd_rank": "rank", "new_conv_rank": "conv_rank", "svd_conv_rank": "conv_rank",
           "majority_sign_method": "sign_method"}
FLAG_DEST = {"sign_method": "majority_sign_method"}  # MergeSettings field -> flag dest, where they differ
RATIO = re.compile(r"ratio_([a-z])")


def ratio_name(index: int) -> str:
    return f"ratio_{string.ascii_lowercase[index]}"


def ratio_index(name: str) -> int | None:
    match = RATIO.fullmatch(name)
    return string.ascii_lowercase.index(match[1]) if match else None


@dataclass(frozen=True)
class Axis:
    name: str  # canonical: a PARAMS key or ratio_<letter>
    values: tuple

    @property
    def field(self) -> str:
        return self.name if ratio_index(self.name) is not None else PARAMS[self.name].field


@dataclass(frozen=True)
class Cell:
    """One merge of the sweep: its position (row = y index, col = x index) and the settings it changes."""

    index: int
    row: int
    col: int
    params: dict = field(default_factory=dict)  # axis name -> value

    @property
    def label(self) -> str:
        return " ".join(f"{k}={_text(v)}" for k, v in self.params.items()) or "flags as given"

    @property
    def id(self) -> str:
        """A file-name-safe name, unique within the sweep (the index) and readable (the values)."""
        parts = [f"{k}-{_text(v)}" for k, v in self.params.items()]
        return re.sub(r"[^A-Za-z0-9_.=-]", "_", "_".join([f"{self.index:03d}", *parts]))


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_axis(text: str, flag: str = "--x", n_models: int | None = None) -> Axis:
    """`NAME=VALUES` → Axis, or a one-line LoraToolsError naming the flag and what is wrong."""
    def fail(why: str) -> LoraToolsError:
        return LoraToolsError(f"{flag} {text!r}: {why}")

    name, sep, values = (part.strip() for part in text.partition("="))
    if not sep or not name or not values:
        raise fail("expected NAME=V1,V2,… or NAME=START:STOP:COUNT, e.g. 'ratio_a=0,0.5,1' or 'mode=ties,dare_ties'")
    name = ALIASES.get(name, name)
    index = ratio_index(name)
    if index is None and name not in PARAMS:
        known = ", ".join(["ratio_a", "ratio_b", "…", *PARAMS, *ALIASES])
        raise fail(f"unknown parameter {name!r}; use one of {known}")
    if index is not None and n_models is not None and index >= n_models:
        raise fail(f"{name} is the strength of model {index + 1}, but {n_models} model(s) were given "
                   f"(ratio_a…{ratio_name(n_models - 1)})")
    param = PARAMS.get(name, Param(name, float))
    return Axis(name, _values(values, param, fail))


def _values(text: str, param: Param, fail) -> tuple:
    if param.kind is str:
        items = [v.strip() for v in text.split(",")]
        for v in items:
            if v not in param.choices:
                raise fail(f"value {v!r} is not allowed; use one of {', '.join(param.choices)}")
        items = [method(v).name if param.field == "mode" else v for v in items]
    elif text.count(":") == 2:
        start, stop, count = (s.strip() for s in text.split(":"))
        lo, hi, n = _number(start, float, fail), _number(stop, float, fail), _number(count, int, fail)
        if n < 2:
            raise fail(f"COUNT in START:STOP:COUNT must be 2 or more, got {n}")
        items = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
        items = [round(v) for v in items] if param.kind is int else [round(v, 10) for v in items]
    else:
        items = [_number(v.strip(), param.kind, fail) for v in text.split(",")]
    for v in items:
        problem = param.check(v) if param.kind is not str else None
        if problem:
            raise fail(f"value {_text(v)} {problem}")
    unique = tuple(dict.fromkeys(items))  # ranks rounded from a range collide; the sweep needs each once
    if param.kind is not int and len(unique) != len(items):
        raise fail("a value is listed twice")
    return unique


def _number(text: str, kind: type, fail):
    try:
        value = kind(text)
    except ValueError:
        raise fail(f"value {text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise fail(f"value {text!r} is not a finite number")
    return value


def grid_cells(x: Axis | None, y: Axis | None) -> list[Cell]:
    """The cells of x × y, row by row (rows are y values, columns x values); one cell when both are absent."""
    if x is not None and y is not None and x.field == y.field:
        raise LoraToolsError(f"--x and --y both set {x.name}; sweep two different parameters")
    xs = [(x.name, v) for v in x.values] if x else [None]
    ys = [(y.name, v) for v in y.values] if y else [None]
    cells = []
    for index, ((row, yv), (col, xv)) in enumerate(itertools.product(enumerate(ys), enumerate(xs))):
        cells.append(Cell(index, row, col, dict(p for p in (xv, yv) if p is not None)))
    return cells


def axis_from_recipe(value, key: str, path: str, n_models: int | None) -> Axis:
    """A recipe's `x` / `y`: a spec string, or a table with one parameter and its list of values."""
    flag = f"{path}: {key}"
    if isinstance(value, str):
        return parse_axis(value, flag, n_models)
    if isinstance(value, dict) and len(value) == 1:
        (name, values), = value.items()
        if not isinstance(values, list) or not values:
            raise LoraToolsError(f"{flag}.{name}: expected a list of values, e.g. {name} = [0, 0.5, 1]")
        return parse_axis(f"{name}={','.join(str(v) for v in values)}", flag, n_models)
    raise LoraToolsError(f"{flag}: expected a spec string ('ratio_a=0,0.5,1') or a table with one parameter")


def read_recipe(path: str) -> dict:
    import toml

    try:
        with open(path, encoding="utf-8") as f:
            return toml.load(f)
    except FileNotFoundError:
        raise LoraToolsError("recipe file not found", file=path) from None
    except toml.TomlDecodeError as exc:
        raise LoraToolsError(f"invalid toml: {exc}", file=path) from None


def cell_settings(base, params: dict):
    """The MergeSettings of one cell: `base` with the cell's non-ratio parameters replaced (checked again)."""
    import dataclasses

    changes = {PARAMS[k].field: v for k, v in params.items() if ratio_index(k) is None}
    return dataclasses.replace(base, **changes)


def cell_ratios(base: Sequence[float], params: dict) -> list[float]:
    ratios = list(base)
    for name, value in params.items():
        index = ratio_index(name)
        if index is not None:
            ratios[index] = float(value)
    return ratios


def apply_recipe(args, parser, path: str) -> tuple[Axis | None, Axis | None]:
    """Read a recipe: its flags go into `args` where the command line left them at their default; returns its
    (x, y) axes (None where absent)."""
    from library.cli import config_values

    data = read_recipe(path)
    axes = {key: data.pop(key) for key in ("x", "y") if key in data}
    for dest, value in config_values(data, parser, path).items():
        if getattr(args, dest) == parser.get_default(dest):
            setattr(args, dest, value)
    n_models = len(args.models) if args.models else None
    return tuple(axis_from_recipe(axes[k], k, path, n_models) if k in axes else None for k in ("x", "y"))
