"""The real service with a stand-in pipeline, to measure the device pool at GPU speeds on a CPU.

Everything but the pipeline is the production service (`sd3-medium/service.py`): HTTP, the guard, the
engine, the device pool with one worker per device, the jobs, the image writer and the store. The model's
loaders are the seam (`compose.ModelLoaders`): this service hands in its own.
Each device's "pipeline" sleeps `STANDIN_SECONDS_PER_IMAGE` per image (a sleep does not hold the GIL,
as a GPU's kernels do not) and returns real images of the requested size, which are encoded and
stored as usual. `SD3_DEVICE=cpu,cpu,...` sets the number of stand-in devices.

    cd bench/standin_service && PYTHONPATH=../../sd3-medium STANDIN_SECONDS_PER_IMAGE=1 \\
        SD3_DEVICE=cpu,cpu bentoml serve standin:SD3Standin
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import service  # the production service module, from sd3-medium/
from PIL import Image

from sd3_service.compose import ModelLoaders
from sd3_service.pipelines.loading import LoadedPipeline, LoadedWeights, ModelSource

SECONDS_PER_IMAGE = float(os.environ.get("STANDIN_SECONDS_PER_IMAGE", "1.0"))
SOURCE = ModelSource("standin", "standin", f"{SECONDS_PER_IMAGE} s per image, GIL released")


@lru_cache(maxsize=16)
def picture(width: int, height: int) -> Image.Image:
    """A real RGB image of the size asked for, smooth with some grain like a generated one (its PNG is about
    as large as SD3's, 1-2 MB at 1024x1024); made once per size, so the stand-in spends no CPU per call."""
    rng = np.random.default_rng(width * 10_000 + height)
    coarse = Image.fromarray(rng.integers(0, 256, (max(1, height // 64), max(1, width // 64), 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC)).astype(np.int16)
    grain = rng.integers(-6, 7, (height, width, 3))
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


@dataclass
class StandinOutput:
    images: list


class StandinPipeline:
    """Takes `SECONDS_PER_IMAGE` per image without holding the GIL; answers like a diffusers pipeline."""

    def __call__(self, *, width: int, height: int, num_images_per_prompt: int = 1, **_) -> StandinOutput:
        time.sleep(SECONDS_PER_IMAGE * num_images_per_prompt)
        return StandinOutput(images=[picture(width, height)] * num_images_per_prompt)


def standin_weights(settings, devices):
    return LoadedWeights(pipe=StandinPipeline(), source=SOURCE, dtype="float32")


def standin_place(weights, device, settings, copy):
    return LoadedPipeline(pipe=StandinPipeline(), source=SOURCE, device=device, dtype="float32")


class StandinService(service.SD3MediumService):
    loaders = ModelLoaders(load_weights=standin_weights, place=standin_place)


SD3Standin = service.serve(StandinService, name="sd3-standin")
