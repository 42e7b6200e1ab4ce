"""Matching a file's module names against a family's vocabularies, and detecting family and format.

Detection uses key names, shapes and metadata only (formats.md §6): every candidate family tries to
place every module (right name in one of its namings, and tensor shapes that fit the target); the
family that places all of them wins. Ties are broken by metadata hints; a remaining tie is an error
that asks for --family, never a silent guess.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from library.errors import AmbiguousFamilyError, LoraToolsError
from library.formats.family import Family, Slot
from library.formats.keys import old_diffusers_style, parse_key, peft_style
from library.formats.registry import FAMILIES


@dataclass(frozen=True)
class Match:
    component: str
    naming: str
    path: str
    slot: Slot
    prefix: str


def group_keys(keys: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """module name -> {suffix: key}, and the keys with no adapter suffix."""
    modules: dict[str, dict[str, str]] = {}
    bad = []
    for key in keys:
        parsed = parse_key(key)
        if parsed is None:
            bad.append(key)
            continue
        module, suffix = parsed
        modules.setdefault(module, {})[suffix] = key
    return modules, bad


def resolve(family: Family, module: str) -> Match | None:
    """Where a module name lands in the family, trying each accepted prefix and naming."""
    table = family.table
    for prefix, component in family.read_prefixes:
        if not module.startswith(prefix) or component not in family.namings:
            continue
        rest = module[len(prefix):]
        flat = prefix.endswith("_")
        if flat and rest.startswith("_"):
            rest = rest[1:]  # `lora_unet__…` (Wan "Fun" files, §6 step 2)
        for naming in family.namings[component]:
            if flat:
                path = table.flat[naming].get(rest)
            else:
                path = rest if rest in table.slots[naming] else None
                if path is None and rest.startswith("encoder.layers.") and naming.startswith("clip"):
                    # PEFT saves from transformers >= 5 CLIPTextModel lack `text_model.` (§2.7).
                    path = "text_model." + rest if "text_model." + rest in table.slots[naming] else None
            if path is not None:
                return Match(component, naming, path, table.slots[naming][path], prefix)
    return None


def io_dims(shapes: Mapping[str, tuple[int, ...]]) -> tuple[int | None, int | None, int | None]:
    """(out rows, flattened input size, tensor rank of the weight when known) implied by a module's tensors."""
    s = shapes
    if "lora_up.weight" in s and "lora_down.weight" in s:
        down = s["lora_down.weight"]
        if "lora_mid.weight" in s:
            return s["lora_up.weight"][0], down[1] * math.prod(s["lora_mid.weight"][2:]), 4
        return s["lora_up.weight"][0], math.prod(down[1:]), len(down)
    if "hada_w1_a" in s and "hada_w1_b" in s:
        if "hada_t1" in s:
            return s["hada_w1_a"][1], s["hada_w1_b"][1] * math.prod(s["hada_t1"][2:]), None
        return s["hada_w1_a"][0], s["hada_w1_b"][1], None
    if any(k.startswith("lokr_") for k in s):
        w1 = s.get("lokr_w1") or ((s["lokr_w1_a"][0], s["lokr_w1_b"][1]) if "lokr_w1_a" in s and "lokr_w1_b" in s else None)
        if "lokr_w2" in s:
            w2_out, w2_in = s["lokr_w2"][0], math.prod(s["lokr_w2"][1:])
        elif "lokr_t2" in s and "lokr_w2_a" in s and "lokr_w2_b" in s:
            w2_out, w2_in = s["lokr_w2_a"][1], s["lokr_w2_b"][1] * math.prod(s["lokr_t2"][2:])
        elif "lokr_w2_a" in s and "lokr_w2_b" in s:
            w2_out, w2_in = s["lokr_w2_a"][0], s["lokr_w2_b"][1]
        else:
            return None, None, None
        if w1 is None:
            return None, None, None
        return w1[0] * w2_out, w1[1] * w2_in, None
    if "diff" in s:
        return s["diff"][0], math.prod(s["diff"][1:]), len(s["diff"])
    for key in ("lora_up.bias", "diff_b"):
        if key in s:
            return s[key][0], None, None
    return None, None, None


def fits(family: Family, match: Match, shapes: Mapping[str, tuple[int, ...]]) -> bool:
    full = family.table.shapes[match.slot.key]
    rows = match.slot.rows
    out_rows = rows[1] - rows[0] if rows else full[0]
    out, inp, ndim = io_dims(shapes)
    if out is None:
        return False
    # a LoKr with ComfyUI's `.row_offset` covers a window of its product's rows (checked by value on reading)
    windowed = "row_offset" in shapes and out >= out_rows
    if (out != out_rows and not windowed) or (inp is not None and inp != math.prod(full[1:])):
        return False
    return not (ndim is not None and ndim != len(full))


