"""Pairs of weights from two checkpoints of the same model, matched by key and shape, read one at a time.

Extraction only ever needs one (base, tuned) pair in memory. Tensors are read with plain buffered
reads straight into a tensor's storage rather than through safetensors' mmap: mapped pages stay
resident in the process (and count in its RSS) until the mapping is closed, so reading a whole 5 GB
checkpoint through the mmap makes the process *look* and, under pressure, behave as if it held the
model. `--mem_eff_safe_open` (sd-scripts' flag) is therefore our default; `mmap=True` keeps the old path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from library.errors import LoraToolsError
from library.safetensors_io import open_checkpoint

PREVIEW_KEYS = 8


def first_keys(keys: Sequence[str], count: int = PREVIEW_KEYS) -> str:
    shown = ", ".join(keys[:count])
    return shown + (f", ... ({len(keys)} keys)" if len(keys) > count else "")


def select_prefix(keys: Sequence[str], prefix: str, path: str) -> list[str]:
    """Keys under `prefix` (ComfyUI's prefix_model); a prefix matching nothing is an error showing what is there."""
    if not prefix:
        return list(keys)
    chosen = [k for k in keys if k.startswith(prefix)]
    if not chosen:
        raise LoraToolsError(f"--prefix_model {prefix!r} matches no key; the file starts with: {first_keys(sorted(keys))}",
                             file=path)
    return chosen


@dataclass
class PairMatch:
    """How the keys of two checkpoints line up: common keys with equal shapes, plus what only one side has."""

    common: list[str]
    only_base: list[str] = field(default_factory=list)
    only_tuned: list[str] = field(default_factory=list)


class CheckpointPair:
    """Two checkpoints opened lazily; `read(key)` gives one (base, tuned) pair at a time.

    (No generator over pairs: a generator frame would keep the last pair alive while the caller works.)
    """

    def __init__(self, base_path: str, tuned_path: str, *, mmap: bool = False,
                 devices: tuple[str | None, str | None] = (None, None)):
        from library.cli import resolve_device

        # sd-scripts' --load_original_model_to / --load_tuned_model_to: where each model's tensors are read to
        # (None = host memory); the difference is then taken on the compute device, as before.
        self.devices = tuple(None if d is None else resolve_device(d) for d in devices)
        self.base_path = os.fspath(base_path)
        self.tuned_path = os.fspath(tuned_path)
        self.mmap = mmap
        self.base = open_checkpoint(self.base_path)
        try:
            self.tuned = open_checkpoint(self.tuned_path)
        except BaseException:
            self.base.close()
            raise

    def __enter__(self) -> CheckpointPair:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.base.close()
        self.tuned.close()

    def match(self, prefix: str = "") -> PairMatch:
        """Common keys under `prefix` whose shapes agree; a shape mismatch is an error naming the key and both shapes.

        Keys present in only one file are returned, not fatal: fine-tunes often add or drop buffers
        (e.g. `position_ids`), and the report lists them.
        """
        base_keys = select_prefix(self.base.keys(), prefix, self.base_path)
        tuned_keys = select_prefix(self.tuned.keys(), prefix, self.tuned_path)
        tuned_set = set(tuned_keys)
        common = [k for k in base_keys if k in tuned_set]
        if not common:
            raise LoraToolsError(
                f"the two checkpoints share no key{' under ' + repr(prefix) if prefix else ''}; are they the same "
                f"architecture? base starts with: {first_keys(sorted(base_keys))}; tuned starts with: "
                f"{first_keys(sorted(tuned_keys))}", file=self.tuned_path)
        for key in common:
            a, b = tuple(self.base.shape(key)), tuple(self.tuned.shape(key))
            if a != b:
                raise LoraToolsError(f"shape {b} differs from the base model's {a} ({self.base_path}); the two "
                                     "checkpoints are not the same architecture", file=self.tuned_path, key=key)
        base_set = set(base_keys)
        return PairMatch(common=common, only_base=[k for k in base_keys if k not in tuned_set],
                         only_tuned=[k for k in tuned_keys if k not in base_set])

    def files(self) -> list[str]:
        """Every file the pair reads (a sharded checkpoint's shards, not its folder): what provenance hashes."""
        return [path for reader in (self.base, self.tuned) for path in reader.files()]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.base.shape(key))

    def dtype(self, key: str) -> torch.dtype:
        return self.base.dtype(key)

    def read(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mmap:  # the old path, kept for comparison (`--mmap`)
            pair = self.base.get(key), self.tuned.get(key)
        else:
            pair = self.base.read(key), self.tuned.read(key)
        return tuple(t if d is None or d.type == "cpu" else t.to(d) for t, d in zip(pair, self.devices))


def hash_in_background(paths: Sequence[str]):
    """Start computing the sha256 of `paths` on a daemon thread (hashlib and file reads release the GIL); the
    digests land in library.metadata's per-process cache, so provenance() after `join()` only looks them up."""
    import threading

    from library.metadata import file_sha256
    from library.stage_clock import stage

    def run() -> None:
        for path in paths:
            with stage("sha256 of the inputs"):
                file_sha256(path)

    thread = threading.Thread(target=run, name="hashing", daemon=True)
    thread.start()
    return thread
