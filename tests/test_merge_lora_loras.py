"""merge_lora.py without a checkpoint: concat exact to 1e-6, add and the factor-space modes against the
formulas written out here and against peft.utils.merge_utils, shuffle, block weights, metadata, bad input."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import merge_lora
from library.errors import LoraToolsError
from library.merge_methods import dare_mask
from library.safetensors_io import kohya_hashes_of_file
from tests.helpers import run_script

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # 320×320
K2 = "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k"  # 640×768
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # 320×320×3×3
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # 768×768
SHAPES = {Q: (320, 320), K2: (640, 768), CONV: (320, 320, 3, 3), TE: (768, 768)}


def run(*argv):
    return run_script(merge_lora, argv)


def make_lora(path, modules, rank, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    t = {}
    for name in modules:
        shape = SHAPES[name]
        kernel = shape[2:]
        t[f"{name}.lora_down.weight"] = torch.randn(rank, shape[1], *kernel, generator=g) / 10
        t[f"{name}.lora_up.weight"] = torch.randn(shape[0], rank, *((1, 1) if kernel else ()), generator=g) / 10
        t[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(t, str(path), metadata={"ss_network_dim": str(rank), "modelspec.title": path.stem,
                                      "ss_base_model_version": "sd_v1"})
    return t


def delta(t, name, cols=None):
    """(alpha/rank)·up@down in float64, flattened to [out, in·k·k] (only the first `cols` columns if given)."""
    down, up = t[f"{name}.lora_down.weight"].double(), t[f"{name}.lora_up.weight"].double()
    r = down.shape[0]
    alpha = float(t[f"{name}.alpha"]) if f"{name}.alpha" in t else r
    return (alpha / r) * up.reshape(up.shape[0], r) @ down.reshape(r, -1)[:, :cols]


def factors(t, name):
    r = t[f"{name}.lora_down.weight"].shape[0]
    up = t[f"{name}.lora_up.weight"].double().reshape(-1, r)
    down = t[f"{name}.lora_down.weight"].double().reshape(r, -1)
    s = float(t[f"{name}.alpha"]) / r
    return up, down, s


def test_concat_is_exact(tmp_path):
    a = make_lora(tmp_path / "a.safetensors", [Q, K2, CONV, TE], rank=8, alpha=4, seed=1)
    b = make_lora(tmp_path / "b.safetensors", [Q, CONV], rank=4, alpha=8, seed=2)
    out = tmp_path / "ab.safetensors"
    run("--models", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--ratios", 0.7, -1.2, "--save_to", out)
    merged = load_file(str(out))
    for name in SHAPES:
        expected = 0.7 * delta(a, name) + (-1.2 * delta(b, name) if f"{name}.alpha" in b else 0)
        got = delta(merged, name)
        assert torch.allclose(got, expected, rtol=0, atol=1e-6 * expected.abs().max()), name
    assert merged[f"{Q}.lora_down.weight"].shape == (12, 320)
    assert merged[f"{CONV}.lora_down.weight"].shape == (12, 320, 3, 3) and merged[f"{CONV}.lora_up.weight"].shape == (
        320, 12, 1, 1)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"  # ranks 12 and 8
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == kohya_hashes_of_file(str(out))
    assert meta["modelspec.merged_from"] == "a, b" and meta["loratools.script"] == "merge_lora.py"


def test_concat_diffusers_format_and_no_metadata(tmp_path):
    a = make_lora(tmp_path / "a.safetensors", [Q, TE], rank=4, alpha=2, seed=3)
    out = tmp_path / "d.safetensors"
    run("--models", tmp_path / "a.safetensors", "--ratios", 0.5, "--concat", "--format", "diffusers", "--no_metadata",
        "--save_to", out)
    from library.formats import read_lora

    lora = read_lora(str(out))
    assert lora.format == "diffusers" and len(lora.modules) == 2
    got = {m.source: m for m in lora.modules}
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    from networks import adapter_from_tensors

    assert torch.allclose(adapter_from_tensors(got[key].tensors).delta().double(), 0.5 * delta(a, Q), atol=1e-7)
    with safe_open(str(out), "pt") as f:
        # what a loader needs, plus the kohya hashes of the bytes written (sd-scripts keeps those too)
        assert set(f.metadata()) <= {"ss_network_dim", "ss_network_alpha", "ss_network_module",
                                     "lora_adapter_metadata", "format", "sshs_model_hash", "sshs_legacy_hash"}


def peft_factor_merge(fn, ups, downs, weights, **kw):
    """PEFT's non-SVD add_weighted_adapter, written with peft.utils.merge_utils: √|w| on up, sign·√|w| on down."""
    up_w = torch.tensor([math.sqrt(abs(w)) for w in weights], dtype=torch.float64)
    down_w = torch.tensor([math.copysign(math.sqrt(abs(w)), w) for w in weights], dtype=torch.float64)
    return fn(list(ups), up_w, **kw), fn(list(downs), down_w, **kw)


