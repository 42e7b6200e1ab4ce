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
from library.errors import LoraToolsError
from library.formats.registry import FAMILIES
from library.formats.specs import WRITE_FORMATS

# Torch and the readers/writers are imported in main(), so that --help stays fast.

SCRIPT = "convert_lora.py"


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("input", nargs="?", default=None,
                        help="LoRA file to convert (.safetensors, or pickled .pt/.ckpt/.bin); a Wan 2.2 file named "
                             "…high_noise… / …low_noise… is converted with its partner when that file is next to it")
    parser.add_argument("output", nargs="?", default=None,
                        help="output .safetensors file (for a Wan 2.2 pair: its expert word is swapped for the "
                             "other file, or _high_noise/_low_noise is appended)")
    parser.add_argument("--high_noise", default=None, help="Wan 2.2 A14B: the high-noise expert's LoRA")
    parser.add_argument("--low_noise", default=None, help="Wan 2.2 A14B: the low-noise expert's LoRA")
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
    from library.formats import read_lora
    from library.formats.wan22 import EXPERT_KEY, check_experts, expert_outputs, expert_pair

    if (args.high_noise or args.low_noise) and args.output is None:
        args.input, args.output = None, args.input  # `--high_noise A --low_noise B OUT`: the one positional is OUT
    pair = expert_pair(args.input, args.high_noise, args.low_noise)
    if pair is None:
        if args.input is None:
            raise LoraToolsError("no input LoRA given")
        return convert(args, args.input, prepare_output(args.output, [args.input], args, flag="OUTPUT"))
    outputs = expert_outputs(args.output, pair)
    for expert, path in outputs.items():  # every output checked against every input before any work
        others = {f"{e} output": p for e, p in outputs.items() if e != expert}
        outputs[expert] = prepare_output(path, pair.values(), args, flag=f"{expert} output", other_outputs=others)
    loras = {e: read_lora(p, family=args.family, allow_unmatched=args.allow_unmatched) for e, p in pair.items()}
    check_experts(loras)
    print(f"Wan 2.2 A14B expert pair: {', '.join(f'{e} {p}' for e, p in pair.items())}")
    return {e: convert(args, pair[e], outputs[e], loras[e], {EXPERT_KEY: e}) for e in pair}


def convert(args: argparse.Namespace, path: str, out: str | None, lora=None, extra: dict | None = None) -> dict:
    from library.diffusers_compat import kohya_alpha_warning
    from library.formats import read_lora
    from library.formats.regroup import kind_of
    from library.formats.write import lora_tensors
    from library.lora_output import output_dtype, write_lora
    from networks import adapter_from_tensors

    if lora is None:
        lora = read_lora(path, family=args.family, allow_unmatched=args.allow_unmatched,
                         fix_split_qkv_alpha=args.fix_split_qkv_alpha)
    for note in lora.notes:
        warn(note)
    if lora.unmatched:
        warn(f"dropped {len(lora.unmatched)} key(s) that map to no {lora.family} module: "
             f"{', '.join(lora.unmatched[:20])}{' …' if len(lora.unmatched) > 20 else ''}")
    kinds = Counter(kind_of(m.tensors) for m in lora.modules)
    print(f"read {path}: {lora.family} ({FAMILIES[lora.family].description}), {lora.format} format, "
          f"{len(lora.modules)} modules ({', '.join(f'{k} ×{n}' for k, n in sorted(kinds.items()))})")
    notes: list[str] = []
    if out is None or args.dry_run:
        tensors, _ = lora_tensors(lora.modules, lora.family, args.to, notes)
        print_notes(notes, args.verbose)
        print(f"dry run: would write {len(tensors)} tensors in {args.to} format")
        return summary(lora, args.to, len(tensors), notes)
    written = write_lora(out, lora.modules, lora.family, args.to, dtype=output_dtype([lora], args.save_precision),
                         script=SCRIPT, args=args, inputs=[path], base_metadata={**lora.metadata, **(extra or {})},
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
