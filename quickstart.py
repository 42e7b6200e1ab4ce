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

# A few real SDXL modules (kohya SGM naming) with their real shapes (out, in).
EXAMPLE_MODULES = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k": (640, 640),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_v": (640, 640),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0": (640, 640),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (640, 2048),
    "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj": (10240, 1280),
    "lora_unet_output_blocks_3_1_proj_in": (640, 640),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280),
    "lora_te2_text_model_encoder_layers_0_mlp_fc1": (5120, 1280),
}


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
    """Run a script the way a notebook would: its parser, then its main()."""
    print(f"\n$ python {name}.py {' '.join(shlex.quote(a) for a in argv)}")
    module = importlib.import_module(name)
    module.main(module.setup_parser().parse_args(argv))


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
