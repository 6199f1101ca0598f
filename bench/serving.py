"""What serving costs on top of the SD3 pipeline, and how it holds up under concurrent clients.

    python bench/serving.py            # the full run (about 10-15 minutes on 2 CPU cores)
    python bench/serving.py --quick    # fewer samples
    python bench/serving.py --smoke    # tiny sizes, a few requests: checks the script works (CI)
    python bench/serving.py --only-openai  # (d) alone

Everything runs on the CPU with the `tiny` model (real SD3 pipeline classes, random weights), against
the real server (`bentoml serve`, a subprocess on loopback):

(a) the serving tax: median end-to-end `POST /predict` latency minus the median of the same
    generation called in-process (`generate_images` on the same tiny pipeline, in this process,
    interleaved with the HTTP samples so that both see the same machine load), with the server's
    per-stage breakdown (`timings_ms`). Configurations: the local store with fpng (the service as
    shipped), the local store with Pillow's encoder (fpng hidden), and, when the Object Storage store
    and its fake exist, an OCI Object Storage endpoint on loopback.
(c) the request ledger, on the Object Storage configuration: the store calls each request makes (the
    fake counts them: records against images), and the time of the two record calls a request waits
    on (the conditional create that claims it and the conditional replace that records its answer),
    made through the same SDK client on the same loopback endpoint, against the request's own latency.
(d) the OpenAI route: the same 1024x1024 generation (1 step) through `/predict` and through the `openai` SDK
    on `/v1/images/generations` (the image in base64 JSON), in interleaved pairs; what the OpenAI route adds.
(b) throughput and p50/p95 latency at 1, 2, 4 and 8 closed-loop clients, for the service and for a
    naive baseline (`bench/naive_service`: generate, encode with Pillow's defaults and store, serially
    inside the request), both running at once and measured in interleaved rounds together with the
    in-process generation they are held against. Clients that get 429 wait `Retry-After` and send
    again; the latency counts from the first try.

Writes bench/results/serving.json and bench/results/serving.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SERVICE_DIR = REPO / "sd3-medium"
sys.path[:0] = [str(SERVICE_DIR), str(REPO)]
from machine import describe_machine, machine_line  # noqa: E402

from testbed.server import Server, running_server  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
MD_PREDICT_TIMEOUT_S = 60  # OCI Model Deployment answers 500 to a predict call that takes longer
TARGET_TAX_MS = {"local": 30, "object_storage": 60}
TORCH_THREADS = os.cpu_count() or 1  # the servers and the in-process reference use the same number
os.environ.setdefault("OMP_NUM_THREADS", str(TORCH_THREADS))  # as the servers get it, before torch is imported


@dataclass
class Plan:
    size: int
    steps: int
    samples: int
    throughput_size: int
    throughput_steps: int
    concurrency: list[int]
    requests_per_client: int
    load_rounds: int  # each concurrency level is measured this many times, interleaved with the others
    reference_samples: int  # in-process generations per round
    ledger_requests: int = 20  # sequential requests for (c)
    openai_pairs: int = 15  # for (d)


PLANS = {
    "full": Plan(size=1024, steps=28, samples=7, throughput_size=1024, throughput_steps=4,
                 concurrency=[1, 2, 4, 8], requests_per_client=2, load_rounds=3, reference_samples=3),
    "quick": Plan(size=1024, steps=28, samples=3, throughput_size=1024, throughput_steps=4,
                  concurrency=[1, 2, 4, 8], requests_per_client=2, load_rounds=1, reference_samples=3),
    "smoke": Plan(size=256, steps=2, samples=2, throughput_size=256, throughput_steps=2,
                  concurrency=[1, 2], requests_per_client=2, load_rounds=1, reference_samples=2, ledger_requests=3,
                  openai_pairs=2),
}


# -- servers ----------------------------------------------------------------------------------------

def object_storage_available() -> bool:
    try:
        import sd3_service.storage.object_storage  # noqa: F401
        import testbed.fakes.object_storage  # noqa: F401
    except ImportError:
        return False
    return True


STORES: dict = {}  # store kind -> its loopback fake, while it runs


@contextmanager
def store_environment(store: str, workdir: Path):
    """Environment variables for the server's store; for `object_storage`, a fake OCI endpoint on loopback."""
    if store == "local":
        yield {}
        return
    from testbed.fakes.object_storage import FakeObjectStorage
    from testbed.fakes.oci_common import resource_principal

    credentials = resource_principal(workdir / "oci")  # what Model Deployment gives the container
    with FakeObjectStorage(namespace="benchns", buckets=("images",)) as fake:
        fake.trust(credentials)  # the fake checks every request's signature against this key
        STORES[store] = fake
        yield {**credentials.env, "BUCKET_NAME": "images", "NAMESPACE": "benchns", "OCI_AUTH": "resource_principal",
               "OCI_OBJECT_STORAGE_ENDPOINT": fake.endpoint}


