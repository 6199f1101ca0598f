"""The thin layer that sends what `details` built, follows what it started and reports how it ended."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import oci
from oci.data_science import models as ds
from oci.object_storage import UploadManager

# The SDK's own read-callback wrapper (what UploadManager uses); pinned oci==2.189.0 keeps it stable.
from oci.object_storage.transfer.internal.file_read_callback_stream import FileReadCallbackStream
from oci.pagination import list_call_get_all_results
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from provisioner import clients
from provisioner import details as build
from provisioner.artifact import ArtifactInfo
from provisioner.console import OperationFailed, StatusLine, byte_progress, err, info, warn
from provisioner.settings import ConfigError, DeploySettings, how_to_set

MODEL_OCID_PREFIX = "ocid1.datasciencemodel."
DEPLOYMENT_OCID_PREFIX = "ocid1.datasciencemodeldeployment."
# States a deployment passes through on its way somewhere; any other state is where it ended up.
TRANSITIONAL_STATES = frozenset({"CREATING", "UPDATING", "DELETING"})
WORK_REQUEST_DONE = frozenset({"SUCCEEDED", "FAILED", "CANCELED"})


# --- finding things by name ------------------------------------------------------------------

def resolve_model_id(client: oci.data_science.DataScienceClient, compartment_id: str | None, ref: str) -> str:
    """A model OCID as given, or the newest ACTIVE model with display name `ref` in the compartment."""
    if ref.startswith(MODEL_OCID_PREFIX):
        return ref
    if not compartment_id:
        raise ConfigError(f"finding model {ref!r} by name needs compartment_id ({how_to_set('compartment_id')}); "
                          "or give the model's OCID")
    models = list_call_get_all_results(client.list_models, compartment_id, display_name=ref,
                                       lifecycle_state="ACTIVE").data
    if not models:
        raise ConfigError(f"no ACTIVE model named {ref!r} in compartment {compartment_id}; run `register` "
                          "or give --model <OCID>")
    newest = max(models, key=lambda m: m.time_created)
    info(f"model {ref!r}: using the newest of {len(models)}, {newest.id}")
    return newest.id


def resolve_deployment(client: oci.data_science.DataScienceClient, compartment_id: str | None,
                       ref: str) -> ds.ModelDeployment:
    """The model deployment with OCID `ref`, or the one (not DELETED) with display name `ref` in the compartment."""
    if ref.startswith(DEPLOYMENT_OCID_PREFIX):
        return client.get_model_deployment(ref).data
    if not compartment_id:
        raise ConfigError(f"finding deployment {ref!r} by name needs compartment_id "
                          f"({how_to_set('compartment_id')}); or give the deployment's OCID")
    found = list_call_get_all_results(client.list_model_deployments, compartment_id, display_name=ref).data
    live = [md for md in found if md.lifecycle_state != "DELETED"]
    if not live:
        raise ConfigError(f"no model deployment named {ref!r} in compartment {compartment_id}")
    if len(live) > 1:
        listing = "\n  ".join(f"{md.id} {md.lifecycle_state}" for md in live)
        raise ConfigError(f"{len(live)} model deployments are named {ref!r}; give one OCID:\n  {listing}")
    return client.get_model_deployment(live[0].id).data


# --- register --------------------------------------------------------------------------------

def register_model(client: oci.data_science.DataScienceClient, storage: Any, settings: DeploySettings,
                   artifact: ArtifactInfo, model_details: ds.CreateModelDetails, region: str | None) -> ds.Model:
    """Create the catalog entry and attach the artifact; `storage()` makes the Object Storage client if needed."""
    build.check_artifact_upload(settings, artifact, region)  # before the model exists
    model = client.create_model(model_details).data
    info(f"created model {model.id}")
    try:
        if build.uses_bucket(settings, artifact):
            upload_artifact_via_bucket(client, storage(), settings, model.id, artifact, region)
        else:
            upload_artifact_directly(client, settings, model.id, artifact)
    except BaseException:
        warn(f"model {model.id} was created but has no artifact; delete it or register again")
        raise
    return model


def upload_artifact_directly(client: oci.data_science.DataScienceClient, settings: DeploySettings,
                             model_id: str, artifact: ArtifactInfo) -> None:
    """create_model_artifact with the zip as the body, then check the stored size."""
    with artifact.path.open("rb") as fh, byte_progress("uploading artifact", artifact.size) as advance:
        client.create_model_artifact(model_id, FileReadCallbackStream(fh, advance), content_length=artifact.size,
                                     content_disposition=build.artifact_content_disposition(settings))
    stored = client.head_model_artifact(model_id).headers.get("content-length")
    if stored is not None and int(stored) != artifact.size:
        raise OperationFailed(f"model {model_id} holds {stored} bytes of artifact, expected {artifact.size}")
    info(f"artifact uploaded ({artifact.size} bytes)")


def upload_artifact_via_bucket(client: oci.data_science.DataScienceClient,
                               storage: oci.object_storage.ObjectStorageClient, settings: DeploySettings,
                               model_id: str, artifact: ArtifactInfo, region: str | None) -> None:
    """Multipart-upload the zip to the artifact bucket, export_model_artifact from there, follow the work request."""
    build.check_artifact_upload(settings, artifact, region)
    namespace = settings.artifact_namespace or storage.get_namespace().data
    object_name = build.artifact_object_name(settings, artifact)
    try:
        with byte_progress("uploading artifact to bucket", artifact.size) as advance:
            UploadManager(storage).upload_file(namespace, settings.artifact_bucket, object_name,
                                               str(artifact.path), part_size=settings.part_size,
                                               progress_callback=advance, content_type="application/zip")
    except BaseException:
        abort_multipart_uploads(storage, namespace, settings.artifact_bucket, object_name)
        raise
    info(f"uploaded oci://{settings.artifact_bucket}@{namespace}/{object_name}")
    export = build.build_export_details(namespace, settings.artifact_bucket, object_name, region)
    response = client.export_model_artifact(model_id, export)
    work_request_id = response.headers.get("opc-work-request-id")
    if not work_request_id:
        raise OperationFailed("export_model_artifact answered without an opc-work-request-id to follow")
    follow_work_request(client, work_request_id, "importing artifact", settings)


def abort_multipart_uploads(storage: oci.object_storage.ObjectStorageClient, namespace: str, bucket: str,
                            object_name: str) -> None:
    """Best effort: drop the uncommitted parts a failed upload left behind (they are billed until aborted)."""
    try:
        uploads = list_call_get_all_results(storage.list_multipart_uploads, namespace, bucket).data
        for upload in uploads:
            if upload.object == object_name:
                storage.abort_multipart_upload(namespace, bucket, object_name, upload.upload_id)
                info(f"aborted the unfinished multipart upload {upload.upload_id}")
    except (oci.exceptions.ServiceError, oci.exceptions.RequestException) as exc:
        warn(f"could not abort the unfinished upload of {object_name}: {exc}")


# --- work requests ---------------------------------------------------------------------------

def follow_work_request(client: oci.data_science.DataScienceClient, work_request_id: str, what: str,
                        settings: DeploySettings) -> ds.WorkRequest:
    """Wait for a work request with a live status line; unless it SUCCEEDED, show its errors and raise OperationFailed."""
    response = client.get_work_request(work_request_id)

    def show(resp: oci.response.Response) -> None:
        line.update(resp.data.status, f"{resp.data.percent_complete or 0:.0f}%")

    with StatusLine(what) as line:
        show(response)
        final = oci.wait_until(client, response, evaluate_response=lambda r: r.data.status in WORK_REQUEST_DONE,
                               max_interval_seconds=settings.poll_interval, max_wait_seconds=settings.wait_timeout,
                               wait_callback=lambda _n, resp: show(resp))
        show(final)
    if final.data.status != "SUCCEEDED":
        report_work_request(client, work_request_id)
        raise OperationFailed(f"{what}: work request {work_request_id} ended {final.data.status}")
    return final.data


def report_work_request(client: oci.data_science.DataScienceClient, work_request_id: str) -> None:
    """Print a work request's errors and log messages, oldest first."""
    errors = list_call_get_all_results(client.list_work_request_errors, work_request_id).data
    logs = list_call_get_all_results(client.list_work_request_logs, work_request_id).data
    info(f"work request {work_request_id}")
    info(f"  errors ({len(errors)}):")
    for error in sorted(errors, key=lambda e: str(e.timestamp)):
        info(f"    {error.timestamp} {error.code}: {error.message}")
    info(f"  log ({len(logs)}):")
    for entry in sorted(logs, key=lambda e: str(e.timestamp)):
        info(f"    {entry.timestamp} {entry.message}")


