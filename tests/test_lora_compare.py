"""lora_compare.py and library.lora_stats: every figure against a float64 recomputation from dense deltas
written out from the adapter formulas (tests.helpers.formula_delta) (LoRA, 3×3 LoCon, LoHa, LoKr; a fused weight's row slices)."""

import json

import pytest
import torch

import lora_compare
from library.formats import read_lora
from library.lora_stats import compare_pair, sign_conflicts, target_factors
from tests.helpers import (
    KOHYA_MODULE,
    PEFT_MODULE,
    SD1_IN_Q,
    SD1_TE_Q,
    kohya_lora,
    peft_lora,
    run_cli_status,
    run_script,
    write_lora,
)
from tests.helpers import formula_delta as dense
from tests.helpers import mixed_sd1_lora as mixed_lora


def top_space(m: torch.Tensor, k: int):
    U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    rank = int((S[0] * 1e-10 < S).sum())
    return U[:, :min(k, rank)], Vh[:min(k, rank)].T


@pytest.fixture
def two_files(tmp_path):
    a, b = mixed_lora(0), mixed_lora(1, skip=(SD1_TE_Q,))
    # One layer shares a direction with A: B's IN01 to_q = A's + a little of its own, so the figures are not ~0.
    up, down = f"{SD1_IN_Q}.lora_up.weight", f"{SD1_IN_Q}.lora_down.weight"
    b[up] = torch.cat([a[up][:, :4], b[up][:, 4:]], 1)
    b[down] = torch.cat([a[down][:4], b[down][4:]])
    pa, pb = write_lora(str(tmp_path / "a.safetensors"), a), write_lora(str(tmp_path / "b.safetensors"), b)
    return (pa, a), (pb, b)


def test_metrics_match_dense_float64(two_files, one_thread):
    (pa, a), (pb, b) = two_files
    la, lb = read_lora(pa), read_lora(pb, family="sd1")  # b alone fits sd1 and sd2
    result = compare_pair(target_factors(la), target_factors(lb), la.family, top_k=3)
    rows = {row["block"] + ":" + row["target"].split(".")[-3]: row for row in result["layers"]}
    assert len(result["layers"]) == 4 and result["only_in_a"] == [next(m.target.key for m in la.modules if m.source == SD1_TE_Q)]
    names = {m.target.key: m.source for m in la.modules}
    conflicts = entries = 0
    for row in result["layers"]:
        da, db = dense(a, names[row["target"]]), dense(b, names[row["target"]])
        cos = float((da * db).sum() / (da.norm() * db.norm()))
        assert row["cosine"] == pytest.approx(cos, abs=1e-6)
        assert row["relative_norm"] == pytest.approx(float(db.norm() / da.norm()), rel=1e-6)
        (ua, va), (ub, vb) = top_space(da, 3), top_space(db, 3)
        k = min(ua.shape[1], ub.shape[1])
        assert row["overlap_out"] == pytest.approx(float((ua[:, :k].T @ ub[:, :k]).pow(2).sum()) / k, abs=1e-6)
        assert row["overlap_in"] == pytest.approx(float((va[:, :k].T @ vb[:, :k]).pow(2).sum()) / k, abs=1e-6)
        n_conf = int(((da * db) < 0).sum())
        assert row["sign_conflict"] == pytest.approx(n_conf / da.numel(), abs=1e-12)
        conflicts, entries = conflicts + n_conf, entries + da.numel()
    assert rows["IN01:attn1"]["cosine"] > 0.3, rows  # the shared half shows
    # Overall: the TE layer only A changes counts in A's norm (cosine, rel_norm), not in the sign count.
    sa = sum(float(dense(a, n).pow(2).sum()) for n in names.values())
    sb = sum(float(dense(b, names[k]).pow(2).sum()) for k in names if names[k] != SD1_TE_Q)
    dot = sum(float((dense(a, names[k]) * dense(b, names[k])).sum()) for k in names if names[k] != SD1_TE_Q)
    assert result["overall"]["cosine"] == pytest.approx(dot / (sa * sb) ** 0.5, abs=1e-6)
    assert result["overall"]["relative_norm"] == pytest.approx((sb / sa) ** 0.5, rel=1e-6)
    assert result["overall"]["sign_conflict"] == pytest.approx(conflicts / entries, abs=1e-12)


