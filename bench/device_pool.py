"""The device pool at GPU speeds, on a CPU: throughput with 1-8 stand-in devices, and the GIL a step costs.

    python bench/device_pool.py            # 1, 2, 4 and 8 devices at 1 s and 10 s per image (about 6 minutes)
    python bench/device_pool.py --smoke    # 1 and 2 devices at 0.2 s per image: checks the script works (CI)

(a) Throughput: the real server (`bentoml serve`, loopback) with every part of the service but the
    pipeline, which is a stand-in (bench/standin_service) that takes a set time per image without
    holding the GIL, as a GPU does, and returns real 1024x1024 images that are encoded and stored as
    usual. For N devices, 2N closed-loop clients send N x K requests; throughput is the requests over
    the time from the first send to the last answer, held against the ideal N / (seconds per image).
    The serving tax per request is its end-to-end latency minus the server's own queue and generate
    times (HTTP, validation, encoding, storing, scheduling). Nothing may be lost: every request must
    answer 200 with its image stored.
(b) The GIL: one real tiny-pipeline generation on one thread while a pure-Python counter runs on
    another; the share of the counter's rate it loses is the share of the generation that holds the
    GIL. That times the time per step is what one device's step costs every other device in the same
    process. The count of module calls per transformer step, tiny against the full-size SD3 Medium
    (on the meta device), scales it to the real model.

Writes bench/results/device_pool.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import describe_machine, save_report  # noqa: E402
from serving import SERVICE_DIR, TORCH_THREADS, running_server  # noqa: E402

SIZE = 1024
THROUGHPUT_TARGET = 0.95  # of N / (seconds per image)
TAX_TARGET_MS = 30


@dataclass(frozen=True)
class Plan:
    seconds_per_image: list[float]
    devices: list[int]
    rounds_per_device: dict[float, int]  # K: requests per device, by seconds per image
    gil_seconds: float


PLANS = {
    "full": Plan([1.0, 10.0], [1, 2, 4, 8], {1.0: 8, 10.0: 3}, gil_seconds=6.0),
    "smoke": Plan([0.2], [1, 2], {0.2: 3}, gil_seconds=1.0),
}


def measure_pool(devices: int, seconds: float, per_device: int, workdir: Path) -> dict:
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(SERVICE_DIR), os.environ.get("PYTHONPATH")])),
           "SD3_DEVICE": ",".join(["cpu"] * devices), "STANDIN_SECONDS_PER_IMAGE": str(seconds),
           "MAX_QUEUE": str(devices), "SPOOL_DIR": str(workdir / "spool")}
    total = devices * per_device
    clients = 2 * devices
    with running_server(workdir, env, target="standin:SD3Standin", cwd=HERE / "standin_service",
                        threads=TORCH_THREADS, timeout=300) as server:
        sent = 0
        lock = threading.Lock()
        answers: list[tuple[float, dict | None, int]] = []
        finished: list[float] = []

        def client_loop(index: int) -> None:
            nonlocal sent
            with httpx.Client(base_url=server.url, timeout=120) as client:
                while True:
                    with lock:
                        if sent == total:
                            return
                        sent += 1
                        number = sent
                    began = time.perf_counter()
                    response = client.post("/predict", json={"prompt": f"standin {number}", "width": SIZE,
                                                             "height": SIZE, "seed": number})
                    latency = time.perf_counter() - began
                    body = response.json() if response.status_code == 200 else None
                    with lock:
                        answers.append((latency, body, response.status_code))
                        finished.append(time.perf_counter())

        began = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client_loop, range(clients)))
        elapsed = time.perf_counter() - began

    ok = [(latency, body) for latency, body, status in answers if status == 200 and body["images"][0]["stored"]]
    taxes = [latency * 1000 - body["timings_ms"]["queue"] - body["timings_ms"]["generate"] for latency, body in ok]
    throughput = total / elapsed
    ideal = devices / seconds
    # Steady state: from the first wave's last answer to the last answer (no start-up ramp).
    steady = (total - devices) / (finished[-1] - finished[devices - 1]) if total > devices else None
    stage = {name: statistics.median(body["timings_ms"][name] for _, body in ok) for name in ("encode", "store")} \
        if ok else {}
    return {
        "devices": devices, "seconds_per_image": seconds, "clients": clients, "requests": total,
        "answered_and_stored": len(ok), "statuses": sorted({status for _, _, status in answers}),
        "elapsed_s": round(elapsed, 2), "images_per_s": round(throughput, 3), "ideal_images_per_s": ideal,
        "vs_ideal": round(throughput / ideal, 3),
        "steady_images_per_s": round(steady, 3) if steady else None,
        "steady_vs_ideal": round(steady / ideal, 3) if steady else None,
        "encode_ms_median": stage.get("encode"), "store_ms_median": stage.get("store"),
        "tax_ms_median": round(statistics.median(taxes), 1) if taxes else None,
        "tax_ms_p95": round(sorted(taxes)[int(0.95 * (len(taxes) - 1))], 1) if taxes else None,
    }


def gil_share(seconds: float) -> dict:
    """How much of a real tiny-pipeline generation holds the GIL (in this process, one torch thread)."""
    import torch

    sys.path.insert(0, str(SERVICE_DIR))
    from sd3_service.pipelines.generation import generate_images
    from sd3_service.pipelines.tiny import build_tiny_pipeline

    torch.set_num_threads(1)
    pipe = build_tiny_pipeline()
    steps = 20
    arguments = dict(prompt="a lighthouse", negative_prompt=None, num_inference_steps=steps, guidance_scale=7.0,
                     width=256, height=256, num_images=1)

    def count_for(duration: float, stop: threading.Event | None = None) -> float:
        count, end = 0, time.perf_counter() + duration
        while time.perf_counter() < end and not (stop and stop.is_set()):
            count += 1
        return count / duration

    def one_trial() -> tuple[float, float]:
        """(share of the generation's time that holds the GIL, seconds per step)."""
        alone = count_for(seconds / 3)
        generations, began = 0, time.perf_counter()

        def generate_for() -> None:
            nonlocal generations
            while time.perf_counter() - began < seconds:
                generate_images(pipe, seed=0, **arguments)
                generations += 1

        worker = threading.Thread(target=generate_for)
        worker.start()
        beside = count_for(seconds)
        worker.join()
        alone = (alone + count_for(seconds / 3)) / 2  # before and after: the machine's other load drifts
        return max(0.0, 1 - beside / alone), (time.perf_counter() - began) / max(1, generations) / steps

    generate_images(pipe, seed=0, **arguments)  # warm
    alone_s = time.perf_counter()
    generate_images(pipe, seed=0, **arguments)
    alone_s = (time.perf_counter() - alone_s) / steps
    # Python hands the GIL over every 5 ms by default: the counter would hold it that long each time the
    # pipeline thread wants it back, and slow the step it measures. A short interval keeps the hand-over prompt.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        trials = [one_trial() for _ in range(3)]
    finally:
        sys.setswitchinterval(interval)
    shares = sorted(share for share, _ in trials)
    step_s = statistics.median(step for _, step in trials)
    gil_ms = sorted(share * step * 1000 for share, step in trials)
    return {"tiny_step_alone_ms": round(alone_s * 1000, 2), "tiny_step_ms": round(step_s * 1000, 2),
            "gil_share_trials": [round(x, 3) for x in shares],
            "gil_share": round(shares[1], 3), "gil_ms_per_tiny_step_trials": [round(x, 2) for x in gil_ms],
            "gil_ms_per_tiny_step": round(gil_ms[1], 2)}


def module_calls_per_step() -> dict:
    """Module calls in one transformer forward: the tiny model's and the full-size SD3 Medium's (meta device)."""
    import gpu_sd3
    import torch

    from sd3_service.pipelines.tiny import build_tiny_pipeline

    def calls(transformer, size: int, dim: int, text: int, pooled: int, device) -> int:
        count = 0

        def hook(*_):
            nonlocal count
            count += 1

        handles = [module.register_forward_pre_hook(hook) for module in transformer.modules()]
        latent = size // 8
        with torch.inference_mode():
            transformer(hidden_states=torch.zeros(2, 16, latent, latent, device=device),
                        encoder_hidden_states=torch.zeros(2, text, dim, device=device),
                        pooled_projections=torch.zeros(2, pooled, device=device),
                        timestep=torch.zeros(2, device=device), return_dict=False)
        for handle in handles:
            handle.remove()
        return count

    tiny = build_tiny_pipeline().transformer
    full = gpu_sd3.build_pipeline(gpu_sd3.sd3_medium_configs(), "meta").transformer
    return {"tiny": calls(tiny, 256, tiny.config.joint_attention_dim, 77, tiny.config.pooled_projection_dim, "cpu"),
            "sd3_medium": calls(full, 1024, 4096, 333, 2048, torch.device("meta"))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few small runs, to check the script")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "device_pool.json")
    args = parser.parse_args(argv)
    plan = PLANS["smoke" if args.smoke else "full"]
    report = {"machine": describe_machine(), "pool": [], "gil": None, "module_calls_per_step": None}
    with tempfile.TemporaryDirectory() as scratch:
        for seconds in plan.seconds_per_image:
            for devices in plan.devices:
                result = measure_pool(devices, seconds, plan.rounds_per_device[seconds],
                                      Path(scratch) / f"{devices}x{seconds}")
                report["pool"].append(result)
                print(f"{devices} device(s) at {seconds:>4} s/image: {result['images_per_s']:.3f} images/s = "
                      f"{result['vs_ideal']:.3f} x ideal (steady state {result['steady_vs_ideal']}); tax median "
                      f"{result['tax_ms_median']} ms, p95 {result['tax_ms_p95']} ms; "
                      f"{result['answered_and_stored']}/{result['requests']} stored", flush=True)
    report["gil"] = gil_share(plan.gil_seconds)
    report["module_calls_per_step"] = module_calls_per_step()
    calls = report["module_calls_per_step"]
    # Host time per step scales with the module calls; a tiny step's whole time alone bounds its GIL time.
    scale = calls["sd3_medium"] / calls["tiny"]
    report["gil"]["gil_ms_per_sd3_medium_step_estimate"] = round(report["gil"]["gil_ms_per_tiny_step"] * scale, 1)
    report["gil"]["host_ms_per_sd3_medium_step_upper_bound"] = round(report["gil"]["tiny_step_alone_ms"] * scale, 1)
    print(f"GIL: {report['gil']}; module calls per transformer step: {calls}")
    save_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
