"""Find, load and place the SD3 pipeline, as `SD3_MODEL`, `SD3_DEVICE` and `SD3_DTYPE` say.

The weights are read from disk once (`load_weights`), then placed on each device (`place_pipeline`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd3_service.errors import ServiceError
from sd3_service.pipelines.loras import DeviceLoras, fuse_adapters, lora_modules
from sd3_service.pipelines.weights import warn_if_hub_download
from sd3_service.settings import ARTIFACT_DIR, Settings
from sd3_service.spec import ResolvedLora

log = logging.getLogger("sd3.model")

HUB_MODEL_ID = "stabilityai/stable-diffusion-3-medium-diffusers"
TINY = "tiny"


@dataclass(frozen=True)
class ModelSource:
    """What to load: `tiny`, a local folder, or a hub repo id; `reason` says why it was chosen."""

    name: str
    kind: str  # "tiny" | "folder" | "hub"
    reason: str

    @property
    def id(self) -> str:
        """The model's id for clients (the OpenAI surface's `GET /v1/models`): the hub repo id; `sd3-medium` for the
        artifact's own `model/` folder (where the docs put SD3 Medium's weights); another folder's name; `sd3-tiny`
        for the tiny random model."""
        if self.kind == "folder":
            folder = Path(self.name)
            return "sd3-medium" if folder == ARTIFACT_DIR / "model" else folder.name
        return "sd3-tiny" if self.kind == "tiny" else self.name


@dataclass
class LoadedPipeline:
    """A device's pipelines: text to image (`pipe`), and image to image and inpainting made from its components;
    the LoRA adapters loaded into them, and the layers an adapter may adapt."""

    pipe: Any
    source: ModelSource
    device: str
    dtype: str
    img2img: Any = None
    inpaint: Any = None
    loras: DeviceLoras | None = None
    lora_modules: dict[str, tuple[int, int]] | None = None
    fused: list[ResolvedLora] = field(default_factory=list)  # LORA_FUSE's adapters, in its weights

    def for_mode(self, mode: str):
        """The pipeline for a request's `mode`: `txt2img`, `img2img` or `inpaint`."""
        return {"txt2img": self.pipe, "img2img": self.img2img, "inpaint": self.inpaint}[mode]


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


def resolve_devices(setting: str, cuda_count: int) -> list[str]:
    """Turn `SD3_DEVICE` into the devices to serve on, one pipeline each.

    `auto`: every CUDA GPU torch sees, else the CPU; `cuda`: every CUDA GPU (an error without one);
    otherwise the comma-separated list as given (`cuda:0,cuda:1`; `cpu,cpu` runs two CPU pipelines).
    """
    if setting == "auto":
        return [f"cuda:{index}" for index in range(cuda_count)] or ["cpu"]
    if setting == "cuda":
        if not cuda_count:
            raise RuntimeError("SD3_DEVICE=cuda but torch sees no CUDA GPU")
        return [f"cuda:{index}" for index in range(cuda_count)]
    return [device.strip() for device in setting.split(",")]


def resolve_dtype(setting: str, devices: list[str]) -> str:
    if setting == "auto":
        return "float16" if any(device.startswith("cuda") for device in devices) else "float32"
    return setting


WITHOUT_T5 = {"text_encoder_3": None, "tokenizer_3": None}  # SD3_T5=false: the pipeline feeds zeros instead


def image_pipelines(pipe) -> tuple[Any, Any]:
    """The image-to-image and inpainting pipelines over `pipe`'s own components: no weight is copied.

    Like diffusers' `from_pipe`, but without its final `.to(dtype)`, which would cast the shared modules (and
    with them `pipe`) to one dtype, undoing what loading kept in float32.
    """
    import inspect

    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline

    made = []
    for pipeline_class in (StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline):
        accepted = inspect.signature(pipeline_class.__init__).parameters
        made.append(pipeline_class(**{name: component for name, component in pipe.components.items()
                                      if name in accepted}))
        made[-1].set_progress_bar_config(disable=True)
    return made[0], made[1]


def drop_t5(pipe):
    """The same pipeline without its T5 encoder (a loaded one; a folder or hub model skips reading it instead)."""
    pipe = type(pipe)(**{**pipe.components, **WITHOUT_T5})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class LoadedWeights:
    """The pipeline as read from disk (or built), on the CPU in its serving dtype, not yet placed."""

    pipe: Any
    source: ModelSource
    dtype: str
    fused: list[ResolvedLora] = field(default_factory=list)  # LORA_FUSE's adapters, fused into `pipe`


