"""Fixtures shared by the unit tests: the loopback Object Storage and the real store signing against it."""

from __future__ import annotations

import pytest

from sd3_service.storage.object_storage import ObjectStorageStore
from testbed.fakes import oci_common
from testbed.fakes.object_storage import FakeObjectStorage


@pytest.fixture
def fake():
    with FakeObjectStorage(namespace="tenancyns", buckets=("images",)) as server:
        yield server


@pytest.fixture
def bucket(fake, tmp_path, monkeypatch) -> ObjectStorageStore:
    """The real Object Storage store, signing as a resource principal the fake trusts."""
    credentials = fake.trust(oci_common.resource_principal(tmp_path / "rp"))
    for name, value in credentials.env.items():
        monkeypatch.setenv(name, value)
    return ObjectStorageStore(bucket="images", namespace="tenancyns", endpoint=fake.endpoint, timeout_seconds=3)
