"""LoRA block weights ("lbw") in the syntax of hako-mikan's sd-webui-lora-block-weight.

A block-weight string gives one strength per block of the base model; a LoRA module's strength is
multiplied by the value of the block its target weight lives in. The layouts are the webui's:

    17 (SD1.x/SD2.x LoRA)  BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03…OUT11
    26 (SD1.x/SD2.x full)  BASE, IN00…IN11, M00, OUT00…OUT11
    12 (SDXL LoRA)         BASE, IN04, IN05, IN07, IN08, M00, OUT00…OUT05
    20 (SDXL full)         BASE, IN00…IN08, M00, OUT00…OUT08
    61 (Flux)              CLIP, T5, IN, D00…D18, S00…S37, OUT

BASE is every text-encoder weight. `IN<k>` is the LDM/SGM `input_blocks.<k>` (so diffusers'
`down_blocks.i.*.j` is IN<3i+j+1> — the ComfyUI mergers are off by one here, comfy-seeds.md §4.3), M00
is `middle_block`, OUT<k> is `output_blocks.<k>`. Blocks a short list does not name get 0, as in the
webui; weights outside every block (time embeddings, conv_out, …) keep strength 1, also as in the webui.
For Flux, IN is the input embedders (`img_in`, `txt_in`, `time_in`, `vector_in`, `guidance_in`) and OUT
the final layer.

Values are numbers, or the webui's specials: `R` (uniform in [0, 1]), `U` (uniform in [-0.5, 1.5]), both
rounded to 3 decimals and drawn from `seed`; `X` (the value `x`), `X+0.2`, `X-0.1`. A string may be a
comma list, a JSON list (sd-scripts' `--lbws` form) or a preset name: the webui's built-in presets, or
the user's own from a toml file (`NAME = "1,0,…"` or a list, at top level or under `[presets]`) or a
webui `lbwpresets.txt` (`NAME:1,0,…` per line). `LINES` / `LINES(α, β)` is LiNeS' depth scaling (below).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from library.errors import LoraToolsError
from library.formats.registry import FAMILIES

# The layouts, presets and webui blocks are family facts (`Family.block_weights` in library.formats);
# these tables gather them by layout length, the form the webui strings come in.
_LBW = {name: fam.block_weights for name, fam in FAMILIES.items() if fam.block_weights is not None}
LAYOUTS: dict[int, tuple[str, ...]] = {n: names for lbw in _LBW.values() for n, names in lbw.layouts.items()}
# Which families each layout is written for (sd-scripts tells SD1/SD2 from SDXL by the length too).
LAYOUT_FAMILIES: dict[int, tuple[str, ...]] = {n: tuple(f for f, lbw in _LBW.items() if n in lbw.layouts) for n in LAYOUTS}
FAMILY_LAYOUTS: dict[str, tuple[int, ...]] = {f: tuple(lbw.layouts) for f, lbw in _LBW.items()}
# The webui's built-in presets of every family (DEF_WEIGHT_PRESET of sd-webui-lora-block-weight, FLUXALL).
PRESETS: dict[str, str] = {k: v for lbw in _LBW.values() for k, v in lbw.presets.items()}

_X = re.compile(r"^X(?:([+-])(\d+(?:\.\d*)?|\.\d+))?$")


def webui_block(family: str, key: str) -> str | None:
    """The webui block of a canonical weight key, or None for weights outside every block."""
    lbw = _LBW.get(family)
    return lbw.block(key) if lbw is not None else FAMILIES[family].block_id(key)


@dataclass(frozen=True)
class BlockWeights:
    """One parsed block-weight string: a value per block of its layout (blocks it omits hold 0)."""

    text: str
    length: int  # the layout (number of values as written)
    values: Mapping[str, float]  # every block of the full layout (26, 20 or 61 names)
    constant: bool = False  # a preset with one value everywhere applies to any family
    random: bool = False  # drawn from the seed (R/U tokens): the output records the seed
    lines: tuple[float, float] | None = None  # LiNeS (α, β): values from each block's depth, for any family

    def check_family(self, family: str, *, file: str | None = None) -> None:
        if self.constant or self.lines is not None:
            return
        if family not in LAYOUT_FAMILIES[self.length]:
            wanted = FAMILY_LAYOUTS.get(family)
            expects = f"expects {' or '.join(map(str, wanted))} values" if wanted else "has no block-weight layout"
            raise LoraToolsError(f"block weights {self.text!r} have {self.length} values, the layout of "
                                 f"{'/'.join(LAYOUT_FAMILIES[self.length])}; this LoRA is {family}, which {expects}",
                                 file=file)

    def weight(self, family: str, key: str) -> float:
        """The multiplier of the module whose target is canonical weight `key` of `family`."""
        if self.constant:
            return next(iter(self.values.values()))
        if self.lines is not None:
            return lines_weight(family, key, *self.lines)
        self.check_family(family)
        block = webui_block(family, key)
        if block is None:
            return 1.0  # the webui leaves weights outside the blocks at full strength
        return self.values.get(block, 0.0)

    def describe(self) -> str:
        if self.lines is not None:
            return f"LiNeS alpha={self.lines[0]:g}, beta={self.lines[1]:g}"
        return ", ".join(f"{name}={value:g}" for name, value in self.values.items())


# ---- LiNeS (Wang et al., ICLR 2025, "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances
# Model Merging"): the update of layer ℓ of L is scaled by λ(ℓ) = α + β·(ℓ − 1)/(L − 1), so shallow layers
# stay near the base model and deep ones keep the task. Here the layers are the webui blocks of the family's
# full layout in forward order, text encoders excluded (SD/SDXL: IN00 … M00 … OUT11; Flux: IN, D00 … D18,
# S00 … S37, OUT); text-encoder blocks and weights outside every block keep strength 1.
LINES_DEFAULT = (0.5, 0.5)  # first block at half strength, the last at full strength
TEXT_ENCODER_BLOCKS = frozenset({"BASE", "CLIP", "T5"})
_LINES = re.compile(r"^LINES(?:\(\s*([^,()]+)\s*,\s*([^,()]+)\s*\))?$", re.IGNORECASE)


def depth_blocks(family: str) -> tuple[str, ...]:
    """The family's denoiser blocks in forward order (LiNeS' layers ℓ = 1 … L)."""
    return tuple(b for b in _LBW[family].full if b not in TEXT_ENCODER_BLOCKS)


def lines_weight(family: str, key: str, alpha: float, beta: float) -> float:
    """λ(ℓ) = α + β·(ℓ − 1)/(L − 1) of the block holding canonical weight `key`; 1 outside the denoiser's blocks."""
    if family not in _LBW:
        raise LoraToolsError(f"LiNeS block weights need a block layout; {family} has none")
    block = webui_block(family, key)
    order = depth_blocks(family)
    if block is None or block not in order:
        return 1.0
    return alpha + beta * order.index(block) / (len(order) - 1)


