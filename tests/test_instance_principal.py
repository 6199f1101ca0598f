"""`instance_principal` auth, end to end: the real `oci` SDK reads the instance's identity from a loopback
instance metadata service (IMDS, `OCI_METADATA_BASE_URL`), federates it at a loopback auth service for a
session token, and signs Object Storage (the service's store) and Data Science (the provisioner) calls with
it. The fakes verify every signature: the federation request with the instance certificate's key, later
calls with the session key the SDK sent. IMDS and the auth service exist only inside OCI, so loopback fakes
(`testbed.fakes.instance_metadata`) stand in for them; the SDK and our code run unchanged.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from sd3_service.settings import Settings
from sd3_service.storage.object_storage import ObjectStorageStore
from sd3_service.storage.spool import Spool, SpoolingStore
from sd3_service.storage.store import ImageObject, StoreError
from testbed.fakes.data_science import FakeDataScience
from testbed.fakes.instance_metadata import (FakeAuthService, FakeInstanceMetadata, InstanceIdentity, instance_identity,
                                             pem)
from testbed.fakes.object_storage import FakeObjectStorage
from testbed.fakes.oci_common import COMPARTMENT_ID, TENANCY_ID, new_rsa_key

TOOL = Path(__file__).resolve().parent.parent / "model-deployment.py"
NAME = "sd3/2026/11/25/0123abcd-0.png"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 16
HANG = 120  # seconds after which a wait is a hang, not a slow machine (how soon a give-up comes: bench/)


def image(name: str = NAME) -> ImageObject:
    return ImageObject(name=name, data=PNG, content_type="image/png", metadata={"seed": "42", "model": "tiny"})


def closed_port_url() -> str:
    """A loopback URL nothing listens on: connections are refused, as IMDS is unreachable off OCI."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/opc/v2"


def sanitized(text: str) -> str:
    """A PEM as the SDK sends it to the auth service: no BEGIN/END lines, no newlines."""
    return "".join(line for line in text.splitlines() if not line.startswith("-----"))


@pytest.fixture
def identity() -> InstanceIdentity:
    return instance_identity(region="iad")


@pytest.fixture
def storage():
    with FakeObjectStorage(namespace="tenancyns", buckets=("images",)) as server:
        yield server


@pytest.fixture
def imds(identity):
    with FakeInstanceMetadata(identity) as server:
        yield server


@pytest.fixture
def auth_service(identity, storage):
    with FakeAuthService(identity.root, relying=(storage,)) as server:
        yield server


@pytest.fixture
def on_instance(monkeypatch, imds, auth_service, storage):
    """The environment of the service on a compute instance; only the endpoints point at the fakes."""
    for name, value in {"OCI_AUTH": "instance_principal", "BUCKET_NAME": "images",
                        "OCI_METADATA_BASE_URL": imds.base_url,  # read by the SDK itself
                        "OCI_FEDERATION_ENDPOINT": auth_service.federation_endpoint,
                        "OCI_OBJECT_STORAGE_ENDPOINT": storage.endpoint}.items():
        monkeypatch.setenv(name, value)
    for name in ("OCI_RESOURCE_PRINCIPAL_VERSION", "NAMESPACE", "OCI_REGION"):
        monkeypatch.delenv(name, raising=False)


def store_for(storage, auth_service, **kwargs) -> ObjectStorageStore:
    return ObjectStorageStore(**{"bucket": "images", "auth": "instance_principal", "endpoint": storage.endpoint,
                                 "federation_endpoint": auth_service.federation_endpoint, **kwargs})


# -- the store ------------------------------------------------------------------------------------


def test_the_store_uploads_as_the_instance_principal(on_instance, identity, imds, auth_service, storage):
    store = ObjectStorageStore.from_settings(Settings())

    where = store.put(image())

    assert where.uri == f"oci://images@tenancyns/{NAME}" and storage.object("images", NAME).data == PNG
    # IMDS v2 was asked for the identity and the region, always with its header.
    assert {r.path for r in imds.requests} == {"/opc/v2/identity/cert.pem", "/opc/v2/identity/key.pem",
                                               "/opc/v2/identity/intermediate.pem", "/opc/v2/instance/region"}
    assert {r.headers.get("authorization") for r in imds.requests} == {"Bearer Oracle"}
    # One federation: the leaf and the intermediate, signed with the leaf's key under <tenancy>/fed-x509/<sha1>.
    (federation,) = auth_service.requests
    assert federation.status == 200 and federation.key_id == identity.federation_key_id
    assert identity.federation_key_id.startswith(f"{TENANCY_ID}/fed-x509/")
    body = federation.json()
    assert body["certificate"] == sanitized(pem(identity.leaf))
    assert body["intermediateCertificates"] == [sanitized(pem(identity.intermediate))]
    assert "purpose" not in body
    (token,) = auth_service.issued
    session_der = token.session_key.public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    assert base64.b64decode(body["publicKey"]) == session_der
    # Object Storage: the namespace looked up, then the upload, both as ST$<token> with the session key.
    assert [(r.method, r.path, r.status) for r in storage.requests] == [
        ("GET", "/n", 200), ("PUT", "/n/tenancyns/b/images/o/" + NAME.replace("/", "%2F"), 200)]
    assert {r.key_id for r in storage.requests} == {token.key_id}
    # The region is IMDS's ("iad", the short name), as the SDK maps it.
    assert store.describe() == {"kind": "oci", "bucket": "images", "namespace": "tenancyns",
                                "auth": "instance_principal", "region": "us-ashburn-1", "endpoint": storage.endpoint}


