"""ComfyUI's `.row_offset` (families-2026 §1.2 #15, §1.3): when ComfyUI splits a LoKr trained on a fused qkv and
the outer factor cannot be split at the q/k/v boundaries, each projection keeps the whole LoKr plus
`row_offset`, and its delta is rows [row_offset, row_offset + rows) of kron(w1, w2) (comfy/weight_adapter/lokr.py:
`lora_diff.narrow(0, offset, weight.shape[0])` when the product is larger than the weight).

Read (never dropped), applied exactly in conversions and merges (float64 kron written here), kept on round trips,
and the three windows of one product fused back into that LoKr where the output names the fused weight.
"""

from __future__ import annotations

import pytest
import torch

import merge_lora
from library.errors import LoraToolsError
from library.formats import lora_from_tensors, lora_tensors
from library.safetensors_io import load_tensors, save_tensors
from networks import adapter_from_tensors
from tests.helpers import probe_deltas, run_script

H = 3072
ALPHA, RANK = 1.5, 3


def fused_lokr(rows: int, cols: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A LoKr on a [rows, cols] fused weight with w1 [2, 2] (so the block rows/2 does not divide rows/3: the q/k/v
    boundaries cut through it) and a rank-3 w2; and its float64 delta."""
    g = torch.Generator().manual_seed(seed)
    t = {"lokr_w1": torch.randn(2, 2, generator=g), "lokr_w2_a": torch.randn(rows // 2, RANK, generator=g) * 0.1,
         "lokr_w2_b": torch.randn(RANK, cols // 2, generator=g) * 0.1, "alpha": torch.tensor(ALPHA)}
    delta = torch.kron(t["lokr_w1"].double(), t["lokr_w2_a"].double() @ t["lokr_w2_b"].double()) * (ALPHA / RANK)
    return t, delta


def comfy_split(prefix: str, names: list[str], t: dict[str, torch.Tensor], height: int, keep=None):
    """What ComfyUI's convert_fused_qkv_lora writes: the whole LoKr under each projection, plus its row_offset."""
    out = {}
    for i, name in enumerate(names):
        if keep is not None and i not in keep:
            continue
        out.update({f"{prefix}{name}.{k}": v for k, v in t.items()})
        out[f"{prefix}{name}.row_offset"] = torch.tensor(i * height)
    return out


FLUX_QKV = ["to_q", "to_k", "to_v"]


def test_windows_read_exactly_and_fuse_back_into_the_lokr():
    t, delta = fused_lokr(3 * H, H)
    lora = lora_from_tensors(comfy_split("transformer.transformer_blocks.0.attn.", FLUX_QKV, t, H), {}, "flux1")
    assert [m.target.rows for m in lora.modules] == [(0, H), (H, 2 * H), (2 * H, 3 * H)]
    for m in lora.modules:
        s, e = m.target.rows
        adapter = adapter_from_tensors(m.tensors)
        got = adapter.delta(m.target.shape).double()
        assert float((got - delta[s:e]).norm() / delta[s:e].norm()) < 1e-6
        up, down = adapter.exact_factors()  # the factored routes (svd_merge, resize) see the window too
        assert float((up @ down * adapter.scale - delta[s:e]).norm() / delta[s:e].norm()) < 1e-12
    # kohya names the fused qkv: the three windows are that one LoKr again, bit for bit, without row_offset
    kohya, _ = lora_tensors(lora.modules, "flux1", "kohya")
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    assert sorted(kohya) == sorted(f"{name}.{k}" for k in t)
    assert all(kohya[f"{name}.{k}"].equal(v) for k, v in t.items())
    # PEFT has no LoKr: each window becomes its exact LoRA
    peft, meta = lora_tensors(lora.modules, "flux1", "diffusers")
    probes = probe_deltas(peft, meta)
    x = torch.randn(H, 2, generator=torch.Generator().manual_seed(7 + H), dtype=torch.float64)
    for i, proj in enumerate(FLUX_QKV):
        want = delta[i * H:(i + 1) * H] @ x
        got = probes[f"transformer.transformer_blocks.0.attn.{proj}"]
        assert float((got - want).norm() / want.norm()) < 1e-6


def test_round_trip_keeps_row_offset():
    """SDXL's OpenCLIP text encoder: one fused in_proj, written by kohya as q_proj/k_proj/v_proj."""
    t, _ = fused_lokr(3 * 1280, 1280, seed=1)
    src = comfy_split("lora_te2_text_model_encoder_layers_0_self_attn_", ["q_proj", "k_proj", "v_proj"], t, 1280)
    lora = lora_from_tensors(src, {}, "sdxl")
    assert len(lora.modules) == 3
    out, _ = lora_tensors(lora.modules, "sdxl", "kohya")
    assert sorted(out) == sorted(src)
    for k, v in src.items():
        assert out[k].equal(v) and out[k].dtype == v.dtype, k


def test_merge_applies_each_window_to_its_rows(tmp_path):
    t, delta = fused_lokr(3 * H, H, seed=2)
    save_tensors(tmp_path / "lokr.safetensors",
                 comfy_split("transformer.transformer_blocks.0.attn.", FLUX_QKV, t, H, keep={0, 2}))  # q and v only
    g = torch.Generator().manual_seed(3)
    base = {"double_blocks.0.img_attn.qkv.weight": torch.randn(3 * H, H, generator=g) * 0.02,
            "double_blocks.0.img_attn.qkv.bias": torch.zeros(3 * H)}
    save_tensors(tmp_path / "flux.safetensors", base)
    run_script(merge_lora, ["--sd_model", tmp_path / "flux.safetensors", "--models", tmp_path / "lokr.safetensors",
                            "--ratios", "0.6", "--family", "flux1", "--save_to", tmp_path / "out.safetensors"])
    out, _ = load_tensors(tmp_path / "out.safetensors")
    want = base["double_blocks.0.img_attn.qkv.weight"].double().clone()
    want[:H] += 0.6 * delta[:H]
    want[2 * H:] += 0.6 * delta[2 * H:]
    got = out["double_blocks.0.img_attn.qkv.weight"].double()
    assert float((got - want).norm() / (want - base["double_blocks.0.img_attn.qkv.weight"]).norm()) < 1e-5
    assert got[H:2 * H].equal(base["double_blocks.0.img_attn.qkv.weight"][H:2 * H].double())  # k untouched


def test_row_offset_is_never_dropped_silently():
    t, _ = fused_lokr(3 * H, H)
    bad = comfy_split("transformer.transformer_blocks.0.attn.", FLUX_QKV, t, H)
    bad["transformer.transformer_blocks.0.attn.to_v.row_offset"] = torch.tensor(2 * H + 1)  # past the product
    with pytest.raises(LoraToolsError, match="falls outside the LoKr's 9216 rows"):
        lora_from_tensors(bad, {}, "flux1")
    g = torch.Generator().manual_seed(0)
    plain = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, H, generator=g),
             "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(H, 2, generator=g),
             "transformer.transformer_blocks.0.attn.to_q.row_offset": torch.tensor(0)}
    with pytest.raises(LoraToolsError, match="row_offset"):
        lora_from_tensors(plain, {}, "flux1")


def test_linear1_qkv_alias_is_the_first_three_widths_of_linear1():
    """ComfyUI maps `single_blocks.N.linear1_qkv` onto rows [0, 3·3072) of `linear1` (comfy/lora.py)."""
    from tests.helpers import dense_delta

    g = torch.Generator().manual_seed(5)
    name = "diffusion_model.single_blocks.3.linear1_qkv"
    src = {f"{name}.lora_down.weight": torch.randn(2, H, generator=g), f"{name}.lora_up.weight":
           torch.randn(3 * H, 2, generator=g), f"{name}.alpha": torch.tensor(1.0)}
    lora = lora_from_tensors(src, {}, "flux1")
    assert [m.target.describe() for m in lora.modules] == [f"single_blocks.3.linear1.weight[0:{3 * H}]"]
    kohya, _ = lora_tensors(lora.modules, "flux1", "kohya")
    got = dense_delta(kohya, "lora_unet_single_blocks_3_linear1")
    assert got.shape == (7 * H, H) and not got[3 * H:].any()
    want = dense_delta(src, name)
    assert float((got[:3 * H] - want).norm() / want.norm()) < 1e-12
