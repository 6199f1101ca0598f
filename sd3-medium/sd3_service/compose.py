"""The composition root: the engine and its parts, as the settings describe them.

`ModelLoaders` is the seam for the model: production finds the devices, reads the weights and places a
pipeline on each device (`pipelines/loading.py`); a benchmark hands in loaders of its own (a stand-in
pipeline) and gets the rest of the service unchanged.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sd3_service.engine import Engine
from sd3_service.inputs import InputReader
from sd3_service.jobs.book import JobBook
from sd3_service.jobs.ledger import Ledger
from sd3_service.jobs.lifecycle import Lifecycle
from sd3_service.lora_library import AdapterCache, LoraLibrary
from sd3_service.pipelines.devices import DevicePool
from sd3_service.pipelines.loading import LoadedPipeline, LoadedWeights, load_weights, place_pipeline, resolve_devices
from sd3_service.settings import Settings
from sd3_service.storage.records import LocalRecords
from sd3_service.storage.writer import ImageWriter
from sd3_service.vault import read_vault_secret
from sd3_service.webhooks import WebhookPolicy, Webhooks

IO_THREADS = 4  # read inputs, encode and store images
LEDGER_THREADS = 2  # the ledger's record calls (claims, renewals, answers), apart from the I/O threads


def find_devices(settings: Settings) -> list[str]:
    import torch  # slow to import: the pool calls this on its loading thread, once the server answers

    return resolve_devices(settings.sd3_device, torch.cuda.device_count())


@dataclass(frozen=True)
class ModelLoaders:
    """How the device pool gets its pipelines (each called on the pool's loading thread)."""

    find_devices: Callable[[Settings], list[str]] = find_devices
    load_weights: Callable[[Settings, list[str]], LoadedWeights] = load_weights
    place: Callable[[LoadedWeights, str, Settings, bool], LoadedPipeline] = place_pipeline


def build_engine(settings: Settings, loaders: ModelLoaders = ModelLoaders()) -> Engine:
    """The engine as the settings describe it: devices, model, store, ledger."""
    pool = DevicePool(find_devices=lambda: loaders.find_devices(settings),
                      load_weights=lambda devices: loaders.load_weights(settings, devices),
                      place=lambda weights, device, copy: loaders.place(weights, device, settings, copy),
                      max_queue=settings.max_queue)
    writer = ImageWriter.from_settings(settings)
    reader = object_reader(settings, writer) if settings.allowed_input_buckets | settings.allowed_lora_buckets else None
    inputs = InputReader(settings.allowed_input_buckets, reader)
    loras = LoraLibrary(settings.lora_catalog, AdapterCache(settings.lora_cache_dir, settings.lora_cache_max_bytes),
                        settings.allowed_lora_buckets, reader, settings.lora_max_bytes, modules=pool.lora_modules,
                        loaded=lambda: {sha256 for held in pool.loaded_loras().values() for sha256 in held})
    return assemble(pool, writer, build_ledger(settings, writer), inputs, loras,
                    sync_wait_seconds=settings.sync_wait_seconds, max_jobs=settings.max_jobs,
                    keep_text=settings.store_params, cache_size=settings.idempotency_cache_size,
                    ledger_pause_seconds=settings.ledger_pause_seconds, webhooks=build_webhooks(settings))


def build_webhooks(settings: Settings) -> Webhooks | None:
    """The webhook sender, when a secret signs them (`WEBHOOK_SECRET`, or the Vault secret WEBHOOK_SECRET_OCID names,
    read now with the service's own credentials); None sends none (a request with `webhook` is then refused)."""
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    if settings.webhook_secret_ocid:
        secret = read_vault_secret(settings, settings.webhook_secret_ocid)
    if not secret:
        return None
    policy = WebhookPolicy(hosts=settings.allowed_webhook_hosts, allow_http=settings.webhook_allow_http,
                           allow_private=settings.webhook_allow_private, signing=True)
    return Webhooks(policy, secret, settings.spool_dir / "webhooks", settings.webhook_retry_seconds,
                    hold_slack=settings.lease_seconds)


def assemble(pool: DevicePool, writer: ImageWriter, ledger: Ledger | None = None, inputs: InputReader | None = None,
             loras: LoraLibrary | None = None, sync_wait_seconds: float = 50.0, max_jobs: int = 64,
             keep_text: bool = False, cache_size: int = 1024, ledger_pause_seconds: float = 10.0,
             webhooks: Webhooks | None = None) -> Engine:
    """An engine over a pool and a writer (and a ledger: None serves from this process's memory only)."""
    io = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="sd3-io")
    records_io = ThreadPoolExecutor(max_workers=LEDGER_THREADS, thread_name_prefix="sd3-ledger")
    lifecycle = Lifecycle(JobBook(cache_size), ledger, writer.store, records_io, max_jobs=max_jobs,
                          pause_seconds=ledger_pause_seconds)
    return Engine(pool, writer, lifecycle, io, inputs=inputs, loras=loras, sync_wait_seconds=sync_wait_seconds,
                  keep_text=keep_text, webhooks=webhooks)


def build_ledger(settings: Settings, writer: ImageWriter) -> Ledger:
    """The request records, beside the images: in the bucket, or in the local image folder."""
    store = writer.store.store
    records = store if hasattr(store, "create_record") else LocalRecords(settings.image_dir)
    owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    return Ledger(records, settings.object_prefix, settings.lease_seconds, owner)


def object_reader(settings: Settings, writer: ImageWriter):
    """What reads `oci://` inputs and adapters, with the service's credentials: the image store's own Object Storage
    client when it has one, else one of its own (nothing is contacted yet)."""
    from sd3_service.storage.object_storage import ObjectStorageStore

    store = writer.store.store
    return store if isinstance(store, ObjectStorageStore) else ObjectStorageStore.from_settings(settings)
