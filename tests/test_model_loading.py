"""Which model is loaded, on which device and dtype; and loading a pipeline folder (the artifact's model/)."""

import hashlib

import pytest
import torch

from sd3_service.pipelines.generation import generate_images, generation_arguments
from sd3_service.pipelines.loading import (HUB_MODEL_ID, load_pipeline, load_weights, place_pipeline, resolve_devices,
                                           resolve_dtype, resolve_model_source)
from sd3_service.pipelines.tiny import build_tiny_pipeline
from sd3_service.settings import Settings
from sd3_service.spec import ImageRequest
from sd3_service.storage.encoding import encode_image


def test_auto_prefers_the_artifacts_model_folder(tmp_path):
    assert resolve_model_source("auto", tmp_path, cuda_available=True).name == HUB_MODEL_ID
    assert resolve_model_source("auto", tmp_path, cuda_available=False).kind == "tiny"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    source = resolve_model_source("auto", tmp_path, cuda_available=False)
    assert (source.kind, source.name) == ("folder", str(tmp_path / "model"))


def test_explicit_settings(tmp_path):
    assert resolve_model_source("tiny", tmp_path, True).kind == "tiny"
    assert resolve_model_source(str(tmp_path), tmp_path, True).kind == "folder"
    assert resolve_model_source("someone/sd3-finetune", tmp_path, False) .kind == "hub"
    assert resolve_dtype("auto", ["cuda:0"]) == "float16" and resolve_dtype("auto", ["cpu"]) == "float32"
    assert resolve_dtype("bfloat16", ["cpu"]) == "bfloat16"


def test_every_gpu_torch_sees_or_the_list_given():
    assert resolve_devices("auto", 0) == ["cpu"]
    assert resolve_devices("auto", 2) == ["cuda:0", "cuda:1"] and resolve_devices("cuda", 8)[-1] == "cuda:7"
    assert resolve_devices("cuda:1,cuda:0", 2) == ["cuda:1", "cuda:0"]
    assert resolve_devices("cpu,cpu", 0) == ["cpu", "cpu"]
    with pytest.raises(RuntimeError, match="no CUDA"):
        resolve_devices("cuda", 0)


@pytest.mark.parametrize("setting", ["gpu", "cuda:x", "auto,cpu", "cpu,,cpu", ""])
def test_a_malformed_device_list_is_refused(setting):
    with pytest.raises(ValueError, match="sd3_device"):
        Settings(sd3_device=setting)


def _image_sha(pipe, device="cpu"):
    request = ImageRequest(prompt="a house", width=256, height=256, num_inference_steps=2)
    [image] = generate_images(pipe, seed=11, **generation_arguments(request))
    return hashlib.sha256(encode_image(image, "png").data).hexdigest()


def test_a_pipeline_saved_with_save_pretrained_loads_from_its_folder_and_gives_the_same_image(tmp_path):
    tiny = build_tiny_pipeline()
    folder = tmp_path / "model"
    tiny.save_pretrained(folder)
    loaded = load_pipeline(Settings(sd3_model=str(folder)))
    assert (loaded.source.kind, loaded.device, loaded.dtype) == ("folder", "cpu", "float32")
    assert _image_sha(loaded.pipe) == _image_sha(tiny)


def test_the_tiny_pipeline_is_the_same_in_every_process_and_takes_every_allowed_size():
    pipe = build_tiny_pipeline()
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert _image_sha(pipe) == _image_sha(build_tiny_pipeline())
    for width, height in [(256, 1536), (1536, 256), (272, 784)]:
        request = ImageRequest(prompt="x", width=width, height=height, num_inference_steps=1)
        assert generate_images(pipe, seed=0, **generation_arguments(request))[0].size == (width, height)


def test_a_forced_dtype_is_applied():
    loaded = load_pipeline(Settings(sd3_model="tiny", sd3_dtype="bfloat16"))
    assert loaded.dtype == "bfloat16" and str(loaded.pipe.transformer.dtype) == "torch.bfloat16"


def test_placing_keeps_what_loading_keeps_in_float32(tmp_path):
    build_tiny_pipeline().save_pretrained(tmp_path / "model")
    loaded = load_pipeline(Settings(sd3_model=str(tmp_path / "model"), sd3_dtype="float16"))
    t5 = dict(loaded.pipe.text_encoder_3.named_parameters())
    assert t5["encoder.block.0.layer.1.DenseReluDense.wo.weight"].dtype == torch.float32  # T5 overflows in fp16
    assert t5["encoder.block.0.layer.1.DenseReluDense.wi.weight"].dtype == torch.float16
    assert loaded.pipe.transformer.dtype == torch.float16
    tiny = build_tiny_pipeline(torch.float16)  # the tiny model casts as loading would
    assert dict(tiny.text_encoder_3.named_parameters())["encoder.block.0.layer.1.DenseReluDense.wo.weight"].dtype \
        == torch.float32


def test_each_device_gets_its_own_copy_and_the_last_takes_the_loaded_weights():
    settings = Settings(sd3_model="tiny", sd3_device="cpu,cpu")
    weights = load_weights(settings, ["cpu", "cpu"])
    first = place_pipeline(weights, "cpu", settings, copy=True).pipe
    last = place_pipeline(weights, "cpu", settings, copy=False).pipe
    assert first.transformer is not weights.pipe.transformer and last.transformer is weights.pipe.transformer
    assert first.scheduler is not last.scheduler and first.tokenizer_3 is not last.tokenizer_3
    assert first.vae.use_slicing and last.vae.use_slicing  # several images decode one at a time
    assert _image_sha(first) == _image_sha(last)


def _storages(pipe) -> dict[int, int]:
    """Where each parameter and buffer of the pipeline's models lives in memory -> its size in bytes."""
    found = {}
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in [*component.parameters(), *component.buffers()]:
                storage = tensor.untyped_storage()
                found[storage.data_ptr()] = storage.nbytes()
    return found


def test_img2img_and_inpainting_share_every_weight_of_the_devices_pipeline(tmp_path):
    build_tiny_pipeline().save_pretrained(tmp_path / "model")
    loaded = load_pipeline(Settings(sd3_model=str(tmp_path / "model"), sd3_dtype="float16"))
    text_only = _storages(loaded.pipe)
    every = text_only | _storages(loaded.img2img) | _storages(loaded.inpaint)
    assert every == text_only and sum(text_only.values()) > 0  # not one byte of weights more
    assert type(loaded.for_mode("img2img")).__name__ == "StableDiffusion3Img2ImgPipeline"
    assert type(loaded.for_mode("inpaint")).__name__ == "StableDiffusion3InpaintPipeline"
    assert loaded.inpaint.transformer is loaded.pipe.transformer and loaded.img2img.vae is loaded.pipe.vae
    # Made without diffusers' `from_pipe`, whose final `.to(dtype)` would cast the shared T5 to one dtype.
    t5 = dict(loaded.pipe.text_encoder_3.named_parameters())
    assert t5["encoder.block.0.layer.1.DenseReluDense.wo.weight"].dtype == torch.float32
    assert loaded.pipe.transformer.dtype == torch.float16
