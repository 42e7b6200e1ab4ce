"""Mask builders, set operations and edits (library.masks) against independent computations: magnitude
thresholds recomputed in float64 from the documented rule, set operations against Python sets of flat
indices, random draws against the seed helpers and the normal law."""

import math

import pytest
import torch

from library import masks as M
from library.errors import LoraToolsError
from library.lowrank import generator_for
from library.mask_file import pack_bits, unpack_bits
from library.merge_methods import dare_mask

Q = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
K = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"


def _quantile64(values: list[float], q: float) -> float:
    """q-quantile with linear interpolation between order statistics (torch.quantile's default), in float64."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def _threshold64(a: torch.Tensor, base: torch.Tensor, q: float, kind: str, chunk: int) -> float:
    d = [abs(x - y) for x, y in zip(a.double().reshape(-1).tolist(), base.double().reshape(-1).tolist())]
    per_chunk = sorted(_quantile64(d[i:i + chunk], q) for i in range(0, len(d), chunk))
    if kind == "median":
        return per_chunk[(len(per_chunk) - 1) // 2]
    return per_chunk[min(int(q * len(per_chunk)), len(per_chunk) - 1)]


def _pair(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen).to(dtype)
    tuned = (base.float() + 0.05 * torch.randn(shape, generator=gen) ** 3).to(dtype)
    return tuned, base


@pytest.mark.parametrize("chunk", [10_000_000, 1000, 777])
@pytest.mark.parametrize("kind", M.THRESHOLD_TYPES)
@pytest.mark.parametrize("q", [0.1, 0.5, 0.93])
@pytest.mark.parametrize("select", M.SELECTIONS)
def test_magnitude_against_float64_recomputation(chunk, kind, q, select):
    a, base = _pair((64, 80))  # 5120 elements: 1 chunk, or 6 / 7 chunks with a short last one
    mask, t = M.magnitude_mask(a, base, q, kind, select, chunk=chunk)
    expected_t = _threshold64(a, base, q, kind, chunk)
    assert t == pytest.approx(expected_t, rel=1e-12, abs=1e-15)
    d = (a.double() - base.double()).abs()
    expected = d < expected_t if select == "below" else d >= expected_t
    assert mask.dtype == torch.bool and mask.shape == a.shape
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("n", [1, 2, 5, 1000, 4097])
def test_chunk_quantile_is_torch_quantile(n):
    gen = torch.Generator().manual_seed(n)
    values = torch.randint(0, 50, (n,), generator=gen).double() / 7  # ties included
    for q in (0.0, 0.01, 0.25, 0.5, 0.8, 0.999, 1.0):
        assert M.chunk_quantile(values, q) == pytest.approx(float(torch.quantile(values, q)), rel=1e-15, abs=1e-300)
        assert M.chunk_quantile(values, q) == pytest.approx(_quantile64(values.tolist(), q), rel=1e-15, abs=1e-300)


def test_magnitude_one_chunk_types_agree_and_many_chunks_differ():
    a, base = _pair((50, 50), seed=3)
    assert M.magnitude_threshold(a, base, 0.3, "median") == M.magnitude_threshold(a, base, 0.3, "quantile")
    # with 10 chunks, median (lower: index 4) and quantile (index ⌊0.3·10⌋ = 3) pick different chunk values
    assert M.magnitude_threshold(a, base, 0.3, "median", chunk=250) != M.magnitude_threshold(a, base, 0.3, "quantile",
                                                                                             chunk=250)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_magnitude_low_precision_inputs_are_compared_exactly(dtype):
    a, base = _pair((40, 30), dtype=dtype, seed=4)
    mask, t = M.magnitude_mask(a, base, 0.6, "median", "above", chunk=500)
    d = (a.double() - base.double()).abs()
    assert torch.equal(mask, d >= _threshold64(a, base, 0.6, "median", 500))


def test_magnitude_ends_and_errors():
    a, base = _pair((8, 8))
    assert M.magnitude_mask(a, base, 1.0, "median", "below")[0].all()
    assert not M.magnitude_mask(a, base, 1.0, "median", "above")[0].any()
    assert not M.magnitude_mask(a, base, 0.0, "median", "below")[0].any()
    assert M.magnitude_mask(a, base, 0.0, "quantile", "above")[0].all()
    assert M.magnitude_mask(torch.zeros(0), torch.zeros(0), 0.5, "median", "below")[0].numel() == 0
    with pytest.raises(LoraToolsError, match="differs from the base"):
        M.magnitude_mask(a, base[:4], 0.5, "median", "below", name=Q)
    bad = a.clone()
    bad[0, 0] = float("nan")
    for chunk in (M.MAGNITUDE_CHUNK, 10):
        with pytest.raises(LoraToolsError, match="NaN or inf"):
            M.magnitude_mask(bad, base, 0.5, "median", "below", name=Q, chunk=chunk)
    bad[0, 0] = float("inf")
    with pytest.raises(LoraToolsError, match="NaN or inf"):
        M.magnitude_mask(bad, base, 0.5, "quantile", "above", name=Q, chunk=10)


def test_random_mask_is_the_seeded_bernoulli_draw():
    mask = M.random_mask((300, 400), 0.3, 7, Q)
    assert torch.equal(mask, torch.rand((300, 400), generator=generator_for(7, Q)) < 0.3)
    assert torch.equal(mask, dare_mask((300, 400), 0.3, 7, Q))
    assert torch.equal(mask, M.random_mask((300, 400), 0.3, 7, Q))
    assert not torch.equal(mask, M.random_mask((300, 400), 0.3, 8, Q))
    assert not torch.equal(mask, M.random_mask((300, 400), 0.3, 7, K))
    n, share = mask.numel(), mask.float().mean().item()
    assert abs(share - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)
    assert M.random_mask((10,), 0.0, 1, Q).sum() == 0 and M.random_mask((10,), 1.0, 1, Q).all()


@pytest.mark.parametrize("mean,std,threshold", [(0.0, 1.0, 0.5), (0.2, 0.5, 0.0), (1.0, 2.0, 1.0)])
def test_gaussian_share_follows_the_normal_law(mean, std, threshold):
    mask = M.gaussian_mask((400, 500), mean, std, threshold, 3, Q)
    p = 1 - 0.5 * (1 + math.erf((threshold - mean) / (std * math.sqrt(2))))
    assert abs(mask.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / mask.numel())
    assert torch.equal(mask, M.gaussian_mask((400, 500), mean, std, threshold, 3, Q))
    assert M.gaussian_mask((5,), 0.3, 0.0, 0.2, 3, Q).all() and not M.gaussian_mask((5,), 0.1, 0.0, 0.2, 3, Q).any()


def test_quad_masks_are_disjoint_and_cover():
    parts = M.quad_masks((123, 45), 1, Q)
    total = torch.stack(parts).sum(0)
    assert len(parts) == 4 and torch.equal(total, torch.ones(123, 45, dtype=torch.int64))
    for part in parts:
        assert abs(part.float().mean().item() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / part.numel())
    assert all(torch.equal(x, y) for x, y in zip(parts, M.quad_masks((123, 45), 1, Q)))


def _from_set(indices: set[int], n: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[sorted(indices)] = True
    return mask


@pytest.mark.parametrize("operation,expected", [
    ("union", lambda a, b, c: a | b | c), ("intersection", lambda a, b, c: a & b & c),
    ("difference", lambda a, b, c: a - b - c), ("xor", lambda a, b, c: a ^ b ^ c)])
@pytest.mark.parametrize("n", [1, 13, 64, 1001])
def test_set_operations_on_packed_masks_against_python_sets(operation, expected, n):
    import random
    rng = random.Random(n)
    sets = [{i for i in range(n) if rng.random() < p} for p in (0.5, 0.3, 0.7)]
    packed = [pack_bits(_from_set(s, n)) for s in sets]
    out = unpack_bits(M.combine_packed(operation, packed), (n,))
    assert set(torch.nonzero(out).flatten().tolist()) == expected(*sets)


def test_missing_keys_count_as_all_false():
    a = {Q: [True, False, True], K: [True, True]}
    b = {Q: [False, False, True]}
    keys = [list(a), list(b)]
    assert M.combined_keys("union", keys) == [Q, K] and M.combined_keys("xor", keys) == [Q, K]
    assert M.combined_keys("intersection", keys) == [Q] and M.combined_keys("difference", keys) == [Q, K]
    assert M.combined_keys("difference", keys[::-1]) == [Q]
    packed_k = pack_bits(torch.tensor(a[K]))
    for operation, want in [("union", [True, True]), ("xor", [True, True]), ("difference", [True, True]),
                            ("intersection", [False, False])]:
        assert unpack_bits(M.combine_packed(operation, [packed_k, None]), (2,)).tolist() == want
    assert unpack_bits(M.combine_packed("union", [None, packed_k]), (2,)).tolist() == [True, True]


def test_edit_rules_parse_match_and_apply_in_order():
    rules = [M.parse_edit("model.diffusion_model.input_blocks.4=off"), M.parse_edit("*attn1.to_q*=random:0.5"),
             M.parse_edit("*.to_k.weight=gaussian:0:1:0")]
    assert rules[0].matches(Q) and rules[0].matches(K)
    assert not M.parse_edit("model.diffusion_model.input_blocks.4=off").matches(
        "model.diffusion_model.input_blocks.40.0.weight")  # a block prefix needs the dot after it
    start = torch.ones(6, 6, dtype=torch.bool)
    q = M.apply_edits(Q, start, rules, 5)
    assert torch.equal(q, M.random_mask((6, 6), 0.5, 5, f"{Q}#edit1"))  # the later rule wins
    k = M.apply_edits(K, start, rules, 5)
    assert torch.equal(k, M.gaussian_mask((6, 6), 0, 1, 0, 5, f"{K}#edit2"))
    untouched = "model.diffusion_model.out.0.weight"
    assert M.apply_edits(untouched, start, rules, 5) is start
    assert M.unmatched_rules(rules + [M.parse_edit("*nothing*=on")], [Q, K]) == ["*nothing*"]


@pytest.mark.parametrize("text", ["*=maybe", "=on", "*attn*", "*=random", "*=random:1.5", "*=random:x",
                                  "*=gaussian:0:-1:0", "*=gaussian:0:1", "*=random:nan"])
def test_bad_edit_rules_are_refused(text):
    with pytest.raises(LoraToolsError, match="--edit"):
        M.parse_edit(text)
