"""svd_merge_lora.py end to end: files with real SDXL / Flux key names and shapes in, files out, every
delta checked against float64 computed here from the input tensors (tests.helpers.dense_delta writes
(alpha/r)·up@down out independently of networks/)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from library.errors import LoraToolsError
from library.merge_methods import dare_mask
from library.safetensors_io import load_tensors
from tests.helpers import dense_delta, flux_modules, kohya_metadata, make_lora, run_script, sdxl_modules, write_lora

CONVS = ["input_blocks_1_0_in_layers_2"]  # 320×320×3×3
ATTN = "input_blocks_4_1_transformer_blocks_0_"  # 640-wide Linears (attn2 k/v 640×2048, ff 5120×640)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 OpenMP thread for small LAPACK calls


def run(argv: list[str]) -> dict:
    import svd_merge_lora

    return run_script(svd_merge_lora, argv)


def sdxl_pair(tmp_path):
    modules = sdxl_modules("all", blocks=CONVS + [ATTN], te1=False, te2=False)
    modules += sdxl_modules("none", te2=False)[:3]  # CLIP-L layer 0 q/k/v
    attn = [m for m in modules if not m.is_conv3]
    a = make_lora(modules, 8, alpha=4, conv_rank=4, seed=1, dtype=torch.float32)
    b = make_lora(attn[:8], 16, seed=2, dtype=torch.float32)  # partial overlap, other rank, no conv
    pa = write_lora(str(tmp_path / "a.safetensors"), a, kohya_metadata("sdxl", 8, 4))
    pb = write_lora(str(tmp_path / "b.safetensors"), b, kohya_metadata("sdxl", 16))
    return modules, (a, b), (pa, pb)


def merged64(inputs, ratios, name) -> torch.Tensor:
    terms = [r * dense_delta(t, name) for t, r in zip(inputs, ratios) if f"{name}.lora_up.weight" in t]
    return sum(terms)


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_add_full_rank_is_exact_and_low_rank_is_optimal(tmp_path):
    modules, inputs, paths = sdxl_pair(tmp_path)
    ratios = [0.8, -0.6]
    out = str(tmp_path / "full.safetensors")
    run(["--models", *paths, "--ratios", "0.8", "-0.6", "--new_rank", "24", "--new_conv_rank", "4",
         "--save_to", out, "--save_precision", "float"])
    tensors, meta = load_tensors(out)
    assert meta["ss_network_dim"] == "Dynamic" and meta["loratools.script"] == "svd_merge_lora.py"
    for m in modules:
        got = dense_delta(tensors, m.name)
        assert rel(got, merged64(inputs, ratios, m.name)) < 1e-5, m.name
    conv = modules[0]
    assert conv.is_conv3 and tuple(tensors[f"{conv.name}.lora_down.weight"].shape) == (4, 320, 3, 3)

    low = str(tmp_path / "low.safetensors")
    report = str(tmp_path / "low.json")
    run(["--models", *paths, "--ratios", "0.8", "-0.6", "--new_rank", "5", "--new_conv_rank", "2",
         "--save_to", low, "--save_precision", "float", "--report", report])
    tensors, _ = load_tensors(low)
    with open(report) as f:
        layers = {entry["target"]: entry for entry in json.load(f)["layers"]}
    assert len(layers) == len(modules)
    for m in modules:
        exact = merged64(inputs, ratios, m.name)
        U, S, Vh = torch.linalg.svd(exact, full_matrices=False)
        k = 2 if m.is_conv3 else 5
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        got = dense_delta(tensors, m.name)
        assert tensors[f"{m.name}.lora_down.weight"].shape[0] == k
        assert rel(got, best) < 1e-4, m.name
    # The report's error is the true distance to the exact merge (checked on one layer by name).
    name = modules[-1].name  # lora_te1_text_model_encoder_layers_0_self_attn_q_proj
    entry = next(e for t, e in layers.items() if t.endswith("text_model.encoder.layers.0.self_attn.q_proj.weight"))
    exact = merged64(inputs, ratios, name)
    assert entry["relative_error"] == pytest.approx(rel(dense_delta(tensors, name), exact), rel=1e-3)


def test_other_output_format_holds_the_same_deltas(tmp_path):
    from library.formats import read_lora
    from networks import adapter_from_tensors

    modules, inputs, paths = sdxl_pair(tmp_path)
    kohya, peft = str(tmp_path / "k.safetensors"), str(tmp_path / "d.safetensors")
    run(["--models", *paths, "--new_rank", "6", "--save_to", kohya, "--save_precision", "float"])
    run(["--models", *paths, "--new_rank", "6", "--save_to", peft, "--save_precision", "float", "--format", "diffusers"])
    a, b = read_lora(kohya), read_lora(peft)
    assert b.format != a.format
    da = {m.target: adapter_from_tensors(m.tensors).delta() for m in a.modules}
    db = {m.target: adapter_from_tensors(m.tensors).delta() for m in b.modules}
    assert da.keys() == db.keys()
    for target in da:
        assert rel(db[target].double(), da[target].double()) < 1e-6


def test_loha_input_and_reported_error(tmp_path):
    names = sdxl_modules(blocks=[ATTN], te1=False, te2=False)[:2]  # attn1 to_q, to_k: 640×640
    gen = torch.Generator().manual_seed(5)
    loha = {}
    for m in names:
        out_dim, in_dim = m.shape
        for side in ("w1", "w2"):
            loha[f"{m.name}.hada_{side}_a"] = torch.randn(out_dim, 4, generator=gen) * 0.1
            loha[f"{m.name}.hada_{side}_b"] = torch.randn(4, in_dim, generator=gen) * 0.1
        loha[f"{m.name}.alpha"] = torch.tensor(2.0)
    pl = write_lora(str(tmp_path / "loha.safetensors"), loha, {"ss_network_module": "lycoris.kohya"})
    lora = make_lora(names, 8, seed=6, dtype=torch.float32)
    pr = write_lora(str(tmp_path / "lora.safetensors"), lora, kohya_metadata("sdxl", 8))
    out, report = str(tmp_path / "o.safetensors"), str(tmp_path / "o.json")
    run(["--models", pl, pr, "--ratios", "0.5", "1", "--new_rank", "12", "--save_to", out, "--save_precision", "float",
         "--report", report, "--family", "sdxl"])
    tensors, _ = load_tensors(out)
    with open(report) as f:
        layers = json.load(f)["layers"]
    assert all(entry["route"] == "factored" for entry in layers)  # LoHa's exact rank-16 factors
    for m in names:
        p = {k.split(".", 1)[1]: v.double() for k, v in loha.items() if k.startswith(m.name + ".")}
        loha64 = (2.0 / 4) * (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
        exact = 0.5 * loha64 + dense_delta(lora, m.name)
        got = dense_delta(tensors, m.name)
        S = torch.linalg.svdvals(exact)
        optimal = float(S[12:].square().sum().sqrt() / S.square().sum().sqrt())
        err = rel(got, exact)
        assert err <= optimal * (1 + 1e-4) + 1e-6  # Eckart–Young
        projection = m.name.rsplit("_", 1)[1]  # q or k
        canonical = f"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_{projection}.weight"
        entry = next(e for e in layers if e["target"] == canonical)
        assert entry["relative_error"] == pytest.approx(err, rel=1e-3)


def test_dare_is_seeded_per_layer_and_input(tmp_path):
    modules = sdxl_modules(blocks=[ATTN], te1=False, te2=False)[:1] + sdxl_modules("none", te2=False)[:1]
    inputs = [make_lora(modules, 4, seed=21, dtype=torch.float32), make_lora(modules[:1], 6, seed=22, dtype=torch.float32)]
    paths = [write_lora(str(tmp_path / f"{i}.safetensors"), t, kohya_metadata("sdxl", 4)) for i, t in enumerate(inputs)]
    outs = []
    for seed, name in ((7, "s7.safetensors"), (7, "s7b.safetensors"), (8, "s8.safetensors")):
        out = str(tmp_path / name)
        run(["--models", *paths, "--ratios", "1", "-0.5", "--mode", "dare_linear_svd", "--density", "0.5",
             "--seed", str(seed), "--new_rank", "768", "--save_to", out, "--save_precision", "float"])
        outs.append(load_tensors(out))
    (t1, meta), (t2, _), (t3, _) = outs
    assert meta["loratools.seed"] == "7"
    # At full rank the LoRA is the merged delta itself: Σ ratioᵢ·maskᵢ⊙ΔWᵢ/density, masks by (seed, layer, input).
    q, te = modules[0].name, modules[1].name
    canonical = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    expected = sum(r * dense_delta(t, q) * dare_mask(modules[0].shape, 0.5, 7, f"{canonical}:{i}") / 0.5
                   for i, (t, r) in enumerate(zip(inputs, (1.0, -0.5))))
    assert rel(dense_delta(t1, q), expected) < 1e-5
    # The text-encoder layer only input 0 covers keeps input 0's mask whatever input 1 holds.
    te_key = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight"
    expected_te = dense_delta(inputs[0], te) * dare_mask(modules[1].shape, 0.5, 7, f"{te_key}:0") / 0.5
    assert rel(dense_delta(t1, te), expected_te) < 1e-5
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    assert not torch.equal(t1[f"{q}.lora_up.weight"], t3[f"{q}.lora_up.weight"])


def test_flux_fused_qkv_meets_split_q_k_v_from_another_format(tmp_path):
    from library.formats import read_lora
    from library.lora_output import output_dtype
    from library.lora_output import write_lora as write_through_writer

    qkv = [m for m in flux_modules(double_blocks=[0], single_blocks=[]) if m.name.endswith("img_attn_qkv")]
    a = make_lora(qkv, 4, alpha=2, seed=11, dtype=torch.float32)
    b = make_lora(qkv, 4, seed=12, dtype=torch.float32)
    pa = write_lora(str(tmp_path / "a.safetensors"), a, kohya_metadata("flux1", 4, 2))
    pb_kohya = write_lora(str(tmp_path / "b_kohya.safetensors"), b, kohya_metadata("flux1", 4))
    pb = str(tmp_path / "b_peft.safetensors")
    kohya = read_lora(pb_kohya)
    write_through_writer(pb, kohya.modules, kohya.family, "diffusers", dtype=output_dtype([kohya]), script="test",
                         args=None, inputs=[pb_kohya], base_metadata=kohya.metadata)
    assert {m.target.rows for m in read_lora(pb).modules} != {None}  # really split into q/k/v row slices
    out = str(tmp_path / "o.safetensors")
    run(["--models", pa, pb, "--ratios", "1", "0.5", "--new_rank", "16", "--save_to", out, "--save_precision", "float"])
    tensors, _ = load_tensors(out)
    name = qkv[0].name
    exact = dense_delta(a, name) + 0.5 * dense_delta(b, name)
    assert rel(dense_delta(tensors, name), exact) < 1e-5


def test_block_weights_scale_layers(tmp_path):
    modules, inputs, paths = sdxl_pair(tmp_path)
    out = str(tmp_path / "o.safetensors")
    # SDXL 12-value lbw: BASE, IN04, IN05, IN07, IN08, MID, OUT00-05 → IN04 at 0.5, text encoder (BASE) at 0.
    run(["--models", paths[0], "--lbws", "0,0.5,1,1,1,1,1,1,1,1,1,1", "--new_rank", "8", "--new_conv_rank", "4",
         "--save_to", out, "--save_precision", "float"])
    tensors, _ = load_tensors(out)
    for m in modules:
        if m.name.startswith("lora_te1_"):
            assert f"{m.name}.lora_up.weight" not in tensors  # strength 0: left out
        elif ATTN in m.name:
            assert rel(dense_delta(tensors, m.name), 0.5 * dense_delta(inputs[0], m.name)) < 1e-5


def test_user_errors_leave_no_output(tmp_path):
    _, _, paths = sdxl_pair(tmp_path)
    out = str(tmp_path / "o.safetensors")
    with pytest.raises(LoraToolsError, match="--ratios"):
        run(["--models", *paths, "--ratios", "1", "--save_to", out])
    flux = write_lora(str(tmp_path / "f.safetensors"),
                      make_lora(flux_modules(double_blocks=[0], single_blocks=[])[:1], 2, dtype=torch.float32),
                      kohya_metadata("flux1", 2))
    with pytest.raises(LoraToolsError, match="famil"):
        run(["--models", paths[0], flux, "--save_to", out])
    dora = make_lora(sdxl_modules(blocks=[ATTN], te1=False, te2=False)[:1], 4, dtype=torch.float32)
    name = next(iter(dora)).split(".")[0]
    dora[f"{name}.dora_scale"] = torch.ones(1, 640)
    pd = write_lora(str(tmp_path / "dora.safetensors"), dora, kohya_metadata("sdxl", 4))
    with pytest.raises(LoraToolsError, match="DoRA"):
        run(["--models", pd, "--save_to", out, "--family", "sdxl"])
    with pytest.raises(LoraToolsError, match="density"):
        run(["--models", *paths, "--mode", "ties", "--density", "1.5", "--save_to", out])
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".") or f.endswith(".tmp")]


def test_exit_status_2_and_one_line(tmp_path, capsys):
    from library.cli import run_cli
    from svd_merge_lora import main, setup_parser

    _, _, paths = sdxl_pair(tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_cli(setup_parser, main, ["--models", *paths, "--ratios", "1", "--save_to", str(tmp_path / "o.safetensors")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ratios" in err[0]


def test_fused_slice_adapter_and_bias_only_modules():
    from library.formats.types import Target
    from library.lora_combine import Group, Term
    from library.svd_merge_io import jobs_from_groups
    from networks import FullDiffAdapter, adapter_from_tensors

    # A LoRA on rows 4:8 of a 12-row fused weight is the same LoRA with zero rows elsewhere, bias included.
    tensors = {"lora_down.weight": torch.randn(2, 5), "lora_up.weight": torch.randn(4, 2), "alpha": torch.tensor(1.0),
               "lora_up.bias": torch.randn(4)}
    target = Target("double_blocks.0.img_attn.qkv.weight", None, "transformer", (12, 5))
    adapter = adapter_from_tensors(tensors, "q")
    (job,) = jobs_from_groups([Group(target, [Term(adapter, 0.5, (4, 8), "f: q", bias_scale=0.5, slot=1)])], 2)
    (slot, placed, weight), = job.parts
    assert (slot, weight, job.n_inputs) == (1, 0.5, 2)
    want = torch.zeros(12, 5, dtype=torch.float64)
    want[4:8] = 0.5 * tensors["lora_up.weight"].double() @ tensors["lora_down.weight"].double()
    up, down = placed.factors()
    assert torch.allclose((up @ down).double(), want, atol=1e-6)
    assert torch.allclose(placed.delta((12, 5)).double(), want, atol=1e-6)
    bias = torch.zeros(12)
    bias[4:8] = 0.5 * tensors["lora_up.bias"]
    assert torch.allclose(placed.bias_delta, bias)
    only_bias = Term(FullDiffAdapter(None, bias_delta=torch.randn(12)), 1.0, (0, 12), "f: norm")
    with pytest.raises(LoraToolsError, match="bias"):
        jobs_from_groups([Group(target, [only_bias])], 1)


def test_nonfinite_input_is_refused_naming_the_file(tmp_path, capsys):
    from library.cli import run_cli
    from svd_merge_lora import main, setup_parser

    modules, (a, b), (pa, pb) = sdxl_pair(tmp_path)
    key = next(k for k in b if k.endswith("lora_down.weight"))
    b[key] = b[key].clone()
    b[key][0, 0] = float("nan")
    write_lora(pb, b, kohya_metadata("sdxl", 16))
    out = tmp_path / "m.safetensors"
    with pytest.raises(SystemExit) as info:
        run_cli(setup_parser, main, ["--models", pa, pb, "--new_rank", "4", "--save_to", str(out), "--device", "cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1 and not out.exists()
    assert lines[0].endswith(f"{pb}: 1 tensor(s) contain NaN or inf: {key}; a low-rank decomposition of such a layer "
                             "is undefined (repair or drop these modules)")
