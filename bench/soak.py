"""A soak with faults: two instances on one loopback bucket, mixed traffic on both API surfaces for a set time,
a store outage in the middle, and one instance killed (SIGKILL, server and worker) and restarted.

    python bench/soak.py                  # 10 minutes of traffic
    python bench/soak.py --minutes 1.5    # what `bash dev.sh bench` runs (benchcheck/test_soak.py)

Both instances are `bentoml serve` with the tiny model, storing images and request records in the loopback
Object Storage fake (testbed/fakes, every call signed as a resource principal), with a short lease (3 s).
Two client threads send, round robin, to both instances: text to image, image to image, inpainting, a LoRA
adapter from the bucket, `wait: false` polled on the other instance, the OpenAI route with an
Idempotency-Key, repeats of answered ids on the other instance, and bad input. From 30% to 50% of the time
every Object Storage call fails (503); at 60% instance B is killed, the ids it held are sent to A (which takes
them over after their lease), and B is restarted on the same spool.

It reports: answered / sent by status; 5xx answers (0 expected), with connection errors to the killed
instance counted on their own; images lost (every image an answer named is read back from the bucket once
the spools are empty: 0 expected); generations per id (1, or 2 for an id taken over, which the log names);
each worker's RSS at start and end and its slope; open file descriptors; and the longest time a running
request's record went without a lease renewal. Writes bench/results/soak.json (soak-short.json for runs
under 5 minutes) and prints a table.
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import io
import itertools
import json
import re
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "sd3-medium"), str(HERE.parent)]
from machine import describe_machine, save_report  # noqa: E402

SMALL = {"width": 256, "height": 256, "num_inference_steps": 2}
LEASE_SECONDS = 3.0
ADAPTER = "oci://images@soakns/adapters/style.safetensors"


def png(seed: int, mask: bool = False) -> str:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    if mask:
        pixels[:, :128] = 255
        pixels[:, 128:] = 0
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class Soak:
    """The two instances, the traffic, and what was seen of it."""

    def __init__(self, minutes: float, workdir: Path):
        from testbed.fakes import oci_common
        from testbed.fakes.object_storage import FakeObjectStorage
        from testbed.loras import make_adapter

        self.seconds = minutes * 60
        self.workdir = workdir
        self.bucket = FakeObjectStorage(namespace="soakns", buckets=("images",)).start()
        self.bucket.add_object("images", "adapters/style.safetensors",
                               make_adapter(workdir / "style.safetensors", seed=7).read_bytes())
        principal = self.bucket.trust(oci_common.resource_principal(workdir / "rp"))
        self.env = {**principal.env, "BUCKET_NAME": "images", "NAMESPACE": "soakns",
                    "OCI_OBJECT_STORAGE_ENDPOINT": self.bucket.endpoint, "STORE_TIMEOUT_SECONDS": "4",
                    "LEASE_SECONDS": str(LEASE_SECONDS), "SYNC_WAIT_SECONDS": "5", "LEDGER_PAUSE_SECONDS": "1",
                    "LORA_BUCKETS": "images", "LORA_MAX_BYTES": str(1 << 20)}
        self.servers: dict[str, object] = {}
        self.logs: list[Path] = []
        self.lock = threading.Lock()
        self.statuses: collections.Counter = collections.Counter()  # (surface, kind, status)
        self.connection_errors: collections.Counter = collections.Counter()  # "instance: error" -> count
        self.retried: collections.Counter = collections.Counter()  # 503 code -> answers retried after Retry-After
        self.answers: dict[str, dict] = {}  # request id -> its first answer (native shape)
        self.repeat_mismatches: list[str] = []
        self.in_flight: dict[str, tuple[str, dict]] = {}  # request id -> (instance, body) while sent
        self.lost_with_the_kill: list[tuple[str, dict]] = []
        self.rss: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
        self.fds: dict[str, list[int]] = collections.defaultdict(list)
        self.longest_without_renewal = 0.0
        self.events: list[tuple[float, str]] = []
        self.started = 0.0
        self.stop = threading.Event()
        self.down: dict[str, bool] = {}
        self.generation: dict[str, int] = {}  # instance -> how many times it was restarted

    # -- instances

    def start(self, name: str, generation: int = 0):
        from testbed.server import start_server

        tmp = self.workdir / f"{name}{generation}"
        server = start_server(tmp, {**self.env, "SPOOL_DIR": str(self.workdir / f"spool-{name}")}, timeout=300)
        self.servers[name] = server
        self.generation[name] = generation
        self.logs.append(server.log_path)
        return server

    def worker(self, name: str):
        import psutil

        try:
            children = psutil.Process(self.servers[name].process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        return max(children, key=lambda process: process.memory_info().rss, default=None)

    def kill(self, name: str) -> None:
        import psutil

        tree = psutil.Process(self.servers[name].process.pid)
        processes = [*tree.children(recursive=True), tree]
        for process in processes:  # the worker has a session of its own: the whole tree, worker first
            process.kill()
        psutil.wait_procs(processes, timeout=30)
        self.servers[name].process.wait(30)

    # -- traffic

    def send(self, name: str, kind: str, n: int) -> None:
        other = "a" if name == "b" else "b"
        request_id = f"soak-{kind}-{n}-{uuid.uuid4().hex[:6]}"
        bodies = {
            "txt2img": {"prompt": f"a harbour {n}", "seed": n, **SMALL},
            "img2img": {"prompt": f"a kite {n}", "image": png(n), "strength": 0.6, **SMALL},
            "inpaint": {"prompt": f"a door {n}", "image": png(n), "mask_image": png(n, mask=True), **SMALL},
            "lora": {"prompt": f"a fox {n}", "loras": [{"name": ADAPTER, "scale": 0.8}], **SMALL},
            "polled": {"prompt": f"a lamp {n}", "wait": False, **SMALL},
            "bad": {"prompt": "a", "width": 7},
        }
        if kind == "openai":
            self.openai(name, request_id, n)
        elif kind == "repeat":
            with self.lock:
                done = [rid for rid, answer in self.answers.items() if answer.get("body")]
            if done:
                rid = done[n % len(done)]
                self.native(other, "repeat", {**self.answers[rid]["body"], "request_id": rid}, rid)
        else:
            body = {**bodies[kind], "request_id": request_id}
            self.native(name, kind, body, request_id, poll_on=other if kind == "polled" else None)

    def native(self, name: str, kind: str, body: dict, request_id: str, poll_on: str | None = None) -> None:
        import httpx

        server = self.servers[name]
        with self.lock:
            self.in_flight[request_id] = (name, body)
        try:
            response = self.retrying(lambda: httpx.post(server.url + "/predict", json=body, timeout=120))
            if response.status_code == 202 and poll_on is not None:
                name = poll_on
                response = self.poll(poll_on, request_id)
        except httpx.TransportError as exc:
            with self.lock:
                self.connection_errors[f"{name}: {type(exc).__name__}"] += 1
                if kind != "bad":
                    self.lost_with_the_kill.append((request_id, body))
            return
        finally:
            with self.lock:
                self.in_flight.pop(request_id, None)
        self.seen("native", kind, response.status_code)
        if response.status_code == 200:
            self.answered(request_id, response.json(), body)

    def poll(self, name: str, request_id: str, timeout: float = 300):
        import httpx

        deadline = time.monotonic() + timeout
        url = self.servers[name].url + "/predict"
        while True:  # a poller keeps polling through an outage (503 with Retry-After) until its own deadline
            response = self.retrying(lambda: httpx.post(url, json={"request_id": request_id}, timeout=60),
                                     attempts=30)
            if response.status_code != 202 or time.monotonic() > deadline:
                return response
            time.sleep(0.3)

    def retrying(self, send, attempts: int = 5):
        """`send()` again after `Retry-After` while it answers 503 with one, as a well-behaved client does (the
        retries are counted)."""
        for attempt in range(attempts):
            response = send()
            if response.status_code != 503 or "retry-after" not in response.headers or attempt == attempts - 1:
                return response
            with self.lock:
                self.retried[response.json().get("error", {}).get("code", "?")] += 1
            time.sleep(min(float(response.headers["retry-after"]), 10))
        return response

    def openai(self, name: str, key: str, n: int) -> None:
        import httpx

        body = {"prompt": f"a lighthouse {n}", "size": "256x256", "num_inference_steps": 2, "seed": n}
        url = self.servers[name].url + "/v1/images/generations"
        try:
            for _ in range(10):  # as the SDK does: the same key again while the answer is not ready (409)
                response = self.retrying(lambda: httpx.post(url, json=body, timeout=120,
                                                            headers={"Idempotency-Key": key}))
                if response.status_code != 409:
                    break
                time.sleep(float(response.headers.get("retry-after", "1")))
        except httpx.TransportError as exc:
            with self.lock:
                self.connection_errors[f"{name}: {type(exc).__name__}"] += 1
            return
        self.seen("openai", "generate", response.status_code)

    def seen(self, surface: str, kind: str, status: int) -> None:
        with self.lock:
            self.statuses[(surface, kind, status)] += 1

    def answered(self, request_id: str, answer: dict, body: dict) -> None:
        shas = [image["sha256"] for image in answer["images"]]
        with self.lock:
            first = self.answers.setdefault(request_id, {"shas": shas, "images": answer["images"],
                                                         "body": None if body.get("wait") is False else body})
            if first["shas"] != shas:
                self.repeat_mismatches.append(request_id)

    def client(self, index: int) -> None:
        kinds = ["txt2img", "img2img", "inpaint", "lora", "polled", "openai", "repeat", "bad"]
        for n in itertools.count(index * 100_000):
            if self.stop.is_set():
                return
            name = "ab"[n % 2]  # b too while it is down: its callers see their connections refused
            try:
                self.send(name, kinds[n % len(kinds)], n)
            except Exception as exc:  # noqa: BLE001 - the soak goes on; what broke is counted
                self.seen("client", type(exc).__name__, 0)

    def monitor(self) -> None:
        """Every 2 s: each worker's RSS and open files, and how long a running request went without renewal."""
        while not self.stop.wait(2):
            now = time.monotonic() - self.started
            for name in ("a", "b"):
                worker = self.worker(name) if not self.down.get(name) else None
                try:
                    if worker is not None:
                        key = f"{name}{self.generation[name]}"  # b0, then b1 after the restart
                        self.rss[key].append((now, worker.memory_info().rss / 1e6))
                        self.fds[key].append(worker.num_fds())
                except Exception:  # noqa: BLE001 - the worker was just killed
                    pass
            wall = time.time()
            for object_name in self.bucket.names("images"):
                stored = self.bucket.object("images", object_name) if "/requests/" in object_name else None
                if stored is None:
                    continue
                record = json.loads(stored.data)
                if record.get("state") == "running":
                    since = wall - (record["lease_expires"] - LEASE_SECONDS)
                    self.longest_without_renewal = max(self.longest_without_renewal, since)

    # -- the run

    def run(self) -> dict:
        self.start("a")
        self.start("b")
        self.started = time.monotonic()
        at = lambda fraction: self.started + self.seconds * fraction  # noqa: E731
        threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(2)]
        threads.append(threading.Thread(target=self.monitor, daemon=True))
        for thread in threads:
            thread.start()
        self.sleep_until(at(0.3))
        self.event("store outage: every Object Storage call answers 503")
        self.bucket.outage(503)
        self.sleep_until(at(0.5))
        self.bucket.restore()
        self.event("store back")
        self.sleep_until(at(0.6))
        with self.lock:
            held_by_b = [(rid, body) for rid, (name, body) in self.in_flight.items() if name == "b"]
        self.event(f"SIGKILL instance b (server and worker), {len(held_by_b)} request(s) in flight on it")
        self.kill("b")
        self.down["b"] = True
        for rid, body in held_by_b:  # their callers send them again, to the instance left
            threading.Thread(target=self.native, args=("a", "resent", {**body, "wait": True}, rid),
                             daemon=True).start()
        self.start("b", generation=1)
        self.down["b"] = False
        self.event("instance b restarted")
        self.sleep_until(at(1.0))
        self.stop.set()
        for thread in threads:
            thread.join(180)
        with self.lock:
            lost = list(self.lost_with_the_kill)
        for rid, body in lost:  # what the kill cut off, sent again once: answered from the record or taken over
            self.native("a", "resent", {**body, "wait": True}, rid)
        return self.report()

    def sleep_until(self, moment: float) -> None:
        self.stop.wait(max(0.0, moment - time.monotonic()))

    def event(self, what: str) -> None:
        self.events.append((round(time.monotonic() - self.started, 1), what))
        print(f"  {self.events[-1][0]:7.1f} s  {what}", flush=True)

    def recovered(self, timeout: float = 180) -> bool:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spooled = [httpx.get(server.url + "/health", timeout=30).json()["store"].get("spooled", 0)
                       for server in self.servers.values()]
            if not any(spooled):
                return True
            time.sleep(1)
        return False

    def report(self) -> dict:
        recovered = self.recovered()
        lost = []
        for rid, answer in self.answers.items():
            for image in answer["images"]:
                stored = self.bucket.object("images", image["object_name"])
                if stored is None or hashlib.sha256(stored.data).hexdigest() != image["sha256"]:
                    lost.append(image["object_name"])
        log = "\n".join(path.read_text(errors="replace") for path in self.logs)
        generations = collections.Counter(re.findall(r"\[(soak-[\w-]+)\] Generating on", log))
        taken_over = set(re.findall(r"\[(soak-[\w-]+)\] Took over from", log))
        unclaimed = set(re.findall(r"\[(soak-[\w-]+)\] (?:The ledger's store failed moments ago|Cannot claim)", log))
        per_id = collections.Counter(generations.values())
        more_than_once = {rid: count for rid, count in generations.items() if count > 1}
        statuses = collections.Counter()
        for (surface, kind, status), count in self.statuses.items():
            statuses[str(status)] += count
        report = {
            "benchmark": "soak", "machine": describe_machine(), "minutes": round(self.seconds / 60, 2),
            "events": self.events,
            "answered_by_status": dict(sorted(statuses.items())),
            "by_kind": {f"{surface} {kind} {status}": count
                        for (surface, kind, status), count in sorted(self.statuses.items())},
            "sent": sum(self.statuses.values()) + sum(self.connection_errors.values()),
            "5xx": sum(count for (_, _, status), count in self.statuses.items() if status >= 500),
            "connection_errors": dict(self.connection_errors),
            "503_retried_after_retry_after": dict(self.retried),
            "spools_empty_after": recovered,
            "images_answered": sum(len(answer["images"]) for answer in self.answers.values()),
            "images_lost": len(lost), "lost": lost[:10],
            "repeats_with_other_images": len(self.repeat_mismatches),
            "generations_per_id": {str(count): ids for count, ids in sorted(per_id.items())},
            "generated_more_than_once": {rid: {"generations": count, "taken_over": rid in taken_over,
                                               "served_unclaimed_in_the_outage": rid in unclaimed}
                                         for rid, count in more_than_once.items()},
            "workers": {name: self.worker_figures(name) for name in sorted(self.rss)},
            "longest_without_lease_renewal_s": round(self.longest_without_renewal, 2),
            "lease_seconds": LEASE_SECONDS,
        }
        return report

    def worker_figures(self, name: str) -> dict:
        samples = self.rss[name]
        if len(samples) < 2:
            return {}
        times, values = zip(*samples)
        mean_t, mean_v = sum(times) / len(times), sum(values) / len(values)
        slope = sum((t - mean_t) * (v - mean_v) for t, v in samples) / max(1e-9, sum((t - mean_t) ** 2 for t in times))
        return {"rss_mb_start": round(values[0], 1), "rss_mb_end": round(values[-1], 1),
                "rss_mb_max": round(max(values), 1), "rss_slope_mb_per_minute": round(slope * 60, 2),
                "open_fds_start": self.fds[name][0], "open_fds_end": self.fds[name][-1],
                "open_fds_max": max(self.fds[name])}

    def close(self) -> None:
        from testbed.server import stop_server

        for server in self.servers.values():
            stop_server(server)
        self.bucket.stop()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the traffic runs (default 10)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or HERE / "results" / ("soak.json" if args.minutes >= 5 else "soak-short.json")
    with tempfile.TemporaryDirectory(prefix="sd3-soak-") as tmp:
        soak = Soak(args.minutes, Path(tmp))
        try:
            print(f"soak: {args.minutes} min of traffic on two instances, one bucket", flush=True)
            report = soak.run()
        finally:
            soak.close()
    print(f"\nSoak, {report['minutes']} min, two instances on one loopback bucket:")
    print(f"  sent {report['sent']}; answered by status {report['answered_by_status']}")
    print(f"  5xx answers: {report['5xx']}; connection errors: {report['connection_errors']}; 503s retried after "
          f"their Retry-After: {report['503_retried_after_retry_after']}")
    print(f"  images answered {report['images_answered']}, lost {report['images_lost']} "
          f"(spools empty after: {report['spools_empty_after']}); repeats with other images: "
          f"{report['repeats_with_other_images']}")
    print(f"  generations per id: {report['generations_per_id']}; more than once: "
          f"{report['generated_more_than_once']}")
    for name, figures in report["workers"].items():
        print(f"  worker {name}: {figures}")
    print(f"  longest a running request went without a lease renewal: {report['longest_without_lease_renewal_s']} s "
          f"(lease {LEASE_SECONDS} s)\n")
    save_report(report, out)
    return report


if __name__ == "__main__":
    main()
