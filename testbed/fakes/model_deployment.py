"""An OCI Model Deployment endpoint on loopback: it checks each call's signature as OCI does, then forwards it to
the container (a real `bentoml serve`), as a deployment's routes do.

`POST <endpoint>/<deployment OCID>/predict` reaches the container's `/predict`; with the `openai` API
specification, `<endpoint>/<deployment OCID>/predict/v1/...` reaches the container's `/v1/...`. So a client's
signing (the README's OpenAI client, `oci raw-request`) is verified with the test's own public key before the
service sees the call. Forwarded calls are answered one at a time.
"""

from __future__ import annotations

import httpx

from testbed.fakes.oci_common import DEPLOYMENT_ID, OCIFakeServer, Reply, Request, error_reply

FORWARDED_HEADERS = ("content-type", "idempotency-key")
ANSWERED_HEADERS = ("content-type", "retry-after", "x-should-retry", "x-request-id")


class FakeModelDeployment(OCIFakeServer):
    """Forwards verified calls of one deployment to `container` (its base URL)."""

    def __init__(self, container: str, deployment_id: str = DEPLOYMENT_ID, timeout: float = 120):
        super().__init__()
        self.container = container.rstrip("/")
        self.deployment_id = deployment_id
        self.timeout = timeout

    @property
    def deployment_endpoint(self) -> str:
        """What a deployment's `model_deployment_url` is: the base of its predict route."""
        return f"{self.endpoint}/{self.deployment_id}"

    def route(self, request: Request) -> Reply:
        prefix = f"/{self.deployment_id}/predict"
        if request.path != prefix and not request.path.startswith(prefix + "/v1/"):
            return error_reply(404, "NotAuthorizedOrNotFound", f"no route {request.path}")
        path = request.path.removeprefix(prefix) or "/predict"
        headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
        answer = httpx.request(request.method, self.container + path, content=request.body, headers=headers,
                               timeout=self.timeout)
        return Reply(answer.status_code, answer.content,
                     {name: answer.headers[name] for name in ANSWERED_HEADERS if name in answer.headers})

    def body_signed(self, request: Request) -> bool:
        return request.method in ("POST", "PUT", "PATCH")
