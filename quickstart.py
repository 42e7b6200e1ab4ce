#!/usr/bin/env python
"""A tour of loratools on two small example LoRAs with real SDXL key names, in a temporary folder.

    python quickstart.py            # runs every step and prints what each did
    python quickstart.py --keep D   # keep the files in folder D instead of a temporary one
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import tempfile

import torch

from library.safetensors_io import save_tensors


def _transformer_block(prefix: str, dim: int, context: int = 2048) -> dict[str, tuple[int, int]]:
    """Every module a kohya SDXL LoRA trains in one UNet transformer block (proj_in/out, both attentions, ff)."""
    block = f"{prefix}_transformer_blocks_0"
    modules = {f"{prefix}_proj_in": (dim, dim), f"{prefix}_proj_out": (dim, dim)}
    for attn, kv in (("attn1", dim), ("attn2", context)):
        modules.update({f"{block}_{attn}_to_q": (dim, dim), f"{block}_{attn}_to_k": (dim, kv),
                        f"{block}_{attn}_to_v": (dim, kv), f"{block}_{attn}_to_out_0": (dim, dim)})
    modules.update({f"{block}_ff_net_0_proj": (8 * dim, dim), f"{block}_ff_net_2": (dim, 4 * dim)})
    return modules


def _clip_layer(prefix: str, dim: int) -> dict[str, tuple[int, int]]:
    """Every module of one CLIP encoder layer (q/k/v/out_proj, fc1, fc2), as kohya trains them."""
    layer = f"{prefix}_text_model_encoder_layers_0"
    attn = {f"{layer}_self_attn_{p}_proj": (dim, dim) for p in ("q", "k", "v", "out")}
    return {**attn, f"{layer}_mlp_fc1": (4 * dim, dim), f"{layer}_mlp_fc2": (dim, 4 * dim)}


# Complete blocks of a default kohya SDXL LoRA with their real names and shapes (out, in): a UNet transformer
# block at 640 and one at 1280 channels, and layer 0 of both text encoders. Complete, because loaders expect
# what trainers write: diffusers refuses a text-encoder LoRA whose attention lacks out_proj, for one.
EXAMPLE_MODULES = {**_transformer_block("lora_unet_input_blocks_4_1", 640),
                   **_transformer_block("lora_unet_middle_block_1", 1280),
                   **_clip_layer("lora_te1", 768), **_clip_layer("lora_te2", 1280)}


def make_example_lora(path: str, rank: int, alpha: float, seed: int, modules=EXAMPLE_MODULES) -> str:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_dim, in_dim) in modules.items():
        tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, in_dim, generator=generator) * 0.05).half()
        tensors[f"{name}.lora_up.weight"] = (torch.randn(out_dim, rank, generator=generator) * 0.05).half()
        tensors[f"{name}.alpha"] = torch.tensor(alpha).half()
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_base_model_version": "sdxl_base_v1-0", "modelspec.title": os.path.basename(path)[:-12]}
    save_tensors(path, tensors, meta, overwrite=True)
    return path


def run_script(name: str, argv: list[str]) -> None:
    """Run a script the way a notebook would: library.cli.parse_args (which reads --config_file, where the
    parser's own parse_args would not), then its main()."""
    from library.cli import parse_args

    print(f"\n$ python {name}.py {' '.join(shlex.quote(a) for a in argv)}")
    module = importlib.import_module(name)
    module.main(parse_args(module.setup_parser(), argv))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", default=None, help="folder to keep the example files in")
    args = parser.parse_args()
    folder = args.keep or tempfile.mkdtemp(prefix="loratools-quickstart-")
    os.makedirs(folder, exist_ok=True)
    a = make_example_lora(os.path.join(folder, "style_a.safetensors"), rank=8, alpha=4.0, seed=1)
    b = make_example_lora(os.path.join(folder, "style_b.safetensors"), rank=4, alpha=4.0, seed=2)
    print(f"made two example SDXL LoRAs in {folder}: style_a (rank 8, alpha 4) and style_b (rank 4, alpha 4)")

    out = lambda name: os.path.join(folder, name)  # noqa: E731
    steps = [
        ("lora_info", [a]),
        ("convert_lora", [a, out("style_a_peft.safetensors"), "--to", "diffusers", "--overwrite"]),
        ("lora_info", [out("style_a_peft.safetensors")]),
        ("merge_lora", ["--models", a, b, "--ratios", "0.8", "-0.5", "--save_to", out("ab_concat.safetensors"),
                        "--overwrite"]),
        ("svd_merge_lora", ["--models", a, b, "--ratios", "0.8", "0.5", "--new_rank", "8",
                            "--save_to", out("ab_svd.safetensors"), "--overwrite", "--device", "cpu"]),
        ("resize_lora", ["--model", a, "--new_rank", "4", "--dynamic_method", "sv_fro", "--dynamic_param", "0.9",
                         "--save_to", out("a_small.safetensors"), "--overwrite", "--device", "cpu"]),
    ]
    for script, argv in steps:
        run_script(script, argv)
    print(f"\ndone; the files are in {folder}")


if __name__ == "__main__":
    main()
