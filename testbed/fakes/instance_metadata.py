"""Instance principals on loopback: the instance metadata service (IMDS) and the auth service's X.509
federation endpoint, for the real `oci` SDK (see `testbed.fakes.oci_common`).

On an OCI compute instance, `oci.auth.signers.InstancePrincipalsSecurityTokenSigner` reads the instance's
region and its X.509 identity (a leaf certificate with its private key, and the intermediate certificate
that issued it) from IMDS at `http://169.254.169.254/opc/v2` (the SDK reads `OCI_METADATA_BASE_URL`
instead when set). It then makes a session key pair of its own and POSTs the leaf certificate, the
intermediate and the session public key to `https://auth.<region>.oraclecloud.com/v1/x509`, signed with
the leaf's private key under the key id `<tenancy OCID>/fed-x509/<SHA-1 fingerprint of the leaf>`. The
auth service answers `{"token": <JWT>}`, and every later request is signed with the session private key
under the key id `ST$<token>`.

`FakeInstanceMetadata` serves that identity (only to callers that send IMDS v2's `Authorization: Bearer
Oracle`). `FakeAuthService` checks the federation request as the auth service does: the leaf chains
through the intermediate to the root the test made, carries the tenancy in its subject, and its key
verifies the request signature; it then issues a token for the session public key and tells the fakes
that rely on it (Object Storage, Data Science) to accept `ST$<token>` signed with that session key.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import time
import uuid
from dataclasses import dataclass

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from testbed.fakes.oci_common import (COMPARTMENT_ID, TENANCY_ID, OCIFakeServer, Reply, Request, SignatureError,
                                      error_reply, json_reply, new_rsa_key, private_pem, verify_signature)

INSTANCE_ID = "ocid1.instance.oc1.iad.aaaatestinstance"
IMDS_PATH = "/opc/v2"
FEDERATION_PATH = "/v1/x509"
FEDERATION_SIGNED_HEADERS = ("date", "(request-target)")  # the SDK's AuthTokenRequestSigner does not sign host


# -- the instance's identity --------------------------------------------------------------------


def _certificate(subject: x509.Name, key: rsa.RSAPrivateKey, issuer: x509.Name, issuer_key: rsa.RSAPrivateKey,
                 ca: bool, days: int = 1) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(issuer_key, hashes.SHA256()))


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def fingerprint(cert: x509.Certificate) -> str:
    """The SHA-1 fingerprint the SDK puts in the federation key id: upper-case hex pairs joined by colons."""
    return ":".join(f"{byte:02X}" for byte in cert.fingerprint(hashes.SHA1()))


@dataclass(frozen=True)
class InstanceIdentity:
    """A compute instance's X.509 identity as IMDS hands it out, and the root the auth service trusts."""

    root: x509.Certificate
    intermediate: x509.Certificate
    leaf: x509.Certificate
    leaf_key: rsa.RSAPrivateKey
    intermediate_key: rsa.RSAPrivateKey  # only to issue more leaves (`instance_identity(issuer=...)`)
    tenancy_id: str
    instance_id: str
    region: str  # as IMDS answers /instance/region: the short name for older regions, e.g. "iad"

    @property
    def federation_key_id(self) -> str:
        return f"{self.tenancy_id}/fed-x509/{fingerprint(self.leaf)}"


