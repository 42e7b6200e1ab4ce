"""merge_models.py streaming: elementwise merges in chunks (bit-identical whatever the chunk size, and to the
whole-tensor merge), inputs hashed from the bytes the merge reads (equal to hashlib's digest of the file),
the recipe replay refusing a changed input before anything is renamed into place."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import merge_models
from library.formats.registry import FAMILIES
from library.mask_file import MaskWriter
from library.model_merge import MergeSettings, is_elementwise, merge_key
from library.model_merge_io import MergeInputs, chunk_elements, run_merge
from library.model_merge_plan import Strengths, build_plan
from library.model_setup import detect_places
from library.safetensors_io import LazyReader, StreamingWriter
from library.stream_hash import StreamHasher
from tests.helpers import run_cli_status, run_script, sha256, temp_files

Q = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
CONV = "model.diffusion_model.input_blocks.0.0.weight"
OUT = "model.diffusion_model.output_blocks.11.1.proj_out.weight"
TE_Q = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
POS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
BIAS = "model.diffusion_model.middle_block.2.out_layers.3.bias"
SHAPES = {Q: (8, 320), CONV: (8, 4, 3, 3), OUT: (8, 320), TE_Q: (19, 24), BIAS: (37,)}
assert all(k in FAMILIES["sd1"].table.shapes for k in (Q, CONV, OUT, TE_Q))


def write_model(path, seed: int, dtype=torch.float16, reverse: bool = False) -> dict[str, torch.Tensor]:
    """A small SD1 checkpoint; `reverse` lays its tensors out in the opposite order (another tool's file)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {k: (torch.randn(s, generator=g) * 0.1).to(dtype) for k, s in SHAPES.items()}
    tensors[POS] = torch.arange(7)[None]
    items = list(tensors.items())[::-1 if reverse else 1]
    with StreamingWriter(path, {k: (t.dtype, tuple(t.shape)) for k, t in items}, overwrite=True) as w:
        for k, t in items:
            w.write(k, t)
    return tensors


def write_mask(path, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = {k: torch.rand(SHAPES[k], generator=g) < 0.5 for k in (Q, CONV, TE_Q, BIAS)}
    with MaskWriter(path, {k: m.shape for k, m in masks.items()}) as w:
        for k, m in masks.items():
            w.write(k, m)
    return masks


@pytest.fixture
def files(tmp_path):
    models = [tmp_path / f"m{i}.safetensors" for i in range(3)]
    for i, p in enumerate(models):
        write_model(p, i, reverse=i == 2)
    base = tmp_path / "base.safetensors"
    write_model(base, 9, dtype=torch.float32)
    mask = tmp_path / "mask.safetensors"
    write_mask(mask, 4)
    return models, base, mask


LINEAR = [
    MergeSettings("weighted_sum", (0.5, 0.3, 0.2)),
    MergeSettings("add_difference", (1.0, 0.7, -0.35), has_base=True),
    MergeSettings("add", (9.0, 0.5, -0.25)),  # task_arithmetic without --base (C = A)
    MergeSettings("add", (0.4, 1.1, 0.6), has_base=True),
]
STRENGTHS = {"blocks": {"IN01": 0.5, "OUT11": 0.25}, "key_weights": (("attn1.to_q*", 0.3),), "te_ratio": 0.8}


def merged_file(tmp_path, files, settings, chunk, mask=True, name="o.safetensors"):
    models, base, mask_path = files
    with MergeInputs(models, base if settings.has_base else None, mask_path if mask else None) as inputs:
        places, _ = detect_places(inputs.models[0], "sd1", str(models[0]))
        plan = build_plan(inputs.models, inputs.base, Strengths(places, **STRENGTHS), uses_base=settings.has_base,
                          save_dtype=None, paths=[str(p) for p in models], mask=inputs.mask)
        out = tmp_path / name
        with StreamingWriter(out, {k.key: (k.dtype, k.shape) for k in plan.keys}) as writer:
            run_merge(inputs, plan, settings, writer, chunk=chunk)
    return out, plan


@pytest.mark.parametrize("settings", LINEAR, ids=lambda s: f"{s.method}{'+base' if s.has_base else ''}")
@pytest.mark.parametrize("mask", [True, False])
def test_chunked_is_bit_identical_to_whole_tensors_whatever_the_chunk(tmp_path, files, settings, mask):
    assert is_elementwise(settings)
    outs = [merged_file(tmp_path, files, settings, chunk, mask, name=f"c{chunk}.safetensors") for chunk in (8, 24, 40, 1 << 20)]
    digests = {sha256(out) for out, _ in outs}
    assert len(digests) == 1  # 8, 24, 40 elements: chunk ends everywhere, inside and across vector widths
    # ... and the whole-tensor merge of merge_key, computed here from the files' tensors, is the same bytes.
    models, base, mask_path = files
    out, plan = outs[0]
    got = load_file(str(out))
    inputs = [load_file(str(p)) for p in models]
    c = load_file(str(base))
    masks = {k: m for k, m in zip(*_mask_items(mask_path))} if mask else {}
    for item in plan.merged:
        tensors = [m[item.key].float() for m in inputs]
        want = merge_key(item.key, tensors, c[item.key].float() if settings.has_base else None, settings,
                         item.strength, masks.get(item.key)).to(item.dtype)
        assert got[item.key].view(torch.int16).equal(want.view(torch.int16)), item.key
    assert {k.key for k in plan.merged} >= ({Q, CONV, TE_Q} if mask else {Q, CONV, OUT, TE_Q, BIAS})
    assert any(k.strength not in (0, 1) for k in plan.merged)  # block/key/te weights took part


def _mask_items(path):
    from library.mask_file import read_mask

    with read_mask(path) as f:
        keys = f.keys()
        return keys, [f.get(k) for k in keys]


def chunk_reads(monkeypatch) -> list[int]:
    """The length of every read_flat from now on; a whole-tensor read fails the test (copied keys go by
    copy_file_range, merged ones by chunks)."""
    largest = []
    original = LazyReader.read_flat

    def read_flat(self, key, start, stop):
        largest.append(stop - start)
        return original(self, key, start, stop)

    def whole(self, key):
        raise AssertionError(f"whole-tensor read of {key}")

    monkeypatch.setattr(LazyReader, "read_flat", read_flat)
    monkeypatch.setattr(LazyReader, "read", whole)
    return largest


def test_chunked_merge_reads_only_chunks(tmp_path, files, monkeypatch):
    largest = chunk_reads(monkeypatch)
    merged_file(tmp_path, files, LINEAR[0], 64, mask=False)
    assert largest and max(largest) <= 64
    assert chunk_elements(2, torch.float32) == chunk_elements(9, torch.float32, budget=10 << 30)  # the cap
    assert chunk_elements(50, torch.float32) * 54 * 4 <= 192 << 20  # many inputs: smaller chunks, same memory


STATISTICAL = [
    MergeSettings("ties", (1.0, 0.8, 0.6), density=0.4, has_base=True),
    MergeSettings("ties", (1.0, 0.7, 1.3), density=0.3, sign_method="frequency"),  # C = A: B and C vote
    MergeSettings("ties", (1.0, 0.5, 0.5), density=0.5, sign_method="off", has_base=True),
    MergeSettings("magnitude_prune", (0.6, 0.9, 1.1), density=0.2, has_base=True),
    MergeSettings("dare_linear", (1.0, 0.5, 0.75), density=0.3, seed=11, has_base=True),
    MergeSettings("dare_linear", (1.0, 0.5, 0.75), density=0.6, seed=3, rescale=False),
    MergeSettings("dare_ties", (0.9, 0.5, 0.75), density=0.5, seed=5, has_base=True),
    MergeSettings("add", (1.0, 0.5, 0.5), protect=0.3, has_base=True),
    MergeSettings("ties", (1.0, 0.6, 0.6), density=0.02, protect=0.25, has_base=True),  # small tensors keep nothing
]


def _label(s: MergeSettings) -> str:
    flags = ("+base" if s.has_base else "") + ("" if s.rescale else "-norescale")
    return f"{s.method}-{s.sign_method}-d{s.density}-p{s.protect}{flags}"


@pytest.mark.parametrize("settings", STATISTICAL, ids=_label)
def test_statistics_methods_chunked_equal_merge_key_bit_for_bit(tmp_path, files, settings):
    """TIES/DARE/magnitude_prune/--protect_a: the two-pass chunked merge gives the same bytes at every chunk size,
    and the same as the whole-tensor merge_key on the files' tensors."""
    assert not is_elementwise(settings)
    outs = [merged_file(tmp_path, files, settings, chunk, name=f"c{chunk}.safetensors") for chunk in (8, 24, 40, 1 << 20)]
    assert len({sha256(out) for out, _ in outs}) == 1
    models, base, mask_path = files
    out, plan = outs[0]
    got = load_file(str(out))
    inputs = [load_file(str(p)) for p in models]
    c = load_file(str(base))
    masks = dict(zip(*_mask_items(mask_path)))
    for item in plan.merged:
        want = merge_key(item.key, [m[item.key].float() for m in inputs], c[item.key].float() if settings.has_base else None,
                         settings, item.strength, masks.get(item.key)).to(item.dtype)
        assert got[item.key].view(torch.int16).equal(want.view(torch.int16)), item.key


def test_slerp_chunked_equals_merge_key(tmp_path, files):
    models, base, mask = files
    settings = MergeSettings("slerp", (0.3, 0.7))
    outs = [merged_file(tmp_path, ([models[0], models[2]], base, mask), settings, chunk, name=f"s{chunk}.safetensors")
            for chunk in (8, 40, 1 << 20)]
    assert len({sha256(out) for out, _ in outs}) == 1
    got = load_file(str(outs[0][0]))
    a, b = load_file(str(models[0])), load_file(str(models[2]))
    masks = dict(zip(*_mask_items(mask)))
    for item in outs[0][1].merged:
        want = merge_key(item.key, [a[item.key].float(), b[item.key].float()], None, settings, item.strength,
                         masks.get(item.key)).to(item.dtype)
        assert got[item.key].view(torch.int16).equal(want.view(torch.int16)), item.key
        # and against the formula written out in float64 (no mask, strength applied to t)
        x, y = a[item.key].double().reshape(-1), b[item.key].double().reshape(-1)
        theta = torch.arccos(torch.dot(x, y) / (x.norm() * y.norm()))
        t = item.strength * 0.7
        ref = (torch.sin((1 - t) * theta) * x + torch.sin(t * theta) * y) / torch.sin(theta)
        ref = torch.where(masks[item.key].reshape(-1), ref, x) if item.key in masks else ref
        assert torch.allclose(got[item.key].double().reshape(-1), ref, atol=2e-3, rtol=2e-3), item.key


def test_magnitude_cut_over_chunks_is_top_k_with_ties_in_memory_order():
    import numpy as np

    from library.merge_methods import top_k_mask
    from library.model_merge_chunked import MagnitudeCut

    rng = random.Random(7)
    for trial in range(40):
        n = rng.randrange(1, 400)
        values = torch.tensor([float(rng.choice([0, 1, 2, 2, 3, 5])) for _ in range(n)])  # many equal values
        k = rng.randrange(-1, n + 2)
        cut = MagnitudeCut.select(values.numpy().copy(), k) if 0 < k < n else \
            MagnitudeCut(-float("inf"), 0, True) if k >= n else MagnitudeCut(float("inf"), 0, False)
        got, start = [], 0
        while start < n:
            stop = min(n, start + rng.randrange(1, 50))
            got.append(cut.keep(values[start:stop]))
            start = stop
        want = top_k_mask(values, k)
        assert torch.cat(got).equal(want), (trial, n, k)
        assert int(torch.cat(got).sum()) == max(0, min(k, n))
    assert np.isfinite(MagnitudeCut.select(np.array([1.0, 1.0], np.float32), 1).threshold)


def test_statistics_merges_read_only_chunks_and_blocks(tmp_path, files, monkeypatch):
    import library.model_merge_chunked as chunked

    largest = chunk_reads(monkeypatch)
    monkeypatch.setattr(chunked, "STATS_BLOCK", 128)  # the first pass's blocks
    for settings in (STATISTICAL[0], STATISTICAL[6]):
        merged_file(tmp_path, files, settings, 64, mask=False, name=f"{settings.method}.safetensors")
    assert largest and max(largest) <= 128 and 64 in largest


def test_methods_needing_statistics_are_not_elementwise():
    assert not is_elementwise(MergeSettings("ties", (1, 1)))
    assert not is_elementwise(MergeSettings("add", (1, 1), protect=0.1, has_base=True))
    assert not is_elementwise(MergeSettings("weighted_sum", (1, 1)), normalize="layer")


@pytest.mark.parametrize("mode", ["layer", "attn_only"])
@pytest.mark.parametrize("settings", [LINEAR[0], STATISTICAL[0]], ids=lambda s: s.method)
def test_normalize_chunked_equals_whole_tensors(tmp_path, files, settings, mode):
    from library.model_normalize import normalized

    models, base, mask_path = files

    def run(chunk):
        with MergeInputs(models, base if settings.has_base else None) as inputs:
            places, _ = detect_places(inputs.models[0], "sd1", str(models[0]))
            plan = build_plan(inputs.models, inputs.base, Strengths(places), uses_base=settings.has_base,
                              save_dtype=None, paths=[str(p) for p in models])
            out = tmp_path / f"n{chunk}.safetensors"
            with StreamingWriter(out, {k.key: (k.dtype, k.shape) for k in plan.keys}) as writer:
                run_merge(inputs, plan, settings, writer, chunk=chunk, normalize=mode)
        return out, plan

    outs = [run(chunk) for chunk in (8, 40, 1 << 20)]
    assert len({sha256(out) for out, _ in outs}) == 1
    got = load_file(str(outs[0][0]))
    inputs = [load_file(str(p)) for p in models]
    c = load_file(str(base))

    def read(k):
        return [m[k].float() for m in inputs] if all(k in m for m in inputs) else None

    scaled = 0
    for item in outs[0][1].merged:
        tensors = normalized(item.key, read(item.key), mode, read)
        scaled += not tensors[1].equal(inputs[1][item.key].float())
        want = merge_key(item.key, tensors, c[item.key].float() if settings.has_base else None, settings,
                         item.strength).to(item.dtype)
        assert got[item.key].view(torch.int16).equal(want.view(torch.int16)), item.key
    assert scaled == (2 if mode == "attn_only" else len(outs[0][1].merged))  # attn_only: Q and the TE's q_proj


def test_stream_hasher_equals_hashlib_whatever_is_offered(tmp_path):
    data = bytes(random.Random(3).randrange(256) for _ in range(100_000))
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    rng = random.Random(5)
    for _ in range(20):
        with StreamHasher([path]) as hasher:
            tap = hasher.tap(str(path))
            for _ in range(rng.randrange(12)):
                start = rng.randrange(len(data))
                stop = min(len(data), start + rng.randrange(1, 30_000))
                tap(start, memoryview(data[start:stop]))  # forward, backward, overlapping, repeated
            assert hasher.digests() == {str(path): want}
        assert hasher.tap(str(tmp_path / "other.bin")) is None


def test_hashes_in_the_metadata_are_the_files_sha256(tmp_path, files):
    import os
    models, base, mask = files
    folder = tmp_path / "sub"
    folder.mkdir()
    out, recipe = folder / "o.safetensors", folder / "r.toml"
    run_script(merge_models, ["--models", *models, "--base", base, "--mask", mask, "--method", "add_difference",
                              "--ratios", "1", "0.5", "0.5", "--family", "sd1", "--only", "unet", "--save_recipe", recipe,
                              "--save_to", out])
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    recorded = json.loads(meta["loratools.inputs"])
    want = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (*models, base, mask)}
    assert recorded == want
    import toml

    table = toml.loads(meta["loratools.recipe"])["sha256"]
    assert table == {os.path.abspath(p): want[p.name] for p in (*models, base, mask)}
    assert meta["loratools.recipe"] == recipe.read_text()
    assert temp_files(tmp_path) == []


def test_changed_input_is_refused_on_replay_before_the_rename(tmp_path, files, capsys):
    models, _, _ = files
    first, recipe = tmp_path / "a.safetensors", tmp_path / "r.toml"
    run_script(merge_models, ["--models", *models, "--family", "sd1", "--save_recipe", recipe, "--save_to", first])
    before = {p: sha256(p) for p in models}
    write_model(models[2], 77, reverse=True)  # same name, same layout, other weights
    changed = sha256(models[2])
    again = tmp_path / "b.safetensors"
    status, io = run_cli_status(merge_models, ["--recipe", str(recipe), "--save_to", str(again)], capsys)
    assert status == 2 and "sha256" in io.err and str(models[2]) in io.err
    assert not again.exists() and temp_files(tmp_path) == []
    assert sha256(models[0]) == before[models[0]] and sha256(models[2]) == changed  # inputs untouched
    write_model(models[2], 2, reverse=True)  # the original back: the replay runs and is bit-exact
    run_script(merge_models, ["--recipe", recipe, "--save_to", again])
    assert sha256(models[2]) == before[models[2]]
    a, b = load_file(str(first)), load_file(str(again))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_update_metadata_keeps_the_header_length(tmp_path):
    out = tmp_path / "o.safetensors"
    with StreamingWriter(out, {"a": (torch.float32, (3,))}, {"h": "0" * 64}) as w:
        w.write_flat("a", 0, torch.ones(2))
        w.write_flat("a", 2, torch.full((1,), 5.0))
        with pytest.raises(ValueError, match="length"):
            w.update_metadata({"h": "short"})
        w.update_metadata({"h": "ab" * 32})
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"h": "ab" * 32} and f.get_tensor("a").tolist() == [1.0, 1.0, 5.0]
    with pytest.raises(ValueError, match="never written"):
        with StreamingWriter(tmp_path / "p.safetensors", {"a": (torch.float32, (3,))}) as w:
            w.write_flat("a", 0, torch.ones(2))
    assert temp_files(tmp_path) == [] and not (tmp_path / "p.safetensors").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e5m2, torch.float8_e4m3fn])
def test_rounding_clamps_and_counts_like_a_whole_cast(dtype):
    from library.model_merge_io import Rounding
    from library.safetensors_io import cast_clamped

    top = torch.finfo(dtype).max
    high = torch.finfo(torch.float32).max if dtype == torch.bfloat16 else 2.5 * top  # past the range, finite
    values = torch.tensor([0.5, -3.0, high, -high, 1e-3, 7.0, high / 2, 0.25], dtype=torch.float32)
    whole, chunked = Rounding(), Rounding()
    stored = whole.store("k", values, dtype)
    parts = [chunked.store("k", values[i:i + 3], dtype) for i in range(0, 8, 3)]
    whole.end_key("k")
    chunked.end_key("k")
    want = cast_clamped(values, dtype)
    assert stored.float().equal(want.float()) and torch.cat(parts).float().equal(want.float())
    assert whole.clamped == chunked.clamped == (2 if dtype == torch.bfloat16 else 3) and torch.isfinite(stored.float()).all()
