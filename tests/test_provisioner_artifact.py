"""The model artifact zip: deterministic, stored, files at the root, no caches, weights and LoRA catalog included."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import pytest

from provisioner.artifact import file_sha256, list_artifact_files, write_artifact_zip

SERVICE_DIR = Path(__file__).resolve().parent.parent / "sd3-medium"


def service_copy(tmp_path: Path) -> Path:
    """A copy of sd3-medium/ plus what must not go into the artifact and optional weights that must."""
    source = tmp_path / "sd3-medium"
    shutil.copytree(SERVICE_DIR, source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "outputs"))
    (source / "__pycache__").mkdir()
    (source / "__pycache__" / "service.cpython-311.pyc").write_bytes(b"bytecode")
    (source / "sd3_service" / "stale.pyc").write_bytes(b"bytecode")
    (source / ".pytest_cache").mkdir()
    (source / ".pytest_cache" / "README.md").write_text("cache")
    (source / "outputs").mkdir()
    (source / "outputs" / "image.png").write_bytes(b"\x89PNG")
    (source / "model" / "transformer").mkdir(parents=True)
    (source / "model" / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    (source / "model" / "transformer" / "weights.safetensors").write_bytes(os.urandom(300_000))
    (source / "loras").mkdir(exist_ok=True)  # the LoRA catalog (in the repository with its .gitignore)
    (source / "loras" / "watercolour.safetensors").write_bytes(os.urandom(50_000))
    return source


def expected_files(source: Path) -> dict[str, bytes]:
    files = {}
    for path in source.rglob("*"):
        rel = path.relative_to(source)
        if path.is_file() and not {"__pycache__", ".pytest_cache"} & set(rel.parts) \
                and rel.parts[0] != "outputs" and path.suffix != ".pyc":
            files[rel.as_posix()] = path.read_bytes()
    return files


def test_zip_holds_exactly_the_service_files_at_its_root_uncompressed(tmp_path):
    source = service_copy(tmp_path)
    info = write_artifact_zip(source, tmp_path / "out" / "a.zip")

    with zipfile.ZipFile(info.path) as zf:
        entries = zf.infolist()
        contents = {e.filename: zf.read(e) for e in entries}
    assert contents == expected_files(source)
    assert "service.py" in contents and "model/transformer/weights.safetensors" in contents
    assert "loras/watercolour.safetensors" in contents and "sd3_service/pipelines/loras.py" in contents
    assert [e.filename for e in entries] == sorted(contents)
    assert all(e.compress_type == zipfile.ZIP_STORED and e.date_time == (1980, 1, 1, 0, 0, 0) for e in entries)
    assert info.size == info.path.stat().st_size and info.sha256 == file_sha256(info.path)
    assert info.file_count == len(entries)
    assert not (tmp_path / "out" / "a.zip.partial").exists()


def test_same_folder_gives_the_same_bytes_whatever_the_mtimes(tmp_path):
    source = service_copy(tmp_path)
    first = write_artifact_zip(source, tmp_path / "1.zip")
    for path in source.rglob("*"):
        os.utime(path, (1_900_000_000, 1_900_000_000))
    second = write_artifact_zip(source, tmp_path / "2.zip")
    assert (tmp_path / "1.zip").read_bytes() == (tmp_path / "2.zip").read_bytes()
    assert first.sha256 == second.sha256

    (source / "service.py").write_text((source / "service.py").read_text() + "\n# changed\n")
    assert write_artifact_zip(source, tmp_path / "3.zip").sha256 != first.sha256


def test_a_folder_without_service_py_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="service.py"):
        list_artifact_files(tmp_path)
