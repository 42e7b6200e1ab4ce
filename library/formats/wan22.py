"""Wan 2.2: the A14B models (T2V, I2V) are two Wan 2.1-14B-shaped experts, a high-noise one for the early
steps and a low-noise one for the rest, so their LoRAs are `wan21` LoRAs that come in pairs, one file per
expert (diffusers `transformer` / `transformer_2`, musubi-tuner `--dit_high_noise`; families-2026 §1.2 #2).
TI2V-5B is one smaller model of the same naming: dim 3072 (24 heads × 128), FFN 14336, 30 blocks, 48 latent
channels in and out (Wan 2.2 VAE), so `patch_embedding` reads 48 and `head.head` writes 48·1·2·2 = 192.

This module holds the 5B family (its table derived from the 14B list by those widths) and the rules that
tell a high-noise file from a low-noise one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from library.errors import LoraToolsError
from library.formats import wan21
from library.formats.transformer_family import transformer_family

LAYERS = 30
# 14B width -> 5B width of every dimension of the 14B shape list (dim, FFN, 6·dim modulation, patch in, head out)
_WIDTHS = {5120: 3072, 13824: 14336, 30720: 18432, 16: 48, 64: 192}


def build(builder, shapes) -> None:
    from library.formats.native_build import build_from_diffusers

    rows = []
    for path, kind, shape, bias in shapes("wan21_14b"):
        m = re.match(r"blocks\.(\d+)\.", path)
        if m and int(m[1]) >= LAYERS:
            continue
        # umT5's 4096 and the 256 time frequencies are no 14B widths, so they stay; kernel sizes too
        new = tuple(_WIDTHS.get(d, d) if i < 2 else d for i, d in enumerate(shape))
        rows.append((path, kind, new, bias))
    build_from_diffusers(builder, rows, wan21.inverse_rule, native="wan")


FAMILY = transformer_family("wan22_5b", "Wan 2.2 TI2V-5B", "wan", wan21.block_id, ("ti2v", "wan2.2-5b", "wan22_5b"),
                            architecture="wan-2.2-ti2v-5b")

# ---- high-noise / low-noise expert pairs (A14B) ----------------------------------------------------------

EXPERTS = ("high_noise", "low_noise")
# How released pairs are named: `…_high_noise.safetensors` / `…_low_noise…` (Comfy-Org, lightx2v), `…HIGH…` /
# `…LOW…`, `…_HN` / `…_LN`, `…-high` / `…-low` (community uploads).
_NAME = {"high_noise": r"(?<![a-z])(?:high[-_ ]?noise|high|hn)(?![a-z])",
         "low_noise": r"(?<![a-z])(?:low[-_ ]?noise|low|ln)(?![a-z])"}
_SPELLING = re.compile(r"(?<![a-z])(high|low)([-_ ]?noise)?(?![a-z])|(?<![a-z])(hn|ln)(?![a-z])", re.IGNORECASE)


EXPERT_KEY = "loratools.wan22_expert"  # written by convert_lora.py on each file of a pair


def expert_of(path: str, metadata: Mapping[str, str] | None = None) -> str | None:
    """"high_noise" / "low_noise": our own metadata key, else the training run's output name or modelspec
    title, else the file name; None when none says, or one says both."""
    metadata = metadata or {}
    if metadata.get(EXPERT_KEY) in EXPERTS:
        return metadata[EXPERT_KEY]
    names = [str(metadata.get(k, "")) for k in ("ss_output_name", "modelspec.title")] + [os.path.basename(path)]
    for text in names:
        found = [e for e in EXPERTS if re.search(_NAME[e], text.lower())]
        if len(found) == 1:
            return found[0]
    return None


def partner_path(path: str) -> str | None:
    """The other expert's file name (`a_high_noise.safetensors` -> `a_low_noise.safetensors`), None when the
    name says no expert or says one in more than one place."""
    name = os.path.basename(path)
    hits = list(_SPELLING.finditer(name))
    if len(hits) != 1:
        return None
    m = hits[0]
    stem = m.group(1) or m.group(3)  # high / low / hn / ln, at the start of the match
    other = {"high": "low", "low": "high", "hn": "ln", "ln": "hn"}[stem.lower()]
    other = other.upper() if stem.isupper() else other.capitalize() if stem[0].isupper() else other
    return os.path.join(os.path.dirname(path), name[:m.start()] + other + name[m.start() + len(stem):])


def expert_pair(single: str | None, high: str | None, low: str | None) -> dict[str, str] | None:
    """{expert: LoRA path} of a Wan 2.2 A14B pair: from --high_noise/--low_noise, or `single` when its name says
    one expert and the partner's file (`partner_path`) exists next to it; None for a lone file."""
    if high or low:
        if single:
            raise LoraToolsError("give the LoRA either as the input or as --high_noise/--low_noise, not both")
        return {e: p for e, p in zip(EXPERTS, (high, low), strict=True) if p}
    expert = expert_of(single) if single else None
    partner = partner_path(single) if expert else None
    if partner is None or not os.path.exists(partner) or expert_of(partner) in (None, expert):
        return None
    return {e: single if e == expert else partner for e in EXPERTS}


def expert_outputs(output: str | None, experts) -> dict[str, str | None]:
    """The output of each expert: `output` with its expert word swapped (`out_high_noise` -> `out_low_noise`),
    else `<stem>_high_noise<ext>` / `<stem>_low_noise<ext>`; a lone expert's output is `output` itself."""
    experts = list(experts)
    if output is None or len(experts) == 1:
        return {e: output for e in experts}
    named, partner = expert_of(output), partner_path(output)
    if named and partner:
        return {e: output if e == named else partner for e in experts}
    stem, ext = os.path.splitext(output)
    return {e: f"{stem}_{e}{ext}" for e in experts}


def check_experts(loras: Mapping[str, object]) -> None:
    """Each file of a pair must be a Wan 2.1/2.2-14B-shaped LoRA (`wan21`): the A14B experts have that shape."""
    for expert, lora in loras.items():
        if lora.family != "wan21":
            raise LoraToolsError(f"--{expert} is for a Wan 2.2 A14B expert LoRA, but this is a "
                                 f"{lora.family} LoRA", file=lora.path)