def _lines(text: str) -> BlockWeights | None:
    """`LINES` (α = β = 0.5) or `LINES(α, β)` as a BlockWeights; None for any other string."""
    m = _LINES.match(text.strip())
    if m is None:
        return None
    try:
        alpha, beta = (float(m[1]), float(m[2])) if m[1] is not None else LINES_DEFAULT
    except ValueError:
        raise LoraToolsError(f"block weights {text!r}: LINES takes two numbers, LINES(alpha, beta)") from None
    if not all(map(math.isfinite, (alpha, beta))):
        raise LoraToolsError(f"block weights {text!r}: alpha and beta must be finite")
    return BlockWeights(text.strip(), 0, {}, lines=(alpha, beta))


def _value(token: str, rng: random.Random, x: float, text: str) -> float:
    if token == "R":
        return round(rng.random(), 3)
    if token == "U":
        return round(rng.uniform(-0.5, 1.5), 3)
    m = _X.match(token)
    if m:
        offset = float(m[2]) if m[2] else 0.0
        return x - offset if m[1] == "-" else x + offset
    try:
        return float(token)
    except ValueError:
        raise LoraToolsError(f"block weights {text!r}: {token!r} is not a number, R, U or X[+-v]") from None


def _tokens(text: str) -> list[str]:
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise LoraToolsError(f"block weights {text!r}: invalid JSON list ({exc.msg})") from None
        if not isinstance(items, list):
            raise LoraToolsError(f"block weights {text!r}: expected a list")
        return [str(v).strip() for v in items]
    return [t.strip() for t in stripped.split(",")]


