"""An OCI Model Deployment endpoint on loopback: it checks each call's signature as OCI does, then forwards it to
the container (a real `bentoml serve`), as a deployment's routes do.

`POST <endpoint>/<deployment OCID>/predict` reaches the container's `/predict`; with the `openai` API
specification, `<endpoint>/<deployment OCID>/predict/v1/...` reaches the container's `/v1/...`. So a client's
signing (the README's OpenAI client, `oci raw-request`) is verified with the test's own public key before the
service sees the call. Forwarded calls are answered one at a time, except
`POST <endpoint>/<deployment OCID>/predictWithResponseStream`: it reaches the container's `/predict` too and
passes a streamed answer (`text/event-stream`) on as it comes, chunk by chunk; a container that answers 2xx
without streaming gets 409, as Model Deployment answers then.
"""

from __future__ import annotations

import httpx

from testbed.fakes.oci_common import DEPLOYMENT_ID, OCIFakeServer, Reply, Request, error_reply

FORWARDED_HEADERS = ("content-type", "idempotency-key")
ANSWERED_HEADERS = ("content-type", "retry-after", "x-should-retry", "x-request-id")
STREAMING = "/predictWithResponseStream"


def forward_to(container: str, request: Request, route: str, timeout: float = 120) -> Reply:
    """A deployment's `route` (`/predict`, `/predict/v1/...`, or the streaming route) passed on to `container`."""
    path = "/predict" if route == STREAMING else route.removeprefix("/predict") or "/predict"
    client = httpx.Client(timeout=timeout)
    headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
    answer = client.send(client.build_request(request.method, container.rstrip("/") + path, content=request.body,
                                              headers=headers), stream=True)
    answered = {name: answer.headers[name] for name in ANSWERED_HEADERS if name in answer.headers}
    if route != STREAMING or not answer.headers.get("content-type", "").startswith("text/event-stream"):
        body = answer.read()
        answer.close()
        client.close()
        if route == STREAMING and answer.status_code < 300:
            return error_reply(409, "Conflict", "the model's container did not stream its answer")
        return Reply(answer.status_code, body, answered)

    def chunks():
        try:
            yield from answer.iter_raw()
        finally:
            answer.close()
            client.close()

    return Reply(answer.status_code, chunks(), answered)


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
        prefix = f"/{self.deployment_id}"
        if request.path not in (prefix + "/predict", prefix + STREAMING) and not request.path.startswith(
                prefix + "/predict/v1/"):
            return error_reply(404, "NotAuthorizedOrNotFound", f"no route {request.path}")
        return forward_to(self.container, request, request.path.removeprefix(prefix), self.timeout)

    def body_signed(self, request: Request) -> bool:
        return request.method in ("POST", "PUT", "PATCH")
