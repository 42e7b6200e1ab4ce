"""Alpha of PEFT/diffusers files from the `lora_adapter_metadata` header (formats.md §1.1, §6 step 1).

The header holds one LoraConfig per component, its keys prefixed by the component name
(`unet.lora_alpha`, `transformer.alpha_pattern`, …); a bare LoraConfig (no prefixes) applies to all.
PEFT matches pattern keys against module names as `(.*\\.)?pattern$`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

KEY = "lora_adapter_metadata"


class PeftAlphas:
    def __init__(self, metadata: Mapping[str, str] | None):
        self.configs: dict[str, dict] = {}
        raw = (metadata or {}).get(KEY)
        if not raw:
            return
        try:
            data = json.loads(raw)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        for key, value in data.items():
            comp, dot, field = key.rpartition(".")
            self.configs.setdefault(comp if dot else "", {})[field if dot else key] = value

    def __bool__(self) -> bool:
        return bool(self.configs)

    def alpha_for(self, prefix: str, path: str) -> float | None:
        """The lora_alpha of module `path` under a key prefix like `unet.`, or None when not recorded."""
        config = self.configs.get(prefix.rstrip("."), self.configs.get(""))
        if not config:
            return None
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            try:
                if re.fullmatch(rf"(.*\.)?{pattern}", path):
                    return float(value)
            except re.error:
                if path == pattern or path.endswith("." + pattern):
                    return float(value)
        alpha = config.get("lora_alpha")
        return float(alpha) if alpha is not None else None


def adapter_metadata(entries: Mapping[str, Mapping[str, tuple[int, float]]]) -> str:
    """`lora_adapter_metadata` for adapter name -> module path -> (rank, alpha).

    The most common rank and alpha become `r` / `lora_alpha`; the others go to the patterns, with
    regex characters escaped so that each pattern names exactly one module.
    """
    out: dict[str, object] = {}
    for adapter, modules in entries.items():
        ranks = [r for r, _ in modules.values()]
        alphas = [a for _, a in modules.values()]
        r0 = max(set(ranks), key=ranks.count)
        a0 = max(set(alphas), key=alphas.count)
        out[f"{adapter}.r"] = r0
        out[f"{adapter}.lora_alpha"] = a0
        out[f"{adapter}.rank_pattern"] = {re.escape(p): r for p, (r, _) in sorted(modules.items()) if r != r0}
        out[f"{adapter}.alpha_pattern"] = {re.escape(p): a for p, (_, a) in sorted(modules.items()) if a != a0}
        out[f"{adapter}.target_modules"] = sorted(modules)
    return json.dumps(out, sort_keys=True)
