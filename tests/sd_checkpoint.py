"""A Stable Diffusion 1.x single-file checkpoint (A1111's `models/Stable-diffusion/*.safetensors`) made from a
diffusers pipeline folder: every weight renamed to the original (LDM) key layout that A1111 and the Hub's single files
use (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`). A test-side map, checked
by running diffusers' own LDM-to-diffusers conversion back over it (`check_round_trip`)."""

from __future__ import annotations

import json
from pathlib import Path

RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))


def unet_prefixes(config: dict) -> dict[str, str]:
    """diffusers module prefix -> LDM prefix, for a UNet2DConditionModel of this config."""
    layers, blocks = config["layers_per_block"], len(config["block_out_channels"])
    out = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
           "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
           "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
           "mid_block.resnets.1.": "middle_block.2."}
    for i in range(blocks):
        for j in range(layers):
            k = (layers + 1) * i + j + 1
            out[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{k}.0."
            out[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{k}.1."
        if i < blocks - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(layers + 1) * (i + 1)}.0.op."
        for j in range(layers + 1):
            k = (layers + 1) * i + j
            out[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{k}.0."
            out[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{k}.1."
        if i < blocks - 1:
            attention = "CrossAttn" in config["up_block_types"][i]
            out[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{(layers + 1) * i + layers}.{2 if attention else 1}.conv."
    return out


def vae_prefixes(config: dict) -> dict[str, str]:
    blocks, layers = len(config["down_block_types"]), config["layers_per_block"]
    out = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for part in ("encoder", "decoder"):
        out[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        out[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
        out[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
    for i in range(blocks):
        for j in range(layers):
            out[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        out[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        for j in range(layers + 1):
            out[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{blocks - 1 - i}.block.{j}."
        out[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{blocks - 1 - i}.upsample."
    return out


def renamed(key: str, prefixes: dict[str, str], inner: tuple[tuple[str, str], ...]) -> str:
    for new, old in sorted(prefixes.items(), key=lambda p: -len(p[0])):
        if key.startswith(new):
            rest = key[len(new):]
            for a, b in inner:
                rest = rest.replace(a, b)
            return old + rest
    return key


def ldm_state_dict(folder: Path) -> dict:
    """The pipeline in `folder` (diffusers) as one LDM-keyed state dict."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    out = {}
    prefixes = unet_prefixes(dict(unet.config))
    for key, value in unet.state_dict().items():
        inner = RESNET if "resnets" in key else ()
        out["model.diffusion_model." + renamed(key, prefixes, inner)] = value.contiguous()
    prefixes = vae_prefixes(dict(vae.config))
    for key, value in vae.state_dict().items():
        inner = (("conv_shortcut", "nin_shortcut"),) if "resnets" in key else VAE_ATTENTION if "attentions" in key else ()
        out["first_stage_model." + renamed(key, prefixes, inner)] = value.contiguous()
    for key, value in text.state_dict().items():  # transformers 5 names them without the text_model. of old
        out["cond_stage_model.transformer." + ("" if key.startswith("text_model.") else "text_model.") + key] = \
            value.contiguous()
    return out


def ldm_vae_state_dict(folder: Path) -> dict:
    """A diffusers VAE folder as a single-file VAE in the original key layout (A1111's `vae-ft-mse-*.safetensors`:
    `encoder.down.0.block.0.*`, no prefix)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder)
    prefixes = vae_prefixes(dict(vae.config))
    return {renamed(key, prefixes, (("conv_shortcut", "nin_shortcut"),) if "resnets" in key else VAE_ATTENTION
                    if "attentions" in key else ()): value.contiguous() for key, value in vae.state_dict().items()}


def check_round_trip(folder: Path, checkpoint: dict) -> None:
    """diffusers' own conversion of `checkpoint` gives back every weight of the folder's UNet and VAE."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    for cls, sub, convert in ((UNet2DConditionModel, "unet", convert_ldm_unet_checkpoint),
                              (AutoencoderKL, "vae", convert_ldm_vae_checkpoint)):
        model = cls.from_pretrained(folder, subfolder=sub)
        back = convert(checkpoint, json.loads((folder / sub / "config.json").read_text()))
        want = model.state_dict()
        assert set(back) == set(want), (sub, sorted(set(back) ^ set(want))[:8])
        for key, value in want.items():
            assert torch.equal(back[key].reshape(value.shape), value), (sub, key)


def make_single_file(folder: Path, out: Path) -> Path:
    """`folder` (a diffusers SD 1.x pipeline) written as one LDM-keyed .safetensors checkpoint at `out`."""
    from safetensors.torch import save_file

    checkpoint = ldm_state_dict(folder)
    check_round_trip(folder, checkpoint)
    save_file(checkpoint, out)
    return out


def config_only_files(folder: Path) -> dict[str, bytes]:
    """The files diffusers' from_single_file takes from the base pipeline repo it infers (json, txt: the configs and
    the tokenizer), as a Hub repo of them has them."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.suffix in (".json", ".txt")}
