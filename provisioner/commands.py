"""One function per CLI command: build the requests (pure), then print them (dry-run) or send them."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import oci
import requests

from provisioner import clients, operations
from provisioner import details as build
from provisioner.artifact import ArtifactInfo, describe_artifact, source_size, write_artifact_zip
from provisioner.console import byte_progress, info, result, result_json, warn
from provisioner.settings import ConfigError, DeploySettings, require

FROM_CREATE_MODEL = "<model OCID from create_model>"


def _dry_run_output(requests: list[dict[str, Any]]) -> None:
    result_json({"dry_run": True, "requests": requests})


def _connect(settings: DeploySettings) -> tuple[clients.OciAuth, Any]:
    auth = clients.build_auth(settings)
    return auth, clients.data_science_client(auth, settings)


# --- package ---------------------------------------------------------------------------------

def package(settings: DeploySettings, *, as_result: bool = True) -> ArtifactInfo:
    """Zip the service folder into the artifact and print its path, size and sha256.

    `as_result=False` prints them as progress (stderr), so that stdout of `up`/`register` stays theirs.
    """
    if not settings.source_dir.is_dir():
        raise ConfigError(f"source_dir {settings.source_dir} is not a folder")
    with byte_progress("packaging", source_size(settings.source_dir)) as advance:
        artifact = write_artifact_zip(settings.source_dir, settings.artifact, on_bytes=advance)
    report = result if as_result else info
    report(f"artifact: {artifact.path}")
    report(f"files:    {artifact.file_count}")
    report(f"size:     {artifact.size} bytes")
    report(f"sha256:   {artifact.sha256}")
    return artifact


# --- register --------------------------------------------------------------------------------

def _artifact_upload_plan(settings: DeploySettings, artifact: ArtifactInfo, model_id: str) -> list[dict[str, Any]]:
    if not build.uses_bucket(settings, artifact):
        return [{"operation": "create_model_artifact", "model_id": model_id, "body": str(artifact.path),
                 "content_length": artifact.size, "content_disposition": build.artifact_content_disposition(settings)}]
    region = clients.config_file_region(settings) or "<region of the principal>"
    build.check_artifact_upload(settings, artifact, region)
    namespace = settings.artifact_namespace or "<namespace of this tenancy, looked up>"
    object_name = build.artifact_object_name(settings, artifact)
    export = build.build_export_details(namespace, settings.artifact_bucket, object_name, region)
    return [
        {"operation": "upload_file (multipart)", "namespace": namespace, "bucket": settings.artifact_bucket,
         "object_name": object_name, "file": str(artifact.path), "bytes": artifact.size,
         "part_size": settings.part_size},
        {"operation": "export_model_artifact", "model_id": model_id, "body": build.request_json(export)},
    ]


def _artifact_for_register(settings: DeploySettings, artifact_path: Path | None) -> ArtifactInfo:
    if artifact_path is None:
        return package(settings, as_result=False)
    artifact = describe_artifact(artifact_path)
    info(f"using {artifact.path} ({artifact.size} bytes, sha256 {artifact.sha256})")
    return artifact


def register(settings: DeploySettings, artifact_path: Path | None = None) -> str:
    """Create the model catalog entry and upload the artifact; returns the model OCID."""
    require(settings, "compartment_id", "project_id")
    connection = None if settings.dry_run else _connect(settings)  # credentials checked before packaging
    artifact = _artifact_for_register(settings, artifact_path)
    model_details = build.build_model_details(settings, artifact, build.read_project_version(settings.project_file))
    if connection is None:
        _dry_run_output([{"operation": "create_model", "body": build.request_json(model_details)},
                         *_artifact_upload_plan(settings, artifact, FROM_CREATE_MODEL)])
        return FROM_CREATE_MODEL
    auth, client = connection
    return _send_register(settings, auth, client, artifact, model_details)


def _send_register(settings: DeploySettings, auth: clients.OciAuth, client: Any, artifact: ArtifactInfo,
                   model_details: Any) -> str:
    model = operations.register_model(client, lambda: clients.object_storage_client(auth, settings), settings,
                                      artifact, model_details, auth.region)
    result(f"model: {model.id}")
    return model.id


# --- deploy ----------------------------------------------------------------------------------

def _validated_deployment_details(settings: DeploySettings, model_id: str) -> Any:
    require(settings, "compartment_id", "project_id", "image")
    return build.build_deployment_details(settings, model_id)


def _print_ready(settings: DeploySettings, deployment: Any) -> None:
    url = build.predict_url(deployment.model_deployment_url)
    result(f"model deployment: {deployment.id} ({deployment.lifecycle_state})")
    result(f"predict URL: {url}")
    result("call it with:")
    result("  " + build.raw_request_command(url, build.SAMPLE_PREDICT_BODY, settings))
    result(f'  python model-deployment.py predict {settings.name} --prompt "{build.SAMPLE_PREDICT_BODY["prompt"]}"')
    if settings.api == "openai":
        result(f"OpenAI base_url: {build.openai_base_url(deployment.model_deployment_url)} (the openai SDK, with an "
               "OCI-signing HTTP client: README, 'The OpenAI Images API')")


def deploy(settings: DeploySettings) -> None:
    """Create the model deployment of `settings.model` (OCID or name) and wait for it to be ACTIVE."""
    model_ref = settings.model or settings.name
    by_ocid = model_ref.startswith(operations.MODEL_OCID_PREFIX)
    placeholder = model_ref if by_ocid else f"<newest model named {model_ref}>"
    deployment_details = _validated_deployment_details(settings, placeholder)  # refuse bad input before any call
    if settings.dry_run:
        _dry_run_output([{"operation": "create_model_deployment", "body": build.request_json(deployment_details)}])
        return
    _, client = _connect(settings)
    model_id = operations.resolve_model_id(client, settings.compartment_id, model_ref)
    _send_deploy(settings, client, model_id)


def _send_deploy(settings: DeploySettings, client: Any, model_id: str) -> None:
    deployment_details = build.build_deployment_details(settings, model_id)
    deployment = operations.create_deployment(client, deployment_details, settings)
    if settings.wait:
        _print_ready(settings, deployment)
    else:
        result(f"model deployment: {deployment.id} ({deployment.lifecycle_state})")


def up(settings: DeploySettings) -> None:
    """package + register + deploy, with every input checked before the first call."""
    require(settings, "compartment_id", "project_id", "image")
    _validated_deployment_details(settings, FROM_CREATE_MODEL)
    connection = None if settings.dry_run else _connect(settings)  # credentials checked before packaging
    artifact = package(settings, as_result=False)
    model_details = build.build_model_details(settings, artifact, build.read_project_version(settings.project_file))
    if connection is None:
        deployment_details = build.build_deployment_details(settings, FROM_CREATE_MODEL)
        _dry_run_output([{"operation": "create_model", "body": build.request_json(model_details)},
                         *_artifact_upload_plan(settings, artifact, FROM_CREATE_MODEL),
                         {"operation": "create_model_deployment", "body": build.request_json(deployment_details)}])
        return
    auth, client = connection
    model_id = _send_register(settings, auth, client, artifact, model_details)
    _send_deploy(settings, client, model_id)


# --- status, update, delete --------------------------------------------------------------------

def _lookup_dry_run(operation: str, ref: str, **extra: Any) -> None:
    by = "model_deployment_id" if ref.startswith(operations.DEPLOYMENT_OCID_PREFIX) else "display_name"
    _dry_run_output([{"operation": operation, by: ref, **extra}])


def _describe_scaling(policy: Any) -> str:
    if getattr(policy, "policy_type", None) == "FIXED_SIZE":
        return f"{policy.instance_count} instance(s)"
    if getattr(policy, "policy_type", None) == "AUTOSCALING" and policy.auto_scaling_policies:
        p = policy.auto_scaling_policies[0]
        return f"autoscaling {p.minimum_instance_count}..{p.maximum_instance_count} instances"
    return "-"


def status(settings: DeploySettings, ref: str, as_json: bool = False) -> None:
    """Show one deployment by OCID or display name; for a FAILED one, its last work request's errors."""
    if settings.dry_run:
        _lookup_dry_run("get_model_deployment", ref)
        return
    _, client = _connect(settings)
    deployment = operations.resolve_deployment(client, settings.compartment_id, ref)
    if as_json:
        result_json(build.request_json(deployment))
    else:
        config = deployment.model_deployment_configuration_details
        model = config.model_configuration_details
        env = config.environment_configuration_details
        masked_env = build.mask_secrets({"environment_variables": getattr(env, "environment_variables", None) or {}})
        image = getattr(env, "image", None) or "-"
        if getattr(env, "image_digest", None):
            image += f"@{env.image_digest}"
        result(f"name:      {deployment.display_name}")
        result(f"id:        {deployment.id}")
        result(f"state:     {deployment.lifecycle_state}" +
               (f" - {deployment.lifecycle_details}" if deployment.lifecycle_details else ""))
        result("predict:   " + (build.predict_url(deployment.model_deployment_url)
                                if deployment.model_deployment_url else "-"))
        result(f"model:     {model.model_id}")
        result(f"image:     {image}")
        result(f"shape:     {model.instance_configuration.instance_shape_name}, "
               f"{_describe_scaling(model.scaling_policy)}, {model.bandwidth_mbps} Mbps")
        result("env:       " + (", ".join(f"{k}={v}" for k, v in masked_env["environment_variables"].items()) or "-"))
        result(f"created:   {deployment.time_created}")
    if deployment.lifecycle_state in ("FAILED", "NEEDS_ATTENTION"):
        work_request_id = operations.latest_work_request_id(client, deployment.compartment_id, deployment.id)
        if work_request_id:
            operations.report_work_request(client, work_request_id)


