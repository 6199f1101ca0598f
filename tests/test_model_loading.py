"""Which model is loaded, on which device and dtype; and loading a pipeline folder (the artifact's model/)."""

import hashlib

import pytest

from sd3_service.contract import PredictRequest
from sd3_service.generation import encode_image, generate_images
from sd3_service.model_loading import (HUB_MODEL_ID, load_pipeline, resolve_device, resolve_dtype,
                                       resolve_model_source)
from sd3_service.settings import Settings
from sd3_service.tiny_model import build_tiny_pipeline


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
    assert resolve_device("auto", False) == "cpu" and resolve_device("auto", True) == "cuda"
    with pytest.raises(RuntimeError, match="no CUDA"):
        resolve_device("cuda", False)
    assert resolve_dtype("auto", "cuda") == "float16" and resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"


def _image_sha(pipe, device="cpu"):
    request = PredictRequest(prompt="a house", width=256, height=256, num_inference_steps=2)
    [image] = generate_images(pipe, request, seed=11, device=device)
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
        request = PredictRequest(prompt="x", width=width, height=height, num_inference_steps=1)
        assert generate_images(pipe, request, seed=0, device="cpu")[0].size == (width, height)


def test_a_forced_dtype_is_applied():
    loaded = load_pipeline(Settings(sd3_model="tiny", sd3_dtype="bfloat16"))
    assert loaded.dtype == "bfloat16" and str(loaded.pipe.transformer.dtype) == "torch.bfloat16"
