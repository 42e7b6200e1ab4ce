"""merge_models.py: every method against its formula written out here in float64, on small checkpoints
with real SD1.x key names (the family's table, shapes scaled down)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import merge_models
from library.errors import LoraToolsError
from library.formats.registry import FAMILIES
from tests.helpers import run_cli_status, run_script, sha256

Q = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"
CONV = "model.diffusion_model.input_blocks.0.0.weight"
OUT = "model.diffusion_model.output_blocks.11.1.proj_out.weight"
MID_BIAS = "model.diffusion_model.middle_block.2.out_layers.3.bias"
TIME = "model.diffusion_model.time_embed.0.weight"
TE_Q = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
TE_NORM = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
POS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
VAE = "first_stage_model.decoder.conv_in.weight"
FLOAT_KEYS = (Q, K, CONV, OUT, MID_BIAS, TIME, TE_Q, TE_NORM, VAE)


def small_shape(key: str) -> tuple[int, ...]:
    table = FAMILIES["sd1"].table.shapes
    if key in table:
        return tuple(max(1, d // 40) if i < 2 else d for i, d in enumerate(table[key]))
    return {MID_BIAS: (8,), TE_NORM: (19,), VAE: (6, 4, 3, 3)}[key]


def checkpoint(path, seed: int, dtype=torch.float32, keys=FLOAT_KEYS, extra=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {k: (torch.randn(small_shape(k), generator=g) * 0.1).to(dtype) for k in keys}
    tensors[POS] = torch.arange(7)[None]
    tensors.update(extra or {})
    save_file(tensors, str(path))
    return tensors


@pytest.fixture
def models(tmp_path):
    paths = [tmp_path / f"m{i}.safetensors" for i in range(3)]
    tensors = [checkpoint(p, seed=i) for i, p in enumerate(paths)]
    base = tmp_path / "base.safetensors"
    return paths, tensors, base, checkpoint(base, seed=10)


def merge(tmp_path, models, *flags, name="out.safetensors"):
    out = tmp_path / name
    run_script(merge_models, ["--models", *models, "--save_to", out, "--family", "sd1", "--precision", "fp64", *flags])
    return load_file(str(out))


def f64(t):
    return t.double()


def ties_reference(taus, ratios, density, sign="total"):
    """TIES written out: keep each task vector's top-k |values|, elect a sign per element from the pruned
    vectors, average the weighted entries that agree with it."""
    pruned = []
    for t in taus:
        k = int(density * t.numel())
        flat = t.reshape(-1)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.abs().argsort(descending=True)[:k]] = True
        pruned.append((flat * keep).reshape(t.shape))
    stack = torch.stack(pruned)
    votes = stack.sum(0) if sign == "total" else stack.sign().sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0).double()
    agree = stack.sign() == elected
    weighted = torch.stack([p * r for p, r in zip(pruned, ratios)])
    return (weighted * agree).sum(0) / agree.sum(0).clamp_min(1)


def test_weighted_sum_is_sd_scripts_sum_and_defaults_to_the_mean(tmp_path, models):
    paths, t, _, _ = models
    out = merge(tmp_path, paths, "--ratios", "0.5", "0.3", "0.2")
    for key in FLOAT_KEYS:
        want = 0.5 * f64(t[0][key]) + 0.3 * f64(t[1][key]) + 0.2 * f64(t[2][key])
        torch.testing.assert_close(f64(out[key]), want, rtol=1e-6, atol=1e-7)
    assert out[POS].equal(t[0][POS])  # an integer buffer is copied, never averaged
    mean = merge(tmp_path, paths[:2], name="mean.safetensors")
    torch.testing.assert_close(f64(mean[Q]), (f64(t[0][Q]) + f64(t[1][Q])) / 2, rtol=1e-6, atol=1e-7)


def test_add_difference_and_task_arithmetic(tmp_path, models):
    paths, t, base, c = models
    out = merge(tmp_path, paths[:2], "--method", "add_difference", "--base", base, "--ratios", "1", "0.7")
    want = f64(t[0][Q]) + 0.7 * (f64(t[1][Q]) - f64(c[Q]))  # A + r·(B − C)
    torch.testing.assert_close(f64(out[Q]), want, rtol=1e-6, atol=1e-7)
    out = merge(tmp_path, paths, "--method", "task_arithmetic", "--ratios", "9", "0.5", "-0.25", name="ta.safetensors")
    want = f64(t[0][K]) + 0.5 * (f64(t[1][K]) - f64(t[0][K])) - 0.25 * (f64(t[2][K]) - f64(t[0][K]))
    torch.testing.assert_close(f64(out[K]), want, rtol=1e-6, atol=1e-7)  # without --base, A's ratio has no effect


@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_against_its_formula(tmp_path, models, sign):
    paths, t, base, c = models
    out = merge(tmp_path, paths, "--method", "ties", "--base", base, "--density", "0.4", "--ratios", "1", "0.6", "0.8",
                "--majority_sign_method", sign)
    for key in (Q, CONV, TE_Q):
        taus = [f64(m[key]) - f64(c[key]) for m in t]
        want = f64(c[key]) + ties_reference(taus, [1, 0.6, 0.8], 0.4, sign)
        torch.testing.assert_close(f64(out[key]), want, rtol=1e-6, atol=1e-7)


def test_ties_sign_election_by_hand():
    from library.model_merge import MergeSettings, merge_key

    a = torch.zeros(4, dtype=torch.float64)
    b = torch.tensor([1.0, -2.0, 3.0, -1.0], dtype=torch.float64)
    c = torch.tensor([-3.0, -1.0, 1.0, 2.0], dtype=torch.float64)
    d = torch.tensor([1.0, 1.0, -1.0, 2.0], dtype=torch.float64)
    # total: Σ = (-1, -2, 3, 3) → signs (-, -, +, +); frequency: Σ sign = (1, -1, 1, 1) → (+, -, +, +)
    total = merge_key("k", [a, b, c, d], None, MergeSettings("ties", (1, 1, 1, 1), sign_method="total"))
    assert total.tolist() == [-3.0, -1.5, 2.0, 2.0]
    freq = merge_key("k", [a, b, c, d], None, MergeSettings("ties", (1, 1, 1, 1), sign_method="frequency"))
    assert freq.tolist() == [1.0, -1.5, 2.0, 2.0]
    off = merge_key("k", [a, b, c, d], None, MergeSettings("ties", (1, 1, 1, 1), sign_method="off"))
    assert off.tolist() == [-1.0, -2.0, 3.0, 3.0]  # no election: the plain sum


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_with_a_seed_equals_the_recomputation_with_its_masks(tmp_path, models, method, rescale):
    paths, t, _, _ = models
    flags = ["--method", method, "--density", "0.3", "--seed", "11", "--ratios", "1", "0.5", "0.9"]
    out = merge(tmp_path, paths, *flags, *([] if rescale else ["--no_rescale"]))
    for key in (Q, OUT, MID_BIAS):
        # The mask of task vector j (B is j = 0 without --base) is drawn from the generator of (seed, "key:j").
        masks = [torch.rand(t[0][key].shape, generator=_gen(11, f"{key}:{j}")) < 0.3 for j in range(2)]
        taus = [(f64(m[key]) - f64(t[0][key])) * mask / (0.3 if rescale else 1) for m, mask in zip(t[1:], masks)]
        if method == "dare_linear":
            want = f64(t[0][key]) + 0.5 * taus[0] + 0.9 * taus[1]
        else:
            stack = torch.stack(taus)
            agree = stack.sign() == torch.where(stack.sum(0) >= 0, 1.0, -1.0).double()
            want = f64(t[0][key]) + ((torch.stack([0.5 * taus[0], 0.9 * taus[1]]) * agree).sum(0)
                                     / agree.sum(0).clamp_min(1))
        torch.testing.assert_close(f64(out[key]), want, rtol=1e-6, atol=1e-7)
    again = merge(tmp_path, paths, *flags, *([] if rescale else ["--no_rescale"]), name="again.safetensors")
    assert all(again[k].equal(out[k]) for k in out)


def _gen(seed, name):
    from library.lowrank import generator_for

    return generator_for(seed, name)


def test_magnitude_prune_and_slerp(tmp_path, models):
    paths, t, base, c = models
    out = merge(tmp_path, paths[:2], "--method", "magnitude_prune", "--base", base, "--density", "0.5", "--ratios", "1", "2")
    want = f64(c[Q])
    for m, r in zip(t[:2], (1, 2)):
        tau = (f64(m[Q]) - f64(c[Q])).reshape(-1)
        keep = torch.zeros_like(tau, dtype=torch.bool)
        keep[tau.abs().argsort(descending=True)[:int(0.5 * tau.numel())]] = True
        want = want + r * (tau * keep).reshape(c[Q].shape)
    torch.testing.assert_close(f64(out[Q]), want, rtol=1e-6, atol=1e-7)
    out = merge(tmp_path, paths[:2], "--method", "slerp", "--ratios", "0.7", "0.3", name="slerp.safetensors")
    a, b = f64(t[0][CONV]).reshape(-1), f64(t[1][CONV]).reshape(-1)
    theta = math.acos(float(a @ b / (a.norm() * b.norm())))
    want = (math.sin(0.7 * theta) * a + math.sin(0.3 * theta) * b) / math.sin(theta)
    torch.testing.assert_close(f64(out[CONV]).reshape(-1), want, rtol=1e-6, atol=1e-7)


def test_strengths_block_key_and_te(tmp_path, models):
    paths, t, _, _ = models
    mbw = ["0.25"] * 25  # IN00…IN11, M00, OUT00…OUT11
    mbw[1], mbw[12], mbw[24] = "0.5", "0.75", "0"  # IN01, M00, OUT11
    out = merge(tmp_path, paths[:2], "--ratios", "0", "1", "--block_weights", ",".join(mbw), "--te_ratio", "0.1",
                "--key_weights", "attn1.to_k*=0.9")
    lerp = {key: f64(t[0][key]) + s * (f64(t[1][key]) - f64(t[0][key])) for key, s in
            ((Q, 0.5), (K, 0.9), (CONV, 0.25), (MID_BIAS, 0.75), (TIME, 1.0), (TE_Q, 0.1), (TE_NORM, 0.1), (VAE, 1.0))}
    for key, want in lerp.items():
        torch.testing.assert_close(f64(out[key]), want, rtol=1e-6, atol=1e-7, msg=key)
    assert out[OUT].equal(t[0][OUT])  # strength 0: A's bytes
    only_te = merge(tmp_path, paths[:2], "--ratios", "0", "1", "--only", "te", name="te.safetensors")
    assert only_te[TE_Q].equal(t[1][TE_Q]) and only_te[Q].equal(t[0][Q]) and only_te[VAE].equal(t[0][VAE])


def test_block_weights_of_the_wrong_length_are_refused(tmp_path, models, capsys):
    paths, _, _, _ = models
    status, io = run_cli_status(merge_models, ["--models", *map(str, paths[:2]), "--family", "sd1", "--block_weights",
                                               "1,1,1", "--save_to", str(tmp_path / "x.safetensors")], capsys)
    assert status == 2 and "takes 25 or 26" in io.err and not (tmp_path / "x.safetensors").exists()


def test_keys_in_some_inputs_markers_and_dtypes(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ta = checkpoint(a, 0, torch.float16, extra={"v_pred": torch.tensor([]), "edm_vpred.sigma_max": torch.tensor([80.0])})
    tb = checkpoint(b, 1, torch.bfloat16, keys=FLOAT_KEYS[:-1], extra={"ztsnr": torch.tensor([]),
                                                                     "only_b.weight": torch.ones(3)})
    result = run_script(merge_models, ["--models", a, b, "--save_to", tmp_path / "o.safetensors", "--family", "sd1"])
    out = load_file(str(tmp_path / "o.safetensors"))
    plan = result["plan"]
    assert sorted(plan.copied("only in some inputs")) == sorted([VAE, "only_b.weight"])
    assert sorted(plan.copied("marker")) == ["edm_vpred.sigma_max", "v_pred", "ztsnr"]
    assert out[VAE].equal(ta[VAE]) and out["only_b.weight"].equal(tb["only_b.weight"])
    assert out["edm_vpred.sigma_max"].equal(ta["edm_vpred.sigma_max"]) and out["ztsnr"].dtype == torch.float32
    assert out[Q].dtype == torch.float16  # A's dtype; computed in float32 from fp16 and bf16
    torch.testing.assert_close(f64(out[Q]), (f64(ta[Q]) + f64(tb[Q])) / 2, rtol=2e-3, atol=1e-4)


def test_fp8_is_computed_wide_clamped_and_reported(tmp_path, capsys):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    big = {Q: torch.full(small_shape(Q), 384.0)}
    checkpoint(a, 0, torch.float8_e4m3fn, keys=(K,), extra={k: v.to(torch.float8_e4m3fn) for k, v in big.items()})
    checkpoint(b, 1, torch.float8_e4m3fn, keys=(K,), extra={k: v.to(torch.float8_e4m3fn) for k, v in big.items()})
    run_script(merge_models, ["--models", a, b, "--method", "task_arithmetic", "--ratios", "1", "1", "--base", a,
                              "--save_to", tmp_path / "o.safetensors", "--family", "sd1"])
    out = load_file(str(tmp_path / "o.safetensors"))
    assert out[Q].dtype == torch.float8_e4m3fn and out[Q].float().max() == 384.0  # A + 1·(B − A) stays finite
    run_script(merge_models, ["--models", a, b, "--ratios", "1", "1", "--save_to", tmp_path / "s.safetensors",
                              "--family", "sd1"])
    summed = load_file(str(tmp_path / "s.safetensors"))
    assert summed[Q].float().max() == 448.0 and torch.isfinite(summed[Q].float()).all()  # 768 clamped to e4m3fn's max
    err = capsys.readouterr().err
    assert "rounding to F8_E4M3" in err and "values clamped" in err


def test_result_does_not_depend_on_key_order(tmp_path, models):
    from library.model_merge import MergeSettings
    from library.model_merge_io import MergeInputs, run_merge
    from library.model_merge_plan import Strengths, build_plan
    from library.model_setup import detect_places
    from library.safetensors_io import StreamingWriter

    paths, _, base, _ = models
    settings = MergeSettings("dare_ties", (1, 0.5, 0.5), density=0.5, seed=5, has_base=True)
    digests = []
    for n, reverse in enumerate((False, True)):
        with MergeInputs(paths, base) as inputs:
            places, _ = detect_places(inputs.models[0], "sd1", str(paths[0]))
            plan = build_plan(inputs.models, inputs.base, Strengths(places), uses_base=True, save_dtype=None,
                              paths=[str(p) for p in paths])
            order = [k.key for k in plan.keys][::-1 if reverse else 1]
            out = tmp_path / f"o{n}.safetensors"
            with StreamingWriter(out, {k.key: (k.dtype, k.shape) for k in plan.keys}) as writer:
                run_merge(inputs, plan, settings, writer, order=order)
        digests.append(sha256(out))
    assert digests[0] == digests[1]


def test_recipe_replays_bit_for_bit_and_is_in_the_metadata(tmp_path, models, capsys):
    paths, _, base, _ = models
    first, again, recipe = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "r.toml"
    run_script(merge_models, ["--models", *paths, "--base", base, "--method", "dare_ties", "--density", "0.4", "--seed",
                              "9", "--ratios", "1", "0.5", "0.7", "--key_weights", "*attn1*=0.5", "--family", "sd1",
                              "--save_recipe", recipe, "--save_to", first])
    run_script(merge_models, ["--recipe", recipe, "--save_to", again])
    a, b = load_file(str(first)), load_file(str(again))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    with safe_open(str(first), "pt") as f:
        assert f.metadata()["loratools.recipe"] == recipe.read_text()
    status, io = run_cli_status(merge_models, ["--recipe", str(recipe), "--seed", "1", "--save_to",
                                               str(tmp_path / "c.safetensors")], capsys)
    assert status == 2 and "do not also give --seed" in io.err
    checkpoint(paths[1], seed=99)  # another file under the same name: the replay cannot be exact
    status, io = run_cli_status(merge_models, ["--recipe", str(recipe), "--save_to", str(tmp_path / "d.safetensors")],
                                capsys)
    assert status == 2 and "sha256" in io.err and not (tmp_path / "d.safetensors").exists()


def test_protect_a_keeps_a_largest_changes(tmp_path, models):
    paths, t, base, c = models
    out = merge(tmp_path, paths[:2], "--method", "task_arithmetic", "--base", base, "--ratios", "1", "1",
                "--protect_a", "0.25")
    diff = (f64(t[0][Q]) - f64(c[Q])).abs().reshape(-1)
    protected = torch.zeros_like(diff, dtype=torch.bool)
    protected[diff.argsort(descending=True)[:int(0.25 * diff.numel())]] = True
    merged = f64(t[0][Q]) + f64(t[1][Q]) - f64(c[Q])
    want = torch.where(protected.reshape(c[Q].shape), f64(t[0][Q]), merged)
    torch.testing.assert_close(f64(out[Q]), want, rtol=1e-6, atol=1e-7)


def test_normalize_layer_and_attn_only(tmp_path, models):
    paths, t, _, _ = models
    out = merge(tmp_path, paths[:2], "--ratios", "0", "1", "--normalize", "layer")
    for key in (Q, CONV, TE_NORM):
        assert float(f64(out[key]).norm()) == pytest.approx(float(f64(t[0][key]).norm()), rel=1e-6)
    out = merge(tmp_path, paths[:2], "--ratios", "0", "1", "--normalize", "attn_only", name="qk.safetensors")
    s = float(f64(t[0][Q]).norm() / f64(t[1][Q]).norm())
    torch.testing.assert_close(f64(out[Q]), f64(t[1][Q]) * s, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(f64(out[K]), f64(t[1][K]) / s, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(f64(out[Q]).T @ f64(out[K]), f64(t[1][Q]).T @ f64(t[1][K]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(f64(out[CONV]), f64(t[1][CONV]), rtol=1e-6, atol=1e-7)  # not attention: unscaled


def test_fused_qkv_attn_only_keeps_q_k_product():
    from library.model_normalize import normalized

    g = torch.Generator().manual_seed(0)
    h = 4
    a, b = torch.randn(3 * h, h, generator=g, dtype=torch.float64), torch.randn(3 * h, h, generator=g, dtype=torch.float64)
    _, nb = normalized("double_blocks.0.img_attn.qkv.weight", [a, b], "attn_only", lambda k: None)
    assert float(nb[:h].norm()) == pytest.approx(float(a[:h].norm()))
    torch.testing.assert_close(nb[:h] @ nb[h:2 * h].T, b[:h] @ b[h:2 * h].T)
    assert nb[2 * h:].equal(b[2 * h:])  # V untouched


def test_sharded_folder_and_ckpt_inputs(tmp_path, models):
    import json

    paths, t, _, _ = models
    folder = tmp_path / "sharded"
    folder.mkdir()
    keys = sorted(t[1])
    half = len(keys) // 2
    save_file({k: t[1][k] for k in keys[:half]}, str(folder / "part-1.safetensors"))
    save_file({k: t[1][k] for k in keys[half:]}, str(folder / "part-2.safetensors"))
    weight_map = {k: "part-1.safetensors" if i < half else "part-2.safetensors" for i, k in enumerate(keys)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ckpt = tmp_path / "c.ckpt"
    torch.save({k: v.clone() for k, v in t[2].items()}, str(ckpt))
    out = merge(tmp_path, [paths[0], folder, ckpt], "--ratios", "0.2", "0.3", "0.5")
    want = 0.2 * f64(t[0][Q]) + 0.3 * f64(t[1][Q]) + 0.5 * f64(t[2][Q])
    torch.testing.assert_close(f64(out[Q]), want, rtol=1e-6, atol=1e-7)


def test_user_errors_are_one_line_and_write_nothing(tmp_path, models, capsys):
    paths, _, base, _ = models
    cases = [
        (["--models", str(paths[0]), str(paths[1]), "--save_to", str(paths[0])], "input"),
        (["--models", str(paths[0]), "--save_to", str(tmp_path / "o.safetensors")], "two or more"),
        (["--models", *map(str, paths), "--method", "slerp", "--save_to", str(tmp_path / "o.safetensors")], "exactly two"),
        (["--models", str(paths[0]), str(paths[1]), "--method", "add_difference", "--save_to",
          str(tmp_path / "o.safetensors")], "needs --base"),
        (["--models", str(paths[0]), str(paths[1]), "--ratios", "1", "--save_to", str(tmp_path / "o.safetensors")],
         "--ratios has 1"),
        (["--models", str(paths[0]), str(paths[1]), "--key_weights", "attn", "--save_to",
          str(tmp_path / "o.safetensors")], "GLOB=NUMBER"),
        (["--models", str(paths[0]), str(paths[1]), "--save_recipe", str(tmp_path / "o.safetensors"), "--save_to",
          str(tmp_path / "o.safetensors")], "--save_recipe"),
        (["--models", str(paths[0]), str(paths[1]), "--save_recipe", str(paths[1]), "--save_to",
          str(tmp_path / "o.safetensors")], "input"),
    ]
    for argv, message in cases:
        status, io = run_cli_status(merge_models, argv, capsys)
        assert status == 2 and message in io.err, (argv, io.err)
    assert not (tmp_path / "o.safetensors").exists()
    before = sha256(paths[0])
    result = run_script(merge_models, ["--models", *paths[:2], "--dry_run", "--family", "sd1"])
    assert len(result["plan"].merged) == len(FLOAT_KEYS) and sha256(paths[0]) == before


def test_mismatched_shapes_name_the_key(tmp_path, models, capsys):
    paths, _, _, _ = models
    odd = tmp_path / "odd.safetensors"
    checkpoint(odd, 3, extra={Q: torch.zeros(2, 2)})
    status, io = run_cli_status(merge_models, ["--models", str(paths[0]), str(odd), "--save_to",
                                               str(tmp_path / "o.safetensors")], capsys)
    assert status == 2 and Q in io.err and "not the same architecture" in io.err
    with pytest.raises(LoraToolsError):
        from library.model_blocks import parse_mbw

        parse_mbw("1,2", None)


def test_mask_keeps_a_where_false_and_in_keys_it_lacks(tmp_path, models, capsys):
    from library.mask_file import MaskWriter

    paths, t, _, _ = models
    g = torch.Generator().manual_seed(4)
    masks = {Q: torch.rand(small_shape(Q), generator=g) < 0.5, CONV: torch.rand(small_shape(CONV), generator=g) < 0.3}
    mask_path = tmp_path / "m.safetensors"
    with MaskWriter(mask_path, {k: m.shape for k, m in masks.items()}) as writer:
        for key, m in masks.items():
            writer.write(key, m)
    result = run_script(merge_models, ["--models", *paths[:2], "--ratios", "0.4", "0.6", "--mask", mask_path, "--family",
                                       "sd1", "--save_to", tmp_path / "o.safetensors"])
    out = load_file(str(tmp_path / "o.safetensors"))
    for key, m in masks.items():
        merged = 0.4 * f64(t[0][key]) + 0.6 * f64(t[1][key])
        torch.testing.assert_close(f64(out[key]), torch.where(m, merged, f64(t[0][key])), rtol=1e-6, atol=1e-7)
    assert out[K].equal(t[0][K]) and K in result["plan"].copied("not in mask")
    wrong = tmp_path / "wrong.safetensors"
    with MaskWriter(wrong, {Q: (3, 3)}) as writer:
        writer.write(Q, torch.ones(3, 3, dtype=torch.bool))
    status, io = run_cli_status(merge_models, ["--models", str(paths[0]), str(paths[1]), "--mask", str(wrong),
                                               "--save_to", str(tmp_path / "w.safetensors")], capsys)
    assert status == 2 and "mask's shape" in io.err
