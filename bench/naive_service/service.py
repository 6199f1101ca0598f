"""The naive baseline for bench/serving.py: the original BentoDiffusion sample's shape, plus storing.

One synchronous API method (BentoML runs it on one thread, so requests run one after another) that
generates, encodes the PNG with Pillow's default settings, and stores the file, all inside the
request: the next generation cannot start until the previous image is encoded and stored. It uses
the service's own pipeline loading, generation and store, so only the serving differs.
"""

from __future__ import annotations

import datetime as dt
import io
import time

import bentoml

from sd3_service.pipelines.generation import generate_images, generation_arguments
from sd3_service.pipelines.loading import load_pipeline
from sd3_service.settings import Settings
from sd3_service.spec import ImageRequest
from sd3_service.storage.naming import image_name
from sd3_service.storage.store import ImageObject
from sd3_service.storage.writer import build_store


@bentoml.service(name="sd3-naive", traffic={"timeout": 300}, resources={"gpu": 1})
class NaiveSD3:
    def __init__(self) -> None:
        self.settings = Settings()
        self.loaded = load_pipeline(self.settings)
        self.store = build_store(self.settings)

    @bentoml.api(route="/predict")
    def predict(self, prompt: str, num_inference_steps: int = 28, guidance_scale: float = 7.0, width: int = 1024,
                height: int = 1024, seed: int = 0, request_id: str = "naive") -> dict:
        request = ImageRequest(prompt=prompt, num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale, width=width, height=height, seed=seed)
        began = time.perf_counter()
        [image] = generate_images(self.loaded.pipe, seed=seed, **generation_arguments(request))
        generated = time.perf_counter()
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")  # Pillow's defaults, as the sample's PIL return value is encoded
        data = buffer.getvalue()
        encoded = time.perf_counter()
        name = image_name(self.settings.object_prefix, request_id, 0, "png", dt.datetime.now(dt.timezone.utc))
        self.store.put(ImageObject(name=name, data=data, content_type="image/png"))
        stored = time.perf_counter()
        return {"object_name": name, "bytes": len(data), "timings_ms": {
            "generate": round((generated - began) * 1000), "encode": round((encoded - generated) * 1000),
            "store": round((stored - encoded) * 1000)}}
