"""Extracting a LoRA from two checkpoints (extract_lora_from_models.py), one layer at a time.

- pairs: the two checkpoints opened lazily, keys matched by name and shape, one (base, tuned) pair read at a time.
- layers: the plan (what each key becomes) and the per-layer work; low-rank layers go through the engine.
- naming: the `Naming` protocol and generic (PEFT / ComfyUI) names; family: names of a known model family.
- output: which naming to use, and the output tensors and header; report: per-layer figures and the summary.
"""
