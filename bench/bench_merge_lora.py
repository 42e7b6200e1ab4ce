"""merge_lora.py into a full-size SDXL checkpoint: peak memory and time, against a plain copy of the file.

Usage: python bench/bench_merge_lora.py [--folder /tmp] [--rank 32] [--quick] [--keep]

The checkpoint has the real SDXL single-file key names and shapes of every UNet, CLIP-L and OpenCLIP-G
Linear/Conv weight (library/formats' sdxl table: 6.56 GB in fp16), their biases, the text encoders'
embeddings, and VAE-like padding up to ~6.9 GB. Values are valid fp16 drawn once (a 64 MiB block reused
cyclically), so the file is written at disk speed. Two LoRAs are baked in: a default kohya SDXL LoRA
(the 722 UNet attention Linears + both text encoders) at --rank, and a LoCon (all UNet Linears and 3×3
convs) at rank 8, with ratios 0.8 and -0.5.

Each run is a fresh child process that reports its own peak RSS (ru_maxrss, which also counts touched
pages of memory-mapped files). The plain copy runs first and again last, so both see the page cache in
the state the merge saw. `--quick` keeps only UNet input block 4 (a 0.1 GB file) to check the set-up.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import report, run_measured  # noqa: E402

BLOCK_BYTES = 64 << 20

# Peak RSS of the child's own address space. Not ru_maxrss: Linux keeps that across fork+exec, so a child
# of this (torch-importing, ~0.5 GB) process would report at least the parent's size.
PEAK_RSS_SNIPPET = (
    "import json\n"
    "def peak_mib():\n"
    "    with open('/proc/self/status') as f:\n"
    "        kb = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))\n"
    "    return round(kb / 1024, 1)\n"
)

# cp + sync: the merge's writer fsyncs its output before the rename, so the copy is timed to the same point.
COPY_CHILD = PEAK_RSS_SNIPPET + r"""
import os, shutil, sys, time
start = time.perf_counter()
shutil.copyfile(sys.argv[1], sys.argv[2])
with open(sys.argv[2], "rb+") as f:
    os.fsync(f.fileno())
print(json.dumps({"copy_s": round(time.perf_counter() - start, 2), "peak_rss_mib": peak_mib()}))
"""

MERGE_CHILD = PEAK_RSS_SNIPPET + r"""
import sys, time
import merge_lora
from library.cli import parse_args
argv = sys.argv[1:]
start = time.perf_counter()
out = merge_lora.main(parse_args(merge_lora.setup_parser(), argv))
elapsed = time.perf_counter() - start
r = out["result"]
worst = max((s.relative_error for s in r.changed), default=0.0)
print(json.dumps({"merge_s": round(elapsed, 2), "peak_rss_mib": peak_mib(), "changed": len(r.changed),
                  "copied": r.copied, "worst_rounding_rel": worst}))
