"""A stream's previews are the model's current estimate of the final images, and they change nothing about them."""

import numpy as np

from sd3_service.jobs.ledger import Record
from sd3_service.pipelines.generation import generate_images, generation_arguments, preview_steps
from sd3_service.pipelines.tiny import build_tiny_pipeline
from sd3_service.spec import ImageRequest


def test_previews_come_at_evenly_spaced_steps_never_the_first_or_the_last():
    assert preview_steps(3, 28) == [7, 14, 21] and preview_steps(1, 28) == [14]
    assert preview_steps(3, 6) == [2, 3, 4] and preview_steps(3, 3) == [2] and preview_steps(3, 2) == []


def test_each_preview_is_closer_to_the_final_image_and_the_final_image_is_unchanged():
    pipe = build_tiny_pipeline()
    arguments = generation_arguments(ImageRequest(prompt="a kite", width=256, height=256, num_inference_steps=12,
                                                  num_images=2))
    shown = []
    final = generate_images(pipe, seed=1, previews=3, **arguments,
                            on_preview=lambda index, step, steps, images: shown.append((index, step, images)))
    plain = generate_images(pipe, seed=1, **arguments)
    assert [image.tobytes() for image in final] == [image.tobytes() for image in plain]
    assert [(index, step, len(images)) for index, step, images in shown] == [(0, 3, 2), (1, 6, 2), (2, 9, 2)]
    target = np.asarray(final[0], dtype=float)
    distances = [float(np.abs(np.asarray(images[0], dtype=float) - target).mean()) for _, _, images in shown]
    print("mean pixel distance to the final image, per preview:", [round(d, 2) for d in distances])
    assert distances[0] > distances[1] > distances[2] > 0  # the estimate converges on the image, as the steps do


def test_a_record_with_fields_of_a_newer_version_still_reads():
    stored = Record(request_id="r", state="done", owner="o", lease_expires=0.0, seed=1, day="2026/12/06",
                    parameters={}).to_json()
    newer = stored[:-1] + b',"some_later_field":1}'
    assert Record.from_json(newer) == Record.from_json(stored)
