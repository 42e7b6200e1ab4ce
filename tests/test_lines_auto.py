"""LiNeS block weights (`--lbws LINES(α, β)`) and `--ratios auto`, against formulas written out here.

LiNeS (Wang et al., ICLR 2025): the update of layer ℓ = 1 … L is scaled by α + β·(ℓ − 1)/(L − 1); the layers
are the webui blocks in forward order (text encoders and weights outside every block keep 1).
--ratios auto: rᵢ = mean(N) / Nᵢ with Nᵢ = the Frobenius norm of file i's whole delta.
"""

from __future__ import annotations

import math

import pytest
import torch

from library.auto_ratios import adapter_sq_norm, auto_ratios, lora_norm
from library.block_weights import parse_block_weights
from library.safetensors_io import load_tensors
from networks import adapter_from_tensors
from tests.helpers import dense_delta, kohya_metadata, make_lora, run_cli_status, run_script, sdxl_modules, write_lora

pytestmark = pytest.mark.usefixtures("one_thread")

SDXL_DEPTH = [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
FLUX_DEPTH = ["IN"] + [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)] + ["OUT"]


def lines(alpha, beta, block, order):
    return alpha + beta * order.index(block) / (len(order) - 1)


def test_lines_values_by_depth():
    bw = parse_block_weights("LINES(0.2, 0.6)")
    unet = "model.diffusion_model."
    cases = {f"{unet}input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": "IN04",
             f"{unet}middle_block.1.transformer_blocks.0.attn1.to_q.weight": "M00",
             f"{unet}output_blocks.8.0.in_layers.2.weight": "OUT08",
             f"{unet}input_blocks.0.0.weight": "IN00"}
    for key, block in cases.items():
        assert bw.weight("sdxl", key) == pytest.approx(lines(0.2, 0.6, block, SDXL_DEPTH), abs=1e-12), key
    assert bw.weight("sdxl", "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight") == 1.0
    assert bw.weight("sdxl", f"{unet}time_embed.0.weight") == 1.0  # outside every block, as the webui
    flux = {"double_blocks.0.img_attn.qkv.weight": "D00", "single_blocks.37.linear1.weight": "S37",
            "final_layer.linear.weight": "OUT", "img_in.weight": "IN"}
    for key, block in flux.items():
        assert bw.weight("flux1", key) == pytest.approx(lines(0.2, 0.6, block, FLUX_DEPTH), abs=1e-12), key
    default = parse_block_weights("LINES")
    assert default.lines == (0.5, 0.5) and default.weight("sdxl", f"{unet}output_blocks.8.0.in_layers.2.weight") == 1.0
    with pytest.raises(Exception, match="LINES takes two numbers"):
        parse_block_weights("LINES(a, 1)")


