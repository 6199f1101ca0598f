"""Find, load and place the SD3 pipeline, as `SD3_MODEL`, `SD3_DEVICE` and `SD3_DTYPE` say."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd3_service.settings import ARTIFACT_DIR, Settings
from sd3_service.weights import warn_if_hub_download

log = logging.getLogger("sd3.model")

HUB_MODEL_ID = "stabilityai/stable-diffusion-3-medium-diffusers"
TINY = "tiny"


@dataclass(frozen=True)
class ModelSource:
    """What to load: `tiny`, a local folder, or a hub repo id; `reason` says why it was chosen."""

    name: str
    kind: str  # "tiny" | "folder" | "hub"
    reason: str


@dataclass
class LoadedPipeline:
    pipe: Any
    source: ModelSource
    device: str
    dtype: str


def resolve_model_source(setting: str, artifact_dir: Path, cuda_available: bool) -> ModelSource:
    """Turn `SD3_MODEL` into what to load (`auto` prefers the artifact's own weights)."""
    if setting == TINY:
        return ModelSource(TINY, "tiny", "SD3_MODEL=tiny")
    if setting != "auto":
        folder = Path(setting).expanduser()
        if folder.is_dir():
            return ModelSource(str(folder.resolve()), "folder", "SD3_MODEL is a local folder")
        return ModelSource(setting, "hub", "SD3_MODEL is a Hugging Face repo id")
    bundled = artifact_dir / "model"
    if (bundled / "model_index.json").is_file():
        return ModelSource(str(bundled), "folder", "weights found in the artifact's model/ folder")
    if cuda_available:
        return ModelSource(HUB_MODEL_ID, "hub", "no weights in the artifact and a CUDA GPU is present")
    return ModelSource(TINY, "tiny", "no weights in the artifact and no CUDA GPU")


def resolve_device(setting: str, cuda_available: bool) -> str:
    if setting == "auto":
        return "cuda" if cuda_available else "cpu"
    if setting == "cuda" and not cuda_available:
        raise RuntimeError("SD3_DEVICE=cuda but torch sees no CUDA GPU")
    return setting


def resolve_dtype(setting: str, device: str) -> str:
    if setting == "auto":
        return "float16" if device == "cuda" else "float32"
    return setting


def load_pipeline(settings: Settings) -> LoadedPipeline:
    """Load the pipeline onto its device; slow (seconds for tiny, minutes for the hub model)."""
    import torch

    cuda = torch.cuda.is_available()
    source = resolve_model_source(settings.sd3_model, ARTIFACT_DIR, cuda)
    device = resolve_device(settings.sd3_device, cuda)
    dtype = resolve_dtype(settings.sd3_dtype, device)
    if source.kind == "tiny":
        log.warning(
            "Serving the TINY random-weight SD3 pipeline (%s): images are noise. "
            "Set SD3_MODEL to a diffusers folder or hub id for real images.", source.reason,
        )
        from sd3_service.tiny_model import build_tiny_pipeline

        pipe = build_tiny_pipeline()
    else:
        from diffusers import StableDiffusion3Pipeline

        log.info("Loading SD3 from %s (%s) as %s on %s", source.name, source.reason, dtype, device)
        if source.kind == "hub":
            warn_if_hub_download(source.name, log)
        token = settings.hf_token.get_secret_value() if settings.hf_token else None
        without_t5 = {} if settings.sd3_t5 else {"text_encoder_3": None, "tokenizer_3": None}  # never loaded
        pipe = StableDiffusion3Pipeline.from_pretrained(source.name, dtype=getattr(torch, dtype), token=token,
                                                        **without_t5)
        pipe.set_progress_bar_config(disable=True)
    pipe = place_pipeline(pipe, settings, device, getattr(torch, dtype))
    return LoadedPipeline(pipe=pipe, source=source, device=device, dtype=dtype)


def place_pipeline(pipe, settings: Settings, device: str, dtype):
    """Move the pipeline to its device and dtype, applying SD3_T5, SD3_OFFLOAD, SD3_FUSE_QKV and SD3_COMPILE."""
    if not settings.sd3_t5 and pipe.text_encoder_3 is not None:
        # Without T5 the pipeline feeds zeros in place of its text states (as diffusers documents for SD3).
        pipe = type(pipe)(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
        pipe.set_progress_bar_config(disable=True)
    if settings.sd3_offload:
        if device != "cuda":
            raise RuntimeError("SD3_OFFLOAD=true needs a CUDA GPU (SD3_DEVICE=cuda): it moves models onto the GPU")
        pipe.to(dtype=dtype)
        pipe.enable_model_cpu_offload()  # each model moves to the GPU for its own step, then back
    else:
        pipe.to(device=device, dtype=dtype)
    if settings.sd3_fuse_qkv:
        pipe.transformer.fuse_qkv_projections()
    if settings.sd3_compile:
        pipe.transformer.compile()  # compiles on the first call per input shape: the warm-up pays for 1024x1024
    log.info("Pipeline options: T5 %s, offload %s, fused QKV %s, compiled %s", settings.sd3_t5,
             settings.sd3_offload, settings.sd3_fuse_qkv, settings.sd3_compile)
    return pipe