def latest_work_request_id(client: oci.data_science.DataScienceClient, compartment_id: str,
                           resource_id: str) -> str | None:
    """The newest work request about a resource, to explain how it got where it is."""
    found = client.list_work_requests(compartment_id, resource_id=resource_id, sort_by="timeAccepted",
                                      sort_order="DESC", limit=1).data
    return found[0].id if found else None


# --- deployments -----------------------------------------------------------------------------

def wait_for_deployment(client: oci.data_science.DataScienceClient, deployment_id: str,
                        settings: DeploySettings) -> ds.ModelDeployment:
    """Poll a deployment until it leaves CREATING/UPDATING/DELETING, with a live status line."""
    response = client.get_model_deployment(deployment_id)
    with StatusLine(f"deployment {response.data.display_name}") as line:
        line.update(response.data.lifecycle_state, response.data.lifecycle_details)
        final = oci.wait_until(
            client, response, evaluate_response=lambda r: r.data.lifecycle_state not in TRANSITIONAL_STATES,
            max_interval_seconds=settings.poll_interval, max_wait_seconds=settings.wait_timeout,
            wait_callback=lambda _n, r: line.update(r.data.lifecycle_state, r.data.lifecycle_details))
        line.update(final.data.lifecycle_state, final.data.lifecycle_details)
    return final.data


