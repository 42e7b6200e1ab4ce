"""resize: library/resize.py against float64 SVDs of the deltas computed here; resize_lora.py end to end."""

import math

import pytest
import torch

from library.errors import LoraToolsError
from library.resize import ResizeJob, ResizeSettings, resize_layers
from networks import adapter_from_tensors

# Real SDXL kohya names, widths scaled down 10× (ratios kept) so the suite stays fast.
LINEAR = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # 640×640
FF = "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj"  # 5120×640
CONV = "lora_unet_input_blocks_1_0_in_layers_2"  # 320×320×3×3


def gen(seed):
    return torch.Generator().manual_seed(seed)


def lora_tensors(out, inp, rank, alpha, seed, kernel=None, dtype=torch.float32):
    g = gen(seed)
    if kernel:
        down = torch.randn(rank, inp, *kernel, generator=g) / 8
        up = torch.randn(out, rank, 1, 1, generator=g) / 8
    else:
        down, up = torch.randn(rank, inp, generator=g) / 8, torch.randn(out, rank, generator=g) / 8
    return {"lora_down.weight": down.to(dtype), "lora_up.weight": up.to(dtype), "alpha": torch.tensor(float(alpha))}


def lora_with_spectrum(out, inp, spectrum, alpha=None):
    """A LoRA whose delta (with scale alpha/r) has exactly these singular values.

    Coordinate vectors as singular vectors (a permutation, so not trivially diagonal): QR and SVD of such
    factors are exact in float32, so hand-made ties stay exact ties.
    """
    r = len(spectrum)
    scale = 1.0 if alpha is None else alpha / r
    up = torch.zeros(out, r)
    down = torch.zeros(r, inp)
    for i, s in enumerate(spectrum):
        up[(3 * i + 1) % out, i] = s / scale
        down[i, (5 * i + 2) % inp] = 1.0
    tensors = {"lora_up.weight": up, "lora_down.weight": down}
    if alpha is not None:
        tensors["alpha"] = torch.tensor(float(alpha))
    return tensors


def delta64(tensors):
    """(α/r)·up@down in float64, flattened, written out independently of networks/."""
    down, up = tensors["lora_down.weight"].double(), tensors["lora_up.weight"].double()
    r = down.shape[0]
    alpha = float(tensors["alpha"]) if "alpha" in tensors else r
    return (alpha / r) * up.reshape(up.shape[0], r) @ down.reshape(r, -1)


def job(name, tensors, shape):
    return ResizeJob(name, tuple(shape), adapter_from_tensors(tensors, name))


def run(jobs, **settings):
    return resize_layers(jobs, ResizeSettings(**settings))


def test_fixed_rank_is_the_optimal_truncation_and_keeps_the_scale():
    modules = {LINEAR: (lora_tensors(64, 64, 8, 4, 1), (64, 64)),
               FF: (lora_tensors(512, 64, 8, 8, 2), (512, 64)),
               CONV: (lora_tensors(32, 32, 8, 1, 3, kernel=(3, 3)), (32, 32, 3, 3))}
    results = run([job(n, t, s) for n, (t, s) in modules.items()], new_rank=3)
    for name, (tensors, shape) in modules.items():
        out = results[name].tensors
        dense = delta64(tensors)
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        optimal = (U[:, :3] * S[:3]) @ Vh[:3]
        assert out["lora_down.weight"].shape == ((3, *shape[1:]) if len(shape) == 4 else (3, shape[1]))
        assert out["lora_up.weight"].shape == ((shape[0], 3, 1, 1) if len(shape) == 4 else (shape[0], 3))
        alpha = float(out["alpha"])
        old_scale = float(tensors["alpha"]) / 8
        assert alpha == pytest.approx(old_scale * 3)  # alpha/rank unchanged
        got = alpha / 3 * out["lora_up.weight"].reshape(shape[0], 3).double() @ out["lora_down.weight"].reshape(3, -1).double()
        assert float((got - optimal).norm() / optimal.norm()) < 1e-5
        report = results[name].report
        assert report["rank_in"] == 8 and report["rank_out"] == 3
        assert report["fro_retained"] == pytest.approx(float(S[:3].norm() / S.norm()), rel=1e-5)
        assert report["relative_error"] == pytest.approx(float(S[3:].norm() / S.norm()), rel=1e-4)
        assert report["max_sv_ratio"] == pytest.approx(float(S[0] / S[2]), rel=1e-5)


