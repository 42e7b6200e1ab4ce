"""LoHa and LoKr in the factored route of svd_merge / resize through their exact low-rank factors.

Every product is checked against the dense delta written out here in float64 from LyCORIS' formulas
(Hadamard product of two low-rank terms, Kronecker product, Tucker cores), to 1e-6 relative; the real
LyCORIS LoKr file of data/real-loras is checked module by module. Names are real kohya SD1.x ones.
"""

from __future__ import annotations

import os

import pytest
import torch

from library.exact_lowrank import ExactFactors, factored_is_cheaper, fits_as_factors, lowrank_parts
from library.resize import ResizeJob, ResizeSettings, resize_layers
from library.svd_merge import LayerJob, MergeSettings, merge_layers, uses_factored_route
from networks import adapter_from_tensors
from tests.helpers import SHARED_DATA

pytestmark = pytest.mark.usefixtures("one_thread")

Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # 640×640 → 64×48 here
CONV = "lora_unet_down_blocks_0_downsamplers_0_conv"  # 320×320×3×3 → 24×20×3×3 here
REAL_LOKR = os.path.join(SHARED_DATA, "real-loras", "LyCORIS__smart_falcon_4_lokr.safetensors")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def randn(*shape, g):
    return torch.randn(*shape, generator=g)


def loha(out, inp, r, *, kernel=None, seed=0):
    """LoHa tensors and their dense float64 delta [out, in·k·k] from the formula."""
    g = torch.Generator().manual_seed(seed)
    t = {"alpha": torch.tensor(float(r) / 2)}
    halves = []
    for i in ("1", "2"):
        a, b = randn(r, out, g=g) * 0.3, randn(r, inp, g=g) * 0.3
        if kernel:  # LyCORIS Tucker: M[p, q, h, w] = Σ_ij t[i, j, h, w]·b[j, q]·a[i, p]
            core = randn(r, r, kernel, kernel, g=g) * 0.3
            t[f"hada_w{i}_a"], t[f"hada_w{i}_b"], t[f"hada_t{i}"] = a, b, core
            m = torch.einsum("ijhw,jq,ip->pqhw", core.double(), b.double(), a.double()).reshape(out, -1)
        else:
            t[f"hada_w{i}_a"], t[f"hada_w{i}_b"] = a.T.contiguous(), b
            m = a.double().T @ b.double()
        halves.append(m)
    return t, 0.5 * halves[0] * halves[1]


def kron64(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """kron written out: K[(i, k), (j, l)] = w1[i, j]·w2[k, l]."""
    a, b = w1.double(), w2.double()
    return torch.einsum("ij,kl->ikjl", a, b).reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])


def lokr(kind: str, seed=0):
    """(tensors, dense float64 delta [out, in·k·k], shape) for LoKr variants."""
    g = torch.Generator().manual_seed(seed)
    if kind == "decomposed":  # w1 [4, 4] = a@b rank 2, w2 [16, 12] rank 3, alpha 1.5 → scale 0.5
        t = {"lokr_w1_a": randn(4, 2, g=g), "lokr_w1_b": randn(2, 4, g=g), "lokr_w2_a": randn(16, 3, g=g),
             "lokr_w2_b": randn(3, 12, g=g), "alpha": torch.tensor(1.5)}
        w1, w2 = t["lokr_w1_a"].double() @ t["lokr_w1_b"].double(), t["lokr_w2_a"].double() @ t["lokr_w2_b"].double()
        return t, 0.5 * kron64(w1, w2), (64, 48)
    if kind == "full":  # both full: scale 1, exact rank min(4, 2)·min(8, 24) = 16 on 32×48
        t = {"lokr_w1": randn(4, 2, g=g), "lokr_w2": randn(8, 24, g=g)}
        return t, kron64(t["lokr_w1"], t["lokr_w2"]), (32, 48)
    if kind == "tucker_conv":  # w2 = t2 ×₁ a ×₂ b, a 3×3 conv: (4·6) × (4·5·3·3)
        t = {"lokr_w1": randn(4, 4, g=g), "lokr_w2_a": randn(2, 6, g=g), "lokr_w2_b": randn(2, 5, g=g),
             "lokr_t2": randn(2, 2, 3, 3, g=g), "alpha": torch.tensor(2.0)}
        w2 = torch.einsum("ijhw,jq,ip->pqhw", t["lokr_t2"].double(), t["lokr_w2_b"].double(), t["lokr_w2_a"].double())
        # 4-D kron: K[(i,k), (j,l), h, w] = w1[i, j]·w2[k, l, h, w]
        k4 = torch.einsum("ij,klhw->ikjlhw", t["lokr_w1"].double(), w2).reshape(24, 20, 3, 3)
        return t, k4.reshape(24, -1), (24, 20, 3, 3)
    # "falcon_conv": the real file's layout on a conv, w2 [b, d·kh·kw] whose columns do not split by the kernel
    t = {"lokr_w1_a": randn(4, 2, g=g), "lokr_w1_b": randn(2, 12, g=g), "lokr_w2_a": randn(6, 2, g=g),
         "lokr_w2_b": randn(2, 15, g=g), "alpha": torch.tensor(1.0)}
    w1, w2 = t["lokr_w1_a"].double() @ t["lokr_w1_b"].double(), t["lokr_w2_a"].double() @ t["lokr_w2_b"].double()
    return t, 0.5 * kron64(w1, w2), (24, 20, 3, 3)


