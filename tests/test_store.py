"""The local-folder store: atomic writes under server-made names, and a clear error when it cannot write."""

import datetime as dt

import pytest

from sd3_service.storage.naming import image_name
from sd3_service.storage.store import ImageObject, LocalFolderStore, StoreError


def test_object_names_are_dated_and_built_from_the_request_id():
    when = dt.datetime(2026, 1, 2, 23, 59, tzinfo=dt.timezone.utc)
    assert image_name("sd3/", "abc", 3, "webp", when) == "sd3/2026/01/02/abc-3.webp"


def test_put_writes_the_bytes_and_answers_a_file_uri(tmp_path):
    store = LocalFolderStore(tmp_path / "images")
    where = store.put(ImageObject(name="sd3/2026/01/02/r-0.png", data=b"png bytes", content_type="image/png"))
    path = tmp_path / "images" / "sd3/2026/01/02/r-0.png"
    assert path.read_bytes() == b"png bytes"
    assert where.uri == path.as_uri() == store.location("sd3/2026/01/02/r-0.png").uri
    assert where.bucket is None and where.namespace is None
    assert [p.name for p in path.parent.iterdir()] == ["r-0.png"]  # no temporary file left behind


def test_an_unwritable_folder_raises_store_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(StoreError, match="cannot write"):
        LocalFolderStore(blocker).put(ImageObject(name="a/b.png", data=b"x", content_type="image/png"))
