"""The image Model Deployment runs, built from the Dockerfile as written and served: `bash dev.sh image`.

Built without a Docker engine, as root, with Debian's buildah (chroot isolation) on a stand-in for the
real base (`python:3.11-slim-bookworm` cannot be pulled here): a Debian bookworm made by debootstrap with
Python 3.11, imported with podman, handed to the Dockerfile's own `BASE_IMAGE` argument. torch is the CPU
build of the locked release, from a one-package index made of the wheel on this machine's disk, handed to
`TORCH_INDEX_URL`; every other package comes from PyPI as the Dockerfile says. The stand-in base and the
built layers are kept in containers-storage, so a second run rebuilds only what changed.

The image's own command is then run in its filesystem, as its user, with the artifact mounted read-only
where Model Deployment mounts it (`buildah run`; podman cannot start containers on these machines).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import psutil
import pytest

from testbed.image import ARTIFACT_MOUNT, IMAGE, ImageBuild, build_image, image_config

REPO = Path(__file__).resolve().parents[1]
SAMPLE = {"prompt": "A cat holding a sign that says hello World", "num_inference_steps": 10, "guidance_scale": 7.0}


@pytest.fixture(scope="module")
def built() -> ImageBuild:
    build = build_image(REPO)
    print(f"\nimage {IMAGE}: {build.size_bytes / 1e9:.2f} GB ({build.size_bytes} bytes), built in "
          f"{build.seconds:.0f} s ({build.cached_steps} of {build.steps} steps from the cache)")
    return build


@pytest.fixture(scope="module")
def container(built):
    name = subprocess.run(["buildah", "from", "--pull=never", IMAGE], check=True, capture_output=True,
                          text=True).stdout.strip()
    yield name
    subprocess.run(["buildah", "rm", name], capture_output=True)


def in_image(container: str, *command: str, user: str | None = None, env: dict | None = None,
             volumes: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    args = ["buildah", "run", "--isolation", "chroot"]
    for key, value in (env or {}).items():
        args += ["--env", f"{key}={value}"]
    for volume in volumes:
        args += ["-v", volume]
    if user:
        args += ["--user", user]
    return subprocess.run([*args, container, "--", *command], capture_output=True, text=True, timeout=300)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(server: subprocess.Popen) -> None:
    """Stop the served image: buildah, and every process under it (BentoML's worker runs in a session of its own,
    outside buildah's process group)."""
    tree = psutil.Process(server.pid)
    processes = [*tree.children(recursive=True), tree]
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=30)
    for process in alive:
        process.kill()
    psutil.wait_procs(alive, timeout=30)


def test_it_runs_as_its_non_root_user(container):
    user = image_config(IMAGE)["User"]
    assert user == "1000:1000", user
    assert in_image(container, "id", "-u", user=user).stdout.strip() == "1000"


def test_its_python_packages_are_exactly_the_locks(container):
    listed = json.loads(in_image(container, "python", "-m", "pip", "list", "--format", "json").stdout)
    installed = {re.sub(r"[-_.]+", "-", package["name"]).lower(): package["version"] for package in listed}
    locked = dict(line.split("==") for line in (REPO / "requirements.lock").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    runtime = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in runtime:
        name = re.sub(r"[-_.]+", "-", requirement.split("==")[0]).lower()
        assert name in installed, f"{name} is not in the image"
    differ = {name: (version, locked[name]) for name, version in installed.items()
              if name in locked and version.split("+")[0] != locked[name]}
    assert differ == {}, differ  # torch is the CPU build here: 2.13.0+cpu is the lock's 2.13.0


def test_its_command_serves_health_and_the_sample_predict_with_the_artifact_mounted_read_only(container, tmp_path):
    config = image_config(IMAGE)
    artifact = tmp_path / "deployed_model"  # what Model Deployment unzips and mounts
    shutil.copytree(REPO / "sd3-medium", artifact, ignore=lambda folder, names: [
        name for name in names if name in ("__pycache__", "outputs") or (folder, name) == (
            str(REPO / "sd3-medium"), "model")])
    before = {p.relative_to(artifact): p.stat().st_mtime_ns for p in artifact.rglob("*")}
    port = free_port()
    env = {"SD3_MODEL": "tiny", "PORT": str(port)}
    mount = (f"{artifact}:{ARTIFACT_MOUNT}:ro",)
    log = (tmp_path / "server.log").open("wb")
    args = ["buildah", "run", "--isolation", "chroot", "--user", config["User"], "-v", mount[0]]
    for key, value in env.items():
        args += ["--env", f"{key}={value}"]
    server = subprocess.Popen([*args, container, "--", *config["Cmd"]], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    healthcheck = config["Healthcheck"]["Test"][1:]  # ["CMD", "sh", "-c", ...] as the Dockerfile wrote it
    try:
        deadline = time.monotonic() + 300
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            while True:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
                assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-4000:]
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            checked = in_image(container, *healthcheck, user=config["User"], env=env, volumes=mount)
            assert checked.returncode == 0, checked.stdout + checked.stderr  # the HEALTHCHECK's own command
            answer = client.post("/predict", json=SAMPLE)
        assert answer.status_code == 200, answer.text
        [image] = answer.json()["images"]
        assert image["uri"].startswith("file:///var/lib/sd3/images/") and image["stored"] is True
        stored = in_image(container, "sh", "-c", f"wc -c < {image['uri'].removeprefix('file://')}")
        assert stored.stdout.strip() == str(image["bytes"])
        wrote = in_image(container, "sh", "-c", f"touch {ARTIFACT_MOUNT}/written-by-the-service",
                         user=config["User"], volumes=mount)
        assert wrote.returncode != 0 and "Read-only file system" in wrote.stderr, wrote.stderr
    finally:
        stop(server)
        log.close()
    assert {p.relative_to(artifact): p.stat().st_mtime_ns for p in artifact.rglob("*")} == before


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-s", "-q"]))