def create_deployment(client: oci.data_science.DataScienceClient, deployment_details: ds.CreateModelDeploymentDetails,
                      settings: DeploySettings) -> ds.ModelDeployment:
    """Create the deployment and (unless --no-wait) wait for ACTIVE; on failure show the work request's errors and log."""
    response = client.create_model_deployment(deployment_details)
    deployment = response.data
    work_request_id = response.headers.get("opc-work-request-id")
    info(f"created model deployment {deployment.id} ({deployment.lifecycle_state})")
    if not settings.wait:
        return deployment
    final = wait_for_deployment(client, deployment.id, settings)
    if final.lifecycle_state != "ACTIVE":
        work_request_id = work_request_id or latest_work_request_id(client, final.compartment_id, final.id)
        if work_request_id:
            report_work_request(client, work_request_id)
        raise OperationFailed(f"model deployment {final.id} is {final.lifecycle_state}: {final.lifecycle_details}")
    return final


def update_deployment(client: oci.data_science.DataScienceClient, deployment: ds.ModelDeployment,
                      update: ds.UpdateModelDeploymentDetails, settings: DeploySettings) -> ds.ModelDeployment:
    """Send the update and follow its work request (the deployment may still read ACTIVE just after the call)."""
    response = client.update_model_deployment(deployment.id, update)
    work_request_id = response.headers.get("opc-work-request-id")
    info(f"updating model deployment {deployment.id}")
    if not settings.wait:
        return deployment
    if work_request_id:
        follow_work_request(client, work_request_id, f"updating {deployment.display_name}", settings)
    final = wait_for_deployment(client, deployment.id, settings)
    if final.lifecycle_state != "ACTIVE":
        raise OperationFailed(f"model deployment {final.id} is {final.lifecycle_state}: {final.lifecycle_details}")
    return final


def delete_deployment(client: oci.data_science.DataScienceClient, deployment: ds.ModelDeployment,
                      settings: DeploySettings) -> None:
    """Delete the deployment and, unless told not to wait, follow its work request to the end."""
    response = client.delete_model_deployment(deployment.id)
    work_request_id = response.headers.get("opc-work-request-id")
    info(f"deleting model deployment {deployment.id}")
    if settings.wait and work_request_id:
        follow_work_request(client, work_request_id, f"deleting {deployment.display_name}", settings)


# --- predict ---------------------------------------------------------------------------------

def call_predict(client: oci.model_deployment.ModelDeploymentClient, deployment_id: str,
                 body: dict[str, Any]) -> tuple[int, Any]:
    """One signed POST to the deployment's predict route (the client has no retries); the status and JSON answer."""
    with clients.no_resend_on_header_errors():
        response = client.predict(deployment_id, body)
    try:
        return response.status, json.loads(response.data)
    except (TypeError, json.JSONDecodeError):
        return response.status, response.data


