"""Per-cell figures against the exact merge E = Σ wᵢ·ΔWᵢ of the cell's own strengths (ratio × block weight):
what a mode, a density or a rank changes compared with the plain sum of the LoRAs' effects.

Per layer, with C = (α/k)·up@down the cell's merged delta as written:
  ‖E‖², ‖C‖², ‖E − C‖²  exactly from the factors (lowrank_fro_norm_sq: Gram matrices of the stacked factors,
                        float64), never an out×in matrix; layers with a LoHa/LoKr/full input, which have no
                        factors, are formed densely one at a time.
Per cell (sums over layers): relative_error = ‖E − C‖/‖E‖, energy_retained = 1 − relative_error² (clipped
to [0, 1]; for `add` it is the Σσ²_kept/‖E‖² of the truncation, the engine's meaning), norm_ratio = ‖C‖/‖E‖,
cosine = ⟨C, E⟩/(‖C‖‖E‖), the worst layer's relative error, and the norm ‖C‖ per block (the webui
lora-block-weight blocks of SD1/SDXL, D00…/S00… of Flux, the family's blocks elsewhere; "other" outside them).
"""

from __future__ import annotations

import math

from library.block_weights import webui_block
from library.lowrank import lowrank_fro_norm_sq
from library.svd_merge import LayerJob, LayerResult

METRICS = ("relative_error", "energy_retained", "norm_ratio", "cosine", "layer_error_max")


def layer_norms(job: LayerJob, result: LayerResult) -> tuple[float, float, float]:
    """(‖E‖², ‖C‖², ‖E − C‖²) of one layer."""
    k = result.rank
    up_c = result.up.reshape(result.up.shape[0], k).double()
    down_c = result.down.reshape(k, -1).double()
    scale_c = result.alpha / k
    if all(a.kind == "lora" for _, a, _ in job.parts):
        ups, downs, weights = [], [], []
        for _, adapter, weight in job.parts:
            up, down = adapter.factors()  # ΔW = up @ down, the alpha scale folded in
            ups.append(up.reshape(up.shape[0], -1))
            downs.append(down.reshape(down.shape[0], -1))
            weights.append(weight)
        exact = lowrank_fro_norm_sq(ups, downs, weights)
        error = lowrank_fro_norm_sq(ups + [up_c], downs + [down_c], weights + [-scale_c])
    else:
        flat = (job.shape[0], math.prod(job.shape[1:]))
        dense = sum(w * a.delta(job.shape).reshape(flat).double() for _, a, w in job.parts)
        exact = dense.square().sum()
        error = (dense - scale_c * up_c @ down_c).square().sum()
    cell = lowrank_fro_norm_sq([up_c], [down_c], [scale_c])
    return float(exact), float(cell), float(error)


def block_of(family: str, name: str) -> str:
    return webui_block(family, name.split("[")[0]) or "other"  # a row slice "key[a:b]" is in its key's block


def cell_metrics(family: str, jobs: list[LayerJob], results: dict[str, LayerResult]) -> dict:
    exact = cell = error = 0.0
    worst, worst_layer = 0.0, None
    blocks: dict[str, float] = {}
    for job in jobs:
        e, c, d = layer_norms(job, results[job.name])
        exact, cell, error = exact + e, cell + c, error + d
        layer_error = math.sqrt(d / e) if e > 0 else 0.0
        if layer_error >= worst:
            worst, worst_layer = layer_error, job.name
        block = block_of(family, job.name)
        blocks[block] = blocks.get(block, 0.0) + c
    relative = math.sqrt(error / exact) if exact > 0 else 0.0
    cosine = (exact + cell - error) / (2 * math.sqrt(exact * cell)) if exact > 0 and cell > 0 else 0.0
    return {"relative_error": relative, "energy_retained": min(1.0, max(0.0, 1.0 - relative**2)),
            "norm_ratio": math.sqrt(cell / exact) if exact > 0 else 0.0, "cosine": max(-1.0, min(1.0, cosine)),
            "layer_error_max": worst, "worst_layer": worst_layer, "layers": len(jobs),
            "norm_exact": math.sqrt(exact), "norm": math.sqrt(cell),
            "blocks": {b: math.sqrt(v) for b, v in blocks.items()}}

