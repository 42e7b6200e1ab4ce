"""merge_lora.py concat of LoHa/LoKr inputs: through their exact low-rank factors when those are smaller than
the dense weight, and a one-line warning before the work when the output would be far larger than its inputs.

Shapes are SDXL's real mid-block feed-forward (ff_net_0_proj: 10240 × 1280); LyCORIS kohya-style names."""

import os

import torch
from safetensors.torch import load_file, save_file

import merge_lora
from library.cli import parse_args
from library.lora_merge import BIG_BYTES, BIG_RATIO
from networks import adapter_from_tensors

FF = "lora_unet_middle_block_1_transformer_blocks_{}_ff_net_0_proj"  # SDXL mid block: 10 transformer blocks
OUT, IN = 10240, 1280


def lokr(path, blocks, seed, decomposed=True):
    """LoKr with w1 [16, 16] full and w2 [640, 80] (decomposed at rank 8, or full)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for b in blocks:
        name = FF.format(b)
        tensors[f"{name}.lokr_w1"] = torch.randn(16, 16, generator=g).half()
        if decomposed:
            tensors[f"{name}.lokr_w2_a"] = (torch.randn(640, 8, generator=g) * 0.1).half()
            tensors[f"{name}.lokr_w2_b"] = (torch.randn(8, 80, generator=g) * 0.1).half()
            tensors[f"{name}.alpha"] = torch.tensor(4.0)
        else:
            tensors[f"{name}.lokr_w2"] = (torch.randn(640, 80, generator=g) * 0.01).half()
    save_file(tensors, str(path))
    return str(path)


def loha(path, blocks, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for b in blocks:
        name = FF.format(b)
        for i in ("1", "2"):
            tensors[f"{name}.hada_w{i}_a"] = (torch.randn(OUT, 4, generator=g) * 0.1).half()
            tensors[f"{name}.hada_w{i}_b"] = (torch.randn(4, IN, generator=g) * 0.1).half()
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path))
    return str(path)


def run(argv, capsys):
    merge_lora.main(parse_args(merge_lora.setup_parser(), [str(a) for a in argv] + ["--family", "sdxl"]))
    return capsys.readouterr()


def delta_of(tensors, name):
    module = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".")}
    return adapter_from_tensors(module, name).delta((OUT, IN)).double()


def test_lokr_and_loha_concat_is_exact_and_low_rank(tmp_path, capsys):
    a, b = lokr(tmp_path / "a.safetensors", [0], 1), loha(tmp_path / "b.safetensors", [0], 2)
    out = tmp_path / "ab.safetensors"
    run(["--models", a, b, "--ratios", "0.7", "-0.4", "--save_to", out, "--save_precision", "float"], capsys)
    merged, name = load_file(str(out)), FF.format(0)
    up, down = merged[f"{name}.lora_up.weight"], merged[f"{name}.lora_down.weight"]
    assert f"{name}.diff" not in merged
    assert up.shape == (OUT, 16 * 8 + 4 * 4) and down.shape == (16 * 8 + 4 * 4, IN)  # r1·r2 each, stacked
    want = 0.7 * delta_of(load_file(a), name) - 0.4 * delta_of(load_file(b), name)
    got = delta_of(merged, name)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    dense_bytes = OUT * IN * 4
    assert os.path.getsize(out) < dense_bytes / 5  # the dense diff written before this change


def test_a_concat_far_larger_than_its_inputs_is_announced_before_work(tmp_path, capsys):
    """Full LoKr factors have an exact rank (16·80) whose factors exceed the weight: the concat writes dense
    diffs, 10 × 25 MB from inputs of 1 MB each. The warning comes before anything runs (here a dry run)."""
    a = lokr(tmp_path / "a.safetensors", range(10), 1, decomposed=False)
    b = lokr(tmp_path / "b.safetensors", range(10), 2, decomposed=False)
    inputs = os.path.getsize(a) + os.path.getsize(b)
    out_bytes = 10 * OUT * IN * 2  # fp16 like the inputs
    assert out_bytes > BIG_BYTES and out_bytes > BIG_RATIO * inputs  # the case the warning is for
    result = run(["--models", a, b, "--save_to", tmp_path / "ab.safetensors", "--dry_run"], capsys)
    warning = [line for line in result.err.splitlines() if "concat output" in line]
    assert len(warning) == 1
    assert f"{out_bytes / 2**20:,.1f} MB" in warning[0] and f"{inputs / 2**20:,.1f} MB" in warning[0]
    assert f"{out_bytes / inputs:.0f}×" in warning[0] and "svd_merge_lora.py --new_rank N" in warning[0]
    assert not (tmp_path / "ab.safetensors").exists()


def test_a_small_concat_says_nothing(tmp_path, capsys):
    a = lokr(tmp_path / "a.safetensors", [0, 1], 1)
    result = run(["--models", a, "--save_to", tmp_path / "o.safetensors", "--dry_run"], capsys)
    assert "concat output" not in result.err
