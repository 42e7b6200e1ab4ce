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
from library.formats import FAMILIES, WRITE_FORMATS, read_lora
from library.formats.regroup import kind_of
from library.formats.write import lora_tensors, save_lora
from library.metadata import STALE_ON_WRITE, provenance
from library.safetensors_io import parse_dtype

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
    tensors, _ = lora_tensors(lora.modules, lora.family, args.to, notes)
    for line in notes[: None if args.verbose else 5]:
        print(f"  {line}")
    if len(notes) > 5 and not args.verbose:
        print(f"  … {len(notes) - 5} more split/fused modules (-v lists them)")
    summary = {"family": lora.family, "input_format": lora.format, "output_format": args.to,
               "modules_in": len(lora.modules), "tensors_out": len(tensors), "regrouped": len(notes)}
    if out is None or args.dry_run:
        print(f"dry run: would write {len(tensors)} tensors in {args.to} format")
        return summary
    metadata = {k: v for k, v in lora.metadata.items() if k not in STALE_ON_WRITE}
    metadata.update(provenance(SCRIPT, args, [args.input]))
    save_lora(out, lora.modules, lora.family, args.to, metadata, parse_dtype(args.save_precision),
              inputs=[args.input], overwrite=args.overwrite)
    print(f"wrote {out}: {args.to} format, {len(tensors)} tensors, {os.path.getsize(out):,} bytes")
    return summary


if __name__ == "__main__":
    run_cli(setup_parser, main)
