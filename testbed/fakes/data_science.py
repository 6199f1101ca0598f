"""An OCI Data Science endpoint on loopback, for the real `oci` SDK (see `testbed.fakes.oci_common`).

It implements what the provisioner uses, with OCI's paths (`/20190101/...`), JSON shapes and headers:
models (create, get, list, artifact upload and HEAD, export from Object Storage with a work request),
model deployments (create, get, list, update, delete) that move CREATING → ACTIVE (UPDATING → ACTIVE,
DELETING → DELETED) over a few polls, or end FAILED with work request errors and logs when told to;
work requests (get, list, errors, logs); and the predict routes of a deployment, `POST /<OCID>/predict`
and `/<OCID>/predictWithResponseStream`, at the deployment's `modelDeploymentUrl` (both answered by
`predict_handler`; `model_deployment.forward_to` passes them on to a real server). Every request must be signed (401 otherwise).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import unquote

from testbed.fakes.oci_common import OCIFakeServer, Reply, Request, error_reply, http_date, json_reply, rfc3339

API = "/20190101"
ENV_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{1,30}")
ROUTES = [
    ("POST", re.compile(API + r"/models/?"), "create_model"),
    ("GET", re.compile(API + r"/models/?"), "list_models"),
    ("GET", re.compile(API + r"/models/(?P<id>[^/]+)"), "get_model"),
    ("POST", re.compile(API + r"/models/(?P<id>[^/]+)/artifact"), "create_model_artifact"),
    ("HEAD", re.compile(API + r"/models/(?P<id>[^/]+)/artifact/content"), "head_model_artifact"),
    ("POST", re.compile(API + r"/models/(?P<id>[^/]+)/actions/exportArtifact"), "export_model_artifact"),
    ("POST", re.compile(API + r"/modelDeployments/?"), "create_model_deployment"),
    ("GET", re.compile(API + r"/modelDeployments/?"), "list_model_deployments"),
    ("GET", re.compile(API + r"/modelDeployments/(?P<id>[^/]+)"), "get_model_deployment"),
    ("PUT", re.compile(API + r"/modelDeployments/(?P<id>[^/]+)"), "update_model_deployment"),
    ("DELETE", re.compile(API + r"/modelDeployments/(?P<id>[^/]+)"), "delete_model_deployment"),
    ("GET", re.compile(API + r"/workRequests/?"), "list_work_requests"),
    ("GET", re.compile(API + r"/workRequests/(?P<id>[^/]+)"), "get_work_request"),
    ("GET", re.compile(API + r"/workRequests/(?P<id>[^/]+)/errors"), "list_work_request_errors"),
    ("GET", re.compile(API + r"/workRequests/(?P<id>[^/]+)/logs"), "list_work_request_logs"),
    ("POST", re.compile(r"/(?P<id>ocid1\.datasciencemodeldeployment\.[^/]+)/predict(?:WithResponseStream)?"),
     "predict"),
]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _ocid(kind: str) -> str:
    return f"ocid1.{kind}.oc1.iad.{uuid.uuid4().hex}"


@dataclass
class DeploymentFailure:
    """How the next created deployment fails: its lifecycle details, work request errors and log lines."""

    details: str = "The container failed its health check"
    errors: list[tuple[str, str]] = field(default_factory=lambda: [
        ("HealthCheckFailed", "Container did not reach a healthy state within 10 minutes")])
    logs: list[str] = field(default_factory=lambda: [
        "Pulling image", "Starting container", "GET /health returned 503 for 600 s"])


@dataclass
class WorkRequest:
    id: str
    operation_type: str
    compartment_id: str
    resource_id: str
    entity_type: str
    action_type: str
    polls_left: int
    finish: Callable[[], bool]  # called once the polls are used up; True when it succeeded
    status: str = "ACCEPTED"
    percent: float = 0.0
    errors: list[dict] = field(default_factory=list)
    logs: list[dict] = field(default_factory=list)
    time_accepted: dt.datetime = field(default_factory=_now)
    time_finished: dt.datetime | None = None

    def log(self, message: str) -> None:
        self.logs.append({"message": message, "timestamp": rfc3339(_now())})

    def error(self, code: str, message: str) -> None:
        self.errors.append({"code": code, "message": message, "timestamp": rfc3339(_now())})

    def to_json(self) -> dict:
        return {
            "id": self.id, "operationType": self.operation_type, "status": self.status,
            "compartmentId": self.compartment_id, "percentComplete": self.percent,
            "resources": [{"entityType": self.entity_type, "actionType": self.action_type,
                           "identifier": self.resource_id, "entityUri": f"{API}/{self.entity_type}s/{self.resource_id}"}],
            "timeAccepted": rfc3339(self.time_accepted), "timeStarted": rfc3339(self.time_accepted),
            "timeFinished": rfc3339(self.time_finished) if self.time_finished else None,
        }


class FakeDataScience(OCIFakeServer):
    """Data Science for one tenancy.

    Args:
        polls: how many GETs of a deployment (or of its work request) an operation takes to finish.
        object_storage: the `FakeObjectStorage` that export_model_artifact reads from.
        keys: key id -> public key of the callers to accept (or call `trust(credentials)`).
    """

    def __init__(self, polls: int = 3, object_storage: Any = None, keys=None, page_size: int = 1000):
        super().__init__(keys)
        self.polls = polls
        self.page_size = page_size  # the most items one list page holds, whatever `limit` asks
        self.object_storage = object_storage
        self.models: dict[str, dict] = {}
        self.artifacts: dict[str, dict] = {}  # model id -> {"data", "content_disposition", "source"}
        self.deployments: dict[str, dict] = {}
        self.work_requests: dict[str, WorkRequest] = {}
        self.next_failure: DeploymentFailure | None = None
        self.predict_handler: Callable[[Request, dict], Reply] = self._default_predict

    # -- what tests set and read back

    def fail_next_deployment(self, failure: DeploymentFailure | None = None) -> DeploymentFailure:
        """Make the next created deployment end FAILED."""
        with self.lock:
            self.next_failure = failure or DeploymentFailure()
            return self.next_failure

    def add_model(self, compartment_id: str, display_name: str, artifact: bytes | None = b"zip") -> dict:
        """A model that exists from the start (ACTIVE, with an artifact unless None)."""
        with self.lock:
            model = self._new_model({"compartmentId": compartment_id, "projectId": "ocid1.datascienceproject.oc1..p",
                                     "displayName": display_name})
            if artifact is not None:
                self.artifacts[model["id"]] = {"data": artifact, "content_disposition": None, "source": "direct"}
            return model

    def add_deployment(self, compartment_id: str, display_name: str, model_id: str, state: str = "ACTIVE",
                       environment: dict[str, str] | None = None) -> dict:
        """A deployment that exists from the start."""
        with self.lock:
            body = {
                "displayName": display_name, "projectId": "ocid1.datascienceproject.oc1..p",
                "compartmentId": compartment_id,
                "modelDeploymentConfigurationDetails": {
                    "deploymentType": "SINGLE_MODEL",
                    "modelConfigurationDetails": {
                        "modelId": model_id, "bandwidthMbps": 10,
                        "instanceConfiguration": {"instanceShapeName": "VM.GPU.A10.1"},
                        "scalingPolicy": {"policyType": "FIXED_SIZE", "instanceCount": 1}},
                    "environmentConfigurationDetails": {
                        "environmentConfigurationType": "OCIR_CONTAINER", "image": "iad.ocir.io/ns/sd3:1",
                        "serverPort": 8080, "healthCheckPort": 8080, "environmentVariables": environment or {}},
                },
            }
            deployment = self._new_deployment(body)
            deployment["lifecycleState"] = state
            return deployment

    def deployment(self, deployment_id: str) -> dict:
        with self.lock:
            return self.deployments[deployment_id]

    # -- routing

    def body_signed(self, request: Request) -> bool:
        # The SDK uploads an artifact without signing its body (enforce_content_headers=False), as OCI allows.
        if request.method == "POST" and request.path.endswith("/artifact"):
            return False
        return super().body_signed(request)

    def route(self, request: Request) -> Reply:
        for method, pattern, handler in ROUTES:
            match = pattern.fullmatch(request.path)
            if match and method == request.method:
                params = {key: unquote(value) for key, value in match.groupdict().items()}
                return getattr(self, "_" + handler)(request, **params)
        return error_reply(404, "NotFound", f"no route for {request.method} {request.path}")

    @staticmethod
    def _not_found(what: str, ocid: str) -> Reply:
        return error_reply(404, "NotAuthorizedOrNotFound", f"Authorization failed or requested {what} {ocid} "
                           "not found")

    def _list_reply(self, request: Request, items: list[dict], filters: dict[str, str]) -> Reply:
        if "compartmentId" not in request.query and "compartmentId" in filters:
            return error_reply(400, "MissingParameter", "compartmentId is required")
        selected = [item for item in items
                    if all(request.query.get(q) in (None, item.get(key)) for q, key in filters.items())]
        # Pagination as OCI does it: `limit`, and an opaque `page` token in opc-next-page.
        start = int(request.query.get("page") or 0)
        limit = min(int(request.query.get("limit") or self.page_size), self.page_size)
        page = selected[start:start + limit]
        headers = {"opc-next-page": str(start + limit)} if start + limit < len(selected) else {}
        return json_reply(200, page, headers)

    # -- models

    def _new_model(self, body: dict) -> dict:
        model = {
            "id": _ocid("datasciencemodel"), "compartmentId": body["compartmentId"], "projectId": body["projectId"],
            "displayName": body.get("displayName") or "model", "description": body.get("description"),
            "lifecycleState": "ACTIVE", "timeCreated": rfc3339(_now()), "createdBy": "ocid1.user.oc1..test",
            "customMetadataList": body.get("customMetadataList") or [], "definedMetadataList": [],
            "freeformTags": body.get("freeformTags") or {}, "definedTags": {},
        }
        self.models[model["id"]] = model
        return model

    def _create_model(self, request: Request) -> Reply:
        body = request.json()
        missing = [key for key in ("compartmentId", "projectId") if not body.get(key)]
        if missing:
            return error_reply(400, "InvalidParameter", f"{', '.join(missing)} required")
        model = self._new_model(body)
        return json_reply(200, model, {"etag": uuid.uuid4().hex})

    def _get_model(self, request: Request, id: str) -> Reply:  # noqa: A002 - OCI's name
        model = self.models.get(id)
        return json_reply(200, model) if model else self._not_found("model", id)

    def _list_models(self, request: Request) -> Reply:
        items = sorted(self.models.values(), key=lambda m: m["timeCreated"], reverse=True)
        return self._list_reply(request, items, {"compartmentId": "compartmentId", "displayName": "displayName",
                                                 "lifecycleState": "lifecycleState", "projectId": "projectId"})

    def _create_model_artifact(self, request: Request, id: str) -> Reply:  # noqa: A002
        if id not in self.models:
            return self._not_found("model", id)
        if id in self.artifacts:
            return error_reply(409, "Conflict", "the model already has an artifact")
        if request.headers.get("content-length") != str(len(request.body)):
            return error_reply(400, "InvalidParameter", "content-length does not match the body")
        self.artifacts[id] = {"data": request.body, "content_disposition": request.headers.get("content-disposition"),
                              "source": "direct"}
        return Reply(200)

    def _head_model_artifact(self, request: Request, id: str) -> Reply:  # noqa: A002
        artifact = self.artifacts.get(id)
        if artifact is None:
            return self._not_found("model artifact", id)
        data = artifact["data"]
        headers = {"content-length": str(len(data)), "last-modified": http_date(_now()),
                   "content-md5": base64.b64encode(hashlib.md5(data).digest()).decode()}
        if artifact["content_disposition"]:
            headers["content-disposition"] = artifact["content_disposition"]
        return Reply(200, b"", headers)

    def _export_model_artifact(self, request: Request, id: str) -> Reply:  # noqa: A002
        model = self.models.get(id)
        if model is None:
            return self._not_found("model", id)
        details = request.json().get("artifactExportDetails") or {}
        if details.get("artifactSourceType") != "ORACLE_OBJECT_STORAGE":
            return error_reply(400, "InvalidParameter", "artifactSourceType must be ORACLE_OBJECT_STORAGE")
        missing = [key for key in ("namespace", "sourceBucket", "sourceObjectName", "sourceRegion")
                   if not details.get(key)]
        if missing:
            return error_reply(400, "InvalidParameter", f"{', '.join(missing)} required")

        def finish() -> bool:
            # The service reads the object at the end, as the real import does.
            storage = self.object_storage
            stored = None
            if storage is not None and details["namespace"] == storage.namespace:
                stored = storage.object(details["sourceBucket"], details["sourceObjectName"])
            if stored is None:
                work_request.error("ObjectNotFound", f"oci://{details['sourceBucket']}@{details['namespace']}/"
                                   f"{details['sourceObjectName']} was not found")
                return False
            self.artifacts[id] = {"data": stored.data, "content_disposition": None, "source": details}
            work_request.log(f"imported {len(stored.data)} bytes")
            return True

        work_request = self._new_work_request("EXPORT_MODEL_ARTIFACT", model["compartmentId"], id, "model",
                                              "UPDATED", finish)
        work_request.log("export accepted")
        return Reply(200, b"", {"opc-work-request-id": work_request.id})

    # -- work requests

    def _new_work_request(self, operation: str, compartment_id: str, resource_id: str, entity: str,
                          action: str, finish: Callable[[], bool]) -> WorkRequest:
        work_request = WorkRequest(id=_ocid("datascienceworkrequest"), operation_type=operation,
                                   compartment_id=compartment_id, resource_id=resource_id, entity_type=entity,
                                   action_type=action, polls_left=self.polls, finish=finish)
        self.work_requests[work_request.id] = work_request
        return work_request

    def _tick(self, resource_id: str) -> None:
        """One observation of a resource: its unfinished work requests move one step on."""
        for work_request in self.work_requests.values():
            if work_request.resource_id != resource_id or work_request.status not in ("ACCEPTED", "IN_PROGRESS"):
                continue
            work_request.polls_left -= 1
            work_request.status = "IN_PROGRESS"
            work_request.percent = round(100 * (self.polls - work_request.polls_left) / (self.polls + 1), 1)
            if work_request.polls_left <= 0:
                succeeded = work_request.finish()
                work_request.status = "SUCCEEDED" if succeeded else "FAILED"
                work_request.percent = 100.0
                work_request.time_finished = _now()

    def _get_work_request(self, request: Request, id: str) -> Reply:  # noqa: A002
        work_request = self.work_requests.get(id)
        if work_request is None:
            return self._not_found("work request", id)
        self._tick(work_request.resource_id)
        return json_reply(200, work_request.to_json())

    def _list_work_requests(self, request: Request) -> Reply:
        items = [wr.to_json() | {"resourceId": wr.resource_id}
                 for wr in sorted(self.work_requests.values(), key=lambda w: w.time_accepted, reverse=True)]
        reply = self._list_reply(request, items, {"compartmentId": "compartmentId", "resourceId": "resourceId",
                                                  "operationType": "operationType", "status": "status"})
        return reply

    def _list_work_request_errors(self, request: Request, id: str) -> Reply:  # noqa: A002
        work_request = self.work_requests.get(id)
        if work_request is None:
            return self._not_found("work request", id)
        return self._list_reply(request, work_request.errors, {})

    def _list_work_request_logs(self, request: Request, id: str) -> Reply:  # noqa: A002
        work_request = self.work_requests.get(id)
        if work_request is None:
            return self._not_found("work request", id)
        return self._list_reply(request, work_request.logs, {})

    # -- model deployments

    def _validate_deployment(self, body: dict) -> str | None:
        config = body.get("modelDeploymentConfigurationDetails") or {}
        model = config.get("modelConfigurationDetails") or {}
        env = config.get("environmentConfigurationDetails") or {}
        if config.get("deploymentType") != "SINGLE_MODEL":
            return "deploymentType must be SINGLE_MODEL"
        if model.get("modelId") not in self.models:
            return f"model {model.get('modelId')} not found"
        if model.get("modelId") not in self.artifacts:
            return f"model {model.get('modelId')} has no artifact"
        if not (model.get("instanceConfiguration") or {}).get("instanceShapeName"):
            return "instanceConfiguration.instanceShapeName is required"
        if env and env.get("environmentConfigurationType") == "OCIR_CONTAINER":
            if not env.get("image"):
                return "image is required for OCIR_CONTAINER"
            for port in ("serverPort", "healthCheckPort"):
                if env.get(port) is not None and not (1024 <= env[port] <= 65535 and env[port] not in (24224, 8446, 8447)):
                    return f"{port} {env[port]} is not allowed"
            variables = env.get("environmentVariables") or {}
            bad = [name for name in variables if not ENV_NAME.fullmatch(name) or name.endswith("_")]
            if bad:
                return f"invalid environment variable names {bad}"
            if sum(len(k) + len(v) for k, v in variables.items()) > 2048:
                return "environment variables exceed 2048 bytes"
        return None

    def _new_deployment(self, body: dict) -> dict:
        deployment_id = _ocid("datasciencemodeldeployment")
        deployment = {
            "id": deployment_id, "timeCreated": rfc3339(_now()), "displayName": body.get("displayName") or "md",
            "description": body.get("description"), "projectId": body["projectId"],
            "compartmentId": body["compartmentId"], "createdBy": "ocid1.user.oc1..test",
            "modelDeploymentConfigurationDetails": body["modelDeploymentConfigurationDetails"],
            "categoryLogDetails": body.get("categoryLogDetails"),
            "modelDeploymentUrl": f"{self.endpoint}/{deployment_id}",
            "lifecycleState": "CREATING", "lifecycleDetails": "Creating",
            "freeformTags": body.get("freeformTags") or {}, "definedTags": {},
        }
        self.deployments[deployment_id] = deployment
        return deployment

    def _create_model_deployment(self, request: Request) -> Reply:
        body = request.json()
        missing = [key for key in ("compartmentId", "projectId", "modelDeploymentConfigurationDetails")
                   if not body.get(key)]
        problem = f"{', '.join(missing)} required" if missing else self._validate_deployment(body)
        if problem:
            return error_reply(400, "InvalidParameter", problem)
        deployment = self._new_deployment(body)
        failure, self.next_failure = self.next_failure, None

        def finish() -> bool:
            if failure is not None:
                deployment.update(lifecycleState="FAILED", lifecycleDetails=failure.details)
                for code, message in failure.errors:
                    work_request.error(code, message)
                for line in failure.logs:
                    work_request.log(line)
                return False
            deployment.update(lifecycleState="ACTIVE", lifecycleDetails="Model deployment is active")
            work_request.log("Model deployment is active")
            return True

        work_request = self._new_work_request("MODEL_DEPLOYMENT_CREATE", deployment["compartmentId"],
                                              deployment["id"], "modelDeployment", "CREATED", finish)
        work_request.log("Creating model deployment")
        return json_reply(200, deployment, {"opc-work-request-id": work_request.id, "etag": uuid.uuid4().hex})

    def _get_model_deployment(self, request: Request, id: str) -> Reply:  # noqa: A002
        deployment = self.deployments.get(id)
        if deployment is None or deployment["lifecycleState"] == "DELETED":
            return self._not_found("model deployment", id)
        self._tick(id)
        return json_reply(200, deployment, {"etag": uuid.uuid4().hex})

    def _list_model_deployments(self, request: Request) -> Reply:
        items = sorted(self.deployments.values(), key=lambda d: d["timeCreated"], reverse=True)
        return self._list_reply(request, items, {"compartmentId": "compartmentId", "displayName": "displayName",
                                                 "lifecycleState": "lifecycleState", "projectId": "projectId"})

    def _update_model_deployment(self, request: Request, id: str) -> Reply:  # noqa: A002
        deployment = self.deployments.get(id)
        if deployment is None or deployment["lifecycleState"] == "DELETED":
            return self._not_found("model deployment", id)
        if deployment["lifecycleState"] not in ("ACTIVE", "FAILED", "NEEDS_ATTENTION"):
            return error_reply(409, "IncorrectState", f"model deployment is {deployment['lifecycleState']}")
        body = request.json()
        update = body.get("modelDeploymentConfigurationDetails") or {}
        merged = dict(deployment["modelDeploymentConfigurationDetails"])
        # Nested objects are replaced whole, as OCI does: a client must send every field it wants kept.
        for key in ("modelConfigurationDetails", "environmentConfigurationDetails"):
            if update.get(key) is not None:
                merged[key] = update[key]
        problem = self._validate_deployment({**deployment, "modelDeploymentConfigurationDetails": merged})
        if problem:
            return error_reply(400, "InvalidParameter", problem)
        for key in ("displayName", "description"):
            if body.get(key) is not None:
                deployment[key] = body[key]
        deployment.update(lifecycleState="UPDATING", lifecycleDetails="Updating")

        def finish() -> bool:
            deployment["modelDeploymentConfigurationDetails"] = merged
            deployment.update(lifecycleState="ACTIVE", lifecycleDetails="Model deployment is active")
            return True

        work_request = self._new_work_request("MODEL_DEPLOYMENT_UPDATE", deployment["compartmentId"], id,
                                              "modelDeployment", "UPDATED", finish)
        return Reply(202, b"", {"opc-work-request-id": work_request.id})

    def _delete_model_deployment(self, request: Request, id: str) -> Reply:  # noqa: A002
        deployment = self.deployments.get(id)
        if deployment is None or deployment["lifecycleState"] == "DELETED":
            return self._not_found("model deployment", id)
        deployment.update(lifecycleState="DELETING", lifecycleDetails="Deleting")

        def finish() -> bool:
            deployment.update(lifecycleState="DELETED", lifecycleDetails="Deleted")
            return True

        work_request = self._new_work_request("MODEL_DEPLOYMENT_DELETE", deployment["compartmentId"], id,
                                              "modelDeployment", "DELETED", finish)
        return Reply(202, b"", {"opc-work-request-id": work_request.id})

    # -- the deployment's predict route

    def _predict(self, request: Request, id: str) -> Reply:  # noqa: A002
        deployment = self.deployments.get(id)
        if deployment is None or deployment["lifecycleState"] != "ACTIVE":
            return self._not_found("model deployment", id)
        return self.predict_handler(request, deployment)

    @staticmethod
    def _default_predict(request: Request, deployment: dict) -> Reply:
        body = request.json()
        return json_reply(200, {"request_id": body.get("request_id") or "req-1", "seed": body.get("seed") or 0,
                                "images": [], "timings_ms": {"queue": 0, "generate": 1, "encode": 1, "store": 1}})
