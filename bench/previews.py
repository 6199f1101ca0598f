"""What a streamed request's previews cost on the tiny model: each preview's estimate and decode, its encoding,
and a generation with 0 against 3 previews, measured in the same run.

    python bench/previews.py            # 512x512, 20 steps, 5 samples per figure
    python bench/previews.py --smoke    # small and few: checks the script works (benchcheck/test_previews.py)

A preview is the service's own (`generate_images(..., previews=3)`): after evenly spaced steps, the flow-matching
estimate of the final latents (latents minus sigma times the velocity of the last Euler step) decoded by the VAE,
on the device's thread, then encoded as the request's format (PNG here) on an I/O thread. The tiny model's VAE
is small: on SD3 Medium the decode is the larger share (bench/gpu_sd3.py measures the real VAE's decode).

Writes bench/results/previews.json (or previews-smoke.json) and prints a table.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "sd3-medium"), str(HERE.parent)]
from machine import describe_machine, median_ms, save_report, smoke_or_full  # noqa: E402

PLANS = {"full": {"size": 512, "steps": 20, "samples": 5}, "smoke": {"size": 256, "steps": 6, "samples": 2}}
PREVIEWS = 3


def main(argv=None) -> dict:
    plan, out = smoke_or_full(__doc__, PLANS, "previews", argv)

    from sd3_service.pipelines import generation
    from sd3_service.pipelines.tiny import build_tiny_pipeline
    from sd3_service.spec import ImageRequest
    from sd3_service.storage.encoding import encode_image

    pipe = build_tiny_pipeline()
    request = ImageRequest(prompt="a harbour at dawn", width=plan["size"], height=plan["size"],
                           num_inference_steps=plan["steps"])
    arguments = generation.generation_arguments(request)
    decodes: list[float] = []
    estimate = generation.estimate_images

    def timed_estimate(*call):
        began = time.perf_counter()
        images = estimate(*call)
        decodes.append(time.perf_counter() - began)
        return images

    generation.estimate_images = timed_estimate  # the service's own estimate, timed where the device runs it
    shown: list = []
    generation.generate_images(pipe, seed=0, **arguments)  # warm-up
    plain, previewed = [], []
    for sample in range(plan["samples"]):  # interleaved, so that drift in the machine's load hits both alike
        began = time.perf_counter()
        generation.generate_images(pipe, seed=sample, **arguments)
        plain.append(time.perf_counter() - began)
        began = time.perf_counter()
        generation.generate_images(pipe, seed=sample, previews=PREVIEWS, **arguments,
                                   on_preview=lambda index, step, steps, images: shown.append((index, step, images)))
        previewed.append(time.perf_counter() - began)
    encodes = []
    for _, _, images in shown:
        began = time.perf_counter()
        encode_image(images[0], "png")
        encodes.append(time.perf_counter() - began)

    report = {
        "benchmark": "previews", "plan": plan, "machine": describe_machine(),
        "preview_steps": generation.preview_steps(PREVIEWS, plan["steps"]),
        "previews_per_generation": len(shown) / plan["samples"],
        "estimate_and_decode_ms": {"median": median_ms(decodes), "samples": len(decodes)},
        "encode_png_ms": {"median": median_ms(encodes), "samples": len(encodes)},
        "generation_ms": {"0 previews": median_ms(plain), f"{PREVIEWS} previews": median_ms(previewed)},
    }
    report["x_without_previews"] = round(statistics.median(previewed) / statistics.median(plain), 3)
    print(f"\nPreviews, tiny model on the CPU, {plan['size']}x{plan['size']}, {plan['steps']} steps, median of "
          f"{plan['samples']} (each figure measured in this run)")
    print(f"  previews at steps {report['preview_steps']}")
    print(f"  estimate + VAE decode, per preview  {report['estimate_and_decode_ms']['median']:8.1f} ms")
    print(f"  PNG encode, per preview             {report['encode_png_ms']['median']:8.1f} ms (I/O thread)")
    print(f"  generation, 0 previews              {report['generation_ms']['0 previews']:8.1f} ms")
    print(f"  generation, {PREVIEWS} previews              {report['generation_ms'][f'{PREVIEWS} previews']:8.1f} ms"
          f"  (x{report['x_without_previews']} of 0 previews)\n")
    save_report(report, out)
    return report


if __name__ == "__main__":
    main()