def instance_identity(tenancy_id: str = TENANCY_ID, instance_id: str = INSTANCE_ID, region: str = "iad",
                      issuer: InstanceIdentity | None = None) -> InstanceIdentity:
    """A root CA, an intermediate and a leaf whose subject names the tenancy as OCI's instance certificates do.

    Args:
        issuer: reuse this identity's root and intermediate (a second instance of the same realm).
    """
    if issuer is None:
        root_key, intermediate_key = new_rsa_key(), new_rsa_key()
        root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Fake OCI Identity Root")])
        intermediate_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Fake PKISVC Identity Intermediate")])
        root = _certificate(root_name, root_key, root_name, root_key, ca=True)
        intermediate = _certificate(intermediate_name, intermediate_key, root_name, root_key, ca=True)
    else:
        root, intermediate, intermediate_key = issuer.root, issuer.intermediate, issuer.intermediate_key
    leaf_key = new_rsa_key()
    leaf_name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, instance_id),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "opc-certtype:instance"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"opc-compartment:{COMPARTMENT_ID}"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"opc-instance:{instance_id}"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"opc-tenant:{tenancy_id}"),
    ])
    leaf = _certificate(leaf_name, leaf_key, intermediate.subject, intermediate_key, ca=False)
    return InstanceIdentity(root, intermediate, leaf, leaf_key, intermediate_key, tenancy_id, instance_id, region)


# -- IMDS ---------------------------------------------------------------------------------------


class FakeInstanceMetadata(OCIFakeServer):
    """The instance metadata service (v2) of one instance; point the SDK at it with `OCI_METADATA_BASE_URL`."""

    def __init__(self, identity: InstanceIdentity):
        super().__init__()
        self.identity = identity

    @property
    def base_url(self) -> str:
        """The value for `OCI_METADATA_BASE_URL`."""
        return self.endpoint + IMDS_PATH

    def is_public(self, request: Request) -> bool:
        return True  # IMDS is reachable only from the instance itself; it signs nothing

    def route(self, request: Request) -> Reply:
        if request.headers.get("authorization") != "Bearer Oracle":
            return error_reply(401, "NotAuthenticated", "IMDS v2 requires the header 'Authorization: Bearer Oracle'")
        identity = self.identity
        answers = {
            "/instance/region": identity.region,
            "/instance/id": identity.instance_id,
            "/identity/cert.pem": pem(identity.leaf),
            "/identity/key.pem": private_pem(identity.leaf_key),
            "/identity/intermediate.pem": pem(identity.intermediate),
        }
        path = request.path.removeprefix(IMDS_PATH)
        if request.method != "GET" or not request.path.startswith(IMDS_PATH) or path not in answers:
            return error_reply(404, "NotFound", f"no metadata at {request.path}")
        return Reply(200, answers[path].encode("ascii"), {"content-type": "text/plain"})


# -- the auth service ---------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedToken:
    """A session token the fake auth service issued, and the session key it is bound to."""

    token: str
    session_key: rsa.RSAPublicKey
    instance_id: str
    expires: int

    @property
    def key_id(self) -> str:
        return f"ST${self.token}"


class FederationError(Exception):
    """The federation request is not one the auth service accepts; it answers 401."""


def _der(sanitized: str) -> bytes:
    # The SDK sends PEM with its BEGIN/END lines and newlines stripped: plain base64 of the DER bytes.
    return base64.b64decode(sanitized, validate=True)


def _tenancy_of(cert: x509.Certificate) -> str | None:
    for attribute in cert.subject:
        if isinstance(attribute.value, str) and attribute.value.startswith("opc-tenant:"):
            return attribute.value.removeprefix("opc-tenant:")
    return None


