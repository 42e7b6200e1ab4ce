"""merge_grid.py: the grid specs (and their one-line refusals), each cell's figures against float64 written
here from the input tensors (tests.helpers.dense_delta), a failing cell that does not stop the sweep,
--resume, --shard, recipes and the PNG grid."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch

from library.errors import LoraToolsError
from library.grid.spec import grid_cells, parse_axis
from library.safetensors_io import load_tensors
from tests.helpers import dense_delta, kohya_metadata, make_lora, run_cli_status, run_script, sdxl_modules, write_lora

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 OpenMP thread for small LAPACK calls

IN04 = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_"
TE1 = "lora_te1_text_model_encoder_layers_0_self_attn_"
# The webui lora-block-weight block of each fixture module, written out by hand (SDXL: BASE = text encoders).
BLOCKS = {IN04 + "q": "IN04", IN04 + "k": "IN04", TE1 + "q_proj": "BASE", TE1 + "k_proj": "BASE"}


def fixture(tmp_path):
    wanted = set(BLOCKS)
    modules = [m for m in sdxl_modules("attention", te2=False) if m.name in wanted]
    a = make_lora(modules, 8, alpha=4, seed=1, dtype=torch.float32)
    b = make_lora(modules[:3], 4, seed=2, dtype=torch.float32)  # partial overlap, another rank and scale
    pa = write_lora(str(tmp_path / "a.safetensors"), a, kohya_metadata("sdxl", 8, 4))
    pb = write_lora(str(tmp_path / "b.safetensors"), b, kohya_metadata("sdxl", 4))
    return [m.name for m in modules], (a, b), [pa, pb]


def grid(argv):
    import merge_grid

    return run_script(merge_grid, argv)


def csv_rows(folder) -> list[dict]:
    with open(os.path.join(folder, "grid.csv"), newline="") as f:
        return list(csv.DictReader(f))


# ---- specs ---------------------------------------------------------------------------------------------------

def test_axis_lists_ranges_aliases_and_cells():
    assert parse_axis("ratio_a=0:1:5").values == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert parse_axis("ratio_b=-1,0.5").values == (-1.0, 0.5)
    assert parse_axis("rank=4:64:4").values == (4, 24, 44, 64)
    assert parse_axis("svd_rank=1:3:5").values == (1, 2, 3)  # rounded ranks deduplicated (Power-Merge's rule)
    axis = parse_axis("mode=ties_svd, add")
    assert axis.values == ("ties", "add") and axis.field == "mode"
    assert parse_axis("new_conv_rank=8").name == "conv_rank"
    cells = grid_cells(parse_axis("ratio_a=0,1"), parse_axis("mode=ties,dare_ties"))
    assert [(c.row, c.col) for c in cells] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert cells[2].params == {"ratio_a": 0.0, "mode": "dare_ties"} and cells[2].label == "ratio_a=0 mode=dare_ties"
    assert len({c.id for c in cells}) == 4
    assert [c.params for c in grid_cells(None, None)] == [{}]


@pytest.mark.parametrize("spec, words", [
    ("ratio_a", "expected NAME=V1,V2"),
    ("=1,2", "expected NAME=V1,V2"),
    ("strength=1", "unknown parameter 'strength'"),
    ("ratio_c=0,1", "model 3, but 2 model(s)"),
    ("ratio_a=0,x", "value 'x' is not a number"),
    ("ratio_a=0,nan", "not a finite number"),
    ("density=0.5,2", "value 2 must be in (0, 1]"),
    ("rank=0,4", "value 0 must be a positive integer"),
    ("rank=4.5", "value '4.5' is not an integer"),
    ("mode=ties,bogus", "value 'bogus' is not allowed"),
    ("ratio_a=0:1:1", "COUNT in START:STOP:COUNT must be 2 or more"),
    ("ratio_a=0.5,0.5", "listed twice"),
])
def test_bad_specs_are_one_line_errors(spec, words):
    with pytest.raises(LoraToolsError) as info:
        parse_axis(spec, "--x", n_models=2)
    message = str(info.value)
    assert message.startswith(f"--x {spec!r}: ") and words in message and "\n" not in message


def test_bad_spec_on_the_command_line_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    import merge_grid

    _, _, paths = fixture(tmp_path)
    out = tmp_path / "out"
    code, captured = run_cli_status(merge_grid, ["--models", *paths, "--x", "ratio_a=0,1", "--y", "ratio_a=1,2",
                                                 "--save_to", str(out)], capsys)
    assert code == 2 and captured.err.count("\n") == 1 and "--x and --y both set ratio_a" in captured.err
    code, captured = run_cli_status(merge_grid, ["--models", *paths, "--y", "dynamic_param=2", "--dynamic_method",
                                                 "sv_fro", "--save_to", str(out)], capsys)
    assert code == 2 and captured.err.count("\n") == 1 and "cell dynamic_param=2" in captured.err
    assert not out.exists()


# ---- figures against float64 ---------------------------------------------------------------------------------

def test_each_cell_against_the_exact_merge_in_float64(tmp_path):
    names, inputs, paths = fixture(tmp_path)
    out = tmp_path / "out"
    result = grid(["--models", *paths, "--ratios", "0.7", "-0.4", "--x", "rank=2,12", "--y", "mode=add,ties",
                   "--density", "0.5", "--save_to", str(out), "--save_precision", "float"])
    rows = csv_rows(out)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    ratios = [0.7, -0.4]
    for row, gathered in zip(rows, result["rows"]):
        cell, _ = load_tensors(out / row["lora"])
        err = ex = got = dot = 0.0
        blocks: dict[str, float] = {}
        worst = 0.0
        for name in names:
            exact = sum(r * dense_delta(t, name) for t, r in zip(inputs, ratios) if f"{name}.lora_up.weight" in t)
            c = dense_delta(cell, name)
            e2, d2 = float(exact.square().sum()), float((exact - c).square().sum())
            err, ex, got, dot = err + d2, ex + e2, got + float(c.square().sum()), dot + float((exact * c).sum())
            blocks[BLOCKS[name]] = blocks.get(BLOCKS[name], 0.0) + float(c.square().sum())
            worst = max(worst, math.sqrt(d2 / e2))
        rel = math.sqrt(err / ex)
        assert float(row["relative_error"]) == pytest.approx(rel, rel=1e-5, abs=1e-6), row["label"]
        assert float(row["energy_retained"]) == pytest.approx(max(0.0, 1 - rel * rel), rel=1e-5, abs=1e-6)
        assert float(row["norm_ratio"]) == pytest.approx(math.sqrt(got / ex), rel=1e-5)
        assert float(row["cosine"]) == pytest.approx(dot / math.sqrt(got * ex), rel=1e-5)
        assert float(row["layer_error_max"]) == pytest.approx(worst, rel=1e-5, abs=1e-6)
        for block, value in blocks.items():
            assert float(row[f"norm:{block}"]) == pytest.approx(math.sqrt(value), rel=1e-5), block
        assert gathered["relative_error"] == float(row["relative_error"])  # the CSV holds the values exactly
    # add at rank 12 ≥ 8 + 4 is the exact merge; the rank-2 cut and TIES are not
    by_label = {r["label"]: float(r["relative_error"]) for r in rows}
    assert by_label["rank=12 mode=add"] < 1e-5
    assert by_label["rank=2 mode=add"] > 0.1 and by_label["rank=12 mode=ties"] > 0.05
    meta = load_tensors(out / rows[0]["lora"])[1]
    assert meta["loratools.script"] == "merge_grid.py"


def test_layer_norms_of_a_loha_layer_are_the_dense_ones(tmp_path):
    """Inputs without factors (LoHa) take the dense branch; both branches against float64 here."""
    from library.grid.metrics import layer_norms
    from library.svd_merge import LayerJob, MergeSettings, merge_layers
    from networks import adapter_from_tensors

    gen = torch.Generator().manual_seed(5)
    lora_t = {"lora_down.weight": torch.randn(3, 12, generator=gen), "lora_up.weight": torch.randn(10, 3, generator=gen),
              "alpha": torch.tensor(1.5)}
    loha_t = {f"hada_w{i}_{s}": torch.randn(*shape, generator=gen) for i in (1, 2)
              for s, shape in (("a", (10, 2)), ("b", (2, 12)))}
    loha_t["alpha"] = torch.tensor(2.0)
    lora, loha = adapter_from_tensors(lora_t, "l"), adapter_from_tensors(loha_t, "h")
    for parts in ([(0, lora, 0.8)], [(0, lora, 0.8), (1, loha, -0.5)]):
        job = LayerJob("model.diffusion_model.x.weight", (10, 12), parts, 2)
        result = merge_layers([job], MergeSettings(new_rank=2))[job.name]
        down, up = lora_t["lora_down.weight"].double(), lora_t["lora_up.weight"].double()
        exact = 0.8 * (1.5 / 3) * up @ down
        if len(parts) == 2:
            w = {k: v.double() for k, v in loha_t.items()}
            exact = exact - 0.5 * (2.0 / 2) * (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])
        c = (result.alpha / result.rank) * result.up.double() @ result.down.double()
        e, n, d = layer_norms(job, result)
        assert e == pytest.approx(float(exact.square().sum()), rel=1e-6)
        assert n == pytest.approx(float(c.square().sum()), rel=1e-6)
        assert d == pytest.approx(float((exact - c).square().sum()), rel=1e-5)


# ---- failures, resume, shards ----------------------------------------------------------------------------------

def test_a_failing_cell_is_reported_and_the_sweep_goes_on_then_resume_skips_finished(tmp_path, capsys, monkeypatch):
    import library.grid.sweep as sweep
    import merge_grid

    _, _, paths = fixture(tmp_path)
    out = tmp_path / "out"
    argv = ["--models", *paths, "--x", "ratio_a=0,1", "--y", "ratio_b=0,1", "--new_rank", "4", "--save_to", str(out)]
    code, captured = run_cli_status(merge_grid, argv, capsys)
    # cell 0 has every strength at 0: nothing to merge. It fails; the three others are written.
    assert code == 2 and "1 of 4 cell(s) failed (cell 0 ratio_a=0 ratio_b=0: nothing to merge" in captured.err
    assert "cell 0 (ratio_a=0 ratio_b=0) failed" in captured.err
    rows = csv_rows(out)
    assert [r["status"] for r in rows] == ["failed", "ok", "ok", "ok"] and "nothing to merge" in rows[0]["error"]
    loras = sorted(p for p in os.listdir(out / "cells") if p.endswith(".safetensors"))
    assert len(loras) == 3
    stamps = {p: os.stat(out / "cells" / p).st_mtime_ns for p in loras}

    # A rerun without --resume refuses to replace the cells, in one line, before any work.
    code, captured = run_cli_status(merge_grid, argv, capsys)
    assert code == 2 and "output exists; pass --overwrite" in captured.err and captured.err.count("\n") == 1

    merged = []
    real = sweep.merge_cell
    monkeypatch.setattr(sweep, "merge_cell", lambda s, cell: merged.append(cell.index) or real(s, cell))
    code, captured = run_cli_status(merge_grid, [*argv, "--resume"], capsys)
    assert code == 2 and merged == [0]  # only the failed cell is tried again
    assert "3 finished earlier (--resume)" in captured.out
    assert {p: os.stat(out / "cells" / p).st_mtime_ns for p in loras} == stamps
    assert [r["status"] for r in csv_rows(out)] == ["failed", "ok", "ok", "ok"]

    # --resume with other merge settings refuses to mix them into one sweep
    code, captured = run_cli_status(merge_grid, [*argv, "--resume", "--new_rank", "2"], capsys)
    assert code == 2 and "made with other settings (new_rank)" in captured.err


def test_shards_then_resume_gather_the_same_csv_as_one_run(tmp_path):
    _, _, paths = fixture(tmp_path)
    common = ["--models", *paths, "--x", "ratio_a=0.5,1", "--y", "rank=2,4", "--metrics_only"]
    grid([*common, "--save_to", str(tmp_path / "one")])
    for shard in ("0/2", "1/2"):
        result = grid([*common, "--save_to", str(tmp_path / "sharded"), "--shard", shard])
        assert len(result["rows"]) == 2
    assert not (tmp_path / "sharded" / "grid.csv").exists()
    result = grid([*common, "--save_to", str(tmp_path / "sharded"), "--resume"])
    assert result["skipped"] == 4
    one, sharded = ((tmp_path / d / "grid.csv").read_text() for d in ("one", "sharded"))
    assert one == sharded and one.count("\n") == 5
    assert not [p for p in os.listdir(tmp_path / "one" / "cells") if p.endswith(".safetensors")]  # --metrics_only


def test_recipe_gives_axes_models_and_flags_and_the_command_line_wins(tmp_path):
    _, _, paths = fixture(tmp_path)
    recipe = tmp_path / "sweep.toml"
    recipe.write_text(f'models = {json.dumps(paths)}\nnew_rank = 2\nmetrics_only = true\n'
                      f'y = "mode=add,magnitude_prune"\n[x]\nratio_a = [0.25, 1.0]\n')
    result = grid(["--recipe", str(recipe), "--save_to", str(tmp_path / "r")])
    assert [r["label"] for r in result["rows"]] == ["ratio_a=0.25 mode=add", "ratio_a=1 mode=add",
                                                    "ratio_a=0.25 mode=magnitude_prune", "ratio_a=1 mode=magnitude_prune"]
    record = json.loads(next((tmp_path / "r" / "cells").glob("000_*.json")).read_text())
    assert record["sweep"]["new_rank"] == 2
    result = grid(["--recipe", str(recipe), "--x", "rank=3,4", "--new_rank", "8", "--save_to", str(tmp_path / "s")])
    assert [r["label"] for r in result["rows"]][:2] == ["rank=3 mode=add", "rank=4 mode=add"]
    bad = tmp_path / "bad.toml"
    bad.write_text('y = "mode=nope"\n')
    with pytest.raises(LoraToolsError, match="y 'mode=nope': value 'nope' is not allowed"):
        grid(["--recipe", str(bad), "--models", *paths, "--save_to", str(tmp_path / "t")])


# ---- pictures ----------------------------------------------------------------------------------------------

def test_metric_grid_png_is_a_real_picture_whose_squares_differ(tmp_path):
    import matplotlib.image

    _, _, paths = fixture(tmp_path)
    out = tmp_path / "out"
    grid(["--models", *paths, "--x", "rank=1,12", "--metrics_only", "--save_to", str(out)])
    png = out / "grid.png"
    assert png.stat().st_size > 10_000
    pixels = matplotlib.image.imread(png)
    height, width = pixels.shape[:2]
    assert width > 600 and height > 150 and width > height
    assert float(pixels[..., :3].std()) > 0.05  # not a blank canvas


def test_without_matplotlib_one_line_install_hint_before_any_work(tmp_path, capsys, monkeypatch):
    import sys

    import merge_grid

    _, _, paths = fixture(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, captured = run_cli_status(merge_grid, ["--models", *paths, "--x", "rank=1,2", "--metrics_only",
                                                 "--save_to", str(tmp_path / "out")], capsys)
    assert code == 2 and captured.err.count("\n") == 1
    assert "pip install -r requirements-extras.txt" in captured.err
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_the_cells_and_writes_nothing(tmp_path, capsys):
    _, _, paths = fixture(tmp_path)
    result = grid(["--models", *paths, "--x", "density=0.25:1:4", "--y", "mode=ties,dare_ties", "--dry_run",
                   "--save_to", str(tmp_path / "out")])
    assert len(result["cells"]) == 8
    out = capsys.readouterr().out
    assert "cell 7: density=1 mode=dare_ties" in out and "8 cell(s); nothing written" in out
    assert not (tmp_path / "out").exists()
