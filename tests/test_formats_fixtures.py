"""LoRA fixtures with real module names and shapes, built from `reference/shapes/` without our tables,
and an independent way to compare them: per-module deltas applied to random probes in float64.

Other format tests import from here; the tests in this file pin the fixtures to the module counts
that formats.md states, so a fixture bug cannot hide a converter bug.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
SHAPES = SHARED / "reference" / "shapes"
RANK = 2

needs_shapes = pytest.mark.skipif(not SHAPES.is_dir(), reason=f"reference shape lists not found at {SHAPES}")


def rows(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """(first column, shape) of a shape list; the shape column depends on the file's layout."""
    out = []
    for line in (SHAPES / f"{name}.tsv").read_text().splitlines():
        cols = line.split("\t")
        if cols[0] in ("bfl_path", "kohya_name"):
            continue
        shape_col = {"flux1_bfl_kohya": 2, "sdxl_unet_kohya_sgm": 3}.get(name, 2)
        out.append((cols[0], tuple(int(x) for x in cols[shape_col].split("x"))))
    return out


def _flat(path: str) -> str:
    return path.replace(".", "_")


def _clip(path: str) -> str:
    return path if path.startswith("text_model.") else "text_model." + path


def _sd_unet_targets(name: str) -> list[tuple[str, tuple[int, ...]]]:
    # kohya's default LoRA/LoCon targets: everything but the stem, the time embedding and the output conv.
    skip = ("conv_in", "conv_out", "time_embedding", "add_embedding")
    return [(p, s) for p, s in rows(name) if not p.startswith(skip)]


def kohya_modules(family: str) -> dict[str, tuple[int, ...]]:
    """kohya module name -> weight shape, written from the reference lists and kohya's naming rules."""
    if family in ("sd1", "sd2"):
        unet = {"lora_unet_" + _flat(p): s for p, s in _sd_unet_targets("sd15_unet" if family == "sd1" else "sd21_unet")}
        te = {"lora_te_" + _flat(_clip(p)): s for p, s in rows("clip_l" if family == "sd1" else "openclip_h_sd2")}
        return {**unet, **te}
    if family == "sdxl":
        unet = dict(rows("sdxl_unet_kohya_sgm"))
        te1 = {"lora_te1_" + _flat(_clip(p)): s for p, s in rows("clip_l")}
        te2 = {"lora_te2_" + _flat(_clip(p)): s for p, s in rows("clip_g") if p != "text_projection"}
        return {**unet, **te1, **te2}
    if family == "flux1":
        unet = {"lora_unet_" + _flat(p): s for p, s in rows("flux1_bfl_kohya")}
        te1 = {"lora_te1_" + _flat(_clip(p)): s for p, s in rows("clip_l")}
        t5 = {"lora_te3_" + _flat(p): s for p, s in rows("t5xxl")}
        return {**unet, **te1, **t5}
    raise ValueError(family)


def diffusers_modules(family: str) -> dict[str, tuple[int, ...]]:
    """diffusers/PEFT module name (with component prefix) -> weight shape."""
    if family in ("sd1", "sd2", "sdxl"):
        unet = {"unet." + p: s for p, s in _sd_unet_targets({"sd1": "sd15_unet", "sd2": "sd21_unet"}.get(family, "sdxl_unet"))}
        te = {"text_encoder." + _clip(p): s for p, s in rows({"sd1": "clip_l", "sd2": "openclip_h_sd2"}.get(family, "clip_l"))}
        if family == "sdxl":
            te.update({"text_encoder_2." + _clip(p): s for p, s in rows("clip_g") if p != "text_projection"})
        return {**unet, **te}
    if family in ("sd3", "sd35_large", "sd35_medium"):
        return {**{"transformer." + p: s for p, s in rows({"sd3": "sd3_medium"}.get(family, family))},
                **{"text_encoder." + _clip(p): s for p, s in rows("clip_l")},
                **{"text_encoder_2." + _clip(p): s for p, s in rows("clip_g") if p != "text_projection"},
                **{"text_encoder_3." + p: s for p, s in rows("t5xxl")}}
    if family in ("flux2", "qwen_image", "wan21", "z_image"):
        return {"transformer." + p: s for p, s in rows({"flux2": "flux2_dev", "wan21": "wan21_14b"}.get(family, family))}
    if family == "flux1":
        return {**{"transformer." + p: s for p, s in rows("flux1_dev")},
                **{"text_encoder." + _clip(p): s for p, s in rows("clip_l")},
                **{"text_encoder_2." + p: s for p, s in rows("t5xxl")}}
    raise ValueError(family)


# Repeated blocks are thinned to the first, second and last ones (plus SDXL's tenth transformer block) so
# the suite stays fast on 2 cores; names and shapes stay real.
_REPEATED = re.compile(r"(?:transformer_blocks|double_blocks|single_blocks|encoder[._]layers|encoder[._]block|"
                       r"(?:^|\.)(?:blocks|layers)(?=\.))[._](\d+)")
_KEEP = {0, 1, 9, 11, 18, 22, 23, 31, 37}


