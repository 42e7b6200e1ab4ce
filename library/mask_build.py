"""make_mask.py's run: check flags and outputs, stream the inputs key by key, build, edit, write, report.

Inputs: models through library.safetensors_io.open_checkpoint (single file, sharded folder or index, .ckpt
loaded weights_only), masks through library.mask_file.read_mask. A model's floating-point tensors are masked;
integer/bool tensors (position ids, markers) are left out. A key a mask lacks is "not selected".
`quad` writes four files: --save_to NAME.safetensors → NAME.1.safetensors … NAME.4.safetensors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable

import torch

from library import masks as M
from library.cli import prepare_output, progress, side_outputs, warn
from library.destination import Destination, write_text
from library.errors import LoraToolsError
from library.mask_file import MaskWriter, count_selected, pack_bits, read_mask, unpack_bits
from library.mask_report import (
    MaskRow,
    format_mask_summary,
    format_model_summary,
    mask_summary,
    model_summary,
    norm_row,
    plot_png,
)
from library.metadata import provenance
from library.plots import INSTALL_HINT, matplotlib_available
from library.safetensors_io import open_checkpoint

MODEL_METHODS = ("simple", "magnitude", "random", "quad")
MASK_METHODS = (*M.SET_OPERATIONS, "edit")
SEEDED = ("random", "quad")


def quad_paths(save_to: str) -> list[str]:
    stem = save_to[: -len(".safetensors")] if save_to.endswith(".safetensors") else save_to
    return [f"{stem}.{i}.safetensors" for i in range(1, 5)]


def _check_flags(args: argparse.Namespace, rules: list[M.EditRule]) -> None:
    method = args.method
    if method in MODEL_METHODS and not args.model:
        raise LoraToolsError(f"{method} needs --model (the model whose keys and shapes the mask takes)")
    if method == "magnitude" and not args.base:
        raise LoraToolsError("magnitude needs --base: the mask is computed from |model − base|")
    if method == "report" and bool(args.model) == bool(args.masks):
        raise LoraToolsError("report needs either --model (with an optional --base) or --masks")
    if method in M.SET_OPERATIONS and len(args.masks or ()) < 2:
        raise LoraToolsError(f"{method} needs --masks with two or more mask files")
    if method == "edit" and (len(args.masks or ()) != 1 or not rules):
        raise LoraToolsError("edit needs one --masks file and at least one --edit rule")
    if method in MODEL_METHODS and args.masks:
        raise LoraToolsError(f"{method} builds a mask from --model; --masks is for set operations, edit and report")
    if method in MASK_METHODS and args.model:
        raise LoraToolsError(f"{method} works on --masks; --model is not used")
    if args.base and method not in ("magnitude", "report"):
        raise LoraToolsError("--base is used by magnitude and report only")
    if method == "report" and rules:
        raise LoraToolsError("report writes no mask; --edit has nothing to edit")
    if args.plot and not matplotlib_available():
        raise LoraToolsError(INSTALL_HINT)


def _outputs(args: argparse.Namespace, inputs: list[str]) -> list[str]:
    """Every output path, checked against the inputs and each other before any work."""
    if args.method == "report":
        if args.save_to:
            raise LoraToolsError("report writes no mask; drop --save_to (use --report FILE.json / --plot FILE.png)")
        side_outputs(args, inputs, {})
        return []
    if args.method != "quad":
        path = prepare_output(args.save_to, inputs, args)
        return [path] if path else []
    if args.save_to is None:
        prepare_output(None, inputs, args)
        return []
    paths = quad_paths(args.save_to)
    return [prepare_output(p, inputs, args, other_outputs={f"--save_to part {j + 1}": q for j, q in enumerate(paths)
                                                           if q != p}) for p in paths]


def _plot_destination(args: argparse.Namespace, inputs: list[str], outputs: list[str]) -> Destination | None:
    if not args.plot:
        return None
    if not args.plot.endswith(".png"):
        raise LoraToolsError("--plot must end in .png", file=args.plot)
    others = {**{f"--save_to {i + 1}": p for i, p in enumerate(outputs)}, "--report": args.report}
    dest = Destination(args.plot, inputs, args.overwrite, flag="--plot", other_outputs=others)
    dest.check()
    return dest


def run(args: argparse.Namespace) -> dict:
    rules = [M.parse_edit(text) for text in args.edit or ()]
    _check_flags(args, rules)
    inputs = [p for p in (args.model, args.base, *(args.masks or ())) if p]
    outputs = _outputs(args, inputs)
    plot_to = _plot_destination(args, inputs, outputs)
    with contextlib.ExitStack() as stack:
        if args.method == "report":
            result = _report(args, stack)
        else:
            result = _make(args, stack, rules, inputs, outputs)
    if result is None:
        return {}
    text = json.dumps(result, indent=1)
    if args.report:
        write_text(args.report, text + "\n", inputs=inputs, overwrite=args.overwrite, flag="--report")
    if plot_to is not None:
        _plot(plot_to, result)
        print(f"plot: {plot_to.path}")
    return result


def _float_keys(reader) -> list[str]:
    return [k for k in reader.file_order() if reader.dtype(k).is_floating_point]


def _make(args, stack, rules, inputs, outputs) -> dict | None:
    method = args.method
    if method in MODEL_METHODS:
        model = stack.enter_context(open_checkpoint(args.model))
        keys = _float_keys(model)
        base = stack.enter_context(open_checkpoint(args.base)) if args.base else None
        if base is not None:
            missing = [k for k in keys if k not in base]
            if missing:
                warn(f"{len(missing)} tensors of the model are not in the base and get no mask, e.g. {missing[:3]}")
            keys = [k for k in keys if k in base]
        shapes = {k: model.shape(k) for k in keys}
        build = _model_builder(args, model, base)
        hashed = [f for reader in (model, base) if reader is not None for f in reader.files()]
    else:
        sources = [stack.enter_context(read_mask(p)) for p in args.masks]
        keys = M.combined_keys("union" if method == "edit" else method, [s.keys() for s in sources])
        shapes = _agreed_shapes(keys, sources)
        build = _mask_builder(method, sources)
        hashed = list(args.masks)
    unmatched = M.unmatched_rules(rules, keys)
    if unmatched:
        raise LoraToolsError(f"--edit pattern(s) {unmatched} match no key of the mask")
    if not keys:
        raise LoraToolsError("no tensors to mask", file=inputs[0])
    n_out = 4 if method == "quad" else 1
    if args.dry_run:
        print(f"dry run: {method} over {len(keys)} tensors, {len(rules)} edit rule(s); would write "
              f"{', '.join(outputs) or 'nothing (no --save_to)'}")
        return None
    meta = provenance("make_mask.py", args, hashed, seed=args.seed if method in SEEDED or rules else None)
    meta["loratools.mask_method"] = method
    writers = [stack.enter_context(MaskWriter(Destination(p, inputs, args.overwrite), shapes,
                                              {**meta, **({"loratools.mask_part": f"{i + 1}/4"} if n_out == 4 else {})}))
               for i, p in enumerate(outputs)]
    rows: list[list[MaskRow]] = [[] for _ in writers]
    for key in progress(keys, desc=f"make_mask {method}", enabled=sys.stderr.isatty()):
        parts = build(key)
        if any(rule.matches(key) for rule in rules):
            parts = _edited(parts, key, shapes[key], rules, args.seed)
        for i, packed in enumerate(parts):
            writers[i].write_packed(key, packed)
            rows[i].append(MaskRow(key, count_selected(packed), int(torch.Size(shapes[key]).numel())))
    reports = {"method": method, "masks": {}}
    for writer, out_rows in zip(writers, rows):
        summary = mask_summary(out_rows)
        reports["masks"][writer.path] = summary
        print(format_mask_summary(summary, f"wrote {writer.path}", args.verbose))
    return reports


def _edited(parts: list[torch.Tensor], key: str, shape, rules: list[M.EditRule], seed: int) -> list[torch.Tensor]:
    """The packed mask(s) of `key` after the --edit rules.

    One mask: the rules replace it. The four quad parts: the rules say which entries take part in the split
    (off → in no part; on, random, gaussian → the selected entries stay in the one part the quad draw gave
    them), so the parts stay disjoint; editing each part on its own would put an entry switched on in all four.
    """
    if len(parts) == 1:
        return [pack_bits(M.apply_edits(key, unpack_bits(parts[0], shape), rules, seed))]
    taking_part = pack_bits(M.apply_edits(key, M.simple_mask(shape, True), rules, seed))
    return [packed & taking_part for packed in parts]  # padding bits are 0 in both


def _agreed_shapes(keys, sources) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for key in keys:
        found = {s.shape(key) for s in sources if key in s}
        if len(found) > 1:
            raise LoraToolsError(f"the masks give this key different shapes {sorted(found)}", key=key)
        shapes[key] = found.pop()
    return shapes


def _mask_builder(method: str, sources) -> Callable[[str], list[torch.Tensor]]:
    if method == "edit":
        return lambda key: [sources[0].packed(key)]
    return lambda key: [M.combine_packed(method, [s.packed(key) if key in s else None for s in sources])]


def _model_builder(args, model, base) -> Callable[[str], list[torch.Tensor]]:
    def build(key: str) -> list[torch.Tensor]:
        shape = model.shape(key)
        if args.method == "simple":
            return [pack_bits(M.simple_mask(shape, args.value == "on"))]
        if args.method == "random":
            return [pack_bits(M.random_mask(shape, args.rate, args.seed, key))]
        if args.method == "quad":
            return [pack_bits(m) for m in M.quad_masks(shape, args.seed, key)]
        try:
            mask, _ = M.magnitude_mask(model.read(key), base.read(key), args.threshold, args.threshold_type,
                                       args.select, name=key)
        except LoraToolsError as exc:
            raise LoraToolsError(exc.message, file=args.model, key=key) from None
        return [pack_bits(mask)]

    return build


def _report(args, stack) -> dict:
    if args.masks:
        result = {"method": "report", "masks": {}}
        for path in args.masks:
            with read_mask(path) as mf:
                rows = [MaskRow(k, mf.count(k), int(torch.Size(mf.shape(k)).numel()))
                        for k in progress(mf.keys(), desc="mask report", enabled=sys.stderr.isatty())]
            result["masks"][os.path.abspath(path)] = summary = mask_summary(rows)
            print(format_mask_summary(summary, path, max(args.verbose, 1)))
        return result
    model = stack.enter_context(open_checkpoint(args.model))
    base = stack.enter_context(open_checkpoint(args.base)) if args.base else None
    keys = [k for k in _float_keys(model) if base is None or k in base]
    rows = [norm_row(k, model.read(k), base.read(k) if base is not None else None)
            for k in progress(keys, desc="model report", enabled=sys.stderr.isatty())]
    summary = model_summary(rows)
    print(format_model_summary(summary, args.model, args.verbose))
    return {"method": "report", "model": {os.path.abspath(args.model): summary}}


def _plot(dest: Destination, result: dict) -> None:
    if "model" in result:
        (path, summary), = result["model"].items()
        layers = summary["layers"]
        series = {"‖A‖": [r["norm"] for r in layers]}
        if layers and layers[0]["delta_norm"] is not None:
            series["‖A − base‖"] = [r["delta_norm"] for r in layers]
        plot_png(dest, f"per-layer norms of {os.path.basename(path)}", series, [r["key"] for r in layers], "Frobenius norm")
        return
    summaries = result["masks"]
    labels = list(next(iter(summaries.values()))["layers"])
    series = {os.path.basename(p): [s["layers"].get(k, {"share": 0.0})["share"] for k in labels]
              for p, s in summaries.items()}
    plot_png(dest, "share of selected parameters per layer", series, labels, "selected share")
