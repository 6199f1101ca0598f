"""A webhook receiver on loopback for the tests: it verifies every delivery with the `standardwebhooks` package (as a
caller's receiver would), records it, and answers as a test scripts it, path by path."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: dict | None  # the payload, when the signature checked out
    status: int


@dataclass
class Answer:
    status: int = 204
    headers: dict[str, str] = field(default_factory=dict)
    hold: threading.Event | None = None  # answer only once this is set (a slow receiver)


class WebhookReceiver:
    """`url(path)` is where to send; `answers[path]` lists how to answer the next calls there (then 204)."""

    def __init__(self, secret: str):
        from standardwebhooks.webhooks import Webhook

        self.webhook = Webhook(secret)
        self.received: list[Received] = []
        self.answers: dict[str, list[Answer]] = {}
        self.lock = threading.RLock()
        self.arrived = threading.Condition(self.lock)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802 - the base class's name
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {name.lower(): value for name, value in self.headers.items()}
                try:
                    verified = receiver.webhook.verify(body, headers)
                except Exception:  # noqa: BLE001 - a bad signature is recorded as such
                    verified = None
                with receiver.lock:
                    script = receiver.answers.get(self.path) or []
                    answer = script.pop(0) if script else Answer()
                if answer.hold is not None:
                    answer.hold.wait(60)
                with receiver.arrived:
                    receiver.received.append(Received(self.path, headers, body, verified, answer.status))
                    receiver.arrived.notify_all()
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def script(self, path: str, *answers: Answer) -> None:
        with self.lock:
            self.answers[path] = list(answers)

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [call for call in self.received if call.path == path]

    def wait_for(self, path: str, count: int, timeout: float = 120) -> list[Received]:
        """The calls to `path` once there are `count` of them (fails after `timeout`)."""
        with self.arrived:
            if not self.arrived.wait_for(lambda: len([c for c in self.received if c.path == path]) >= count,
                                         timeout):
                raise AssertionError(f"{path}: {len(self.at(path))} calls, expected {count}")
        return self.at(path)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def payload(call: Received) -> dict:
        return json.loads(call.body)
