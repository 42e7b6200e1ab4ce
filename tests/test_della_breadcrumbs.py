"""della and breadcrumbs (library/merge_methods_sparse.py) against float64 implementations written here from
the papers' equations, in delta space (svd_merge) and factor space (merge_lora), plus their flags.

DELLA (Deep et al. 2024), MAGPRUNE per row: rank r by |value| (0 = smallest), keep with probability
p = density − ε + 2ε·r/(n − 1), rescale kept by 1/p; elect the sign of Σ kept; mean of the agreeing
weighted entries; × λ. Breadcrumbs (Davari & Belilovsky 2024): drop the ⌊γn⌋ largest |values|, keep the
next ⌊density·n⌋, drop the rest; Σ wᵢ·masked tᵢ.
"""

from __future__ import annotations

import math

import pytest
import torch

from library.errors import LoraToolsError
from library.lowrank import generator_for
from library.merge_methods import MergeContext, merge_factors, merge_tensors
from library.svd_merge import LayerJob, MergeSettings, merge_layers, merged_delta
from networks import adapter_from_tensors
from tests.helpers import kohya_metadata, make_lora, run_cli_status, run_script, sdxl_modules, write_lora

pytestmark = pytest.mark.usefixtures("one_thread")

Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
SHAPE = (24, 30)


def lora(rank, seed):
    g = torch.Generator().manual_seed(seed)
    return {"lora_up.weight": torch.randn(SHAPE[0], rank, generator=g),
            "lora_down.weight": torch.randn(rank, SHAPE[1], generator=g), "alpha": torch.tensor(float(rank) / 2)}


def delta64(t):
    r = t["lora_down.weight"].shape[0]
    return float(t["alpha"]) / r * t["lora_up.weight"].double() @ t["lora_down.weight"].double()


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ---- the references, written from the equations ------------------------------------------------------------

def row_ranks(t: torch.Tensor) -> list[list[int]]:
    rows = t.reshape(t.shape[0], -1).tolist()
    out = []
    for row in rows:
        order = sorted(range(len(row)), key=lambda j: (abs(row[j]), j))
        ranks = [0] * len(row)
        for position, j in enumerate(order):
            ranks[j] = position
        out.append(ranks)
    return out


def keep_probabilities(t: torch.Tensor, density: float, eps: float) -> torch.Tensor:
    n = t.reshape(t.shape[0], -1).shape[1]
    ranks = torch.tensor(row_ranks(t), dtype=torch.float64)
    return (density - eps + 2 * eps * ranks / (n - 1)).reshape(t.shape)


def della_reference(ts, weights, density, eps, lam, masks):
    kept = []
    for t, m in zip(ts, masks):
        p = keep_probabilities(t, density, eps)
        kept.append(torch.where(m, t.double() / p, torch.zeros_like(p)))
    total = sum(kept)
    sign = torch.where(total >= 0, 1.0, -1.0).double()
    agree = [(k.sign() == sign).double() for k in kept]
    num = sum(w * k * a for w, k, a in zip(weights, kept, agree))
    count = torch.clamp(sum(agree), min=1)
    return lam * num / count


def drawn_masks(ts, density, eps, seed, name):
    """The masks of the seeded run: u < p with u drawn from (seed, '<name>:della:<i>') (the documented stream)."""
    return [torch.rand(tuple(t.shape), generator=generator_for(seed, f"{name}:della:{i}"), dtype=torch.float64)
            < keep_probabilities(t, density, eps) for i, t in enumerate(ts)]


def breadcrumbs_reference(ts, weights, density, gamma):
    out = 0
    for t, w in zip(ts, weights):
        flat = t.double().reshape(-1).tolist()
        order = sorted(range(len(flat)), key=lambda j: (-abs(flat[j]), j))
        top, keep = int(gamma * len(flat)), int(density * len(flat))
        mask = torch.zeros(len(flat), dtype=torch.float64)
        mask[order[top:top + keep]] = 1.0
        out = out + w * t.double() * mask.reshape(t.shape)
    return out


