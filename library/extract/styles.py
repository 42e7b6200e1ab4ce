"""The output namings extract offers (its `--format` choices), torch-free so that `--help` needs no torch.

kohya / diffusers / ai-toolkit are a known family's namings (library.extract.family); peft and comfy
name modules after the checkpoint's own keys (library.extract.naming.GenericNaming).
"""

GENERIC_STYLES = ("peft", "comfy")
OUTPUT_FORMATS = ("kohya", "diffusers", "ai-toolkit", "comfy", "peft")
