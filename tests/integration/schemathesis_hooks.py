"""Schemathesis hooks for the contract test: keep generated requests small and their images real.

Each valid (or absent, so defaulted) size, step count and image count is set to the cheapest valid value just
before the call; an invalid value is left as generated, so a request meant to be refused stays refused.
A string in `image` or `mask_image` (any string fits the schema's `type: string`) becomes a real 256x256 PNG,
and a mask or a strength sent without an image gets one; the OpenAI edit's files become a real PNG and a mask
with alpha of its size. What the schema cannot say (an image field holds an image; `mask_image` and `strength`
come with `image`; a `WxH` size must also fit the model's bounds; a `webhook` must be a URL the deployment's
WEBHOOK_HOSTS allow, tested in test_webhooks.py) the descriptions say, and the hooks keep to.
"""

import base64
import io
import re

import schemathesis
from PIL import Image

CHEAPEST = {"width": 256, "height": 256, "num_inference_steps": 1, "num_images": 1}
OPENAI_CHEAPEST = {"num_inference_steps": 1, "n": 1}
SIZE = re.compile(r"^(auto|\d{1,5}x\d{1,5})$")


def _png(mode: str) -> bytes:
    buffer = io.BytesIO()
    colour = {"L": 200, "RGB": (120, 80, 40), "RGBA": (0, 0, 0, 0)}[mode]
    Image.new(mode, (256, 256), colour).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES = {"image": base64.b64encode(_png("RGB")).decode("ascii"),
          "mask_image": base64.b64encode(_png("L")).decode("ascii")}


def _valid(name: str, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    if name in ("width", "height"):
        return 256 <= value <= 1536 and value % 16 == 0
    return 1 <= value <= {"num_inference_steps": 50, "num_images": 4, "n": 4}[name]


def _cheapest(body: dict, values: dict) -> None:
    for name, cheapest in values.items():
        if name not in body or _valid(name, body[name]):
            body[name] = cheapest


def _body_is_valid(case) -> bool:
    """Whether schemathesis generated the body to fit the schema (a positive case)."""
    meta = getattr(case, "meta", None)
    body = meta.components.get("body") if meta is not None else None
    return body is None or body.mode == "positive"


@schemathesis.hook
def before_call(context, case, kwargs):
    if not isinstance(case.body, dict):
        return
    path = case.operation.path
    if path.startswith("/v1/images/"):
        _cheapest(case.body, OPENAI_CHEAPEST)
        if _body_is_valid(case):
            case.body.pop("model", None)  # any string fits the schema; the one model served is named in its text
        if isinstance(case.body.get("size"), str) and SIZE.match(case.body["size"]):
            case.body["size"] = "256x256"
        if path.endswith("/edits") and _body_is_valid(case):  # a file field of a request meant to be refused stays
            if "image" in case.body:
                case.body["image"] = _png("RGB")
            if "mask" in case.body:
                case.body["mask"] = _png("RGBA")
        return
    _cheapest(case.body, {name: value for name, value in CHEAPEST.items()
                          if name != "num_images" or path == "/predict"})
    if _body_is_valid(case):  # any string fits `webhook`; whether it may be sent to is the deployment's allowlist
        case.body.pop("webhook", None)
        case.body.pop("webhook_events_filter", None)
    for name, png in IMAGES.items():
        if isinstance(case.body.get(name), str):
            case.body[name] = png
    needs_image = case.body.get("mask_image") is not None or "strength" in case.body
    if needs_image and case.body.get("image") is None and path == "/predict":
        case.body["image"] = IMAGES["image"]
