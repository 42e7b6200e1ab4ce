"""lora_info.py --plot / --tags / --json: norms per module and per block against float64 dense deltas, the
bar charts' pixels, and the tag order."""

import json

import pytest
import torch

import lora_info
from library.plots import BAR_COLOR
from tests.helpers import (
    SD1_IN_CONV,
    SD1_IN_Q,
    SD1_OUT_LOKR,
    SD1_OUT_Q,
    SD1_TE_Q,
    ai_toolkit_single_block,
    formula_delta,
    mixed_sd1_lora,
    run_cli_status,
    run_script,
    write_lora,
)

BLOCKS = {SD1_TE_Q: "BASE", SD1_IN_Q: "IN01", SD1_IN_CONV: "IN01", SD1_OUT_Q: "OUT09", SD1_OUT_LOKR: "OUT10"}


@pytest.fixture
def mixed(tmp_path):
    tensors = mixed_sd1_lora(0)
    return write_lora(str(tmp_path / "mixed.safetensors"), tensors), tensors


def test_norms_per_module_and_block_match_dense(mixed, capsys, one_thread):
    path, tensors = mixed
    report = run_script(lora_info, [path, "--json"])[0]
    assert json.loads(capsys.readouterr().out)["blocks"] == report["blocks"]  # --json carries every field
    by_module = {m["module"]: m for m in report["module_list"]}
    for name, block in BLOCKS.items():
        assert by_module[name]["block"] == block
        assert by_module[name]["norm"] == pytest.approx(float(formula_delta(tensors, name).norm()), rel=1e-6)
    expected = {}
    for name, block in BLOCKS.items():
        expected[block] = expected.get(block, 0.0) + float(formula_delta(tensors, name).pow(2).sum())
    blocks = report["blocks"]
    assert [b["block"] for b in blocks] == ["BASE", "IN01", "OUT09", "OUT10"]  # the lbw layout's order
    for b in blocks:
        assert b["norm"] == pytest.approx(expected[b["block"]] ** 0.5, rel=1e-6)
    in01 = next(b for b in blocks if b["block"] == "IN01")
    assert in01["modules"] == 2 and in01["mean_rank"] == 5 and in01["mean_alpha"] == 4.5  # ranks 8, 2; alphas 8, 1


def test_block_norm_of_split_slices_on_one_fused_weight(tmp_path, one_thread):
    """AI-Toolkit's q/k/v LoRAs of a Flux single block all land on linear1: the block's norm is their sum's."""
    tensors = ai_toolkit_single_block(0, parts=("attn.to_q", "attn.to_k", "attn.to_v"))
    path = write_lora(str(tmp_path / "split.safetensors"), tensors)
    report = run_script(lora_info, [path, "--json"])[0]
    prefix = "transformer.single_transformer_blocks.0."
    sq = sum(float((tensors[f"{prefix}{p}.lora_B.weight"].double() @ tensors[f"{prefix}{p}.lora_A.weight"].double())
                   .pow(2).sum()) for p in ("attn.to_q", "attn.to_k", "attn.to_v"))
    (block,) = report["blocks"]
    assert block["block"] == "S00" and block["modules"] == 3
    assert block["norm"] == pytest.approx(sq ** 0.5, rel=1e-6)


def _bar_heights(image, box) -> list[int]:
    """Heights in pixels of the BAR_COLOR bars inside `box` (left, top, right, bottom), left to right."""
    rgb = tuple(int(BAR_COLOR[i:i + 2], 16) for i in (1, 3, 5))
    px = image.convert("RGB").load()
    left, top, right, bottom = box
    columns = []
    for x in range(left, right):
        columns.append(sum(1 for y in range(top, bottom) if all(abs(c - e) < 8 for c, e in zip(px[x, y], rgb))))
    bars, current = [], []
    for h in columns + [0]:
        if h:
            current.append(h)
        elif current:
            bars.append(max(current))
            current = []
    return bars


