"""Schemathesis hooks for the contract test: keep generated requests small and their images real.

Each valid (or absent, so defaulted) size, step count and image count is set to the cheapest valid value just
before the call; an invalid value is left as generated, so a request meant to be refused stays refused.
A string in `image` or `mask_image` (any string fits the schema's `type: string`) becomes a real 256x256 PNG,
and a mask or a strength sent without an image gets one: what the schema cannot say (an image field holds an
image; `mask_image` and `strength` come with `image`) the descriptions say, and the hook keeps to.
"""

import base64
import io

import schemathesis
from PIL import Image

CHEAPEST = {"width": 256, "height": 256, "num_inference_steps": 1, "num_images": 1}


def _png(mode: str) -> str:
    buffer = io.BytesIO()
    Image.new(mode, (256, 256), 200 if mode == "L" else (120, 80, 40)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


IMAGES = {"image": _png("RGB"), "mask_image": _png("L")}


def _valid(name: str, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    if name in ("width", "height"):
        return 256 <= value <= 1536 and value % 16 == 0
    return 1 <= value <= {"num_inference_steps": 50, "num_images": 4}[name]


@schemathesis.hook
def before_call(context, case, kwargs):
    if not isinstance(case.body, dict):
        return
    for name, cheapest in CHEAPEST.items():
        if name == "num_images" and case.operation.path != "/predict":
            continue
        if name not in case.body or _valid(name, case.body[name]):
            case.body[name] = cheapest
    for name, png in IMAGES.items():
        if isinstance(case.body.get(name), str):
            case.body[name] = png
    needs_image = case.body.get("mask_image") is not None or "strength" in case.body
    if needs_image and case.body.get("image") is None and case.operation.path == "/predict":
        case.body["image"] = IMAGES["image"]
