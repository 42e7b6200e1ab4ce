"""Low-rank maths against float64 dense computations written out here."""

import math

import pytest
import torch

from library.lowrank import (
    clamp_quantile,
    factored_svd,
    lowrank_fro_norm_sq,
    randomized_svd,
    retained,
    select_rank,
    stack_factors,
    svd_to_lora,
)

torch.manual_seed(0)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def test_factored_svd_is_the_exact_svd_of_the_weighted_sum():
    ups = [torch.randn(96, 4), torch.randn(96, 8), torch.randn(96, 2)]
    downs = [torch.randn(4, 80), torch.randn(8, 80), torch.randn(2, 80)]
    weights = [0.8, -0.5, 1.3]
    dense = sum(w * u.double() @ d.double() for u, d, w in zip(ups, downs, weights))
    B, A = stack_factors(ups, downs, weights)
    U, S, Vh = factored_svd(B, A)
    assert rel(U.double() * S.double() @ Vh.double(), dense) < 1e-5
    exact = torch.linalg.svdvals(dense)
    assert torch.allclose(S.double(), exact[:14], rtol=1e-5, atol=1e-8)
    # Truncation is Eckart–Young optimal: error equals the tail of the exact spectrum.
    k = 6
    trunc = U[:, :k].double() * S[:k].double() @ Vh[:k].double()
    assert abs(float((dense - trunc).norm()) - float(exact[k:].norm())) < 1e-4 * float(exact.norm())


def test_factored_svd_batched_matches_per_layer():
    B, A = torch.randn(5, 64, 12), torch.randn(5, 12, 48)
    U, S, Vh = factored_svd(B, A)
    for i in range(5):
        assert torch.allclose(S[i].double(), torch.linalg.svdvals(B[i].double() @ A[i].double())[:12], rtol=1e-5)


def test_lowrank_norm_exact():
    B, A = torch.randn(40, 5), torch.randn(5, 30)
    assert math.isclose(float(lowrank_fro_norm_sq(B, A)), float((B.double() @ A.double()).norm() ** 2), rel_tol=1e-9)


def _matrix_with_spectrum(s, m=300, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return (u * torch.tensor(s, dtype=torch.float64)) @ v.T


def test_randomized_svd_close_to_exact_on_decaying_spectrum():
    spectrum = [float(i) ** -1.0 for i in range(1, 151)]
    M = _matrix_with_spectrum(spectrum).float()
    k = 16
    U, S, Vh = randomized_svd(M, k, generator=torch.Generator().manual_seed(1))
    assert U.shape == (300, k) and S.shape == (k,) and Vh.shape == (k, 200)
    assert torch.allclose(S.double(), torch.tensor(spectrum[:k], dtype=torch.float64), rtol=5e-3)
    optimal = math.sqrt(sum(x * x for x in spectrum[k:]))
    err = float((M.double() - U.double() * S.double() @ Vh.double()).norm())
    assert err <= 1.01 * optimal
    # Same seed, same answer.
    U2, S2, _ = randomized_svd(M, k, generator=torch.Generator().manual_seed(1))
    assert torch.equal(S, S2)


def test_select_rank_formulas_on_hand_made_spectra():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5])
    # sv_ratio: keep σ > σ1/p
    assert select_rank(s, "sv_ratio", 4.0) == 2  # 8/4 = 2: 2.0 is not > 2
    assert select_rank(s, "sv_ratio", 4.0001) == 3
    assert select_rank(s, "sv_ratio", 1.0) == 1
    # sv_cumulative: Σσ = 15.5
    assert select_rank(s, "sv_cumulative", 12.0 / 15.5) == 2  # exact tie at 8+4 = 12
    assert select_rank(s, "sv_cumulative", 0.78) == 3
    # sv_fro: Σσ² = 85.25; 64 + 16 = 80 → share 80/85.25
    assert select_rank(s, "sv_fro", math.sqrt(80 / 85.25)) == 2
    assert select_rank(s, "sv_fro", 0.97) == 3
    assert select_rank(s, "sv_fro", 1.0) == 5
    assert select_rank(s, "sv_fro", 0.0) == 1
    # cap and edge cases
    assert select_rank(s, "sv_fro", 1.0, max_rank=3) == 3
    assert select_rank(s, None, None, max_rank=9) == 5
    assert select_rank(torch.zeros(4), "sv_fro", 0.9) == 1
    assert select_rank(torch.tensor([3.0]), "sv_ratio", 10) == 1
    # with an exact total energy larger than the truncated spectrum's, more values are needed
    assert select_rank(s, "sv_fro", math.sqrt(80 / 85.25), total_energy=86.0) == 3
    assert select_rank(s, "sv_fro", 0.99, total_energy=1000.0) == 5  # never reached: everything, capped
    with pytest.raises(ValueError):
        select_rank(s, "sv_magic", 1.0)


def test_retained_figures():
    s = torch.tensor([3.0, 4.0]).sort(descending=True).values
    figures = retained(s, 1, total_energy=25.0)
    assert math.isclose(figures["fro_retained"], 4 / 5) and math.isclose(figures["rel_error"], 3 / 5)
    assert math.isclose(figures["max_sv_ratio"], 1.0)


def test_svd_to_lora_linear_and_conv():
    M = torch.randn(32, 18 * 9, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    up, down, alpha = svd_to_lora(U[:, :5], S[:5], Vh[:5], (32, 18, 3, 3))
    assert up.shape == (32, 5, 1, 1) and down.shape == (5, 18, 3, 3) and alpha == 5.0
    recon = up.reshape(32, 5) @ down.reshape(5, -1) * (alpha / 5)
    assert rel(recon, U[:, :5] * S[:5] @ Vh[:5]) < 1e-12
    up, down, alpha = svd_to_lora(U[:, :3], S[:3], Vh[:3], (32, 162))
    assert up.shape == (32, 3) and down.shape == (3, 162)


def test_clamp_quantile_bounds_values():
    up, down = torch.randn(100, 4), torch.randn(4, 100)
    cu, cd = clamp_quantile(up, down, 0.9)
    values = torch.cat([up.reshape(-1), down.reshape(-1)])
    hi = float(values.kthvalue(math.ceil(0.9 * values.numel())).values)
    assert float(cu.abs().max()) <= abs(hi) + 1e-7 and float(cd.abs().max()) <= abs(hi) + 1e-7