class FakeAuthService(OCIFakeServer):
    """The X.509 federation endpoint of OCI's auth service, trusting one root CA.

    Args:
        root: the root the leaf must chain to, through one of the intermediates sent with it.
        relying: fakes that accept the tokens it issues (`ST$<token>` signed with the session key).
        token_lifetime_seconds: how long an issued token is valid (the SDK renews it 60 s before expiry).
    """

    def __init__(self, root: x509.Certificate, relying: tuple[OCIFakeServer, ...] = (),
                 token_lifetime_seconds: int = 3600):
        super().__init__()
        self.root = root
        self.relying = list(relying)
        self.token_lifetime_seconds = token_lifetime_seconds
        self.issued: list[IssuedToken] = []
        self.refusals: list[str] = []

    @property
    def federation_endpoint(self) -> str:
        """The full URL the signer POSTs to (its `federation_endpoint`)."""
        return self.endpoint + FEDERATION_PATH

    def is_public(self, request: Request) -> bool:
        return True  # the key that signs a federation request arrives in its body; `route` checks it

    def route(self, request: Request) -> Reply:
        if (request.method, request.path) != ("POST", FEDERATION_PATH):
            return error_reply(404, "NotFound", f"no route for {request.method} {request.path}")
        try:
            issued = self._federate(request)
        except FederationError as exc:
            self.refusals.append(str(exc))
            return error_reply(401, "NotAuthenticated", f"The federation request was refused ({exc}).")
        return json_reply(200, {"token": issued.token})

    def _federate(self, request: Request) -> IssuedToken:
        try:
            body = request.json()
            leaf = x509.load_der_x509_certificate(_der(body["certificate"]))
            intermediates = [x509.load_der_x509_certificate(_der(text))
                             for text in body.get("intermediateCertificates", [])]
            session_key = serialization.load_der_public_key(_der(body["publicKey"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise FederationError(f"malformed body: {type(exc).__name__}: {exc}") from None
        if "purpose" in body:
            raise FederationError(f"purpose {body['purpose']!r}: an instance principal sends none")
        if not isinstance(session_key, rsa.RSAPublicKey) or session_key.key_size < 2048:
            raise FederationError("the session key is not an RSA key of at least 2048 bits")
        self._check_chain(leaf, intermediates)
        tenancy = _tenancy_of(leaf)
        if tenancy is None:
            raise FederationError("the certificate names no tenancy (opc-tenant:)")
        expected_key_id = f"{tenancy}/fed-x509/{fingerprint(leaf)}"
        try:
            verify_signature(request.method, request.target, request.headers, request.body,
                             {expected_key_id: leaf.public_key()}, body_signed=True,
                             generic_headers=FEDERATION_SIGNED_HEADERS)
        except SignatureError as exc:
            request.signature_error = str(exc)
            raise FederationError(f"signature: {exc}") from None
        request.key_id = expected_key_id
        if session_key.public_numbers() == leaf.public_key().public_numbers():
            raise FederationError("the session key must not be the certificate's key")
        return self._issue(leaf, tenancy, session_key)

    def _check_chain(self, leaf: x509.Certificate, intermediates: list[x509.Certificate]) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        for cert in (leaf, *intermediates):
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                raise FederationError(f"certificate {cert.subject.rfc4514_string()} is not valid now")
        for intermediate in intermediates:
            try:
                leaf.verify_directly_issued_by(intermediate)
                intermediate.verify_directly_issued_by(self.root)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return
        raise FederationError("the certificate does not chain to a trusted root through the intermediates sent")

    def _issue(self, leaf: x509.Certificate, tenancy: str, session_key: rsa.RSAPublicKey) -> IssuedToken:
        now = int(time.time())
        instance_id = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        numbers = session_key.public_numbers()
        claims = {
            "sub": instance_id, "iss": "authService.oracle.com", "ttype": "x509", "tenant": tenancy,
            "opc-instance": instance_id, "opc-tenant": tenancy, "opc-compartment": COMPARTMENT_ID,
            "iat": now, "exp": now + self.token_lifetime_seconds, "jti": uuid.uuid4().hex,
            # Real tokens carry the session public key they are bound to, as a JWK.
            "jwk": json.dumps({"kty": "RSA", "alg": "RS256", "use": "sig",
                               "kid": hashlib.sha256(str(numbers.n).encode()).hexdigest()[:16],
                               "n": _b64url(numbers.n), "e": _b64url(numbers.e)}),
        }
        token = jwt.encode(claims, "fake-auth-service-signing-key-0123456789", algorithm="HS256")
        issued = IssuedToken(token, session_key, instance_id, claims["exp"])
        self.issued.append(issued)
        for fake in self.relying:
            with fake.lock:
                fake.keys[issued.key_id] = session_key
        return issued


def _b64url(number: int) -> str:
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