def parse_block_weights(text: str | Sequence[float], presets: Mapping[str, str] | None = None, *,
                        seed: int = 0, x: float = 1.0) -> BlockWeights:
    """Parse a block-weight string, JSON list, value list or preset name (user presets shadow built-ins)."""
    if isinstance(text, str) and (lines := _lines(text)) is not None:
        return lines
    label = text if isinstance(text, str) else json.dumps(list(text))
    source = text
    is_preset = False
    if isinstance(text, str):
        name = text.strip()
        table = {**PRESETS, **(presets or {})}
        if name in table:
            source, label, is_preset = table[name], name, True
    tokens = _tokens(source) if isinstance(source, str) else [str(v) for v in source]
    if len(tokens) not in LAYOUTS:
        raise LoraToolsError(f"block weights {label!r} have {len(tokens)} values; the layouts have "
                             f"{', '.join(map(str, sorted(LAYOUTS)))} (or use a preset: {', '.join(PRESETS)})")
    rng = random.Random(seed)
    values = [_value(t, rng, x, label) for t in tokens]
    names = LAYOUTS[len(tokens)]
    full = _LBW[LAYOUT_FAMILIES[len(tokens)][0]].full
    given = dict(zip(names, values))
    # A constant preset (ALL, NONE, ALL0.5) means "this strength everywhere", whatever the family.
    constant = is_preset and len(set(values)) == 1
    return BlockWeights(label, len(tokens), {n: given.get(n, 0.0) for n in full}, constant,
                        any(t in ("R", "U") for t in tokens))


def load_presets(path: str | os.PathLike) -> dict[str, str]:
    """User presets from a toml file, or from a webui `lbwpresets.txt` (`NAME:v1,v2,…`, `#` comments)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise LoraToolsError(f"cannot read block-weight presets: {exc.strerror}", file=path) from None
    if path.endswith(".toml"):
        return _toml_presets(text, path)
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, values = line.partition(":")
        if not sep or not name.strip():
            raise LoraToolsError(f"line {n}: expected NAME:v1,v2,…", file=path)
        out[name.strip()] = values.strip()
    return out


def _toml_presets(text: str, path: str) -> dict[str, str]:
    import toml

    try:
        data = toml.loads(text)
    except toml.TomlDecodeError as exc:
        raise LoraToolsError(f"invalid toml: {exc}", file=path) from None
    table = data.get("presets", data) if isinstance(data.get("presets"), dict) else data
    out: dict[str, str] = {}
    for name, value in table.items():
        if isinstance(value, list):
            out[name] = ",".join(str(v) for v in value)
        elif isinstance(value, str):
            out[name] = value
        else:
            raise LoraToolsError("a preset must be a string or a list of values", file=path, key=name)
    return out


def block_weights_for_models(specs: Sequence[str] | None, n_models: int, *, presets_file: str | None = None,
                             seed: int = 0, x: float = 1.0) -> list[BlockWeights | None]:
    """One parsed `--lbws` entry per model (None where no block weights were given).

    An empty string or "-" means no block weights for that model ("NONE" is the all-zero preset).
    """
    if not specs:
        return [None] * n_models
    if len(specs) != n_models:
        raise LoraToolsError(f"--lbws has {len(specs)} entries but {n_models} models were given")
    presets = load_presets(presets_file) if presets_file else None
    out: list[BlockWeights | None] = []
    for i, spec in enumerate(specs):
        if spec is None or spec.strip() in ("", "-"):
            out.append(None)
        else:
            # Each model draws its R/U values from its own stream, so adding a model changes no other.
            out.append(parse_block_weights(spec, presets, seed=seed + i, x=x))
    return out
