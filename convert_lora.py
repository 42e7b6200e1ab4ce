#!/usr/bin/env python
"""Convert a LoRA between formats: reads kohya, diffusers/PEFT, old diffusers, AI-Toolkit, ComfyUI, xlabs and
LyCORIS files of any supported family; writes kohya, diffusers, ai-toolkit or comfy. Exact: fused and split
layers (Flux qkv/linear1, OpenCLIP in_proj) are split or fused without loss and the scale is kept as alpha
wherever the output format can hold it."""

from __future__ import annotations

import argparse
import os
from collections import Counter

from library.cli import add_common_args, prepare_output, run_cli, warn
from library.formats.registry import FAMILIES
from library.formats.specs import WRITE_FORMATS

# Torch and the readers/writers are imported in main(), so that --help stays fast.

SCRIPT = "convert_lora.py"


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("input", help="LoRA file to convert (.safetensors, or pickled .pt/.ckpt/.bin)")
    parser.add_argument("output", nargs="?", default=None, help="output .safetensors file")
    parser.add_argument("--to", required=True, choices=WRITE_FORMATS, help="output format")
    parser.add_argument("--family", default=None, choices=sorted(FAMILIES),
                        help="model family, when detection cannot tell (it never guesses)")
    parser.add_argument("--allow_unmatched", action="store_true",
                        help="drop keys that map to no module of the family (they are listed) instead of failing")
    parser.add_argument("--fix_split_qkv_alpha", action="store_true",
                        help="for files trained by sd-scripts with split_qkv=True: multiply the alpha of the fused "
                             "qkv/linear1 modules by 3 or 4 so they act as trained (sd-scripts issue 2204)")
    add_common_args(parser, device=False, precision=False)
    return parser


def main(args: argparse.Namespace) -> dict:
    from library.diffusers_compat import kohya_alpha_warning
    from library.formats import read_lora
    from library.formats.regroup import kind_of
    from library.formats.write import lora_tensors
    from library.lora_output import output_dtype, write_lora
    from networks import adapter_from_tensors

    out = prepare_output(args.output, [args.input], args, flag="OUTPUT")
    lora = read_lora(args.input, family=args.family, allow_unmatched=args.allow_unmatched,
                     fix_split_qkv_alpha=args.fix_split_qkv_alpha)
    for note in lora.notes:
        warn(note)
    if lora.unmatched:
        warn(f"dropped {len(lora.unmatched)} key(s) that map to no {lora.family} module: "
             f"{', '.join(lora.unmatched[:20])}{' …' if len(lora.unmatched) > 20 else ''}")
    kinds = Counter(kind_of(m.tensors) for m in lora.modules)
    print(f"read {args.input}: {lora.family} ({FAMILIES[lora.family].description}), {lora.format} format, "
          f"{len(lora.modules)} modules ({', '.join(f'{k} ×{n}' for k, n in sorted(kinds.items()))})")
    notes: list[str] = []
    if out is None or args.dry_run:
        tensors, _ = lora_tensors(lora.modules, lora.family, args.to, notes)
        print_notes(notes, args.verbose)
        print(f"dry run: would write {len(tensors)} tensors in {args.to} format")
        return summary(lora, args.to, len(tensors), notes)
    written = write_lora(out, lora.modules, lora.family, args.to, dtype=output_dtype([lora], args.save_precision),
                         script=SCRIPT, args=args, inputs=[args.input], base_metadata=lora.metadata,
                         overwrite=args.overwrite, notes=notes)
    print_notes(notes, args.verbose)
    pairs = [(a.rank, a.alpha) for a in (adapter_from_tensors(m.tensors, m.source) for m in lora.modules)]
    if note := kohya_alpha_warning(args.to, lora.family, pairs):
        warn(f"{out}: {note}")
    print(f"wrote {out}: {args.to} format, {written.n_tensors} tensors, {os.path.getsize(out):,} bytes")
    return summary(lora, args.to, written.n_tensors, notes)


def print_notes(notes: list[str], verbose: int) -> None:
    for line in notes[: None if verbose else 5]:
        print(f"  {line}")
    if len(notes) > 5 and not verbose:
        print(f"  … {len(notes) - 5} more split/fused modules (-v lists them)")


def summary(lora, fmt: str, n_tensors: int, notes: list[str]) -> dict:
    return {"family": lora.family, "input_format": lora.format, "output_format": fmt,
            "modules_in": len(lora.modules), "tensors_out": n_tensors, "regrouped": len(notes)}


if __name__ == "__main__":
    run_cli(setup_parser, main)
