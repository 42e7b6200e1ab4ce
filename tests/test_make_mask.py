"""make_mask.py end to end on small checkpoints with real SD1 key names: every method's file read back and
checked against a direct computation (Python sets, float64 thresholds, seeded draws), sharded and .ckpt
inputs, output checks before work, reports against direct counts, and the PNG plot."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import make_mask
from library import masks as M
from library.mask_file import MaskWriter, read_mask
from library.mask_report import block_of
from library.plots import matplotlib_available
from tests.helpers import fingerprints, run_cli_status, run_script, temp_files

UNET = "model.diffusion_model."
SHAPES = {
    UNET + "input_blocks.1.0.in_layers.2.weight": (32, 32, 3, 3),
    UNET + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": (64, 64),
    UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (64, 77),
    UNET + "middle_block.1.proj_in.bias": (64,),
    UNET + "out.2.weight": (4, 32, 3, 3),
    "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight": (96, 48),
}
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def _models(folder, dtype=torch.float32):
    gen = torch.Generator().manual_seed(11)
    base = {k: torch.randn(s, generator=gen).to(dtype) for k, s in SHAPES.items()}
    tuned = {k: (v.float() + 0.02 * torch.randn(v.shape, generator=gen) ** 3).to(dtype) for k, v in base.items()}
    for sd in (base, tuned):
        sd[POSITION_IDS] = torch.arange(77).reshape(1, 77)
    paths = os.path.join(folder, "base.safetensors"), os.path.join(folder, "tuned.safetensors")
    save_file(base, paths[0])
    save_file(tuned, paths[1])
    return paths, base, tuned


def _read(path):
    with read_mask(path) as mf:
        return {k: mf.get(k) for k in mf.keys()}, dict(mf.metadata)


def _run(argv):
    return run_script(make_mask, argv)


def test_simple_on_off_and_non_float_keys_left_out(tmp_path):
    (base, _), *_ = _models(tmp_path)
    _run(["simple", "--model", base, "--save_to", tmp_path / "on.safetensors"])
    _run(["simple", "--model", base, "--value", "off", "--save_to", tmp_path / "off.safetensors"])
    on, meta = _read(tmp_path / "on.safetensors")
    off, _ = _read(tmp_path / "off.safetensors")
    assert set(on) == set(SHAPES) and POSITION_IDS not in on
    assert all(m.all() and tuple(m.shape) == SHAPES[k] for k, m in on.items())
    assert not any(m.any() for m in off.values())
    assert meta["loratools.mask_method"] == "simple" and meta["loratools.script"] == "make_mask.py"


@pytest.mark.parametrize("kind", ["median", "quantile"])
@pytest.mark.parametrize("side", ["--below", "--above"])
def test_magnitude_against_float64(tmp_path, kind, side):
    (base, tuned), b, t = _models(tmp_path, torch.float16)
    out = tmp_path / "mag.safetensors"
    _run(["magnitude", "--model", tuned, "--base", base, "--threshold", "0.8", "--threshold_type", kind, side,
          "--save_to", out])
    masks, _ = _read(out)
    for key in SHAPES:
        d = (t[key].double() - b[key].double()).abs().reshape(-1)
        s = sorted(d.tolist())
        pos = 0.8 * (len(s) - 1)
        lo = int(pos)
        thr = s[lo] + (pos - lo) * (s[min(lo + 1, len(s) - 1)] - s[lo])  # one chunk: the exact quantile
        want = (d < thr) if side == "--below" else (d >= thr)
        assert torch.equal(masks[key].reshape(-1), want), key


def test_magnitude_refuses_shape_mismatch_and_warns_about_missing_keys(tmp_path, capsys):
    (base, tuned), b, t = _models(tmp_path)
    small = dict(b)
    del small[UNET + "out.2.weight"]
    save_file(small, str(tmp_path / "small.safetensors"))
    _run(["magnitude", "--model", tuned, "--base", tmp_path / "small.safetensors", "--save_to", tmp_path / "m.safetensors"])
    masks, _ = _read(tmp_path / "m.safetensors")
    assert UNET + "out.2.weight" not in masks and len(masks) == len(SHAPES) - 1
    assert "not in the base" in capsys.readouterr().err
    small[UNET + "out.2.weight"] = torch.zeros(4, 32, 3, 2)
    save_file(small, str(tmp_path / "bad.safetensors"))
    code, out = run_cli_status(make_mask, ["magnitude", "--model", tuned, "--base", str(tmp_path / "bad.safetensors"),
                                           "--save_to", str(tmp_path / "n.safetensors")], capsys)
    assert code == 2 and "differs from the base" in out.err and "out.2.weight" in out.err
    assert not os.path.exists(tmp_path / "n.safetensors") and temp_files(tmp_path) == []


def test_random_reproducible_and_independent_of_key_order_and_key_set(tmp_path):
    (base, _), b, _t = _models(tmp_path)
    _run(["random", "--model", base, "--rate", "0.3", "--seed", "5", "--save_to", tmp_path / "r1.safetensors"])
    _run(["random", "--model", base, "--rate", "0.3", "--seed", "5", "--save_to", tmp_path / "r2.safetensors"])
    # another checkpoint: a subset of the keys, other dtypes (so another file order), and one extra key
    keys = list(SHAPES)[::-2]
    other = {k: b[k].to(torch.bfloat16 if i % 2 else torch.float16) for i, k in enumerate(keys)}
    other[UNET + "time_embed.0.weight"] = torch.zeros(8, 8)
    save_file(other, str(tmp_path / "other.safetensors"))
    _run(["random", "--model", tmp_path / "other.safetensors", "--rate", "0.3", "--seed", "5",
          "--save_to", tmp_path / "r3.safetensors"])
    _run(["random", "--model", base, "--rate", "0.3", "--seed", "6", "--save_to", tmp_path / "r4.safetensors"])
    r1, meta = _read(tmp_path / "r1.safetensors")
    r2, r3, r4 = (_read(tmp_path / f"r{i}.safetensors")[0] for i in (2, 3, 4))
    assert meta["loratools.seed"] == "5"
    for key in SHAPES:
        assert torch.equal(r1[key], torch.rand(SHAPES[key], generator=__import__("library.lowrank").lowrank
                                               .generator_for(5, key)) < 0.3)
        assert torch.equal(r1[key], r2[key])
        assert not torch.equal(r1[key], r4[key])
    assert all(torch.equal(r1[k], r3[k]) for k in keys)


def test_quad_four_files_disjoint_and_covering(tmp_path, capsys):
    (base, _), *_ = _models(tmp_path)
    _run(["quad", "--model", base, "--seed", "2", "--save_to", tmp_path / "q.safetensors"])
    parts = [_read(tmp_path / f"q.{i}.safetensors") for i in range(1, 5)]
    assert not os.path.exists(tmp_path / "q.safetensors")
    assert [meta["loratools.mask_part"] for _, meta in parts] == ["1/4", "2/4", "3/4", "4/4"]
    for key, shape in SHAPES.items():
        count = sum(p[0][key].to(torch.int64) for p in parts)
        assert torch.equal(count, torch.ones(shape, dtype=torch.int64)), key
    # a part path that is an input is refused before anything is written
    save_file({"x": torch.zeros(1)}, str(tmp_path / "r.3.safetensors"))
    before = fingerprints(tmp_path)
    code, out = run_cli_status(make_mask, ["quad", "--model", str(tmp_path / "r.3.safetensors"), "--save_to",
                                           str(tmp_path / "r.safetensors")], capsys)
    assert code == 2 and "one of the inputs" in out.err
    assert fingerprints(tmp_path) == before


def test_quad_with_edits_stays_disjoint_against_python_sets(tmp_path):
    # an edit on a quad set says which entries take part in the split: off → in no part, on / drawn → in the
    # one part the quad assignment gave it, so the four parts stay pairwise disjoint whatever the rules
    (base, _), *_ = _models(tmp_path)
    _run(["quad", "--model", base, "--seed", "5", "--save_to", tmp_path / "plain.safetensors"])
    rules = [f"{UNET}input_blocks.4=off", "*attn1.to_q*=on", "*attn2.to_k*=random:0.3", "*.proj_in.*=gaussian:0:1:0.5",
             "cond_stage_model.*=off"]
    _run(["quad", "--model", base, "--seed", "5", *(a for r in rules for a in ("--edit", r)),
          "--save_to", tmp_path / "q.safetensors"])
    plain = [_sets(tmp_path / f"plain.{i}.safetensors") for i in range(1, 5)]
    parts = [_sets(tmp_path / f"q.{i}.safetensors") for i in range(1, 5)]
    k, proj = UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", UNET + "middle_block.1.proj_in.bias"
    fc1 = "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight"
    drawn = {k: M.random_mask(SHAPES[k], 0.3, 5, f"{k}#edit2"),
             proj: M.gaussian_mask(SHAPES[proj], 0, 1, 0.5, 5, f"{proj}#edit3")}
    taking_part = {key: set(range(torch.Size(shape).numel())) for key, shape in SHAPES.items()}  # to_q: off, then on
    taking_part.update({key: set(torch.nonzero(m.reshape(-1)).flatten().tolist()) for key, m in drawn.items()})
    taking_part[fc1] = set()
    for key in SHAPES:
        for i in range(4):
            for j in range(i + 1, 4):
                assert not parts[i][key] & parts[j][key], (key, i, j)
            assert parts[i][key] == plain[i][key] & taking_part[key], (key, i)
        assert set().union(*(p[key] for p in parts)) == taking_part[key], key
    assert 0 < len(taking_part[k]) < torch.Size(SHAPES[k]).numel() and 0 < len(taking_part[proj]) < 64


def _mask_from_sets(path, sets):
    with MaskWriter(path, {k: SHAPES[k] for k in sets}, {}) as w:
        for key, indices in sets.items():
            flat = torch.zeros(torch.Size(SHAPES[key]).numel(), dtype=torch.bool)
            flat[sorted(indices)] = True
            w.write(key, flat.reshape(SHAPES[key]))
    return str(path)


def _sets(path):
    masks, _ = _read(path)
    return {k: set(torch.nonzero(m.reshape(-1)).flatten().tolist()) for k, m in masks.items()}


@pytest.mark.parametrize("operation", M.SET_OPERATIONS)
def test_set_operations_against_python_sets(tmp_path, operation):
    import random
    rng = random.Random(operation)
    keys = list(SHAPES)
    have = [keys, keys[:4], keys[2:]]  # keys missing from some inputs count as all False
    inputs = []
    for i, subset in enumerate(have):
        sets = {k: {j for j in range(torch.Size(SHAPES[k]).numel()) if rng.random() < 0.4} for k in subset}
        inputs.append(sets)
        _mask_from_sets(tmp_path / f"m{i}.safetensors", sets)
    out = tmp_path / "out.safetensors"
    _run([operation, "--masks", *(tmp_path / f"m{i}.safetensors" for i in range(3)), "--save_to", out,
          "--report", tmp_path / "r.json"])
    got = _sets(out)
    expected = {}
    for key in M.combined_keys(operation, [list(s) for s in inputs]):
        a, b, c = (s.get(key, set()) for s in inputs)
        expected[key] = {"union": a | b | c, "intersection": a & b & c, "difference": a - b - c, "xor": a ^ b ^ c}[operation]
    assert got == expected
    report = json.loads((tmp_path / "r.json").read_text())["masks"][str(out)]
    for key, entry in report["layers"].items():
        assert entry["selected"] == len(expected[key]) and entry["total"] == torch.Size(SHAPES[key]).numel()
    assert report["total"]["selected"] == sum(len(v) for v in expected.values())
    for block, entry in report["blocks"].items():
        assert entry["selected"] == sum(len(v) for k, v in expected.items() if block_of(k) == block)


def test_set_operation_refuses_disagreeing_shapes_and_models(tmp_path, capsys):
    (base, _), *_ = _models(tmp_path)
    key = UNET + "out.2.weight"
    _mask_from_sets(tmp_path / "a.safetensors", {key: {1, 2}})
    with MaskWriter(tmp_path / "b.safetensors", {key: (4, 32, 9)}, {}) as w:
        w.write(key, torch.zeros(4, 32, 9, dtype=torch.bool))
    code, out = run_cli_status(make_mask, ["union", "--masks", str(tmp_path / "a.safetensors"),
                                           str(tmp_path / "b.safetensors"), "--save_to", str(tmp_path / "u.safetensors")], capsys)
    assert code == 2 and "different shapes" in out.err
    code, out = run_cli_status(make_mask, ["xor", "--masks", str(tmp_path / "a.safetensors"), base,
                                           "--save_to", str(tmp_path / "u.safetensors")], capsys)
    assert code == 2 and "not a mask file" in out.err and "base.safetensors" in out.err


def test_edit_by_pattern_later_rule_wins(tmp_path, capsys):
    (base, _), *_ = _models(tmp_path)
    _run(["simple", "--model", base, "--value", "off", "--save_to", tmp_path / "off.safetensors"])
    attn = UNET + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    _run(["edit", "--masks", tmp_path / "off.safetensors", "--edit", f"{UNET}input_blocks.4=on",
          "--edit", "*attn1.to_q*=random:0.25", "--seed", "3", "--save_to", tmp_path / "e.safetensors"])
    edited, _ = _read(tmp_path / "e.safetensors")
    assert torch.equal(edited[attn], M.random_mask(SHAPES[attn], 0.25, 3, f"{attn}#edit1"))
    assert edited[UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"].all()
    assert not any(m.any() for k, m in edited.items() if ".input_blocks.4." not in k)
    # edits also apply straight after a builder; a pattern that matches nothing is a typo, refused
    _run(["simple", "--model", base, "--edit", "cond_stage_model.*=off", "--save_to", tmp_path / "s.safetensors"])
    s, _ = _read(tmp_path / "s.safetensors")
    assert all(m.all() != k.startswith("cond_stage_model.") for k, m in s.items())
    code, out = run_cli_status(make_mask, ["edit", "--masks", str(tmp_path / "off.safetensors"), "--edit", "*atn*=on",
                                           "--save_to", str(tmp_path / "x.safetensors")], capsys)
    assert code == 2 and "match no key" in out.err


def test_sharded_and_ckpt_inputs(tmp_path):
    (base, _), b, _t = _models(tmp_path)
    folder = tmp_path / "sharded"
    folder.mkdir()
    keys = list(SHAPES)
    save_file({k: b[k] for k in keys[:3]}, str(folder / "m-00001-of-00002.safetensors"))
    save_file({k: b[k] for k in keys[3:]}, str(folder / "m-00002-of-00002.safetensors"))
    (folder / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: f"m-0000{1 if i < 3 else 2}-of-00002.safetensors" for i, k in enumerate(keys)}}))
    torch.save({k: b[k] for k in keys}, tmp_path / "model.ckpt")
    for i, model in enumerate((base, folder, tmp_path / "model.ckpt")):
        _run(["random", "--model", model, "--rate", "0.6", "--save_to", tmp_path / f"r{i}.safetensors"])
    r0, r1, r2 = (_read(tmp_path / f"r{i}.safetensors")[0] for i in range(3))
    assert all(torch.equal(r0[k], r1[k]) and torch.equal(r0[k], r2[k]) for k in keys)


def test_dry_run_writes_nothing_and_outputs_are_checked_first(tmp_path, capsys):
    (base, tuned), *_ = _models(tmp_path)
    before = fingerprints(tmp_path)
    _run(["random", "--model", base, "--dry_run", "--save_to", tmp_path / "r.safetensors"])
    assert "dry run" in capsys.readouterr().out and fingerprints(tmp_path) == before
    for argv, message in [
        (["random", "--model", base, "--save_to", base, "--overwrite"], "one of the inputs"),
        (["random", "--model", base, "--save_to", str(tmp_path / "r.bin")], "must end in .safetensors"),
        (["random", "--model", base, "--save_to", str(tmp_path / "r.safetensors"), "--report", base, "--overwrite"],
         "one of the inputs"),
        (["magnitude", "--model", tuned, "--save_to", str(tmp_path / "r.safetensors")], "needs --base"),
        (["union", "--masks", base, "--save_to", str(tmp_path / "r.safetensors")], "two or more"),
        (["random", "--model", base, "--rate", "1.5", "--save_to", str(tmp_path / "r.safetensors")], "[0, 1]"),
        (["report", "--model", base, "--save_to", str(tmp_path / "r.safetensors")], "drop --save_to"),
    ]:
        code, out = run_cli_status(make_mask, argv, capsys)
        assert code == 2 and message in out.err, (argv, out.err)
    assert fingerprints(tmp_path) == before and temp_files(tmp_path) == []


def test_model_report_norms_against_float64(tmp_path, capsys):
    (base, tuned), b, t = _models(tmp_path, torch.bfloat16)
    _run(["report", "--model", tuned, "--base", base, "--report", tmp_path / "n.json", "-v"])
    assert "‖A − base‖" in capsys.readouterr().out
    (summary,) = json.loads((tmp_path / "n.json").read_text())["model"].values()
    rows = {r["key"]: r for r in summary["layers"]}
    assert set(rows) == set(SHAPES)
    for key in SHAPES:
        a, c = t[key].double(), b[key].double()
        assert rows[key]["norm"] == pytest.approx(float(torch.linalg.vector_norm(a)), rel=1e-12)
        assert rows[key]["mean"] == pytest.approx(float(a.mean()), rel=1e-9, abs=1e-15)
        assert rows[key]["std"] == pytest.approx(float(a.std(unbiased=False)), rel=1e-9)
        assert rows[key]["absmax"] == float(a.abs().max())
        assert rows[key]["delta_norm"] == pytest.approx(float(torch.linalg.vector_norm(a - c)), rel=1e-12)
        assert rows[key]["relative"] == pytest.approx(float(torch.linalg.vector_norm(a - c) / torch.linalg.vector_norm(c)),
                                                      rel=1e-12)


def test_mask_report_counts(tmp_path, capsys):
    sets = {k: set(range(0, torch.Size(s).numel(), 3)) for k, s in SHAPES.items()}
    path = _mask_from_sets(tmp_path / "m.safetensors", sets)
    _run(["report", "--masks", path, "--report", tmp_path / "r.json"])
    text = capsys.readouterr().out
    total = sum(torch.Size(s).numel() for s in SHAPES.values())
    assert f"{sum(len(v) for v in sets.values()):,} of {total:,}" in text and "input_blocks.4" in text
    (summary,) = json.loads((tmp_path / "r.json").read_text())["masks"].values()
    assert {k: v["selected"] for k, v in summary["layers"].items()} == {k: len(v) for k, v in sets.items()}
    assert summary["total"]["share"] == pytest.approx(sum(len(v) for v in sets.values()) / total)


@pytest.mark.skipif(not matplotlib_available(), reason="matplotlib is not installed (requirements-dev.txt)")
def test_plots_are_real_pngs(tmp_path):
    (base, tuned), *_ = _models(tmp_path)
    _run(["random", "--model", base, "--save_to", tmp_path / "r.safetensors", "--plot", tmp_path / "r.png"])
    _run(["report", "--model", tuned, "--base", base, "--plot", tmp_path / "n.png"])
    for name in ("r.png", "n.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        import matplotlib.image
        pixels = matplotlib.image.imread(str(tmp_path / name))
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400 and float(pixels[..., :3].std()) > 0.01
    assert temp_files(tmp_path) == []


def test_plot_without_matplotlib_is_one_line_before_work(tmp_path, capsys, monkeypatch):
    import library.mask_build
    monkeypatch.setattr(library.mask_build, "matplotlib_available", lambda: False)
    (base, _), *_ = _models(tmp_path)
    code, out = run_cli_status(make_mask, ["random", "--model", base, "--save_to", str(tmp_path / "r.safetensors"),
                                           "--plot", str(tmp_path / "r.png")], capsys)
    assert code == 2 and "pip install -r requirements-extras.txt" in out.err
    assert not os.path.exists(tmp_path / "r.safetensors")
