"""Reading and writing tensor files safely and without holding whole models in memory.

Reading: the safetensors header is validated by us (with bounded work) before safetensors' own lazy
`safe_open` touches the file, so a broken file gets an error that names the file and the problem
instead of a Rust panic message. The container is decided by that parse, not by the name or the
first bytes; pickled checkpoints are only ever loaded with `weights_only=True`.

Writing: the header is computed from the planned tensors, the file is pre-sized, each tensor is
written at its offset as soon as it is ready (so peak memory is one tensor, not the model), and
the temporary file becomes the destination only when every tensor is there (`library.destination`:
input checks, free space, fsync, umask, no-replace rename, cleanup on errors and signals).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from library.destination import DISK_ERRNOS, AtomicFile, Destination
from library.errors import LoraToolsError
from library.precision import PRECISION_CHOICES, parse_dtype  # noqa: F401  (re-exported)
from library.writeback import Writeback

# safetensors' own limit for the JSON header; anything bigger is corruption, not metadata.
MAX_HEADER_BYTES = 100_000_000
# The largest real files (full SDXL/Flux checkpoints, LyCORIS on every layer) hold a few thousand tensors;
# a header listing more than this is corrupt or hostile, and is refused right after the JSON parse.
MAX_HEADER_TENSORS = 100_000
MAX_DIMS = 64

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}


def cast_clamped(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Cast to `dtype`, clamping to its finite range first so that a cast never creates inf.

    fp16 overflows at 65504 and fp8 e4m3fn at 448: a plain `.to()` would turn large values into
    inf (or NaN for e4m3fn, which has no inf), silently breaking the model.
    """
    if dtype is None or tensor.dtype == dtype:
        return tensor
    if dtype.is_floating_point and tensor.is_floating_point():
        target = torch.finfo(dtype)
        source = torch.finfo(tensor.dtype)
        if target.max < source.max:
            tensor = tensor.clamp(min=target.min, max=target.max)
    return tensor.to(dtype)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def read_header(path: str | os.PathLike) -> Header:
    """Read and validate a safetensors header; raise LoraToolsError naming the file on any defect.

    The work is bounded: at most MAX_HEADER_BYTES are read, at most MAX_HEADER_TENSORS entries are
    accepted, shapes have at most MAX_DIMS dimensions, and every check is O(n log n) in the entries.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size == 0:
                raise LoraToolsError("file is empty (0 bytes), so it holds no tensors: an interrupted download "
                                     "or copy?", file=path)
            head = f.read(8)
            if len(head) < 8:
                raise LoraToolsError("not a safetensors file: shorter than the 8-byte header length", file=path)
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES:
                raise LoraToolsError(
                    f"not a safetensors file or corrupt: header length {header_len} is over the "
                    f"{MAX_HEADER_BYTES}-byte limit", file=path)
            if 8 + header_len > size:
                raise LoraToolsError(
                    f"truncated or not a safetensors file: header length {header_len} runs past the end "
                    f"of the {size}-byte file", file=path)
            # A JSON object starts with "{": look before reading (up to 100 MB of) something else.
            start = f.read(min(header_len, 64))
            if start.lstrip(b" \t\r\n")[:1] not in (b"{", b""):
                raise LoraToolsError("not a safetensors file or corrupt: header is not valid JSON (it does not "
                                     "start with '{')", file=path)
            raw = start + f.read(header_len - len(start))
    except FileNotFoundError:
        raise LoraToolsError("no such file", file=path) from None
    except IsADirectoryError:
        raise LoraToolsError("is a directory, expected a file", file=path) from None
    except PermissionError:
        raise LoraToolsError("permission denied", file=path) from None
    # Parsing costs about a microsecond per JSON member, so count first (C-speed scans of the bytes): each
    # tensor has exactly one "data_offsets", and every member of any object needs a ':'.
    tensors_seen = raw.count(b'"data_offsets"')
    if tensors_seen > MAX_HEADER_TENSORS:
        raise LoraToolsError(_too_many(tensors_seen), file=path)
    if raw.count(b":") > 10 * MAX_HEADER_TENSORS:
        raise LoraToolsError(f"corrupt or hostile safetensors header: over {10 * MAX_HEADER_TENSORS:,} JSON members",
                             file=path)
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise LoraToolsError("not a safetensors file or corrupt: header JSON is nested too deeply", file=path) from None
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError: JSON syntax, or an integer of 4300+ digits
        raise LoraToolsError(f"not a safetensors file or corrupt: header is not valid JSON ({exc})", file=path) from None
    if not isinstance(parsed, dict):
        raise LoraToolsError("corrupt safetensors header: expected a JSON object", file=path)
    metadata = parsed.pop("__metadata__", None) or {}
    if len(parsed) > MAX_HEADER_TENSORS:
        raise LoraToolsError(_too_many(len(parsed)), file=path)
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise LoraToolsError("corrupt safetensors header: __metadata__ must map strings to strings", file=path)
    data_start = 8 + header_len
    data_size = size - data_start
    tensors = {key: _validate_entry(path, key, entry, data_size) for key, entry in parsed.items()}
    _check_layout(path, tensors, data_size)
    return Header(tensors=tensors, metadata=dict(metadata), data_start=data_start, file_size=size)


def _too_many(count: int) -> str:
    return (f"corrupt or hostile safetensors header: it lists {count:,} tensors, over the {MAX_HEADER_TENSORS:,} "
            "we accept (real models have a few thousand)")


def _validate_entry(path: str, key: str, entry: object, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise LoraToolsError("corrupt safetensors header: entry is not an object", file=path, key=key)
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise LoraToolsError(f"unknown dtype {_short(dtype)}", file=path, key=key)
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(type(d) is int and 0 <= d < 2**63 for d in shape)):
        raise LoraToolsError(f"invalid shape {_short(shape)}", file=path, key=key)
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)):
        raise LoraToolsError(f"invalid data_offsets {_short(offsets)}", file=path, key=key)
    begin, end = offsets
    if begin > end or end > data_size:
        raise LoraToolsError(
            f"data_offsets {offsets} lie outside the {data_size}-byte data section (truncated file?)", file=path, key=key)
    expected = math.prod(shape) * _ITEMSIZE[dtype]
    if end - begin != expected:
        raise LoraToolsError(
            f"data_offsets span {end - begin} bytes but dtype {dtype} and shape {shape} need {expected}",
            file=path, key=key)
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_layout(path: str, tensors: Mapping[str, TensorInfo], data_size: int) -> None:
    """The data section is exactly the tensors, back to back: no overlap, no gap, nothing after (as
    safetensors itself requires); one sort, so O(n log n)."""
    spans = sorted((info.begin, info.end, key) for key, info in tensors.items())
    covered, last_key = 0, None
    for begin, end, key in spans:
        if begin < covered:
            raise LoraToolsError(f"tensor data overlaps that of {last_key!r}", file=path, key=key)
        if begin > covered:
            raise LoraToolsError(f"{begin - covered} unused bytes before this tensor's data (corrupt file)",
                                 file=path, key=key)
        covered, last_key = end, key
    if covered != data_size:
        raise LoraToolsError(f"{data_size - covered} bytes after the last tensor's data (corrupt file or not "
                             "safetensors)", file=path)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_ITEMSIZE = {name: _itemsize(dtype) for name, dtype in DTYPES.items()}


def _pickle_kind(path: str) -> str | None:
    """'zip' (torch.save since 1.6), 'pickle' (legacy torch.save, protocol 2-5) or None, from the first bytes."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"PK":
        return "zip"
    if magic[:1] == b"\x80" and magic[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    return None


class LazyReader:
    """Read tensors one at a time from a safetensors file (or a pickled checkpoint, loaded safely).

    The container is decided by content, never by the name: a file whose safetensors header validates
    is safetensors, whatever its first bytes; only a file that is not, and that starts like a zip or a
    pickle, is loaded as a pickle, with `weights_only=True`.
    """

    # Given (file offset, bytes) of every buffer `read`/`read_flat` fill: library.stream_hash hashes the
    # inputs from the bytes a merge reads anyway.
    tap = None

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._handle = None
        self._fd: int | None = None  # kept open for positioned reads (read_flat), closed by close()
        self._state: dict[str, torch.Tensor] | None = None
        if not os.path.exists(self.path):
            raise LoraToolsError("no such file", file=self.path)
        if os.path.isdir(self.path):
            raise LoraToolsError("is a directory, expected a file", file=self.path)
        try:
            self.header = read_header(self.path)
        except LoraToolsError as not_safetensors:
            if os.path.getsize(self.path) == 0:
                raise
            if _pickle_kind(self.path) is None:
                if Path(self.path).suffix.lower() in PICKLE_SUFFIXES:
                    raise LoraToolsError("neither a pickled checkpoint (it starts with no zip or pickle signature) "
                                         f"nor a safetensors file ({not_safetensors.message})", file=self.path) from None
                raise
            self._state, self.metadata, self.header = _load_pickled(self.path), {}, None
            return
        self.metadata = self.header.metadata
        from safetensors import safe_open

        try:
            self._handle = safe_open(self.path, framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types for what we did not catch
            raise LoraToolsError(f"cannot open as safetensors: {exc}", file=self.path) from None

    def __enter__(self) -> LazyReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a reader dropped without close() must not keep its descriptor
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            with contextlib.suppress(Exception):  # at interpreter exit `os` may already be gone
                os.close(fd)

    def close(self) -> None:
        self._handle = None
        self._state = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def keys(self) -> list[str]:
        if self._state is not None:
            return list(self._state)
        return list(self.header.tensors)

    def __iter__(self):
        return iter(self.keys())

    def __contains__(self, key: str) -> bool:
        if self._state is not None:
            return key in self._state
        return key in self.header.tensors

    def _info(self, key: str) -> TensorInfo:
        try:
            return self.header.tensors[key]
        except KeyError:
            raise LoraToolsError("no such tensor in the file", file=self.path, key=key) from None

    def shape(self, key: str) -> tuple[int, ...]:
        if self._state is not None:
            return tuple(self._tensor_from_state(key).shape)
        return self._info(key).shape

    def dtype(self, key: str) -> torch.dtype:
        if self._state is not None:
            return self._tensor_from_state(key).dtype
        return DTYPES[self._info(key).dtype]

    def _tensor_from_state(self, key: str) -> torch.Tensor:
        try:
            return self._state[key]
        except KeyError:
            raise LoraToolsError("no such tensor in the file", file=self.path, key=key) from None

    def get(self, key: str) -> torch.Tensor:
        if self._state is not None:
            return self._tensor_from_state(key)
        self._info(key)
        try:
            return self._handle.get_tensor(key)
        except Exception as exc:
            raise LoraToolsError(f"cannot read tensor: {exc}", file=self.path, key=key) from None

    def get_raw(self, key: str) -> bytes:
        """The tensor's bytes exactly as stored, for bit-for-bit copies without a decode."""
        if self._state is not None:
            return tensor_bytes(self._tensor_from_state(key))
        info = self._info(key)
        with open(self.path, "rb") as f:
            f.seek(self.header.data_start + info.begin)
            return f.read(info.end - info.begin)

    def read(self, key: str) -> torch.Tensor:
        """One tensor in its own storage, filled by a single `readinto`: no mmap. Streaming reads use this, not
        `get`: pages of a mapped checkpoint stay resident and count against the process, so reading a whole
        model through the mmap makes it look (and, under pressure, behave) as if it held the model."""
        if self._state is not None:
            return self._tensor_from_state(key)
        info = self._info(key)
        tensor = torch.empty(info.shape, dtype=DTYPES[info.dtype])
        self._read_into(tensor, key, self.header.data_start + info.begin)
        return tensor

    def read_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor (C order) in their own 1-D storage, read from their
        offset in the file: a chunked pass holds a slice of each input, never the whole tensor."""
        if self._state is not None:
            return self._tensor_from_state(key).reshape(-1)[start:stop]
        info = self._info(key)
        count = math.prod(info.shape)
        if not 0 <= start <= stop <= count:
            raise ValueError(f"{key}: elements [{start}, {stop}) outside its {count}")
        tensor = torch.empty(stop - start, dtype=DTYPES[info.dtype])
        self._read_into(tensor, key, self.header.data_start + info.begin + start * _ITEMSIZE[info.dtype])
        return tensor

    def _read_into(self, tensor: torch.Tensor, key: str, offset: int) -> None:
        if tensor.numel() == 0:
            return
        view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
        if hasattr(os, "preadv"):
            # One positioned read on a descriptor kept open: a chunked merge makes thousands of small reads,
            # and an open/seek/close each cost more than the read of a chunk from the page cache.
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            done = 0
            while done < len(view):
                n = os.preadv(self._fd, [view[done:]], offset + done)
                if n == 0:
                    break
                done += n
        else:
            with open(self.path, "rb") as f:
                f.seek(offset)
                done = f.readinto(view)
        if done != len(view):
            raise LoraToolsError("file ends inside the tensor's data (truncated?)", file=self.path, key=key)
        if self.tap is not None:
            self.tap(offset, view)

    def copy_into(self, writer: StreamingWriter, key: str) -> None:
        """Write this tensor's stored bytes unchanged into `writer` (kernel copy where the file allows it)."""
        if self._state is not None:
            writer.write_raw(key, self.get_raw(key))
            return
        writer.copy_from_file(key, self.path, self.header.data_start + self._info(key).begin)

    def files(self) -> list[str]:
        """The files this reader reads (for provenance hashes and output checks)."""
        return [self.path]

    def file_readers(self) -> list[LazyReader]:
        """The single-file readers underneath (this one), e.g. to give each a `tap`."""
        return [self]

    def file_order(self) -> list[str]:
        """Keys in the order their bytes lie in the file, so a pass over them reads sequentially."""
        if self._state is not None:
            return self.keys()
        return sorted(self.header.tensors, key=lambda k: self.header.tensors[k].begin)


_NOT_PLAIN_TENSORS = ("holds Python objects other than tensors{found}; loratools only loads plain-tensor "
                      "checkpoints and never runs code from a file: convert it to safetensors with a tool you trust")


def _load_pickled(path: str) -> dict[str, torch.Tensor]:
    """Load a .ckpt/.pt/.bin with weights_only=True, so no code in the file can run."""
    try:
        if path.endswith(".safetensors"):
            # torch.load hands a path with this name to safetensors; the content said pickle, so give it a file.
            with open(path, "rb") as f:
                obj = torch.load(f, map_location="cpu", weights_only=True)
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "weights only" in str(exc).lower():
                    raise
                # mmap needs the zip format; legacy pickles fall back to a plain (still weights_only) load.
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LoraToolsError(_pickle_failure(exc), file=path) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise LoraToolsError(f"pickled file holds a {type(obj).__name__}, not a dict of tensors", file=path)
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _pickle_failure(exc: Exception) -> str:
    """Why a pickle did not load, in our words: torch's refusal text recommends weights_only=False, which
    would run the file's code, so it is never passed on."""
    text = str(exc)
    if "weights only" in text.lower() or "weights_only" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)  # the class or function the file wanted to load
        return _NOT_PLAIN_TENSORS.format(found=f" ({found.group(1)})" if found else "")
    reason = " ".join(text.split())[:200] or type(exc).__name__
    return f"unreadable pickled checkpoint: {reason}"


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor of a (small) file such as a LoRA, with its metadata."""
    with LazyReader(path) as reader:
        return {key: reader.get(key) for key in reader}, dict(reader.metadata)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The little-endian bytes of a tensor, without a copy when it is already contiguous on CPU."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def check_output_path(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False) -> str:
    """Refuse to write over an input, or over an existing file unless `overwrite` (see `Destination.check`)."""
    return Destination(path, inputs, overwrite).check()


# Fixed-width placeholders let the header be written before the data whose hash it records.
_HASH_KEYS = {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8}
LEGACY_HASH_OFFSET = 0x100000
LEGACY_HASH_SIZE = 0x10000


class StreamingWriter:
    """Write a safetensors file tensor by tensor, atomically.

    `specs` fixes every key's dtype and shape up front, so the header and all offsets are known
    before any data exists; tensors may then be written in any order. With `kohya_hashes=True`
    the sd-scripts hashes (`sshs_model_hash`, `sshs_legacy_hash`) are computed from the bytes
    actually written and patched into the header. `path` may be a `Destination` (then `inputs` and
    `overwrite` come from it). Disk errors become one-line LoraToolsErrors and leave nothing behind.
    """

    def __init__(self, path: str | os.PathLike | Destination, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None, *, inputs: Iterable[str | os.PathLike] = (),
                 overwrite: bool = False, kohya_hashes: bool = False):
        self.destination = path if isinstance(path, Destination) else Destination(path, inputs, overwrite)
        self.path = self.destination.check()
        self.kohya_hashes = kohya_hashes
        metadata = dict(metadata or {})
        if kohya_hashes:
            metadata.update(_HASH_KEYS)
        self._metadata = metadata
        self._entries: dict[str, TensorInfo] = {}
        offset = 0
        for key, (dtype, shape) in specs.items():
            if dtype not in DTYPE_NAMES:
                raise ValueError(f"dtype {dtype} cannot be stored in safetensors ({key})")
            shape = tuple(int(d) for d in shape)
            nbytes = math.prod(shape) * _itemsize(dtype)
            self._entries[key] = TensorInfo(DTYPE_NAMES[dtype], shape, offset, offset + nbytes)
            offset += nbytes
        self._data_size = offset
        self._header_bytes = self._encode_header(self._metadata)
        self._written: set[str] = set()
        self._partial: dict[str, int] = {}  # elements written of keys written in chunks (write_flat)
        # Worker threads may write keys side by side (merge_models): each seek + write, and the bookkeeping of
        # what was written, happens under this lock.
        self._lock = threading.RLock()
        self._writeback = Writeback()
        self._disk_error: Exception | None = None  # the first full-disk (or read-only, …) error met, see _disk
        self._out: AtomicFile | None = None
        self._file = None

    @property
    def size(self) -> int:
        """Bytes of the finished file."""
        return len(self._header_bytes) + self._data_size

    def _encode_header(self, metadata: Mapping[str, str]) -> bytes:
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        for key, info in self._entries.items():
            header[key] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [info.begin, info.end]}
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # data section aligned to 8 bytes, as safetensors does
        return struct.pack("<Q", len(raw)) + raw

    @contextlib.contextmanager
    def _disk(self):
        """A full disk, a size limit or a read-only folder while writing: remove the temp, say it in one line.

        Worker threads write side by side: once one of them met the disk error and the temp is gone, every
        later write, on any thread, raises that same error (not "I/O operation on closed file")."""
        if self._disk_error is not None:
            raise self._disk_error
        try:
            yield
        except OSError as exc:
            if exc.errno not in DISK_ERRNOS:
                raise
            if self._out is not None:
                self._out.discard()
            self._disk_error = self.destination.os_error(exc, self.size)
            raise self._disk_error from None

    def __enter__(self) -> StreamingWriter:
        self._out = AtomicFile(self.destination, size=self.size)
        self._file = self._out.open()
        try:
            with self._disk():
                self._file.write(self._header_bytes)
                self._file.truncate(self.size)
        except BaseException:  # __exit__ does not run when __enter__ fails (a signal, a size limit)
            self._out.discard()
            raise
        return self

    def write(self, key: str, tensor: torch.Tensor) -> None:
        info = self._entry(key)
        dtype = DTYPES[info.dtype]
        if tuple(tensor.shape) != info.shape:
            raise ValueError(f"{key}: planned shape {info.shape}, got {tuple(tensor.shape)}")
        self._write_bytes(key, info, tensor_bytes(cast_clamped(tensor, dtype)))

    def write_flat(self, key: str, start: int, tensor: torch.Tensor) -> None:
        """Write elements [start, start + numel) of a planned key's flattened tensor (C order), a chunk of it:
        the key counts as written once as many elements as it holds have been (each chunk written once)."""
        info = self._entries.get(key)
        if info is None or key in self._written:
            self._entry(key)  # the error: not planned, or written twice
        dtype = DTYPES[info.dtype]
        size = _ITEMSIZE[info.dtype]
        count = (info.end - info.begin) // size if size else 0
        if tensor.dim() != 1 or not 0 <= start <= start + tensor.numel() <= count:
            raise ValueError(f"{key}: a 1-D chunk [{start}, {start + tensor.numel()}) must lie in its {count} elements")
        data = tensor_bytes(cast_clamped(tensor, dtype))
        with self._lock, self._disk():
            self._file.seek(len(self._header_bytes) + info.begin + start * size)
            self._file.write(data)
            self._writeback.wrote(self._file, len(data))
            done = self._partial.pop(key, 0) + tensor.numel()
            if done >= count:
                self._written.add(key)
            else:
                self._partial[key] = done

    def update_metadata(self, updates: Mapping[str, str]) -> None:
        """Rewrite header metadata values known only at the end (input hashes read while writing): the new
        header must be exactly as long as the planned one, so write the planned values as same-length
        placeholders (64 zeros for a sha256)."""
        metadata = dict(self._metadata, **updates)
        header = self._encode_header(metadata)
        if len(header) != len(self._header_bytes):
            raise ValueError(f"the new metadata changes the header's length ({len(self._header_bytes)} → {len(header)})")
        with self._lock, self._disk():
            self._file.seek(0)
            self._file.write(header)
        self._metadata, self._header_bytes = metadata, header

    def write_raw(self, key: str, data: bytes | memoryview) -> None:
        """Write already-encoded bytes (e.g. copied from an input) for a planned key."""
        info = self._entry(key)
        self._write_bytes(key, info, data)

    def copy_from_file(self, key: str, path: str | os.PathLike, offset: int) -> None:
        """Write a planned key's bytes straight from `path` at byte `offset` (an input's tensor, unchanged).

        Uses os.copy_file_range, so the bytes never pass through this process's memory (the kernel
        copies them, or shares extents where the filesystem can); falls back to 16 MiB reads.
        """
        info = self._entry(key)
        size = info.end - info.begin
        dest = len(self._header_bytes) + info.begin
        with open(path, "rb") as src, self._lock, self._disk():
            self._file.flush()  # buffered bytes must land before the kernel writes beside them
            done = 0
            if hasattr(os, "copy_file_range"):
                try:
                    while done < size:
                        n = os.copy_file_range(src.fileno(), self._file.fileno(), size - done, offset + done, dest + done)
                        if n == 0:
                            break
                        done += n
                except OSError as exc:
                    if exc.errno in DISK_ERRNOS:
                        raise
                    # e.g. EXDEV on old kernels, or a filesystem without support: copy by hand
            src.seek(offset + done)
            self._file.seek(dest + done)
            while done < size:
                chunk = src.read(min(1 << 24, size - done))
                if not chunk:
                    raise LoraToolsError("file ends inside the tensor", file=os.fspath(path), key=key)
                self._file.write(chunk)
                done += len(chunk)
            self._written.add(key)
            self._writeback.wrote(self._file, size)

    def _entry(self, key: str) -> TensorInfo:
        if key in self._written:
            raise ValueError(f"{key} written twice")
        try:
            return self._entries[key]
        except KeyError:
            raise ValueError(f"{key} was not planned") from None

    def _write_bytes(self, key: str, info: TensorInfo, data: bytes | memoryview) -> None:
        if len(data) != info.end - info.begin:
            raise ValueError(f"{key}: expected {info.end - info.begin} bytes, got {len(data)}")
        with self._lock, self._disk():
            self._file.seek(len(self._header_bytes) + info.begin)
            self._file.write(data)
            self._written.add(key)
            self._writeback.wrote(self._file, len(data))

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._out.discard()
            return
        try:
            missing = [k for k in self._entries if k not in self._written]
            if missing:
                raise ValueError(f"{len(missing)} planned tensors were never written, e.g. {missing[:3]}")
            if self.kohya_hashes:
                with self._disk():
                    self._patch_hashes()
        except BaseException:
            self._out.discard()
            raise
        self._out.commit()

    def _patch_hashes(self) -> None:
        start = len(self._header_bytes)
        model_hash = _sha256_of_range(self._file, start, self._data_size)
        metadata = dict(self._metadata, sshs_model_hash=model_hash)
        header = self._encode_header(metadata)
        assert len(header) == start
        self._file.seek(0)
        self._file.write(header)
        self._file.flush()
        legacy = _legacy_hash_of(self._file)
        metadata["sshs_legacy_hash"] = legacy
        header = self._encode_header(metadata)
        self._file.seek(0)
        self._file.write(header)
        self._metadata = metadata


def _sha256_of_range(f, start: int, size: int, block: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    f.seek(start)
    remaining = size
    while remaining > 0:
        chunk = f.read(min(block, remaining))
        if not chunk:
            break
        digest.update(chunk)
        remaining -= len(chunk)
    return digest.hexdigest()


def _legacy_hash_of(f) -> str:
    f.seek(LEGACY_HASH_OFFSET)
    return hashlib.sha256(f.read(LEGACY_HASH_SIZE)).hexdigest()[:8]


def kohya_hashes_of_file(path: str | os.PathLike) -> tuple[str, str]:
    """(`sshs_model_hash`, `sshs_legacy_hash`) of a safetensors file, by sd-scripts' rules."""
    header = read_header(path)
    with open(path, "rb") as f:
        model = _sha256_of_range(f, header.data_start, header.file_size - header.data_start)
        legacy = _legacy_hash_of(f)
    return model, legacy


