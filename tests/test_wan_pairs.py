"""Wan 2.2 A14B expert pairs in svd_merge_lora.py and resize_lora.py (issue 16; library/wan_pairs.py).

Each expert's output must be exactly what the single-file command gives on that expert's files alone, and the
factored deltas must be the best rank-k approximation of the float64 sum of the inputs' up@down (a dense SVD
written here, not our QR/core engine).
"""

from __future__ import annotations

import pytest
import torch

import resize_lora
import svd_merge_lora
from library.errors import LoraToolsError
from library.formats.wan22 import EXPERT_KEY
from library.safetensors_io import load_tensors, save_tensors
from tests.helpers import dense_delta, needs_shapes, run_script

EXPERTS = ("high_noise", "low_noise")
# musubi-tuner names on Wan 2.1/2.2-14B shapes small enough for a dense float64 SVD in the test
MODULES = {"lora_unet_head_head": (64, 5120), "lora_unet_time_embedding_0": (5120, 256)}


def wan_lora(seed: int, rank: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (o, i) in MODULES.items():
        out[f"{name}.lora_down.weight"] = torch.randn(rank, i, generator=g) * 0.1
        out[f"{name}.lora_up.weight"] = torch.randn(o, rank, generator=g) * 0.1
        out[f"{name}.alpha"] = torch.tensor(4.0)
    return out


def truncated(m: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :k] * s[:k] @ vh[:k]


def assert_rank_k_of(out: dict[str, torch.Tensor], want: dict[str, torch.Tensor], k: int) -> None:
    for name, m in want.items():
        assert out[f"{name}.lora_down.weight"].shape[0] == k
        got = dense_delta(out, name)
        err = float((got - truncated(m, k)).norm() / m.norm())
        assert err < 1e-5, (name, err)


@pytest.fixture
def pair(tmp_path):
    files = {}
    for i, e in enumerate(EXPERTS):
        for j, stem in enumerate(("a", "b")):
            tensors = wan_lora(10 * i + j)
            path = tmp_path / f"{stem}_{e}.safetensors"
            save_tensors(path, tensors)
            files[stem, e] = (path, tensors)
    return files


def alone(folder, files) -> list:
    """Copies of one expert's files in a folder of their own (no partner next to them: a plain single run)."""
    folder.mkdir()
    copies = []
    for path, tensors in files:
        save_tensors(folder / path.name, tensors, overwrite=True)
        copies.append(folder / path.name)
    return copies


def same_tensors(a, b) -> None:
    ta, _ = load_tensors(a)
    tb, _ = load_tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].equal(tb[k]), k


@needs_shapes
def test_svd_merge_a_pair_by_flags_equals_each_expert_alone(tmp_path, pair, capsys):
    run_script(svd_merge_lora, ["--high_noise", pair["a", "high_noise"][0], pair["b", "high_noise"][0],
                                "--low_noise", pair["a", "low_noise"][0], pair["b", "low_noise"][0],
                                "--ratios", "1", "-0.5", "--new_rank", "4", "--save_to", tmp_path / "m.safetensors",
                                "--report", tmp_path / "r.json"])
    assert "Wan 2.2 A14B expert pair" in capsys.readouterr().out
    for e in EXPERTS:
        out, meta = load_tensors(tmp_path / f"m_{e}.safetensors")
        assert meta[EXPERT_KEY] == e
        assert (tmp_path / f"r_{e}.json").is_file()
        a, b = pair["a", e][1], pair["b", e][1]
        assert_rank_k_of(out, {n: dense_delta(a, n) - 0.5 * dense_delta(b, n) for n in MODULES}, 4)
        run_script(svd_merge_lora, ["--models", *alone(tmp_path / e, [pair["a", e], pair["b", e]]), "--ratios", "1", "-0.5",
                                    "--new_rank", "4", "--save_to", tmp_path / f"alone_{e}.safetensors"])
        same_tensors(tmp_path / f"m_{e}.safetensors", tmp_path / f"alone_{e}.safetensors")


