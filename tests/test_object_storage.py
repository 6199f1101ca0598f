"""The Object Storage store, with the real `oci` SDK talking HTTP to a loopback Object Storage that checks signatures."""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import hashlib
import json
import time

import httpx
import oci
import pytest

from sd3_service.settings import Settings
from sd3_service.storage.object_storage import MAX_ATTEMPTS, ObjectStorageStore, attempt_timeout
from sd3_service.storage.store import ImageObject, StoreError
from testbed.fakes import oci_common
from testbed.fakes.object_storage import FakeObjectStorage
from testbed.fakes.oci_common import Fault

NAME = "sd3/2026/11/25/0123abcd-0.png"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64
METADATA = {"seed": "42", "steps": "2", "guidance": "7.0", "width": "256", "height": "256", "model": "tiny",
            "prompt-sha256": hashlib.sha256(b"a red fox").hexdigest()}


def image(name: str = NAME, data: bytes = PNG) -> ImageObject:
    return ImageObject(name=name, data=data, content_type="image/png", metadata=METADATA)


@pytest.fixture
def fake():
    with FakeObjectStorage(namespace="tenancyns", buckets=("images",)) as server:
        yield server


@pytest.fixture
def rp(fake, tmp_path, monkeypatch):
    """Resource principal v2.2 variables, as Model Deployment sets them, trusted by the fake."""
    credentials = fake.trust(oci_common.resource_principal(tmp_path / "rp"))
    for name, value in credentials.env.items():
        monkeypatch.setenv(name, value)
    return credentials


def store_for(fake, **kwargs) -> ObjectStorageStore:
    return ObjectStorageStore(**{"bucket": "images", "endpoint": fake.endpoint, **kwargs})


# -- auth -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_files", [True, False], ids=["paths", "values"])
def test_uploads_as_the_resource_principal_by_default(fake, tmp_path, monkeypatch, as_files):
    credentials = fake.trust(oci_common.resource_principal(tmp_path / "rp", as_files=as_files))
    for name, value in credentials.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("BUCKET_NAME", "images")
    monkeypatch.setenv("OCI_OBJECT_STORAGE_ENDPOINT", fake.endpoint)
    store = ObjectStorageStore.from_settings(Settings())

    where = store.put(image())

    assert where.uri == f"oci://images@tenancyns/{NAME}"
    assert (where.bucket, where.namespace, where.url) == ("images", "tenancyns", None)
    assert fake.object("images", NAME).data == PNG
    # NAMESPACE was unset: looked up once, then the upload; both signed with the session token's key.
    assert [(r.method, r.path) for r in fake.requests] == [
        ("GET", "/n"), ("PUT", "/n/tenancyns/b/images/o/" + NAME.replace("/", "%2F"))]
    assert {r.key_id for r in fake.requests} == {credentials.key_id}
    assert credentials.key_id.startswith("ST$ey")
    assert store.describe() == {"kind": "oci", "bucket": "images", "namespace": "tenancyns",
                                "auth": "resource_principal", "region": "us-ashburn-1", "endpoint": fake.endpoint}


def test_uploads_with_an_api_key_profile(fake, tmp_path):
    credentials = fake.trust(oci_common.api_key(tmp_path / "oci", profile="SD3"))
    store = store_for(fake, auth="api_key", config_file=str(credentials.config_file), profile="SD3",
                      namespace="tenancyns")

    store.put(image())

    assert fake.object("images", NAME).data == PNG
    assert [r.key_id for r in fake.requests] == [credentials.key_id]  # NAMESPACE set: no lookup
    assert credentials.key_id == f"{oci_common.TENANCY_ID}/{oci_common.USER_ID}/" \
                                 f"{oci_common.key_fingerprint(credentials.private_key)}"


def test_uploads_with_a_security_token_profile(fake, tmp_path):
    credentials = fake.trust(oci_common.security_token(tmp_path / "oci"))
    store = store_for(fake, auth="security_token", config_file=str(credentials.config_file))

    store.put(image())

    assert fake.object("images", NAME).data == PNG
    assert {r.key_id for r in fake.requests} == {credentials.key_id}


