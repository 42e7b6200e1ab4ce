"""The SVD-merge engine (library/svd_merge.py) against independent float64 computations and PEFT.

Layers carry real kohya SDXL names with the real shape *ratios* scaled down (640 → 64, 2048 → 204, ...),
so the suite stays fast on 2 cores.
"""

from __future__ import annotations

import math

import pytest
import torch

from library.errors import LoraToolsError
from library.merge_methods import dare_mask
from library.svd_merge import LayerJob, MergeSettings, merge_layers, merged_delta
from networks import adapter_from_tensors

Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # 640×640 → 64×64
K2 = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"  # 640×2048 → 64×204
FF = "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj"  # 5120×640 → 512×64
CONV = "lora_unet_input_blocks_1_0_in_layers_2"  # 320×320×3×3 → 32×32×3×3
FC1 = "lora_te2_text_model_encoder_layers_0_mlp_fc1"  # 5120×1280 → 512×128
SHAPES = {Q: (64, 64), K2: (64, 204), FF: (512, 64), CONV: (32, 32, 3, 3), FC1: (512, 128)}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 OpenMP thread for small LAPACK calls


def lora_tensors(shape, rank, *, alpha=None, seed=0, decay=0.7):
    gen = torch.Generator().manual_seed(seed)
    fan_in = math.prod(shape[1:])
    down = torch.randn(rank, fan_in, generator=gen, dtype=torch.float64) / math.sqrt(fan_in)
    up = torch.randn(shape[0], rank, generator=gen, dtype=torch.float64) * torch.arange(1, rank + 1).pow(-decay)
    if len(shape) == 4:
        down, up = down.reshape(rank, *shape[1:]), up.reshape(shape[0], rank, 1, 1)
    tensors = {"lora_down.weight": down.float(), "lora_up.weight": up.float()}
    if alpha is not None:
        tensors["alpha"] = torch.tensor(float(alpha))
    return tensors


def dense64(tensors) -> torch.Tensor:
    """Written out independently of networks/: (alpha/r)·up@down in float64, conv flattened."""
    down, up = tensors["lora_down.weight"].double(), tensors["lora_up.weight"].double()
    r = down.shape[0]
    scale = float(tensors["alpha"]) / r if "alpha" in tensors else 1.0
    return scale * up.reshape(up.shape[0], r) @ down.reshape(r, -1)


def result64(result) -> torch.Tensor:
    k = result.report["rank_out"]
    return (result.alpha / k) * result.up.double().reshape(result.up.shape[0], k) @ result.down.double().reshape(k, -1)


