"""The optional image path of merge_grid.py (`--base_model` with diffusers installed): one image per cell,
rendered by one base pipeline that stays loaded for the whole sweep.

Per cell, every merged layer's delta (α/k)·up@down is added in place to the weight it changes, the prompts
are rendered with the fixed seed, and the touched weights are put back from copies taken the first time each
was touched (exact: no drift from subtracting, no reload per cell). Weights are found by the cell's modules
written in diffusers naming (library.formats, the same tables as `--format diffusers`): `unet.<path>`,
`text_encoder.<path>`, `transformer.<path>` are module paths of the pipeline's components.
"""

from __future__ import annotations

import contextlib
import os

import torch

from library.errors import LoraToolsError
from library.formats import Module, lora_tensors

HINT = "the image path needs diffusers and transformers: pip install diffusers transformers"


def load_pipeline(path: str, device: torch.device):
    """A diffusers pipeline folder (save_pretrained layout), read locally, on `device` (fp16 on CUDA)."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        raise LoraToolsError(HINT) from None
    if not os.path.isdir(path):
        raise LoraToolsError("--base_model must be a diffusers pipeline folder (model_index.json and its "
                             "components)", file=path)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise LoraToolsError(f"cannot load the pipeline: {' '.join(str(exc).split())[:300]}", file=path) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def scale_folded(module: Module) -> Module:
    """The module with α/k folded into up (alpha = rank), so every written pair's product is its delta."""
    t = module.tensors
    rank = int(t["lora_down.weight"].shape[0])
    up = t["lora_up.weight"].float() * (float(t["alpha"]) / rank)
    return Module(module.target, {"lora_down.weight": t["lora_down.weight"].float(), "lora_up.weight": up,
                                  "alpha": torch.tensor(float(rank))}, module.source)


class DeltaSwapper:
    """Adds a cell's deltas into a loaded pipeline's weights and restores them afterwards."""

    def __init__(self, pipe, family: str):
        self.pipe = pipe
        self.family = family
        self.saved: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}  # id(param) -> (param, original)

    def deltas(self, modules: list[Module]) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        tensors, _ = lora_tensors([scale_folded(m) for m in modules], self.family, "diffusers")
        out = []
        for key, down in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key[: -len(".lora_A.weight")]
            up = tensors[name + ".lora_B.weight"]
            component, _, path = name.partition(".")
            param = self.weight(component, path)
            delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
            if delta.numel() != param.numel():
                raise LoraToolsError(f"the base pipeline's {component}.{path} has shape {tuple(param.shape)}, "
                                     f"the merged delta {tuple(delta.shape)}: another model family?")
            out.append((param, delta.reshape(param.shape)))
        return out

    def weight(self, component: str, path: str) -> torch.nn.Parameter:
        owner = getattr(self.pipe, component, None)
        # transformers 5 dropped the `text_model.` level of CLIPTextModel that PEFT names still carry.
        for candidate in (path, path.removeprefix("text_model.")):
            try:
                return owner.get_submodule(candidate).weight
            except AttributeError:
                continue
        raise LoraToolsError(f"the base pipeline has no weight {component}.{path} for this layer")

    @contextlib.contextmanager
    def applied(self, modules: list[Module]):
        touched = self.deltas(modules)
        with torch.no_grad():
            try:
                for param, delta in touched:
                    self.saved.setdefault(id(param), (param, param.detach().clone()))
                    param.add_(delta.to(param.device, param.dtype))
                yield
            finally:
                for param, _ in touched:
                    param.copy_(self.saved[id(param)][1])


def render(pipe, prompts: list[str], *, seed: int, steps: int, size: int | None, guidance: float):
    """One PIL image per prompt, each from the same seed (so cells differ only by their deltas)."""
    device = pipe.device
    images = []
    for prompt in prompts:
        generator = torch.Generator(device="cpu" if device.type == "mps" else device).manual_seed(seed)
        extra = {"height": size, "width": size} if size else {}
        images.append(pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                           output_type="pil", **extra).images[0])
    return images


def side_by_side(images):
    """The prompts' images of one cell as one tile (left to right)."""
    from PIL import Image

    width, height = sum(i.width for i in images), max(i.height for i in images)
    tile = Image.new("RGB", (width, height), "white")
    x = 0
    for image in images:
        tile.paste(image, (x, 0))
        x += image.width
    return tile
