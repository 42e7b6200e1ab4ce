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


# An inverse rule gives, for a diffusers module path, (native module path, position among its parts, swap).
InverseRule = Callable[[str, tuple[int, ...]], tuple[str, int, bool]]


def build_from_diffusers(builder, diffusers_rows, inverse: InverseRule, *, component: str = "transformer",
                         key_prefix: str = "", native: str = "native", split: str = "diffusers") -> None:
    """For families whose shape list only has diffusers names: native modules are assembled from their
    parts (rows stacked in part order), then registered like `build_native` does."""
    groups: dict[str, list[tuple[int, str, tuple[int, ...], bool]]] = {}
    for path, _kind, shape, _bias in diffusers_rows:
        name, order, swap = inverse(path, tuple(shape))
        groups.setdefault(name, []).append((order, path, tuple(shape), swap))
    for name, parts in groups.items():
        parts.sort()
        if [p[0] for p in parts] != list(range(len(parts))) or len({p[2][1:] for p in parts}) != 1:
            raise ValueError(f"{name}: parts {[(p[0], p[1], p[2]) for p in parts]} do not stack")
        rows = sum(p[2][0] for p in parts)
        key = key_prefix + name + ".weight"
        builder.target(key, (rows, *parts[0][2][1:]), component)
        builder.slot(native, name, key)
        start = 0
        for _order, path, shape, swap in parts:
            span = None if len(parts) == 1 else (start, start + shape[0])
            builder.slot(split, path, key, span, swap)
            start += shape[0]
