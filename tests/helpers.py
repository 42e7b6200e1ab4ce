"""Builders and utilities shared by the tests (and by bench/fixtures.py): the repo paths, running a script
through library.cli, hand-written safetensors files, small LoRAs with real key names, LoRAs built from the
reference shape lists, and an independent float64 reading of a LoRA's deltas.

Test modules import from here, never from each other (tests/test_house_rules.py checks this).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ../shared beside the checkout (reference tables, real files by others); LORATOOLS_SHARED points elsewhere, e.g.
# at an empty folder to check that every test needing it skips instead of failing without it.
SHARED = Path(os.environ.get("LORATOOLS_SHARED") or Path(ROOT) / ".." / "shared")
SHARED_DATA = str(SHARED / "data")
SHAPES = SHARED / "reference" / "shapes"

needs_shapes = pytest.mark.skipif(not SHAPES.is_dir(), reason=f"reference shape lists not found at {SHAPES}")


# ---- running a script ---------------------------------------------------------------------------------------

def run_script(script, argv) -> object:
    """`script.main` on argv parsed the way the command line does (library.cli.parse_args); its return value."""
    from library.cli import parse_args

    return script.main(parse_args(script.setup_parser(), [str(a) for a in argv]))


def run_cli_status(script, argv, capsys) -> tuple[int, object]:
    """`script` through library.cli.run_cli as the command line runs it: (exit status, captured out/err)."""
    with pytest.raises(SystemExit) as info:
        script.run_cli(script.setup_parser, script.main, argv)
        raise SystemExit(0)
    return info.value.code, capsys.readouterr()


# ---- files ----------------------------------------------------------------------------------------------

_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      header_len: int | None = None) -> bytes:
    """A valid safetensors file written by hand (not by the code under test), its header JSON padded with
    spaces to exactly `header_len` bytes when given, so the 8-byte length field takes a chosen value."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    data, offset = [], 0
    for key, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        data.append(raw)
        offset += len(raw)
    body = json.dumps(header).encode()
    if header_len is not None:
        assert header_len >= len(body), (header_len, len(body))
        body += b" " * (header_len - len(body))
    return struct.pack("<Q", len(body)) + body + b"".join(data)