# ---- delta space ------------------------------------------------------------------------------------------

def job(inputs, ratios):
    return LayerJob(Q, SHAPE, [(i, adapter_from_tensors(t, Q), w) for i, (t, w) in enumerate(zip(inputs, ratios))])


def test_della_delta_space_equals_the_reference():
    inputs, ratios = [lora(4, 1), lora(6, 2), lora(3, 3)], [1.0, 0.6, -0.5]
    settings = MergeSettings(mode="della", density=0.5, epsilon=0.2, lambda_=1.3, seed=11, dtype=torch.float64,
                             new_rank=min(SHAPE))
    got = merged_delta(job(inputs, ratios), settings)
    deltas = [delta64(t) for t in inputs]
    want = della_reference(deltas, ratios, 0.5, 0.2, 1.3, drawn_masks(deltas, 0.5, 0.2, 11, Q))
    assert rel(got, want) < 1e-5
    # the whole svd_merge at full rank writes that delta
    r = merge_layers([job(inputs, ratios)], settings)[Q]
    assert r.route.startswith("dense")
    k = r.rank
    assert rel((r.alpha / k) * r.up.double() @ r.down.double(), want) < 1e-5
    # seeded: the same seed gives the same delta, another seed another one
    assert torch.equal(merged_delta(job(inputs, ratios), settings), got)
    other = MergeSettings(mode="della", density=0.5, epsilon=0.2, lambda_=1.3, seed=12, dtype=torch.float64)
    assert rel(merged_delta(job(inputs, ratios), other), got) > 1e-2


def test_della_explicit_masks_and_keep_statistics():
    g = torch.Generator().manual_seed(5)
    ts = [torch.randn(6, 9, generator=g, dtype=torch.float64) for _ in range(2)]
    masks = [torch.rand(6, 9, generator=g) < 0.5 for _ in range(2)]
    ctx = MergeContext(density=0.6, epsilon=0.3, lambda_=0.8, masks=masks)
    assert rel(merge_tensors("della", ts, [0.7, 1.2], ctx), della_reference(ts, [0.7, 1.2], 0.6, 0.3, 0.8, masks)) < 1e-12
    # MAGPRUNE keeps the largest entries of a row most often: rates follow p over 200×400 entries
    big = torch.randn(200, 400, generator=g, dtype=torch.float64)
    kept = merge_tensors("della", [big], [1.0], MergeContext(density=0.5, epsilon=0.2, seed=3, name="x")) != 0
    ranks = torch.tensor(row_ranks(big))
    assert abs(kept.double().mean().item() - 0.5) < 0.01
    assert abs(kept[ranks >= 360].double().mean().item() - 0.68) < 0.02  # p ≈ 0.3 + 0.4·0.95
    assert abs(kept[ranks < 40].double().mean().item() - 0.32) < 0.02


def test_breadcrumbs_delta_space_equals_the_reference():
    inputs, ratios = [lora(4, 4), lora(5, 5)], [0.8, 1.1]
    settings = MergeSettings(mode="breadcrumbs", density=0.7, gamma=0.05, dtype=torch.float64)
    got = merged_delta(job(inputs, ratios), settings)
    want = breadcrumbs_reference([delta64(t) for t in inputs], ratios, 0.7, 0.05)
    assert rel(got, want) < 1e-5
    # n = 720 entries: ⌊0.05·720⌋ = 36 outliers go, the next ⌊0.7·720⌋ = 503 (0.7·720 is 503.99… in binary) stay
    single = merge_tensors("breadcrumbs", [delta64(inputs[0])], [1.0], MergeContext(density=0.7, gamma=0.05))
    assert int((single != 0).sum()) == 503
    assert single.abs().max() < delta64(inputs[0]).abs().max()


# ---- factor space (merge_lora's --mode della / breadcrumbs) ----------------------------------------------