def test_lines_in_svd_merge_scales_each_layer(tmp_path):
    import svd_merge_lora

    modules = sdxl_modules(blocks=["input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                                   "output_blocks_5_1_transformer_blocks_0_attn1_to_q"], te2=False)[:2]
    modules += sdxl_modules("none", te2=False)[:1]  # CLIP-L: BASE, strength 1
    a = make_lora(modules, 4, alpha=2, seed=1, dtype=torch.float32)
    pa = write_lora(str(tmp_path / "a.safetensors"), a, kohya_metadata("sdxl", 4, 2))
    out = tmp_path / "o.safetensors"
    run_script(svd_merge_lora, ["--models", pa, "--ratios", "0.8", "--lbws", "LINES(0.2, 0.6)", "--new_rank", "8",
                                "--save_to", out, "--save_precision", "float"])
    got, _ = load_tensors(str(out))
    want = {modules[0].name: lines(0.2, 0.6, "IN04", SDXL_DEPTH), modules[1].name: lines(0.2, 0.6, "OUT05", SDXL_DEPTH),
            modules[2].name: 1.0}
    for name, lam in want.items():
        exact = 0.8 * lam * dense_delta(a, name)
        assert float((dense_delta(got, name) - exact).norm() / exact.norm()) < 1e-5, name


def test_adapter_norms_from_factors_equal_dense():
    g = torch.Generator().manual_seed(3)
    lo = {"lora_up.weight": torch.randn(20, 3, 1, 1, generator=g), "lora_down.weight": torch.randn(3, 6, 3, 3, generator=g),
          "alpha": torch.tensor(1.5)}
    want = (0.5 * lo["lora_up.weight"].double().reshape(20, 3) @ lo["lora_down.weight"].double().reshape(3, -1))
    assert adapter_sq_norm(adapter_from_tensors(lo, "x"), (20, 6, 3, 3)) == pytest.approx(float(want.square().sum()),
                                                                                            rel=1e-9)
    ha = {"hada_w1_a": torch.randn(20, 2, generator=g), "hada_w1_b": torch.randn(2, 16, generator=g),
          "hada_w2_a": torch.randn(20, 2, generator=g), "hada_w2_b": torch.randn(2, 16, generator=g),
          "alpha": torch.tensor(1.0)}
    d = 0.5 * (ha["hada_w1_a"].double() @ ha["hada_w1_b"].double()) * (ha["hada_w2_a"].double() @ ha["hada_w2_b"].double())
    assert adapter_sq_norm(adapter_from_tensors(ha, "x"), (20, 16)) == pytest.approx(float(d.square().sum()), rel=1e-9)
    kr = {"lokr_w1": torch.randn(4, 2, generator=g), "lokr_w2_a": torch.randn(5, 2, generator=g),
          "lokr_w2_b": torch.randn(2, 8, generator=g), "alpha": torch.tensor(1.0)}
    w2 = kr["lokr_w2_a"].double() @ kr["lokr_w2_b"].double()
    k = 0.5 * torch.einsum("ij,kl->ikjl", kr["lokr_w1"].double(), w2).reshape(20, 16)
    assert adapter_sq_norm(adapter_from_tensors(kr, "x"), (20, 16)) == pytest.approx(float(k.square().sum()), rel=1e-9)


def test_ratios_auto_in_svd_merge(tmp_path, capsys):
    import svd_merge_lora
    from library.inputs import read_loras

    modules = sdxl_modules("none", te2=False)[:3]
    a = make_lora(modules, 4, alpha=1, seed=1, dtype=torch.float32)  # scale 1/4: a small delta
    b = make_lora(modules, 4, seed=2, dtype=torch.float32)
    pa = write_lora(str(tmp_path / "a.safetensors"), a, kohya_metadata("sdxl", 4, 1))
    pb = write_lora(str(tmp_path / "b.safetensors"), b, kohya_metadata("sdxl", 4))
    norms = [math.sqrt(sum(float(dense_delta(t, m.name).square().sum()) for m in modules)) for t in (a, b)]
    mean = sum(norms) / 2
    ratios = [mean / n for n in norms]
    loras = read_loras([pa, pb])
    assert [lora_norm(x) for x in loras] == pytest.approx(norms, rel=1e-9)
    assert auto_ratios(loras, [pa, pb]) == pytest.approx(ratios, rel=1e-9)
    out = tmp_path / "o.safetensors"
    run_script(svd_merge_lora, ["--models", pa, pb, "--ratios", "auto", "--new_rank", "8", "--save_to", out,
                                "--save_precision", "float"])
    assert "--ratios auto" in capsys.readouterr().out
    got, _ = load_tensors(str(out))
    for m in modules:
        exact = ratios[0] * dense_delta(a, m.name) + ratios[1] * dense_delta(b, m.name)
        assert float((dense_delta(got, m.name) - exact).norm() / exact.norm()) < 1e-5
    status, captured = run_cli_status(svd_merge_lora, ["--models", pa, pb, "--ratios", "auto", "1", "--save_to",
                                                       str(tmp_path / "x.safetensors")], capsys)
    assert status == 2 and "--ratios auto stands alone" in captured.err