def scaled_factors(t, name):
    """Each input's scale split √s on both factors, so up@down = ΔW."""
    up, down, s = factors(t, name)
    return up * math.sqrt(s), down * math.sqrt(s)


@pytest.mark.parametrize("mode", ["add", "ties", "magnitude_prune"])
def test_factor_modes_match_peft(tmp_path, mode, capsys):
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    a = make_lora(tmp_path / "a.safetensors", [Q, TE], rank=4, alpha=2, seed=4)
    b = make_lora(tmp_path / "b.safetensors", [Q, TE], rank=4, alpha=4, seed=5)
    out = tmp_path / "m.safetensors"
    density = 0.6
    run("--models", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--ratios", 0.8, -0.4, "--mode", mode,
        "--density", density, "--save_to", out)
    assert f"{mode} is approximate" in capsys.readouterr().out
    merged = load_file(str(out))
    fn, kw = {"add": (merge_utils.task_arithmetic, {}), "ties": (merge_utils.ties, {"density": density}),
              "magnitude_prune": (merge_utils.magnitude_prune, {"density": density})}[mode]
    for name in (Q, TE):
        (ua, da), (ub, db) = scaled_factors(a, name), scaled_factors(b, name)
        up, down = peft_factor_merge(fn, [ua, ub], [da, db], [0.8, -0.4], **kw)
        assert float(merged[f"{name}.alpha"]) == 4.0  # alpha = rank: all scale is in the factors
        assert torch.allclose(merged[f"{name}.lora_up.weight"].double(), up, atol=1e-6), name
        assert torch.allclose(merged[f"{name}.lora_down.weight"].double(), down, atol=1e-6), name
    if mode == "add":  # the formula, written out without PEFT
        (ua, da), (ub, db) = scaled_factors(a, Q), scaled_factors(b, Q)
        up = math.sqrt(0.8) * ua + math.sqrt(0.4) * ub
        down = math.sqrt(0.8) * da - math.sqrt(0.4) * db
        assert torch.allclose(delta(merged, Q), up @ down, atol=1e-6)


def test_dare_modes_rescale_and_are_seeded_per_target(tmp_path):
    a = make_lora(tmp_path / "a.safetensors", [Q], rank=4, alpha=4, seed=6)
    b = make_lora(tmp_path / "b.safetensors", [Q], rank=4, alpha=4, seed=7)
    density = 0.5
    merged = {}
    for mode in ("dare_linear", "dare_ties"):
        out = tmp_path / f"{mode}.safetensors"
        run("--models", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--ratios", 1.0, 0.5, "--mode", mode,
            "--density", density, "--seed", 11, "--save_to", out)
        merged[mode] = load_file(str(out))
    target = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    ua, da, _ = factors(a, Q)
    ub, db, _ = factors(b, Q)
    # dare_linear written out: keep-mask per (seed, target, side, input), survivors ÷ density, then √|w| weights
    m = [dare_mask(ua.shape, density, 11, f"{target}.lora_up:{i}") for i in range(2)]
    up = 1.0 * ua * m[0] / density + math.sqrt(0.5) * ub * m[1] / density
    md = [dare_mask(da.shape, density, 11, f"{target}.lora_down:{i}") for i in range(2)]
    down = 1.0 * da * md[0] / density + math.sqrt(0.5) * db * md[1] / density
    assert torch.allclose(merged["dare_linear"][f"{Q}.lora_up.weight"].double(), up, atol=1e-6)
    assert torch.allclose(merged["dare_linear"][f"{Q}.lora_down.weight"].double(), down, atol=1e-6)
    # dare_ties: same masks, sign elected on the unweighted survivors, mean of the agreeing weighted ones
    kept = torch.stack([ua * m[0] / density, ub * m[1] / density])
    sign = torch.where(kept.sum(0) >= 0, 1.0, -1.0)
    agree = kept.sign() == sign
    weighted = torch.stack([kept[0] * 1.0, kept[1] * math.sqrt(0.5)])
    up_ties = (weighted * agree).sum(0) / agree.sum(0).clamp_min(1)
    assert torch.allclose(merged["dare_ties"][f"{Q}.lora_up.weight"].double(), up_ties, atol=1e-6)