@needs_shapes
def test_svd_merge_finds_the_pair_by_name(tmp_path, pair):
    run_script(svd_merge_lora, ["--models", pair["a", "low_noise"][0], pair["b", "low_noise"][0],
                                "--new_rank", "4", "--save_to", tmp_path / "ab_LOW.safetensors"])
    for e, name in (("high_noise", "ab_HIGH"), ("low_noise", "ab_LOW")):
        out, meta = load_tensors(tmp_path / f"{name}.safetensors")
        assert meta[EXPERT_KEY] == e
        a, b = pair["a", e][1], pair["b", e][1]
        assert_rank_k_of(out, {n: dense_delta(a, n) + dense_delta(b, n) for n in MODULES}, 4)


@needs_shapes
@pytest.mark.parametrize("by_name", [False, True])
def test_resize_a_pair_equals_each_expert_alone(tmp_path, pair, by_name):
    given = (["--model", pair["a", "high_noise"][0]] if by_name else
             ["--high_noise", pair["a", "high_noise"][0], "--low_noise", pair["a", "low_noise"][0]])
    run_script(resize_lora, [*given, "--new_rank", "3", "--save_to", tmp_path / "small.safetensors"])
    for e in EXPERTS:
        out, meta = load_tensors(tmp_path / f"small_{e}.safetensors")
        assert meta[EXPERT_KEY] == e
        src = pair["a", e][1]
        assert_rank_k_of(out, {n: dense_delta(src, n) for n in MODULES}, 3)
        run_script(resize_lora, ["--model", *alone(tmp_path / e, [pair["a", e]]), "--new_rank", "3",
                                 "--save_to", tmp_path / f"alone_{e}.safetensors"])
        same_tensors(tmp_path / f"small_{e}.safetensors", tmp_path / f"alone_{e}.safetensors")


def test_a_lone_expert_file_is_a_plain_run(tmp_path):
    save_tensors(tmp_path / "x_high_noise.safetensors", wan_lora(1))  # no partner next to it
    run_script(resize_lora, ["--model", tmp_path / "x_high_noise.safetensors", "--new_rank", "2",
                             "--save_to", tmp_path / "y.safetensors", "--family", "wan21"])
    _, meta = load_tensors(tmp_path / "y.safetensors")
    assert EXPERT_KEY not in meta
    assert not list(tmp_path.glob("y_*"))


def test_pair_refusals_come_before_any_work(tmp_path, pair):
    hi, lo = pair["a", "high_noise"][0], pair["a", "low_noise"][0]
    with pytest.raises(LoraToolsError, match="given as --high_noise but its name or metadata says low_noise"):
        run_script(resize_lora, ["--high_noise", lo, "--low_noise", hi, "--save_to", tmp_path / "o.safetensors"])
    # --save_to named for one expert: the outputs are it and its partner, here the inputs themselves
    before = {p: p.read_bytes() for p in (hi, lo)}
    with pytest.raises(LoraToolsError, match="input"):
        run_script(svd_merge_lora, ["--high_noise", hi, "--low_noise", lo, "--save_to", hi, "--overwrite"])
    assert {p: p.read_bytes() for p in (hi, lo)} == before
    with pytest.raises(LoraToolsError, match="not both"):
        run_script(svd_merge_lora, ["--models", hi, "--high_noise", hi, "--save_to", tmp_path / "o.safetensors"])
    with pytest.raises(LoraToolsError, match="no LoRA given"):
        run_script(resize_lora, ["--save_to", tmp_path / "o.safetensors"])
    g = torch.Generator().manual_seed(0)
    flux = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(2, 3072, generator=g),
            "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(3072, 2, generator=g)}
    save_tensors(tmp_path / "f.safetensors", flux)
    with pytest.raises(LoraToolsError, match=r"--high_noise for a Wan 2.2 A14B expert .* but this is a flux1 LoRA"):
        run_script(resize_lora, ["--high_noise", tmp_path / "f.safetensors", "--low_noise", lo,
                                 "--save_to", tmp_path / "o.safetensors"])
    assert not list(tmp_path.glob("o*")) and not list(tmp_path.glob("*.tmp*"))
