"""The model artifact: a deterministic, uncompressed zip of `sd3-medium/` with its files at the root."""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Caches and bytecode never belong in the artifact; `outputs/` is where a local run writes images.
EXCLUDED_DIR_NAMES = frozenset({"__pycache__", ".pytest_cache", ".ipynb_checkpoints", ".mypy_cache",
                                ".ruff_cache", ".git", ".cache"})
EXCLUDED_TOP_LEVEL_DIRS = frozenset({"outputs"})
EXCLUDED_FILE_SUFFIXES = (".pyc", ".pyo")
EXCLUDED_FILE_NAMES = frozenset({".DS_Store"})
# The earliest time a zip entry can carry; any fixed value makes the bytes independent of mtimes.
FIXED_DATE_TIME = (1980, 1, 1, 0, 0, 0)
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ArtifactInfo:
    """A written artifact zip."""

    path: Path
    size: int
    sha256: str
    file_count: int


def list_artifact_files(source_dir: Path) -> list[tuple[str, Path]]:
    """Every file that goes into the artifact as (name in the zip, path on disk), sorted by name."""
    if not (source_dir / "service.py").is_file():
        raise FileNotFoundError(f"{source_dir} does not look like the service folder (no service.py)")
    entries: list[tuple[str, Path]] = []
    for root, dirs, files in os.walk(source_dir, followlinks=True):
        rel_root = Path(root).relative_to(source_dir)
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIR_NAMES
                   and not (rel_root == Path(".") and d in EXCLUDED_TOP_LEVEL_DIRS)]
        for name in files:
            if name.endswith(EXCLUDED_FILE_SUFFIXES) or name in EXCLUDED_FILE_NAMES:
                continue
            path = Path(root) / name
            entries.append(((rel_root / name).as_posix(), path))
    return sorted(entries)


def write_artifact_zip(source_dir: Path, output: Path,
                       on_bytes: Callable[[int], None] | None = None) -> ArtifactInfo:
    """Zip `source_dir` into `output` (stored, fixed timestamps and modes, sorted) and return its size and sha256.

    `on_bytes` is called with the number of source bytes copied, for a progress bar.
    """
    files = list_artifact_files(source_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as zf:
        for arcname, path in files:
            info = zipfile.ZipInfo(arcname, date_time=FIXED_DATE_TIME)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3  # unix, so the bytes do not depend on the OS that packs
            mode = 0o755 if os.access(path, os.X_OK) else 0o644
            info.external_attr = (0o100000 | mode) << 16
            info.file_size = path.stat().st_size  # lets zipfile pick zip64 up front for multi-GB weights
            with path.open("rb") as src, zf.open(info, "w") as dst:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
                    if on_bytes:
                        on_bytes(len(chunk))
    os.replace(partial, output)
    return ArtifactInfo(path=output, size=output.stat().st_size, sha256=file_sha256(output), file_count=len(files))


def describe_artifact(path: Path) -> ArtifactInfo:
    """Size, sha256 and entry count of an existing artifact zip."""
    if not path.is_file():
        raise FileNotFoundError(f"artifact {path} does not exist; run `package` first or drop --artifact")
    with zipfile.ZipFile(path) as zf:
        count = len(zf.infolist())
    return ArtifactInfo(path=path, size=path.stat().st_size, sha256=file_sha256(path), file_count=count)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def source_size(source_dir: Path) -> int:
    """Total bytes of the files that go into the artifact."""
    return sum(path.stat().st_size for _, path in list_artifact_files(source_dir))
