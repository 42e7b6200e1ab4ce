"""tsv, iso_c, iso_cts, knots and np_lora (library.singular_methods) against dense float64 implementations
written here from the papers' equations: each layer's full deltas ΔWᵢ = wᵢ·(α/r)·BᵢAᵢ are formed and the
method is applied to them with full SVDs. The factored route must give the same merged delta (before the
truncation to --new_rank) to 1e-5, must never build an m×n tensor, and must be reproducible where seeded."""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from library.errors import LoraToolsError
from library.lowrank import generator_for
from library.merge_methods import MergeContext, merge_tensors
from library.methods import SingularParams, is_random, space_of
from library.singular_methods import merge_dense, merge_lowrank
from library.svd_merge import LayerJob, MergeSettings, merge_layers
from networks.lora import LoRAAdapter

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (150, 160)  # m·n = 24000: larger than any tensor the factored route may make at these ranks


def loras(ranks, shape=SHAPE, seed=0):
    """LoRAAdapters with random factors, alpha ≠ rank, of O(1) deltas."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(ranks):
        up = torch.randn(shape[0], r, generator=gen, dtype=torch.float64)
        down = torch.randn(r, shape[1], generator=gen, dtype=torch.float64) / math.sqrt(shape[1])
        out.append(LoRAAdapter(down, up, alpha=float(r) / (i + 2)))
    return out


def tasks_of(adapters, weights):
    return [(a.factors()[0] * w, a.factors()[1]) for a, w in zip(adapters, weights)]


def deltas_of(adapters, weights):
    """The dense task matrices τᵢ = wᵢ·(alpha/r)·up@down, from the stored tensors (not networks' factors())."""
    return [w * (a.alpha / a.rank) * (a.up.double() @ a.down.double()) for a, w in zip(adapters, weights)]


def ctx(name="layer", **singular):
    density = singular.pop("density", 1.0)
    seed = singular.pop("seed", 0)
    sign = singular.pop("sign_method", "total")
    return MergeContext(density=density, sign_method=sign, seed=seed, name=name, singular=SingularParams(**singular))


def factored(method, adapters, weights, keep=None, **singular):
    up, down = merge_lowrank(method, tasks_of(adapters, weights), ctx(**singular), keep=keep, dtype=torch.float64)
    return up @ down


def close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


# ---------------------------------------------------------------------------------------------------------
# Dense references, from the papers' equations


def svd(x):
    return torch.linalg.svd(x, full_matrices=False)


def numerical_rank(S, scale):
    """The documented rule: singular values below 1e-5·σ_max are rounding (float32-made deltas sit near 1e-7)."""
    return int(S.gt(1e-5 * scale).sum())


def nearest_orthonormal(x):
    """Procrustes: argmin ‖Q − x‖_F over QᵀQ = I is P Qᵀ for x = P Σ Qᵀ."""
    P, _, Qh = svd(x)
    return P @ Qh


def ref_tsv(deltas, fraction=1.0, alpha=1.0):
    T = len(deltas)
    scale = max(float(svd(d)[1][0]) for d in deltas)
    D = min(sum(numerical_rank(svd(d)[1], scale) for d in deltas), *deltas[0].shape)  # the core size Σ rᵢ
    k = max(1, math.floor(fraction * D / T))
    us, ss, vs = [], [], []
    for d in deltas:
        U, S, Vh = svd(d)
        kk = min(k, numerical_rank(S, scale))
        us.append(U[:, :kk])
        ss.append(S[:kk])
        vs.append(Vh[:kk].T)
    U, S, V = nearest_orthonormal(torch.cat(us, 1)), torch.cat(ss), nearest_orthonormal(torch.cat(vs, 1))
    return alpha * U @ torch.diag(S) @ V.T


def ref_iso_c(deltas, alpha=1.0, keep=None):
    U, S, Vh = svd(sum(deltas))
    d = numerical_rank(S, float(S[0]))
    k = d if keep is None else keep
    return alpha * S[:d].mean() * U[:, :k] @ Vh[:k]


def ref_iso_cts(deltas, fraction=0.8, alpha=1.0):
    T = len(deltas)
    U, S, Vh = svd(sum(deltas))
    D = numerical_rank(S, float(S[0]))
    k = int(D * fraction)
    specific = min(round((D - k) / T), D // T) * T
    k = D - specific
    per_task = specific // T
    uc = U[:, :k]
    us, ss, vs = [uc], [S[:k]], [Vh[:k].T]
    for d in deltas:
        u, s, vh = svd(d - uc @ uc.T @ d)
        kk = min(per_task, numerical_rank(s, float(S[0])))  # a residual's null directions are no directions
        us.append(u[:, :kk])
        ss.append(s[:kk])
        vs.append(vh[:kk].T)
    sigma = torch.cat(ss).mean()
    return alpha * sigma * nearest_orthonormal(torch.cat(us, 1)) @ nearest_orthonormal(torch.cat(vs, 1)).T


def ref_ties(coords, density):
    """TIES-Merging (Yadav et al.) written out: keep each tensor's top-density |entries|, elect the sign of
    the summed kept values, average the kept entries that agree with it."""
    kept = []
    for c in coords:
        k = int(density * c.numel())
        threshold = c.abs().flatten().kthvalue(c.numel() - k + 1).values if k < c.numel() else -1.0
        kept.append(torch.where(c.abs() >= threshold, c, torch.zeros_like(c)))
    stacked = torch.stack(kept)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).double()
    agree = (stacked.sign() == sign) & (stacked != 0)
    return (stacked * agree).sum(0) / agree.sum(0).clamp_min(1)


def ref_knots(deltas, merge, alpha=1.0):
    n = deltas[0].shape[1]
    U, S, Vh = svd(torch.cat(deltas, 1))  # [τ₁ … τ_T] = U Σ [V₁ᵀ … V_Tᵀ]
    d = numerical_rank(S, float(S[0]))
    U, S, Vh = U[:, :d], S[:d], Vh[:d]
    coords = [Vh[:, i * n:(i + 1) * n] for i in range(len(deltas))]
    return alpha * U @ torch.diag(S) @ merge(coords)


def ref_np_lora(subject, style, rank=None, mu=math.inf):
    U, S, _ = svd(style)
    k = numerical_rank(S, float(S[0])) if rank is None else rank
    uk = U[:, :k]
    c = 1.0 if math.isinf(mu) else mu / (1 + mu)
    return style + (torch.eye(subject.shape[0], dtype=subject.dtype) - c * uk @ uk.T) @ subject


# ---------------------------------------------------------------------------------------------------------
# Factored route == dense reference


CASES = [((4, 8), (1.0, 0.7)), ((6, 6, 5), (1.0, -0.5, 0.8)), ((4, 8, 6, 5), (0.9, 0.6, 1.1, 0.4))]


@pytest.mark.parametrize("ranks,weights", CASES)
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_tsv(ranks, weights, fraction):
    adapters = loras(ranks, seed=len(ranks))
    got = factored("tsv", adapters, weights, tsv_fraction=fraction, merge_alpha=1.3)
    close(got, ref_tsv(deltas_of(adapters, weights), fraction, 1.3))


@pytest.mark.parametrize("ranks,weights", CASES)
def test_iso_c(ranks, weights):
    adapters = loras(ranks, seed=10 + len(ranks))
    close(factored("iso_c", adapters, weights, merge_alpha=0.7), ref_iso_c(deltas_of(adapters, weights), 0.7))


@pytest.mark.parametrize("ranks,weights", CASES)
@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.0])
def test_iso_cts(ranks, weights, fraction):
    adapters = loras(ranks, seed=20 + len(ranks))
    got = factored("iso_cts", adapters, weights, common_space_fraction=fraction, merge_alpha=1.1)
    close(got, ref_iso_cts(deltas_of(adapters, weights), fraction, 1.1))