def test_sign_conflicts_chunking_is_exact(two_files, one_thread):
    (pa, _), (pb, _) = two_files
    fa, fb = target_factors(read_lora(pa)), target_factors(read_lora(pb, family="sd1"))
    for key in fb:
        assert sign_conflicts(fa[key], fb[key], chunk=1000) == sign_conflicts(fa[key], fb[key])
        assert sign_conflicts(fa[key], fa[key]) == (0, fa[key].up.shape[0] * fa[key].down.shape[1])


def test_row_slices_meet_the_fused_weight(tmp_path, one_thread):
    """Flux: a kohya LoRA on the fused single-block linear1 against AI-Toolkit q/k/v/mlp slices of the same delta."""
    g = torch.Generator().manual_seed(5)
    h, r = 3072, 2
    sizes = {"attn.to_q": h, "attn.to_k": h, "attn.to_v": h, "proj_mlp": 4 * h}
    ups = {p: torch.randn(n, r, generator=g) for p, n in sizes.items()}
    downs = {p: torch.randn(r, h, generator=g) for p in sizes}
    split = {}
    for p in sizes:
        split[f"transformer.single_transformer_blocks.0.{p}.lora_A.weight"] = downs[p]
        split[f"transformer.single_transformer_blocks.0.{p}.lora_B.weight"] = ups[p]
    fused_delta = torch.cat([ups[p].double() @ downs[p].double() for p in sizes])  # [21504, 3072]
    # The fused file holds only the q part's factors padded: ΔW_fused = q rows of the split file, zeros elsewhere.
    up = torch.zeros(sum(sizes.values()), r)
    up[:h] = ups["attn.to_q"]
    fused = {"lora_unet_single_blocks_0_linear1.lora_down.weight": downs["attn.to_q"],
             "lora_unet_single_blocks_0_linear1.lora_up.weight": up,
             "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(float(r))}
    ps = write_lora(str(tmp_path / "split.safetensors"), split)
    pf = write_lora(str(tmp_path / "fused.safetensors"), fused)
    ls, lf = read_lora(ps), read_lora(pf)
    result = compare_pair(target_factors(ls), target_factors(lf), "flux1")
    (row,) = result["layers"]
    q = fused_delta[:h]
    assert row["target"] == "single_blocks.0.linear1.weight" and row["block"] == "S00"
    assert row["cosine"] == pytest.approx(float(q.pow(2).sum() / (q.norm() * fused_delta.norm())), abs=1e-6)
    assert row["relative_norm"] == pytest.approx(float(q.norm() / fused_delta.norm()), rel=1e-6)
    assert row["sign_conflict"] == 0.0  # where the fused file is zero nothing conflicts; on q rows they agree


def test_cli_json_table_and_heat_map(two_files, tmp_path, capsys, one_thread):
    pytest.importorskip("matplotlib")
    from PIL import Image

    (pa, _), (pb, _) = two_files
    plot = tmp_path / "cmp.png"
    pairs = run_script(lora_compare, [pa, pb, pa, "--json", "--plot", str(plot), "--plot_metric", "overlap_out"])
    out = json.loads(capsys.readouterr().out)
    assert [(p["a"], p["b"]) for p in out["pairs"]] == [("1:a", "2:b"), ("1:a", "3:a"), ("2:b", "3:a")]
    assert out["pairs"][1]["overall"]["cosine"] == pytest.approx(1.0, abs=1e-9)  # a file against itself
    assert out["pairs"][1]["overall"]["sign_conflict"] == 0.0
    assert pairs[0]["layers"] == out["pairs"][0]["layers"]
    with Image.open(plot) as img:
        assert img.format == "PNG" and img.width > 300 and img.height > 200
    assert plot.stat().st_size > 10_000
    run_script(lora_compare, [pa, pb])
    text = capsys.readouterr().out
    assert "a ~ b: cosine" in text and "sign_conflict" in text and len(text.splitlines()) == 3 + 4


def test_bias_deltas_are_rows_of_their_own_and_count_overall(tmp_path, capsys, one_thread):
    g = torch.Generator().manual_seed(9)
    a, b = mixed_lora(0), mixed_lora(1)
    mid = "lora_unet_mid_block_attentions_0_proj_in"
    a[f"{SD1_IN_Q}.diff_b"] = torch.randn(320, generator=g)
    b[f"{SD1_IN_Q}.diff_b"] = 0.5 * a[f"{SD1_IN_Q}.diff_b"] + torch.randn(320, generator=g)
    a[f"{mid}.diff_b"] = torch.randn(1280, generator=g)  # a bias-only module that only A has
    pa, pb = write_lora(str(tmp_path / "a.safetensors"), a), write_lora(str(tmp_path / "b.safetensors"), b)
    run_script(lora_compare, [pa, pb, "--json", "--family", "sd1"])
    (pair,) = json.loads(capsys.readouterr().out)["pairs"]
    q_bias = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.bias"
    assert pair["only_in_a"] == ["model.diffusion_model.middle_block.1.proj_in.bias"]
    (row,) = [r for r in pair["layers"] if r["target"] == q_bias]
    va, vb = a[f"{SD1_IN_Q}.diff_b"].double(), b[f"{SD1_IN_Q}.diff_b"].double()
    assert row["block"] == "IN01" and len(pair["layers"]) == 5 + 1
    assert row["cosine"] == pytest.approx(float(va @ vb / (va.norm() * vb.norm())), abs=1e-9)
    assert row["relative_norm"] == pytest.approx(float(vb.norm() / va.norm()), rel=1e-9)
    assert row["sign_conflict"] == pytest.approx(float(((va * vb) < 0).double().mean()), abs=1e-12)
    # Overall: weights and biases together, as one long delta vector per file
    names = [SD1_TE_Q, *(n for n in {k.rsplit(".", 2)[0] for k in a} if n != mid and n != SD1_TE_Q)]
    flat_a = torch.cat([dense(a, n).flatten() for n in names] + [va, a[f"{mid}.diff_b"].double()])
    flat_b = torch.cat([dense(b, n).flatten() for n in names] + [vb, torch.zeros(1280, dtype=torch.float64)])
    assert pair["overall"]["cosine"] == pytest.approx(float(flat_a @ flat_b / (flat_a.norm() * flat_b.norm())), abs=1e-9)
    assert pair["overall"]["relative_norm"] == pytest.approx(float(flat_b.norm() / flat_a.norm()), rel=1e-9)
    # A LoRA's own bias (PEFT lora_B.bias) is scaled by alpha/rank like its product: the same delta as diff_b
    peft, meta = peft_lora(rank=4, alpha=2.0)
    peft[f"{PEFT_MODULE}.lora_B.bias"] = torch.randn(640, generator=g)
    kohya = {**kohya_lora(), f"{KOHYA_MODULE}.diff_b": 0.5 * peft[f"{PEFT_MODULE}.lora_B.bias"]}
    pp = write_lora(str(tmp_path / "peft.safetensors"), peft, meta)
    pk = write_lora(str(tmp_path / "kohya.safetensors"), kohya)
    run_script(lora_compare, [pp, pk, "--json", "--family", "sdxl"])
    (pair,) = json.loads(capsys.readouterr().out)["pairs"]
    (row,) = [r for r in pair["layers"] if r["target"].endswith(".bias")]
    assert row["cosine"] == pytest.approx(1.0, abs=1e-12) and row["relative_norm"] == pytest.approx(1.0, rel=1e-7)


def test_cli_refuses_one_file_and_mixed_families(two_files, tmp_path, capsys):
    (pa, _), _ = two_files
    code, (out, err) = run_cli_status(lora_compare, [pa], capsys)
    assert code == 2 and "at least two" in err and len(err.strip().splitlines()) == 1
    flux = write_lora(str(tmp_path / "flux.safetensors"), {
        "lora_unet_single_blocks_0_linear2.lora_down.weight": torch.randn(2, 15360),
        "lora_unet_single_blocks_0_linear2.lora_up.weight": torch.randn(3072, 2)})
    code, (out, err) = run_cli_status(lora_compare, [pa, flux], capsys)
    assert code == 2 and "different model families" in err