@dataclass
class FileMatch:
    family: Family
    matches: dict[str, Match]  # module name -> match
    unmatched: list[str]  # tensor keys
    modules: dict[str, dict[str, str]]


def match_family(family: Family, modules: dict[str, dict[str, str]], bad: list[str],
                 shapes: Mapping[str, tuple[int, ...]]) -> FileMatch:
    matches: dict[str, Match] = {}
    unmatched = list(bad)
    for module, keys in modules.items():
        m = resolve(family, module)
        if m is not None and fits(family, m, {s: tuple(shapes[k]) for s, k in keys.items()}):
            matches[module] = m
        else:
            unmatched.extend(keys.values())
    return FileMatch(family, matches, sorted(unmatched), modules)


def _hinted(metadata: Mapping[str, str], family: Family) -> bool:
    if metadata.get("loratools.family"):  # written by us (library/formats/write.py)
        return metadata["loratools.family"] == family.name
    text = " ".join(str(metadata.get(k, "")) for k in ("ss_base_model_version", "modelspec.architecture")).lower()
    return any(h in text for h in family.hints)


def _preferred(tied: list[FileMatch]) -> FileMatch | None:
    """The one tied family left when every family that derives from (`parent`) or defers to (`defers_to`)
    another tied family steps back: FLUX.1 among FLUX.1, Chroma, FLUX.1 Fill and HunyuanVideo. A derivative
    takes its parent's LoRAs (library.formats.variants), and the deferring family is the far rarer one."""
    names = {r.family.name for r in tied}
    left = [r for r in tied if not ({r.family.parent, *r.family.defers_to} & names)]
    return left[0] if len(left) == 1 else None


def detect(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None = None,
           family: str | None = None, path: str | None = None) -> FileMatch:
    """Match a file against the given family or every known one (see module docstring)."""
    metadata = metadata or {}
    modules, bad = group_keys(list(shapes))
    if family is not None:
        if family not in FAMILIES:
            raise LoraToolsError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}", file=path)
        return match_family(FAMILIES[family], modules, bad, shapes)
    if not modules:
        raise LoraToolsError("not a LoRA this tool understands: no key ends in an adapter suffix (.lora_down.weight, "
                             ".lora_A.weight, .alpha, .hada_w1_a, .lokr_w1, .diff, …); first keys: "
                             f"{', '.join(sorted(shapes)[:3])}", file=path)
    results = [match_family(f, modules, bad, shapes) for f in FAMILIES.values()]
    best = max(len(r.matches) for r in results)
    if best == 0:
        raise LoraToolsError(f"no known model family has modules named like this file's; first keys: "
                             f"{', '.join(sorted(shapes)[:5])}", file=path)
    top = [r for r in results if len(r.matches) == best]
    if len(top) > 1:
        hinted = [r for r in top if _hinted(metadata, r.family)]
        # a derivative's hint names it more closely than its parent's does ("ltx-2.3" also contains "ltx-2")
        hinted = [r for r in hinted if not any(o.family.parent == r.family.name for o in hinted)]
        if len(hinted) == 1:
            return hinted[0]
        preferred = _preferred(hinted or top)
        if preferred is not None:
            return preferred
        names = ", ".join(r.family.name for r in top)
        raise AmbiguousFamilyError(f"ambiguous model family: the modules fit {names} equally well; "
                                   f"say which with --family", file=path)
    return top[0]


def format_of(fm: FileMatch, keys: list[str]) -> str:
    """The file format, from the prefixes and tensor spellings of its matched modules."""
    votes: dict[str, int] = {}
    for module, m in fm.matches.items():
        sample = next(iter(fm.modules[module].values()))
        if m.naming == "xlabs":
            fmt = "xlabs"
        elif old_diffusers_style(sample):
            fmt = "diffusers-old"
        elif m.prefix == "lycoris_":
            fmt = "lycoris"
        elif m.prefix.endswith("_"):
            fmt = "kohya"
        elif any(peft_style(k) for k in fm.modules[module].values()):
            fmt = ("ai-toolkit" if m.prefix in ("diffusion_model.", "model.diffusion_model.") else
                   "peft" if "base_model.model." in m.prefix else "bfl-control" if m.prefix == "" and m.naming == "bfl"
                   else "diffusers")
        else:
            fmt = "comfy"
        votes[fmt] = votes.get(fmt, 0) + 1
    if not votes:
        return "unknown"
    return max(votes, key=votes.get)


def detect_lora(keys_to_shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None = None) \
        -> tuple[str, str]:
    """(family, format) of a LoRA from its key names, shapes and metadata alone."""
    fm = detect(keys_to_shapes, metadata)
    return fm.family.name, format_of(fm, list(keys_to_shapes))