def test_a_rotated_resource_principal_token_is_reread_from_its_files(fake, tmp_path, rp):
    store = store_for(fake)
    store.put(image())
    # The platform rotates the token and key in place; the fake only trusts the new pair from now on.
    fake.keys.clear()
    rotated = fake.trust(oci_common.resource_principal(tmp_path / "rotated"))
    for variable in ("OCI_RESOURCE_PRINCIPAL_RPST", "OCI_RESOURCE_PRINCIPAL_PRIVATE_PEM"):
        target = rp.env[variable]
        with open(rotated.env[variable]) as new, open(target, "w") as old:
            old.write(new.read())

    store.put(image("sd3/2026/11/25/0123abcd-1.png"))

    assert fake.object("images", "sd3/2026/11/25/0123abcd-1.png") is not None
    puts = fake.seen("PUT")
    assert [r.status for r in puts[1:]] == [401, 200] and puts[-1].key_id == rotated.key_id


def test_the_region_comes_from_the_signer_unless_oci_region_is_set(rp):
    assert store_for_region(None).client().base_client.get_endpoint() == \
        "https://objectstorage.us-ashburn-1.oraclecloud.com"
    assert store_for_region("eu-frankfurt-1").client().base_client.get_endpoint() == \
        "https://objectstorage.eu-frankfurt-1.oraclecloud.com"


def store_for_region(region):
    return ObjectStorageStore(bucket="images", namespace="tenancyns", region=region)


def test_nothing_is_contacted_or_loaded_before_the_first_use(fake, monkeypatch):
    for name in ("OCI_RESOURCE_PRINCIPAL_VERSION", "OCI_RESOURCE_PRINCIPAL_RPST"):
        monkeypatch.delenv(name, raising=False)
    store = store_for(fake)  # outside OCI: no resource principal, and that is fine until it is used
    assert store.describe()["kind"] == "oci" and store.location(NAME).uri == f"oci://images/{NAME}"
    assert fake.requests == []

    with pytest.raises(StoreError) as failure:
        store.put(image())

    message = str(failure.value)
    assert "OCI_AUTH=resource_principal" in message and "OCI_RESOURCE_PRINCIPAL_VERSION is not defined" in message
    assert "OCI_AUTH=api_key" in message  # says what to do about it
    assert fake.requests == []


def test_a_key_the_service_does_not_know_is_refused_once_with_a_clear_error(fake, tmp_path):
    stranger = oci_common.api_key(tmp_path / "oci")  # never trusted by the fake
    store = store_for(fake, auth="api_key", config_file=str(stranger.config_file), namespace="tenancyns")

    with pytest.raises(StoreError, match=r"401 NotAuthenticated.*credential \(OCI_AUTH=api_key\) was refused"):
        store.put(image())

    assert len(fake.requests) == 1, "a 401 is not retried"
    assert fake.requests[0].signature_error == "unknown keyId"
    assert fake.object("images", NAME) is None


def test_a_missing_bucket_is_not_retried_and_says_so(fake, rp):
    store = store_for(fake, bucket="no-such-bucket", namespace="tenancyns")
    with pytest.raises(StoreError, match="404 BucketNotFound.*bucket 'no-such-bucket' does not exist"):
        store.put(image())
    assert len(fake.requests) == 1


# -- names and metadata -----------------------------------------------------------------------------


def test_content_type_md5_and_metadata_go_with_the_object_and_the_prompt_does_not(fake, rp):
    store_for(fake, namespace="tenancyns").put(image())

    put = fake.seen("PUT")[0]
    assert put.headers["content-type"] == "image/png"
    assert put.headers["content-md5"] == base64.b64encode(hashlib.md5(PNG).digest()).decode()
    assert {k: v for k, v in put.headers.items() if k.startswith("opc-meta-")} == \
        {f"opc-meta-{k}": v for k, v in METADATA.items()}
    assert b"a red fox" not in json.dumps(put.headers).encode()
    stored = fake.object("images", NAME)
    assert stored.content_type == "image/png" and stored.metadata == METADATA
    # And read back through the SDK, as an operator would.
    got = store_for(fake, namespace="tenancyns").client().get_object("tenancyns", "images", NAME)
    assert got.data.content == PNG and got.headers["opc-meta-prompt-sha256"] == METADATA["prompt-sha256"]


