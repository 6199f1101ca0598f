"""What a LoRA adapter costs on the tiny model: its first use, a switch between cached adapters, and the per-step
overhead of unfused and fused adapters, each against the plain model measured in the same run.

    python bench/loras.py            # 512x512, 10 steps, 7 samples per figure
    python bench/loras.py --smoke    # small and few: checks the script works (benchcheck/test_loras.py, `bash dev.sh bench`)

The parts are the service's own, in this process: the LoRA library reading an adapter from a loopback Object
Storage endpoint (testbed/fakes, signed as a resource principal), checking it against the model and keeping
it by content; a device's `DeviceLoras` loading it into the tiny pipeline (rank 4 on the transformer's
attention projections, as diffusers' SD3 LoRA script trains them) and setting it per generation.

(a) first use: the library's resolve of a bucket adapter never seen (HEAD, GET, sha256, check) plus its load
    on the device; and the same for an adapter already fetched and loaded (HEAD only, nothing to load).
(b) a switch: setting another adapter that is already loaded, before a generation.
(c) per step: generations with 0 (LoRA disabled), 1 and 2 active unfused adapters, and on a second pipeline
    with the one adapter fused into its weights (`LORA_FUSE`, `fuse_adapters`); the difference per denoising
    step against disabled, and the ratio.

Writes bench/results/loras.json (or loras-smoke.json) and prints a table.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "sd3-medium"), str(HERE.parent)]
from machine import describe_machine, median_ms, save_report, smoke_or_full  # noqa: E402

PLANS = {"full": {"size": 512, "steps": 10, "samples": 7}, "smoke": {"size": 256, "steps": 2, "samples": 2}}


def main(argv=None) -> dict:
    plan, out = smoke_or_full(__doc__, PLANS, "loras", argv)

    from sd3_service.lora_library import AdapterCache, LoraLibrary
    from sd3_service.pipelines.generation import generate_images, generation_arguments
    from sd3_service.pipelines.loras import DeviceLoras, fuse_adapters, lora_modules
    from sd3_service.pipelines.tiny import build_tiny_pipeline
    from sd3_service.spec import ImageRequest, LoraChoice
    from sd3_service.storage.object_storage import ObjectStorageStore
    from testbed.fakes import oci_common
    from testbed.fakes.object_storage import FakeObjectStorage
    from testbed.loras import make_adapter

    request = ImageRequest(prompt="a harbour at dawn", width=plan["size"], height=plan["size"],
                           num_inference_steps=plan["steps"])
    with tempfile.TemporaryDirectory(prefix="sd3-loras-") as tmp, \
            FakeObjectStorage(namespace="benchns", buckets=("adapters",)) as bucket:
        tmp = Path(tmp)
        names = [f"style{index}" for index in range(plan["samples"] + 2)]
        for index, name in enumerate(names):
            bucket.add_object("adapters", f"{name}.safetensors",
                              make_adapter(tmp / "made" / f"{name}.safetensors", seed=index).read_bytes())
        credentials = bucket.trust(oci_common.resource_principal(tmp / "rp"))
        import os

        os.environ.update(credentials.env)
        reader = ObjectStorageStore(bucket="adapters", namespace="benchns", endpoint=bucket.endpoint)
        pipe = build_tiny_pipeline()
        modules = lora_modules(pipe)
        library = LoraLibrary(tmp / "catalog", AdapterCache(tmp / "cache", 1 << 30), frozenset({"adapters"}), reader,
                              modules=lambda: modules)
        device = DeviceLoras(pipe, "cpu (bench)", max_loaded=len(names))

        def uri(name: str) -> LoraChoice:
            return LoraChoice(f"oci://adapters@benchns/{name}.safetensors")

        def generate(on=pipe) -> float:
            began = time.perf_counter()
            generate_images(on, seed=1, **generation_arguments(request))
            return time.perf_counter() - began

        generate()  # the first generation allocates
        # (a) first use, then use again
        first, again = [], []
        for name in names[:plan["samples"]]:
            began = time.perf_counter()
            adapters = library.resolve((uri(name),))
            device.apply(adapters)
            first.append(time.perf_counter() - began)
            began = time.perf_counter()
            device.apply(library.resolve((uri(name),)))
            again.append(time.perf_counter() - began)
        # (b) a switch between two loaded adapters
        a, b = library.resolve((uri(names[0]),)), library.resolve((uri(names[1]),))
        switches = []
        for _ in range(plan["samples"]):
            for adapters in (a, b):
                began = time.perf_counter()
                device.apply(adapters)
                switches.append(time.perf_counter() - began)
        # (c) per step: disabled, one, two, interleaved so that all see the same machine
        two = library.resolve((uri(names[0]), uri(names[1])))
        fused = build_tiny_pipeline()
        fuse_adapters(fused, a)
        generate(fused)
        runs: dict[str, list[float]] = {"plain (LoRA disabled)": [], "one adapter, unfused": [],
                                        "one adapter, fused": [], "two adapters, unfused": []}
        for _ in range(plan["samples"]):
            for label, adapters in (("plain (LoRA disabled)", []), ("one adapter, unfused", a),
                                    ("two adapters, unfused", two)):
                device.apply(adapters)
                runs[label].append(generate())
            runs["one adapter, fused"].append(generate(fused))
        fetched = len(bucket.seen("GET", "/b/adapters/o/"))

    steps = plan["steps"]
    plain_ms = median_ms(runs["plain (LoRA disabled)"])
    per_step = {label: {"median_generation_ms": median_ms(samples),
                        "ms_per_step": round(median_ms(samples) / steps, 3),
                        "overhead_ms_per_step": round((median_ms(samples) - plain_ms) / steps, 3),
                        "x_plain": round(median_ms(samples) / plain_ms, 3)} for label, samples in runs.items()}
    report = {
        "benchmark": "loras", "plan": plan, "machine": describe_machine(),
        "model": "tiny (random weights, real SD3 pipeline classes), CPU float32; adapters rank 4 on attention",
        "first_use_ms": {"median": median_ms(first), "samples": [round(s * 1000, 2) for s in first],
                         "what": "resolve (HEAD, GET, sha256, check against the model) + load on the device"},
        "used_again_ms": {"median": median_ms(again), "what": "resolve (HEAD only), already loaded and active: nothing to set"},
        "switch_ms": {"median": median_ms(switches), "what": "set another adapter already loaded"},
        "per_step": per_step,
        "downloads": fetched,
    }
    print(f"\nLoRA costs, tiny model on the CPU, {plan['size']}x{plan['size']}, {steps} steps, median of "
          f"{plan['samples']}:")
    print(f"  first use (download + check + load) {report['first_use_ms']['median']:8.1f} ms")
    print(f"  used again (HEAD; already set)       {report['used_again_ms']['median']:8.1f} ms")
    print(f"  switch between loaded adapters       {report['switch_ms']['median']:8.1f} ms")
    for label, row in per_step.items():
        print(f"  {label:22} {row['median_generation_ms']:8.1f} ms/generation, {row['ms_per_step']:6.2f} ms/step, "
              f"+{row['overhead_ms_per_step']:5.2f} ms/step, x{row['x_plain']:.3f} plain")
    print(f"  bucket downloads: {fetched} for {len(names[:plan['samples']])} adapters\n")
    save_report(report, out)
    return report


if __name__ == "__main__":
    main()