def test_the_region_from_imds_picks_the_object_storage_endpoint(identity, imds, auth_service, monkeypatch):
    monkeypatch.setenv("OCI_METADATA_BASE_URL", imds.base_url)
    imds.identity = instance_identity(region="fra", issuer=identity)
    store = ObjectStorageStore(bucket="images", namespace="tenancyns", auth="instance_principal",
                               federation_endpoint=auth_service.federation_endpoint)

    assert store.client().base_client.get_endpoint() == "https://objectstorage.eu-frankfurt-1.oraclecloud.com"


def test_a_revoked_token_is_renewed_at_the_auth_service_and_the_call_goes_through(on_instance, auth_service,
                                                                                   storage):
    store = ObjectStorageStore.from_settings(Settings())
    store.put(image())
    first = auth_service.issued[0]
    storage.keys.clear()  # Object Storage no longer accepts the first token

    store.put(image("sd3/2026/11/25/0123abcd-1.png"))

    assert len(auth_service.issued) == 2
    second = auth_service.issued[1]
    assert second.session_key.public_numbers() != first.session_key.public_numbers()  # a new session key too
    puts = storage.seen("PUT")
    assert [(r.status, r.key_id) for r in puts[1:]] == [(401, None), (200, second.key_id)]
    assert f'keyId="{first.key_id}"' in puts[1].headers["authorization"]  # refused, then renewed once


def test_the_auth_service_refuses_a_certificate_from_another_root(on_instance, auth_service, storage, imds):
    imds.identity = instance_identity()  # a leaf and intermediate the auth service's root never issued

    with pytest.raises(StoreError) as failure:
        ObjectStorageStore.from_settings(Settings()).put(image())

    assert str(failure.value).startswith("OCI_AUTH=instance_principal: cannot load the credential: the auth service "
                                         "answered 401 NotAuthenticated: The federation request was refused")
    assert auth_service.refusals and "does not chain" in auth_service.refusals[0]
    assert auth_service.issued == [] and storage.requests == []


def test_a_federation_request_signed_with_a_key_other_than_the_certificates_is_refused(on_instance, identity,
                                                                                      imds, auth_service, storage):
    imds.identity = dataclasses.replace(identity, leaf_key=new_rsa_key())  # key.pem does not match cert.pem

    with pytest.raises(StoreError, match="the auth service answered 401 NotAuthenticated"):
        ObjectStorageStore.from_settings(Settings()).put(image())

    assert auth_service.refusals == ["signature: signature does not verify"] and auth_service.issued == []
    assert storage.requests == []


# -- faults: one clear error, within the store's budget ------------------------------------------


def test_unreachable_imds_fails_fast_with_one_clear_line_at_start(monkeypatch, auth_service, storage, tmp_path,
                                                                 caplog):
    monkeypatch.setenv("OCI_METADATA_BASE_URL", closed_port_url())
    store = store_for(storage, auth_service, timeout_seconds=3)
    spooling = SpoolingStore(store, Spool(tmp_path / "spool"), retry_min_seconds=30)
    started = time.monotonic()
    spooling.start()
    try:
        while spooling.state == "unchecked":
            assert time.monotonic() - started < HANG, "the start-up check hangs on IMDS"
            time.sleep(0.02)
    finally:
        spooling.stop(timeout=10)

    error = spooling.describe()["error"]
    assert spooling.state == "failing"
    assert error.startswith("OCI_AUTH=instance_principal: cannot load the credential: ")
    assert "Connection refused" in error and "instance principals exist only on OCI compute instances" in error
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert errors[0].getMessage().startswith("The image store is unusable: OCI_AUTH=instance_principal")
    assert auth_service.requests == [] and storage.requests == []


def test_an_imds_error_names_the_metadata_service(on_instance, imds, auth_service, storage):
    imds.outage(500, when=lambda request: request.path.endswith("/instance/region"))

    with pytest.raises(StoreError) as failure:
        store_for(storage, auth_service, timeout_seconds=3).put(image())

    assert str(failure.value).startswith("OCI_AUTH=instance_principal: cannot load the credential: the instance "
                                         "metadata service answered 500: ")
    assert "/opc/v2/instance/region" in str(failure.value)
    assert len(imds.seen(path_contains="/instance/region")) >= 2, "a 500 is retried"
    assert auth_service.requests == [] and storage.requests == []