def test_non_ascii_metadata_is_percent_encoded_not_fatal(fake, rp):
    odd = ImageObject(name=NAME, data=PNG, content_type="image/png", metadata={"model": "/models/sd3-é"})
    store_for(fake, namespace="tenancyns").put(odd)
    assert fake.object("images", NAME).metadata == {"model": "/models/sd3-%C3%A9"}


# -- retries ----------------------------------------------------------------------------------------


def test_a_burst_of_503_and_429_then_success_is_stored(fake, rp):
    fake.fail_next(2, 503, when=lambda r: r.method == "PUT")
    fake.fail_next(1, 429, when=lambda r: r.method == "PUT")

    store_for(fake, namespace="tenancyns", timeout_seconds=10).put(image())

    assert [r.status for r in fake.seen("PUT")] == [503, 503, 429, 200]
    assert fake.object("images", NAME).data == PNG


def test_dropped_connections_and_slow_answers_are_retried(fake, rp):
    budget = 10
    fake.drop_next(1, when=lambda r: r.method == "PUT")
    fake.delay_next(1, seconds=attempt_timeout(budget)[1] + 1.5, when=lambda r: r.method == "PUT")

    store_for(fake, namespace="tenancyns", timeout_seconds=budget).put(image())

    statuses = [r.status for r in fake.seen("PUT")]
    assert statuses[0] is None and len(statuses) == 3 and statuses[-1] == 200  # dropped, timed out, stored
    assert fake.object("images", NAME).data == PNG


@pytest.mark.parametrize("outage", ["503", "dropped", "slow"])
def test_retries_end_within_the_budget_when_the_outage_lasts(fake, rp, outage):
    budget = 4.0
    if outage == "503":
        fake.outage(503)
    elif outage == "dropped":
        fake.outage(None)
    else:
        fake.inject(Fault("delay", count=None, seconds=budget + 2))
    store = store_for(fake, namespace="tenancyns", timeout_seconds=budget)

    with pytest.raises(StoreError) as failure:
        store.put(image())

    # The state reached: a StoreError after a bounded number of attempts (the SDK's default strategy would go on
    # retrying for minutes). How soon it gives up is a speed, measured by bench/store_give_up.py, not here.
    attempts = len(fake.seen("PUT"))
    assert 2 <= attempts <= MAX_ATTEMPTS, attempts
    expected = "503 ServiceUnavailable" if outage == "503" else "cannot reach Object Storage"
    assert expected in str(failure.value)


# -- links ------------------------------------------------------------------------------------------


def test_return_url_gives_a_read_only_link_that_expires_after_the_ttl(fake, rp):
    store = store_for(fake, namespace="tenancyns", return_url=True, url_ttl_seconds=900)
    put_began = dt.datetime.now(dt.timezone.utc)

    where = store.put(image())

    assert where.url and where.url.startswith(fake.endpoint + "/p/")
    assert httpx.get(where.url).content == PNG  # no signature needed: that is the point of the link
    assert httpx.put(where.url, content=b"overwrite").status_code == 403
    request = fake.seen("POST", "/p")[0].json()
    assert request["accessType"] == "ObjectRead" and request["objectName"] == NAME
    expires = dt.datetime.fromisoformat(request["timeExpires"].replace("Z", "+00:00"))
    # The TTL counts from the upload: the expiry lies between "before the put" and "now", each plus 900 s.
    ttl = dt.timedelta(seconds=900)
    assert put_began + ttl - dt.timedelta(seconds=1) <= expires <= dt.datetime.now(dt.timezone.utc) + ttl


def test_without_return_url_no_link_is_made(fake, rp):
    assert store_for(fake, namespace="tenancyns").put(image()).url is None
    assert fake.seen("POST", "/p") == []


def test_a_link_that_cannot_be_made_leaves_the_image_stored(fake, rp, caplog):
    fake.fail_next(1, 404, code="NotAuthorizedOrNotFound", when=lambda r: "/p" in r.path)
    where = store_for(fake, namespace="tenancyns", return_url=True).put(image())
    assert where.url is None and fake.object("images", NAME).data == PNG
    assert f"Stored {NAME} but could not create its link" in caplog.text


# -- the fake itself: it must refuse what OCI refuses, or the tests above prove nothing ----------------


