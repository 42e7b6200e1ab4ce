"""The mask file format: bit packing against a bit-by-bit reading of the documented order, round trips,
and refusal of files that are not masks (models, corrupt headers, bad shapes, stray padding bits)."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from library.destination import Destination
from library.errors import LoraToolsError
from library.mask_file import (
    MASK_FORMAT,
    MASK_FORMAT_KEY,
    SHAPES_KEY,
    MaskWriter,
    count_selected,
    pack_bits,
    packed_size,
    read_mask,
    unpack_bits,
)
from tests.helpers import temp_files

Q = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
CONV = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
NORM = "model.diffusion_model.out.0.bias"


def _bits_by_hand(mask: torch.Tensor) -> list[int]:
    """The documented order written out: flat C-order index i → bit i % 8 of byte i // 8, LSB first."""
    flat = mask.reshape(-1).tolist()
    out = [0] * ((len(flat) + 7) // 8)
    for i, on in enumerate(flat):
        if on:
            out[i // 8] |= 1 << (i % 8)
    return out


@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (8,), (9,), (3, 5), (4, 3, 3, 3), (2, 8), (13, 1, 1)])
def test_pack_matches_documented_bit_order_and_round_trips(shape):
    gen = torch.Generator().manual_seed(len(shape) * 31 + sum(shape))
    mask = torch.rand(shape, generator=gen) < 0.4
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.dim() == 1 and packed.numel() == packed_size(shape)
    assert packed.tolist() == _bits_by_hand(mask)
    back = unpack_bits(packed, shape)
    assert back.dtype == torch.bool and tuple(back.shape) == shape and torch.equal(back, mask)
    assert count_selected(packed) == int(mask.sum())


def test_known_bytes():
    mask = torch.tensor([True, False, False, False, False, False, False, False, False, True, True])
    assert pack_bits(mask).tolist() == [0b00000001, 0b00000110]


def test_non_contiguous_input_is_packed_in_logical_order():
    base = torch.rand(6, 10, generator=torch.Generator().manual_seed(2)) < 0.5
    view = base.t()  # not contiguous
    assert pack_bits(view).tolist() == _bits_by_hand(view.contiguous())


