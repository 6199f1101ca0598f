"""Estimate the image's size without a Docker engine: what pip would unpack into it, measured.

- torch (CUDA build) and the CUDA libraries it pins: the uncompressed sizes in each wheel's zip
  directory, read from PyPI with HTTP range requests (no wheel is downloaded whole). PyPI's Linux
  torch wheel is its default CUDA variant; other variants from the PyTorch index are of similar size.
- every other runtime package in requirements.lock: its installed size in this venv (from RECORD).
- the base image and curl are not measured here (no Docker engine): the figures below are estimates.

Usage: python tools/estimate_image_size.py   (needs PyPI; prints a table in MB)
"""

from __future__ import annotations

import io
import json
import sys
import urllib.request
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

sys.path.insert(0, str(Path(__file__).resolve().parent))
from write_lock import LOCK  # noqa: E402

INDEX = "https://pypi.org/simple"
BASE_IMAGE_MB = 125  # python:3.11-slim-bookworm, uncompressed, as Docker Hub lists it (not measured here)
CURL_MB = 15  # curl and its libraries from Debian (not measured here)
MB = 1_000_000


class RangeFile(io.RawIOBase):
    """A read-only, seekable view of a remote file that fetches only the bytes asked for."""

    def __init__(self, url: str, size: int):
        self.url, self.size, self.pos = url, size, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-{end - 1}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            data = response.read()
        self.pos += len(data)
        return data


def project_files(name: str) -> list[dict]:
    request = urllib.request.Request(f"{INDEX}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)["files"]


def best_wheel(req: Requirement) -> dict:
    """The newest wheel of `req` that pip would pick for this platform (CPython 3.11, Linux x86_64)."""
    tags = {str(t): rank for rank, t in enumerate(sys_tags())}
    candidates = []
    for file in project_files(canonicalize_name(req.name)):
        if not file["filename"].endswith(".whl") or file.get("yanked"):
            continue
        _, version, _, wheel_tags = parse_wheel_filename(file["filename"])
        ranks = [tags[str(t)] for t in wheel_tags if str(t) in tags]
        if ranks and req.specifier.contains(version, prereleases=False):
            candidates.append((version, -min(ranks), file))
    if not candidates:
        raise SystemExit(f"no wheel for {req}")
    return max(candidates, key=lambda c: (c[0], c[1]))[2]


def read_wheel(file: dict, extras: set[str]) -> tuple[int, list[Requirement]]:
    """The wheel's unpacked size and the requirements it has here, from its zip directory and METADATA."""
    with zipfile.ZipFile(RangeFile(file["url"], file["size"])) as wheel:
        size = sum(info.file_size for info in wheel.infolist())
        name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        text = wheel.read(name).decode()
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines() if line.startswith("Requires-Dist:")]
    env = default_environment()
    return size, [r for r in reqs if not r.marker or any(r.marker.evaluate({**env, "extra": e}) for e in {"", *extras})]


def torch_cuda_closure(torch_pin: str, locked: set[str]) -> dict[str, tuple[str, int, int]]:
    """torch and the packages it adds on Linux that the lock does not hold: {name: (wheel, zip, unpacked)}."""
    sizes: dict[str, tuple[str, int, int]] = {}
    queue = [Requirement(torch_pin)]
    while queue:
        req = queue.pop()
        name = canonicalize_name(req.name)
        if name in sizes or (name in locked and name != "torch"):
            continue
        file = best_wheel(req)
        size, requirements = read_wheel(file, set(req.extras))
        sizes[name] = (file["filename"], file["size"], size)
        queue.extend(requirements)
    return sizes


def installed_size(name: str) -> int:
    files = metadata.distribution(name).files or []
    return sum(f.size or 0 for f in files)


def main() -> None:
    lock = [Requirement(line) for line in LOCK.read_text().split("# test only")[0].splitlines()
            if line and not line.startswith("#")]
    locked = {canonicalize_name(r.name) for r in lock}
    torch_pin = next(str(r) for r in lock if r.name == "torch")
    cuda = torch_cuda_closure(torch_pin, locked)
    rows = [(name, wheel, z / MB, u / MB) for name, (wheel, z, u) in sorted(cuda.items(), key=lambda kv: -kv[1][2])]
    others = sum(installed_size(r.name) for r in lock if r.name != "torch") / MB
    total = sum(r[3] for r in rows) + others + BASE_IMAGE_MB + CURL_MB
    for name, wheel, z, u in rows:
        print(f"{u:9.0f} MB unpacked ({z:6.0f} MB wheel)  {wheel}")
    print(f"{others:9.0f} MB  the other {len(lock) - 1} runtime packages of requirements.lock, as installed here")
    print(f"{BASE_IMAGE_MB:9.0f} MB  base image python:3.11-slim-bookworm (not measured)")
    print(f"{CURL_MB:9.0f} MB  curl from Debian (not measured)")
    print(f"{total:9.0f} MB  estimated image size, without baked weights")


if __name__ == "__main__":
    sys.exit(main())
