"""A full-size SD 2.x single-file checkpoint pair (LDM key names and shapes) with known rank-4 deltas.

Keys are those of `v2-1_768-ema-pruned.safetensors` as sd-scripts' `--v2` loader reads them: the LDM UNet
(`model.diffusion_model.`, linear proj_in/proj_out, 1024-wide cross-attention), the VAE
(`first_stage_model.`) and the OpenCLIP-H text encoder (`cond_stage_model.model.`, 24 resblocks with fused
`attn.in_proj_weight`, of which sd-scripts drops the last). 2.4 GiB in fp16. Written from the architecture
(channel multipliers, blocks per level), not copied from any file.

Base values are random (N(0, 1/fan_in)); tuned = base + a rank-4 delta on every LoRA target sd-scripts
extracts without `--conv_dim` (the Linears of the UNet transformer blocks and of text-encoder layers 0-22),
identical bytes elsewhere. Both files are written tensor by tensor (StreamingWriter), so making the pair
needs one tensor in memory, not the model.
"""

from __future__ import annotations

import math

import torch

UNET, VAE, TE = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."
CONTEXT, EMB = 1024, 1280
TE_WIDTH, TE_LAYERS, TE_LAYERS_USED = 1024, 24, 23  # sd-scripts' --v2 loader drops resblocks.23


def _linear(specs: dict, key: str, out: int, inp: int, bias: bool = True) -> None:
    specs[key + ".weight"] = (out, inp)
    if bias:
        specs[key + ".bias"] = (out,)


def _conv(specs: dict, key: str, out: int, inp: int, k: int = 3) -> None:
    specs[key + ".weight"] = (out, inp, k, k)
    specs[key + ".bias"] = (out,)


def _norm(specs: dict, key: str, ch: int) -> None:
    specs[key + ".weight"] = (ch,)
    specs[key + ".bias"] = (ch,)


def _unet_res(specs: dict, p: str, cin: int, cout: int) -> None:
    _norm(specs, p + "in_layers.0", cin)
    _conv(specs, p + "in_layers.2", cout, cin)
    _linear(specs, p + "emb_layers.1", cout, EMB)
    _norm(specs, p + "out_layers.0", cout)
    _conv(specs, p + "out_layers.3", cout, cout)
    if cin != cout:
        _conv(specs, p + "skip_connection", cout, cin, 1)


def _unet_attn(specs: dict, p: str, ch: int) -> None:
    _norm(specs, p + "norm", ch)
    _linear(specs, p + "proj_in", ch, ch)
    t = p + "transformer_blocks.0."
    for attn, ctx in (("attn1", ch), ("attn2", CONTEXT)):
        _linear(specs, t + attn + ".to_q", ch, ch, bias=False)
        _linear(specs, t + attn + ".to_k", ch, ctx, bias=False)
        _linear(specs, t + attn + ".to_v", ch, ctx, bias=False)
        _linear(specs, t + attn + ".to_out.0", ch, ch)
    _linear(specs, t + "ff.net.0.proj", 8 * ch, ch)  # GEGLU: two halves of 4·ch
    _linear(specs, t + "ff.net.2", ch, 4 * ch)
    for n in ("norm1", "norm2", "norm3"):
        _norm(specs, t + n, ch)
    _linear(specs, p + "proj_out", ch, ch)


def _unet(specs: dict) -> None:
    p = UNET
    _linear(specs, p + "time_embed.0", EMB, 320)
    _linear(specs, p + "time_embed.2", EMB, EMB)
    _conv(specs, p + "input_blocks.0.0", 320, 4)
    chans, attn_levels = (320, 640, 1280, 1280), (0, 1, 2)
    skips, ch, block = [320], 320, 1
    for level, width in enumerate(chans):
        for _ in range(2):
            _unet_res(specs, f"{p}input_blocks.{block}.0.", ch, width)
            ch = width
            if level in attn_levels:
                _unet_attn(specs, f"{p}input_blocks.{block}.1.", ch)
            skips.append(ch)
            block += 1
        if level < len(chans) - 1:
            _conv(specs, f"{p}input_blocks.{block}.0.op", ch, ch)
            skips.append(ch)
            block += 1
    _unet_res(specs, p + "middle_block.0.", ch, ch)
    _unet_attn(specs, p + "middle_block.1.", ch)
    _unet_res(specs, p + "middle_block.2.", ch, ch)
    block = 0
    for level in reversed(range(len(chans))):
        width = chans[level]
        for i in range(3):
            q = f"{p}output_blocks.{block}."
            _unet_res(specs, q + "0.", ch + skips.pop(), width)
            ch = width
            sub = 1
            if level in attn_levels:
                _unet_attn(specs, q + "1.", ch)
                sub = 2
            if level > 0 and i == 2:
                _conv(specs, f"{q}{sub}.conv", ch, ch)
            block += 1
    _norm(specs, p + "out.0", 320)
    _conv(specs, p + "out.2", 4, 320)


def _vae_res(specs: dict, p: str, cin: int, cout: int) -> None:
    _norm(specs, p + "norm1", cin)
    _conv(specs, p + "conv1", cout, cin)
    _norm(specs, p + "norm2", cout)
    _conv(specs, p + "conv2", cout, cout)
    if cin != cout:
        _conv(specs, p + "nin_shortcut", cout, cin, 1)


