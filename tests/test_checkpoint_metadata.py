"""Metadata of checkpoints we merge LoRAs into (library.metadata.checkpoint_metadata), the same for
merge_lora.py and flux_merge_lora.py: hashes of the old weights are dropped, the rest kept."""

from __future__ import annotations

import argparse
import json

import torch
from safetensors.torch import save_file

import flux_merge_lora
from library.cli import parse_args
from library.metadata import checkpoint_metadata
from library.safetensors_io import load_tensors, save_tensors

H = 3072
STALE = {"modelspec.hash_sha256": "0xdead", "sshs_model_hash": "beef", "sshs_legacy_hash": "cafe"}


def test_checkpoint_metadata_drops_stale_hashes(tmp_path):
    lora = tmp_path / "l.safetensors"
    save_file({"x": torch.zeros(1)}, str(lora))
    meta = checkpoint_metadata({"note": "kept", **STALE}, script="s.py", args=argparse.Namespace(seed=3),
                               inputs=[str(lora)], seed=3, extra={"loratools.base_model": "base"})
    assert not set(STALE) & set(meta)
    assert meta["note"] == "kept" and meta["loratools.base_model"] == "base" and meta["loratools.seed"] == "3"
    assert list(json.loads(meta["loratools.inputs"])) == ["l.safetensors"]


def test_flux_checkpoint_merge_drops_the_old_hashes(tmp_path):
    g = torch.Generator().manual_seed(0)
    # the weight the LoRA changes and small ones: four Flux transformer weights, what a partial checkpoint needs
    shapes = {"double_blocks.0.img_attn.proj.weight": (H, H), "final_layer.linear.weight": (64, H), "img_in.weight": (H, 64),
              "time_in.in_layer.weight": (H, 256)}
    save_tensors(tmp_path / "f.safetensors", {k: (torch.randn(s, generator=g) / 20).to(torch.bfloat16)
                                              for k, s in shapes.items()}, {"note": "kept", **STALE})
    name = "lora_unet_double_blocks_0_img_attn_proj"
    save_file({f"{name}.lora_down.weight": torch.randn(4, H, generator=g) / 10,
               f"{name}.lora_up.weight": torch.randn(H, 4, generator=g) / 10,
               f"{name}.alpha": torch.tensor(4.0)}, str(tmp_path / "l.safetensors"))
    out = tmp_path / "out.safetensors"
    parser = flux_merge_lora.setup_parser()
    flux_merge_lora.main(parse_args(parser, ["--flux_model", str(tmp_path / "f.safetensors"), "--models",
                                             str(tmp_path / "l.safetensors"), "--save_to", str(out)]))
    meta = load_tensors(out)[1]
    assert not set(STALE) & set(meta)
    assert meta["note"] == "kept" and meta["loratools.script"] == "flux_merge_lora.py"
    assert meta["modelspec.architecture"] == "flux-1-dev"
