"""Wan 2.2 A14B expert pairs in the LoRA-to-LoRA scripts (svd_merge_lora.py, resize_lora.py; convert_lora.py and
wan22_merge_lora.py share the checks): which files make a pair, where each expert's outputs go, and one run of
the script's single-file command per expert.

A pair is given by `--high_noise` / `--low_noise`, or found from the inputs themselves: every input is named for
one expert and its partner file lies next to it (library.formats.wan22.expert_pair, the rule convert_lora uses).
Each expert's output is named as convert_lora names them (formats.wan22.expert_outputs), and every output (side
outputs such as --report included, also named per expert) is checked against every input and against the other
expert's outputs before any work. Then each expert runs exactly the single-file command on its own files, so
its output is what that command gives on that expert alone, with the expert recorded in the metadata.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

from library.errors import LoraToolsError
from library.formats.wan22 import EXPERT_KEY, EXPERTS, check_experts, expert_of, expert_outputs, expert_pair


def add_pair_args(parser: argparse.ArgumentParser, many: bool) -> None:
    """--high_noise / --low_noise: the LoRA file(s) of each Wan 2.2 A14B expert."""
    for e in EXPERTS:
        parser.add_argument(f"--{e}", nargs="+" if many else None, default=None,
                            help=f"Wan 2.2 A14B: the {e.replace('_', '-')} expert's LoRA{'s' if many else ''} "
                                 "(both experts are processed in one run; outputs named as convert_lora's)")


def expert_files(given: Sequence[str], high: Sequence[str] | None, low: Sequence[str] | None) \
        -> dict[str, list[str]] | None:
    """{expert: files} from the flags, or from `given` when every file in it has its partner next to it
    (formats.wan22.expert_pair, file by file); None when the inputs are no pair."""
    if high or low:
        if given:
            raise LoraToolsError("give the LoRAs either as the inputs or as --high_noise/--low_noise, not both")
        return {e: list(files) for e, files in zip(EXPERTS, (high, low), strict=True) if files}
    pairs = [expert_pair(path, None, None) for path in given]
    if not pairs or any(p is None for p in pairs):
        return None
    return {e: [p[e] for p in pairs] for e in EXPERTS}


def check_expert_files(files: Mapping[str, Sequence[str]]) -> None:
    """Refuse, before any work, a file given for one expert (`--high_noise`, `--low_noise`; any other label is for
    both) whose name or metadata says it is the other's, or whose keys say it is no Wan 2.1/2.2-14B LoRA."""
    from library.formats import FAMILIES
    from library.formats.match import detect_lora
    from library.safetensors_io import LazyReader

    for label, paths in files.items():
        for path in paths:
            with LazyReader(path) as reader:
                said = expert_of(path, reader.metadata)
                try:
                    family, _ = detect_lora({k: tuple(reader.shape(k)) for k in reader.keys()}, reader.metadata)
                except LoraToolsError:  # ambiguous or unreadable here: the full read (with --family) decides
                    family = None
            if label in EXPERTS and said not in (None, label):
                raise LoraToolsError(f"given as --{label} but its name or metadata says {said}", file=path)
            if family not in (None, "wan21"):
                raise LoraToolsError(f"given as --{label} for a Wan 2.2 A14B expert (Wan 2.1 14B shapes), but this "
                                     f"is a {family} LoRA ({FAMILIES[family].description})", file=path)


def expert_runs(args: argparse.Namespace, inputs: str, many: bool,
                outputs: Sequence[str] = ("save_to", "report")) -> dict[str, argparse.Namespace] | None:
    """One copy of `args` per expert, its `inputs` attribute set to that expert's file(s) and each attribute of
    `outputs` to that expert's path; None when the inputs are no Wan 2.2 pair. All outputs are checked here."""
    from library.cli import prepare_output

    def listed(value):  # a script of one input has `--model A`, `--high_noise A`: the same as lists of one
        return value if many or value is None else [value]

    given = listed(getattr(args, inputs)) or []
    files = expert_files(given, *(listed(getattr(args, e, None)) for e in EXPERTS))
    if files is None:
        return None
    check_expert_files(files)
    every_input = [p for paths in files.values() for p in paths]
    paths = {attr: expert_outputs(getattr(args, attr, None), files) for attr in outputs if hasattr(args, attr)}
    runs = {}
    for e, own in files.items():
        ns = argparse.Namespace(**vars(args))
        vars(ns).update({inputs: own if many else own[0], **{x: None for x in EXPERTS}},
                        **{attr: per[e] for attr, per in paths.items()})
        others = {f"{x} {attr}": per[x] for attr, per in paths.items() for x in files if x != e}
        prepare_output(ns.save_to, every_input, ns, flag=f"{e} output", other_outputs=others)
        runs[e] = ns
    shown = "; ".join(f"{e} " + ", ".join(f) for e, f in files.items())
    print(f"Wan 2.2 A14B expert pair: {shown}")
    return runs


def expert_metadata(expert: str | None, loras: Sequence[object]) -> dict[str, str]:
    """The metadata an expert's output records ({} outside a pair), after checking that each LoRA is of the
    A14B experts' shape (`wan21`)."""
    if expert is None:
        return {}
    for lora in loras:
        check_experts({expert: lora})
    return {EXPERT_KEY: expert}
