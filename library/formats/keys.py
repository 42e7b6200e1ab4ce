"""Tensor-key parsing: split a key into its module name and a normalised kohya/LyCORIS suffix.

Every spelling of the same tensor (formats.md §1.4, §6 step 3) is normalised here, so the rest of
the package sees one vocabulary: `lora_down.weight`, `lora_up.weight`, `alpha`, `hada_*`, `lokr_*`, ….
"""

from __future__ import annotations

import re

# Suffixes that keep their name (kohya / LyCORIS / ComfyUI).
_PLAIN = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale",
          "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
          "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
          "diff", "diff_b", "w_norm", "b_norm", "row_offset")
# Other spellings -> kohya suffix. Order matters: longer, more specific endings first.
_RENAMED = (
    ("lora_linear_layer.down.weight", "lora_down.weight"), ("lora_linear_layer.up.weight", "lora_up.weight"),
    ("lora.down.weight", "lora_down.weight"), ("lora.up.weight", "lora_up.weight"),
    ("lora_A.weight", "lora_down.weight"), ("lora_B.weight", "lora_up.weight"), ("lora_B.bias", "lora_up.bias"),
    ("lora_magnitude_vector.weight", "dora_scale"), ("lora_magnitude_vector", "dora_scale"), ("magnitude", "dora_scale"),
)
# PEFT with the adapter name left in (`.lora_A.default.weight`, DiffSynth; `lora_magnitude_vector.default.weight`).
_ADAPTER_INFIX = re.compile(r"^(.*)\.(lora_A|lora_B|lora_magnitude_vector)\.[A-Za-z0-9_]+\.(weight|bias)$")
# Old diffusers attention processors: `…attn1.processor.to_q_lora.down.weight`, TE `…self_attn.to_q_lora.down.weight`.
_PROCESSOR = re.compile(r"^(.*?)(\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_TE_PROC = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
# xlabs processors: `double_blocks.0.processor.qkv_lora1.down.weight`.
_XLABS = re.compile(r"^(.*\.processor\.(?:qkv|proj)_lora[12]?)\.(down|up)\.weight$")


def parse_key(key: str) -> tuple[str, str] | None:
    """(module name, normalised suffix), or None when the key has no recognisable adapter suffix."""
    m = _PROCESSOR.match(key)
    if m:
        parent, name = m[1], m[3]
        if parent.endswith("self_attn"):
            module = f"{parent}.{_TE_PROC[name]}"
        else:
            module = f"{parent}.{'to_out.0' if name == 'to_out' else name}"
        return module, f"lora_{m[4]}.weight"
    m = _XLABS.match(key)
    if m:
        return m[1], f"lora_{m[2]}.weight"
    m = _ADAPTER_INFIX.match(key)
    if m:
        suffix = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight", "lora_magnitude_vector": "dora_scale"}[m[2]]
        if m[3] == "bias":
            suffix = "lora_up.bias" if m[2] == "lora_B" else None
        return (m[1], suffix) if suffix else None
    for old, new in _RENAMED:
        if key.endswith("." + old):
            return key[: -len(old) - 1], new
    for name in _PLAIN:
        if key.endswith("." + name):
            return key[: -len(name) - 1], name
    return None


def peft_style(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def old_diffusers_style(key: str) -> bool:
    return bool(_PROCESSOR.match(key)) or ".lora.down." in key or ".lora.up." in key or ".lora_linear_layer." in key