def thin(modules: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {n: s for n, s in modules.items() if all(int(i) in _KEEP for i in _REPEATED.findall(n))}


def _alpha_for(i: int) -> float:
    # Mix scales: 1 (alpha = rank), 0.5 and 0.25 (powers of two, so baking is exact), and 0.3 (not).
    return (float(RANK), 1.0, 0.5, 0.6)[i % 4]


def lora_pair(shape: tuple[int, ...], gen: torch.Generator, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    out, inp = shape[0], shape[1]
    if len(shape) > 2:  # conv (Conv2d, and Conv3d patch embeddings): kernel on down, 1×1 up
        down = torch.randn(RANK, inp, *shape[2:], generator=gen)
        up = torch.randn(out, RANK, *[1] * (len(shape) - 2), generator=gen)
    else:
        down = torch.randn(RANK, inp, generator=gen)
        up = torch.randn(out, RANK, generator=gen)
    return down.to(dtype), up.to(dtype)


def kohya_fixture(family: str, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, shape) in enumerate(sorted(thin(kohya_modules(family)).items())):
        down, up = lora_pair(shape, gen, dtype)
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(_alpha_for(i), dtype=dtype)
    return out


def diffusers_fixture(family: str, seed: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """PEFT-layout file with alpha in `lora_adapter_metadata` (lora_alpha 1, some modules 2 via alpha_pattern)."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, object] = {}
    for i, (name, shape) in enumerate(sorted(thin(diffusers_modules(family)).items())):
        down, up = lora_pair(shape, gen)
        tensors[f"{name}.lora_A.weight"] = down
        tensors[f"{name}.lora_B.weight"] = up
        component, _, path = name.partition(".")
        meta.setdefault(f"{component}.r", RANK)
        meta.setdefault(f"{component}.lora_alpha", 1.0)
        pattern = meta.setdefault(f"{component}.alpha_pattern", {})
        if i % 3 == 0:
            pattern[re.escape(path)] = 2.0
    return tensors, {"lora_adapter_metadata": json.dumps(meta)}


# ---- independent reading of a file's deltas -------------------------------------------------------------

_SUFFIX = re.compile(r"^(.*)\.(lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|alpha)$")


def _peft_alpha(meta: dict[str, str], module: str) -> float | None:
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return None
    config = json.loads(raw)
    component, _, path = module.partition(".")
    for pattern, value in config.get(f"{component}.alpha_pattern", {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", path):
            return float(value)
    return float(config[f"{component}.lora_alpha"]) if f"{component}.lora_alpha" in config else None


def probe_deltas(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None, probes: int = 2,
                 seed: int = 7) -> dict[str, torch.Tensor]:
    """module name -> ΔW @ X in float64 for random X, ΔW = (alpha/r)·up@down, without building ΔW."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _SUFFIX.match(key)
        assert m, f"unexpected key {key}"
        groups.setdefault(m[1], {})[m[2].replace("lora_A.weight", "lora_down.weight")
                                    .replace("lora_B.weight", "lora_up.weight")] = value
    out = {}
    xs: dict[int, torch.Tensor] = {}
    for module, t in groups.items():
        down = t["lora_down.weight"].flatten(1)
        up = t["lora_up.weight"].flatten(1)
        rank = down.shape[0]
        alpha = float(t["alpha"]) if "alpha" in t else _peft_alpha(meta or {}, module)
        scale = 1.0 if alpha is None or alpha == 0 else alpha / rank
        n = down.shape[1]
        if n not in xs:
            xs[n] = torch.randn(n, probes, generator=torch.Generator().manual_seed(seed + n), dtype=torch.float64)
        out[module] = scale * (up.double() @ (down.double() @ xs[n]))
    return out


def assert_same_deltas(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rel: float = 1e-6) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        err = float((a[name] - b[name]).norm() / a[name].norm().clamp_min(1e-300))
        assert err <= rel, f"{name}: relative error {err:.3g}"


# ---- the fixtures themselves ------------------------------------------------------------------------------

@needs_shapes
@pytest.mark.parametrize(("family", "count"), [("sd1", 278 + 72), ("sd2", 278 + 138), ("sdxl", 788 + 72 + 192),
                                               ("flux1", 314 + 72 + 168)])
def test_fixture_module_counts_match_the_reference(family, count):
    # formats.md §4.2/§4.3/§3.2: full LoCon UNets (SD1/2: 278, SDXL: 788), Flux 314 BFL Linears; TEs 72/138/192/168.
    assert len(kohya_modules(family)) == count


@needs_shapes
def test_probe_deltas_match_a_dense_product():
    t = {"m.lora_down.weight": torch.randn(2, 5, 3, 3), "m.lora_up.weight": torch.randn(4, 2, 1, 1),
         "m.alpha": torch.tensor(1.0)}
    x_seed = probe_deltas(t)["m"]
    dense = 0.5 * (t["m.lora_up.weight"].double().flatten(1) @ t["m.lora_down.weight"].double().flatten(1))
    gen = torch.Generator().manual_seed(7 + 45)
    x = torch.randn(45, 2, generator=gen, dtype=torch.float64)
    assert torch.allclose(x_seed, dense @ x)
