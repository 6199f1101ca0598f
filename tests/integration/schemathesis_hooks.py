"""Schemathesis hooks for the contract test: keep generated requests small enough for a 2-core CPU.

Each valid (or absent, so defaulted) size, step count and image count is set to the cheapest valid value just
before the call; an invalid value is left as generated, so a request meant to be refused stays refused.
"""

import schemathesis

CHEAPEST = {"width": 256, "height": 256, "num_inference_steps": 1, "num_images": 1}


def _valid(name: str, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    if name in ("width", "height"):
        return 256 <= value <= 1536 and value % 16 == 0
    return 1 <= value <= {"num_inference_steps": 50, "num_images": 4}[name]


@schemathesis.hook
def before_call(context, case, kwargs):
    if isinstance(case.body, dict):
        for name, cheapest in CHEAPEST.items():
            if name == "num_images" and case.operation.path == "/txt2img":
                continue
            if name not in case.body or _valid(name, case.body[name]):
                case.body[name] = cheapest