def test_big_tensor_round_trip_across_chunks():
    # more than one internal chunk (4 Mi bytes = 32 Mi parameters) plus a partial byte at the end
    n = (1 << 25) + 8 * 1000 + 5
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(n, generator=gen) < 0.25
    packed = pack_bits(mask)
    assert packed.numel() == (n + 7) // 8
    assert count_selected(packed) == int(mask.sum())
    assert torch.equal(unpack_bits(packed, (n,)), mask)
    # spot-check the documented order far into the tensor
    for i in (0, 1 << 24, (1 << 25) + 3, n - 1):
        assert bool((int(packed[i // 8]) >> (i % 8)) & 1) == bool(mask[i])


def test_pack_and_unpack_refuse_wrong_inputs():
    with pytest.raises(TypeError):
        pack_bits(torch.ones(4))
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), (17,))
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(3, dtype=torch.int32), (17,))


def _masks():
    gen = torch.Generator().manual_seed(9)
    return {Q: torch.rand(320, 320, generator=gen) < 0.3, CONV: torch.rand(320, 320, 3, 3, generator=gen) < 0.7,
            NORM: torch.tensor([True, False, True])}


def _write(path, masks, metadata=None, **kw):
    with MaskWriter(path, {k: tuple(v.shape) for k, v in masks.items()}, metadata or {}, **kw) as w:
        for key, value in masks.items():
            w.write(key, value)
    return w.path


def test_file_round_trip_keys_shapes_metadata(tmp_path):
    masks = _masks()
    path = _write(tmp_path / "m.safetensors", masks, {"loratools.mask_method": "random"})
    with read_mask(path) as mf:
        assert mf.keys() == list(masks) and len(mf) == 3 and Q in mf and "nope" not in mf
        for key, value in masks.items():
            assert mf.shape(key) == tuple(value.shape)
            assert torch.equal(mf.get(key), value)
            assert mf.count(key) == int(value.sum())
        assert mf.metadata["loratools.mask_method"] == "random"
        assert mf.metadata[MASK_FORMAT_KEY] == MASK_FORMAT
        with pytest.raises(LoraToolsError, match="no such key"):
            mf.shape("nope")
    # on disk: 1-D uint8 of ceil(n/8) bytes with the shapes in the metadata
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        assert f.get_tensor(Q).dtype == torch.uint8 and tuple(f.get_tensor(Q).shape) == (320 * 320 // 8,)
        assert json.loads(f.metadata()[SHAPES_KEY])[NORM] == [3]
    assert os.path.getsize(path) < 320 * 320 * 10 // 8 + 4096


def test_writer_writes_in_any_order_and_checks_shapes(tmp_path):
    masks = _masks()
    shapes = {k: tuple(v.shape) for k, v in masks.items()}
    with MaskWriter(tmp_path / "r.safetensors", shapes, {}) as w:
        for key in reversed(list(masks)):
            w.write(key, masks[key])
    with read_mask(w.path) as mf:
        assert all(torch.equal(mf.get(k), v) for k, v in masks.items())
    with pytest.raises(ValueError, match="planned shape"):
        with MaskWriter(tmp_path / "s.safetensors", shapes, {}) as w:
            w.write(Q, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="never written"):
        with MaskWriter(tmp_path / "t.safetensors", shapes, {}) as w:
            w.write(Q, masks[Q])
    assert not os.path.exists(tmp_path / "s.safetensors") and not os.path.exists(tmp_path / "t.safetensors")
    assert temp_files(tmp_path) == []


def test_writer_refuses_inputs_and_existing_files(tmp_path):
    model = tmp_path / "model.safetensors"
    save_file({Q: torch.zeros(4, 4)}, str(model))
    with pytest.raises(LoraToolsError, match="one of the inputs"):
        MaskWriter(model, {Q: (4, 4)}, {}, inputs=[model], overwrite=True)
    out = _write(tmp_path / "m.safetensors", {Q: torch.ones(4, 4, dtype=torch.bool)})
    with pytest.raises(LoraToolsError, match="--overwrite"):
        MaskWriter(out, {Q: (4, 4)}, {})
    _write(Destination(out, [model], overwrite=True), {Q: torch.zeros(4, 4, dtype=torch.bool)})
    with read_mask(out) as mf:
        assert not mf.get(Q).any()


def test_a_model_is_refused_as_a_mask(tmp_path):
    model = tmp_path / "model.safetensors"
    save_file({Q: torch.zeros(4, 4)}, str(model), metadata={"modelspec.architecture": "stable-diffusion-v1"})
    with pytest.raises(LoraToolsError, match="not a mask file.*is it a model"):
        read_mask(model)
    ckpt = tmp_path / "model.ckpt"
    torch.save({Q: torch.zeros(4, 4)}, ckpt)
    with pytest.raises(LoraToolsError, match="not a mask file"):
        read_mask(ckpt)


def _forged(path, tensors, shapes, marker=MASK_FORMAT):
    meta = {MASK_FORMAT_KEY: marker}
    if shapes is not None:
        meta[SHAPES_KEY] = shapes if isinstance(shapes, str) else json.dumps(shapes)
    save_file(tensors, str(path), metadata=meta)
    return str(path)


@pytest.mark.parametrize("tensors,shapes,marker,message", [
    ({Q: torch.zeros(2, dtype=torch.uint8)}, {Q: [4, 4]}, "bitpacked-lsb0-v9", "unknown mask format"),
    ({Q: torch.zeros(2, dtype=torch.uint8)}, None, MASK_FORMAT, "no valid"),
    ({Q: torch.zeros(2, dtype=torch.uint8)}, "{not json", MASK_FORMAT, "no valid"),
    ({Q: torch.zeros(2, dtype=torch.uint8)}, {Q: [-4, 4]}, MASK_FORMAT, "no valid"),
    ({Q: torch.zeros(2, dtype=torch.uint8)}, {Q: [4, 4], NORM: [3]}, MASK_FORMAT, "differ"),
    ({Q: torch.zeros(2, dtype=torch.uint8), NORM: torch.zeros(1, dtype=torch.uint8)}, {Q: [4, 4]}, MASK_FORMAT,
     "differ"),
    ({Q: torch.zeros(3, dtype=torch.uint8)}, {Q: [4, 4]}, MASK_FORMAT, "2 bytes"),
    ({Q: torch.zeros(2, dtype=torch.bool)}, {Q: [4, 4]}, MASK_FORMAT, "must be uint8"),
    ({Q: torch.zeros(1, 2, dtype=torch.uint8)}, {Q: [4, 4]}, MASK_FORMAT, "must be uint8"),
])
def test_bad_mask_files_are_refused(tmp_path, tensors, shapes, marker, message):
    path = _forged(tmp_path / "bad.safetensors", tensors, shapes, marker)
    with pytest.raises(LoraToolsError, match=message):
        read_mask(path)


def test_padding_bits_set_is_corruption(tmp_path):
    path = _forged(tmp_path / "pad.safetensors", {NORM: torch.tensor([0b1000], dtype=torch.uint8)}, {NORM: [3]})
    with read_mask(path) as mf:
        with pytest.raises(LoraToolsError, match="past the end"):
            mf.get(NORM)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(LoraToolsError):
        read_mask(path)