def test_batched_layers_match_one_at_a_time():
    tensors = [lora_tensors(64, 64, 8, 4, seed) for seed in range(4)]
    together = run([job(f"{LINEAR}_{i}", t, (64, 64)) for i, t in enumerate(tensors)], new_rank=5)
    for i, t in enumerate(tensors):
        alone = run([job(f"{LINEAR}_{i}", t, (64, 64))], new_rank=5)[f"{LINEAR}_{i}"]
        a = alone.tensors["lora_up.weight"] @ alone.tensors["lora_down.weight"]
        b = together[f"{LINEAR}_{i}"].tensors["lora_up.weight"] @ together[f"{LINEAR}_{i}"].tensors["lora_down.weight"]
        assert torch.allclose(a, b, atol=1e-6)


def test_rank_is_never_raised_above_the_input():
    result = run([job(LINEAR, lora_tensors(64, 64, 4, 4, 5), (64, 64))], new_rank=16)[LINEAR]
    assert result.tensors["lora_down.weight"].shape[0] == 4 and result.report["relative_error"] < 1e-5


def expected_dynamic_rank(s, method, p, cap):
    """sd-scripts' formulas (without its +1) written out on a plain list of singular values."""
    if s[0] == 0:
        return 1
    if method == "sv_ratio":
        k = sum(1 for x in s if p > 0 and x > s[0] / p)
    else:
        vals = [x * x for x in s] if method == "sv_fro" else list(s)
        target = p * p if method == "sv_fro" else p
        total, running, k = sum(vals), 0.0, len(vals)
        for i, v in enumerate(vals):
            running += v
            if running / total >= target:
                k = i + 1
                break
    return max(1, min(k, cap))


SPECTRA = {
    "decay": [8.0, 4.0, 2.0, 1.0, 0.5, 0.25],
    "ties": [2.0, 2.0, 2.0, 2.0],
    "rank1": [3.0],
}


@pytest.mark.parametrize("method,param", [("sv_ratio", 4.0), ("sv_ratio", 1.0), ("sv_ratio", 0.0), ("sv_ratio", 10.0),
                                          ("sv_fro", 0.9), ("sv_fro", 1.0), ("sv_fro", 0.0), ("sv_fro", 0.5),
                                          ("sv_cumulative", 0.5), ("sv_cumulative", 1.0), ("sv_cumulative", 0.0),
                                          ("sv_cumulative", 12 / 15.75)])
@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_dynamic_methods_pick_the_formula_rank(method, param, spectrum):
    s = SPECTRA[spectrum]
    tensors = lora_with_spectrum(48, 40, s, alpha=2.0 * len(s))  # scale 2: exact in binary
    result = run([job(LINEAR, tensors, (48, 40))], new_rank=5, dynamic_method=method, dynamic_param=param)[LINEAR]
    assert result.report["rank_out"] == expected_dynamic_rank(s, method, param, cap=5)