def test_an_auth_service_outage_fails_within_the_budget_and_recovers(on_instance, auth_service, storage):
    auth_service.outage(503)
    store = store_for(storage, auth_service, timeout_seconds=3)
    with pytest.raises(StoreError) as failure:
        store.put(image())

    message = str(failure.value)
    assert message.startswith("OCI_AUTH=instance_principal: cannot load the credential: the auth service answered "
                              "503 ServiceUnavailable")
    assert "opc-request-id" in message and "compute instances" not in message  # not "you are off OCI"
    assert len(auth_service.requests) >= 2, "a 503 is retried"
    assert storage.requests == []

    auth_service.restore()
    store.put(image())  # no credential was cached from the failed attempt: the next call federates again
    assert storage.object("images", NAME) is not None


def test_an_auth_service_outage_while_renewing_is_a_store_error_within_the_budget(on_instance, auth_service,
                                                                                  storage):
    store = store_for(storage, auth_service, timeout_seconds=3)
    store.put(image())
    storage.keys.clear()  # the token is refused, so the SDK renews it...
    auth_service.outage(503)  # ...at an auth service that is down
    with pytest.raises(StoreError) as failure:
        store.put(image("sd3/2026/11/25/0123abcd-1.png"))

    # The auth service failed, not Object Storage: the error says which.
    assert str(failure.value).startswith("OCI_AUTH=instance_principal: cannot renew the credential: the auth service "
                                         "answered 503 ServiceUnavailable")
    assert storage.object("images", "sd3/2026/11/25/0123abcd-1.png") is None


# -- the provisioner --------------------------------------------------------------------------------


@dataclasses.dataclass
class Operator:
    """`python model-deployment.py` on a compute instance: no OCI config file, only IMDS and the auth service."""

    data_science: FakeDataScience
    auth_service: FakeAuthService
    imds: FakeInstanceMetadata
    workdir: Path
    metadata_url: str | None = None  # where the SDK looks for IMDS; the fake's when None

    def run(self, *args: str) -> subprocess.CompletedProcess:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("OCI_", "SD3_DEPLOY_"))}
        environ.update({"HOME": str(self.workdir), "COLUMNS": "200",
                        "OCI_METADATA_BASE_URL": self.metadata_url or self.imds.base_url,
                        "OCI_CLI_FEDERATION_ENDPOINT": self.auth_service.federation_endpoint,
                        "OCI_DATA_SCIENCE_ENDPOINT": self.data_science.endpoint,
                        "SD3_DEPLOY_COMPARTMENT_ID": COMPARTMENT_ID})
        return subprocess.run([sys.executable, str(TOOL), *args, "--auth", "instance_principal"], cwd=self.workdir,
                              env=environ, capture_output=True, text=True, timeout=60)


@pytest.fixture
def operator(identity, imds, tmp_path):
    with FakeDataScience(polls=1) as data_science, FakeAuthService(identity.root, relying=(data_science,)) as auth:
        yield Operator(data_science, auth, imds, tmp_path)


def test_the_provisioner_calls_data_science_as_the_instance_principal(operator, identity):
    model = operator.data_science.add_model(COMPARTMENT_ID, "sd3-medium")
    operator.data_science.add_deployment(COMPARTMENT_ID, "sd3-medium", model["id"])

    result = operator.run("status", "sd3-medium")

    assert result.returncode == 0, result.stderr
    assert "state:     ACTIVE" in result.stdout
    (federation,) = operator.auth_service.requests
    assert federation.status == 200 and federation.key_id == identity.federation_key_id
    (token,) = operator.auth_service.issued
    calls = operator.data_science.seen()
    assert calls and all(r.key_id == token.key_id and r.status == 200 for r in calls), \
        [(r.method, r.path, r.status, r.signature_error) for r in calls]


def test_the_provisioner_names_the_auth_services_refusal_in_one_line(operator):
    operator.imds.identity = instance_identity()  # issued by a root the auth service does not trust

    result = operator.run("status", "sd3-medium")

    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("OCI error: 401 NotAuthenticated: The federation request was refused"), line
    assert operator.data_science.seen() == []


def test_the_provisioner_off_an_instance_gives_up_in_seconds_with_one_line(operator):
    operator.metadata_url = closed_port_url()  # nothing answers at the metadata address, as off OCI
    result = operator.run("status", "sd3-medium")

    assert result.returncode == 2  # the CLI's code for a setting or credential the operator must fix
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot set up instance_principal authentication: ConnectionError"), line
    assert "can only be used on OCI compute instances" in line
    assert operator.data_science.seen() == []
