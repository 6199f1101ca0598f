"""Lossless PNG encoders on a 1024x1024 RGB image: time, bytes, and a pixel-exact round trip.

    python bench/png_encoders.py [--repeats 15] [--size 1024]

Two images: the tiny model's output (random weights: busy, noise-like, the worst case for deflate)
and a photograph (matplotlib's sample `grace_hopper.jpg`, resized to the same size), closer to
what SD3 Medium draws. Every encoder's output is decoded with Pillow and compared with the source
pixels; an encoder that does not round-trip exactly is reported as such and never chosen.
Writes bench/results/png_encoders.json.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "sd3-medium"))
from machine import describe_machine, machine_line  # noqa: E402


def pillow(level):
    def encode(image, pixels):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=level)
        return buffer.getvalue()
    return encode


def fpng_encoder():
    import fpng

    return lambda image, pixels: fpng.from_ndarray(pixels)


def imagecodecs_encoder(**options):
    import imagecodecs

    return lambda image, pixels: imagecodecs.png_encode(pixels, **options)


def opencv_encoder(level):
    import cv2

    def encode(image, pixels):
        ok, data = cv2.imencode(".png", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, level])
        assert ok
        return data.tobytes()
    return encode


CANDIDATES = {
    "pillow level 6 (Pillow's default)": lambda: pillow(6),
    "pillow level 1": lambda: pillow(1),
    "pillow level 0 (stored)": lambda: pillow(0),
    "fpng": fpng_encoder,
    "imagecodecs png level 1": lambda: imagecodecs_encoder(level=1),
    "imagecodecs png level 1, RLE, SUB filter": lambda: imagecodecs_encoder(level=1, strategy=3, filter=16),
    "opencv level 1": lambda: opencv_encoder(1),
}


def tiny_model_image(size: int) -> Image.Image:
    from sd3_service.pipelines.generation import generate_images, generation_arguments
    from sd3_service.pipelines.tiny import build_tiny_pipeline
    from sd3_service.spec import ImageRequest

    request = ImageRequest(prompt="a lighthouse at dusk", width=size, height=size, num_inference_steps=4, seed=7)
    return generate_images(build_tiny_pipeline(), seed=7, **generation_arguments(request))[0]


def photo_image(size: int) -> Image.Image:
    import matplotlib.cbook

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as photo:
        return photo.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)


def gil_share_left(encode, image, pixels) -> float:
    """How much a pure-Python thread gets done while `encode` runs, relative to running alone (1.0 = GIL released)."""
    def spin(seconds, counter):
        end = time.perf_counter() + seconds
        n = 0
        while time.perf_counter() < end:
            n += 1
        counter.append(n)

    started = time.perf_counter()
    encode(image, pixels)
    seconds = max(time.perf_counter() - started, 0.02)
    alone: list[int] = []
    spin(seconds, alone)
    during: list[int] = []
    spinner = threading.Thread(target=spin, args=(seconds, during))
    spinner.start()
    encoded = time.perf_counter()
    while time.perf_counter() - encoded < seconds:
        encode(image, pixels)
    spinner.join()
    return round(during[0] / alone[0], 2)


def measure(name: str, make, image: Image.Image, repeats: int) -> dict:
    try:
        encode = make()
    except ImportError as exc:
        return {"encoder": name, "available": False, "error": str(exc)}
    pixels = np.asarray(image)
    data = encode(image, pixels)  # warm-up, and the bytes to check
    with Image.open(io.BytesIO(data)) as decoded:
        identical = decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), pixels)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        encode(image, np.asarray(image))  # the PIL->numpy view is part of the cost
        times.append(time.perf_counter() - started)
    return {
        "encoder": name, "available": True, "median_ms": round(statistics.median(times) * 1000, 2),
        "min_ms": round(min(times) * 1000, 2), "bytes": len(data), "round_trip_identical": identical,
        "python_thread_progress_while_encoding": gil_share_left(encode, image, pixels),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "png_encoders.json")
    args = parser.parse_args(argv)

    machine = describe_machine(("torch", "pillow", "numpy", "fpng", "imagecodecs", "opencv-python-headless"))
    print(machine_line(machine))
    images = {"tiny model output": tiny_model_image(args.size), "photo (grace_hopper.jpg resized)": photo_image(args.size)}
    results = {}
    for label, image in images.items():
        print(f"\n{label}, {args.size}x{args.size} RGB, median of {args.repeats}")
        print(f"  {'encoder':44} {'ms':>8} {'bytes':>10} {'identical':>9} {'py thread':>9}")
        rows = []
        for name, make in CANDIDATES.items():
            row = measure(name, make, image, args.repeats)
            rows.append(row)
            if row["available"]:
                print(f"  {name:44} {row['median_ms']:8.1f} {row['bytes']:10d} {str(row['round_trip_identical']):>9}"
                      f" {row['python_thread_progress_while_encoding']:9.2f}")
            else:
                print(f"  {name:44} not installed ({row['error']})")
        results[label] = rows
    report = {"benchmark": "png_encoders", "size": args.size, "repeats": args.repeats, "machine": machine,
              "load_average_after": describe_machine(())["load_average_1_5_15"], "images": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