"""


def checkpoint_specs(quick: bool) -> dict:
    """key -> shape of the benchmark checkpoint (real SDXL names and shapes, see module docstring)."""
    from library.formats import FAMILIES

    table = FAMILIES["sdxl"].table
    specs: dict[str, tuple[int, ...]] = {}
    for key, shape in table.shapes.items():
        if quick and not key.startswith("model.diffusion_model.input_blocks.4."):
            continue
        specs[key] = shape
        bias = key[: -len("weight")] + "bias"
        if key.endswith("in_proj_weight"):
            bias = key.replace("in_proj_weight", "in_proj_bias")
        specs[bias] = (shape[0],)
    if quick:
        return specs
    te1, te2 = "conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."
    specs[te1 + "embeddings.token_embedding.weight"] = (49408, 768)
    specs[te1 + "embeddings.position_embedding.weight"] = (77, 768)
    specs[te2 + "token_embedding.weight"] = (49408, 1280)
    specs[te2 + "positional_embedding"] = (77, 1280)
    specs[te2 + "text_projection"] = (1280, 1280)
    # VAE-like padding (LDM first_stage_model names; 4 levels of 3×3 convs) up to ~6.9 GB.
    for level, ch in enumerate((128, 256, 512, 512)):
        for part in ("encoder.down", "decoder.up"):
            for block in range(3):
                for conv in ("conv1", "conv2"):
                    specs[f"first_stage_model.{part}.{level}.block.{block}.{conv}.weight"] = (ch, ch, 3, 3)
                    specs[f"first_stage_model.{part}.{level}.block.{block}.{conv}.bias"] = (ch,)
    return specs


def write_checkpoint(path: str, specs: dict) -> int:
    import torch

    from library.safetensors_io import StreamingWriter

    block = (torch.randn(BLOCK_BYTES // 2, generator=torch.Generator().manual_seed(0)) * 0.02).half()
    raw = memoryview(block.numpy()).cast("B")
    with StreamingWriter(path, {k: (torch.float16, s) for k, s in specs.items()}, {"modelspec.title": "bench-sdxl"},
                         overwrite=True) as w:
        offset = 0
        for key, shape in specs.items():
            n = math.prod(shape) * 2
            parts = []
            while n > 0:
                take = min(n, BLOCK_BYTES - offset)
                parts.append(raw[offset:offset + take])
                offset = (offset + take) % BLOCK_BYTES
                n -= take
            w.write_raw(key, parts[0] if len(parts) == 1 else b"".join(parts))
    return os.path.getsize(path)


def write_loras(folder: str, rank: int, quick: bool) -> list[str]:
    from bench.fixtures import kohya_metadata, make_lora, sdxl_modules, write_lora

    blocks = ["input_blocks_4_"] if quick else None
    attention = sdxl_modules("attention", te1=not quick, te2=not quick, blocks=blocks)
    locon = sdxl_modules("all", te1=False, te2=False, blocks=blocks)
    a = write_lora(os.path.join(folder, "bench_lora_attn.safetensors"), make_lora(attention, rank, alpha=rank / 2, seed=1),
                   kohya_metadata("sdxl", rank, rank / 2))
    b = write_lora(os.path.join(folder, "bench_lora_locon.safetensors"), make_lora(locon, 8, seed=2),
                   kohya_metadata("sdxl", 8))
    return [a, b]


def check_output(base: str, out: str, loras: list[str]) -> dict:
    """Spot checks: untouched tensors are bit-identical, one changed weight matches float64 (both LoRAs)."""
    from bench.fixtures import dense_delta
    from library.safetensors_io import LazyReader, load_tensors

    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    with LazyReader(base) as b, LazyReader(out) as o:
        untouched = [k for k in b.keys() if k.endswith(".bias")][:50]
        same = all(b.get_raw(k) == o.get_raw(k) for k in untouched)
        expected = b.get(key).double()
        for path, ratio in zip(loras, (0.8, -0.5)):
            expected += ratio * dense_delta(load_tensors(path)[0], name).reshape(expected.shape)
        got = o.get(key).double()
        # one fp16 rounding of the float64 result, at most (plus float32 noise)
        ulps = float(((got - expected).abs() / (expected.abs() * 2.0 ** -10 + 2.0 ** -24)).max())
    return {"untouched_bit_identical": same, "to_q_max_err_in_fp16_ulps": round(ulps, 3)}


# At the peak the folder holds the checkpoint, the merged output and the second plain copy (the LoRAs are
# small): three times the checkpoint (~21 GB for the full SDXL one), plus this margin.
SPACE_MARGIN = 256 * 2**20


def needed_bytes(specs: dict) -> int:
    return 3 * sum(math.prod(shape) * 2 for shape in specs.values()) + SPACE_MARGIN  # fp16: 2 bytes a value


def check_free_space(folder: str, specs: dict) -> None:
    """Stop before writing anything when `folder` cannot hold what the benchmark writes at its peak."""
    needed, free = needed_bytes(specs), shutil.disk_usage(folder).free
    if free < needed:
        raise SystemExit(f"bench_merge_lora: {folder} has {free / 2**30:.1f} GiB free but the benchmark writes up to "
                         f"{needed / 2**30:.1f} GiB (checkpoint, merged output and a plain copy); pass --folder "
                         "on a larger disk, or --quick")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=tempfile.gettempdir())
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()
    check_free_space(args.folder, checkpoint_specs(args.quick))
    work = tempfile.mkdtemp(prefix="bench_merge_lora_", dir=args.folder)
    base, copy, out = (os.path.join(work, n) for n in ("sdxl.safetensors", "copy.safetensors", "merged.safetensors"))
    try:
        size = write_checkpoint(base, checkpoint_specs(args.quick))
        loras = write_loras(work, args.rank, args.quick)
        copy1 = run_measured(COPY_CHILD, base, copy)
        os.unlink(copy)
        argv = ["--sd_model", base, "--models", *loras, "--ratios", "0.8", "-0.5", "--save_to", out]
        if args.quick:
            argv += ["--family", "sdxl"]
        merge = run_measured(MERGE_CHILD, *argv)
        copy2 = run_measured(COPY_CHILD, base, copy)
        figures = {"checkpoint_gib": round(size / 2**30, 2), "merge_s": merge["merge_s"],
                   "merge_peak_rss_mib": merge["peak_rss_mib"], "copy_s": [copy1["copy_s"], copy2["copy_s"]],
                   "copy_peak_rss_mib": max(copy1["peak_rss_mib"], copy2["peak_rss_mib"]),
                   "changed_tensors": merge["changed"], "copied_tensors": merge["copied"],
                   "worst_rounding_rel": merge["worst_rounding_rel"]}
        figures["merge_vs_copy"] = round(merge["merge_s"] / min(copy1["copy_s"], copy2["copy_s"]), 2)
        figures.update(check_output(base, out, loras))
        report("merge_lora into SDXL checkpoint", figures)
    finally:
        if not args.keep:
            for name in os.listdir(work):
                os.unlink(os.path.join(work, name))
            os.rmdir(work)


if __name__ == "__main__":
    main()
