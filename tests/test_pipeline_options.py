"""SD3_T5, SD3_FUSE_QKV, SD3_COMPILE and SD3_OFFLOAD, applied by model_loading to the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sd3_service.pipelines.generation import generate_images, generation_arguments
from sd3_service.pipelines.loading import load_pipeline
from sd3_service.settings import Settings
from sd3_service.spec import ImageRequest

REQUEST = ImageRequest(prompt="a red bicycle leaning on a wall", width=256, height=256, num_inference_steps=2)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def load(**options):
    return load_pipeline(Settings(sd3_model="tiny", sd3_device="cpu", **options))


def pixels(loaded) -> np.ndarray:
    [image] = generate_images(loaded.pipe, seed=11, **generation_arguments(REQUEST))
    assert image.size == (256, 256)
    return np.asarray(image).astype(int)


@pytest.fixture(scope="module")
def default_pixels():
    return pixels(load())


def test_environment_names_the_options(monkeypatch):
    for name, value in {"SD3_COMPILE": "1", "SD3_FUSE_QKV": "true", "SD3_T5": "false", "SD3_OFFLOAD": "yes"}.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert (settings.sd3_compile, settings.sd3_fuse_qkv, settings.sd3_t5, settings.sd3_offload) == (True, True, False, True)


def test_defaults_leave_the_pipeline_as_built():
    settings = Settings()
    assert (settings.sd3_compile, settings.sd3_fuse_qkv, settings.sd3_t5, settings.sd3_offload) == (False, False, True, False)
    loaded = load()
    assert loaded.pipe.text_encoder_3 is not None
    assert type(next(iter(loaded.pipe.transformer.attn_processors.values()))).__name__ == "JointAttnProcessor2_0"


def test_fused_qkv_draws_the_same_image(default_pixels):
    loaded = load(sd3_fuse_qkv=True)
    processors = {type(p).__name__ for p in loaded.pipe.transformer.attn_processors.values()}
    assert processors == {"FusedJointAttnProcessor2_0"}
    # One matmul instead of three sums in another order: equal up to float rounding.
    assert np.abs(pixels(loaded) - default_pixels).max() <= 2


def test_without_t5_the_encoder_is_gone_and_images_still_come(default_pixels):
    loaded = load(sd3_t5=False)
    assert loaded.pipe.text_encoder_3 is None and loaded.pipe.tokenizer_3 is None
    without = pixels(loaded)
    assert not np.array_equal(without, default_pixels)  # the T5 states did reach the transformer before


def test_compile_wraps_the_transformer():
    loaded = load(sd3_compile=True)
    assert loaded.pipe.transformer._compiled_call_impl is not None


def test_offload_without_a_gpu_fails_loudly():
    with pytest.raises(RuntimeError, match="SD3_OFFLOAD"):
        load(sd3_offload=True)


@needs_gpu
@pytest.mark.parametrize("options", [{"sd3_offload": True}, {"sd3_compile": True}, {"sd3_fuse_qkv": True, "sd3_compile": True}])
def test_gpu_options_generate(options):
    loaded = load_pipeline(Settings(sd3_model="tiny", sd3_device="cuda", **options))
    [image] = generate_images(loaded.pipe, seed=11, **generation_arguments(REQUEST))
    assert image.size == (256, 256) and np.asarray(image).std() > 0