def test_factor_space_applies_the_method_to_ups_and_downs():
    g = torch.Generator().manual_seed(8)
    ups = [torch.randn(12, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    downs = [torch.randn(4, 10, generator=g, dtype=torch.float64) for _ in range(2)]
    weights = [0.5, -0.8]
    up_w = [math.sqrt(abs(w)) for w in weights]
    down_w = [math.copysign(math.sqrt(abs(w)), w) for w in weights]
    ctx = MergeContext(density=0.5, epsilon=0.1, lambda_=1.44, seed=4, name=Q)
    up, down = merge_factors("della", ups, downs, weights, ctx)
    # √λ on each side, so the product carries λ once; masks from '<name>.lora_up' / '.lora_down'
    want_up = della_reference(ups, up_w, 0.5, 0.1, 1.2, drawn_masks(ups, 0.5, 0.1, 4, f"{Q}.lora_up"))
    want_down = della_reference(downs, down_w, 0.5, 0.1, 1.2, drawn_masks(downs, 0.5, 0.1, 4, f"{Q}.lora_down"))
    assert rel(up, want_up) < 1e-12 and rel(down, want_down) < 1e-12
    up, down = merge_factors("breadcrumbs", ups, downs, weights, MergeContext(density=0.6, gamma=0.1))
    assert rel(up, breadcrumbs_reference(ups, up_w, 0.6, 0.1)) < 1e-12
    assert rel(down, breadcrumbs_reference(downs, down_w, 0.6, 0.1)) < 1e-12


# ---- scripts -----------------------------------------------------------------------------------------------

def files(tmp_path):
    modules = sdxl_modules("none", te2=False)[:2]
    a, b = make_lora(modules, 4, seed=1, dtype=torch.float32), make_lora(modules, 4, seed=2, dtype=torch.float32)
    return (write_lora(str(tmp_path / "a.safetensors"), a, kohya_metadata("sdxl", 4)),
            write_lora(str(tmp_path / "b.safetensors"), b, kohya_metadata("sdxl", 4)))


def test_scripts_run_both_methods_and_record_della_seed(tmp_path):
    import merge_lora
    import svd_merge_lora
    from library.safetensors_io import load_tensors

    pa, pb = files(tmp_path)
    out = tmp_path / "d.safetensors"
    result = run_script(svd_merge_lora, ["--models", pa, pb, "--mode", "della", "--density", "0.5", "--epsilon", "0.2",
                                         "--lambda", "1.5", "--seed", "9", "--new_rank", "8", "--save_to", out])
    assert result["summary"]["layers"] == 2
    _, meta = load_tensors(str(out))
    assert any(v == "9" for k, v in meta.items() if "seed" in k)
    run_script(svd_merge_lora, ["--models", pa, pb, "--mode", "breadcrumbs_svd", "--density", "0.8", "--gamma",
                                "0.02", "--new_rank", "8", "--save_to", tmp_path / "bc.safetensors"])
    run_script(merge_lora, ["--models", pa, pb, "--mode", "della", "--density", "0.5", "--save_to",
                            tmp_path / "f.safetensors", "--family", "sdxl"])
    assert (tmp_path / "f.safetensors").exists()


@pytest.mark.parametrize("argv, message", [
    (["--mode", "della", "--density", "0.95"], "density − epsilon, density + epsilon"),
    (["--mode", "della", "--density", "0.5", "--lambda", "0"], "--lambda must be a positive"),
    (["--mode", "breadcrumbs", "--density", "0.995"], "gamma + density must be at most 1"),
])
def test_impossible_parameters_are_refused_before_work(tmp_path, capsys, argv, message):
    import svd_merge_lora

    pa, pb = files(tmp_path)
    out = tmp_path / "x.safetensors"
    status, captured = run_cli_status(svd_merge_lora, ["--models", pa, pb, *argv, "--save_to", str(out)], capsys)
    assert status == 2 and message in captured.err and not out.exists()
    with pytest.raises(LoraToolsError):
        MergeSettings(mode=argv[1], density=float(argv[3]), lambda_=float(argv[5]) if len(argv) > 5 else 1.0)
