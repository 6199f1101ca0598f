"""LoRA adapters for the tiny model, made here with peft the way diffusers' training scripts save them, and files
that look like adapters of other models: for the tests and `bench/loras.py`."""

from __future__ import annotations

from pathlib import Path

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def make_adapter(path: Path, seed: int, rank: int = 4, targets: tuple[str, ...] = ATTENTION) -> Path:
    """A LoRA adapter of the tiny SD3 transformer with random (non-zero) weights, saved as diffusers' SD3 training
    script saves one (`save_lora_weights`): a `.safetensors` file at `path`."""
    import torch
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from sd3_service.pipelines.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    torch.manual_seed(seed)
    # Random A and B (peft starts B at zero, which would change nothing): the adapter visibly changes images.
    pipe.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets),
                                            init_lora_weights=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusion3Pipeline.save_lora_weights(path.parent, transformer_lora_layers=get_peft_model_state_dict(
        pipe.transformer), weight_name=path.name)
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