def test_all_zero_layer_keeps_a_zero_rank_one_pair():
    tensors = {"lora_down.weight": torch.zeros(4, 40), "lora_up.weight": torch.zeros(48, 4), "alpha": torch.tensor(4.0)}
    for method in (None, "sv_fro", "sv_ratio", "sv_cumulative"):
        result = run([job(LINEAR, tensors, (48, 40))], new_rank=3, dynamic_method=method,
                     dynamic_param=None if method is None else 0.9)[LINEAR]
        expected = 3 if method is None else 1
        assert result.report["rank_out"] == expected
        assert float(result.tensors["lora_up.weight"].abs().sum()) == 0.0
        assert result.report["fro_retained"] == 1.0 and result.report["relative_error"] == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    tensors = lora_tensors(64, 64, 8, 8, 7, dtype=dtype)
    result = run([job(LINEAR, tensors, (64, 64))], new_rank=4, alpha_dtype=dtype)[LINEAR]
    dense = delta64(tensors)  # of the stored half values
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    optimal = (U[:, :4] * S[:4]) @ Vh[:4]
    out = result.tensors
    alpha = float(out["alpha"].to(dtype))  # what a save in `dtype` stores
    got = alpha / 4 * out["lora_up.weight"].double() @ out["lora_down.weight"].double()
    assert float((got - optimal).norm() / optimal.norm()) < 1e-5


def loha_tensors(out, inp, r, seed):
    g = gen(seed)
    return {"hada_w1_a": torch.randn(out, r, generator=g) / 4, "hada_w1_b": torch.randn(r, inp, generator=g) / 4,
            "hada_w2_a": torch.randn(out, r, generator=g) / 4, "hada_w2_b": torch.randn(r, inp, generator=g) / 4,
            "alpha": torch.tensor(float(r))}


def test_loha_becomes_a_near_optimal_plain_lora():
    tensors = loha_tensors(96, 80, 4, 8)
    dense = ((tensors["hada_w1_a"].double() @ tensors["hada_w1_b"].double())
             * (tensors["hada_w2_a"].double() @ tensors["hada_w2_b"].double()))  # alpha = r: scale 1
    result = run([job(LINEAR, tensors, (96, 80))], new_rank=6)[LINEAR]
    out = result.tensors
    assert set(out) == {"lora_down.weight", "lora_up.weight", "alpha"} and float(out["alpha"]) == 6.0
    S = torch.linalg.svdvals(dense)
    err = float((dense - out["lora_up.weight"].double() @ out["lora_down.weight"].double()).norm())
    assert err <= 1.01 * float(S[6:].norm())
    assert result.report["relative_error"] == pytest.approx(err / float(dense.norm()), rel=1e-3)
    # rank ≤ r² = 16: a larger request stops there, and is then exact.
    full = run([job(LINEAR, tensors, (96, 80))], new_rank=40)[LINEAR]
    assert full.report["rank_out"] == 16 and full.report["relative_error"] < 1e-4