def test_iso_cts_with_the_whole_space_common_is_iso_c():
    adapters = loras((5, 7, 4), seed=3)
    weights = (1.0, 0.5, -0.8)
    close(factored("iso_cts", adapters, weights, common_space_fraction=1.0), factored("iso_c", adapters, weights))


@pytest.mark.parametrize("ranks,weights", CASES)
@pytest.mark.parametrize("density", [1.0, 0.3])
def test_knots_ties(ranks, weights, density):
    adapters = loras(ranks, seed=30 + len(ranks))
    got = factored("knots", adapters, weights, knots_method="ties", density=density, merge_alpha=1.2)
    close(got, ref_knots(deltas_of(adapters, weights), lambda c: ref_ties(c, density), 1.2))


def test_knots_linear_is_the_exact_sum():
    adapters = loras((4, 8, 6), seed=5)
    weights = (1.0, -0.4, 0.6)
    deltas = deltas_of(adapters, weights)
    close(factored("knots", adapters, weights, knots_method="linear"), sum(deltas))
    close(ref_knots(deltas, lambda c: sum(c)), sum(deltas))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_knots_dare_is_seeded_and_matches_the_reference(method):
    adapters = loras((4, 8, 6), seed=6)
    weights = (1.0, 0.6, 0.8)
    density = 0.4

    def dare(coords):
        # Masks as merge_methods draws them: a CPU generator per (seed, "<layer>#knots:<input>").
        kept = [c * (torch.rand(c.shape, generator=generator_for(7, f"layer#knots:{i}")) < density) / density
                for i, c in enumerate(coords)]
        if method == "dare_linear":
            return sum(kept)
        return ref_ties(kept, 1.0)

    got = factored("knots", adapters, weights, knots_method=method, density=density, seed=7)
    close(got, ref_knots(deltas_of(adapters, weights), dare))
    again = factored("knots", adapters, weights, knots_method=method, density=density, seed=7)
    assert torch.equal(got, again)
    other = factored("knots", adapters, weights, knots_method=method, density=density, seed=8)
    assert float((other - got).norm()) > 1e-3 * float(got.norm())