def _vae_mid(specs: dict, p: str, ch: int) -> None:
    _vae_res(specs, p + "block_1.", ch, ch)
    _norm(specs, p + "attn_1.norm", ch)
    for n in ("q", "k", "v", "proj_out"):
        _conv(specs, f"{p}attn_1.{n}", ch, ch, 1)
    _vae_res(specs, p + "block_2.", ch, ch)


def _vae(specs: dict) -> None:
    chans = (128, 256, 512, 512)
    e = VAE + "encoder."
    _conv(specs, e + "conv_in", 128, 3)
    ch = 128
    for level, width in enumerate(chans):
        for i in range(2):
            _vae_res(specs, f"{e}down.{level}.block.{i}.", ch, width)
            ch = width
        if level < len(chans) - 1:
            _conv(specs, f"{e}down.{level}.downsample.conv", ch, ch)
    _vae_mid(specs, e + "mid.", ch)
    _norm(specs, e + "norm_out", ch)
    _conv(specs, e + "conv_out", 8, ch)
    d = VAE + "decoder."
    _conv(specs, d + "conv_in", 512, 4)
    _vae_mid(specs, d + "mid.", 512)
    ch = 512
    for level in reversed(range(len(chans))):
        width = chans[level]
        for i in range(3):
            _vae_res(specs, f"{d}up.{level}.block.{i}.", ch, width)
            ch = width
        if level > 0:
            _conv(specs, f"{d}up.{level}.upsample.conv", ch, ch)
    _norm(specs, d + "norm_out", 128)
    _conv(specs, d + "conv_out", 3, 128)
    _conv(specs, VAE + "quant_conv", 8, 8, 1)
    _conv(specs, VAE + "post_quant_conv", 4, 4, 1)


def _text_encoder(specs: dict) -> None:
    w = TE_WIDTH
    specs[TE + "positional_embedding"] = (77, w)
    specs[TE + "text_projection"] = (w, w)
    specs[TE + "logit_scale"] = ()
    specs[TE + "token_embedding.weight"] = (49408, w)
    for i in range(TE_LAYERS):
        p = f"{TE}transformer.resblocks.{i}."
        specs[p + "attn.in_proj_weight"] = (3 * w, w)
        specs[p + "attn.in_proj_bias"] = (3 * w,)
        _linear(specs, p + "attn.out_proj", w, w)
        _norm(specs, p + "ln_1", w)
        _linear(specs, p + "mlp.c_fc", 4 * w, w)
        _linear(specs, p + "mlp.c_proj", w, 4 * w)
        _norm(specs, p + "ln_2", w)
    _norm(specs, TE + "ln_final", w)


def sd2_specs() -> dict[str, tuple[int, ...]]:
    """key -> shape of every tensor of an SD 2.x single-file checkpoint (UNet, VAE, OpenCLIP-H)."""
    specs: dict[str, tuple[int, ...]] = {}
    _unet(specs)
    _vae(specs)
    _text_encoder(specs)
    return specs


def lora_targets(specs: dict[str, tuple[int, ...]]) -> list[str]:
    """The weights sd-scripts' extract (no --conv_dim) makes LoRA modules for: every 2-D weight of a UNet
    transformer block (attention, proj_in/out, feed-forward) and of text-encoder layers 0-22."""
    out = []
    for key, shape in specs.items():
        if len(shape) != 2 or not key.endswith(("weight", "_weight")):
            continue
        unet = key.startswith(UNET) and (".transformer_blocks." in key or ".proj_in." in key or ".proj_out." in key)
        if unet or (key.startswith(TE + "transformer.resblocks.") and int(key.split(".")[4]) < TE_LAYERS_USED):
            out.append(key)
    return out


def write_sd2_pair(base_path: str, tuned_path: str, *, delta_rank: int = 4, delta_scale: float = 0.1,
                   seed: int = 0, keys: set[str] | None = None) -> dict[str, int]:
    """Write base and tuned (base + rank-`delta_rank` delta of relative size `delta_scale` on each target)
    in fp16; `keys` limits the checkpoint to those keys (a small pair for a quick run). Returns
    {target key: delta rank}."""
    from library.safetensors_io import StreamingWriter

    specs = sd2_specs()
    if keys is not None:
        specs = {k: s for k, s in specs.items() if k in keys}
    targets = set(lora_targets(specs))
    dtypes = {k: (torch.float16, s) for k, s in specs.items()}
    gen = torch.Generator().manual_seed(seed)
    with StreamingWriter(base_path, dtypes, overwrite=True) as wb, \
            StreamingWriter(tuned_path, dtypes, overwrite=True) as wt:
        for key, shape in specs.items():
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            base = torch.randn(shape, generator=gen).mul_(1.0 / math.sqrt(fan_in))
            stored = base.half()
            wb.write(key, stored)
            if key in targets:
                rows, cols = shape
                u = torch.randn(rows, delta_rank, generator=gen)
                v = torch.randn(delta_rank, cols, generator=gen)
                delta = u @ v
                delta.mul_(delta_scale * float(base.norm()) / float(delta.norm()))
                stored = (base + delta).half()
            wt.write(key, stored)
    return {k: delta_rank for k in targets}