def save_tensors(path: str | os.PathLike | Destination, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None, *, inputs: Iterable[str | os.PathLike] = (),
                 overwrite: bool = False, dtype: torch.dtype | None = None, kohya_hashes: bool = False) -> str:
    """Write a whole dict of tensors (e.g. a LoRA) atomically; `dtype` casts floating tensors, clamped."""
    def target_dtype(t: torch.Tensor) -> torch.dtype:
        return dtype if (dtype is not None and t.is_floating_point()) else t.dtype

    specs = {key: (target_dtype(t), tuple(t.shape)) for key, t in tensors.items()}
    with StreamingWriter(path, specs, metadata, inputs=inputs, overwrite=overwrite, kohya_hashes=kohya_hashes) as w:
        for key, tensor in tensors.items():
            w.write(key, tensor)
    return w.path


class ShardedReader:
    """A diffusers/transformers sharded checkpoint (a folder or its `*.safetensors.index.json`) read as one file.

    Same API as LazyReader; `shard_of(key)` tells which file holds a key, so a writer can keep the sharding.
    """

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        index_path = _find_index(path)
        self.path = path
        self.index_path = index_path
        folder = os.path.dirname(index_path)
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except RecursionError:
            raise LoraToolsError("invalid shard index: JSON nested too deeply", file=index_path) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LoraToolsError(f"invalid shard index: {exc}", file=index_path) from None
        for key, shard in weight_map.items():
            # A shard is a file beside the index: a path ("../x", "/etc/y") would read outside the checkpoint.
            if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
                raise LoraToolsError(f"invalid shard index: shard name {_short(shard)} is not a file name in "
                                     "the index's folder", file=index_path, key=key)
        self.weight_map: dict[str, str] = dict(weight_map)
        self.index_metadata = index.get("metadata", {})
        self.readers: dict[str, LazyReader] = {}
        for shard in dict.fromkeys(self.weight_map.values()):
            self.readers[shard] = LazyReader(os.path.join(folder, shard))
        for key, shard in self.weight_map.items():
            if key not in self.readers[shard]:
                raise LoraToolsError(f"index says the tensor is in {shard} but it is not there", file=index_path, key=key)
        self.metadata = dict(next(iter(self.readers.values())).metadata) if self.readers else {}

    def __enter__(self) -> ShardedReader:
        return self

    def __exit__(self, *exc) -> None:
        for reader in self.readers.values():
            reader.close()

    def close(self) -> None:
        self.__exit__()

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __iter__(self):
        return iter(self.weight_map)

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def shard_of(self, key: str) -> str:
        try:
            return self.weight_map[key]
        except KeyError:
            raise LoraToolsError("no such tensor in the checkpoint", file=self.index_path, key=key) from None

    def _reader(self, key: str) -> LazyReader:
        return self.readers[self.shard_of(key)]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._reader(key).shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._reader(key).dtype(key)

    def get(self, key: str) -> torch.Tensor:
        return self._reader(key).get(key)

    def get_raw(self, key: str) -> bytes:
        return self._reader(key).get_raw(key)

    def read(self, key: str) -> torch.Tensor:
        return self._reader(key).read(key)

    def read_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._reader(key).read_flat(key, start, stop)

    def file_readers(self) -> list[LazyReader]:
        return list(self.readers.values())

    def copy_into(self, writer: StreamingWriter, key: str) -> None:
        self._reader(key).copy_into(writer, key)

    def files(self) -> list[str]:
        return [reader.path for reader in self.readers.values()]

    def file_order(self) -> list[str]:
        """Shard by shard, each in its file order."""
        return [key for reader in self.readers.values() for key in reader.file_order() if key in self.weight_map]


def _find_index(path: str) -> str:
    if os.path.isfile(path) and path.endswith(".index.json"):
        return path
    if os.path.isdir(path):
        candidates = sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
        if len(candidates) == 1:
            return os.path.join(path, candidates[0])
        if not candidates:
            raise LoraToolsError("folder has no *.safetensors.index.json shard index", file=path)
        raise LoraToolsError(f"folder has several shard indexes {candidates}; name one", file=path)
    raise LoraToolsError("no such file or folder", file=path)


def open_checkpoint(path: str | os.PathLike) -> LazyReader | ShardedReader:
    """A single-file checkpoint, or a sharded one given as its folder or index json."""
    path = os.fspath(path)
    if os.path.isdir(path) or path.endswith(".index.json"):
        return ShardedReader(path)
    return LazyReader(path)
