"""Start the real service (`bentoml serve`, a subprocess on a free loopback port): for the tests and the benchmarks.

`start_server` serves the tiny model with a private image folder, spool and BentoML home under a work
folder, and waits until it is ready; `stop_server` stops its whole process group. With `gates=True` the
tiny pipeline holds any generation whose prompt starts with `hold:<name>` after its first step, until the
caller opens that gate (`Server.hold`, `Server.wait_held`, `Server.release`): a request stays running
exactly as long as a test needs, with no big body to keep a CPU busy.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SERVICE_DIR = REPO / "sd3-medium"
BENTOML = Path(sys.executable).with_name("bentoml")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A running `bentoml serve` and what its caller saw of its start."""

    url: str
    process: subprocess.Popen
    log_path: Path
    image_dir: Path
    health_route: str = "/health"
    gates: Path | None = None
    health_seen: list[tuple[int, dict, float]] = field(default_factory=list)  # (status, body, seconds)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 120), **kwargs)

    # -- gates (with `gates=True`) ------------------------------------------------------------------

    def hold(self, name: str, prompt: str = "a held request") -> str:
        """A prompt that holds its generation after the first step at gate `name`, until `release(name)`."""
        assert self.gates is not None, "start the server with gates=True"
        for suffix in (".held", ".open"):
            (self.gates / f"{name}{suffix}").unlink(missing_ok=True)
        return f"hold:{name} {prompt}"

    def wait_held(self, name: str, timeout: float = 120) -> None:
        """Until a generation is waiting at gate `name` (a hang guard, not a time bound on the service)."""
        deadline = time.monotonic() + timeout
        while not (self.gates / f"{name}.held").exists():
            assert self.process.poll() is None, self.log_tail()
            assert time.monotonic() < deadline, f"nothing reached gate {name}:\n{self.log_tail()}"
            time.sleep(0.02)

    def release(self, name: str) -> None:
        (self.gates / f"{name}.open").touch()

    def all_held_then_released(self, names: list[str]) -> None:
        """Until a generation waits at every one of these gates (at once: one per device), then open them all."""
        try:
            for name in names:
                self.wait_held(name)
        finally:
            for name in names:
                self.release(name)


def start_server(workdir: Path, env: dict[str, str] | None = None, *, wait_ready: bool = True,
                 timeout: float = 180, host: str | None = "127.0.0.1", target: str = ".",
                 cwd: Path = SERVICE_DIR, ready_path: str | None = None, gates: bool = False,
                 threads: int = 1) -> Server:
    """Start a service (the SD3 service by default) with the tiny model and private folders under `workdir`.

    Args:
        host: `--host`; None passes none, to serve on the service's own default.
        target, cwd: what `bentoml serve` serves, and from where (the benchmarks' other services).
        ready_path: waited on until 200; by default the health route, where every answer is recorded and a
            `failed` one ends the wait too.
        gates: hold generations at gates the caller opens (see the module docstring).
        threads: torch's CPU threads in the server (`OMP_NUM_THREADS`).
    """
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "server.log"
    full_env = {
        **os.environ,
        "SD3_MODEL": "tiny",
        "IMAGE_DIR": str(workdir / "images"),
        "SPOOL_DIR": str(workdir / "spool"),  # private: servers must not upload each other's leftovers
        "HF_HUB_OFFLINE": "1",
        "BENTOML_HOME": str(workdir / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "OMP_NUM_THREADS": str(threads),
        **({"SD3_TINY_GATES": str(workdir / "gates")} if gates else {}),
        **(env or {}),
    }
    if gates:
        (workdir / "gates").mkdir(exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(BENTOML), "serve", target, *(["--host", host] if host else []), "--port", str(port)],
            cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopping it stops its worker too
        )
    server = Server(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path,
                    image_dir=Path(full_env["IMAGE_DIR"]),
                    health_route=full_env.get("MODEL_DEPLOY_HEALTH_ENDPOINT", "/health"),
                    gates=workdir / "gates" if gates else None)
    if wait_ready:
        try:
            wait_until_ready(server, ready_path or server.health_route, timeout)
        except BaseException:
            stop_server(server)  # a server that never got ready must not outlive its caller
            raise
    return server


def wait_until_ready(server: Server, path: str, timeout: float = 180) -> None:
    """Poll `path` until it answers 200 (on the health route, every answer is recorded, and `failed` ends it)."""
    deadline = time.monotonic() + timeout
    health = path == server.health_route
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
        began = time.monotonic()
        try:
            response = httpx.get(server.url + path, timeout=5)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        if response.status_code == 200:
            if health:
                server.health_seen.append((200, response.json(), time.monotonic() - began))
            return
        if health:
            server.health_seen.append((response.status_code, response.json(), time.monotonic() - began))
            if response.json().get("status") == "failed":
                return
        time.sleep(0.1)
    raise AssertionError(f"server not ready after {timeout} s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    try:
        os.killpg(server.process.pid, signal.SIGTERM)
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
    except ProcessLookupError:
        pass


@contextmanager
def running_server(workdir: Path, env: dict[str, str] | None = None, **options) -> Iterator[Server]:
    """`start_server` for a block: the server is stopped when it ends."""
    server = start_server(workdir, env, **options)
    try:
        yield server
    finally:
        stop_server(server)
