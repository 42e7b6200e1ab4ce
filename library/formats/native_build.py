"""Table building for transformer families: native (BFL/SAI/…) modules as canonical targets, plus the
diffusers modules that are 1:1 renames or row slices of them (tools only)."""

from __future__ import annotations

from collections.abc import Callable

# A split rule gives, for a native module path, its diffusers parts in row order: (path, rows, swap).
# rows=None means the whole weight.
SplitRule = Callable[[str, tuple[int, ...]], list[tuple[str, int | None, bool]]]


def build_native(builder, native_rows, diffusers_rows, rule: SplitRule, *, component: str = "transformer",
                 key_prefix: str = "", native: str = "native", split: str = "diffusers") -> None:
    """Register native modules as targets and their diffusers parts as slots, checking both lists agree.

    Every diffusers module of the shape list must be produced exactly once with its exact shape, and the
    parts of a fused module must add up to its rows; otherwise the rule is wrong and generation stops.
    """
    expected = {path: tuple(shape) for path, _k, shape, _b in diffusers_rows}
    seen: set[str] = set()
    for path, _kind, shape, _bias in native_rows:
        key = key_prefix + path + ".weight"
        builder.target(key, shape, component)
        builder.slot(native, path, key)
        parts = rule(path, tuple(shape))
        start = 0
        for dpath, size, swap in parts:
            size = shape[0] if size is None else size
            rows = None if (start == 0 and size == shape[0]) else (start, start + size)
            want = (size, *shape[1:])
            if expected.get(dpath) != want:
                raise ValueError(f"{path} -> {dpath}: shape {want} but the diffusers list says {expected.get(dpath)}")
            builder.slot(split, dpath, key, rows, swap)
            seen.add(dpath)
            start += size
        if parts and start != shape[0]:
            raise ValueError(f"parts of {path} cover {start} of {shape[0]} rows")
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"diffusers modules without a native module: {missing[:10]} ({len(missing)})")