def test_single_lora_keeps_its_strength_in_add_mode(tmp_path):
    a = make_lora(tmp_path / "a.safetensors", [Q, CONV], rank=4, alpha=1, seed=8)
    out = tmp_path / "s.safetensors"
    run("--models", tmp_path / "a.safetensors", "--ratios", -0.5, "--mode", "add", "--save_to", out)
    merged = load_file(str(out))
    for name in (Q, CONV):  # sd-scripts would give -0.5·|-0.5| = -0.25
        assert torch.allclose(delta(merged, name), -0.5 * delta(a, name), atol=1e-7)


def test_shuffle_keeps_the_product(tmp_path):
    make_lora(tmp_path / "a.safetensors", [Q, CONV], rank=4, alpha=2, seed=9)
    make_lora(tmp_path / "b.safetensors", [Q], rank=4, alpha=2, seed=10)
    plain, mixed = tmp_path / "p.safetensors", tmp_path / "x.safetensors"
    args = ["--models", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--ratios", 1, 0.3]
    run(*args, "--save_to", plain)
    run(*args, "--shuffle", "--seed", 3, "--save_to", mixed)
    p, x = load_file(str(plain)), load_file(str(mixed))
    for name in (Q, CONV):
        assert torch.allclose(delta(x, name), delta(p, name), atol=1e-6)
        assert not torch.allclose(x[f"{name}.lora_up.weight"], p[f"{name}.lora_up.weight"], atol=1e-3)


def test_block_weights_are_linear(tmp_path):
    a = make_lora(tmp_path / "a.safetensors", [Q, K2, TE], rank=4, alpha=4, seed=12)
    out = tmp_path / "b.safetensors"
    # IN01 (Q) 0.5, IN05 (K2) -1, BASE (TE) 0 → the TE module is dropped
    lbw = "[0, 0.5, 1, 1, -1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"
    run("--models", tmp_path / "a.safetensors", "--ratios", 0.8, "--lbws", lbw, "--save_to", out)
    merged = load_file(str(out))
    assert torch.allclose(delta(merged, Q), 0.8 * 0.5 * delta(a, Q), atol=1e-7)
    assert torch.allclose(delta(merged, K2), -0.8 * delta(a, K2), atol=1e-7)
    assert f"{TE}.lora_up.weight" not in merged


def test_flux_fused_and_split_qkv_meet_exactly(tmp_path):
    g = torch.Generator().manual_seed(13)
    fused = "lora_unet_double_blocks_0_img_attn_qkv"
    kohya = {f"{fused}.lora_down.weight": torch.randn(4, 3072, generator=g) / 50,
             f"{fused}.lora_up.weight": torch.randn(9216, 4, generator=g) / 50, f"{fused}.alpha": torch.tensor(2.0)}
    save_file(kohya, str(tmp_path / "k.safetensors"))
    split = {}
    for part in ("to_q", "to_k"):
        split[f"transformer.transformer_blocks.0.attn.{part}.lora_A.weight"] = torch.randn(2, 3072, generator=g) / 50
        split[f"transformer.transformer_blocks.0.attn.{part}.lora_B.weight"] = torch.randn(3072, 2, generator=g) / 50
    save_file(split, str(tmp_path / "d.safetensors"))
    out = tmp_path / "f.safetensors"
    run("--models", tmp_path / "k.safetensors", tmp_path / "d.safetensors", "--ratios", 1, -2, "--save_to", out)
    merged = load_file(str(out))
    cols = 256  # every row (q, k and the untouched v), a slice of the columns: enough, and quick
    expected = delta(kohya, fused, cols)
    for i, part in enumerate(("to_q", "to_k")):
        b = split[f"transformer.transformer_blocks.0.attn.{part}.lora_B.weight"].double()
        a_ = split[f"transformer.transformer_blocks.0.attn.{part}.lora_A.weight"].double()
        expected[i * 3072:(i + 1) * 3072] += -2 * b @ a_[:, :cols]  # no alpha in diffusers files: scale 1
    assert torch.allclose(delta(merged, fused, cols), expected, atol=1e-7)


def test_bad_inputs(tmp_path):
    make_lora(tmp_path / "a.safetensors", [Q, TE], rank=4, alpha=4, seed=14)
    make_lora(tmp_path / "b.safetensors", [Q], rank=8, alpha=4, seed=15)
    g = torch.Generator().manual_seed(0)
    xl = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{xl}.lora_down.weight": torch.randn(4, 1280, generator=g),
               f"{xl}.lora_up.weight": torch.randn(1280, 4, generator=g)}, str(tmp_path / "xl.safetensors"))
    dora = dict(load_file(str(tmp_path / "a.safetensors")))
    dora[f"{Q}.dora_scale"] = torch.ones(320, 1)
    save_file(dora, str(tmp_path / "dora.safetensors"))
    out = tmp_path / "out.safetensors"
    cases = [
        ((tmp_path / "a.safetensors", tmp_path / "xl.safetensors"), [], "this LoRA is not for sd1"),
        ((tmp_path / "a.safetensors", tmp_path / "xl.safetensors"), ["--family", "sdxl"], "different model families"),
        ((tmp_path / "a.safetensors", tmp_path / "b.safetensors"), ["--mode", "add"], "needs equal ranks, got \\[4, 8\\]"),
        ((tmp_path / "a.safetensors",), ["--ratios", 1, 2], "--ratios has 2 values but 1 models"),
        ((tmp_path / "a.safetensors",), ["--lbws", "ALL", "INS"], "--lbws has 2 entries but 1 models"),
        ((tmp_path / "a.safetensors",), ["--lbws", ",".join(["1"] * 12)], "12 values.*this LoRA is sd1"),
        ((tmp_path / "dora.safetensors",), [], "DoRA modules depend on the base weight"),
    ]
    for models, extra, message in cases:
        with pytest.raises(LoraToolsError, match=message):
            run("--models", *models, *extra, "--save_to", out)
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_add_reports_error_per_layer(tmp_path, capsys):
    a = make_lora(tmp_path / "a.safetensors", [Q], rank=4, alpha=4, seed=16)
    b = make_lora(tmp_path / "b.safetensors", [Q], rank=4, alpha=4, seed=17)
    out = tmp_path / "v.safetensors"
    result = run("--models", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--mode", "add", "-v",
                 "--save_to", out)
    text = capsys.readouterr().out
    assert "relative error" in text and "input_blocks.1.1.transformer_blocks.0.attn1.to_q" in text
    merged = load_file(str(out))
    exact = delta(a, Q) + delta(b, Q)
    measured = float((delta(merged, Q) - exact).norm() / exact.norm())
    (report,) = result["reports"]
    assert report.relative_error == pytest.approx(measured, rel=1e-4)
    assert json.loads(json.dumps(report.relative_error)) > 0.1  # unrelated LoRAs: cross terms are large