def length_with_low_bytes(natural: int, low: bytes) -> int:
    """The smallest header length >= `natural` whose little-endian encoding starts with `low`."""
    step = 256 ** len(low)
    base = int.from_bytes(low, "little")
    return base + step * max(0, -(-(natural - base) // step))


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fingerprints(folder) -> dict[str, str]:
    """sha256 of every file under `folder` (to assert that inputs are byte-identical afterwards)."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = sha256(path)
    return out


def temp_files(folder) -> list[str]:
    return sorted(name for _root, _dirs, files in os.walk(folder) for name in files if name.startswith(".tmp-"))


# ---- small LoRAs with real key names --------------------------------------------------------------------

# A real SD1 UNet module (kohya and diffusers/PEFT names of the same layer, in 640 / out 640).
KOHYA_MODULE = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
PEFT_MODULE = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def peft_lora(rank: int = 4, alpha: float = 1.0, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    g = torch.Generator().manual_seed(seed)
    tensors = {f"{PEFT_MODULE}.lora_A.weight": torch.randn(rank, 640, generator=g),
               f"{PEFT_MODULE}.lora_B.weight": torch.randn(640, rank, generator=g)}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": rank, "unet.lora_alpha": alpha,
                                                  "unet.target_modules": ["to_q"]})}
    return tensors, meta


def kohya_lora(rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{KOHYA_MODULE}.lora_down.weight": torch.randn(rank, 640, generator=g),
            f"{KOHYA_MODULE}.lora_up.weight": torch.randn(640, rank, generator=g),
            f"{KOHYA_MODULE}.alpha": torch.tensor(alpha)}


def ai_toolkit_single_block(n: int, parts=("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), seed: int = 3):
    """An AI-Toolkit Flux single block `n` (split q/k/v/mlp factors, rank 2): the key style sd-scripts cannot read."""
    g = torch.Generator().manual_seed(seed + n)
    h, r = 3072, 2
    sizes = {"attn.to_q": h, "attn.to_k": h, "attn.to_v": h, "proj_mlp": 4 * h}
    t = {}
    for p in parts:
        t[f"transformer.single_transformer_blocks.{n}.{p}.lora_A.weight"] = torch.randn(r, h, generator=g)
        t[f"transformer.single_transformer_blocks.{n}.{p}.lora_B.weight"] = torch.randn(sizes[p], r, generator=g)
    return t


# ---- LoRAs from the reference shape lists (formats tests) ---------------------------------------------------

RANK = 2  # of every module of kohya_fixture / diffusers_fixture


def table(name: str) -> list[list[str]]:
    """The columns of every line of reference shape list `name` (header included)."""
    path = SHAPES / f"{name}.tsv"
    if not path.exists():
        pytest.skip(f"{path} not found: the reference shape tables are needed to build this fixture")
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split("x"))


def rows(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """(first column, shape) of a shape list; the shape column depends on the file's layout."""
    shape_col = {"flux1_bfl_kohya": 2, "sdxl_unet_kohya_sgm": 3}.get(name, 2)
    return [(cols[0], _shape(cols[shape_col])) for cols in table(name) if cols[0] not in ("bfl_path", "kohya_name")]


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


def diffusers_fixture(family: str, seed: int = 1, modules: dict[str, tuple[int, ...]] | None = None) \
        -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """PEFT-layout file with alpha in `lora_adapter_metadata` (lora_alpha 1, some modules 2 via alpha_pattern);
    `modules` (name with component prefix -> weight shape) replaces the family's reference list."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, object] = {}
    for i, (name, shape) in enumerate(sorted(thin(modules or diffusers_modules(family)).items())):
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


# ---- LoRAs from the reference shape lists (benchmarks and CLI tests) ---------------------------------------
# SDXL: UNet in kohya's SGM naming from `sdxl_unet_kohya_sgm.tsv` ("attention" = the 722 Linears inside
# Transformer2DModel blocks that a default kohya LoRA targets, "all" adds the ResNet Linears and 3×3 convs of
# a LoCon) plus CLIP-L (`lora_te1_`, 72) and CLIP-G (`lora_te2_`, 192; `text_projection` is not a kohya
# target). Flux.1: kohya names and full BFL shapes from `flux1_bfl_kohya.tsv`. `make_lora` fills them with
# random kohya factors whose scale decays per rank direction (a trained-LoRA-like spectrum).

@dataclass(frozen=True)
class LoraModule:
    """One kohya-named LoRA target: `name` without suffix, `shape` of the base weight (out, in[, kh, kw])."""

    name: str
    shape: tuple[int, ...]

    @property
    def is_conv3(self) -> bool:
        return len(self.shape) == 4 and self.shape[2:] != (1, 1)


def sdxl_modules(unet: str = "attention", te1: bool = True, te2: bool = True,
                 blocks: Iterable[str] | None = None) -> list[LoraModule]:
    """SDXL LoRA targets in kohya naming. `unet`: "attention" (default kohya LoRA), "all" (LoCon), "none".

    `blocks` keeps only UNet modules whose kohya name contains one of the given fragments
    (e.g. "input_blocks_4_", "middle_block_"): a smaller set with the real shape ratios.
    """
    if unet not in ("attention", "all", "none"):
        raise ValueError(f"unet must be attention, all or none, not {unet!r}")
    out: list[LoraModule] = []
    if unet != "none":
        fragments = tuple(blocks) if blocks else None
        for kohya, diffusers, _kind, shape, _bias in table("sdxl_unet_kohya_sgm")[1:]:
            if unet == "attention" and ".attentions." not in f".{diffusers}":
                continue
            if fragments and not any(f in kohya for f in fragments):
                continue
            out.append(LoraModule(kohya, _shape(shape)))
    if te1:
        out += _clip_modules("clip_l", "lora_te1_")
    if te2:
        out += _clip_modules("clip_g", "lora_te2_")
    return out


def _clip_modules(name: str, prefix: str) -> list[LoraModule]:
    modules = []
    for path, _kind, shape, _bias in table(name):
        if path == "text_projection":
            continue  # not a kohya target
        # clip_l.tsv omits HF's leading `text_model.`; kohya's names always carry it.
        modules.append(LoraModule(prefix + _flat(_clip(path)), _shape(shape)))
    return modules


def flux_modules(double_blocks: Iterable[int] = range(19), single_blocks: Iterable[int] = range(38),
                 default_only: bool = True) -> list[LoraModule]:
    """Flux.1 LoRA targets in kohya naming with full BFL shapes, for the chosen double/single blocks.

    `default_only` keeps what sd-scripts' lora_flux trains by default (the block Linears); False adds the
    embedders and final layer.
    """
    doubles = {f"double_blocks.{i}." for i in double_blocks}
    singles = {f"single_blocks.{i}." for i in single_blocks}
    out = []
    for bfl, kohya, shape, default in table("flux1_bfl_kohya")[1:]:
        in_blocks = any(bfl.startswith(p) for p in doubles | singles)
        is_block = bfl.startswith(("double_blocks.", "single_blocks."))
        if in_blocks or (not is_block and not default_only and default != "True"):
            out.append(LoraModule(kohya, _shape(shape)))
    return out


def make_lora(modules: Iterable[LoraModule], rank: int, *, alpha: float | None = None, conv_rank: int | None = None,
              seed: int = 0, dtype: torch.dtype = torch.float16, decay: float = 0.5,
              ranks: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Random kohya LoRA tensors for `modules` (state dict ready to save).

    Rank `rank` for Linear/1×1 modules, `conv_rank` (default `rank`) for k×k convs, or per module from
    `ranks`. Direction j of the rank gets weight (j+1)^-decay, so singular values decay like a trained
    LoRA's. `alpha` default = rank (scale 1); a float gives alpha/rank scale per module.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module in modules:
        r = (ranks or {}).get(module.name) or (conv_rank or rank if module.is_conv3 else rank)
        out_dim, in_dim = module.shape[0], module.shape[1]
        kernel = module.shape[2:] if len(module.shape) == 4 else ()
        r = min(r, out_dim, in_dim * math.prod(kernel or (1,)))
        fan_in = in_dim * math.prod(kernel or (1,))
        weights = torch.arange(1, r + 1, dtype=torch.float32).pow(-decay)
        down = torch.randn(r, fan_in, generator=gen) / math.sqrt(fan_in)
        up = torch.randn(out_dim, r, generator=gen) * 0.05 * weights
        if kernel:
            down = down.reshape(r, in_dim, *kernel)
            up = up.reshape(out_dim, r, 1, 1)
        tensors[f"{module.name}.lora_down.weight"] = down.to(dtype).contiguous()
        tensors[f"{module.name}.lora_up.weight"] = up.to(dtype).contiguous()
        tensors[f"{module.name}.alpha"] = torch.tensor(float(r if alpha is None else alpha)).to(dtype)
    return tensors


def kohya_metadata(family: str, rank: int, alpha: float | None = None) -> dict[str, str]:
    """The few `ss_*` keys a kohya trainer writes that detection and tools read."""
    meta = {"ss_network_module": "networks.lora_flux" if family == "flux1" else "networks.lora",
            "ss_network_dim": str(rank), "ss_network_alpha": str(alpha if alpha is not None else rank)}
    if family == "sdxl":
        meta["ss_base_model_version"] = "sdxl_base_v1-0"
    elif family == "flux1":
        meta["ss_base_model_version"] = "flux1"
    return meta


def write_lora(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Save a fixture (overwriting: fixtures live in temporary folders)."""
    from library.safetensors_io import save_tensors

    save_tensors(path, tensors, metadata=metadata, overwrite=True)
    return path


def dense_delta(tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(alpha/r)·up @ down of one kohya module, flattened to [out, in·kh·kw] — the independent oracle."""
    down = tensors[f"{name}.lora_down.weight"].to(dtype)
    up = tensors[f"{name}.lora_up.weight"].to(dtype)
    r = down.shape[0]
    alpha = tensors.get(f"{name}.alpha")
    scale = float(alpha) / r if alpha is not None else 1.0
    return scale * up.reshape(up.shape[0], r) @ down.reshape(r, -1)


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


def read_everything_or_our_error(open_reader, path) -> None:
    """Open `path` with `open_reader` and read every tensor: a `LoraToolsError` is the only allowed failure
    (what the hostile-input property tests assert); anything else propagates and fails the test."""
    from library.errors import LoraToolsError

    try:
        with open_reader(path) as reader:
            for key in reader:
                reader.get(key)
    except LoraToolsError:
        pass


# ---- one module of each adapter type, and their dense deltas from the formulas (lora_info/lora_compare) ----

SD1_TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # 768×768, BASE
SD1_IN_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # 320×320, IN01
SD1_IN_CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # 320×320×3×3, IN01
SD1_OUT_Q = "lora_unet_up_blocks_3_attentions_0_transformer_blocks_0_attn1_to_q"  # 320×320, OUT09
SD1_OUT_LOKR = "lora_unet_up_blocks_3_attentions_1_transformer_blocks_0_attn1_to_q"  # 320×320, OUT10


def mixed_sd1_lora(seed: int, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """An SD1 file with one module of each adapter type (kohya/LyCORIS key names), modules in `skip` left out."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        SD1_TE_Q: {"lora_down.weight": (4, 768), "lora_up.weight": (768, 4), "alpha": 2.0},
        SD1_IN_Q: {"lora_down.weight": (8, 320), "lora_up.weight": (320, 8), "alpha": 8.0},
        SD1_IN_CONV: {"lora_down.weight": (2, 320, 3, 3), "lora_up.weight": (320, 2, 1, 1), "alpha": 1.0},
        SD1_OUT_Q: {"hada_w1_a": (320, 2), "hada_w1_b": (2, 320), "hada_w2_a": (320, 2), "hada_w2_b": (2, 320),
                    "alpha": 1.0},
        SD1_OUT_LOKR: {"lokr_w1": (4, 4), "lokr_w2_a": (80, 2), "lokr_w2_b": (2, 80), "alpha": 1.0},
    }
    t = {}
    for name, parts in shapes.items():
        if name in skip:
            continue
        for suffix, shape in parts.items():
            t[f"{name}.{suffix}"] = torch.tensor(shape) if suffix == "alpha" else torch.randn(*shape, generator=g)
    return t


def formula_delta(t: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """ΔW flattened to [out, in·k·k] in float64, from the formulas of each adapter type."""
    d = {k[len(name) + 1:]: v.double() for k, v in t.items() if k.startswith(name + ".")}
    alpha = float(d["alpha"])
    if "lora_down.weight" in d:
        r = d["lora_down.weight"].shape[0]
        return alpha / r * d["lora_up.weight"].reshape(-1, r) @ d["lora_down.weight"].reshape(r, -1)
    if "hada_w1_a" in d:
        r = d["hada_w1_b"].shape[0]
        return alpha / r * (d["hada_w1_a"] @ d["hada_w1_b"]) * (d["hada_w2_a"] @ d["hada_w2_b"])
    r = d["lokr_w2_b"].shape[0]
    return alpha / r * torch.kron(d["lokr_w1"], d["lokr_w2_a"] @ d["lokr_w2_b"])


LORA_FORMATS = ("kohya", "diffusers", "ai-toolkit", "comfy")


def assert_round_trips(family: str, modules: dict[str, tuple[int, ...]], start: str) -> None:
    """A `family` LoRA on `modules` (diffusers names), written in format `start`, goes start → b → start through
    every other format b with its key set unchanged and its deltas equal (probe_deltas, 1e-6), and is detected
    as `family` each time."""
    from library.formats import lora_from_tensors, lora_tensors

    tensors, meta = diffusers_fixture(family, modules=modules)
    if start != "diffusers":
        tensors, meta = lora_tensors(lora_from_tensors(tensors, meta).modules, family, start)
    expected = probe_deltas(tensors, meta)
    for b in LORA_FORMATS:
        if b == start:
            continue
        lora = lora_from_tensors(tensors, meta)
        assert lora.family == family
        mid, mid_meta = lora_tensors(lora.modules, family, b)
        back, back_meta = lora_tensors(lora_from_tensors(mid, mid_meta).modules, family, start)
        assert sorted(back) == sorted(tensors), f"{start} -> {b} -> {start} changed the key set"
        assert_same_deltas(expected, probe_deltas(back, back_meta))


def assert_peft_loaded_and_fused(model, state, mods, base, *, adapter="t", reorder=None):
    """diffusers loaded `state` (our diffusers file) into `model` as adapter `adapter`: every key became one of the
    model's LoRA weights and nothing else did, and once fused each weight is base + our delta to 1e-5.
    `reorder(module, delta)` maps a delta given in our canonical row order to the model's (None: same order)."""
    from networks import adapter_from_tensors

    loaded = {k for k in model.state_dict() if ".lora_" in k}
    ours = {k[len("transformer."):].replace(".lora_A.weight", f".lora_A.{adapter}.weight")
            .replace(".lora_B.weight", f".lora_B.{adapter}.weight") for k in state}
    assert ours == loaded and len(loaded) == 2 * len(mods)
    model.fuse_lora(lora_scale=1.0)
    fused = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    for m in mods:
        key = m.source + ".weight"
        delta = adapter_from_tensors(m.tensors).delta(tuple(base[key].shape)).double()
        want = base[key].double() + (reorder(m, delta) if reorder else delta)
        assert float((fused[key].double() - want).norm() / want.norm()) < 1e-5, m.source