def our_service(workdir: Path, env: dict[str, str] | None = None, hide_fpng: bool = False):
    extra = dict(env or {})
    if hide_fpng:
        extra["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE / "without_fpng"), os.environ.get("PYTHONPATH")]))
    return running_server(workdir, extra, threads=TORCH_THREADS, timeout=300)


def naive_service(workdir: Path):
    path = os.pathsep.join(filter(None, [str(SERVICE_DIR), os.environ.get("PYTHONPATH")]))
    return running_server(workdir, {"PYTHONPATH": path}, target="service:NaiveSD3", cwd=HERE / "naive_service",
                          ready_path="/readyz", threads=TORCH_THREADS, timeout=300)


# -- requests -------------------------------------------------------------------------------------

def body(size: int, steps: int, seed: int) -> dict:
    return {"prompt": PROMPT, "num_inference_steps": steps, "guidance_scale": 7.0, "width": size,
            "height": size, "seed": seed, "request_id": uuid.uuid4().hex}


@dataclass
class Answer:
    status: int
    seconds: float  # from the first try to the final answer
    tries: int
    json: dict | None


def predict(client: httpx.Client, payload: dict, max_tries: int = 20) -> Answer:
    """POST /predict; on 429 wait Retry-After and send again (the same request_id)."""
    began = time.perf_counter()
    for tries in range(1, max_tries + 1):
        response = client.post("/predict", json=payload)
        if response.status_code != 429:
            break
        time.sleep(float(response.headers.get("Retry-After", "1")))
    seconds = time.perf_counter() - began
    data = response.json() if response.headers.get("content-type", "").startswith("application/json") else None
    return Answer(response.status_code, seconds, tries, data)


def median(values) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def percentile(values, fraction: float) -> float | None:
    values = sorted(values)
    if not values:
        return None
    rank = fraction * (len(values) - 1)  # linear interpolation between closest ranks
    low = int(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


# -- (a) the serving tax ----------------------------------------------------------------------------

class InProcess:
    """The same tiny pipeline in this process: the reference the tax is measured against.

    It generates on one dedicated thread, as the engine does. Called from the main thread, the same
    generation ran 4-9 % slower on this 2-core CPU (1421-1429 ms against 1302-1366 ms, 1024x1024,
    4 steps, three runs), which made the service look faster than the pipeline it wraps.
    """

    def __init__(self):
        import torch

        from sd3_service.pipelines.tiny import build_tiny_pipeline

        torch.set_num_threads(TORCH_THREADS)
        self.pipe = build_tiny_pipeline()
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="in-process-gpu")

    def generate(self, payload: dict):
        from sd3_service.pipelines.generation import generate_images, generation_arguments
        from sd3_service.spec import ImageRequest

        request = ImageRequest(**{k: v for k, v in payload.items() if k != "request_id"})

        def timed():
            began = time.perf_counter()
            images = generate_images(self.pipe, seed=payload["seed"], **generation_arguments(request))
            return time.perf_counter() - began, images

        return self.thread.submit(timed).result()


def encoded_sha256(image, pillow: bool) -> str:
    """The sha256 the server reports for this image, encoding as the server does (fpng, or Pillow without it)."""
    from sd3_service.storage import encoding

    fpng = encoding.fpng
    encoding.fpng = None if pillow else fpng
    try:
        return encoding.encode_image(image, "png").sha256
    finally:
        encoding.fpng = fpng


def measure_tax(server: Server, reference: InProcess, plan: Plan, pillow: bool) -> dict:
    """Interleave in-process generations and /predict calls with the same parameters and seeds."""
    in_process, end_to_end, stages, same_image, stored = [], [], [], [], []
    with httpx.Client(base_url=server.url, timeout=600) as client:
        predict(client, body(plan.size, plan.steps, 10_000))  # first call at this size: allocations, caches
        reference.generate(body(plan.size, plan.steps, 10_000))
        for sample in range(plan.samples):
            payload = body(plan.size, plan.steps, sample)
            seconds, images = reference.generate(payload)
            in_process.append(seconds)
            answer = predict(client, payload)
            if answer.status != 200:
                raise RuntimeError(f"/predict answered {answer.status}: {answer.json}")
            end_to_end.append(answer.seconds)
            stages.append(answer.json["timings_ms"])
            # Same weights, seed and parameters: the server's image should be the in-process one.
            same_image.append(answer.json["images"][0]["sha256"] == encoded_sha256(images[0], pillow))
            stored.append(answer.json["images"][0])
    generate_ms = [s["generate"] for s in stages]
    return {
        "samples": plan.samples,
        "in_process_ms": [ms(s) for s in in_process],
        "end_to_end_ms": [ms(s) for s in end_to_end],
        "timings_ms": stages,
        "median_in_process_ms": ms(median(in_process)),
        "median_end_to_end_ms": ms(median(end_to_end)),
        "tax_ms": ms(median(end_to_end) - median(in_process)),
        # Per request, end to end minus the server's own generate time: the same tax without the noise
        # of two different generations.
        "median_overhead_per_request_ms": round(median(e * 1000 - g for e, g in zip(end_to_end, generate_ms)), 1),
        "median_stage_ms": {k: median(s[k] for s in stages) for k in stages[0]},
        "server_image_equals_in_process_image": all(same_image),
        "all_stored": all(image["stored"] for image in stored),
        "example_uri": stored[0]["uri"],
    }


# -- (b) throughput under concurrent clients ---------------------------------------------------------

def run_clients(server: Server, plan: Plan, clients: int) -> tuple[list[Answer], float]:
    """`clients` closed-loop clients, each sending `requests_per_client` requests back to back."""
    answers: list[Answer] = []
    lock = threading.Lock()

    def client_loop(index: int):
        with httpx.Client(base_url=server.url, timeout=600) as client:
            for n in range(plan.requests_per_client):
                answer = predict(client, body(plan.throughput_size, plan.throughput_steps, 1000 * index + n))
                with lock:
                    answers.append(answer)

    began = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers, time.perf_counter() - began


def summarize_load(clients: int, rounds: list[tuple[list[Answer], float]], in_process_ms: float) -> dict:
    """One concurrency level over all its rounds: answers pooled, throughput = answered / wall time."""
    answers = [a for round_answers, _ in rounds for a in round_answers]
    wall = sum(seconds for _, seconds in rounds)
    ok = [a for a in answers if a.status == 200]
    latencies = [a.seconds for a in ok]
    generate_ms = [a.json["timings_ms"]["generate"] for a in ok if a.json and "timings_ms" in a.json]
    throughput = len(ok) / wall
    return {
        "clients": clients, "rounds": len(rounds), "requests": len(answers), "ok": len(ok),
        "failed": len(answers) - len(ok), "statuses": sorted({a.status for a in answers}),
        "retried_after_429": sum(a.tries > 1 for a in answers),
        "over_60s": sum(a.seconds > MD_PREDICT_TIMEOUT_S for a in answers),
        "wall_s": round(wall, 2), "throughput_per_s": round(throughput, 4),
        "throughput_per_round": [round(sum(a.status == 200 for a in r) / s, 4) for r, s in rounds],
        # Against the in-process generations measured in the same rounds: 1.0 = the generator's own rate.
        "x_in_process_rate": round(throughput * in_process_ms / 1000, 3),
        "p50_ms": ms(percentile(latencies, 0.50)), "p95_ms": ms(percentile(latencies, 0.95)),
        "median_generate_ms": median(generate_ms),
        "generator_busy_fraction": round(sum(generate_ms) / 1000 / wall, 3) if generate_ms else None,
    }


def measure_throughput(servers: dict[str, Server], reference: InProcess, plan: Plan) -> tuple[dict, dict]:
    """Every concurrency level, for every server and the in-process reference, in interleaved rounds.

    Each round measures the in-process generation and each server back to back, starting with a
    different one each round: on this shared machine the speed drifts by several percent within a
    minute, and measuring each system in one block of its own put that drift between them.
    """
    for server in servers.values():
        with httpx.Client(base_url=server.url, timeout=600) as client:
            predict(client, body(plan.throughput_size, plan.throughput_steps, 99_999))  # warm at this size
    reference.generate(body(plan.throughput_size, plan.throughput_steps, 99_999))
    order = ["in-process", *servers]
    rows: dict[str, list[dict]] = {name: [] for name in servers}
    reference_rows = []
    for clients in plan.concurrency:
        rounds: dict[str, list] = {name: [] for name in servers}
        in_process: list[float] = []
        for round_index in range(plan.load_rounds):
            shift = round_index % len(order)
            for name in order[shift:] + order[:shift]:
                if name == "in-process":
                    in_process += [reference.generate(body(plan.throughput_size, plan.throughput_steps, 500 + k))[0]
                                   for k in range(plan.reference_samples)]
                else:
                    rounds[name].append(run_clients(servers[name], plan, clients))
        in_process_ms = median(in_process) * 1000
        reference_rows.append({"clients": clients, "in_process_ms": [ms(s) for s in in_process],
                               "median_in_process_ms": round(in_process_ms, 1)})
        for name in servers:
            rows[name].append(summarize_load(clients, rounds[name], in_process_ms))
    all_in_process = [v for row in reference_rows for v in row["in_process_ms"]]
    reference_report = {"per_level": reference_rows, "median_in_process_ms": median(all_in_process),
                        "ideal_per_s": round(1000 / median(all_in_process), 4)}
    return rows, reference_report


# -- report -------------------------------------------------------------------------------------------

def measure_ledger(server: Server, fake, env: dict[str, str], plan: Plan) -> dict:
    """(c): the store calls per request, and the time of the two record calls on its path."""
    from sd3_service.storage.object_storage import ObjectStorageStore

    before = len(fake.requests)
    latencies = []
    with httpx.Client(base_url=server.url, timeout=300) as client:
        for index in range(plan.ledger_requests):
            answer = predict(client, body(256, 1, index))
            assert answer.status == 200, answer.json
            latencies.append(answer.seconds)
    calls = fake.requests[before:]
    records = [call for call in calls if "requests%2F" in call.path]
    kinds: dict[str, int] = {}
    for call in records:
        kind = call.method + (" if-none-match" if "if-none-match" in call.headers else "") + \
            (" if-match" if "if-match" in call.headers else "")
        kinds[kind] = kinds.get(kind, 0) + 1
    example = records[-1].body  # a real record, as the server wrote it last

    # The same two calls from this process, through the same SDK client type, signed the same way.
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        store = ObjectStorageStore(bucket="images", namespace="benchns", endpoint=env["OCI_OBJECT_STORAGE_ENDPOINT"])
        store.check()
        pair_ms = []
        for index in range(max(plan.ledger_requests, 10)):
            name = f"sd3/requests/bench-{uuid.uuid4().hex}.json"
            began = time.perf_counter()
            etag = store.create_record(name, example)
            store.replace_record(name, example, etag)
            pair_ms.append((time.perf_counter() - began) * 1000)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    requests = plan.ledger_requests
    return {"requests": requests, "request_size": "256x256, 1 step", "store_calls_per_request": len(calls) / requests,
            "record_calls_per_request": len(records) / requests, "record_call_kinds": kinds,
            "record_bytes": len(example), "median_record_calls_ms": median(pair_ms),
            "p95_record_calls_ms": percentile(pair_ms, 0.95), "median_request_ms": ms(median(latencies)),
            "record_calls_share_of_request": median(pair_ms) / ms(median(latencies)),
            "targets": {"extra_store_calls": 3, "ms": 20}}


def measure_openai(server: Server, plan: Plan) -> dict:
    """(d): what the OpenAI route adds over /predict for one 1024x1024 image, the image answered in base64 JSON.

    Pairs of the same generation (1 step, so that the generation's own noise stays small) through both routes,
    interleaved, the order alternating; the figure is the median of the per-pair differences."""
    import openai

    size, pairs = 1024, plan.openai_pairs
    native, compatible = [], []
    with httpx.Client(base_url=server.url, timeout=600) as client, \
            openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600) as sdk:
        def through_predict(seed: int) -> float:
            answer = predict(client, {**body(size, 1, seed), "request_id": uuid.uuid4().hex})
            assert answer.status == 200, answer.json
            return answer.seconds

        def through_openai(seed: int) -> float:
            began = time.perf_counter()
            result = sdk.images.generate(prompt=PROMPT, size=f"{size}x{size}",
                                         extra_body={"num_inference_steps": 1, "seed": seed})
            assert result.data[0].b64_json
            return time.perf_counter() - began

        through_predict(0), through_openai(0)  # warm at this size
        for pair in range(pairs):
            seed = 20_000 + pair
            first, second = (through_predict, through_openai) if pair % 2 == 0 else (through_openai, through_predict)
            a, b = first(seed), second(seed)
            (native if first is through_predict else compatible).append(a)
            (compatible if first is through_predict else native).append(b)
    differences = [o - n for o, n in zip(compatible, native)]
    return {"pairs": pairs, "size": f"{size}x{size}, 1 step", "predict_ms": [ms(s) for s in native],
            "openai_ms": [ms(s) for s in compatible], "median_predict_ms": ms(median(native)),
            "median_openai_ms": ms(median(compatible)), "median_added_ms": ms(median(differences)),
            "target_ms": 15}


