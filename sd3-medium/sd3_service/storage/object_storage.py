"""Images in an OCI Object Storage bucket, written with the `oci` SDK as the deployment itself.

Auth follows `OCI_AUTH` (the resource principal by default). The client is built on first use, never
at import: the resource principal's variables exist only inside OCI, and the SDK raises without them.
Transient failures (5xx, 429, timeouts, resets) are retried with the SDK's own retry strategy, bounded
by `STORE_TIMEOUT_SECONDS` so that a request still answers well inside Model Deployment's 60 s.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import oci

from sd3_service.storage.records import RecordChanged, RecordExists
from sd3_service.storage.store import ImageObject, Location, ObjectRefused, StoreError

log = logging.getLogger("sd3.store")

MAX_BACKOFF_SECONDS = 1.5  # the longest sleep between two attempts
MAX_ATTEMPTS = 8  # a put tries at most this often, within its time budget
RECORD_BUDGET_SECONDS = 6.0  # a ledger call (small JSON) gives up sooner than an image: the request waits on it
AUTH_HINTS = {
    "resource_principal": "the resource principal exists only inside OCI (Model Deployment sets it up); "
                          "elsewhere set OCI_AUTH=api_key",
    "instance_principal": "instance principals exist only on OCI compute instances",
    "api_key": "check OCI_CONFIG_FILE and OCI_PROFILE (`oci setup config` writes them)",
    "security_token": "run `oci session authenticate` again (session tokens expire) and check OCI_PROFILE",
}
# What a failed SDK call raises: service answers, and transport failures (the SDK's RequestException
# and ConnectTimeout are OSErrors), and credential trouble found while signing (e.g. a token file gone).
SDK_FAILURES = (oci.exceptions.ServiceError, oci.exceptions.ClientError, OSError)


def attempt_timeout(budget_seconds: float) -> tuple[float, float]:
    """(connect, read) seconds for one HTTP attempt: short enough that a retry still fits in the budget."""
    return min(2.0, budget_seconds / 10), min(5.0, budget_seconds / 4)


def retry_strategy(budget_seconds: float):
    """The SDK's retry strategy, starting no attempt that could end after `budget_seconds`.

    It retries what the SDK deems transient: timeouts, connection errors, 429, 409 IncorrectState /
    LockConflict and every 5xx but 501; never 400, 401, 403 or 404.
    """
    connect, read = attempt_timeout(budget_seconds)
    # A retry starts only while elapsed < window; it then sleeps ≤ MAX_BACKOFF and runs ≤ connect + read.
    window = budget_seconds - connect - read - MAX_BACKOFF_SECONDS
    if window <= 0:
        return oci.retry.NoneRetryStrategy()
    return oci.retry.RetryStrategyBuilder(
        max_attempts_check=True, max_attempts=MAX_ATTEMPTS,
        total_elapsed_time_check=True, total_elapsed_time_seconds=window,
        service_error_check=True,
        retry_base_sleep_time_seconds=0.25, retry_exponential_growth_factor=2, decorrelated_jitter=0.25,
        retry_max_wait_between_calls_seconds=MAX_BACKOFF_SECONDS,
    ).get_retry_strategy()


def build_signer(auth: str, config_file: str, profile: str, federation_endpoint: str | None = None,
                 budget_seconds: float = 20.0) -> tuple[object, dict]:
    """The SDK signer for `OCI_AUTH`, and the client config it goes with (with the region, when known).

    Args:
        federation_endpoint: the auth service's X.509 federation URL (`instance_principal`); None: the region's.
        budget_seconds: how long the instance principal's calls to IMDS and the auth service may retry.
    """
    if auth == "resource_principal":
        signer = oci.auth.signers.get_resource_principals_signer()
        return signer, {"region": signer.region} if signer.region else {}
    if auth == "instance_principal":
        # The SDK's own retries on IMDS and the auth service last 90 s and more (e.g. off OCI, where IMDS never
        # answers), and its auth circuit breaker is shared by the whole process: bound both like our own calls.
        signer = oci.auth.signers.InstancePrincipalsSecurityTokenSigner(
            federation_endpoint=federation_endpoint,
            retry_strategy=retry_strategy(budget_seconds),
            federation_client_retry_strategy=retry_strategy(budget_seconds),
            federation_client_circuit_breaker_strategy=oci.circuit_breaker.NoCircuitBreakerStrategy(),
        )
        return signer, {"region": signer.region}
    config = oci.config.from_file(config_file, profile)
    if auth == "api_key":
        return oci.signer.Signer.from_config(config), config
    if auth == "security_token":
        token = Path(config["security_token_file"]).expanduser().read_text().strip()
        key = oci.signer.load_private_key_from_file(config["key_file"], config.get("pass_phrase"))
        return oci.auth.signers.SecurityTokenSigner(token, key), config
    raise ValueError(f"unknown OCI_AUTH {auth!r}")


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc.args[0] if exc.args else exc).split())
    return text if len(text) <= limit else text[:limit] + "…"


def _service_answer(exc: oci.exceptions.ServiceError) -> str:
    # A ServiceError's str() is a dict of mostly empty fields; this is what the service said.
    message = " ".join(str(exc.message).split())[:200]
    request_id = f" (opc-request-id {exc.request_id})" if exc.request_id else ""
    return f"{exc.status}{' ' + exc.code if exc.code else ''}: {message}{request_id}"


def _header_safe(metadata: dict[str, str]) -> dict[str, str]:
    # opc-meta-* travel as HTTP headers: ASCII only (a model folder's path could hold anything).
    return {key: value if value.isascii() else quote(value) for key, value in metadata.items()}


class ObjectStorageStore:
    """Writes images to one bucket; see the module docstring for auth, retries and links.

    Args:
        timeout_seconds: the longest one `put` may take, retries included.
        return_url: also create a read-only pre-authenticated request per image, valid `url_ttl_seconds`.
    """

    def __init__(self, bucket: str, namespace: str | None = None, auth: str = "resource_principal",
                 region: str | None = None, endpoint: str | None = None, profile: str = "DEFAULT",
                 config_file: str = "~/.oci/config", timeout_seconds: float = 20.0, return_url: bool = False,
                 url_ttl_seconds: int = 3600, federation_endpoint: str | None = None):
        self.bucket = bucket
        self.namespace = namespace
        self.auth = auth
        self.region = region
        self.endpoint = endpoint
        self.profile = profile
        self.config_file = config_file
        self.timeout_seconds = timeout_seconds
        self.return_url = return_url
        self.url_ttl_seconds = url_ttl_seconds
        self.federation_endpoint = federation_endpoint
        self._client = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings) -> "ObjectStorageStore":
        """The store `BUCKET_NAME` and friends describe; nothing is contacted yet."""
        return cls(
            bucket=settings.bucket_name, namespace=settings.namespace, auth=settings.oci_auth,
            region=settings.oci_region, endpoint=settings.oci_object_storage_endpoint,
            profile=settings.oci_profile, config_file=settings.oci_config_file,
            timeout_seconds=settings.store_timeout_seconds, return_url=settings.return_url,
            url_ttl_seconds=settings.url_ttl_seconds, federation_endpoint=settings.oci_federation_endpoint,
        )

    def location(self, name: str) -> Location:
        where = f"{self.bucket}@{self.namespace}" if self.namespace else self.bucket
        return Location(uri=f"oci://{where}/{name}", bucket=self.bucket, namespace=self.namespace)

    def destination(self) -> dict[str, str | None]:
        return {"kind": "oci", "bucket": self.bucket, "namespace": self.namespace}

    def describe(self) -> dict[str, str]:
        about = {"kind": "oci", "bucket": self.bucket, "namespace": self.namespace or "(not looked up yet)",
                 "auth": self.auth}
        if self.region:
            about["region"] = self.region
        if self.endpoint:
            about["endpoint"] = self.endpoint
        return about

    def check(self) -> None:
        """Load the credential and make one signed call (get the namespace); raise `StoreError` if either fails."""
        namespace = self._call(self.client().get_namespace, self.timeout_seconds).data
        if not self.namespace:
            self.namespace = namespace
            log.info("Object Storage namespace is %s (looked up; NAMESPACE skips this call)", namespace)

    def put(self, image: ImageObject) -> Location:
        """Upload the image with its content type, MD5 and `opc-meta-*` metadata; raise `StoreError` on failure."""
        started = time.monotonic()
        client = self.client()
        if not self.namespace:
            self.check()
        try:
            self._call(
                client.put_object, self._remaining(started), self.namespace, self.bucket, image.name, image.data,
                content_type=image.content_type,
                content_md5=base64.b64encode(hashlib.md5(image.data).digest()).decode("ascii"),
                opc_meta=_header_safe(image.metadata),
                **({"if_none_match": "*"} if image.if_absent else {}),
            )
        except StoreError as exc:
            if not (image.if_absent and exc.status == 412):
                raise
            log.info("[%s] %s was already stored (by another instance): kept as it is", image.request_id, image.name)
        where = self.location(image.name)
        if self.return_url:
            where = replace(where, url=self._link(client, image.name, self._remaining(started)))
        return where

    def read(self, namespace: str, bucket: str, name: str, max_bytes: int) -> bytes:
        """An object's bytes (an input image), at most `max_bytes`, with the same credential and retries as `put`.

        Raises `ObjectRefused` when Object Storage answers no (404, 403, 401, 400: retrying will not help) or
        the object is larger than `max_bytes`; `StoreError` when it cannot be reached.
        """
        started = time.monotonic()
        where = f"oci://{bucket}@{namespace}/{name}"
        with self._reading(where):
            response = self.client().get_object(namespace, bucket, name,
                                                retry_strategy=retry_strategy(self.timeout_seconds))
        stream = response.data
        try:
            declared = int(response.headers.get("content-length") or 0)
            if declared > max_bytes:
                raise ObjectRefused(413, f"{where} is {declared} bytes; inputs may be at most {max_bytes}")
            data = bytearray()
            for chunk in stream.iter_content(1 << 16):
                data += chunk
                if len(data) > max_bytes:
                    raise ObjectRefused(413, f"{where} is over {max_bytes} bytes; inputs may be at most that")
                if time.monotonic() - started > self.timeout_seconds:
                    raise StoreError(f"reading {where} took over {self.timeout_seconds:.0f} s")
        except SDK_FAILURES as exc:
            raise StoreError(self._explain(exc)) from None
        finally:
            stream.close()
        return bytes(data)

    def etag(self, namespace: str, bucket: str, name: str) -> str:
        """An object's ETag (a HEAD request): whether it changed since it was read. Raises as `read` does."""
        with self._reading(f"oci://{bucket}@{namespace}/{name}"):
            response = self.client().head_object(namespace, bucket, name,
                                                 retry_strategy=retry_strategy(self.timeout_seconds))
        return response.headers.get("etag", "")

    @contextlib.contextmanager
    def _reading(self, where: str):
        """Object Storage's answers to a read, as `ObjectRefused` (a no that retrying will not change) or
        `StoreError` (not reached)."""
        try:
            yield
        except oci.exceptions.ServiceError as exc:
            if exc.status in (400, 401, 403, 404):
                raise ObjectRefused(exc.status, f"Object Storage answered {_service_answer(exc)} for {where}"
                                    + (" (the object does not exist, or the policy does not let this deployment "
                                       "read it)" if exc.status == 404 else "")) from None
            raise StoreError(self._explain(exc)) from None
        except SDK_FAILURES as exc:
            raise StoreError(self._explain(exc)) from None

    def get(self, name: str) -> bytes:
        """An object of this store's bucket (an image it stored), at most 64 MB."""
        if not self.namespace:
            self.check()
        return self.read(self.namespace, self.bucket, name, 64 * 1024 * 1024)

    # -- records (the request ledger): conditional requests, 412 when the condition fails

    def create_record(self, name: str, data: bytes) -> str:
        """Write `name` only if no object has it (`if-none-match: *`); its etag. `RecordExists` otherwise."""
        try:
            response = self._record_call(self.client().put_object, name, data, if_none_match="*")
        except oci.exceptions.ServiceError as exc:
            if exc.status == 412:
                raise RecordExists(name) from None
            raise StoreError(self._explain(exc)) from None
        return response.headers.get("etag", "")

    def read_record(self, name: str) -> tuple[bytes, str] | None:
        try:
            response = self._record_call(self.client().get_object, name)
        except oci.exceptions.ServiceError as exc:
            if exc.status == 404 and exc.code == "ObjectNotFound":
                return None
            raise StoreError(self._explain(exc)) from None
        try:
            return response.data.content, response.headers.get("etag", "")
        except SDK_FAILURES as exc:
            raise StoreError(self._explain(exc)) from None

    def replace_record(self, name: str, data: bytes, etag: str) -> str:
        """Replace `name` only if it is unchanged (`if-match: <etag>`); the new etag. `RecordChanged` otherwise."""
        try:
            response = self._record_call(self.client().put_object, name, data, if_match=etag)
        except oci.exceptions.ServiceError as exc:
            if exc.status in (404, 412):
                raise RecordChanged(name) from None
            raise StoreError(self._explain(exc)) from None
        return response.headers.get("etag", "")

    def _record_call(self, operation, name: str, *args, **kwargs):
        """One record call within `RECORD_BUDGET_SECONDS`; service errors reach the caller, the rest is StoreError."""
        if not self.namespace:
            self.check()
        if operation.__name__ == "put_object":
            kwargs["content_type"] = "application/json"
        try:
            return operation(self.namespace, self.bucket, name, *args,
                             retry_strategy=retry_strategy(min(self.timeout_seconds, RECORD_BUDGET_SECONDS)), **kwargs)
        except oci.exceptions.ServiceError:
            raise
        except SDK_FAILURES as exc:
            raise StoreError(self._explain(exc)) from None

    def client(self):
        """The SDK client, built on first use (the credential is loaded then, not at import)."""
        if self._client is not None:
            return self._client
        if not self._lock.acquire(timeout=self.timeout_seconds):
            raise StoreError("still loading the OCI credential")
        try:
            if self._client is None:
                self._client = self._build_client()
            return self._client
        finally:
            self._lock.release()

    # -- internals

    def _remaining(self, started: float) -> float:
        return max(0.0, self.timeout_seconds - (time.monotonic() - started))

    def _build_client(self):
        try:
            signer, config = build_signer(self.auth, self.config_file, self.profile, self.federation_endpoint,
                                          self.timeout_seconds)
        except oci.exceptions.ServiceError as exc:
            # An instance principal's IMDS or auth service answered with an error. The SDK makes IMDS's from the
            # HTTP status alone (no code); the auth service's carry its error code.
            source = "the instance metadata service" if exc.code is None else "the auth service"
            raise StoreError(f"OCI_AUTH={self.auth}: cannot load the credential: {source} answered "
                             f"{_service_answer(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - the SDK raises many types here; all mean "no usable credential"
            raise StoreError(f"OCI_AUTH={self.auth}: cannot load the credential: {_short(exc)} "
                             f"({AUTH_HINTS.get(self.auth, '')})") from None
        config = dict(config)
        if self.region:
            config["region"] = self.region
        self.region = config.get("region")
        if not self.region and not self.endpoint:
            raise StoreError(f"OCI_AUTH={self.auth} gives no region: set OCI_REGION")
        extra = {"service_endpoint": self.endpoint} if self.endpoint else {}
        return oci.object_storage.ObjectStorageClient(
            config, signer=signer, timeout=attempt_timeout(self.timeout_seconds),
            # The SDK's default circuit breaker is shared by every client in the process and stays open
            # for 30 s; our spool already stops hammering a failing bucket, and recovers as soon as it answers.
            circuit_breaker_strategy=oci.circuit_breaker.NoCircuitBreakerStrategy(),
            **extra,
        )

    def _call(self, operation, budget_seconds: float, *args, **kwargs):
        """Run one SDK operation with the bounded retry strategy; failures become `StoreError`."""
        try:
            return operation(*args, retry_strategy=retry_strategy(budget_seconds), **kwargs)
        except SDK_FAILURES as exc:
            raise StoreError(self._explain(exc), status=getattr(exc, "status", None)) from None

    def _explain(self, exc: BaseException) -> str:
        if isinstance(exc, oci.exceptions.ServiceError) and exc.operation_name is None:
            # No Object Storage operation: the auth service, asked for a new token while the call was signed.
            return (f"OCI_AUTH={self.auth}: cannot renew the credential: the auth service answered "
                    f"{_service_answer(exc)}")
        if isinstance(exc, oci.exceptions.ServiceError):
            hint = {
                401: f"the credential (OCI_AUTH={self.auth}) was refused",
                403: f"the policy does not let this principal write to bucket '{self.bucket}'",
                404: f"bucket '{self.bucket}' does not exist in namespace '{self.namespace}', or the policy does "
                     "not let this principal use it",
            }.get(exc.status, "")
            message = " ".join(str(exc.message).split())[:200]
            return (f"Object Storage answered {exc.status} {exc.code}: {message}"
                    f"{' — ' + hint if hint else ''} (opc-request-id {exc.request_id})")
        where = self.endpoint or f"the {self.region} endpoint"
        return f"cannot reach Object Storage at {where}: {type(exc).__name__}: {_short(exc, 160)}"

    def _link(self, client, name: str, budget_seconds: float) -> str | None:
        """A read-only pre-authenticated URL for the object, or None (logged) if OCI would not make one."""
        expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=self.url_ttl_seconds)
        details = oci.object_storage.models.CreatePreauthenticatedRequestDetails(
            name=f"sd3-{name}"[:512], object_name=name, access_type="ObjectRead", time_expires=expires)
        try:
            par = self._call(client.create_preauthenticated_request, budget_seconds, self.namespace, self.bucket,
                             details).data
        except StoreError as exc:
            # The image is stored; only the link is missing. Answering stored=false would upload it again.
            log.warning("Stored %s but could not create its link (RETURN_URL): %s", name, exc)
            return None
        return par.full_path or client.base_client.get_endpoint().rstrip("/") + par.access_uri
