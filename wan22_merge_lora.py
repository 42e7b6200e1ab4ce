#!/usr/bin/env python
"""Bake Wan 2.2 A14B LoRAs into both expert checkpoints in one command: the high-noise LoRAs into the
high-noise model, the low-noise LoRAs into the low-noise model, and --models (one LoRA trained for both
experts, as musubi-tuner saves with --dit_high_noise) into both.

    python wan22_merge_lora.py --high_noise_model wan2.2_t2v_high_noise_14B.safetensors \\
        --low_noise_model wan2.2_t2v_low_noise_14B.safetensors \\
        --high_noise style_high_noise.safetensors --low_noise style_low_noise.safetensors \\
        --save_to merged.safetensors      # writes merged_high_noise.safetensors and merged_low_noise.safetensors

Each expert is merge_lora.py's checkpoint merge (streamed, exact, same report); a LoRA whose name or
metadata names the other expert is refused, so a swapped pair cannot be baked unnoticed.
"""

from __future__ import annotations

import argparse

from library.cli import add_common_args, finite_float, prepare_output, run_cli
from library.errors import LoraToolsError

EXPERTS = ("high_noise", "low_noise")


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for e in EXPERTS:
        word = e.replace("_", "-")
        parser.add_argument(f"--{e}_model", required=True, help=f"the {word} expert checkpoint")
        parser.add_argument(f"--{e}", nargs="*", default=[], help=f"LoRAs for the {word} expert")
        parser.add_argument(f"--{e}_ratios", nargs="*", type=finite_float, default=None,
                            help=f"strength per --{e} LoRA (default 1 each)")
    parser.add_argument("--models", nargs="*", default=[], help="LoRAs for both experts")
    parser.add_argument("--ratios", nargs="*", type=finite_float, default=None,
                        help="strength per --models LoRA (default 1 each)")
    parser.add_argument("--save_to", default=None,
                        help="output name: its expert word is swapped for the other expert (…high_noise… -> "
                             "…low_noise…), else _high_noise / _low_noise is appended")
    parser.add_argument("--allow_unmatched", action="store_true",
                        help="skip LoRA modules that match no weight instead of stopping")
    parser.add_argument("--no_metadata", action="store_true", help="write no metadata into the checkpoints")
    add_common_args(parser)
    return parser


def expert_args(args: argparse.Namespace, expert: str, save_to: str | None) -> argparse.Namespace:
    """merge_lora.py's arguments for one expert: its defaults, our shared options, this expert's files."""
    import merge_lora
    from library.inputs import ratios_for

    loras = [*getattr(args, expert), *args.models]
    ratios = ratios_for(getattr(args, f"{expert}_ratios"), getattr(args, expert)) + ratios_for(args.ratios, args.models)
    ns = merge_lora.setup_parser().parse_args(["--models", *loras])
    shared = {k: v for k, v in vars(args).items() if k in vars(ns) and k not in ("models", "ratios", "save_to")}
    vars(ns).update(shared, sd_model=getattr(args, f"{expert}_model"), save_to=save_to, ratios=ratios, family="wan21")
    return ns


def check_pairing(args: argparse.Namespace) -> None:
    """Refuse a LoRA whose name or metadata says it belongs to the other expert, or to another family, and a
    checkpoint whose name says the other expert or whose weights are another family's."""
    from library.formats import FAMILIES
    from library.formats.checkpoint import detect_checkpoint_family
    from library.formats.wan22 import expert_of
    from library.safetensors_io import open_checkpoint
    from library.wan_pairs import check_expert_files

    check_expert_files({**{e: getattr(args, e) for e in EXPERTS}, "models": args.models})
    for expert in EXPERTS:
        path = getattr(args, f"{expert}_model")
        said = expert_of(path)
        if said not in (None, expert):
            raise LoraToolsError(f"given as --{expert}_model but its name says {said}", file=path)
        try:
            with open_checkpoint(path) as reader:
                family = detect_checkpoint_family(reader)  # a whole checkpoint of another family; None when thinned
        except LoraToolsError:  # ambiguous between other families, or unreadable: merge_lora's read says it
            family = None
        if family not in (None, "wan21"):
            raise LoraToolsError(f"given as --{expert}_model (a Wan 2.2 A14B expert, Wan 2.1 14B shapes), but this "
                                 f"is a {family} checkpoint ({FAMILIES[family].description})", file=path)


def main(args: argparse.Namespace) -> dict:
    import merge_lora
    from library.formats.wan22 import expert_outputs

    if not args.models and not any(getattr(args, e) for e in EXPERTS):
        raise LoraToolsError("no LoRA given: use --high_noise / --low_noise / --models")
    check_pairing(args)
    outputs = expert_outputs(args.save_to, EXPERTS)
    inputs = [*(getattr(args, f"{e}_model") for e in EXPERTS), *args.high_noise, *args.low_noise, *args.models]
    for e in EXPERTS:  # both outputs checked against every input and each other before any work
        prepare_output(outputs[e], inputs, args, flag=f"{e} output",
                       other_outputs={f"{o} output": outputs[o] for o in EXPERTS if o != e})
    results = {}
    for e in EXPERTS:
        if not getattr(args, e) and not args.models:
            print(f"{e}: no LoRA for this expert; {getattr(args, f'{e}_model')} is left as is")
            continue
        ns = expert_args(args, e, outputs[e])
        print(f"{e}: {ns.sd_model} + {', '.join(ns.models)}")
        results[e] = merge_lora.main(ns)
    return results


if __name__ == "__main__":
    run_cli(setup_parser, main)