def update(settings: DeploySettings, ref: str, changes: build.DeploymentChanges) -> None:
    """Change the model, image, instance count or shape of a deployment and wait until it is ACTIVE again."""
    if settings.dry_run:
        update_details = build.build_update_details(changes, current=None)
        warn("dry-run: fields shown as absent are copied from the live deployment when sent")
        _lookup_dry_run("update_model_deployment", ref, body=build.request_json(update_details))
        return
    build.build_update_details(changes, current=None)  # refuse bad input before any call
    _, client = _connect(settings)
    deployment = operations.resolve_deployment(client, settings.compartment_id, ref)
    if changes.model_id:  # `--model NAME` means the newest model of that name
        model_id = operations.resolve_model_id(client, settings.compartment_id, changes.model_id)
        changes = build.DeploymentChanges(**{**vars(changes), "model_id": model_id})
    update_details = build.build_update_details(changes, current=deployment)
    final = operations.update_deployment(client, deployment, update_details, settings)
    result(f"model deployment: {final.id} ({final.lifecycle_state})")


def delete(settings: DeploySettings, ref: str) -> None:
    """Delete a deployment by OCID or display name (the model stays in the catalog)."""
    if settings.dry_run:
        _lookup_dry_run("delete_model_deployment", ref)
        return
    _, client = _connect(settings)
    deployment = operations.resolve_deployment(client, settings.compartment_id, ref)
    operations.delete_deployment(client, deployment, settings)
    result(f"model deployment: {deployment.id} deleted" if settings.wait else
           f"model deployment: {deployment.id} deleting")