@pytest.mark.parametrize("rank,mu", [(None, math.inf), (3, math.inf), (None, 2.0), (5, 0.5), (None, 0.0)])
def test_np_lora(rank, mu):
    subject, style = loras((8, 6), seed=40)
    weights = (0.9, 1.2)
    got = factored("np_lora", [subject, style], weights, np_rank=rank, np_mu=mu)
    d_subject, d_style = deltas_of([subject, style], weights)
    close(got, ref_np_lora(d_subject, d_style, rank, mu))


def test_np_lora_hard_projection_leaves_the_style_directions_to_the_style():
    subject, style = loras((8, 6), seed=41)
    merged = factored("np_lora", [subject, style], (1.0, 1.0))
    d_subject, d_style = deltas_of([subject, style], (1.0, 1.0))
    U = svd(d_style)[0][:, :6]
    close(U.T @ merged, U.T @ d_style)  # the subject adds nothing along the style's output directions


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "knots", "np_lora"])
def test_dense_functions_agree_with_the_factored_route(method):
    """merge_tensors(method, dense deltas) — the form for checkpoint deltas — gives the same merge."""
    adapters = loras((5, 7), seed=50)
    weights = (1.0, 0.6)
    dense = merge_tensors(method, [a.delta() for a in adapters], list(weights), ctx())
    close(dense.double(), factored(method, adapters, weights))
    bias = merge_dense(method, [torch.ones(3), torch.full((3,), 2.0)], [1.0, 0.5])
    assert torch.equal(bias, torch.full((3,), 2.0))  # vectors have no singular vectors: summed


# ---------------------------------------------------------------------------------------------------------
# Never an m×n tensor