def job(name, inputs, ratios, slots=None):
    slots = slots or list(range(len(inputs)))
    parts = [(s, adapter_from_tensors(t, name), w) for s, t, w in zip(slots, inputs, ratios)]
    return LayerJob(name, SHAPES[name], parts)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def truncated(matrix: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def test_add_full_rank_reproduces_weighted_sum_with_different_ranks_alphas_and_negative_ratio():
    inputs = {name: [lora_tensors(shape, 8, alpha=4, seed=1), lora_tensors(shape, 4, seed=2),
                     lora_tensors(shape, 16, alpha=32, seed=3)] for name, shape in SHAPES.items()}
    ratios = [0.8, -0.5, 1.3]
    jobs = [job(name, ts, ratios) for name, ts in inputs.items()]
    results = merge_layers(jobs, MergeSettings(new_rank=28, new_conv_rank=28))
    for name, ts in inputs.items():
        exact = sum(w * dense64(t) for w, t in zip(ratios, ts))
        r = results[name]
        assert r.report["route"] == "factored"
        assert r.report["rank_in"] == 28 and r.report["rank_out"] == 28
        assert rel(result64(r), exact) < 1e-5, name
        assert r.report["relative_error"] < 1e-5
        # alpha = rank, so a loader's scale alpha/rank is exactly 1
        assert r.alpha == 28.0
    conv = results[CONV]
    assert tuple(conv.down.shape) == (28, 32, 3, 3) and tuple(conv.up.shape) == (32, 28, 1, 1)


@pytest.mark.parametrize("k", [1, 5, 12])
def test_add_low_rank_is_the_optimal_truncation_of_the_dense_sum(k):
    inputs = {name: [lora_tensors(shape, 8, alpha=8, seed=10), lora_tensors(shape, 8, alpha=2, seed=11)]
              for name, shape in SHAPES.items()}
    ratios = [1.0, 0.7]
    results = merge_layers([job(name, ts, ratios) for name, ts in inputs.items()], MergeSettings(new_rank=k,
                                                                                                new_conv_rank=k))
    for name, ts in inputs.items():
        exact = sum(w * dense64(t) for w, t in zip(ratios, ts))
        best = truncated(exact, k)
        got = result64(results[name])
        assert rel(got, best) < 1e-4, name
        # The reported error is the Eckart–Young tail, i.e. the true distance to the exact merge.
        true_err = rel(got, exact)
        assert results[name].report["relative_error"] == pytest.approx(true_err, rel=1e-4, abs=1e-6)
        U, S, Vh = torch.linalg.svd(exact)
        assert results[name].report["energy_retained"] == pytest.approx(float(S[:k].square().sum() / S.square().sum()),
                                                                        rel=1e-5)


def test_conv_rank_is_separate_from_linear_rank():
    inputs = {name: [lora_tensors(SHAPES[name], 8, seed=20), lora_tensors(SHAPES[name], 8, seed=21)]
              for name in (Q, CONV)}
    results = merge_layers([job(n, ts, [1, 1]) for n, ts in inputs.items()], MergeSettings(new_rank=6, new_conv_rank=3))
    assert results[Q].report["rank_out"] == 6
    assert results[CONV].report["rank_out"] == 3
    exact = dense64(inputs[CONV][0]) + dense64(inputs[CONV][1])
    assert rel(result64(results[CONV]), truncated(exact, 3)) < 1e-4
    # Without --new_conv_rank, convs follow --new_rank (sd-scripts).
    again = merge_layers([job(CONV, inputs[CONV], [1, 1])], MergeSettings(new_rank=6))
    assert again[CONV].report["rank_out"] == 6


def test_partial_overlap_a_layer_only_one_input_has():
    a_q, a_ff = lora_tensors(SHAPES[Q], 4, seed=30), lora_tensors(SHAPES[FF], 4, seed=31)
    b_q = lora_tensors(SHAPES[Q], 6, seed=32)
    jobs = [job(Q, [a_q, b_q], [1.0, 0.5]), job(FF, [a_ff], [1.0], slots=[0])]
    results = merge_layers(jobs, MergeSettings(new_rank=16))
    assert rel(result64(results[FF]), dense64(a_ff)) < 1e-5
    assert results[FF].report["rank_out"] == 4  # never above the input's rank
    assert rel(result64(results[Q]), dense64(a_q) + 0.5 * dense64(b_q)) < 1e-5


def test_loha_input_goes_through_its_exact_factors_with_reported_error():
    gen = torch.Generator().manual_seed(40)
    out_dim, in_dim = SHAPES[FC1]
    loha = {"hada_w1_a": torch.randn(out_dim, 4, generator=gen), "hada_w1_b": torch.randn(4, in_dim, generator=gen),
            "hada_w2_a": torch.randn(out_dim, 4, generator=gen), "hada_w2_b": torch.randn(4, in_dim, generator=gen),
            "alpha": torch.tensor(2.0)}
    lora = lora_tensors(SHAPES[FC1], 8, seed=41)
    loha_dense = (2.0 / 4) * (loha["hada_w1_a"].double() @ loha["hada_w1_b"].double()) * (
        loha["hada_w2_a"].double() @ loha["hada_w2_b"].double())
    exact = 0.6 * loha_dense + 1.0 * dense64(lora)
    for k in (16, 128):
        r = merge_layers([job(FC1, [loha, lora], [0.6, 1.0])], MergeSettings(new_rank=k, seed=3))[FC1]
        # LoHa rank 4 is an exact rank-16 product (library.exact_lowrank): the factored route, R = 16 + 8.
        assert r.report["route"] == "factored"
        got = result64(r)
        assert r.report["relative_error"] == pytest.approx(rel(got, exact), rel=1e-3, abs=1e-6)
        best = rel(truncated(exact, k), exact)
        assert rel(got, exact) <= best * (1 + 1e-4) + 1e-6  # the optimal truncation
    assert r.report["rank_out"] == 24 and rel(got, exact) < 1e-5  # full rank: exact


def test_dora_is_refused_clearly():
    t = lora_tensors(SHAPES[Q], 4, seed=50)
    t["dora_scale"] = torch.ones(1, SHAPES[Q][1])
    with pytest.raises(LoraToolsError, match="DoRA"):
        merge_layers([job(Q, [t], [1.0])], MergeSettings())


def test_batched_layers_equal_one_by_one():
    names = [f"lora_te2_text_model_encoder_layers_{i}_mlp_fc1" for i in range(5)]
    inputs = {n: [lora_tensors(SHAPES[FC1], 8, seed=60 + i), lora_tensors(SHAPES[FC1], 8, seed=70 + i)]
              for i, n in enumerate(names)}

    def make(n):
        return LayerJob(n, SHAPES[FC1], [(s, adapter_from_tensors(t, n), w) for s, (t, w) in
                                         enumerate(zip(inputs[n], [1.0, 0.3]))])

    together = merge_layers([make(n) for n in names], MergeSettings(new_rank=5))
    for n in names:
        alone = merge_layers([make(n)], MergeSettings(new_rank=5))[n]
        assert rel(result64(together[n]), result64(alone)) < 1e-5


@pytest.mark.parametrize("method,param", [("sv_fro", 0.9), ("sv_ratio", 4.0), ("sv_cumulative", 0.7)])
def test_dynamic_rank_follows_the_formula_on_the_exact_spectrum(method, param):
    ts = [lora_tensors(SHAPES[FF], 12, seed=80), lora_tensors(SHAPES[FF], 12, seed=81)]
    exact = dense64(ts[0]) - 0.4 * dense64(ts[1])
    S = torch.linalg.svdvals(exact)
    if method == "sv_fro":
        expected = int((torch.cumsum(S.square(), 0) / S.square().sum() < param**2).sum()) + 1
    elif method == "sv_ratio":
        expected = int((S[0] / param < S).sum())
    else:
        expected = int((torch.cumsum(S, 0) / S.sum() < param).sum()) + 1
    r = merge_layers([job(FF, ts, [1.0, -0.4])], MergeSettings(new_rank=64, dynamic_method=method,
                                                                dynamic_param=param))[FF]
    assert r.report["rank_out"] == expected
    assert rel(result64(r), truncated(exact, expected)) < 1e-4
    capped = merge_layers([job(FF, ts, [1.0, -0.4])], MergeSettings(new_rank=2, dynamic_method=method,
                                                                     dynamic_param=param))[FF]
    assert capped.report["rank_out"] == min(2, expected)


def test_clamp_quantile_is_off_by_default_and_its_error_is_reported_exactly():
    ts = [lora_tensors(SHAPES[K2], 8, seed=90), lora_tensors(SHAPES[K2], 8, seed=91)]
    exact = dense64(ts[0]) + dense64(ts[1])
    plain = merge_layers([job(K2, ts, [1, 1])], MergeSettings(new_rank=16))[K2]
    assert rel(result64(plain), exact) < 1e-5
    clamped = merge_layers([job(K2, ts, [1, 1])], MergeSettings(new_rank=16, clamp_quantile=0.9))[K2]
    err = rel(result64(clamped), exact)
    assert err > 1e-3  # the clamp really changed something...
    assert clamped.report["relative_error"] == pytest.approx(err, rel=1e-4)  # ...and the report says how much


# ---------------------------------------------------------------------------------------------------------
# Element-wise modes: the merged dense delta against PEFT and against the formulas written out here


def three_inputs(name=K2):
    return [lora_tensors(SHAPES[name], r, alpha=a, seed=s) for r, a, s in ((4, 4, 100), (8, 2, 101), (6, None, 102))]


def test_element_wise_modes_match_the_written_out_formulas():
    ts = three_inputs()
    w = [1.0, 0.6, -0.8]
    deltas = [dense64(t) for t in ts]
    density = 0.3

    def topk(t):
        k = int(density * t.numel())
        keep = torch.zeros(t.numel(), dtype=torch.bool)
        keep[t.abs().reshape(-1).topk(k).indices] = True
        return t * keep.reshape(t.shape)

    pruned = [topk(d) for d in deltas]
    expected = {"magnitude_prune": sum(wi * p for wi, p in zip(w, pruned))}
    stacked = torch.stack(pruned)
    for sign_method in ("total", "frequency"):
        votes = stacked.sum(0) if sign_method == "total" else stacked.sign().sum(0)
        elected = torch.where(votes >= 0, 1.0, -1.0).double()
        agree = stacked.sign() == elected
        weighted = torch.stack([wi * p for wi, p in zip(w, pruned)])
        expected[f"ties/{sign_method}"] = (weighted * agree).sum(0) / agree.sum(0).clamp_min(1)
    masks = [dare_mask(d.shape, density, 7, f"{K2}:{i}") for i, d in enumerate(deltas)]
    kept = [d * m / density for d, m in zip(deltas, masks)]
    expected["dare_linear"] = sum(wi * k for wi, k in zip(w, kept))
    kept_stack = torch.stack(kept)
    elected = torch.where(kept_stack.sum(0) >= 0, 1.0, -1.0).double()  # sign of the unweighted sum
    agree = kept_stack.sign() == elected
    expected["dare_ties"] = (torch.stack([wi * k for wi, k in zip(w, kept)]) * agree).sum(0) / agree.sum(0).clamp_min(1)
    for key, want in expected.items():
        mode, _, sign_method = key.partition("/")
        got = merged_delta(job(K2, ts, w), MergeSettings(mode=mode, density=density, seed=7,
                                                         sign_method=sign_method or "total"))
        assert rel(got.double(), want) < 1e-5, key


def test_element_wise_modes_match_peft_merge_utils(monkeypatch):
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    ts = three_inputs()
    w = [1.0, 0.6, -0.8]
    deltas = [dense64(t).float() for t in ts]
    density, seed = 0.4, 11
    weights = torch.tensor(w)
    # DARE: PEFT draws its own Bernoulli masks; feed it ours (explicit masks, same seed rule as the engine).
    masks = [dare_mask(d.shape, density, seed, f"{K2}:{i}") for i, d in enumerate(deltas)]
    queue: list[torch.Tensor] = []

    def explicit_random_pruning(tensor, density, rescale):
        return tensor * queue.pop(0) / (density if rescale else 1.0)

    monkeypatch.setattr(merge_utils, "random_pruning", explicit_random_pruning)
    cases = {
        "add": lambda: merge_utils.task_arithmetic(deltas, weights),
        "magnitude_prune": lambda: merge_utils.magnitude_prune(deltas, weights, density),
        "ties": lambda: merge_utils.ties(deltas, weights, density, "total"),
        "ties/frequency": lambda: merge_utils.ties(deltas, weights, density, "frequency"),
        "dare_linear": lambda: merge_utils.dare_linear(deltas, weights, density),
        "dare_ties": lambda: merge_utils.dare_ties(deltas, weights, density, "total"),
        "dare_ties_svd/frequency": lambda: merge_utils.dare_ties(deltas, weights, density, "frequency"),
    }
    for key, peft_fn in cases.items():
        queue[:] = list(masks)
        want = peft_fn()
        mode, _, sign_method = key.partition("/")
        settings = MergeSettings(mode=mode, density=density, seed=seed, sign_method=sign_method or "total")
        got = merged_delta(job(K2, ts, w), settings)
        assert rel(got, want) < 1e-5, key
        # And the LoRA written for it, at full rank, reproduces that merged delta.
        full = merge_layers([job(K2, ts, w)], MergeSettings(mode=mode, density=density, seed=seed,
                                                            sign_method=sign_method or "total", new_rank=64))[K2]
        assert rel(result64(full), want.double()) < 1e-5, key


def test_dare_masks_do_not_depend_on_which_other_files_cover_the_layer():
    ts = three_inputs()
    settings = MergeSettings(mode="dare_linear", density=0.5, seed=3)
    # File 2 alone on this layer, as slot 2 of three inputs, equals file 2's own masked delta at slot 2.
    alone = merged_delta(LayerJob(K2, SHAPES[K2], [(2, adapter_from_tensors(ts[2], K2), 1.0)], n_inputs=3), settings)
    mask = dare_mask(SHAPES[K2], 0.5, 3, f"{K2}:2")
    assert rel(alone.double(), dense64(ts[2]) * mask / 0.5) < 1e-6


def test_low_rank_element_wise_merge_is_near_optimal_and_reports_its_error():
    ts = three_inputs(FF)
    settings = MergeSettings(mode="ties", density=0.5, new_rank=8)
    merged = merged_delta(job(FF, ts, [1, 1, 1]), settings).double()
    r = merge_layers([job(FF, ts, [1, 1, 1])], settings)[FF]
    got = result64(r)
    assert r.report["relative_error"] == pytest.approx(rel(got, merged), rel=1e-4)
    assert rel(got, merged) <= rel(truncated(merged, 8), merged) * 1.01


def test_bad_settings_are_user_errors():
    with pytest.raises(LoraToolsError, match="unknown merge mode"):
        MergeSettings(mode="average")
    with pytest.raises(LoraToolsError, match="density"):
        MergeSettings(mode="ties", density=0)
    with pytest.raises(LoraToolsError, match="dynamic_param"):
        MergeSettings(dynamic_method="sv_fro")
    with pytest.raises(LoraToolsError, match="new_rank"):
        MergeSettings(new_rank=0)
    assert MergeSettings(mode="dare_ties_svd").mode == "dare_ties"


def test_tucker_locon_and_lokr_inputs():
    gen = torch.Generator().manual_seed(120)
    out_dim, in_dim = 32, 32
    # LyCORIS Tucker LoCon: ΔW[o, i, h, w] = (α/r)·Σ up[o, a]·mid[a, b, h, w]·down[b, i], written out here.
    tucker = {"lora_up.weight": torch.randn(out_dim, 4, 1, 1, generator=gen),
              "lora_mid.weight": torch.randn(4, 4, 3, 3, generator=gen),
              "lora_down.weight": torch.randn(4, in_dim, 1, 1, generator=gen) * 0.1, "alpha": torch.tensor(2.0)}
    tucker64 = 0.5 * torch.einsum("oa,abhw,bi->oihw", tucker["lora_up.weight"].double().reshape(out_dim, 4),
                                  tucker["lora_mid.weight"].double(), tucker["lora_down.weight"].double().reshape(4, in_dim))
    locon = lora_tensors(SHAPES[CONV], 6, seed=121)
    exact = tucker64.reshape(out_dim, -1) - 0.3 * dense64(locon)
    r = merge_layers([job(CONV, [tucker, locon], [1.0, -0.3])], MergeSettings(new_rank=4, new_conv_rank=10))[CONV]
    assert r.report["route"] == "factored" and r.report["rank_out"] == 10
    assert rel(result64(r), exact) < 1e-5
    # LoKr: ΔW = kron(w1, w2) (both factors full: scale 1), an exact rank-32 product → factored route.
    lokr = {"lokr_w1": torch.randn(8, 4, generator=gen), "lokr_w2": torch.randn(8, 16, generator=gen) * 0.1}
    lokr64 = torch.kron(lokr["lokr_w1"].double(), lokr["lokr_w2"].double())
    lora = lora_tensors(SHAPES[Q], 4, seed=122)
    exact = 0.7 * lokr64 + dense64(lora)
    r = merge_layers([job(Q, [lokr, lora], [0.7, 1.0])], MergeSettings(new_rank=64))[Q]
    assert r.report["route"] == "factored"
    assert rel(result64(r), exact) < 1e-5