def signer_for(credentials) -> oci.signer.Signer:
    tenancy, user, fingerprint = credentials.key_id.split("/")
    return oci.signer.Signer(tenancy, user, fingerprint, None,
                             private_key_content=oci_common.private_pem(credentials.private_key))


def send(prepared) -> int:
    from oci._vendor import requests
    with requests.Session() as session:
        return session.send(prepared).status_code


def prepare(method, url, body=None, headers=None):
    from oci._vendor import requests
    return requests.Request(method, url, data=body, headers=headers or {}).prepare()


def test_the_fake_accepts_a_correctly_signed_request(fake, tmp_path):
    credentials = fake.trust(oci_common.api_key(tmp_path / "oci"))
    assert send(signer_for(credentials)(prepare("GET", fake.endpoint + "/n"))) == 200


def test_the_fake_refuses_unsigned_and_wrongly_signed_requests(fake, tmp_path):
    credentials = fake.trust(oci_common.api_key(tmp_path / "oci"))
    signer = signer_for(credentials)
    url = fake.endpoint + "/n/tenancyns/b/"

    assert httpx.get(fake.endpoint + "/n").status_code == 401  # unsigned

    altered_date = signer(prepare("GET", fake.endpoint + "/n"))
    altered_date.headers["date"] = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert send(altered_date) == 401

    other_path = signer(prepare("GET", fake.endpoint + "/n"))
    other_path.url = fake.endpoint + "/n/?compartmentId=x"
    assert send(other_path) == 401

    impostor = oci_common.api_key(tmp_path / "other")  # same key id, different private key
    forged = oci.signer.Signer(*credentials.key_id.split("/"), None,
                               private_key_content=oci_common.private_pem(impostor.private_key))
    assert send(forged(prepare("GET", fake.endpoint + "/n"))) == 401

    swapped_body = signer(prepare("POST", url, b'{"name": "a", "compartmentId": "c"}',
                                  {"content-type": "application/json"}))
    swapped_body.body = b'{"name": "b", "compartmentId": "c"}'
    assert send(swapped_body) == 401

    stale = prepare("GET", fake.endpoint + "/n",
                    headers={"date": email.utils.formatdate(time.time() - 3600, usegmt=True)})
    assert send(signer(stale)) == 401

    body_unsigned = signer.without_content_headers(prepare("POST", url, b'{"name": "c", "compartmentId": "c"}',
                                                           {"content-type": "application/json"}))
    assert send(body_unsigned) == 401  # only object data may leave its body out of the signature

    assert [r.signature_error for r in fake.requests] == [
        "no Authorization header", "signature does not verify", "signature does not verify",
        "signature does not verify", "x-content-sha256 does not match the body",
        f"date {stale.headers['date']!r} is missing or more than 300 s off",
        "headers ['content-length', 'content-type', 'x-content-sha256'] must be signed",
    ]
    assert fake.names("images") == [] and set(fake.buckets) == {"images"}


def test_the_fake_serves_the_sdk_upload_manager_multipart_path(fake, tmp_path, rp):
    """The provisioner uploads large artifacts with `UploadManager`; it must work against the fake too."""
    client = store_for(fake).client()
    artifact = tmp_path / "artifact.zip"
    artifact.write_bytes(bytes(range(256)) * (11 * 1024 + 7))  # 2.75 MiB: three 1 MiB parts
    manager = oci.object_storage.UploadManager(client, allow_multipart_uploads=True, parallel_process_count=3)

    response = manager.upload_file("tenancyns", "images", "artifacts/model.zip", str(artifact),
                                   part_size=1024 * 1024, metadata={"purpose": "test"})

    stored = fake.object("images", "artifacts/model.zip")
    assert response.status == 200 and stored.data == artifact.read_bytes()
    assert response.headers["opc-multipart-md5"].endswith("-3") and stored.metadata == {"purpose": "test"}
    calls = sorted((r.method, r.path.removeprefix("/n/tenancyns/b/images/")[:2]) for r in fake.requests)
    assert calls == [("POST", "u"), ("POST", "u/")] + [("PUT", "u/")] * 3  # create, commit, three parts
    assert all(r.key_id == rp.key_id for r in fake.requests) and fake.uploads == {}
