"""Builders for the hostile-input tests: safetensors files with a chosen header length, small real-named
LoRAs, and the checks every hostile case ends with (no temporary file, inputs byte-identical)."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import torch

# A real SD1 UNet module (kohya and diffusers/PEFT names of the same layer, in 640 / out 640).
KOHYA_MODULE = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
PEFT_MODULE = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"

_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      header_len: int | None = None) -> bytes:
    """A valid safetensors file written by hand (not by the code under test), its header JSON padded with
    spaces to exactly `header_len` bytes when given, so the 8-byte length field takes a chosen value."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    data, offset = [], 0
    for key, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        data.append(raw)
        offset += len(raw)
    body = json.dumps(header).encode()
    if header_len is not None:
        assert header_len >= len(body), (header_len, len(body))
        body += b" " * (header_len - len(body))
    return struct.pack("<Q", len(body)) + body + b"".join(data)


def length_with_low_bytes(natural: int, low: bytes) -> int:
    """The smallest header length >= `natural` whose little-endian encoding starts with `low`."""
    step = 256 ** len(low)
    base = int.from_bytes(low, "little")
    return base + step * max(0, -(-(natural - base) // step))


def peft_lora(rank: int = 4, alpha: float = 1.0, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    g = torch.Generator().manual_seed(seed)
    tensors = {f"{PEFT_MODULE}.lora_A.weight": torch.randn(rank, 640, generator=g),
               f"{PEFT_MODULE}.lora_B.weight": torch.randn(640, rank, generator=g)}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": rank, "unet.lora_alpha": alpha,
                                                  "unet.target_modules": ["to_q"]})}
    return tensors, meta


def kohya_lora(rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{KOHYA_MODULE}.lora_down.weight": torch.randn(rank, 640, generator=g),
            f"{KOHYA_MODULE}.lora_up.weight": torch.randn(640, rank, generator=g),
            f"{KOHYA_MODULE}.alpha": torch.tensor(alpha)}


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fingerprints(folder) -> dict[str, str]:
    """sha256 of every file under `folder` (to assert that inputs are byte-identical afterwards)."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = sha256(path)
    return out


def temp_files(folder) -> list[str]:
    return sorted(name for _root, _dirs, files in os.walk(folder) for name in files if name.startswith(".tmp-"))