def stream_predict(client: oci.model_deployment.ModelDeploymentClient, deployment_id: str,
                   body: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """One signed POST to the deployment's streaming route (`predictWithResponseStream`; the client has no
    retries): the server-sent events of the answer as they come, each as (name, JSON data)."""
    with clients.no_resend_on_header_errors():
        response = client.predict_with_response_stream(deployment_id, {**body, "stream": True})
    name, data = "message", []
    try:
        for line in response.data.iter_lines(decode_unicode=True):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif not line and data:
                yield name, json.loads("\n".join(data))
                name, data = "message", []
    finally:
        response.data.close()


def follow_stream(events: Iterator[tuple[str, Any]], request_id: str) -> Any:
    """Show a streamed request's place in line and its steps as they come; its answer (the `done` event), or
    `OperationFailed` with its error, or when the stream ends without one."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task(f"{request_id}: sent", total=None)
        for name, data in events:
            if name == "queued":
                where = f" (position {data['position']})" if data.get("position") else ""
                progress.update(task, description=f"{request_id}: queued{where}")
            elif name == "progress":
                progress.update(task, description=f"{request_id}: running", total=data["steps"],
                                completed=data["step"])
            elif name == "done":
                return data
            elif name == "error":
                error = data.get("error") or {}
                raise OperationFailed(f"{request_id} failed: {error.get('code')}: {error.get('message')}")
    raise OperationFailed(f"the stream of {request_id} ended before its answer")


POLL_ATTEMPTS = 5  # a poll that fails in transit is sent again (polling generates nothing); this often in a row
MAX_POLL_INTERVAL = 10.0


def poll_until_done(poll: Callable[[], tuple[int, Any]], pending: dict[str, Any],
                    sleep: Callable[[float], None] = time.sleep) -> Any:
    """Poll a request accepted with 202 until its answer comes, showing its place in line or its steps.

    Waits what the server's `retry_after` says (1 to 10 s) between polls; a poll lost to the network or a 5xx is
    sent again, up to `POLL_ATTEMPTS` times in a row. Any other error (the request failed) is raised.
    """
    request_id, failures = pending["request_id"], 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task(f"{request_id}: queued", total=None)
        while True:
            step = pending.get("progress") or {}
            where = f" (position {pending['position']})" if pending.get("position") else ""
            progress.update(task, description=f"{request_id}: {pending['status']}{where}",
                            total=step.get("steps"), completed=step.get("step", 0))
            sleep(min(MAX_POLL_INTERVAL, max(1.0, float(pending.get("retry_after") or 1))))
            try:
                status, answer = poll()
            except (oci.exceptions.ServiceError, oci.exceptions.RequestException) as exc:
                transient = not isinstance(exc, oci.exceptions.ServiceError) or exc.status >= 500 or exc.status == 429
                failures += 1
                if not transient or failures >= POLL_ATTEMPTS:
                    raise
                continue
            failures = 0
            if status != 202:
                if step.get("steps"):
                    progress.update(task, completed=step["steps"])
                return answer
            pending = answer


def download_images(storage_factory: Any, answer: dict[str, Any], directory: Path) -> list[Path]:
    """Save each image of a predict answer into `directory`: inline data when not stored, else from its bucket."""
    directory.mkdir(parents=True, exist_ok=True)
    saved = []
    storage = None
    for index, image in enumerate(answer.get("images") or []):
        name = Path(image.get("object_name") or f"{answer.get('request_id', 'image')}-{index}").name
        target = directory / name
        if image.get("data"):
            payload = base64.b64decode(image["data"])
            target.write_bytes(payload)
        elif image.get("bucket") and image.get("namespace") and image.get("object_name"):
            storage = storage or storage_factory()
            response = storage.get_object(image["namespace"], image["bucket"], image["object_name"])
            with target.open("wb") as fh:
                for chunk in response.data.raw.stream(1024 * 1024, decode_content=False):
                    fh.write(chunk)
        else:
            warn(f"image {index} is at {image.get('uri')} on the server's own disk; nothing to download")
            continue
        expected = image.get("sha256")
        if expected:
            actual = hashlib.sha256(target.read_bytes()).hexdigest()
            if actual != expected:
                raise OperationFailed(f"{target}: sha256 {actual} does not match the answer's {expected}")
        saved.append(target)
    return saved
