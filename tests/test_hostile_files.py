"""Hostile and unlucky input files: the container is decided by a parse that cannot be fooled, header work is
bounded, pickles are refused in our words, and every defect is a LoraToolsError (never another exception)."""

from __future__ import annotations

import io
import json
import os
import struct
import time
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convert_lora
import lora_info
from library import safetensors_io
from library.errors import LoraToolsError
from library.safetensors_io import MAX_HEADER_TENSORS, LazyReader, load_tensors, open_checkpoint, read_header
from tests.helpers import (
    fingerprints,
    kohya_lora,
    length_with_low_bytes,
    peft_lora,
    read_everything_or_our_error,
    run_cli_status,
    safetensors_bytes,
    temp_files,
)


def _natural_header_len(tensors, metadata) -> int:
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    return len(safetensors_bytes(tensors, metadata)) - 8 - data


def run(module, argv, capsys):
    return run_cli_status(module, argv, capsys)


# ---- container detection ---------------------------------------------------------------------------------

@pytest.mark.parametrize("low", [b"\x80", b"PK"], ids=["pickle-byte", "zip-bytes"])
def test_safetensors_that_starts_like_a_pickle_is_read_as_safetensors(tmp_path, capsys, low):
    """A PEFT LoRA (alpha 1, rank 4 in lora_adapter_metadata) whose header length starts with 0x80 or "PK" used
    to go to torch.load, lose its metadata and be converted with alpha 4: 4x too strong."""
    tensors, meta = peft_lora(rank=4, alpha=1.0)
    src = tmp_path / "peft.safetensors"
    src.write_bytes(safetensors_bytes(tensors, meta, length_with_low_bytes(_natural_header_len(tensors, meta), low)))
    assert src.read_bytes()[: len(low)] == low
    with LazyReader(src) as r:
        assert r.metadata == meta and r.header is not None
    out = tmp_path / "kohya.safetensors"
    code, _ = run(convert_lora, [str(src), str(out), "--to", "kohya", "--family", "sd1"], capsys)
    assert code == 0
    converted, _ = load_tensors(out)
    alphas = [v for k, v in converted.items() if k.endswith(".alpha")]
    assert len(alphas) == 1 and float(alphas[0]) == 1.0


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
def test_extension_is_only_a_hint(tmp_path, suffix):
    tensors = kohya_lora()
    path = tmp_path / f"really_safetensors{suffix}"
    path.write_bytes(safetensors_bytes(tensors, {"ss_network_dim": "4"}))
    got, meta = load_tensors(path)
    assert meta == {"ss_network_dim": "4"} and all(torch.equal(got[k], tensors[k]) for k in tensors)
    pickled = tmp_path / "really_a_pickle.safetensors"
    torch.save({"state_dict": tensors}, pickled)
    got, meta = load_tensors(pickled)
    assert meta == {} and all(torch.equal(got[k], tensors[k]) for k in tensors)