class LargestTensor(TorchFunctionMode):
    """Records the largest tensor any torch function returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "knots", "np_lora"])
def test_factored_route_never_forms_an_m_by_n_matrix(method):
    adapters = loras((4, 8, 6) if method != "np_lora" else (8, 6), seed=60)
    tasks = tasks_of(adapters, [1.0] * len(adapters))
    spy = LargestTensor()
    with spy:
        up, down = merge_lowrank(method, tasks, ctx(density=0.5), dtype=torch.float64)
    R = sum(a.rank for a in adapters)
    # The biggest tensors are the factors (m·R) and, for knots, the T stacked task coordinates (T·R·n).
    assert spy.largest <= max(SHAPE) * R * len(adapters) < SHAPE[0] * SHAPE[1]
    assert up.shape[1] <= R and down.shape[0] <= R


# ---------------------------------------------------------------------------------------------------------
# Through svd_merge (the engine truncates the result to --new_rank)


def job(adapters, weights, name="lora_unet_layer"):
    return LayerJob(name, SHAPE, [(i, a, w) for i, (a, w) in enumerate(zip(adapters, weights))])


def merged(result):
    return (result.alpha / result.rank) * result.up.double() @ result.down.double()


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "knots", "np_lora"])
def test_svd_merge_full_rank_gives_the_method_and_lower_rank_truncates_it(method):
    adapters = loras((6, 5) if method == "np_lora" else (4, 6, 5), seed=70)
    weights = [1.0, 0.7, -0.5][:len(adapters)]
    want = factored(method, adapters, weights)
    full = merge_layers([job(adapters, weights)], MergeSettings(mode=method, new_rank=64, dtype=torch.float64))
    close(merged(full["lora_unet_layer"]), want)
    assert full["lora_unet_layer"].route == "factored"
    low = merge_layers([job(adapters, weights)], MergeSettings(mode=method, new_rank=4, dtype=torch.float64))
    result = low["lora_unet_layer"]
    assert result.rank == 4
    if method == "iso_c":  # flat spectrum: the sum's 4 leading directions, each at the mean singular value
        close(merged(result), ref_iso_c(deltas_of(adapters, weights), keep=4))
    else:  # the best rank-4 approximation of the method's delta
        S = svd(want)[1]
        assert math.isclose(float((merged(result) - want).norm()), float(S[4:].norm()), rel_tol=1e-6)


def test_svd_merge_float32_matches_float64():
    adapters = loras((8, 8, 8), seed=80)
    for method in ("tsv", "iso_cts", "knots"):
        settings = MergeSettings(mode=method, new_rank=64)
        got = merge_layers([job([a for a in adapters], [1.0, 0.5, 0.8])], settings)["lora_unet_layer"]
        want = factored(method, adapters, [1.0, 0.5, 0.8])
        assert float((merged(got) - want).norm() / want.norm()) < 1e-5, method


def test_singular_modes_are_registered_and_checked():
    assert [space_of(m) for m in ("tsv", "iso_c", "iso_cts", "knots", "np_lora")] == ["delta"] * 5
    assert is_random("knots") and not is_random("tsv")
    with pytest.raises(LoraToolsError, match="dynamic_method"):
        MergeSettings(mode="iso_c", new_rank=4, dynamic_method="sv_fro", dynamic_param=0.9)
    with pytest.raises(LoraToolsError, match="--tsv_fraction"):
        SingularParams(tsv_fraction=0.0)
    with pytest.raises(LoraToolsError, match="--np_mu"):
        SingularParams(np_mu=float("nan"))
    with pytest.raises(LoraToolsError, match="exactly two"):
        merge_layers([job(loras((4, 4, 4)), [1.0, 1.0, 1.0])], MergeSettings(mode="np_lora", new_rank=4))


# ---------------------------------------------------------------------------------------------------------
# The scripts: files in, files out


def kohya_files(tmp_path, modules, family, ranks=(8, 6), seed=90):
    from tests.helpers import kohya_metadata, make_lora, write_lora

    paths, tensors = [], []
    for i, r in enumerate(ranks):
        t = make_lora(modules, r, alpha=r / 2, seed=seed + i, dtype=torch.float32)
        paths.append(write_lora(str(tmp_path / f"in{i}.safetensors"), t, kohya_metadata(family, r, r / 2)))
        tensors.append(t)
    return paths, tensors


@pytest.mark.parametrize("method,flags", [("tsv", ["--tsv_fraction", "0.5"]), ("iso_cts", []),
                                          ("knots", ["--knots_method", "dare_ties", "--density", "0.5"]),
                                          ("np_lora", ["--np_mu", "3"])])
def test_svd_merge_lora_script(tmp_path, method, flags):
    import svd_merge_lora
    from library.safetensors_io import load_tensors
    from tests.helpers import dense_delta, run_script, sdxl_modules

    modules = sdxl_modules("none", te2=False)[:2]  # CLIP-L layer 0 q, k (768×768)
    paths, inputs = kohya_files(tmp_path, modules, "sdxl")
    out = str(tmp_path / "out.safetensors")
    run_script(svd_merge_lora, ["--models", *paths, "--ratios", "1", "0.6", "--mode", method, *flags,
                                "--new_rank", "14", "--merge_alpha", "0.9", "--seed", "3", "--save_to", out,
                                "--save_precision", "float"])
    tensors, meta = load_tensors(out)
    assert ("loratools.seed" in json_params(meta)) == (method == "knots")
    for m in modules:
        deltas = [w * dense_delta(t, m.name) for t, w in zip(inputs, (1.0, 0.6))]
        got = dense_delta(tensors, m.name)
        if method == "tsv":
            want = ref_tsv(deltas, 0.5, 0.9)
        elif method == "iso_cts":
            want = ref_iso_cts(deltas, 0.8, 0.9)
        elif method == "np_lora":
            want = ref_np_lora(deltas[0], deltas[1], None, 3.0)
        else:
            want = None
        if want is not None:
            assert float((got - want).norm() / want.norm()) < 1e-5, m.name
    if method == "knots":  # seeded: the same run gives the same bytes' worth of deltas
        again = str(tmp_path / "again.safetensors")
        run_script(svd_merge_lora, ["--models", *paths, "--ratios", "1", "0.6", "--mode", method, *flags,
                                    "--new_rank", "14", "--merge_alpha", "0.9", "--seed", "3", "--save_to", again,
                                    "--save_precision", "float"])
        second, _ = load_tensors(again)
        assert all(torch.equal(tensors[k], second[k]) for k in tensors)


def json_params(meta: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in meta.items() if k.startswith("loratools."))


def test_flux_merge_lora_offers_the_methods_by_name(tmp_path):
    import flux_merge_lora
    from library.safetensors_io import load_tensors
    from tests.helpers import dense_delta, flux_modules, run_script

    # Narrow Flux layers (3072×64, 64×3072, 3072×256), so that the dense float64 reference SVDs stay cheap.
    modules = [m for m in flux_modules([], [], default_only=False)
               if m.name.endswith(("img_in", "final_layer_linear", "time_in_in_layer"))]
    paths, inputs = kohya_files(tmp_path, modules, "flux1", ranks=(4, 4))
    out = str(tmp_path / "iso.safetensors")
    run_script(flux_merge_lora, ["--models", *paths, "--mode", "iso_c", "--new_rank", "8", "--merge_alpha", "1.5",
                                 "--save_to", out, "--save_precision", "float"])
    tensors, _ = load_tensors(out)
    for m in modules:
        want = ref_iso_c([dense_delta(t, m.name) for t in inputs], 1.5)
        got = dense_delta(tensors, m.name)
        assert float((got - want).norm() / want.norm()) < 1e-5, m.name


def test_scripts_refuse_bad_singular_flags_before_any_work(tmp_path, capsys):
    import svd_merge_lora
    from tests.helpers import run_cli_status, sdxl_modules

    paths, _ = kohya_files(tmp_path, sdxl_modules("none", te2=False)[:1], "sdxl", ranks=(4, 4, 4))
    out = tmp_path / "never.safetensors"
    for flags, words in [(["--mode", "tsv", "--tsv_fraction", "1.5"], "--tsv_fraction"),
                         (["--mode", "iso_c", "--dynamic_method", "sv_fro", "--dynamic_param", "0.9"], "dynamic"),
                         (["--mode", "np_lora"], "exactly two")]:
        status, captured = run_cli_status(svd_merge_lora, ["--models", *paths, *flags, "--save_to", str(out)], capsys)
        assert status == 2 and words in captured.err, captured.err
        assert not out.exists()


@pytest.mark.parametrize("method", ["tsv", "iso_cts", "knots"])
def test_loha_and_full_inputs_enter_as_exact_factors(method):
    """A LoHa (exact rank r1·r2 factors) and a full diff (identity factorisation) merge like their deltas."""
    from networks.full import FullDiffAdapter
    from networks.loha import LoHaAdapter

    gen = torch.Generator().manual_seed(95)
    m, n = 40, 48
    loha = LoHaAdapter(torch.randn(m, 2, generator=gen), torch.randn(2, n, generator=gen),
                       torch.randn(m, 3, generator=gen), torch.randn(3, n, generator=gen), alpha=1.0)
    full = FullDiffAdapter(torch.randn(m, n, generator=gen) * 0.3)
    lora = loras((4,), shape=(m, n), seed=96)[0]
    adapters, weights = [loha, full, lora], [0.5, 1.0, 0.8]
    deltas = [w * a.delta((m, n)).double() for a, w in zip(adapters, weights)]
    got = merge_layers([LayerJob("l", (m, n), [(i, a, w) for i, (a, w) in enumerate(zip(adapters, weights))])],
                       MergeSettings(mode=method, new_rank=m, dtype=torch.float64))["l"]
    want = merge_tensors(method, deltas, [1.0] * 3, ctx(name="l"))
    close(merged(got), want)
    if method == "tsv":
        close(want, ref_tsv(deltas))