CASES = {
    "loha": lambda: (*loha(64, 48, 3, seed=1), (64, 48)),
    "loha_tucker_conv": lambda: (*loha(24, 20, 2, kernel=3, seed=2), (24, 20, 3, 3)),
    **{f"lokr_{k}": (lambda k=k: lokr(k, seed=3)) for k in ("decomposed", "full", "tucker_conv", "falcon_conv")},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_factors_equal_the_dense_delta(case):
    tensors, dense, shape = CASES[case]()
    adapter = adapter_from_tensors(tensors, case)
    up, down = ExactFactors(adapter).factors()
    assert up.shape[1] == adapter.exact_rank and down.shape == (adapter.exact_rank, dense.shape[1])
    assert rel(up.double() @ down.double(), dense) < 1e-6
    assert rel(adapter.delta(shape).double().reshape(shape[0], -1), dense) < 1e-6  # the formula above is LyCORIS'


@pytest.mark.parametrize("case", sorted(CASES))
def test_resize_and_svd_merge_go_factored_and_reproduce_the_delta(case):
    tensors, dense, shape = CASES[case]()
    adapter = adapter_from_tensors(tensors, case)
    full = adapter.exact_rank
    # resize at the exact rank: the result is the delta itself
    r = resize_layers([ResizeJob(case, shape, adapter)], ResizeSettings(new_rank=full, new_conv_rank=full))[case]
    assert r.route == "factored" and r.rank <= full
    got = (r.alpha / r.rank) * r.up.double().reshape(shape[0], -1) @ r.down.double().reshape(r.rank, -1)
    assert rel(got, dense) < 1e-6
    # svd_merge with a plain LoRA beside it, cut to rank 3: the optimal truncation of the merged delta
    g = torch.Generator().manual_seed(9)
    lora_up, lora_down = randn(shape[0], 2, g=g), randn(2, dense.shape[1], g=g) * 0.1
    lora_t = {"lora_up.weight": lora_up.reshape(shape[0], 2, *[1] * (len(shape) - 2)),
              "lora_down.weight": lora_down.reshape(2, *shape[1:])}
    merged = 0.7 * dense - 0.4 * (lora_up.double() @ lora_down.double())
    job = LayerJob(case, shape, [(0, adapter, 0.7), (1, adapter_from_tensors(lora_t, case), -0.4)])
    settings = MergeSettings(new_rank=3, new_conv_rank=3, dtype=torch.float64)
    assert uses_factored_route(job, settings)
    m = merge_layers([job], settings)[case]
    U, S, Vh = torch.linalg.svd(merged, full_matrices=False)
    best = U[:, :3] * S[:3] @ Vh[:3]
    assert m.route == "factored"
    got = (m.alpha / 3) * m.up.double().reshape(shape[0], 3) @ m.down.double().reshape(3, -1)
    assert rel(got, best) < 1e-6
    assert m.relative_error == pytest.approx(float(S[3:].norm() / S.norm()), rel=1e-6)


def test_a_large_exact_rank_goes_dense_and_stays_correct():
    """LoHa rank 8 on 64×48: exact rank 64 ≥ min(out, in), so the factors are no thinner than the weight."""
    (tensors, dense), shape = loha(64, 48, 8, seed=4), (64, 48)
    adapter = adapter_from_tensors(tensors, Q)
    assert lowrank_parts([adapter], shape, 8) is None
    r = resize_layers([ResizeJob(Q, shape, adapter)], ResizeSettings(new_rank=48))[Q]
    assert r.route.startswith("dense")
    got = (r.alpha / r.rank) * r.up.double() @ r.down.double()
    assert rel(got, dense) < 1e-5  # rank 48 = min(out, in): exact up to the randomized SVD's float32 rounding


def test_the_rules():
    # size: factors no larger than the weight (the concat writer and the PEFT writer use this one rule)
    assert fits_as_factors(32, (64, 64)) and not fits_as_factors(33, (64, 64))
    assert fits_as_factors(16, (320, 320, 3, 3))
    # cost: the measured crossover (bench/bench_lycoris_routes.py): a 1280² layer cut to rank 16 is factored
    # up to R ≈ 200, and never at R ≥ min(out, in)
    assert factored_is_cheaper(192, (1280, 1280), 16) and not factored_is_cheaper(256, (1280, 1280), 16)
    assert factored_is_cheaper(256, (1280, 1280), 64) and not factored_is_cheaper(512, (1280, 1280), 64)
    assert not factored_is_cheaper(640, (640, 640), 640)
    # a full diff or DoRA sends the layer to the dense route; plain LoRAs are always factored
    diff = adapter_from_tensors({"diff": torch.zeros(8, 8)}, Q)
    lo = adapter_from_tensors({"lora_up.weight": torch.ones(8, 2), "lora_down.weight": torch.ones(2, 8)}, Q)
    assert lowrank_parts([lo, diff], (8, 8), 2) is None and lowrank_parts([lo], (8, 8), 2) == [lo]


def test_merge_mode_other_than_add_stays_dense():
    tensors, _, shape = CASES["lokr_decomposed"]()
    job = LayerJob(Q, shape, [(0, adapter_from_tensors(tensors, Q), 1.0)])
    assert not uses_factored_route(job, MergeSettings(mode="ties", density=0.5))


def test_real_lokr_file():
    if not os.path.exists(REAL_LOKR):
        pytest.skip(f"real LoKr file absent: {REAL_LOKR}")
    from library.inputs import read_loras

    (lora,) = read_loras([REAL_LOKR])
    assert len(lora.modules) > 300
    worst, jobs, checked = 0.0, [], set()
    for i, module in enumerate(lora.modules):
        adapter = adapter_from_tensors(module.tensors, module.source)
        shape = tuple(module.target.shape)
        jobs.append(ResizeJob(module.source, shape, adapter))
        if i % 6:
            continue  # the dense float64 check on every 6th module (a 1280×11520 conv costs ~1 s)
        checked.add(len(shape))
        t = {k: v.double() for k, v in module.tensors.items()}
        w1 = t["lokr_w1_a"] @ t["lokr_w1_b"] if "lokr_w1_a" in t else t["lokr_w1"]
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"] if "lokr_w2_a" in t else t["lokr_w2"]
        scale = float(t["alpha"]) / t["lokr_w2_b"].shape[0] if "alpha" in t and "lokr_w2_b" in t else 1.0
        dense = scale * kron64(w1.reshape(w1.shape[0], -1), w2.reshape(w2.shape[0], -1))
        up, down = ExactFactors(adapter).factors()
        worst = max(worst, rel(up.double() @ down.double(), dense.reshape(shape[0], -1)))
    assert worst < 1e-6 and checked == {2, 4}  # Linear and 3×3 conv modules
    # The whole file resized at its exact rank (16 per module): all factored, each layer reproduced.
    results = resize_layers(jobs, ResizeSettings(new_rank=16))
    assert {r.route for r in results.values()} == {"factored"}
    assert max(r.relative_error for r in results.values()) < 1e-6
    sample = jobs[:: max(1, len(jobs) // 4)]
    for job in sample:
        r = results[job.name]
        got = (r.alpha / r.rank) * r.up.double().reshape(job.shape[0], -1) @ r.down.double().reshape(r.rank, -1)
        assert rel(got, job.adapter.delta(job.shape).double().reshape(job.shape[0], -1)) < 1e-6
