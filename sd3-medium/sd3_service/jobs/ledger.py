"""The request ledger: one record per request id, in the image store, so an id gets one answer anywhere.

The record (`<OBJECT_PREFIX>requests/<request_id>.json`) says where the request stands (`queued`,
`running`, `done`, `failed`), which process owns it and until when (its lease, renewed while it works),
the parameters it was sent with and the seed and day chosen for it, and once done the whole answer.
It is created with a conditional create, so one process claims an id; every other process that gets
the id reads the record: the answer when done, the state while a live owner works, and after the lease
has expired (the owner died) a takeover with a conditional replace, which generates again with the
recorded seed under the recorded names.

Records hold no secrets. The prompt and negative prompt are kept only as their sha256 unless
`STORE_PARAMS` allows the text; an input image only as the sha256 of what was sent (an `oci://` URI
as is). That is enough to refuse an id reused with other parameters (409 `request_id_reused`), naming
the fields that differ, on every path that returns an earlier answer.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields, replace

from sd3_service.metrics import METRICS
from sd3_service.spec import MAX_SEED, ImageRequest
from sd3_service.storage.records import RecordChanged, RecordExists, RecordStore

TEXT_FIELDS = ("prompt", "negative_prompt")
IMAGE_FIELDS = ("image", "mask_image")


def digest(value: str | bytes) -> dict[str, str]:
    return {"sha256": hashlib.sha256(value.encode() if isinstance(value, str) else value).hexdigest()}


def recorded_parameters(request: ImageRequest, keep_text: bool, fused: list[dict] | None = None) -> dict:
    """What a request asks for, as its record keeps it: comparable, and free of input bytes (and of the prompt's
    text unless `keep_text`). Its adapters as it named them (a repeat is told apart before anything is downloaded);
    `fused`: the adapters `LORA_FUSE` fused into the weights, by content."""
    parameters = request.parameters()
    if fused:
        parameters["fused_loras"] = [{"sha256": adapter["sha256"], "scale": adapter["scale"]} for adapter in fused]
    for name in TEXT_FIELDS:
        if parameters.get(name) is not None and not keep_text:
            parameters[name] = digest(parameters[name])
    for name in IMAGE_FIELDS:
        value = parameters.get(name)
        if value is not None and not (isinstance(value, str) and value.startswith("oci://")):
            parameters[name] = digest(value)
    return parameters


def differing_fields(recorded: dict, sent: dict, recorded_seed: int) -> list[str]:
    """The fields in which a request differs from the one recorded for its id (its seed may be the one chosen)."""
    differ = []
    for name in sorted(set(recorded) | set(sent)):
        was, now = recorded.get(name), sent.get(name)
        if name == "seed" and now == recorded_seed:
            continue  # sending back the seed the answer gave asks for the same images
        if isinstance(was, dict) and isinstance(now, str):
            now = digest(now)  # the record keeps only a digest of this field
        if isinstance(now, dict) and isinstance(was, str):
            was = digest(was)
        if was != now:
            differ.append(name)
    return differ


def seed_for(request: ImageRequest, request_id: str) -> int:
    """The request's seed, or one made from its id: a retry with the same id makes the same image, even on
    another instance that could not read the ledger."""
    if request.seed is not None:
        return request.seed
    return int.from_bytes(hashlib.sha256(b"seed:" + request_id.encode()).digest()[:8], "big") % (MAX_SEED + 1)


@dataclass
class Record:
    """A request's record, as stored (JSON)."""

    request_id: str
    state: str  # "queued" | "running" | "done" | "failed"
    owner: str  # the process that holds it: "<host>:<pid>:<random>"
    lease_expires: float  # seconds since the epoch; the owner renews it while it works
    seed: int
    day: str  # "yyyy/mm/dd" of the image names
    parameters: dict
    answer: dict | None = None
    error: dict | None = None  # {"status", "code", "message", "field"} of a failed request
    webhooks: list | None = None  # its completion event for its webhook: {"id", "type", "state"}
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())
    updated: str = ""

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    def lease_live(self, now: float | None = None) -> bool:
        return self.lease_expires > (time.time() if now is None else now)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Record:
        """The record as stored; fields a newer version added are left out (instances of two versions share a
        bucket during a rolling update)."""
        known = {item.name for item in fields(cls)}
        return cls(**{name: value for name, value in json.loads(data).items() if name in known})


@dataclass(frozen=True)
class Claim:
    """What a claim found: `mine` (this process now owns the id), or the record someone else holds."""

    mine: bool
    record: Record
    etag: str


class Ledger:
    """Claims, reads, renews and closes request records in a `RecordStore`; every call may raise `StoreError`.

    Args:
        records: where the records live (the image bucket, or the local image folder).
        prefix: `OBJECT_PREFIX`; records are `<prefix>requests/<request_id>.json`.
        lease_seconds: how long a claim lasts without renewal.
        owner: this process's name in the records it holds.
    """

    def __init__(self, records: RecordStore, prefix: str, lease_seconds: float, owner: str):
        self.records = records
        self.prefix = prefix
        self.lease_seconds = lease_seconds
        self.owner = owner

    def name(self, request_id: str) -> str:
        return f"{self.prefix}requests/{request_id}.json"

    def new_record(self, request_id: str, seed: int, parameters: dict, day: str) -> Record:
        return Record(request_id=request_id, state="queued", owner=self.owner, lease_expires=self._lease(),
                      seed=seed, day=day, parameters=parameters)

    def claim(self, record: Record) -> Claim:
        """Create the record, or find the one already there."""
        name = self.name(record.request_id)
        try:
            return Claim(True, record, self._call("create", self.records.create_record, name, record.to_json()))
        except RecordExists:
            pass
        found = self.read(record.request_id)
        if found is None:  # deleted between the two calls (a lifecycle rule): try once more
            return self.claim(record)
        existing, etag = found
        # A create whose answer was lost and whose retry met the first attempt's object is still this claim.
        return Claim(existing.owner == self.owner and existing.created == record.created, existing, etag)

    def read(self, request_id: str) -> tuple[Record, str] | None:
        found = self._call("read", self.records.read_record, self.name(request_id))
        return None if found is None else (Record.from_json(found[0]), found[1])

    def take_over(self, record: Record, etag: str) -> tuple[Record, str] | None:
        """Own an expired record (the same seed, day and parameters); None if someone changed it first."""
        taken = replace(record, owner=self.owner, state="queued", lease_expires=self._lease(), answer=None,
                        error=None)
        etag = self.write(taken, etag)
        return None if etag is None else (taken, etag)

    def write(self, record: Record, etag: str) -> str | None:
        """Replace the record this process read as `etag` (renewed or closed); None if it changed since."""
        record.updated = dt.datetime.now(dt.timezone.utc).isoformat()
        try:
            return self._call("replace", self.records.replace_record, self.name(record.request_id), record.to_json(),
                              etag)
        except RecordChanged:
            return None

    def renewed(self, record: Record) -> Record:
        record.lease_expires = self._lease()
        return record

    def _lease(self) -> float:
        return time.time() + self.lease_seconds

    @staticmethod
    def _call(operation: str, call, *args):
        """One record call, timed (`sd3_ledger_seconds`), whatever it ends with."""
        began = time.perf_counter()
        try:
            return call(*args)
        finally:
            METRICS.ledger_seconds.labels(operation=operation).observe(time.perf_counter() - began)