def test_plot_bars_follow_the_block_norms(tmp_path, one_thread):
    pytest.importorskip("matplotlib")
    from PIL import Image

    tensors = mixed_sd1_lora(1, skip=(SD1_TE_Q, SD1_IN_CONV, SD1_OUT_LOKR))
    tensors[f"{SD1_IN_Q}.lora_up.weight"] *= 3  # IN01 three times OUT09's norm, roughly
    path = write_lora(str(tmp_path / "two.safetensors"), tensors)
    plot = tmp_path / "info.png"
    report = run_script(lora_info, [path, "--family", "sd1", "--plot", str(plot)])[0]
    with Image.open(plot) as img:
        assert img.format == "PNG" and img.width >= 1000 and img.height >= 800
        # The per-block norm chart is the top-left panel: its bars are the only BAR_COLOR pixels up there.
        heights = _bar_heights(img, (0, 0, img.width // 2, img.height // 3))
    assert plot.stat().st_size > 20_000
    norms = [b["norm"] for b in report["blocks"]]
    assert len(heights) == 2 and norms[0] > 2 * norms[1]
    assert heights[0] / heights[1] == pytest.approx(norms[0] / norms[1], rel=0.05)


def test_plot_refuses_an_input_and_several_files(mixed, tmp_path, capsys):
    path, _ = mixed
    code, (_, err) = run_cli_status(lora_info, [path, "--plot", path + ".png", "--plot", path], capsys)
    assert code == 2 and "--plot" in err
    code, (_, err) = run_cli_status(lora_info, [path, path, "--plot", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "one LoRA file" in err
    assert not (tmp_path / "x.png").exists()


def test_tags_most_frequent_first(tmp_path, capsys):
    tensors = mixed_sd1_lora(2, skip=(SD1_IN_CONV, SD1_OUT_Q, SD1_OUT_LOKR))
    freq = {"10_alice": {"alice": 10, "smile": 3, " outdoors": 4}, "5_bg": {"smile": 2, "tree": 5, "sky": 5}}
    meta = {"ss_tag_frequency": json.dumps(freq),
            "ss_dataset_dirs": json.dumps({"10_alice": {"n_repeats": 10, "img_count": 10},
                                           "5_bg": {"n_repeats": 5, "img_count": 5}})}
    path = write_lora(str(tmp_path / "tags.safetensors"), tensors, meta)
    report = run_script(lora_info, [path, "--tags"])[0]
    # counts summed over datasets, ties by name, tags stripped
    assert report["tags"] == [["alice", 10], ["sky", 5], ["smile", 5], ["tree", 5], ["outdoors", 4]]
    assert report["dataset_dirs"][0] == {"dir": "10_alice", "token": "alice", "repeats": 10, "images": 10}
    text = capsys.readouterr().out
    lines = [line.split() for line in text.splitlines() if line.startswith("  ") and line.split()[0].isdigit()]
    assert [t for _, t in lines] == ["alice", "sky", "smile", "tree", "outdoors"]
    # Without ss_tag_frequency the dataset folders' words stand in, counted by images.
    meta.pop("ss_tag_frequency")
    write_lora(path, tensors, meta)
    assert run_script(lora_info, [path, "--json"])[0]["tags"] == [["alice", 10], ["bg", 5]]


def test_dataset_dirs_malformed_is_ignored(tmp_path):
    tensors = mixed_sd1_lora(3, skip=(SD1_IN_CONV, SD1_OUT_Q, SD1_OUT_LOKR))
    path = write_lora(str(tmp_path / "bad.safetensors"), tensors, {"ss_dataset_dirs": "{not json"})
    report = run_script(lora_info, [path])[0]
    assert report["tags"] == [] and report["dataset_dirs"] == []


def test_other_families_by_their_own_blocks(tmp_path):
    """SD3 (no lbw layout): joint blocks J00…, in numeric order, and weights outside them under "other"."""
    g = torch.Generator().manual_seed(4)
    tensors = {}
    for name, (out_dim, in_dim) in {"transformer.transformer_blocks.10.attn.to_q": (1536, 1536),
                                    "transformer.transformer_blocks.2.attn.to_q": (1536, 1536),
                                    "transformer.time_text_embed.timestep_embedder.linear_1": (1536, 256)}.items():
        tensors[f"{name}.lora_A.weight"] = torch.randn(2, in_dim, generator=g)
        tensors[f"{name}.lora_B.weight"] = torch.randn(out_dim, 2, generator=g)
    path = write_lora(str(tmp_path / "sd3.safetensors"), tensors)
    report = run_script(lora_info, [path, "--family", "sd3"])[0]
    assert [b["block"] for b in report["blocks"]] == ["J02", "J10", "other"]
    name = "transformer.transformer_blocks.10.attn.to_q"
    dense = tensors[f"{name}.lora_B.weight"].double() @ tensors[f"{name}.lora_A.weight"].double()
    assert report["blocks"][1]["norm"] == pytest.approx(float(dense.norm()), rel=1e-6)
