"""The service's settings: images and the spool never land inside the read-only model artifact."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from sd3_service.settings import ARTIFACT_DIR, Settings


def test_a_relative_image_dir_inside_the_artifact_is_taken_beside_it(monkeypatch):
    monkeypatch.chdir(ARTIFACT_DIR)  # as in `cd sd3-medium && bentoml serve .`
    assert Settings(image_dir=Path("./outputs")).image_dir == ARTIFACT_DIR.parent / "outputs"


def test_a_relative_image_dir_elsewhere_is_kept(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert Settings(image_dir=Path("images")).image_dir.resolve() == tmp_path / "images"


@pytest.mark.parametrize("name", ["image_dir", "spool_dir"])
def test_an_absolute_folder_inside_the_artifact_is_refused(name):
    with pytest.raises(ValidationError, match=f"{name.upper()} must be outside the model artifact"):
        Settings(**{name: ARTIFACT_DIR / "outputs"})
