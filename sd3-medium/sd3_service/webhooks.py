"""Webhooks: a request's caller is told when its images are done, signed, at least once, and never inside a network.

A request with `webhook` (an absolute URL) is sent `image.started` (when its generation starts, if it asks) and
`image.completed` or `image.failed` (when it ends): `{"type", "timestamp", "data"}`, `data` being what a poll of
the request answers. Each event is signed as Standard Webhooks says (`webhook-id`, `webhook-timestamp`,
`webhook-signature`, made by the `standardwebhooks` package with `WEBHOOK_SECRET`), and sent until the receiver
answers 2xx (or 410 Gone), with growing delays, for `WEBHOOK_RETRY_SECONDS`.

At least once: an event is written to local disk (`SPOOL_DIR/webhooks/`) before it is sent and removed once it
is settled, and the completion event is also in the request's record; a restarted instance sends what its disk
still holds, with the same `webhook-id`.

Never a way in: a webhook's host must be one of `WEBHOOK_HOSTS`; https only unless `WEBHOOK_ALLOW_HTTP`; the
addresses its name resolves to are checked when the request comes and again at each connection (the connection
goes to the address checked, so DNS cannot swap it), and loopback, private, link-local (the instance metadata
service) and multicast ones are refused unless `WEBHOOK_ALLOW_PRIVATE`; redirects are not followed. Logs and
metrics show a webhook's host, never its path or query (they may hold a token).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sd3_service.errors import ServiceError, invalid_field
from sd3_service.metrics import METRICS

log = logging.getLogger("sd3.webhooks")

EVENTS = ("start", "completed")  # what `webhook_events_filter` may ask for
ATTEMPT_SECONDS = 15.0  # one attempt's limit: a slow receiver holds nothing but its own connection
FIRST_DELAY, MAX_DELAY = 1.0, 300.0  # seconds between attempts: doubling from the first, up to the largest


class WebhookRefused(Exception):
    """A webhook address that policy refuses."""


@dataclass(frozen=True)
class WebhookPolicy:
    """Where webhooks may go."""

    hosts: tuple[str, ...] = ()  # exact names, or `*.example.com`
    allow_http: bool = False
    allow_private: bool = False
    signing: bool = False  # a secret is set

    def check_url(self, url: str) -> None:
        """400 naming `webhook` unless `url` may be sent to (its form, scheme and host; addresses: `address`)."""
        if not self.signing:
            raise invalid_field("webhook", "this deployment sends no webhooks: set WEBHOOK_SECRET (or "
                                           "WEBHOOK_SECRET_OCID) and WEBHOOK_HOSTS to allow them")
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname or parts.username or parts.password:
            raise invalid_field("webhook", "not an absolute https:// URL (such as https://example.com/hooks/images)")
        if parts.scheme == "http" and not self.allow_http:
            raise invalid_field("webhook", "http:// is refused: use https:// (WEBHOOK_ALLOW_HTTP=true allows http)")
        try:
            parts.port
        except ValueError:
            raise invalid_field("webhook", "its port is not a number from 1 to 65535") from None
        host = parts.hostname.lower()
        if not any(host == allowed or (allowed.startswith("*.") and host.endswith(allowed[1:]))
                   for allowed in self.hosts):
            allowed = ", ".join(self.hosts) or "none (WEBHOOK_HOSTS is not set)"
            raise invalid_field("webhook", f"host '{host}' is not one webhooks may go to; allowed: {allowed}")

    def check_address(self, address: str) -> None:
        """`WebhookRefused` for an address in a range webhooks must not reach."""
        ip = ipaddress.ip_address(address)
        ip = ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip
        if self.allow_private:
            return
        for kind, inside in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                             ("multicast", ip.is_multicast), ("private", ip.is_private),
                             ("reserved", ip.is_reserved or ip.is_unspecified)):
            if inside:
                raise WebhookRefused(f"resolves to a {kind} address ({ip}); WEBHOOK_ALLOW_PRIVATE=true allows it")

    async def address(self, url: str) -> str:
        """The address to connect to for `url`: its host resolved now, every address checked; `WebhookRefused`."""
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            found = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise WebhookRefused(f"its host does not resolve ({exc})") from None
        addresses = [info[4][0] for info in found]
        for address in addresses:
            self.check_address(address)
        return addresses[0]


@dataclass
class Delivery:
    """One event for one webhook: what is kept on disk until it is settled."""

    id: str  # `webhook-id`: the same for every attempt of this event
    request_id: str
    url: str
    type: str  # image.started | image.completed | image.failed
    timestamp: str
    data: dict
    deadline: float  # seconds since the epoch: retried until then
    attempts: int = 0

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "?"

    def body(self) -> str:
        return json.dumps({"type": self.type, "timestamp": self.timestamp, "data": self.data}, separators=(",", ":"))


class Webhooks:
    """Sends events (`send`) on an event loop of its own, in a thread of its own, so that no delivery ever waits
    for (or delays) a request or a generation; at `start` it resumes what the disk holds."""

    def __init__(self, policy: WebhookPolicy, secret: str | None, folder: Path, retry_seconds: float,
                 hold_slack: float = 30.0):
        self.policy = policy
        self.hold_slack = hold_slack  # a sender holds an event this long past its next attempt's end (LEASE_SECONDS)
        self.secret = secret
        self.folder = Path(folder)
        self.retry_seconds = retry_seconds
        self.settled = None  # called (delivery, outcome) in a worker thread once an event is settled
        self.renew = None  # called (delivery, held_until) in a worker thread before each wait between attempts
        self.sending: set[str] = set()  # the ids of the events this process is sending
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the delivery loop, and send again what an earlier run left on disk."""
        with self._lock:
            if self._loop is not None:
                return
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, name="sd3-webhooks", daemon=True).start()
        resumed = self.resume()
        if resumed:
            log.info("Resumed %d webhook event(s) an earlier run had not settled", resumed)

    async def check(self, url: str) -> None:
        """400 naming `webhook` unless `url` may be sent to now (its form, host and addresses)."""
        self.policy.check_url(url)
        try:
            await self.policy.address(url)
        except WebhookRefused as exc:
            raise invalid_field("webhook", f"{urlsplit(url).hostname} {exc}") from None

    def event(self, request_id: str, url: str, kind: str, data: dict) -> Delivery:
        now = dt.datetime.now(dt.timezone.utc)
        return Delivery(id=f"msg_{uuid.uuid4().hex}", request_id=request_id, url=url, type=kind,
                        timestamp=now.isoformat(timespec="milliseconds"), data=data,
                        deadline=time.time() + self.retry_seconds)

    def keep(self, delivery: Delivery) -> None:
        """Write the event to disk before anything else learns of it (a crash after this loses nothing)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = self.folder / f".{delivery.id}.tmp"
        temporary.write_text(json.dumps(asdict(delivery)))
        os.replace(temporary, self.folder / f"{delivery.id}.json")

    def send(self, delivery: Delivery) -> None:
        """Deliver a kept event on the delivery loop: the caller (an answer, the next generation) never waits."""
        self.start()
        with self._lock:
            if delivery.id in self.sending:
                return
            self.sending.add(delivery.id)
        METRICS.webhook_pending.inc()
        asyncio.run_coroutine_threadsafe(self._deliver(delivery), self._loop)

    def resume(self) -> int:
        """Send again every event the disk holds (a restart after a crash or a kill); how many."""
        resumed = 0
        for path in sorted(self.folder.glob("msg_*.json")) if self.folder.is_dir() else ():
            try:
                delivery = Delivery(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("Cannot read the kept webhook event %s (%s): left there", path.name, exc)
                continue
            log.info("[%s] Resuming webhook event %s (%s) to %s", delivery.request_id, delivery.id, delivery.type,
                     delivery.host)
            self.send(delivery)
            resumed += 1
        return resumed

    async def _deliver(self, delivery: Delivery) -> None:
        import httpx

        outcome = "gave_up"
        try:
            async with httpx.AsyncClient(timeout=ATTEMPT_SECONDS, follow_redirects=False, trust_env=False) as client:
                while True:
                    delivery.attempts += 1
                    status, wait = await self._attempt(client, delivery)
                    if status is not None and 200 <= status < 300:
                        outcome = "delivered"
                        break
                    if status == 410:
                        outcome = "gone"
                        break
                    delay = max(min(MAX_DELAY, FIRST_DELAY * 2 ** (delivery.attempts - 1)), wait or 0)
                    if time.time() + delay > delivery.deadline:
                        break
                    METRICS.webhook_deliveries.labels(outcome="retried").inc()
                    await self._note(self.renew, delivery, time.time() + delay + ATTEMPT_SECONDS + self.hold_slack)
                    await asyncio.sleep(delay)
        finally:
            METRICS.webhook_pending.dec()
            with self._lock:
                self.sending.discard(delivery.id)
        METRICS.webhook_deliveries.labels(outcome=outcome).inc()
        log.info("[%s] Webhook %s %s to %s after %d attempt(s)", delivery.request_id, delivery.type,
                 outcome.replace("_", " "), delivery.host, delivery.attempts,
                 extra={"request_id": delivery.request_id, "event": delivery.type, "host": delivery.host,
                        "outcome": outcome, "attempts": delivery.attempts})
        (self.folder / f"{delivery.id}.json").unlink(missing_ok=True)
        await self._note(self.settled, delivery, outcome)

    @staticmethod
    async def _note(note, delivery: Delivery, value) -> None:
        """Tell the request's record (off this loop: a store call blocks); a failure here loses no event."""
        if note is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, note, delivery, value)
        except Exception as exc:  # noqa: BLE001
            log.warning("[%s] Cannot note the webhook event in its record (%s)", delivery.request_id, exc)

    async def _attempt(self, client, delivery: Delivery) -> tuple[int | None, float | None]:
        """One POST: its status (None: no answer) and the receiver's `Retry-After`, if any."""
        from standardwebhooks.webhooks import Webhook

        parts = urlsplit(delivery.url)
        status, wait, problem = None, None, None
        try:
            address = await self.policy.address(delivery.url)  # checked again now: DNS may have changed
            body = delivery.body()
            sent_at = dt.datetime.now(dt.timezone.utc)
            headers = {"content-type": "application/json", "webhook-id": delivery.id,
                       "webhook-timestamp": str(int(sent_at.timestamp())),
                       "webhook-signature": Webhook(self.secret).sign(delivery.id, sent_at, body),
                       "host": parts.netloc.rsplit("@", 1)[-1], "user-agent": "sd3-medium-webhooks"}
            literal = f"[{address}]" if ":" in address else address
            port = f":{parts.port}" if parts.port else ""
            target = parts._replace(netloc=f"{literal}{port}").geturl()
            response = await client.post(target, content=body.encode(), headers=headers,
                                         extensions={"sni_hostname": parts.hostname})
            status = response.status_code
            wait = _retry_after(response.headers.get("retry-after"))
        except WebhookRefused as exc:
            problem = f"refused: {exc}"
        except Exception as exc:  # noqa: BLE001 - a receiver's failure of any kind is retried
            problem = type(exc).__name__
        log.info("[%s] Webhook %s to %s: attempt %d, %s", delivery.request_id, delivery.type, delivery.host,
                 delivery.attempts, status if status is not None else problem,
                 extra={"request_id": delivery.request_id, "event": delivery.type, "host": delivery.host,
                        "status": status, "attempt": delivery.attempts})
        if problem is not None and problem.startswith("refused"):
            delivery.deadline = 0  # policy does not change between attempts: give up now
        return status, wait


def adoptable(record, now: float) -> list[dict]:
    """The webhook events of a finished record that no live sender holds."""
    return [event for event in record.webhooks or () if event.get("state") == "pending"
            and event.get("held_until", 0) <= now and record.parameters.get("webhook")]


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def poll_answer_of_error(exc: BaseException) -> dict:
    """What a poll answers for a request that failed with `exc`: its error body."""
    error = ServiceError.of(exc)
    return {"error": {"code": error.code, "message": error.message, "field": error.field}}
