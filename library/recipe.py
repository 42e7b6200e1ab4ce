"""merge_models.py recipes: every setting that decides the merged values, as toml, so that
`merge_models.py --recipe R.toml --save_to out.safetensors` replays a merge bit for bit.

A recipe holds the merge flags (models, base, mask, method, ratios, block/key weights, density, seed, …),
the compute precision and device type (float sums on another device type may round differently), and the
sha256 of every input: replaying against other files is refused, since it could not give the same result.
Floats are written with Python's repr, which toml reads back to the same double. The same text is stored
in the output's metadata under RECIPE_KEY.
"""

from __future__ import annotations

import argparse
import os

from library.errors import LoraToolsError

RECIPE_KEY = "loratools.recipe"
RECIPE_VERSION = 1
FIELDS = ("models", "base", "mask", "method", "ratios", "block_weights", "key_weights", "te_ratio", "only",
          "normalize", "density", "seed", "majority_sign_method", "no_rescale", "protect_a", "precision",
          "save_precision", "family")


def recipe_text(args: argparse.Namespace, device_type: str, hashes: dict[str, str]) -> str:
    """The toml recipe of a run (`hashes`: input path → sha256)."""
    import toml

    merge = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
    return toml.dumps({"recipe_version": RECIPE_VERSION, "device_type": device_type, "merge": merge,
                       "sha256": dict(hashes)})


def load_recipe(path: str) -> dict:
    import toml

    try:
        with open(path, encoding="utf-8") as f:
            data = toml.load(f)
    except FileNotFoundError:
        raise LoraToolsError("recipe file not found", file=path) from None
    except (toml.TomlDecodeError, UnicodeDecodeError) as exc:
        raise LoraToolsError(f"invalid recipe toml: {exc}", file=path) from None
    if data.get("recipe_version") != RECIPE_VERSION or not isinstance(data.get("merge"), dict):
        raise LoraToolsError(f"not a merge_models.py recipe (version {RECIPE_VERSION})", file=path)
    unknown = sorted(set(data["merge"]) - set(FIELDS))
    if unknown:
        raise LoraToolsError(f"unknown recipe settings {unknown}", file=path)
    return data


def apply_recipe(args: argparse.Namespace, defaults: dict, path: str) -> dict:
    """Set the merge flags of `args` from the recipe at `path`; a merge flag also given on the command line
    is refused (the replay would not be the recipe). Returns the recipe."""
    data = load_recipe(path)
    given = [name for name in FIELDS if getattr(args, name, None) != defaults.get(name)]
    if given:
        raise LoraToolsError(f"--recipe replays a whole merge; do not also give --{', --'.join(given)}", file=path)
    for name in FIELDS:
        setattr(args, name, data["merge"].get(name, defaults.get(name)))
    if not args.models:
        raise LoraToolsError("the recipe names no models", file=path)
    return data


def check_inputs(data: dict, hashes: dict[str, str], device_type: str, path: str) -> None:
    """Refuse a replay against inputs other than the recipe's, or on another device type."""
    recorded = data.get("sha256", {})
    for file, digest in hashes.items():
        want = recorded.get(file)
        if want is not None and want != digest:
            raise LoraToolsError(f"the recipe was made from a file with sha256 {want[:12]}…, this one is "
                                 f"{digest[:12]}…; a replay would not give the same result", file=file)
    check_setup(data, hashes, device_type, path)


def check_setup(data: dict, files, device_type: str, path: str) -> None:
    """The checks of `check_inputs` that need no hash (every recorded input read, the device type), made
    before the merge; the hashes are known, and checked, only once it has read every input."""
    missing = sorted(set(data.get("sha256", {})) - {os.path.abspath(f) for f in files})
    if missing:
        raise LoraToolsError(f"the recipe's inputs {missing} are not read by this run", file=path)
    if data.get("device_type") not in (None, device_type):
        raise LoraToolsError(f"the recipe was computed on {data['device_type']}, this run uses {device_type}; "
                             f"give --device {data['device_type']} to replay it exactly", file=path)


def input_hashes(files) -> dict[str, str]:
    from library.metadata import file_sha256

    return {os.path.abspath(f): file_sha256(f) for f in files}


PLACEHOLDER_SHA256 = "0" * 64


def placeholder_hashes(files) -> dict[str, str]:
    """Same-length stand-ins for the sha256 of `files`: the header is written with them first and patched
    (StreamingWriter.update_metadata) once the merge has read, and so hashed, every input."""
    return {os.path.abspath(f): PLACEHOLDER_SHA256 for f in files}