def test_lokr_conv_becomes_a_plain_locon():
    g = gen(9)
    w1 = torch.randn(4, 4, generator=g)
    w2 = torch.randn(8, 8, 3, 3, generator=g) / 4
    tensors = {"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(1.0)}
    dense = torch.kron(w1.double()[:, :, None, None], w2.double()).reshape(32, -1)  # both full: scale 1
    result = run([job(CONV, tensors, (32, 32, 3, 3))], new_rank=4, new_conv_rank=10)[CONV]
    out = result.tensors
    assert out["lora_down.weight"].shape == (10, 32, 3, 3) and out["lora_up.weight"].shape == (32, 10, 1, 1)
    got = out["lora_up.weight"].reshape(32, 10).double() @ out["lora_down.weight"].reshape(10, -1).double()
    S = torch.linalg.svdvals(dense)
    assert float((dense - got).norm()) <= 1.02 * float(S[10:].norm())


def test_tucker_locon_becomes_a_plain_locon():
    g = gen(12)
    down, mid = torch.randn(6, 16, 1, 1, generator=g), torch.randn(6, 6, 3, 3, generator=g)
    up = torch.randn(24, 6, 1, 1, generator=g)
    tensors = {"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up, "alpha": torch.tensor(3.0)}
    # ΔW[o,i,h,w] = (α/r)·Σ_ab up[o,a]·mid[a,b,h,w]·down[b,i]
    dense = 0.5 * torch.einsum("oa,abhw,bi->oihw", up.double()[:, :, 0, 0], mid.double(), down.double()[:, :, 0, 0])
    dense = dense.reshape(24, -1)
    result = run([job(CONV, tensors, (24, 16, 3, 3))], new_rank=4)[CONV]
    out = result.tensors
    assert out["lora_down.weight"].shape == (4, 16, 3, 3) and "lora_mid.weight" not in out
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    up_k, down_k = out["lora_up.weight"].reshape(24, 4).double(), out["lora_down.weight"].reshape(4, -1).double()
    got = float(out["alpha"]) / 4 * up_k @ down_k
    assert float((got - (U[:, :4] * S[:4]) @ Vh[:4]).norm() / dense.norm()) < 1e-5


def test_dora_needs_the_base_weight():
    tensors = lora_tensors(64, 64, 4, 4, 10)
    tensors["dora_scale"] = torch.rand(64, 1) + 0.5
    with pytest.raises(LoraToolsError, match="base"):
        run([job(LINEAR, tensors, (64, 64))], new_rank=2)
    base = torch.randn(64, 64, generator=gen(11)).double()
    adapter = adapter_from_tensors(tensors, LINEAR)
    result = resize_layers([ResizeJob(LINEAR, (64, 64), adapter, base.float())], ResizeSettings(new_rank=64))[LINEAR]
    # At full rank the plain LoRA reproduces the DoRA-adjusted weight exactly.
    d = delta64(tensors)
    merged = base + d
    expected = merged * (tensors["dora_scale"].double() / merged.norm(dim=1, keepdim=True)) - base
    out = result.tensors
    got = float(out["alpha"]) / out["lora_down.weight"].shape[0] * out["lora_up.weight"].double() @ \
        out["lora_down.weight"].double()
    assert float((got - expected).norm() / expected.norm()) < 1e-5


def test_remove_conv_and_linear_dims():
    jobs = [job(LINEAR, lora_tensors(64, 64, 4, 4, 1), (64, 64)),
            job(CONV, lora_tensors(32, 32, 4, 4, 2, kernel=(3, 3)), (32, 32, 3, 3))]
    assert set(run(jobs, new_rank=2, remove_conv=True)) == {LINEAR}
    assert set(run(jobs, new_rank=2, remove_linear=True)) == {CONV}
    with pytest.raises(LoraToolsError):
        ResizeSettings(new_rank=0)
    with pytest.raises(LoraToolsError):
        ResizeSettings(dynamic_method="sv_fro")
    with pytest.raises(LoraToolsError):
        ResizeSettings(dynamic_method="sv_magic", dynamic_param=1.0)


def test_new_conv_rank_applies_to_kxk_convs_only():
    jobs = [job(LINEAR, lora_tensors(64, 64, 8, 4, 1), (64, 64)),
            job(CONV, lora_tensors(32, 32, 8, 4, 2, kernel=(3, 3)), (32, 32, 3, 3))]
    results = run(jobs, new_rank=2, new_conv_rank=5)
    assert results[LINEAR].report["rank_out"] == 2 and results[CONV].report["rank_out"] == 5
    assert math.isclose(float(results[CONV].tensors["alpha"]), 4 / 8 * 5)


# ---------------------------------------------------------------------------------------------------------
# resize_lora.py end to end (needs library/formats' read_lora)

SDXL_FILE_MODULES = {  # real kohya names and full SDXL shapes, small ranks
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (640, 2048),
    "lora_unet_input_blocks_1_0_in_layers_2": (320, 320, 3, 3),
}


def formats_or_skip():
    formats = pytest.importorskip("library.formats")
    if not hasattr(formats, "read_lora"):
        pytest.skip("library/formats has no read_lora yet")
    return formats


def write_sdxl_lora(path, dtype=torch.float16):
    from library.safetensors_io import save_tensors

    tensors = {}
    for i, (name, shape) in enumerate(SDXL_FILE_MODULES.items()):
        t = lora_tensors(shape[0], shape[1], 8, 4, 20 + i, kernel=shape[2:] or None, dtype=dtype)
        for suffix, value in t.items():
            tensors[f"{name}.{suffix}"] = value.to(dtype)
    save_tensors(str(path), tensors, {"ss_network_dim": "8", "ss_network_alpha": "4", "ss_training_comment": "hi",
                                      "ss_base_model_version": "sdxl_base_v1-0"})
    return tensors


def run_script(argv):
    import resize_lora
    from tests import helpers

    return helpers.run_script(resize_lora, argv)


def test_script_fixed_rank_end_to_end(tmp_path):
    formats_or_skip()
    from library.safetensors_io import load_tensors

    src, dst, rep = tmp_path / "in.safetensors", tmp_path / "out.safetensors", tmp_path / "r.json"
    tensors = write_sdxl_lora(src)
    run_script(["--model", str(src), "--save_to", str(dst), "--new_rank", "3", "--new_conv_rank", "2",
                "--family", "sdxl", "--report", str(rep), "--verbose", "--device", "cpu"])
    out, meta = load_tensors(str(dst))
    assert set(out) == set(tensors)
    for name, shape in SDXL_FILE_MODULES.items():
        k = 2 if len(shape) == 4 else 3
        down, up, alpha = out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"], out[f"{name}.alpha"]
        assert down.dtype == torch.float16 and down.shape[0] == k and up.shape[1] == k
        assert float(alpha) == pytest.approx(4 / 8 * k)
        dense = delta64({s: tensors[f"{name}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha")})
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        optimal = (U[:, :k] * S[:k]) @ Vh[:k]
        got = float(alpha) / k * up.double().reshape(shape[0], k) @ down.double().reshape(k, -1)
        assert float((got - optimal).norm() / optimal.norm()) < 2e-3  # fp16 storage of the factors
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"
    assert meta["ss_training_comment"].startswith("dimension is resized from 8 to 3 (conv: 2); ")
    import json

    report = json.loads(rep.read_text())
    assert len(report["layers"]) == 3 and report["summary"]["file_size_after"] < report["summary"]["file_size_before"]
    assert all(0 < layer["fro_retained"] <= 1 for layer in report["layers"])


def test_script_dynamic_and_refusals(tmp_path):
    formats_or_skip()
    from library.safetensors_io import load_tensors

    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    write_sdxl_lora(src, dtype=torch.bfloat16)
    result = run_script(["--model", str(src), "--save_to", str(dst), "--new_rank", "6", "--dynamic_method", "sv_fro",
                         "--dynamic_param", "0.5", "--family", "sdxl", "--save_precision", "fp32", "--device", "cpu"])
    out, meta = load_tensors(str(dst))
    assert all(t.dtype == torch.float32 for t in out.values())
    assert meta["ss_training_comment"].startswith("Dynamic resize with sv_fro: 0.5 from 8; ")
    assert all(1 <= layer["rank_out"] <= 6 for layer in result["layers"])
    with pytest.raises(LoraToolsError):  # never overwrite the input
        run_script(["--model", str(src), "--save_to", str(src), "--family", "sdxl", "--overwrite"])
    with pytest.raises(LoraToolsError):
        run_script(["--model", str(src), "--save_to", str(tmp_path / "x.safetensors"), "--dynamic_method", "sv_fro",
                    "--family", "sdxl"])
    assert not (tmp_path / "x.safetensors").exists()


def test_script_real_lokr_file(tmp_path):
    formats_or_skip()
    import os

    from library.safetensors_io import load_tensors, save_tensors
    from tests.helpers import SHARED_DATA

    path = os.path.join(SHARED_DATA, "real-loras", "LyCORIS__smart_falcon_4_lokr.safetensors")
    if not os.path.exists(path):
        pytest.skip(f"real LoKr file absent: {path}")
    # A slice of the real file (its names, shapes and metadata; a 3×3 conv, UNet and text-encoder attention).
    tensors, meta = load_tensors(path)
    keep = ("lora_unet_down_blocks_0_downsamplers_0_conv", "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj")
    subset = {k: v for k, v in tensors.items() if k.split(".")[0] in keep}
    assert len({k.split(".")[0] for k in subset}) == len(keep)
    src, dst = tmp_path / "lokr.safetensors", tmp_path / "out.safetensors"
    save_tensors(str(src), subset, meta)
    result = run_script(["--model", str(src), "--save_to", str(dst), "--new_rank", "8", "--device", "cpu", "--family", "sd1"])
    assert result["summary"]["layers"] == 3 and all(r["rank_out"] == 8 for r in result["layers"])
    assert {r["route"] for r in result["layers"]} == {"factored"}  # exact rank-16 factors (library.exact_lowrank)
    out, out_meta = load_tensors(str(dst))
    assert out_meta["ss_network_dim"] == "8" and any(k.endswith("lora_up.weight") for k in out)
    # Each layer: the written LoRA is within 2% of the optimal rank-8 error of the real LoKr delta.
    for r in result["layers"]:
        adapter = adapter_from_tensors({s: subset[f"{r['target']}.{s}"] for s in
                                        ("alpha", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")}, r["target"])
        dense = adapter.delta(tuple(r["shape"])).double().reshape(r["shape"][0], -1)
        S = torch.linalg.svdvals(dense)
        up = out[f"{r['target']}.lora_up.weight"].double().reshape(r["shape"][0], 8)
        down = out[f"{r['target']}.lora_down.weight"].double().reshape(8, -1)
        err = float((dense - float(out[f"{r['target']}.alpha"]) / 8 * up @ down).norm())
        assert err <= 1.02 * float(S[8:].norm()) + 1e-6 * float(S[0])


def run_cli_lines(argv, capsys):
    """resize_lora.py through run_cli: (exit status, stderr lines)."""
    import resize_lora
    from library.cli import run_cli

    with pytest.raises(SystemExit) as info:
        run_cli(resize_lora.setup_parser, resize_lora.main, argv)
    return info.value.code, capsys.readouterr().err.strip().splitlines()


def test_script_refuses_nonfinite_tensors_naming_file_and_tensors(tmp_path, capsys):
    formats_or_skip()
    from library.safetensors_io import save_tensors

    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    tensors = write_sdxl_lora(src)
    names = list(SDXL_FILE_MODULES)
    tensors[f"{names[0]}.lora_up.weight"][3, 1] = float("nan")
    tensors[f"{names[2]}.lora_down.weight"][0, 0, 1, 1] = float("inf")
    save_tensors(str(src), tensors, {"ss_base_model_version": "sdxl_base_v1-0"}, overwrite=True)
    code, lines = run_cli_lines(["--model", str(src), "--save_to", str(dst), "--new_rank", "4"], capsys)
    assert code == 2 and len(lines) == 1 and not dst.exists()
    assert lines[0].endswith(f"{src}: 2 tensor(s) contain NaN or inf: {names[0]}.lora_up.weight, "
                             f"{names[2]}.lora_down.weight; a low-rank decomposition of such a layer is undefined "
                             "(repair or drop these modules)")


def test_negative_alpha_gives_the_same_delta_with_a_positive_alpha():
    tensors = lora_tensors(48, 40, 6, -3.0, 11)
    dense = delta64(tensors)  # (−3/6)·up@down
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    optimal = (U[:, :4] * S[:4]) @ Vh[:4]
    out = run([job(LINEAR, tensors, (48, 40))], new_rank=4)[LINEAR].tensors
    assert float(out["alpha"]) == pytest.approx(3.0 / 6 * 4)  # |alpha|/rank kept
    got = float(out["alpha"]) / 4 * out["lora_up.weight"].double() @ out["lora_down.weight"].double()
    assert float((got - optimal).norm() / optimal.norm()) < 1e-5
