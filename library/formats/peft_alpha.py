"""Alpha of PEFT/diffusers files from the `lora_adapter_metadata` header (formats.md §1.1, §6 step 1).

The header holds one LoraConfig per component, its keys prefixed by the component name
(`unet.lora_alpha`, `transformer.alpha_pattern`, …); a bare LoraConfig (no prefixes) applies to all.
PEFT matches pattern keys against module names as `(.*\\.)?pattern$`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

from library.errors import LoraToolsError

KEY = "lora_adapter_metadata"


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_field(field: str, value: object, path: str | None, key: str) -> None:
    """The LoraConfig fields we read must have PEFT's types: r / lora_alpha numbers, patterns {name: number}."""
    where = f"{KEY} {key}"
    if field in ("r", "lora_alpha") and value is not None and not _number(value):
        raise LoraToolsError(f"{where} is {json.dumps(value)[:40]}; expected a finite number", file=path, key=KEY)
    if field in ("alpha_pattern", "rank_pattern") and value is not None:
        if not isinstance(value, dict):
            raise LoraToolsError(f"{where} is a JSON {type(value).__name__}; expected an object of "
                                 "module pattern -> number", file=path, key=KEY)
        bad = next((p for p, v in value.items() if not _number(v)), None)
        if bad is not None:
            raise LoraToolsError(f"{where}[{bad!r}] is {json.dumps(value[bad])[:40]}; expected a finite number",
                                 file=path, key=KEY)


class PeftAlphas:
    def __init__(self, metadata: Mapping[str, str] | None, path: str | None = None):
        self.configs: dict[str, dict] = {}
        raw = (metadata or {}).get(KEY)
        if not raw:
            return
        # A header we cannot read would silently give alpha = rank (often 4-16x too strong): refuse it.
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise LoraToolsError(f"{KEY} is not valid JSON", file=path, key=KEY) from None
        if not isinstance(data, dict):
            raise LoraToolsError(f"{KEY} is a JSON {type(data).__name__}, not an object", file=path, key=KEY)
        for key, value in data.items():
            comp, dot, field = key.rpartition(".")
            field = field if dot else key
            _check_field(field, value, path, key)
            self.configs.setdefault(comp if dot else "", {})[field] = value

    def __bool__(self) -> bool:
        return bool(self.configs)

    def alpha_for(self, prefix: str, path: str) -> float | None:
        """The lora_alpha of module `path` under a key prefix like `unet.`, or None when not recorded."""
        name = prefix.rstrip(".")
        config = self.configs.get(name, self.configs.get(""))
        if not config:
            return None
        hit = self._patterns(name if name in self.configs else "").first(path)
        if hit is not None:
            return float(hit)
        alpha = config.get("lora_alpha")
        return float(alpha) if alpha is not None else None

    def _patterns(self, name: str) -> _Patterns:
        cache = self.__dict__.setdefault("_cache", {})
        if name not in cache:
            cache[name] = _Patterns(self.configs[name].get("alpha_pattern") or {})
        return cache[name]


class _Patterns:
    """PEFT's rule (peft.utils.other.get_pattern_key): the first pattern `p`, in stored order, for which
    `(.*\\.)?(p)$` matches the module name. Escaped literals (what we write) are looked up by the
    name's dotted suffixes instead of running thousands of regexes."""

    def __init__(self, patterns: Mapping[str, object]):
        self.literal: dict[str, tuple[int, object]] = {}
        self.regex: list[tuple[int, re.Pattern | None, str, object]] = []
        for order, (pattern, value) in enumerate(patterns.items()):
            plain = re.sub(r"\\(.)", r"\1", pattern)
            if re.escape(plain) == pattern:
                self.literal.setdefault(plain, (order, value))
            else:
                try:
                    self.regex.append((order, re.compile(rf"(.*\.)?({pattern})"), pattern, value))
                except re.error:
                    self.regex.append((order, None, pattern, value))

    def first(self, path: str) -> object | None:
        parts = path.split(".")
        found = [self.literal[s] for s in (".".join(parts[i:]) for i in range(len(parts))) if s in self.literal]
        for order, compiled, pattern, value in self.regex:
            if compiled.fullmatch(path) if compiled else path == pattern or path.endswith("." + pattern):
                found.append((order, value))
                break
        return min(found, key=lambda f: f[0])[1] if found else None


def adapter_metadata(entries: Mapping[str, Mapping[str, tuple[int, float]]]) -> str:
    r"""`lora_adapter_metadata` for adapter name -> module path -> (rank, alpha).

    The most common rank and alpha become `r` / `lora_alpha`; the others go to the patterns. PEFT takes
    the first pattern `p` (in stored order) with `(.*\.)?p$` matching a module name, so patterns are
    regex-escaped, stored longest first, and a module whose name ends with another module's pattern
    (`single_transformer_blocks.0.proj_out` vs top-level `proj_out`) gets its own entry even when it has
    the default value. A leading `text_model.` is left out: transformers >= 5 CLIP models lack it (§2.7).
    """
    out: dict[str, object] = {}
    for adapter, modules in entries.items():
        for index, field in ((0, "rank"), (1, "alpha")):
            values = [v[index] for v in modules.values()]
            default = max(set(values), key=values.count)
            out[f"{adapter}.{'r' if field == 'rank' else 'lora_alpha'}"] = default
            out[f"{adapter}.{field}_pattern"] = _patterns({p: v[index] for p, v in modules.items()}, default)
        out[f"{adapter}.target_modules"] = sorted(p.removeprefix("text_model.") for p in modules)
    return json.dumps(out)


def _patterns(values: Mapping[str, float], default: float) -> dict[str, float]:
    names = {p: p.removeprefix("text_model.") for p in values}
    chosen = {p for p, v in values.items() if v != default}
    shadowed = {q for q in values if any(names[q].endswith("." + names[p]) for p in chosen if p != q)}
    ordered = sorted(chosen | shadowed, key=lambda p: (-len(names[p]), names[p]))
    return {re.escape(names[p]): values[p] for p in ordered}