def print_report(report: dict) -> None:
    plan = report["plan"]
    print(f"\n(a) serving tax, {plan['size']}x{plan['size']}, {plan['steps']} steps, CFG 7, "
          f"median of {plan['samples']} (ms)")
    print(f"  {'configuration':34} {'in-proc':>8} {'e2e':>8} {'tax':>7} {'e2e-gen':>8} {'queue':>6} "
          f"{'gen':>7} {'encode':>7} {'store':>6}  target")
    for name, row in report["serving_tax"].items():
        stage = row["median_stage_ms"]
        target = TARGET_TAX_MS.get(row["store"])
        print(f"  {name:34} {row['median_in_process_ms']:8.0f} {row['median_end_to_end_ms']:8.0f} "
              f"{row['tax_ms']:7.0f} {row['median_overhead_per_request_ms']:8.0f} {stage['queue']:6.0f} "
              f"{stage['generate']:7.0f} {stage['encode']:7.0f} {stage['store']:6.0f}  <= {target}")
    ledger = report.get("ledger")
    if ledger:
        print(f"\n(c) the request ledger, Object Storage on loopback, {ledger['requests']} sequential requests "
              f"({ledger['request_size']})")
        print(f"  store calls per request {ledger['store_calls_per_request']:.1f}, of them record calls "
              f"{ledger['record_calls_per_request']:.1f} {ledger['record_call_kinds']} (target <= "
              f"{ledger['targets']['extra_store_calls']} plus renewals)")
        print(f"  the two record calls: median {ledger['median_record_calls_ms']:.1f} ms, p95 "
              f"{ledger['p95_record_calls_ms']:.1f} ms (target <= {ledger['targets']['ms']}); "
              f"{ledger['record_calls_share_of_request']:.1%} of the median request ({ledger['median_request_ms']:.0f} ms)")
    openai_row = report.get("openai")
    if openai_row:
        print(f"\n(d) the OpenAI route over /predict, {openai_row['size']}, base64 in JSON, {openai_row['pairs']} "
              f"interleaved pairs: /predict {openai_row['median_predict_ms']:.0f} ms, OpenAI "
              f"{openai_row['median_openai_ms']:.0f} ms, added {openai_row['median_added_ms']:.1f} ms per image "
              f"(target <= {openai_row['target_ms']})")
    print(f"\n(b) throughput, {plan['throughput_size']}x{plan['throughput_size']}, {plan['throughput_steps']} steps, "
          f"CFG 7, {plan['load_rounds']} interleaved round(s) of {plan['requests_per_client']} requests per client; "
          f"in-process generation {report['throughput_reference']['median_in_process_ms']:.0f} ms (1/gen = "
          f"{report['throughput_reference']['ideal_per_s']:.3f}/s); x 1/gen is against the in-process "
          f"generations of the same rounds")
    print(f"  {'system':8} {'clients':>7} {'ok/sent':>8} {'429s':>5} {'img/s':>7} {'x 1/gen':>8} {'p50 ms':>8} "
          f"{'p95 ms':>8} {'gen busy':>8}")
    for system, rows in report["throughput"].items():
        for row in rows:
            busy = "" if row["generator_busy_fraction"] is None else f"{row['generator_busy_fraction']:.2f}"
            print(f"  {system:8} {row['clients']:7d} {row['ok']:>4}/{row['requests']:<3} "
                  f"{row['retried_after_429']:5d} {row['throughput_per_s']:7.3f} "
                  f"{row['x_in_process_rate']:8.2f} {row['p50_ms']:8.0f} {row['p95_ms']:8.0f} {busy:>8}")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tax_ax, rate_ax, latency_ax) = plt.subplots(1, 3, figsize=(16, 4.8))
    names = list(report["serving_tax"])
    rows = [report["serving_tax"][n] for n in names]
    x = range(len(names))
    tax_ax.bar([i - 0.2 for i in x], [r["tax_ms"] for r in rows], 0.4, label="median e2e - median in-process")
    tax_ax.bar([i + 0.2 for i in x], [r["median_overhead_per_request_ms"] for r in rows], 0.4,
               label="median per request (e2e - server generate)")
    tax_ax.bar([i + 0.2 for i in x], [r["median_stage_ms"]["encode"] for r in rows], 0.4, fill=False,
               hatch="//", label="of which encode")
    for target in sorted(set(TARGET_TAX_MS.values())):
        tax_ax.axhline(target, color="grey", linestyle=":", linewidth=1)
    tax_ax.set_xticks(list(x), [n.replace(", ", "\n") for n in names], fontsize=8)
    tax_ax.set_ylabel("ms per request")
    plan = report["plan"]
    tax_ax.set_title(f"serving tax, {plan['size']}², {plan['steps']} steps (targets dotted)")
    tax_ax.axhline(0, color="black", linewidth=0.6)
    tax_ax.legend(fontsize=7, loc="upper left")

    ideal = report["throughput_reference"]["ideal_per_s"]
    for (system, rows), color in zip(report["throughput"].items(), ("tab:blue", "tab:orange")):
        clients = [r["clients"] for r in rows]
        rate_ax.plot(clients, [r["throughput_per_s"] for r in rows], marker="o", color=color, label=system)
        latency_ax.plot(clients, [r["p50_ms"] / 1000 for r in rows], marker="o", color=color, label=f"{system} p50")
        latency_ax.plot(clients, [r["p95_ms"] / 1000 for r in rows], marker="x", linestyle="--", color=color,
                        label=f"{system} p95")
    rate_ax.axhline(ideal, color="grey", linestyle=":", label="1 / in-process generation")
    rate_ax.axhline(0.95 * ideal, color="grey", linestyle="--", linewidth=0.8, label="0.95 x that")
    for ax in (rate_ax, latency_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(plan["concurrency"], [str(c) for c in plan["concurrency"]])
        ax.set_xlabel("concurrent clients")
        ax.legend(fontsize=7)
    rate_ax.set_ylim(bottom=0)
    rate_ax.set_ylabel("images / s")
    rate_ax.set_title(f"throughput, {plan['throughput_size']}², {plan['throughput_steps']} steps")
    latency_ax.set_ylabel("latency, s")
    latency_ax.set_title("latency under load")
    fig.suptitle(f"tiny SD3 on CPU: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
                 f"load at start {report['machine']['load_average_1_5_15']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure_openai_only(plan: Plan, args, machine: dict, started: float) -> dict:
    """(d) alone: the service as shipped (local store, fpng), the same image through both routes."""
    with tempfile.TemporaryDirectory(prefix="sd3-bench-") as tmp, our_service(Path(tmp) / "service") as server:
        report = {"benchmark": "serving (d) only", "plan_name": args.plan or "full", "plan": plan.__dict__,
                  "machine": machine, "openai": measure_openai(server, plan)}
    row = report["openai"]
    report["run_seconds"] = round(time.perf_counter() - started, 1)
    print(f"\n(d) the OpenAI route over /predict, {row['size']}, base64 in JSON, {row['pairs']} interleaved pairs: "
          f"/predict {row['median_predict_ms']:.0f} ms, OpenAI {row['median_openai_ms']:.0f} ms, added "
          f"{row['median_added_ms']:.1f} ms per image (target <= {row['target_ms']})")
    path = args.out_dir / f"{args.name or 'serving-openai'}.json"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="plan", const="quick", help="fewer samples")
    mode.add_argument("--smoke", action="store_const", dest="plan", const="smoke",
                      help="tiny sizes and a few requests: checks that the benchmark works")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--name", default=None, help="result file stem (default serving, or serving-smoke)")
    parser.add_argument("--skip-pillow", action="store_true", help="do not measure the Pillow-encoder server")
    parser.add_argument("--only-openai", action="store_true", help="measure only (d), the OpenAI route's cost")
    args = parser.parse_args(argv)
    plan_name = args.plan or "full"
    plan = PLANS[plan_name]
    stem = args.name or ("serving" if plan_name != "smoke" else "serving-smoke")

    machine = describe_machine()
    print(machine_line(machine))
    print(f"plan {plan_name}: {plan}")
    started = time.perf_counter()
    if args.only_openai:
        return measure_openai_only(plan, args, machine, started)
    reference = InProcess()
    report = {"benchmark": "serving", "plan_name": plan_name, "plan": plan.__dict__, "machine": machine,
              "torch_threads": TORCH_THREADS,
              "model": "tiny (random weights, real SD3 pipeline classes), CPU float32",
              "serving_tax": {}, "throughput": {}}

    configurations = [("service, local store, fpng", "local", False)]
    if not args.skip_pillow:
        configurations.append(("service, local store, Pillow PNG", "local", True))
    if object_storage_available():
        configurations.append(("service, Object Storage (loopback), fpng", "object_storage", False))
    else:
        report["object_storage_skipped"] = "sd3_service/storage/object_storage.py or testbed/fakes/object_storage.py missing"
        print("Object Storage configuration skipped: its store or fake is not there yet")

    with tempfile.TemporaryDirectory(prefix="sd3-bench-") as tmp:
        tmp = Path(tmp)
        for index, (name, store, hide_fpng) in enumerate(configurations):
            print(f"(a) {name} ...", flush=True)
            with store_environment(store, tmp / f"store{index}") as env, \
                    our_service(tmp / f"service{index}", env, hide_fpng) as server:
                report["serving_tax"][name] = {"store": store, "png_encoder": "pillow" if hide_fpng else "fpng",
                                               **measure_tax(server, reference, plan, hide_fpng)}
                if store == "object_storage":
                    print("(c) the request ledger ...", flush=True)
                    report["ledger"] = measure_ledger(server, STORES[store], env, plan)
                if index == 0:  # the service as shipped (local store, fpng): the OpenAI route's cost too
                    print("(d) the OpenAI route against /predict ...", flush=True)
                    report["openai"] = measure_openai(server, plan)
                if index == 0:  # the service as shipped (local store, fpng): also under load, beside the naive one
                    print("(b) service, naive baseline and in-process reference under load, interleaved ...",
                          flush=True)
                    with naive_service(tmp / "load-naive") as naive:
                        report["throughput"], report["throughput_reference"] = measure_throughput(
                            {"service": server, "naive": naive}, reference, plan)

    report["load_average_at_end"] = describe_machine(())["load_average_1_5_15"]
    report["run_seconds"] = round(time.perf_counter() - started, 1)
    print_report(report)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out_dir / f"{stem}.json", args.out_dir / f"{stem}.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, png_path)
    print(f"\nwrote {json_path} and {png_path} ({report['run_seconds']:.0f} s; load at end "
          f"{report['load_average_at_end']})")
    return report


if __name__ == "__main__":
    main()
