"""From merge_models.py's flags to the merge's key facts: the family and layout of the checkpoints, and the
per-key strengths (--block_weights, --key_weights, --te_ratio, --only)."""

from __future__ import annotations

import argparse

from library.errors import LoraToolsError
from library.formats.checkpoint import detect_checkpoint_layout, partial_layout
from library.formats.registry import FAMILIES
from library.model_blocks import KeyPlaces, parse_mbw
from library.model_merge_plan import Strengths, parse_key_weights


def detect_places(reader, family: str | None, path: str) -> tuple[KeyPlaces, str | None]:
    """The key places of model A's layout: `family` given or detected; (no layout, None) for a key set of no
    known family, which merges like any other but cannot take --block_weights."""
    if family is not None and family not in FAMILIES:
        raise LoraToolsError(f"unknown --family {family!r}; use one of {', '.join(FAMILIES)}")
    layout = detect_checkpoint_layout(reader, family)
    if layout is None and family is not None:
        layout = partial_layout(reader, family)
        if layout is None:
            raise LoraToolsError(f"no key of the checkpoint fits a {family} model", file=path)
    return KeyPlaces(layout), layout.family.name if layout else None


def strengths_from_args(args: argparse.Namespace, places: KeyPlaces, family: str | None) -> Strengths:
    blocks = parse_mbw(args.block_weights, family) if args.block_weights else {}
    return Strengths(places, blocks, tuple(parse_key_weights(args.key_weights)), args.te_ratio, args.only)