def load_weights(settings: Settings, devices: list[str]) -> LoadedWeights:
    """Read the weights once, in the serving dtype; slow (seconds for tiny, minutes for the hub model)."""
    import torch

    source = resolve_model_source(settings.sd3_model, ARTIFACT_DIR, torch.cuda.is_available())
    dtype = resolve_dtype(settings.sd3_dtype, devices)
    without_t5 = {} if settings.sd3_t5 else WITHOUT_T5
    if source.kind == "tiny":
        log.warning(
            "Serving the TINY random-weight SD3 pipeline (%s): images are noise. "
            "Set SD3_MODEL to a diffusers folder or hub id for real images.", source.reason,
        )
        from sd3_service.pipelines.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(getattr(torch, dtype))
        if without_t5:
            pipe = drop_t5(pipe)
    else:
        from diffusers import StableDiffusion3Pipeline

        log.info("Loading SD3 from %s (%s) as %s for %s", source.name, source.reason, dtype, ", ".join(devices))
        if source.kind == "hub":
            warn_if_hub_download(source.name, log)
        token = settings.hf_token.get_secret_value() if settings.hf_token else None
        if settings.hf_token_secret_ocid:  # out of the deployment's environment: read from Vault now
            from sd3_service.vault import read_vault_secret

            token = read_vault_secret(settings, settings.hf_token_secret_ocid)
        # The dtype is set here, where transformers keeps what must stay float32 (T5's `wo`); placing
        # later moves by device only.
        pipe = StableDiffusion3Pipeline.from_pretrained(source.name, dtype=getattr(torch, dtype), token=token,
                                                        **without_t5)  # without T5, its weights are never read
    if not settings.sd3_t5:
        log.info("SD3_T5=false: the pipeline feeds zeros in place of T5's text states")
    fused = catalog_adapters_to_fuse(pipe, settings)
    fuse_adapters(pipe, fused)  # once, here: every device's copy has them, before its warm-up
    return LoadedWeights(pipe=pipe, source=source, dtype=dtype, fused=fused)


def catalog_adapters_to_fuse(pipe, settings: Settings) -> list[ResolvedLora]:
    """`LORA_FUSE`'s adapters, found in the catalog and checked against the model like a request's."""
    if not settings.fused_loras:
        return []
    from sd3_service.lora_library import LoraLibrary

    modules = lora_modules(pipe)
    library = LoraLibrary(settings.lora_catalog, max_bytes=settings.lora_max_bytes, modules=lambda: modules)
    try:
        return library.resolve(settings.fused_loras)
    except ServiceError as exc:
        raise RuntimeError(f"LORA_FUSE={settings.lora_fuse}: {exc.message}") from None


def place_pipeline(weights: LoadedWeights, device: str, settings: Settings, copy: bool = True) -> LoadedPipeline:
    """A pipeline on `device` with its own scheduler and tokenizers, applying SD3_OFFLOAD, SD3_FUSE_QKV, SD3_COMPILE.

    `copy=False` moves the loaded weights themselves (for the last device: no spare copy is left behind).
    """
    import copy as copying

    import torch

    components = {}
    for name, component in weights.pipe.components.items():
        if isinstance(component, torch.nn.Module):
            components[name] = copying.deepcopy(component) if copy else component
        else:  # the scheduler holds per-generation state; a fast tokenizer must not be shared between threads
            components[name] = copying.deepcopy(component)
    pipe = type(weights.pipe)(**components)
    pipe.set_progress_bar_config(disable=True)
    if settings.sd3_offload:
        if not device.startswith("cuda"):
            raise RuntimeError("SD3_OFFLOAD=true needs a CUDA GPU: it moves models onto the GPU")
        pipe.enable_model_cpu_offload(device=device)  # each model moves to the GPU for its own step, then back
    else:
        pipe.to(device)  # by device only: the dtypes were set at load
    pipe.vae.enable_slicing()  # decode one image at a time: 4 images at 1536x1536 must fit beside the weights
    if settings.sd3_fuse_qkv:
        pipe.transformer.fuse_qkv_projections()
    if settings.sd3_compile:
        pipe.transformer.compile()  # compiles on the first call per input shape: the warm-up pays for 1024x1024
    img2img, inpaint = image_pipelines(pipe)  # after the options above, so they share them too
    # Adapters adapt the layers as loaded; fused query/key/value projections would bypass them.
    modules = None if settings.sd3_fuse_qkv else lora_modules(pipe)  # before any adapter wraps a layer
    loras = None if settings.sd3_fuse_qkv else DeviceLoras(pipe, device, settings.lora_max_loaded)
    if settings.sd3_tiny_gates is not None and weights.source.kind == "tiny":
        from sd3_service.pipelines.tiny import GatedPipeline

        pipe, img2img, inpaint = (GatedPipeline(p, settings.sd3_tiny_gates) for p in (pipe, img2img, inpaint))
    log.info("Pipeline on %s: T5 %s, offload %s, fused QKV %s, compiled %s", device, settings.sd3_t5,
             settings.sd3_offload, settings.sd3_fuse_qkv, settings.sd3_compile)
    return LoadedPipeline(pipe=pipe, source=weights.source, device=device, dtype=weights.dtype,
                          img2img=img2img, inpaint=inpaint, loras=loras, lora_modules=modules, fused=weights.fused)


def load_pipeline(settings: Settings, device: str | None = None) -> LoadedPipeline:
    """Load the pipeline onto one device (the first `SD3_DEVICE` names, unless given): for tools and benchmarks."""
    import torch

    device = device or resolve_devices(settings.sd3_device, torch.cuda.device_count())[0]
    return place_pipeline(load_weights(settings, [device]), device, settings, copy=False)
