"""Metadata we write: dims summaries, modelspec per family, provenance hashes, tag counts, --no_metadata."""

import argparse
import hashlib
import json

import torch

from library.metadata import (
    file_sha256,
    lora_metadata,
    minimal_metadata,
    network_dim_summary,
    provenance,
    tag_frequency,
    title_of,
)
from library.safetensors_io import kohya_hashes_of_file, read_header, save_tensors


def test_dim_summary():
    assert network_dim_summary([32, 32.0]) == "32"
    assert network_dim_summary([16, 32]) == "Dynamic"
    assert network_dim_summary([0.5]) == "0.5"


def test_lora_metadata_keeps_input_and_updates_what_changed():
    base = {"ss_tag_frequency": '{"d": {"cat": 3}}', "ss_network_dim": "128", "sshs_model_hash": "stale",
            "ss_output_name": "x"}
    meta = lora_metadata(base, family="sdxl", ranks=[32, 32], alphas=[16, 16], save_to="/o/small.safetensors",
                         merged_from=["a", "b"])
    assert meta["ss_network_dim"] == "32" and meta["ss_network_alpha"] == "16"
    assert meta["ss_output_name"] == "x" and meta["ss_tag_frequency"] == base["ss_tag_frequency"]
    assert "sshs_model_hash" not in meta  # recomputed by the writer from the bytes written
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.title"] == "small" and meta["modelspec.merged_from"] == "a, b"
    flux = lora_metadata({}, family="flux1", ranks=[4], alphas=[4], save_to="f.safetensors")
    assert flux["modelspec.architecture"] == "flux-1-dev/lora" and flux["ss_network_module"] == "networks.lora_flux"
    assert set(minimal_metadata(meta)) == {"ss_network_dim", "ss_network_alpha", "ss_network_module"}


def test_provenance_records_inputs_sha256(tmp_path):
    path = tmp_path / "in.safetensors"
    save_tensors(path, {"a": torch.ones(3)})
    args = argparse.Namespace(models=[str(path)], new_rank=8, verbose=1, debug=False)
    meta = provenance("resize_lora.py", args, [str(path)], seed=5)
    assert json.loads(meta["loratools.inputs"]) == {"in.safetensors": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert json.loads(meta["loratools.parameters"])["new_rank"] == 8 and "verbose" not in meta["loratools.parameters"]
    assert meta["loratools.seed"] == "5" and file_sha256(str(path)) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_tags_title_and_hashes_written(tmp_path):
    counts = tag_frequency({"ss_tag_frequency": json.dumps({"a": {"cat": 2, " dog": 1}, "b": {"cat": 5}})})
    assert counts.most_common(2) == [("cat", 7), ("dog", 1)]
    assert tag_frequency({"ss_tag_frequency": "not json"}) == {}
    assert title_of("/x/my_lora.safetensors") == "my_lora"
    out = tmp_path / "h.safetensors"
    save_tensors(out, {"w": torch.randn(8, 8)}, {"k": "v"}, kohya_hashes=True)
    meta = read_header(out).metadata
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == kohya_hashes_of_file(out)


def test_provenance_keeps_the_hash_of_every_input_when_file_names_repeat(tmp_path):
    """Base and tuned shards with one file name each keep their own sha256 (a name-keyed dict lost one)."""
    name = "diffusion_pytorch_model-00001-of-00002.safetensors"
    paths = []
    for folder, value in (("base", 1.0), ("tuned", 2.0)):
        (tmp_path / folder / "unet").mkdir(parents=True)
        paths.append(tmp_path / folder / "unet" / name)
        save_tensors(paths[-1], {"w": torch.full((4,), value)})
    single = tmp_path / "other.safetensors"
    save_tensors(single, {"w": torch.zeros(2)})
    meta = provenance("extract_lora_from_models.py", None, [str(p) for p in (*paths, single)])
    sha = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (*paths, single)}
    assert sha[paths[0]] != sha[paths[1]]
    assert json.loads(meta["loratools.inputs"]) == {f"base/unet/{name}": sha[paths[0]],
                                                    f"tuned/unet/{name}": sha[paths[1]],
                                                    "other.safetensors": sha[single]}
