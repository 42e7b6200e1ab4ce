"""The mask file: which parameters of a model a merge may change, as one bit per parameter.

A mask file is a safetensors file keyed like the model it masks. Each value is the key's boolean mask,
flattened in C (row-major) order and bit-packed into a 1-D uint8 tensor of ceil(numel / 8) bytes:

    parameter i (flat index)  →  bit (i % 8) of byte (i // 8), bit 0 being the least significant
    ("little" bit order, numpy.packbits(..., bitorder="little")); the unused high bits of the last byte are 0.

True means "selected" (may be changed by the merge, DareMerge's MODEL_MASK convention). The header's
metadata carries
    MASK_FORMAT_KEY = MASK_FORMAT    the marker that tells a mask from a model (a model is refused as a mask)
    SHAPES_KEY      = JSON {key: [d0, d1, …]}, every masked key's original shape
besides whatever metadata the writer was given (provenance, the method that made the mask).

An SDXL UNet mask is ~320 MB of parameters → ~320 MB as a bool tensor per layer in memory, but ~40 MB on disk.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping

import torch

from library.destination import Destination
from library.errors import LoraToolsError
from library.safetensors_io import LazyReader, StreamingWriter

MASK_FORMAT_KEY = "loratools.mask_format"
MASK_FORMAT = "bitpacked-lsb0-v1"
SHAPES_KEY = "loratools.mask_shapes"

# Pack and unpack this many bytes (8× as many parameters) at a time, so a huge layer never needs more than a
# few small temporaries beside its input and output.
_CHUNK_BYTES = 1 << 22
# Number of set bits of every byte value, for counting selected parameters without unpacking.
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def packed_size(shape: Iterable[int]) -> int:
    """Bytes the packed mask of a tensor of `shape` takes."""
    return (math.prod(int(d) for d in shape) + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor → its bits as a 1-D uint8 tensor (C order, bit i%8 of byte i//8, LSB first)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_bits expects a bool tensor, got {mask.dtype}")
    flat = mask.reshape(-1).view(torch.uint8)  # bool and uint8 share their size: a view, no copy
    n = flat.numel()
    full = n // 8
    out = torch.zeros((n + 7) // 8, dtype=torch.uint8, device=mask.device)
    for start in range(0, full, _CHUNK_BYTES):
        stop = min(full, start + _CHUNK_BYTES)
        rows = flat[start * 8:stop * 8].view(-1, 8)
        acc = out[start:stop]
        for bit in range(8):
            acc |= rows[:, bit] << bit
    for bit in range(n - full * 8):  # the last, partial byte; its unused high bits stay 0
        out[full] |= flat[full * 8 + bit] << bit
    return out


def unpack_bits(packed: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    """The inverse of pack_bits: a 1-D uint8 tensor → the boolean tensor of `shape`."""
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed mask must be a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if packed.numel() != (n + 7) // 8:
        raise ValueError(f"packed mask has {packed.numel()} bytes; shape {shape} needs {(n + 7) // 8}")
    out = torch.empty((packed.numel(), 8), dtype=torch.bool, device=packed.device)
    for start in range(0, packed.numel(), _CHUNK_BYTES):
        stop = min(packed.numel(), start + _CHUNK_BYTES)
        part = packed[start:stop]
        for bit in range(8):
            out[start:stop, bit] = (part >> bit) & 1
    return out.view(-1)[:n].view(shape)


def count_selected(packed: torch.Tensor) -> int:
    """How many parameters a packed mask selects (padding bits are 0, so every set bit counts)."""
    # a histogram of the byte values (one pass, no int64 copy of the bytes) weighted by their bit counts
    return int((torch.bincount(packed.cpu(), minlength=256) * _POPCOUNT).sum())


class MaskFile:
    """A mask file open for reading (use `read_mask`). Keys and shapes are those of the masked model."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._reader = LazyReader(self.path)
        try:
            self._shapes = _shapes_of(self.path, self._reader)
        except BaseException:
            self._reader.close()
            raise
        # The caller's metadata and the marker; the shapes JSON is reached through shape().
        self.metadata = {k: v for k, v in self._reader.metadata.items() if k != SHAPES_KEY}

    def __enter__(self) -> MaskFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._reader.close()

    def keys(self) -> list[str]:
        return list(self._shapes)

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def shape(self, key: str) -> tuple[int, ...]:
        try:
            return self._shapes[key]
        except KeyError:
            raise LoraToolsError("the mask has no such key", file=self.path, key=key) from None

    def packed(self, key: str) -> torch.Tensor:
        """The key's bytes as stored (1-D uint8), checked: length and zero padding bits."""
        shape = self.shape(key)
        packed = self._reader.read(key)
        tail = math.prod(shape) % 8
        if tail and int(packed[-1]) >> tail:
            raise LoraToolsError("mask has bits set past the end of the tensor (corrupt mask)", file=self.path, key=key)
        return packed

    def get(self, key: str) -> torch.Tensor:
        """The key's mask as a bool tensor of the model's shape."""
        return unpack_bits(self.packed(key), self.shape(key))

    def get_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Parameters [start, stop) of the key's flattened mask (start a multiple of 8: whole bytes), unpacked
        from just those bytes, for a merge that works through a tensor in chunks."""
        if start % 8:
            raise ValueError(f"a mask chunk starts at a multiple of 8 parameters, not {start}")
        shape = self.shape(key)
        count = math.prod(shape)
        if not 0 <= start <= stop <= count:
            raise ValueError(f"{key}: parameters [{start}, {stop}) outside its {count}")
        first, last = start // 8, (stop + 7) // 8
        packed = self._reader.read_flat(key, first, last)
        tail = count % 8
        if tail and last == packed_size(shape) and last > first and int(packed[-1]) >> tail:
            raise LoraToolsError("mask has bits set past the end of the tensor (corrupt mask)", file=self.path, key=key)
        return unpack_bits(packed, (8 * (last - first),))[:stop - start]

    def file_readers(self) -> list[LazyReader]:
        return [self._reader]

    def count(self, key: str) -> int:
        """Selected parameters of `key`, counted without unpacking."""
        return count_selected(self.packed(key))


def _shapes_of(path: str, reader: LazyReader) -> dict[str, tuple[int, ...]]:
    """The shapes recorded in a mask file, checked against its tensors; a model file is refused here."""
    marker = reader.metadata.get(MASK_FORMAT_KEY)
    if marker is None:
        raise LoraToolsError(f"not a mask file (its metadata has no {MASK_FORMAT_KEY!r}); is it a model? "
                             "make masks with make_mask.py", file=path)
    if marker != MASK_FORMAT:
        raise LoraToolsError(f"unknown mask format {marker!r} (this version reads {MASK_FORMAT!r})", file=path)
    try:
        raw = json.loads(reader.metadata.get(SHAPES_KEY, ""))
        shapes = {str(k): tuple(int(d) for d in v) for k, v in raw.items()}
        if any(d < 0 for s in shapes.values() for d in s):
            raise ValueError("negative dimension")
    except (ValueError, TypeError, AttributeError) as exc:
        raise LoraToolsError(f"mask file has no valid {SHAPES_KEY!r} metadata ({exc})", file=path) from None
    keys = set(reader.keys())
    if keys != set(shapes):
        extra, missing = sorted(keys - set(shapes)), sorted(set(shapes) - keys)
        raise LoraToolsError(f"mask file's tensors and recorded shapes differ (no shape for {extra[:3]}, "
                             f"no tensor for {missing[:3]})", file=path)
    for key, shape in shapes.items():
        if reader.dtype(key) != torch.uint8 or reader.shape(key) != (packed_size(shape),):
            raise LoraToolsError(f"packed mask must be uint8 of {packed_size(shape)} bytes for shape {list(shape)}, "
                                 f"found {reader.dtype(key)} of shape {list(reader.shape(key))}", file=path, key=key)
    return shapes


def read_mask(path: str | os.PathLike) -> MaskFile:
    """Open a mask file (a context manager); a model or any other file is refused with a clear error."""
    return MaskFile(path)


class MaskWriter:
    """Write a mask file key by key, atomically (library.safetensors_io.StreamingWriter underneath).

    `shapes` fixes every key and its model shape up front; `.write(key, bool_tensor)` packs and writes one.
    `path_or_destination` may be a checked `Destination` (then `inputs` and `overwrite` come from it).
    """

    def __init__(self, path_or_destination: str | os.PathLike | Destination, shapes: Mapping[str, tuple],
                 metadata: Mapping[str, str] | None = None, *, inputs: Iterable[str | os.PathLike] = (),
                 overwrite: bool = False):
        self.shapes = {key: tuple(int(d) for d in shape) for key, shape in shapes.items()}
        meta = {k: str(v) for k, v in (metadata or {}).items()}
        meta[MASK_FORMAT_KEY] = MASK_FORMAT
        meta[SHAPES_KEY] = json.dumps({k: list(s) for k, s in self.shapes.items()}, separators=(",", ":"))
        specs = {key: (torch.uint8, (packed_size(shape),)) for key, shape in self.shapes.items()}
        self._writer = StreamingWriter(path_or_destination, specs, meta, inputs=inputs, overwrite=overwrite)
        self.path = self._writer.path

    def __enter__(self) -> MaskWriter:
        self._writer.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._writer.__exit__(exc_type, exc, tb)

    def write(self, key: str, mask: torch.Tensor) -> None:
        if key not in self.shapes:
            raise ValueError(f"{key} was not planned")
        if tuple(mask.shape) != self.shapes[key]:
            raise ValueError(f"{key}: planned shape {self.shapes[key]}, got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise TypeError(f"{key}: a mask is a bool tensor, got {mask.dtype}")
        self._writer.write(key, pack_bits(mask))

    def write_packed(self, key: str, packed: torch.Tensor) -> None:
        """Write a key's already packed bytes (set operations work on them directly)."""
        if key not in self.shapes:
            raise ValueError(f"{key} was not planned")
        if packed.dtype != torch.uint8 or tuple(packed.shape) != (packed_size(self.shapes[key]),):
            raise ValueError(f"{key}: expected {packed_size(self.shapes[key])} packed bytes (uint8), "
                             f"got {packed.dtype} of shape {tuple(packed.shape)}")
        self._writer.write(key, packed)