# --- predict ---------------------------------------------------------------------------------

def predict(settings: DeploySettings, ref: str, body: dict[str, Any], download_dir: Path | None,
            wait: bool = True, stream: bool = False) -> None:
    """Send one signed predict request (never resent) that does not wait on the server, poll its id until done
    (unless not `wait`), print the JSON answer, optionally save the images. `body` of a request_id alone polls.
    With `stream`, the request goes to the deployment's streaming route instead, and its events draw the progress."""
    polling = set(body) == {"request_id"}
    if not polling:
        # Our own request id makes a failed call safe to repeat, and lets us poll: the server answers 202 at once
        # and we ask again, well inside Model Deployment's 60 s limit on each call, however long it takes.
        body = {**({"stream": True} if stream else {"wait": False}), **body,
                "request_id": body.get("request_id") or uuid.uuid4().hex}
    if settings.dry_run:
        _lookup_dry_run("predict", ref, body=body)
        return
    auth, client = _connect(settings)
    deployment = operations.resolve_deployment(client, settings.compartment_id, ref)
    if deployment.lifecycle_state != "ACTIVE":
        warn(f"model deployment {deployment.id} is {deployment.lifecycle_state}")
    endpoint = build.predict_service_endpoint(deployment.model_deployment_url, deployment.id,
                                              settings.model_deployment_endpoint)
    predict_client = clients.predict_client(auth, endpoint)
    resume = f"python model-deployment.py predict {ref} --request-id {body['request_id']}"
    try:
        if stream and not polling:
            status, answer = 200, operations.follow_stream(
                operations.stream_predict(predict_client, deployment.id, body), body["request_id"])
        else:
            status, answer = operations.call_predict(predict_client, deployment.id, body)
    except (oci.exceptions.ServiceError, oci.exceptions.RequestException, requests.RequestException) as exc:
        if not polling and (not isinstance(exc, oci.exceptions.ServiceError) or exc.status >= 500):
            warn(f"the image may have been generated anyway; to get it without generating twice: {resume}")
        raise
    if status == 202 and wait:
        answer = operations.poll_until_done(
            lambda: operations.call_predict(predict_client, deployment.id, {"request_id": body["request_id"]}),
            answer)
    elif status == 202:
        info(f"accepted; poll it with: {resume}")
    result_json(answer)
    if download_dir is not None and isinstance(answer, dict):
        saved = operations.download_images(lambda: clients.object_storage_client(auth, settings), answer, download_dir)
        for path in saved:
            info(f"saved {path}")
