"""safetensors I/O: header validation, atomic streaming writes, dtype casts, hashes, pickles."""

import hashlib
import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from library.errors import LoraToolsError
from library.safetensors_io import (
    LazyReader,
    StreamingWriter,
    cast_clamped,
    check_output_path,
    kohya_hashes_of_file,
    load_tensors,
    parse_dtype,
    read_header,
    save_tensors,
)
from tests.helpers import read_everything_or_our_error


def _raw_file(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)},
              str(path), metadata={"ss_network_dim": "4"})
    return str(path)


def test_reads_what_safetensors_wrote(good_file):
    with LazyReader(good_file) as r:
        assert sorted(r.keys()) == ["a", "b"]
        assert r.shape("a") == (2, 3) and r.dtype("b") == torch.float16
        assert torch.equal(r.get("a"), torch.arange(6.0).reshape(2, 3))
        assert r.metadata == {"ss_network_dim": "4"}
        assert r.get_raw("b") == torch.ones(4, dtype=torch.float16).numpy().tobytes()


@pytest.mark.parametrize("case,needle", [
    ("truncated", "outside"),
    ("header_too_long", "runs past the end"),
    ("bad_json", "not valid JSON"),
    ("unknown_dtype", "unknown dtype"),
    ("overlap", "overlaps"),
    ("not_safetensors", "safetensors"),
    ("short", "shorter than"),
    ("wrong_size", "need"),
])
def test_bad_headers_give_clear_errors(tmp_path, good_file, case, needle):
    path = tmp_path / f"{case}.safetensors"
    if case == "truncated":
        with open(good_file, "rb") as f:
            data = f.read()
        path.write_bytes(data[:-5])
    elif case == "header_too_long":
        path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    elif case == "bad_json":
        path.write_bytes(struct.pack("<Q", 5) + b"{nope")
    elif case == "unknown_dtype":
        _raw_file(path, {"x": {"dtype": "F17", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    elif case == "overlap":
        _raw_file(path, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)
    elif case == "not_safetensors":
        path.write_text("this is a text file, not tensors" * 10)
    elif case == "short":
        path.write_bytes(b"abc")
    elif case == "wrong_size":
        _raw_file(path, {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(LoraToolsError, match=needle) as info:
        LazyReader(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(LoraToolsError, match="no such file"):
        LazyReader(tmp_path / "missing.safetensors")
    with pytest.raises(LoraToolsError, match="directory"):
        LazyReader(tmp_path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_headers_never_crash(tmp_path_factory, data):
    """Random byte edits and JSON edits of a valid file: we either read it or raise our own error."""
    folder = tmp_path_factory.mktemp("mut")
    path = folder / "m.safetensors"
    save_file({"w": torch.randn(3, 4), "alpha": torch.tensor(2.0)}, str(path), metadata={"k": "v"})
    raw = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", raw[:8])[0]
    mode = data.draw(st.sampled_from(["bytes", "json", "truncate"]))
    if mode == "bytes":
        for _ in range(data.draw(st.integers(1, 6))):
            pos = data.draw(st.integers(0, 8 + header_len - 1))
            raw[pos] = data.draw(st.integers(0, 255))
    elif mode == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        header = json.loads(raw[8:8 + header_len])
        entry = header[data.draw(st.sampled_from(["w", "alpha"]))]
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        entry[field] = data.draw(st.one_of(st.integers(-5, 100), st.text(max_size=4), st.none(),
                                           st.lists(st.integers(-3, 80), max_size=3)))
        body = json.dumps(header).encode()
        raw = struct.pack("<Q", len(body)) + body + raw[8 + header_len:]
    path.write_bytes(bytes(raw))
    read_everything_or_our_error(LazyReader, path)


def test_streaming_writer_any_order_and_dtypes(tmp_path):
    tensors = {"a": torch.randn(5, 3), "b": torch.randn(7).to(torch.bfloat16), "c": torch.tensor(3.0),
               "d": torch.randn(2, 2).to(torch.float8_e4m3fn), "e": torch.randn(4).to(torch.float8_e5m2)}
    specs = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    out = tmp_path / "out.safetensors"
    with StreamingWriter(out, specs, {"x": "y"}) as w:
        for key in reversed(list(tensors)):
            w.write(key, tensors[key])
    loaded = load_file(str(out))
    for key, t in tensors.items():
        as_bytes = loaded[key].reshape(-1).view(torch.uint8)
        assert loaded[key].dtype == t.dtype and torch.equal(as_bytes, t.reshape(-1).view(torch.uint8))
    assert read_header(out).metadata == {"x": "y"}


def test_writer_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError):
        with StreamingWriter(out, {"a": (torch.float32, (2,))}) as w:
            w.write("a", torch.ones(2))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="never written"):
        with StreamingWriter(out, {"a": (torch.float32, (2,)), "b": (torch.float32, (1,))}) as w:
            w.write("a", torch.ones(2))
    assert os.listdir(tmp_path) == []


def test_output_path_rules(tmp_path, good_file):
    with pytest.raises(LoraToolsError, match="one of the inputs"):
        check_output_path(good_file, [good_file], overwrite=True)
    with pytest.raises(LoraToolsError, match="--overwrite"):
        check_output_path(good_file, [])
    assert check_output_path(good_file, [], overwrite=True)
    with pytest.raises(LoraToolsError, match="folder does not exist"):
        check_output_path(tmp_path / "nope" / "x.safetensors")
    link = tmp_path / "link.safetensors"
    os.symlink(good_file, link)
    with pytest.raises(LoraToolsError, match="one of the inputs"):
        check_output_path(link, [good_file], overwrite=True)


def test_cast_clamped_never_makes_inf():
    x = torch.tensor([1e6, -1e6, 70000.0, 1.5, float("inf")])
    for dtype, top in ((torch.float16, 65504.0), (torch.bfloat16, None), (torch.float8_e4m3fn, 448.0),
                       (torch.float8_e5m2, 57344.0)):
        y = cast_clamped(x, dtype).float()
        assert torch.isfinite(y).all(), dtype
        if top is not None:
            assert y[0] == top and y[1] == -top
    assert parse_dtype("fp16") == torch.float16 and parse_dtype("float") == torch.float32 and parse_dtype(None) is None
    with pytest.raises(LoraToolsError, match="unknown precision"):
        parse_dtype("fp7")


def test_kohya_hashes_follow_published_rule(tmp_path):
    # Big enough (> 1 MiB + 64 KiB) for the legacy hash to read real data.
    tensors = {"lora_unet_x.lora_down.weight": torch.randn(300, 1024), "lora_unet_x.alpha": torch.tensor(4.0)}
    out = tmp_path / "h.safetensors"
    save_tensors(out, tensors, {"ss_network_dim": "300"}, kohya_hashes=True)
    raw = out.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    expected_model = hashlib.sha256(raw[8 + n:]).hexdigest()
    expected_legacy = hashlib.sha256(raw[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    meta = read_header(out).metadata
    assert meta["sshs_model_hash"] == expected_model
    assert meta["sshs_legacy_hash"] == expected_legacy
    assert kohya_hashes_of_file(out) == (expected_model, expected_legacy)


def test_pickles_load_only_weights(tmp_path):
    good = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 10}, good)
    tensors, meta = load_tensors(good)
    assert list(tensors) == ["w"] and meta == {}

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "x": Evil()}, bad)
    with pytest.raises(LoraToolsError, match="objects other than tensors") as info:
        load_tensors(bad)
    assert not (tmp_path / "pwned").exists()
    # torch's own refusal recommends weights_only=False, i.e. running the file's code: never repeated
    assert "posix.system" in str(info.value) and "weights_only" not in str(info.value)


def test_sharded_checkpoint_reads_as_one(tmp_path):
    from library.safetensors_io import ShardedReader, open_checkpoint

    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file({"a.weight": torch.ones(2, 2)}, str(folder / "m-00001-of-00002.safetensors"))
    save_file({"b.weight": torch.zeros(3)}, str(folder / "m-00002-of-00002.safetensors"))
    index = {"metadata": {"total_size": 28}, "weight_map": {"a.weight": "m-00001-of-00002.safetensors",
                                                            "b.weight": "m-00002-of-00002.safetensors"}}
    (folder / "m.safetensors.index.json").write_text(json.dumps(index))
    with open_checkpoint(folder) as r:
        assert isinstance(r, ShardedReader)
        assert sorted(r.keys()) == ["a.weight", "b.weight"] and r.shape("b.weight") == (3,)
        assert torch.equal(r.get("a.weight"), torch.ones(2, 2)) and r.shard_of("b.weight").startswith("m-00002")
    index["weight_map"]["c.weight"] = "m-00002-of-00002.safetensors"
    (folder / "m.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoraToolsError, match="not there"):
        open_checkpoint(folder)


def test_reader_read_and_copy_into_single_and_sharded(tmp_path):
    """`read` (readinto, no mmap) equals safetensors' own load for every dtype, and `copy_into` writes the
    stored bytes unchanged; a sharded checkpoint delegates both to the shard that holds the key."""
    from library.safetensors_io import open_checkpoint

    g = torch.Generator().manual_seed(3)
    tensors = {"f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(4, 2, generator=g).bfloat16(),
               "f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn), "i64": torch.arange(5),
               "empty": torch.zeros(0, 3)}
    single = tmp_path / "one.safetensors"
    save_file(tensors, str(single))
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({k: tensors[k] for k in ("f32", "bf16")}, str(folder / "m-1.safetensors"))
    save_file({k: tensors[k] for k in ("f8", "i64", "empty")}, str(folder / "m-2.safetensors"))
    weight_map = {k: "m-1.safetensors" if k in ("f32", "bf16") else "m-2.safetensors" for k in tensors}
    (folder / "m.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    expected = load_file(str(single))
    for source in (single, folder):
        with open_checkpoint(source) as reader:
            assert sorted(reader.files()) == sorted(str(p) for p in ([single] if source == single else
                                                                      [folder / "m-1.safetensors", folder / "m-2.safetensors"]))
            for key, want in expected.items():
                got = reader.read(key)
                assert got.dtype == want.dtype and got.shape == want.shape
                assert got.view(torch.uint8).tolist() == want.view(torch.uint8).tolist()
            out = tmp_path / f"copy-{source.name}.safetensors"
            specs = {k: (reader.dtype(k), reader.shape(k)) for k in reader.keys()}
            with StreamingWriter(out, specs) as writer:
                for key in reader.keys():
                    reader.copy_into(writer, key)
        copied = load_file(str(out))
        assert all(torch.equal(copied[k].view(torch.uint8), expected[k].view(torch.uint8)) for k in expected)
