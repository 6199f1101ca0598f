"""Fixtures of the integration tests: real servers (`testbed/server.py`), shared where their settings allow."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.fakes import oci_common
from testbed.fakes.object_storage import FakeObjectStorage
from testbed.loras import make_adapter
from testbed.server import Server, start_server, stop_server

LORA_MAX_BYTES = 64 * 1024  # the tiny model's adapters are ~6 KB


@dataclass
class Adapters:
    """The adapters the servers may use: a catalog folder, and a loopback bucket with the credential to read it."""

    catalog: Path
    bucket: FakeObjectStorage
    env: dict[str, str]  # what a server needs to use both


@pytest.fixture(scope="session")
def adapters(tmp_path_factory) -> Adapters:
    """Small LoRA adapters of the tiny model, made with peft and saved by diffusers: `ink` and `wave` in a catalog;
    in a bucket the service reads as its resource principal (`oci://adapters@tenancyns/styles/...`), `cloud`,
    `ink-old` (ink's weights under diffusers' older names) and `prose` (adapting the text encoders too)."""
    folder = tmp_path_factory.mktemp("loras")
    make_adapter(folder / "catalog" / "ink.safetensors", seed=1)
    make_adapter(folder / "catalog" / "wave.safetensors", seed=2)
    cloud = make_adapter(folder / "cloud.safetensors", seed=3)
    with FakeObjectStorage(namespace="tenancyns", buckets=("adapters", "elsewhere")) as bucket:
        bucket.add_object("adapters", "styles/cloud.safetensors", cloud.read_bytes())
        for name, made in (("ink-old", make_adapter(folder / "ink-old.safetensors", seed=1, form="diffusers-old")),
                           ("prose", make_adapter(folder / "prose.safetensors", seed=4, text_encoders=True))):
            bucket.add_object("adapters", f"styles/{name}.safetensors", made.read_bytes())
        principal = bucket.trust(oci_common.resource_principal(folder / "rp"))
        env = {**principal.env, "LORA_DIR": str(folder / "catalog"), "LORA_BUCKETS": "adapters",
               "OCI_OBJECT_STORAGE_ENDPOINT": bucket.endpoint, "NAMESPACE": "tenancyns",
               "LORA_MAX_BYTES": str(LORA_MAX_BYTES)}
        yield Adapters(folder / "catalog", bucket, env)


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    """One tiny-model server shared by the read-mostly integration tests; it holds requests at gates on demand, and
    its OpenAI surface answers to `dall-e-3` as well as the model's own id (`SERVED_MODEL_NAMES`), a streamed
    answer says it is alive after a second of silence (`STREAM_KEEPALIVE_SECONDS`), and webhooks may go to a few
    hosts, over https only, never to a private address."""
    running = start_server(tmp_path_factory.mktemp("server"), {
        "SERVED_MODEL_NAMES": "sd3-tiny,dall-e-3", "STREAM_KEEPALIVE_SECONDS": "1",
        # webhooks allowed to these hosts, over https only, and to no private address (test_webhooks.py)
        "WEBHOOK_SECRET": "whsec_" + "c2VydmVyLXNlY3JldC1mb3ItdGVzdHM=",
        "WEBHOOK_HOSTS": "hooks.example.com,localhost,169.254.169.254,10.0.0.8"}, gates=True)
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def pool(tmp_path_factory, adapters) -> Server:
    """A server with two devices (`SD3_DEVICE=cpu,cpu`, two tiny pipelines, one shared queue), shared by the pool,
    metrics, LoRA and OpenAI retry tests; it answers a waiting caller after 5 s (`SYNC_WAIT_SECONDS`), logs JSON,
    keeps a parameters sidecar beside each image, renews a lease every second (`LEASE_SECONDS=3`), takes the
    `adapters`."""
    tmp = tmp_path_factory.mktemp("pool")
    running = start_server(tmp, {"SD3_DEVICE": "cpu,cpu", "SYNC_WAIT_SECONDS": "5", "LOG_FORMAT": "json",
                                 "LEASE_SECONDS": "3",
                                 "STORE_PARAMS": "true", "LORA_CACHE_DIR": str(tmp / "lora-cache"), **adapters.env},
                           gates=True)
    yield running
    stop_server(running)


@pytest.fixture
def make_server(tmp_path):
    """Start extra servers with their own settings; all are stopped after the test."""
    started: list[Server] = []

    def make(env: dict[str, str] | None = None, wait_ready: bool = True, **options) -> Server:
        started.append(start_server(tmp_path / f"server{len(started)}", env, wait_ready=wait_ready, **options))
        return started[-1]

    yield make
    for running in started:
        stop_server(running)


@pytest.fixture
def healthy_fake(fake):
    """No fault injected into the module's Object Storage fake (`fake`) before the test, nor left after it."""
    fake.restore()
    yield
    fake.restore()