def test_cli_exit_status_and_one_line(tmp_path):
    """Through the real script: exit 2, one stderr line naming the file, no output."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    make_lora(tmp_path / "a.safetensors", [Q, TE], rank=4, alpha=4, seed=18)
    make_lora(tmp_path / "b.safetensors", [Q], rank=8, alpha=4, seed=19)
    out = tmp_path / "out.safetensors"
    proc = subprocess.run([sys.executable, "merge_lora.py", "--models", str(tmp_path / "a.safetensors"),
                           str(tmp_path / "b.safetensors"), "--mode", "ties", "--save_to", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "equal ranks" in lines[0] and "svd_merge_lora.py" in lines[0]
    assert not out.exists()


def test_concat_keeps_factors_bit_for_bit_when_strengths_agree(tmp_path):
    """The common strength×scale goes into alpha: equal inputs keep their fp16 factors unchanged."""
    g = torch.Generator().manual_seed(20)
    t = {f"{Q}.lora_down.weight": torch.randn(4, 320, generator=g).half(),
         f"{Q}.lora_up.weight": torch.randn(320, 4, generator=g).half(), f"{Q}.alpha": torch.tensor(3.0).half()}
    save_file(t, str(tmp_path / "h.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    out = tmp_path / "hh.safetensors"
    run("--models", tmp_path / "h.safetensors", tmp_path / "h.safetensors", "--ratios", 0.3, 0.3, "--save_to", out)
    merged = load_file(str(out))
    assert merged[f"{Q}.lora_up.weight"].dtype == torch.float16
    assert torch.equal(merged[f"{Q}.lora_up.weight"], torch.cat([t[f"{Q}.lora_up.weight"]] * 2, dim=1))
    assert torch.equal(merged[f"{Q}.lora_down.weight"], torch.cat([t[f"{Q}.lora_down.weight"]] * 2))
    assert float(merged[f"{Q}.alpha"]) == pytest.approx(0.3 * 3.0 / 4 * 8, rel=1e-7)  # alpha/8 = 0.3·(3/4)
    assert torch.allclose(delta(merged, Q), 2 * 0.3 * delta(t, Q), rtol=1e-6, atol=1e-9)
