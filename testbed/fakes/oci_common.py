"""What every OCI-compatible fake shares: test credentials, request-signature checks, a loopback server.

The fakes answer the real `oci` SDK over HTTP on 127.0.0.1. Every request must carry a valid OCI
request signature (draft-cavage HTTP signatures, rsa-sha256, as the SDK's signers make them): the
server rebuilds the signing string from the headers the request lists and verifies it with the public
half of a key the test generated and registered. Unsigned or wrongly signed requests get 401, as on
OCI. Tests inject faults (error statuses, slow answers, dropped connections) and read back every
request the server saw.

Subclasses implement `route(request) -> Reply`; see `testbed.fakes.object_storage` for one.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import hashlib
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

DEFAULT_REGION = "us-ashburn-1"
TENANCY_ID = "ocid1.tenancy.oc1..aaaatesttenancy"
COMPARTMENT_ID = "ocid1.compartment.oc1..aaaatestcompartment"
USER_ID = "ocid1.user.oc1..aaaatestuser"
DEPLOYMENT_ID = "ocid1.datasciencemodeldeployment.oc1.iad.aaaatestdeployment"
MAX_CLOCK_SKEW_SECONDS = 300  # OCI refuses requests whose date is further off than this
GENERIC_HEADERS = ("date", "(request-target)", "host")
BODY_HEADERS = ("content-length", "content-type", "x-content-sha256")


# -- test credentials ---------------------------------------------------------------------------


def new_rsa_key() -> rsa.RSAPrivateKey:
    """A fresh 2048-bit RSA key (OCI's minimum size)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def private_pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode("ascii")


def key_fingerprint(key: rsa.RSAPrivateKey) -> str:
    """The API-key fingerprint OCI shows for a key: MD5 of the DER public key, colon-separated."""
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashlib.md5(der).hexdigest()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


@dataclass(frozen=True)
class Credentials:
    """A credential the SDK can sign with, and what a fake needs to accept it."""

    key_id: str  # the keyId the SDK puts in the Authorization header
    private_key: rsa.RSAPrivateKey
    env: dict[str, str] = field(default_factory=dict)  # environment the SDK reads (resource principal)
    config_file: Path | None = None  # ~/.oci/config-style file (api_key, security_token)
    profile: str = "DEFAULT"
    region: str = DEFAULT_REGION

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self.private_key.public_key()


def session_token(lifetime_seconds: int = 3600, **claims) -> str:
    """A JWT shaped like a resource principal session token (RPST); the SDK reads its claims unverified."""
    now = int(time.time())
    body = {
        "sub": DEPLOYMENT_ID, "iss": "authService.oracle.com", "ttype": "res", "res_type": "datasciencemodeldeployment",
        "res_id": DEPLOYMENT_ID, "res_tenant": TENANCY_ID, "res_compartment": COMPARTMENT_ID,
        "iat": now, "exp": now + lifetime_seconds, "jti": uuid.uuid4().hex, **claims,
    }
    # Signed by the identity service in reality; the signing key here only gives the token its shape.
    return jwt.encode(body, "fake-identity-service-signing-key-0123456789", algorithm="HS256")


def resource_principal(folder: Path, key: rsa.RSAPrivateKey | None = None, region: str = DEFAULT_REGION,
                       as_files: bool = True) -> Credentials:
    """Resource principal v2.2 credentials, as OCI Model Deployment hands them to a container.

    Args:
        as_files: put the token and key in files and the variables hold their paths (what OCI does);
            otherwise the variables hold the values themselves.
    """
    key = key or new_rsa_key()
    token = session_token()
    pem = private_pem(key)
    if as_files:
        folder.mkdir(parents=True, exist_ok=True)
        token_file, pem_file = folder / "rpst", folder / "private.pem"
        token_file.write_text(token)
        pem_file.write_text(pem)
        token_value, pem_value = str(token_file.resolve()), str(pem_file.resolve())
    else:
        token_value, pem_value = token, pem
    env = {
        "OCI_RESOURCE_PRINCIPAL_VERSION": "2.2",
        "OCI_RESOURCE_PRINCIPAL_RPST": token_value,
        "OCI_RESOURCE_PRINCIPAL_PRIVATE_PEM": pem_value,
        "OCI_RESOURCE_PRINCIPAL_REGION": region,
    }
    return Credentials(key_id=f"ST${token}", private_key=key, env=env, region=region)


def api_key(folder: Path, key: rsa.RSAPrivateKey | None = None, region: str = DEFAULT_REGION,
            profile: str = "DEFAULT") -> Credentials:
    """An API key with its `~/.oci/config`-style file, as a developer has on a laptop."""
    key = key or new_rsa_key()
    folder.mkdir(parents=True, exist_ok=True)
    key_file = folder / "oci_api_key.pem"
    key_file.write_text(private_pem(key))
    key_file.chmod(0o600)
    fingerprint = key_fingerprint(key)
    config = folder / "config"
    config.write_text(
        f"[{profile}]\nuser={USER_ID}\nfingerprint={fingerprint}\ntenancy={TENANCY_ID}\n"
        f"region={region}\nkey_file={key_file}\n"
    )
    return Credentials(key_id=f"{TENANCY_ID}/{USER_ID}/{fingerprint}", private_key=key, config_file=config,
                       profile=profile, region=region)


def security_token(folder: Path, key: rsa.RSAPrivateKey | None = None, region: str = DEFAULT_REGION,
                   profile: str = "DEFAULT") -> Credentials:
    """A session token profile, as `oci session authenticate` writes it."""
    key = key or new_rsa_key()
    folder.mkdir(parents=True, exist_ok=True)
    key_file, token_file = folder / "session_key.pem", folder / "token"
    key_file.write_text(private_pem(key))
    key_file.chmod(0o600)
    token = session_token(ttype="login", sub=USER_ID)
    token_file.write_text(token)
    config = folder / "config"
    config.write_text(
        f"[{profile}]\nfingerprint={key_fingerprint(key)}\ntenancy={TENANCY_ID}\nregion={region}\n"
        f"key_file={key_file}\nsecurity_token_file={token_file}\n"
    )
    return Credentials(key_id=f"ST${token}", private_key=key, config_file=config, profile=profile, region=region)


# -- request signatures -------------------------------------------------------------------------


class SignatureError(Exception):
    """The request is not signed, or not signed correctly; the fake answers 401."""


_PARAM = re.compile(r'(\w+)="([^"]*)"')


def parse_authorization(value: str | None) -> dict[str, str]:
    """The parameters of a `Signature keyId="…",headers="…",signature="…"` header."""
    if not value:
        raise SignatureError("no Authorization header")
    scheme, _, rest = value.partition(" ")
    if scheme != "Signature":
        raise SignatureError(f"Authorization scheme is {scheme!r}, not 'Signature'")
    params = dict(_PARAM.findall(rest))
    for name in ("keyId", "signature", "headers", "algorithm"):
        if name not in params:
            raise SignatureError(f"Authorization header has no {name}")
    return params


def signing_string(method: str, target: str, headers: dict[str, str], names: list[str]) -> str:
    """The string a draft-cavage signature signs: one `name: value` line per listed header."""
    lines = []
    for name in names:
        if name == "(request-target)":
            lines.append(f"(request-target): {method.lower()} {target}")
        elif name in headers:
            lines.append(f"{name}: {headers[name]}")
        else:
            raise SignatureError(f"signed header {name!r} is not in the request")
    return "\n".join(lines)


def verify_signature(method: str, target: str, headers: dict[str, str], body: bytes,
                     keys: dict[str, rsa.RSAPublicKey], body_signed: bool,
                     now: float | None = None, generic_headers: tuple[str, ...] = GENERIC_HEADERS) -> str:
    """Check an OCI request signature; return the key id that signed it or raise `SignatureError`.

    Args:
        target: the request target as sent (path and query string).
        headers: request headers with lower-case names.
        body_signed: whether this operation must sign its body headers (OCI exempts object uploads).
        generic_headers: headers every request must sign (the auth service's federation call omits host).
    """
    params = parse_authorization(headers.get("authorization"))
    if params["algorithm"] != "rsa-sha256":
        raise SignatureError(f"algorithm {params['algorithm']!r} is not rsa-sha256")
    names = params["headers"].split()
    required = list(generic_headers) + (list(BODY_HEADERS) if body_signed else [])
    missing = [name for name in required if name not in names]
    if missing:
        raise SignatureError(f"headers {missing} must be signed")
    public_key = keys.get(params["keyId"])
    if public_key is None:
        raise SignatureError("unknown keyId")
    date = email.utils.parsedate_to_datetime(headers["date"]) if "date" in headers else None
    if date is None or abs(date.timestamp() - (now or time.time())) > MAX_CLOCK_SKEW_SECONDS:
        raise SignatureError(f"date {headers.get('date')!r} is missing or more than {MAX_CLOCK_SKEW_SECONDS} s off")
    if "x-content-sha256" in names:
        digest = base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")
        if headers.get("x-content-sha256") != digest:
            raise SignatureError("x-content-sha256 does not match the body")
    if "content-length" in names and headers.get("content-length") != str(len(body)):
        raise SignatureError("content-length does not match the body")
    text = signing_string(method, target, headers, names)
    try:
        public_key.verify(base64.b64decode(params["signature"]), text.encode("utf-8"),
                          padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError("signature does not verify") from exc
    return params["keyId"]


# -- the server ---------------------------------------------------------------------------------


@dataclass
class Request:
    """One request the fake received, as the handler saw it."""

    method: str
    target: str  # path and query string, as sent
    headers: dict[str, str]  # lower-case names
    body: bytes
    key_id: str | None = None  # who signed it, once verified
    signature_error: str | None = None
    status: int | None = None  # what the fake answered (None: connection dropped)

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        return {name: values[-1] for name, values in parse_qs(urlsplit(self.target).query).items()}

    def json(self):
        return json.loads(self.body)


@dataclass
class Reply:
    status: int
    body: bytes | Iterator[bytes] = b""  # an iterator is sent chunk by chunk as it comes (a streamed answer)
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(status: int, payload, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(payload).encode(), {"content-type": "application/json", **(headers or {})})


def error_reply(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Reply:
    """An error in OCI's shape: the SDK turns it into a `ServiceError` with this status and code."""
    return json_reply(status, {"code": code, "message": message}, headers)


@dataclass
class Fault:
    """Something going wrong on the next `count` matching requests (`count=None`: until cleared).

    kind: "status" answers `status` with `code`; "delay" waits `seconds` and then answers normally;
    "drop" reads the request and closes the connection without an answer; "hold" waits until `release()`
    (a gate: `held` is set once a request waits there), then answers normally.
    """

    kind: str
    count: int | None = 1
    status: int = 503
    code: str = "ServiceUnavailable"
    seconds: float = 0.0
    retry_after: int | None = None
    when: Callable[[Request], bool] | None = None
    hits: int = 0
    held: threading.Event = field(default_factory=threading.Event)
    gate: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        """Let every request held by this fault (and any later one) be answered."""
        self.gate.set()


class OCIFakeServer:
    """A threaded HTTP server on 127.0.0.1 that verifies OCI signatures, records requests, injects faults.

    Use as a context manager, or call `start()` and `stop()`. `endpoint` is what the SDK's
    `service_endpoint` should be.
    """

    def __init__(self, keys: dict[str, rsa.RSAPublicKey] | None = None):
        self.keys: dict[str, rsa.RSAPublicKey] = dict(keys or {})
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> "OCIFakeServer":
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the fake first"
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- configuration

    def trust(self, credentials: Credentials) -> Credentials:
        """Accept requests signed with these credentials."""
        with self.lock:
            self.keys[credentials.key_id] = credentials.public_key
        return credentials

    def inject(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def fail_next(self, count: int = 1, status: int = 503, code: str | None = None,
                  retry_after: int | None = None, when: Callable[[Request], bool] | None = None) -> Fault:
        """Answer the next `count` matching requests with an error status."""
        return self.inject(Fault("status", count, status, code or _default_code(status), retry_after=retry_after,
                                 when=when))

    def delay_next(self, count: int, seconds: float, when: Callable[[Request], bool] | None = None) -> Fault:
        """Answer the next `count` matching requests only after `seconds`."""
        return self.inject(Fault("delay", count, seconds=seconds, when=when))

    def hold_next(self, count: int | None, when: Callable[[Request], bool] | None = None) -> Fault:
        """Hold the next `count` matching requests (None: every one) until the fault's `release()` (a gate, not a
        sleep); a client that times out and retries meanwhile is held again."""
        return self.inject(Fault("hold", count, when=when))

    def drop_next(self, count: int = 1, when: Callable[[Request], bool] | None = None) -> Fault:
        """Close the connection of the next `count` matching requests without answering."""
        return self.inject(Fault("drop", count, when=when))

    def outage(self, status: int | None = 503, when: Callable[[Request], bool] | None = None) -> Fault:
        """Fail every matching request until `restore()`: with `status`, or by dropping it when None."""
        if status is None:
            return self.inject(Fault("drop", None, when=when))
        return self.inject(Fault("status", None, status, _default_code(status), when=when))

    def restore(self) -> None:
        """Clear every fault: the service answers normally again."""
        with self.lock:
            self.faults.clear()

    def seen(self, method: str | None = None, path_contains: str = "") -> list[Request]:
        """Requests received so far, optionally only those of a method whose path contains a string."""
        with self.lock:
            return [r for r in self.requests
                    if (method is None or r.method == method) and path_contains in r.path]

    # -- for subclasses

    def route(self, request: Request) -> Reply:
        """Answer a verified request."""
        raise NotImplementedError

    def is_public(self, request: Request) -> bool:
        """Whether a route needs no signature (pre-authenticated request URLs)."""
        return False

    def body_signed(self, request: Request) -> bool:
        """Whether the operation must sign its body headers; OCI requires it for bodies except object data."""
        return request.method in ("POST", "PUT", "PATCH")

    # -- internals

    def _take_fault(self, request: Request) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.when is not None and not fault.when(request):
                    continue
                fault.hits += 1
                if fault.count is not None:
                    fault.count -= 1
                    if fault.count <= 0:
                        self.faults.remove(fault)
                return fault
        return None

    def _answer(self, request: Request) -> Reply | None:
        """The reply for a request, or None to drop the connection."""
        with self.lock:
            self.requests.append(request)
        fault = self._take_fault(request)
        if fault is not None and fault.kind == "drop":
            return None
        if fault is not None and fault.kind == "delay":
            time.sleep(fault.seconds)
        if fault is not None and fault.kind == "hold":
            fault.held.set()
            fault.gate.wait(120)
        if fault is not None and fault.kind == "status":
            headers = {"retry-after": str(fault.retry_after)} if fault.retry_after is not None else {}
            return error_reply(fault.status, fault.code, f"injected fault: {fault.code}", headers)
        if not self.is_public(request):
            try:
                with self.lock:
                    keys = dict(self.keys)
                request.key_id = verify_signature(request.method, request.target, request.headers, request.body,
                                                  keys, self.body_signed(request))
            except SignatureError as exc:
                request.signature_error = str(exc)
                return error_reply(401, "NotAuthenticated", f"The required information to complete "
                                   f"authentication was not provided or was incorrect ({exc}).")
        with self.lock:
            return self.route(request)


def _default_code(status: int) -> str:
    return {400: "InvalidParameter", 401: "NotAuthenticated", 404: "NotAuthorizedOrNotFound",
            409: "Conflict", 429: "TooManyRequests", 500: "InternalServerError",
            502: "BadGateway", 503: "ServiceUnavailable", 504: "GatewayTimeout"}.get(status, "Error")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue`, as the SDK uses them
    # Headers and body leave in two writes: with Nagle's algorithm the second waits for the client's delayed
    # ACK, adding ~40 ms to every small call, which no real endpoint does.
    disable_nagle_algorithm = True
    server_fake: OCIFakeServer
    timeout = 60

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # the fake records requests; stderr stays quiet

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        request = Request(method=self.command, target=self.path,
                          headers={name.lower(): value for name, value in self.headers.items()},
                          body=self._read_body())
        reply = self.server_fake._answer(request)
        if reply is None:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        request.status = reply.status
        self.send_response(reply.status)
        headers = {"opc-request-id": uuid.uuid4().hex.upper(), **reply.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        if not isinstance(reply.body, bytes):
            self._stream(reply.body)
            return
        if "content-length" not in {name.lower() for name in headers}:
            self.send_header("content-length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD" and reply.body:
            self.wfile.write(reply.body)

    def _stream(self, chunks: Iterator[bytes]) -> None:
        """Send each chunk as soon as it comes, with chunked transfer encoding."""
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        try:
            for chunk in chunks:
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client went away
            self.close_connection = True
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle


def http_date(when: dt.datetime) -> str:
    return email.utils.format_datetime(when.astimezone(dt.timezone.utc), usegmt=True)


def rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