def test_sharded_checkpoint_with_disguised_shard(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    a = {"a.weight": torch.arange(4.0)}
    (folder / "m-1.safetensors").write_bytes(safetensors_bytes(a, {"k": "v"}, length_with_low_bytes(
        _natural_header_len(a, {"k": "v"}), b"\x80")))
    (folder / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": "m-1.safetensors"}}))
    with open_checkpoint(folder) as r:
        assert r.metadata == {"k": "v"} and torch.equal(r.get("a.weight"), torch.arange(4.0))


def test_shard_names_cannot_leave_the_folder(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(safetensors_bytes({"a": torch.ones(1)}))
    (folder / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../outside.safetensors"}}))
    with pytest.raises(LoraToolsError, match="not a file name in the index's folder"):
        open_checkpoint(folder)


# ---- pickles ---------------------------------------------------------------------------------------------

def test_empty_ckpt_says_why(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"")
    with pytest.raises(LoraToolsError, match=r"file is empty \(0 bytes\)") as info:
        LazyReader(path)
    assert str(path) in str(info.value)


def test_ckpt_that_is_neither_format(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_text("<html>404 not found</html>")
    with pytest.raises(LoraToolsError, match="neither a pickled checkpoint .* nor a safetensors file"):
        LazyReader(path)


def test_pickle_with_code_is_refused_in_our_words(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": Evil()}, bad)
    code, out = run(lora_info, [str(bad)], capsys)
    assert not (tmp_path / "pwned").exists()
    err = out.err + out.out
    assert "objects other than tensors" in err and "plain-tensor checkpoints" in err
    assert "weights_only" not in err and "arbitrary code" not in err  # torch's advice is never repeated
    code, out = run(convert_lora, [str(bad), str(tmp_path / "o.safetensors"), "--to", "kohya"], capsys)
    lines = out.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and str(bad) in lines[0] and "weights_only" not in lines[0]


def test_truncated_zip_checkpoint(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(3)}, good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(LoraToolsError, match="unreadable pickled checkpoint") as info:
        LazyReader(bad)
    assert "weights_only" not in str(info.value)


# ---- bounded header work ---------------------------------------------------------------------------------

def _raw_header_file(path, body: bytes, data: bytes = b"") -> str:
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return str(path)


def test_deeply_nested_header(tmp_path):
    path = _raw_header_file(tmp_path / "deep.safetensors", b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    with pytest.raises(LoraToolsError, match="nested too deeply"):
        read_header(path)


def _entries(n: int, dtype: str = "F32", size: int = 4) -> bytes:
    return ("{" + ",".join(f'"lora_unet_b{i}.alpha":{{"dtype":"{dtype}","shape":[],"data_offsets":[{size * i},'
                           f'{size * i + size}]}}' for i in range(n)) + "}").encode()


def _no_parse(*_args, **_kwargs):
    raise AssertionError("the header JSON was parsed: the bound must refuse it before")


def test_huge_key_count_is_refused_before_parsing(tmp_path, monkeypatch):
    """300k tensors: about 6 s of JSON parsing, then minutes of family detection, before this bound."""
    n = 300_000
    path = _raw_header_file(tmp_path / "many.safetensors", _entries(n), b"\0" * (4 * n))
    monkeypatch.setattr(safetensors_io.json, "loads", _no_parse)
    start = time.perf_counter()
    with pytest.raises(LoraToolsError, match=f"lists 300,000 tensors, over the {MAX_HEADER_TENSORS:,}"):
        LazyReader(path)
    assert time.perf_counter() - start < 10.0  # 0.2 s measured; generous for a loaded machine


def test_many_members_without_tensors_are_refused_before_parsing(tmp_path, monkeypatch):
    body = ("{" + ",".join(f'"k{i}":0' for i in range(1_100_000)) + "}").encode()
    path = _raw_header_file(tmp_path / "members.safetensors", body)
    monkeypatch.setattr(safetensors_io.json, "loads", _no_parse)
    with pytest.raises(LoraToolsError, match="JSON members"):
        read_header(path)


def test_tensor_count_limit_is_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_io, "MAX_HEADER_TENSORS", 10)
    at_limit = _raw_header_file(tmp_path / "ten.safetensors", _entries(10, "F16", 2), b"\0" * 20)
    header = read_header(at_limit)
    assert len(header.tensors) == 10 and header.tensors["lora_unet_b7.alpha"].begin == 14
    over = _raw_header_file(tmp_path / "eleven.safetensors", _entries(11, "F16", 2), b"\0" * 22)
    with pytest.raises(LoraToolsError, match="lists 11 tensors, over the 10"):
        read_header(over)


@pytest.mark.parametrize("case,needle", [
    ("gap", "unused bytes before"),
    ("trailing", "bytes after the last tensor"),
    ("giant_int", "not valid JSON"),
    ("many_dims", "invalid shape"),
    ("starts_wrong", "does not start with"),
])
def test_layout_and_number_defects(tmp_path, case, needle):
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    data = b"\0" * 4
    if case == "gap":
        entry, data = {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}, b"\0" * 8
    elif case == "trailing":
        data = b"\0" * 12
    elif case == "many_dims":
        entry = {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}
    body = json.dumps({"x": entry}).encode()
    if case == "giant_int":
        body = b'{"x":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}'
    elif case == "starts_wrong":
        body = b"[" + body + b"]"
    with pytest.raises(LoraToolsError, match=needle):
        read_header(_raw_header_file(tmp_path / f"{case}.safetensors", body, data))


# ---- mutation: nothing but LoraToolsError ever escapes ------------------------------------------------------

_SMALL = safetensors_bytes({"lora_unet_x.lora_down.weight": torch.randn(2, 3), "lora_unet_x.alpha": torch.tensor(2.0),
                            "lora_unet_x.lora_up.weight": torch.randn(3, 2).half()}, {"ss_network_dim": "2"})
_HEADER_LEN = struct.unpack("<Q", _SMALL[:8])[0]
_JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                         st.text(max_size=6), st.lists(st.integers(-3, 2**64), max_size=4),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _pickle_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buf)
    return buf.getvalue()


_PICKLE = _pickle_bytes()


def _mutate(data) -> bytes:
    mode = data.draw(st.sampled_from(["bytes", "length", "offsets", "dtype", "shape", "json", "metadata",
                                      "truncate", "append", "magic", "zip"]))
    raw = bytearray(_SMALL)
    if mode == "bytes":
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, 8 + _HEADER_LEN - 1))] = data.draw(st.integers(0, 255))
        return bytes(raw)
    if mode == "length":
        return struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + bytes(raw[8:])
    if mode == "truncate":
        return bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    if mode == "append":
        return bytes(raw) + data.draw(st.binary(min_size=1, max_size=16))
    if mode == "magic":  # the first bytes of a pickle or a zip in front of a real header
        return data.draw(st.sampled_from([b"\x80\x02", b"PK\x03\x04", b"PK"])) + bytes(raw[2:])
    if mode == "zip":  # a real torch zip checkpoint with bytes changed
        blob = bytearray(_PICKLE)
        for _ in range(data.draw(st.integers(1, 4))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
        return bytes(blob)
    header = json.loads(raw[8:8 + _HEADER_LEN])
    key = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    if mode in ("offsets", "dtype", "shape"):
        field = {"offsets": "data_offsets", "dtype": "dtype", "shape": "shape"}[mode]
        header[key][field] = data.draw(_JSON_VALUES | st.sampled_from(["F64", "BF16", "I8", "BOOL", [0, 0], [1]]))
    elif mode == "metadata":
        header["__metadata__"] = data.draw(_JSON_VALUES)
    else:
        header[key] = data.draw(_JSON_VALUES)
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + bytes(raw[8 + _HEADER_LEN:])


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_files_raise_only_our_error(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("mut")
    suffix = data.draw(st.sampled_from([".safetensors", ".ckpt"]))
    path = folder / f"m{suffix}"
    path.write_bytes(_mutate(data))

    def read_all(reader):
        with reader:
            for key in reader:
                reader.get(key)
                reader.shape(key)

    for attempt in (lambda: read_header(path), lambda: read_all(LazyReader(path)), lambda: load_tensors(path),
                    lambda: read_all(open_checkpoint(path))):
        try:
            attempt()
        except LoraToolsError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.one_of(_JSON_VALUES, st.fixed_dictionaries({"weight_map": st.one_of(
    _JSON_VALUES, st.dictionaries(st.sampled_from(["a", "b"]), st.one_of(
        _JSON_VALUES, st.sampled_from(["s.safetensors", "missing.safetensors", "", "..", "/etc/passwd"]))))})))
def test_mutated_shard_indexes_raise_only_our_error(tmp_path_factory, index):
    folder = tmp_path_factory.mktemp("idx")
    (folder / "s.safetensors").write_bytes(safetensors_bytes({"a": torch.ones(2)}))
    (folder / "m.safetensors.index.json").write_text(json.dumps(index))
    read_everything_or_our_error(open_checkpoint, folder)


def test_zip_without_torch_layout(tmp_path):
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "not a checkpoint")
    with pytest.raises(LoraToolsError, match="unreadable pickled checkpoint"):
        LazyReader(path)


def test_bad_files_through_scripts_leave_inputs_and_folder_untouched(tmp_path, capsys):
    """convert_lora and lora_info on each defect: exit 2, one line naming the file, nothing written."""
    cases = {
        "empty.ckpt": b"",
        "deep.safetensors": struct.pack("<Q", 40_002) + b"[" * 20_001 + b"]" * 20_001,
        "evil_len.safetensors": struct.pack("<Q", 2**63) + b"{}",
        "gap.safetensors": safetensors_bytes(kohya_lora()) + b"junk",
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    before = fingerprints(tmp_path)
    for name in cases:
        src = str(tmp_path / name)
        out = tmp_path / "out.safetensors"
        for module, argv in ((convert_lora, [src, str(out), "--to", "kohya", "--family", "sd1"]),
                             (lora_info, [src])):
            code, got = run(module, argv, capsys)
            lines = got.err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and src in lines[0], (name, got.err)
            assert not out.exists()
    assert fingerprints(tmp_path) == before and temp_files(tmp_path) == []
