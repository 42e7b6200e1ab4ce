"""The common shape of newer transformer families (Flux.2, Qwen-Image, Wan): a native naming (BFL/original
names, used by ComfyUI, AI-Toolkit and musubi-tuner) and a diffusers naming, no text-encoder LoRAs."""

from __future__ import annotations

from collections.abc import Callable

from library.formats.family import Family, MetadataFacts


def transformer_family(name: str, description: str, native: str, block_id: Callable[[str], str | None],
                       hints: tuple[str, ...] = (), kohya_naming: str | None = None,
                       architecture: str | None = None) -> Family:
    """`kohya_naming`: the naming musubi-tuner flattens for this model, when it is not the native one;
    `architecture`: its modelspec.architecture."""
    return Family(
        name=name, description=description,
        namings={"transformer": (native, "diffusers")},
        read_prefixes=(("lora_unet_", "transformer"), ("lora_transformer_", "transformer"), ("lycoris_", "transformer"),
                       ("model.diffusion_model.", "transformer"), ("diffusion_model.", "transformer"),
                       ("transformer.base_model.model.", "transformer"), ("base_model.model.", "transformer"),
                       ("transformer.", "transformer"), ("", "transformer")),
        # musubi-tuner / sd-scripts flatten the native names; AI-Toolkit saves `diffusion_model.` + native names
        native=native, kohya_naming=kohya_naming or native, ai_toolkit="peft-native",
        block_id=block_id, hints=hints, checkpoint_layouts={"diffusers": ("", "diffusers")},
        metadata=MetadataFacts(architecture=architecture),
    )
