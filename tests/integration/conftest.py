"""Start the real service (`bentoml serve`, a subprocess on a free loopback port) for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
SERVICE_DIR = REPO / "sd3-medium"
BENTOML = Path(sys.executable).with_name("bentoml")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A running `bentoml serve` and what the test saw of its start."""

    url: str
    process: subprocess.Popen
    log_path: Path
    image_dir: Path
    health_route: str = "/health"
    health_seen: list[tuple[int, dict, float]] = field(default_factory=list)  # (status, body, seconds)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 120), **kwargs)


def start_server(tmp: Path, env: dict[str, str] | None = None, wait_ready: bool = True,
                 timeout: float = 180, host: str | None = "127.0.0.1") -> Server:
    """Start the service with the tiny model and a private image folder; wait for /health to leave 'loading'.

    `host=None` passes no `--host`, to serve on the service's own default.
    """
    port = free_port()
    image_dir = tmp / "images"
    tmp.mkdir(parents=True, exist_ok=True)
    log_path = tmp / "server.log"
    full_env = {
        **os.environ,
        "SD3_MODEL": "tiny",
        "IMAGE_DIR": str(image_dir),
        "SPOOL_DIR": str(tmp / "spool"),  # private: servers must not upload each other's leftovers
        "HF_HUB_OFFLINE": "1",
        "BENTOML_HOME": str(tmp / "bentoml"),
        "OMP_NUM_THREADS": "1",  # the suite shares two cores with the server
        **(env or {}),
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(BENTOML), "serve", ".", *(["--host", host] if host else []), "--port", str(port)],
            cwd=SERVICE_DIR, env=full_env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopping it stops its worker too
        )
    server = Server(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path, image_dir=image_dir,
                    health_route=full_env.get("MODEL_DEPLOY_HEALTH_ENDPOINT", "/health"))
    if wait_ready:
        try:
            wait_for_health(server, timeout)
        except BaseException:
            stop_server(server)  # a server that never got ready must not outlive the test
            raise
    return server


def wait_for_health(server: Server, timeout: float = 180) -> None:
    """Poll /health, recording every answer, until it is 200 or 'failed'."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"server exited with {server.process.returncode}:\n{server.log()}")
        began = time.monotonic()
        try:
            response = httpx.get(server.url + server.health_route, timeout=5)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        server.health_seen.append((response.status_code, response.json(), time.monotonic() - began))
        if response.status_code == 200 or response.json().get("status") == "failed":
            return
        time.sleep(0.2)
    raise AssertionError(f"server not ready after {timeout} s:\n{server.log()}")


def stop_server(server: Server) -> None:
    try:
        os.killpg(server.process.pid, signal.SIGTERM)
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    """One tiny-model server shared by the read-mostly integration tests."""
    running = start_server(tmp_path_factory.mktemp("server"))
    yield running
    stop_server(running)


@pytest.fixture
def make_server(tmp_path):
    """Start extra servers with their own settings; all are stopped after the test."""
    started: list[Server] = []

    def make(env: dict[str, str] | None = None, wait_ready: bool = True, **options) -> Server:
        started.append(start_server(tmp_path / f"server{len(started)}", env, wait_ready, **options))
        return started[-1]

    yield make
    for running in started:
        stop_server(running)


@pytest.fixture
def healthy_fake(fake):
    """No fault injected into the module's Object Storage fake (`fake`) before the test, nor left after it."""
    fake.restore()
    yield
    fake.restore()
