"""LoRA adapters for the tiny model, made here with peft and saved by diffusers in each form people's trainers write,
and files that look like adapters of other models: for the tests and `bench/loras.py`."""

from __future__ import annotations

import json
from pathlib import Path

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
FORMS = ("peft", "diffusers-old")  # lora_A / lora_B (today's save_lora_weights); lora.down / lora.up (older scripts)


def make_adapter(path: Path, seed: int, rank: int = 4, targets: tuple[str, ...] = ATTENTION, form: str = "peft",
                 text_encoders: bool = False, alpha: float | None = None) -> Path:
    """A LoRA adapter of the tiny SD3 model with random (non-zero) weights, saved by diffusers'
    `StableDiffusion3Pipeline.save_lora_weights` as a `.safetensors` file at `path`.

    form: `peft` (peft's names, as diffusers' SD3 DreamBooth LoRA script saves today) or `diffusers-old` (the same
        weights under diffusers' older names, `convert_state_dict_to_diffusers`, as many published adapters have).
    text_encoders: also adapt both CLIP text encoders' attention.
    alpha: peft's `lora_alpha` (default: the rank, a scaling of 1), written with peft's config in the header's
        `lora_adapter_metadata` as the training script writes it (`peft` form only; diffusers reads it at load).
    The same seed, rank and targets give the same weights in every form.
    """
    import torch
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    from sd3_service.pipelines.tiny import build_tiny_pipeline

    assert form in FORMS, form
    pipe = build_tiny_pipeline()
    torch.manual_seed(seed)
    # Random A and B (peft starts B at zero, which would change nothing): the adapter visibly changes images.
    pipe.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets),
                                            init_lora_weights=False))
    layers = {"transformer_lora_layers": get_peft_model_state_dict(pipe.transformer)}
    metadata = {}
    if alpha is not None:
        assert form == "peft", "the older names carry no metadata"
        metadata["transformer_lora_adapter_metadata"] = pipe.transformer.peft_config["default"].to_dict()
    if text_encoders:
        for encoder in ("text_encoder", "text_encoder_2"):
            getattr(pipe, encoder).add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TEXT_ATTENTION),
                                                          init_lora_weights=False))
            layers[f"{encoder}_lora_layers"] = get_peft_model_state_dict(getattr(pipe, encoder))
    if form == "diffusers-old":
        layers = {part: convert_state_dict_to_diffusers(weights) for part, weights in layers.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusion3Pipeline.save_lora_weights(path.parent, weight_name=path.name, **layers, **metadata)
    return path


def scaled_copy(source: Path, path: Path, factor: float) -> Path:
    """The adapter at `source` with every `lora_B` weight times `factor` and no metadata: what an alpha of
    `factor` times the rank does to it, written out in the weights instead."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(source))
    save_file({name: tensor * factor if "lora_B" in name else tensor for name, tensor in tensors.items()}, str(path))
    return path


def with_bad_config(source: Path, path: Path) -> Path:
    """The adapter at `source` with a peft config in its header that peft cannot build (an unknown option): the
    header and shapes are fine, diffusers fails only when it loads it."""
    from safetensors.torch import load_file, save_file

    config = {"transformer.r": 4, "transformer.lora_alpha": 4, "transformer.no_such_option": True}
    save_file(load_file(str(source)), str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    return path


def write_weights(path: Path, tensors: dict[str, tuple[int, ...]]) -> Path:
    """A safetensors file of zero tensors with these names and shapes (an adapter of another model, say)."""
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: torch.zeros(shape) for name, shape in tensors.items()}, str(path))
    return path


def sdxl_like(path: Path) -> Path:
    """LoRA weights in the names of an SDXL UNet: nothing this model has."""
    return write_weights(path, {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": (4, 640),
                                "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": (640, 4)})


def wider_model(path: Path) -> Path:
    """LoRA weights for this model's layer names but another model's widths (a Flux or full-size adapter)."""
    return write_weights(path, {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (4, 3072),
                                "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": (3072, 4)})
