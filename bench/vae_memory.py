"""Peak memory of the full-size SD3 VAE decoding the largest request (4 images at 1536x1536), sliced or not.

    python bench/vae_memory.py [--images 4] [--size 1536] [--limit-gb 20]

Each way runs in a child process on the CPU, in float32, with random weights in SD3 Medium's VAE
configuration (no download): the child builds the VAE, notes its resident memory, decodes the latents
all at once (`batched`) or one image at a time (`sliced`, what the service does), and reports its peak
resident memory (ru_maxrss) above that baseline. A child is capped at --limit-gb of address space, so a
way that needs more fails in its own process instead of taking the machine down.

On a GPU in float16 the activations take half these bytes; the weights (84 M parameters) are small.
Writes bench/results/vae_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import describe_machine, save_report  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(way: str, images: int, size: int, limit_gb: float) -> None:
    limit = int(limit_gb * 1024**3)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import gpu_sd3
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**gpu_sd3.sd3_medium_configs()["vae"]).eval()
    if way == "sliced":
        vae.enable_slicing()
    latents = torch.randn(images, 16, size // 8, size // 8)
    baseline = rss_mb()
    began = time.perf_counter()
    try:
        with torch.inference_mode():
            decoded = vae.decode(latents, return_dict=False)[0]
        outcome = {"shape": list(decoded.shape)}
    except (RuntimeError, MemoryError) as exc:
        outcome = {"failed": f"{type(exc).__name__}: {str(exc)[:200]}"}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"way": way, "baseline_mb": round(baseline), "peak_mb": round(peak),
                      "above_baseline_mb": round(peak - baseline), "seconds": round(time.perf_counter() - began, 1),
                      **outcome}))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=1536)
    parser.add_argument("--limit-gb", type=float, default=20.0)
    parser.add_argument("--child", choices=("sliced", "batched"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "vae_memory.json")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.images, args.size, args.limit_gb)
        return {}
    report = {"machine": describe_machine(), "images": args.images, "size": args.size, "dtype": "float32",
              "limit_gb": args.limit_gb, "ways": []}
    for way in ("sliced", "batched"):
        run = subprocess.run([sys.executable, __file__, "--child", way, "--images", str(args.images),
                              "--size", str(args.size), "--limit-gb", str(args.limit_gb)],
                             capture_output=True, text=True, timeout=3600)
        lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else {"way": way, "failed": f"exit {run.returncode}: "
                                                                         f"{run.stderr[-300:]}"}
        report["ways"].append(result)
        print(result, flush=True)
    save_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
