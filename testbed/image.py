"""Build the container image from the Dockerfile as written, without a Docker engine: for `bash dev.sh image`.

As root on Debian: buildah (chroot isolation) builds the Dockerfile on a stand-in base made by debootstrap,
since the real base cannot be pulled here, with torch's CPU wheel from this machine's disk served as a
one-package index; podman keeps the stand-in base and buildah the built layers, so a later run rebuilds only
from the first step whose inputs changed (the Dockerfile, the lock, the service code).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

IMAGE = "localhost/sd3-medium:check"
BASE = "localhost/sd3-standin-base:bookworm"
WORK = Path(os.environ.get("SD3_IMAGE_WORK", "/var/tmp/sd3-image"))  # kept between runs, outside the clone
ARTIFACT_MOUNT = "/opt/ds/model/deployed_model"
TOOLS = {"buildah": "buildah", "podman": "podman", "debootstrap": "debootstrap"}
HOW = ("build it on a Debian (bookworm) machine as root, where `bash dev.sh image` installs Debian's buildah, "
       "podman and debootstrap itself; or with Docker: `docker build -t sd3-medium .` (docs/container.md)")


class CannotBuild(Exception):
    """This machine cannot build the image (not root, no Debian packages): says why and how to do it elsewhere."""


@dataclass(frozen=True)
class ImageBuild:
    steps: int
    cached_steps: int
    seconds: float
    size_bytes: int


def _run(*command: str, **options) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, text=True, **options)


def ensure_tools() -> None:
    """buildah, podman and debootstrap, installed from Debian's packages if they are missing."""
    missing = [package for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise CannotBuild(f"{', '.join(missing)} missing, and they can be installed only as root with apt-get: {HOW}")
    print(f"installing {', '.join(missing)} from Debian's packages (about a minute)", flush=True)
    _run("apt-get", "update", "-qq")
    _run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing, "fuse-overlayfs", "uidmap",
         env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def ensure_base() -> None:
    """The stand-in for python:3.11-slim-bookworm, made once: Debian bookworm with Python 3.11 and pip."""
    if subprocess.run(["podman", "image", "exists", BASE]).returncode == 0:
        return
    rootfs = WORK / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    print("making the stand-in base with debootstrap (about a minute)", flush=True)
    _run("debootstrap", "--variant=minbase", "--include=python3.11,python3-pip,python3-venv,ca-certificates",
         "bookworm", str(rootfs), stdout=subprocess.DEVNULL)
    (rootfs / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)  # pip installs as in python:3.11
    for name, target in (("python", "/usr/bin/python3.11"), ("python3", "/usr/bin/python3.11"),
                         ("pip", "/usr/bin/pip3")):
        (rootfs / "usr/local/bin" / name).unlink(missing_ok=True)
        (rootfs / "usr/local/bin" / name).symlink_to(target)
    # pip inside the build trusts what this machine trusts (its CA bundle, copied in).
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", rootfs / "usr/local/share/host-ca-bundle.crt")
    archive = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    _run("podman", "import", "--change", "ENV PIP_CERT=/usr/local/share/host-ca-bundle.crt",
         "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "-", BASE,
         stdin=archive.stdout, stdout=subprocess.DEVNULL)
    archive.wait()
    shutil.rmtree(rootfs, ignore_errors=True)


def ensure_torch_index(version: str) -> Path:
    """A one-package index (PEP 503) holding the CPU wheel of torch `version` that pip finds on this machine."""
    index = WORK / "torch-index"
    folder = index / "torch"
    wheels = sorted(folder.glob(f"torch-{version}+cpu-*.whl")) if folder.is_dir() else []
    if not wheels:
        folder.mkdir(parents=True, exist_ok=True)
        _run(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
             f"torch=={version}", "-d", str(folder))
        wheels = sorted(folder.glob(f"torch-{version}+cpu-*.whl"))
        if not wheels:
            raise CannotBuild(f"no CPU wheel of torch {version} on this machine (pip fetched "
                              f"{[p.name for p in folder.iterdir()]}): {HOW}")
    links = "".join(f'<a href="{quote(wheel.name)}">{wheel.name}</a>' for wheel in wheels)
    (folder / "index.html").write_text(f"<!DOCTYPE html><html><body>{links}</body></html>\n")
    (index / "index.html").write_text('<!DOCTYPE html><html><body><a href="torch/">torch</a></body></html>\n')
    return index


def build_image(repo: Path) -> ImageBuild:
    """Build `IMAGE` from `repo`'s Dockerfile (docker format, so its HEALTHCHECK is kept)."""
    ensure_tools()
    WORK.mkdir(parents=True, exist_ok=True)
    ensure_base()
    version = re.search(r"^ARG TORCH_VERSION=(\S+)", (repo / "Dockerfile").read_text(), re.M)[1]
    index = ensure_torch_index(version)
    began = time.monotonic()
    print("building the image (about 10 minutes the first time, seconds when nothing changed)", flush=True)
    built = subprocess.run(
        ["buildah", "bud", "--isolation", "chroot", "--layers", "--format", "docker", "--pull=never",
         "--build-arg", f"BASE_IMAGE={BASE}", "--build-arg", "TORCH_INDEX_URL=file:///torch-index",
         "-v", f"{index}:/torch-index:ro", "-f", "Dockerfile", "-t", IMAGE, "."],
        cwd=repo, capture_output=True, text=True)
    (WORK / "build.log").write_text(built.stdout + built.stderr)
    if built.returncode != 0:
        raise AssertionError(f"the build failed (whole log: {WORK / 'build.log'}):\n{(built.stdout + built.stderr)[-6000:]}")
    steps = len(re.findall(r"^STEP \d+/\d+:", built.stdout, re.M))
    cached = built.stdout.count("--> Using cache")
    size = json.loads(_run("podman", "image", "inspect", IMAGE, capture_output=True).stdout)[0]["Size"]
    return ImageBuild(steps=steps, cached_steps=cached, seconds=time.monotonic() - began, size_bytes=size)


def image_config(image: str) -> dict:
    """The image's Docker config: User, Cmd, Env, Healthcheck, ..."""
    inspected = json.loads(_run("buildah", "inspect", "--type", "image", image, capture_output=True).stdout)
    return inspected["Docker"]["config"]
