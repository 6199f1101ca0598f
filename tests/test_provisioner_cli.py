"""`python model-deployment.py ...` run as an operator runs it, with the real `oci` SDK inside, against
OCI-compatible Data Science and Object Storage endpoints on loopback that verify every request's signature
and record what arrives."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from provisioner import clients, operations
from provisioner.settings import resolve_settings
from testbed.fakes.data_science import DeploymentFailure, FakeDataScience
from testbed.fakes.object_storage import FakeObjectStorage, StoredObject
from testbed.fakes.oci_common import (COMPARTMENT_ID, Credentials, api_key, json_reply, resource_principal,
                                      security_token)

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "model-deployment.py"
PROJECT_ID = "ocid1.datascienceproject.oc1.iad.aaaaproject"
IMAGE = "iad.ocir.io/testnamespace/sd3-medium:0.1.0"
DIGEST = "sha256:" + "0123456789abcdef" * 4
HF_TOKEN_VALUE = "hf_liveSECRETvalue_do_not_print"


@dataclass
class Cloud:
    """The two fakes, the operator's credentials and a scratch folder to run in."""

    data_science: FakeDataScience
    storage: FakeObjectStorage
    credentials: Credentials
    workdir: Path

    def requests(self) -> list:
        return self.data_science.seen() + self.storage.seen()

    def run(self, *args: str, env: dict[str, str] | None = None, credentials: Credentials | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the tool the way an operator does; only the endpoints point at the fakes."""
        credentials = credentials or self.credentials
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("OCI_", "SD3_DEPLOY_"))}
        environ.update({
            "HOME": str(self.workdir), "COLUMNS": "200",
            "OCI_DATA_SCIENCE_ENDPOINT": self.data_science.endpoint,
            "OCI_OBJECT_STORAGE_ENDPOINT": self.storage.endpoint,
            "SD3_DEPLOY_COMPARTMENT_ID": COMPARTMENT_ID, "SD3_DEPLOY_PROJECT_ID": PROJECT_ID,
            "SD3_DEPLOY_POLL_INTERVAL": "0.05", "SD3_DEPLOY_ARTIFACT": str(self.workdir / "build" / "sd3.zip"),
            **(env or {}),
        })
        command = [sys.executable, str(TOOL), *args]
        if args and args[0] != "package" and "--help" not in args and credentials.config_file:
            command += ["--config-file", str(credentials.config_file), "--profile", credentials.profile]
        return subprocess.run(command, cwd=self.workdir, env=environ, capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture
def cloud(tmp_path):
    credentials = api_key(tmp_path / "oci")
    storage = FakeObjectStorage(namespace="testnamespace", buckets=("artifacts", "images"))
    data_science = FakeDataScience(polls=3, object_storage=storage)
    for fake in (storage, data_science):
        fake.trust(credentials)
    workdir = tmp_path / "work"
    workdir.mkdir()
    with storage, data_science:
        yield Cloud(data_science, storage, credentials, workdir)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def assert_all_signed_by(cloud: Cloud, key_id: str) -> None:
    requests = cloud.requests()
    assert requests, "no request arrived"
    assert all(r.key_id == key_id and r.signature_error is None for r in requests), \
        [(r.method, r.path, r.signature_error) for r in requests]


def only(requests: list):
    assert len(requests) == 1, [(r.method, r.target) for r in requests]
    return requests[0]


def at(fake, method: str, path: str) -> list:
    """Requests of one method to exactly one path."""
    return [r for r in fake.seen(method) if r.path == path]


def zip_names(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        return zf.namelist()


# --- package ---------------------------------------------------------------------------------

def test_package_is_deterministic_and_matches_the_service_folder(cloud):
    first = ok(cloud.run("package", "--artifact", "one.zip"))
    second = ok(cloud.run("package", "--artifact", "two.zip"))

    one, two = cloud.workdir / "one.zip", cloud.workdir / "two.zip"
    assert one.read_bytes() == two.read_bytes()
    sha = hashlib.sha256(one.read_bytes()).hexdigest()
    assert f"sha256:   {sha}" in first.stdout and f"size:     {one.stat().st_size} bytes" in first.stdout
    assert first.stdout == second.stdout.replace("two.zip", "one.zip")
    expected = sorted(p.relative_to(REPO / "sd3-medium").as_posix() for p in (REPO / "sd3-medium").rglob("*")
                      if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
                      and p.relative_to(REPO / "sd3-medium").parts[0] not in ("outputs", ".pytest_cache"))
    assert zip_names(one) == expected
    assert cloud.requests() == []


# --- register --------------------------------------------------------------------------------

def test_register_creates_the_model_and_uploads_exactly_the_zip(cloud):
    result = ok(cloud.run("register", "--name", "sd3-test"))

    artifact = (cloud.workdir / "build" / "sd3.zip").read_bytes()
    created = only(cloud.data_science.seen("POST", "/models")[:1]).json()
    assert created["displayName"] == "sd3-test" and created["compartmentId"] == COMPARTMENT_ID
    assert created["projectId"] == PROJECT_ID
    metadata = {m["key"]: m["value"] for m in created["customMetadataList"]}
    assert metadata == {"artifact_sha256": hashlib.sha256(artifact).hexdigest(),
                        "artifact_bytes": str(len(artifact)), "project_version": "0.1.0"}
    (model_id,) = cloud.data_science.models
    stored = cloud.data_science.artifacts[model_id]
    assert stored["data"] == artifact and stored["source"] == "direct"
    assert stored["content_disposition"] == 'attachment; filename="sd3-test.zip"'
    assert only(cloud.data_science.seen("HEAD", f"/models/{model_id}/artifact/content"))
    assert cloud.storage.seen() == []  # small artifacts do not touch Object Storage
    assert f"model: {model_id}" in result.stdout
    assert_all_signed_by(cloud, cloud.credentials.key_id)


def test_register_of_a_large_artifact_goes_multipart_through_the_bucket_and_follows_the_export(cloud):
    result = ok(cloud.run("register", "--large-artifact-threshold", "1", "--part-size", "16384",
                          "--artifact-bucket", "artifacts"))

    artifact = (cloud.workdir / "build" / "sd3.zip").read_bytes()
    sha = hashlib.sha256(artifact).hexdigest()
    object_name = f"model-artifacts/sd3-medium-{sha[:16]}.zip"
    assert cloud.storage.object("artifacts", object_name).data == artifact
    upload_path = "/n/testnamespace/b/artifacts/u/" + object_name.replace("/", "%2F")
    assert only(at(cloud.storage, "POST", "/n/testnamespace/b/artifacts/u"))  # one multipart upload ...
    parts = at(cloud.storage, "PUT", upload_path)
    assert len(parts) == -(-len(artifact) // 16384) >= 2  # ... in 16 KiB parts ...
    assert only(at(cloud.storage, "POST", upload_path))  # ... committed once
    assert only(at(cloud.storage, "GET", "/n"))  # the namespace was looked up

    (model_id,) = cloud.data_science.models
    export = only(cloud.data_science.seen("POST", "/actions/exportArtifact"))
    assert export.path == f"/20190101/models/{model_id}/actions/exportArtifact"
    assert export.json() == {"artifactExportDetails": {
        "artifactSourceType": "ORACLE_OBJECT_STORAGE", "namespace": "testnamespace", "sourceBucket": "artifacts",
        "sourceObjectName": object_name, "sourceRegion": "us-ashburn-1"}}
    (work_request,) = cloud.data_science.work_requests.values()
    assert work_request.status == "SUCCEEDED"
    assert len(cloud.data_science.seen("GET", f"/workRequests/{work_request.id}")) >= 3
    assert cloud.data_science.artifacts[model_id]["data"] == artifact  # what the export read from the bucket
    assert cloud.data_science.seen("POST", f"/models/{model_id}/artifact") == []  # no direct upload
    assert "SUCCEEDED" in result.stderr
    assert_all_signed_by(cloud, cloud.credentials.key_id)


def test_a_large_artifact_without_a_bucket_is_refused_before_any_call(cloud):
    result = cloud.run("register", "--large-artifact-threshold", "1")

    assert result.returncode == 2 and "set artifact_bucket" in result.stderr
    assert cloud.requests() == []


def test_register_fails_clearly_when_a_part_upload_is_refused(cloud):
    cloud.storage.fail_next(status=400, code="InvalidParameter",
                            when=lambda request: request.method == "PUT" and "/u/" in request.path)

    result = cloud.run("register", "--large-artifact-threshold", "1", "--part-size", "16384",
                       "--artifact-bucket", "artifacts")

    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "OCI error: 400 InvalidParameter: injected fault: InvalidParameter (upload_part" in result.stderr
    (model_id,) = cloud.data_science.models
    assert f"model {model_id} was created but has no artifact" in result.stderr
    assert cloud.data_science.seen("POST", "/actions/exportArtifact") == []
    assert len(cloud.storage.seen("DELETE", "/b/artifacts/u/")) == 1 and cloud.storage.uploads == {}  # aborted


def test_register_fails_clearly_when_the_export_work_request_fails(cloud):
    cloud.data_science.object_storage = None  # the service cannot find the uploaded object

    result = cloud.run("register", "--large-artifact-threshold", "1", "--artifact-bucket", "artifacts")

    assert result.returncode == 1
    assert "ObjectNotFound" in result.stderr and "FAILED" in result.stderr
    assert "Traceback" not in result.stderr


# --- deploy ----------------------------------------------------------------------------------

def test_deploy_sends_every_field_waits_for_active_and_prints_how_to_call_it(cloud):
    model = cloud.data_science.add_model(COMPARTMENT_ID, "sd3-medium")
    result = ok(cloud.run(
        "deploy", "--model", model["id"], "--image", IMAGE, "--image-digest", DIGEST, "--autoscale", "1:3",
        "--bandwidth-mbps", "20", "--subnet-id", "ocid1.subnet.oc1..s", "--log-group-id", "ocid1.loggroup.oc1..g",
        "--access-log-id", "ocid1.log.oc1..a", "--predict-log-id", "ocid1.log.oc1..p",
        "--env", "BUCKET_NAME=images", "--env", "NAMESPACE=testnamespace", "--env", "HF_TOKEN",
        env={"HF_TOKEN": HF_TOKEN_VALUE}))

    body = only(cloud.data_science.seen("POST", "/modelDeployments")).json()
    assert (body["displayName"], body["compartmentId"], body["projectId"]) == ("sd3-medium", COMPARTMENT_ID, PROJECT_ID)
    config = body["modelDeploymentConfigurationDetails"]
    assert config["deploymentType"] == "SINGLE_MODEL"
    model_config = config["modelConfigurationDetails"]
    assert model_config["modelId"] == model["id"] and model_config["bandwidthMbps"] == 20
    assert model_config["instanceConfiguration"] == {"instanceShapeName": "VM.GPU.A10.1",
                                                     "subnetId": "ocid1.subnet.oc1..s"}
    scaling = model_config["scalingPolicy"]
    assert scaling["policyType"] == "AUTOSCALING"
    assert scaling["autoScalingPolicies"][0]["minimumInstanceCount"] == 1
    assert scaling["autoScalingPolicies"][0]["maximumInstanceCount"] == 3
    assert config["environmentConfigurationDetails"] == {
        "environmentConfigurationType": "OCIR_CONTAINER", "image": IMAGE, "imageDigest": DIGEST,
        "serverPort": 8080, "healthCheckPort": 8080,
        "environmentVariables": {"BUCKET_NAME": "images", "NAMESPACE": "testnamespace", "HF_TOKEN": HF_TOKEN_VALUE}}
    assert body["categoryLogDetails"] == {
        "access": {"logId": "ocid1.log.oc1..a", "logGroupId": "ocid1.loggroup.oc1..g"},
        "predict": {"logId": "ocid1.log.oc1..p", "logGroupId": "ocid1.loggroup.oc1..g"}}

    (deployment_id,) = cloud.data_science.deployments
    assert cloud.data_science.deployment(deployment_id)["lifecycleState"] == "ACTIVE"
    assert len(cloud.data_science.seen("GET", f"/modelDeployments/{deployment_id}")) >= 3  # polled through CREATING
    assert result.stderr.index("CREATING") < result.stderr.index("ACTIVE")
    url = f"{cloud.data_science.endpoint}/{deployment_id}/predict"
    assert f"predict URL: {url}" in result.stdout
    paste = next(line.strip() for line in result.stdout.splitlines() if "oci raw-request" in line)
    assert paste.startswith(f"oci raw-request --http-method POST --target-uri {url} --request-body '{{\"prompt\"")
    assert HF_TOKEN_VALUE not in result.stdout + result.stderr
    assert_all_signed_by(cloud, cloud.credentials.key_id)


def test_deploy_with_the_openai_api_asks_model_deployment_for_it_and_prints_the_base_url(cloud):
    model = cloud.data_science.add_model(COMPARTMENT_ID, "sd3-medium")
    result = ok(cloud.run("deploy", "--model", model["id"], "--image", IMAGE, "--api", "openai"))
    body = only(cloud.data_science.seen("POST", "/modelDeployments")).json()
    environment = body["modelDeploymentConfigurationDetails"]["environmentConfigurationDetails"]
    assert environment["predictApiSpecification"] == "openai"
    (deployment_id,) = cloud.data_science.deployments
    url = cloud.data_science.deployment(deployment_id)["modelDeploymentUrl"]
    assert f"OpenAI base_url: {url}/predict/v1" in result.stdout
    # The default asks for nothing more than the native routes.
    ok(cloud.run("deploy", "--model", model["id"], "--image", IMAGE, "--name", "plain"))
    plain = cloud.data_science.seen("POST", "/modelDeployments")[-1].json()
    assert "predictApiSpecification" not in plain["modelDeploymentConfigurationDetails"][
        "environmentConfigurationDetails"]
    refused = cloud.run("deploy", "--model", model["id"], "--image", IMAGE, "--api", "graphql")
    assert refused.returncode == 2 and "invalid choice: 'graphql'" in refused.stderr


def test_deploy_without_model_uses_the_newest_registered_model_of_that_name(cloud):
    cloud.data_science.add_model(COMPARTMENT_ID, "sd3-medium")
    newest = cloud.data_science.add_model(COMPARTMENT_ID, "sd3-medium")
    cloud.data_science.add_model(COMPARTMENT_ID, "other")
    cloud.data_science.models[newest["id"]]["timeCreated"] = "2999-01-01T00:00:00.000Z"
    cloud.data_science.page_size = 1  # the two candidates come on two pages

    ok(cloud.run("deploy", "--image", IMAGE))

    pages = at(cloud.data_science, "GET", "/20190101/models")
    assert len(pages) == 2 and pages[1].query["page"] == "1"
    assert all(p.query["displayName"] == "sd3-medium" and p.query["compartmentId"] == COMPARTMENT_ID for p in pages)
    body = only(cloud.data_science.seen("POST", "/modelDeployments")).json()
    assert body["modelDeploymentConfigurationDetails"]["modelConfigurationDetails"]["modelId"] == newest["id"]


def test_a_failed_deployment_prints_the_work_request_errors_and_logs(cloud):
    model = cloud.data_science.add_model(COMPARTMENT_ID, "sd3-medium")
    failure = cloud.data_science.fail_next_deployment(DeploymentFailure(
        details="Image pull failed", errors=[("ImagePullFailed", "manifest unknown for sd3-medium:0.1.0")],
        logs=["Pulling image iad.ocir.io/testnamespace/sd3-medium:0.1.0", "pull failed: manifest unknown"]))

    result = cloud.run("deploy", "--model", model["id"], "--image", IMAGE)

    assert result.returncode == 1
    assert "FAILED" in result.stderr and failure.details in result.stderr
    assert "ImagePullFailed: manifest unknown for sd3-medium:0.1.0" in result.stderr
    assert all(line in result.stderr for line in failure.logs)
    assert "Traceback" not in result.stderr and "predict URL" not in result.stdout


def test_a_deployment_that_stays_creating_past_the_wait_timeout_is_reported_not_abandoned(cloud):
    model = cloud.data_science.add_model(COMPARTMENT_ID, "sd3-medium")
    cloud.data_science.polls = 1000

    result = cloud.run("deploy", "--model", model["id"], "--image", IMAGE, "--wait-timeout", "0.5")

    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("(the operation goes on in OCI; check it with `status`)")
    assert result.stderr.strip().splitlines()[-1].startswith("timed out:")
    assert cloud.data_science.seen("DELETE") == []


def test_an_environment_over_2048_bytes_is_refused_before_any_call(cloud):
    result = cloud.run("deploy", "--model", "ocid1.datasciencemodel.oc1..m", "--image", IMAGE,
                       "--env", "BUCKET_NAME=images", "--env", "PROMPT_PREFIX=" + "x" * 2100)

    assert result.returncode == 2
    assert "2048" in result.stderr and "Traceback" not in result.stderr
    assert cloud.requests() == []

    result = cloud.run("up", "--image", IMAGE, "--env", "9LIVES=1")  # nothing is packaged or registered either
    assert result.returncode == 2 and "'9LIVES'" in result.stderr
    assert cloud.requests() == [] and not (cloud.workdir / "build").exists()


def test_up_packages_registers_and_deploys_from_deploy_toml(cloud):
    (cloud.workdir / "deploy.toml").write_text(
        f'name = "sd3-up"\nimage = "{IMAGE}"\ninstance_count = 2\n[environment]\nBUCKET_NAME = "images"\n')

    result = ok(cloud.run("up"))

    artifact = (cloud.workdir / "build" / "sd3.zip").read_bytes()
    (model_id,) = cloud.data_science.models
    assert cloud.data_science.models[model_id]["displayName"] == "sd3-up"
    assert cloud.data_science.artifacts[model_id]["data"] == artifact
    body = only(cloud.data_science.seen("POST", "/modelDeployments")).json()
    model_config = body["modelDeploymentConfigurationDetails"]["modelConfigurationDetails"]
    assert model_config["modelId"] == model_id
    assert model_config["scalingPolicy"] == {"policyType": "FIXED_SIZE", "instanceCount": 2}
    assert body["modelDeploymentConfigurationDetails"]["environmentConfigurationDetails"]["environmentVariables"] \
        == {"BUCKET_NAME": "images"}
    assert "predict URL:" in result.stdout


# --- status, update, delete by name ----------------------------------------------------------

def test_status_update_and_delete_find_the_deployment_by_display_name(cloud):
    model = cloud.data_science.add_model(COMPARTMENT_ID, "sd3-medium")
    new_model = cloud.data_science.add_model(COMPARTMENT_ID, "sd3-medium-v2")
    deployment = cloud.data_science.add_deployment(COMPARTMENT_ID, "sd3-prod", model["id"],
                                                   environment={"BUCKET_NAME": "images", "HF_TOKEN": HF_TOKEN_VALUE})
    cloud.data_science.add_deployment(COMPARTMENT_ID, "sd3-staging", model["id"])

    status = ok(cloud.run("status", "sd3-prod"))
    listing = cloud.data_science.seen("GET", "/20190101/modelDeployments")[0]
    assert listing.query == {"compartmentId": COMPARTMENT_ID, "displayName": "sd3-prod"}
    assert f"id:        {deployment['id']}" in status.stdout and "state:     ACTIVE" in status.stdout
    assert "HF_TOKEN=****" in status.stdout and HF_TOKEN_VALUE not in status.stdout + status.stderr

    ok(cloud.run("update", "sd3-prod", "--model", new_model["id"], "--image", "iad.ocir.io/testnamespace/sd3:2",
                 "--instance-count", "2", "--shape", "VM.GPU.A10.2"))
    put = only(cloud.data_science.seen("PUT", "/modelDeployments/"))
    assert put.path == f"/20190101/modelDeployments/{deployment['id']}"
    now = cloud.data_science.deployment(deployment["id"])
    assert now["lifecycleState"] == "ACTIVE"
    config = now["modelDeploymentConfigurationDetails"]
    assert config["modelConfigurationDetails"]["modelId"] == new_model["id"]
    assert config["modelConfigurationDetails"]["instanceConfiguration"]["instanceShapeName"] == "VM.GPU.A10.2"
    assert config["modelConfigurationDetails"]["scalingPolicy"] == {"policyType": "FIXED_SIZE", "instanceCount": 2}
    assert config["modelConfigurationDetails"]["bandwidthMbps"] == 10  # kept, though the service replaces whole objects
    container = config["environmentConfigurationDetails"]
    assert container["image"] == "iad.ocir.io/testnamespace/sd3:2"
    assert container["environmentVariables"] == {"BUCKET_NAME": "images", "HF_TOKEN": HF_TOKEN_VALUE}
    assert (container["serverPort"], container["healthCheckPort"]) == (8080, 8080)

    ok(cloud.run("delete", "sd3-prod"))
    delete = only(cloud.data_science.seen("DELETE", "/modelDeployments/"))
    assert delete.path == f"/20190101/modelDeployments/{deployment['id']}"
    assert cloud.data_science.deployment(deployment["id"])["lifecycleState"] == "DELETED"
    assert_all_signed_by(cloud, cloud.credentials.key_id)

    gone = cloud.run("status", "sd3-prod")
    assert gone.returncode == 2 and "no model deployment named 'sd3-prod'" in gone.stderr


def test_status_works_with_a_copied_example_config_whose_image_is_still_a_placeholder(cloud):
    # As an operator does: copy deploy.example.toml, fill in the compartment, ask for the status before anything else.
    model = cloud.data_science.add_model(COMPARTMENT_ID, "sd3-medium")
    deployment = cloud.data_science.add_deployment(COMPARTMENT_ID, "sd3-medium", model["id"])
    example = (TOOL.parent / "deploy.example.toml").read_text()
    (cloud.workdir / "deploy.toml").write_text(example.replace("ocid1.compartment.oc1..<unique_id>", COMPARTMENT_ID))
    status = ok(cloud.run("status"))
    assert f"id:        {deployment['id']}" in status.stdout
    refused = cloud.run("deploy", "--model", model["id"])  # deploy would send the image: refused, naming it
    assert refused.returncode == 2 and "image = '<region-key>.ocir.io/<namespace>/sd3-medium:0.1.0'" in \
        refused.stderr and cloud.data_science.seen("POST") == []


def test_an_ambiguous_name_lists_the_candidates_and_changes_nothing(cloud):
    model = cloud.data_science.add_model(COMPARTMENT_ID, "sd3-medium")
    first = cloud.data_science.add_deployment(COMPARTMENT_ID, "twin", model["id"])
    second = cloud.data_science.add_deployment(COMPARTMENT_ID, "twin", model["id"], state="FAILED")

    result = cloud.run("delete", "twin")

    assert result.returncode == 2 and first["id"] in result.stderr and second["id"] in result.stderr
    assert cloud.data_science.seen("DELETE") == []


def test_status_of_a_failed_deployment_shows_why(cloud):
    model = cloud.data_science.add_model(COMPARTMENT_ID, "sd3-medium")
    cloud.data_science.fail_next_deployment()
    assert cloud.run("deploy", "--model", model["id"], "--image", IMAGE).returncode == 1

    result = ok(cloud.run("status"))

    assert "state:     FAILED" in result.stdout and "HealthCheckFailed" in result.stderr
    listing = only(at(cloud.data_science, "GET", "/20190101/workRequests"))
    assert listing.query["resourceId"] == next(iter(cloud.data_science.deployments))


# --- predict -----------------------------------------------------------------------------------

def test_predict_sends_exactly_one_request_when_the_endpoint_answers_500(cloud):
    model = cloud.data_science.add_model(COMPARTMENT_ID, "sd3-medium")
    deployment = cloud.data_science.add_deployment(COMPARTMENT_ID, "sd3-medium", model["id"])
    cloud.data_science.predict_handler = lambda request, md: json_reply(
        500, {"error": {"code": "internal", "message": "generation failed"}})

    result = cloud.run("predict", "--prompt", "a lighthouse at dusk", "--seed", "7")

    predict = only(cloud.data_science.seen("POST", "/predict"))
    assert predict.path == f"/{deployment['id']}/predict"
    sent = predict.json()
    assert re.fullmatch(r"[0-9a-f]{32}", sent.pop("request_id"))  # made by the client, so a retry is safe
    assert sent == {"prompt": "a lighthouse at dusk", "seed": 7, "wait": False}
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "500 internal: generation failed" in result.stderr
    assert f"--request-id {predict.json()['request_id']}" in result.stderr
    assert predict.status == 500 and "opc-request-id" in result.stderr
    assert_all_signed_by(cloud, cloud.credentials.key_id)


def test_predict_sends_exactly_one_request_when_the_connection_drops(cloud):
    model = cloud.data_science.add_model(COMPARTMENT_ID, "sd3-medium")
    cloud.data_science.add_deployment(COMPARTMENT_ID, "sd3-medium", model["id"])
    cloud.data_science.outage(status=None, when=lambda request: request.path.endswith("/predict"))

    result = cloud.run("predict", "--prompt", "a lighthouse at dusk")

    assert result.returncode == 1
    assert "\nnetwork error: ('Connection aborted.', RemoteDisconnected('Remote end closed connection without " \
        f"response')) (Request Endpoint: POST {cloud.data_science.endpoint}/" in result.stderr
    assert len(cloud.data_science.seen("POST", "/predict")) == 1


def test_predict_turns_off_the_sdks_own_resend_on_bad_response_headers(cloud, monkeypatch):
    # In-process, so the fake (same process) can see the env var the SDK reads at the moment of the call.
    monkeypatch.delenv(clients.HEADER_RESEND_ENV, raising=False)
    model = cloud.data_science.add_model(COMPARTMENT_ID, "sd3-medium")
    deployment = cloud.data_science.add_deployment(COMPARTMENT_ID, "sd3-medium", model["id"])
    during_call = []

    def handler(request, md):
        during_call.append(os.environ.get(clients.HEADER_RESEND_ENV))
        return json_reply(200, {"request_id": "r"})

    cloud.data_science.predict_handler = handler
    settings = resolve_settings({"config_file": str(cloud.credentials.config_file)}, {}, None)
    client = clients.predict_client(clients.build_auth(settings), cloud.data_science.endpoint)

    assert operations.call_predict(client, deployment["id"], {"prompt": "x"}) == (200, {"request_id": "r"})
    assert during_call == ["0"] and clients.HEADER_RESEND_ENV not in os.environ


def test_predict_prints_the_answer_and_downloads_stored_and_inline_images(cloud):
    model = cloud.data_science.add_model(COMPARTMENT_ID, "sd3-medium")
    deployment = cloud.data_science.add_deployment(COMPARTMENT_ID, "sd3-medium", model["id"])
    stored_png, inline_png = b"\x89PNG stored " + os.urandom(64), b"\x89PNG inline " + os.urandom(64)
    cloud.storage.buckets["images"]["sd3/2026/11/25/r1-0.png"] = _stored(stored_png)
    answer = {"request_id": "r1", "seed": 7, "timings_ms": {"generate": 1}, "images": [
        {"uri": "oci://images@testnamespace/sd3/2026/11/25/r1-0.png", "object_name": "sd3/2026/11/25/r1-0.png",
         "bucket": "images", "namespace": "testnamespace", "sha256": hashlib.sha256(stored_png).hexdigest(),
         "stored": True},
        {"uri": "oci://images@testnamespace/sd3/2026/11/25/r1-1.png", "object_name": "sd3/2026/11/25/r1-1.png",
         "bucket": "images", "namespace": "testnamespace", "sha256": hashlib.sha256(inline_png).hexdigest(),
         "stored": False, "data": base64.b64encode(inline_png).decode()}]}
    cloud.data_science.predict_handler = lambda request, md: json_reply(200, answer)

    result = ok(cloud.run("predict", deployment["id"], "--body", '{"prompt": "x", "num_images": 2}',
                          "--steps", "10", "--request-id", "r1", "--download", "images"))

    assert json.loads(result.stdout) == answer
    assert only(cloud.data_science.seen("POST", "/predict")).json() == \
        {"prompt": "x", "num_images": 2, "num_inference_steps": 10, "request_id": "r1", "wait": False}
    assert (cloud.workdir / "images" / "r1-0.png").read_bytes() == stored_png
    assert (cloud.workdir / "images" / "r1-1.png").read_bytes() == inline_png
    assert only(cloud.storage.seen("GET")).path == "/n/testnamespace/b/images/o/sd3%2F2026%2F11%2F25%2Fr1-0.png"
    assert_all_signed_by(cloud, cloud.credentials.key_id)


def test_predict_sends_an_image_file_in_base64_and_an_oci_mask_as_is(cloud):
    model = cloud.data_science.add_model(COMPARTMENT_ID, "sd3-medium")
    deployment = cloud.data_science.add_deployment(COMPARTMENT_ID, "sd3-medium", model["id"])
    start = b"\x89PNG start " + os.urandom(64)
    (cloud.workdir / "start.png").write_bytes(start)

    ok(cloud.run("predict", deployment["id"], "--prompt", "a lighthouse", "--image", "start.png",
                 "--mask", "oci://inputs@testnamespace/masks/left.png", "--strength", "0.6"))

    sent = only(cloud.data_science.seen("POST", "/predict")).json()
    assert sent == {"prompt": "a lighthouse", "image": base64.b64encode(start).decode(), "strength": 0.6,
                    "mask_image": "oci://inputs@testnamespace/masks/left.png", "request_id": sent["request_id"], "wait": False}


def test_predict_with_an_image_file_that_is_not_there_sends_nothing(cloud):
    model = cloud.data_science.add_model(COMPARTMENT_ID, "sd3-medium")
    deployment = cloud.data_science.add_deployment(COMPARTMENT_ID, "sd3-medium", model["id"])
    result = cloud.run("predict", deployment["id"], "--prompt", "a lighthouse", "--image", "missing.png")
    assert result.returncode != 0 and "--image: cannot read missing.png" in result.stderr
    assert not cloud.data_science.seen("POST", "/predict")


def _answers_in_turn(*replies):
    """A predict endpoint that answers each call with the next reply (the last one for ever after)."""
    replies = list(replies)

    def answer(request, deployment):
        reply = replies.pop(0) if len(replies) > 1 else replies[0]
        return reply(request) if callable(reply) else reply
    return answer


def test_predict_sends_without_waiting_and_polls_its_id_until_done(cloud):
    model = cloud.data_science.add_model(COMPARTMENT_ID, "sd3-medium")
    deployment = cloud.data_science.add_deployment(COMPARTMENT_ID, "sd3-medium", model["id"])
    done = {"request_id": "slow-1", "seed": 3, "images": [], "timings_ms": {}}
    cloud.data_science.predict_handler = _answers_in_turn(
        json_reply(202, {"request_id": "slow-1", "status": "queued", "position": 2, "progress": None,
                         "retry_after": 1}),
        json_reply(202, {"request_id": "slow-1", "status": "running", "position": None,
                         "progress": {"step": 10, "steps": 28}, "retry_after": 1}),
        json_reply(503, {"code": "ServiceUnavailable", "message": "a blip"}),  # a poll lost: sent again
        json_reply(200, done))

    result = ok(cloud.run("predict", deployment["id"], "--prompt", "a slow lighthouse", "--request-id", "slow-1"))

    assert json.loads(result.stdout) == done
    calls = [request.json() for request in cloud.data_science.seen("POST", "/predict")]
    assert calls[0] == {"prompt": "a slow lighthouse", "request_id": "slow-1", "wait": False}
    assert calls[1:] == [{"request_id": "slow-1"}] * 3  # polls carry the id alone: they never generate
    assert "slow-1: running" in result.stderr


def test_predict_no_wait_prints_the_202_and_request_id_alone_resumes(cloud):
    model = cloud.data_science.add_model(COMPARTMENT_ID, "sd3-medium")
    deployment = cloud.data_science.add_deployment(COMPARTMENT_ID, "sd3-medium", model["id"])
    pending = {"request_id": "later-1", "status": "queued", "position": 1, "progress": None, "retry_after": 1}
    cloud.data_science.predict_handler = _answers_in_turn(json_reply(202, pending))
    accepted = ok(cloud.run("predict", deployment["id"], "--prompt", "later", "--request-id", "later-1",
                            "--no-wait"))
    assert json.loads(accepted.stdout) == pending and "--request-id later-1" in accepted.stderr
    assert len(cloud.data_science.seen("POST", "/predict")) == 1

    done = {"request_id": "later-1", "seed": 1, "images": [], "timings_ms": {}}
    cloud.data_science.predict_handler = _answers_in_turn(json_reply(200, done))
    resumed = ok(cloud.run("predict", deployment["id"], "--request-id", "later-1"))
    assert json.loads(resumed.stdout) == done
    assert cloud.data_science.seen("POST", "/predict")[-1].json() == {"request_id": "later-1"}


def test_predict_polling_stops_at_the_requests_own_error(cloud):
    model = cloud.data_science.add_model(COMPARTMENT_ID, "sd3-medium")
    deployment = cloud.data_science.add_deployment(COMPARTMENT_ID, "sd3-medium", model["id"])
    cloud.data_science.predict_handler = _answers_in_turn(
        json_reply(404, {"code": "unknown_request", "message": "no request 'gone-1' was ever accepted"}))
    result = cloud.run("predict", deployment["id"], "--request-id", "gone-1")
    assert result.returncode != 0 and "gone-1" in result.stderr
    assert len(cloud.data_science.seen("POST", "/predict")) == 1


def _stored(data: bytes) -> StoredObject:
    return StoredObject(data=data, content_type="image/png", metadata={},
                        md5=base64.b64encode(hashlib.md5(data).digest()).decode())


# --- dry-run, auth, errors, help -----------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["register"],
    ["register", "--large-artifact-threshold", "1", "--artifact-bucket", "artifacts"],
    ["deploy", "--image", IMAGE, "--env", "HF_TOKEN", "--autoscale", "1:2"],
    ["up", "--image", IMAGE, "--env", "HF_TOKEN"],
    ["status", "sd3-medium"],
    ["update", "sd3-medium", "--image", IMAGE],
    ["delete", "ocid1.datasciencemodeldeployment.oc1..x"],
    ["predict", "--prompt", "a cat"],
], ids=lambda args: " ".join(args[:2]))
def test_dry_run_prints_the_requests_and_makes_no_request_at_all(cloud, args):
    result = ok(cloud.run(*args, "--dry-run", env={"HF_TOKEN": HF_TOKEN_VALUE}))

    printed = json.loads(result.stdout)  # stdout is the JSON alone, progress goes to stderr
    assert printed["dry_run"] is True and printed["requests"]
    assert cloud.requests() == []
    assert HF_TOKEN_VALUE not in result.stdout + result.stderr
    operations = [r["operation"] for r in printed["requests"]]
    if args[0] == "up":
        assert operations == ["create_model", "create_model_artifact", "create_model_deployment"]
        env = printed["requests"][2]["body"]["model_deployment_configuration_details"][
            "environment_configuration_details"]["environment_variables"]
        assert env == {"HF_TOKEN": "****"}
    if "--artifact-bucket" in args:
        assert operations == ["create_model", "upload_file (multipart)", "export_model_artifact"]


def test_vault_secret_ocids_are_taken_as_env_and_shown_as_the_ocids_they_are(cloud):
    webhook, token = "ocid1.vaultsecret.oc1.iad.aaaawebhook", "ocid1.vaultsecret.oc1.iad.aaaahftoken"
    result = ok(cloud.run("up", "--image", IMAGE, "--env", f"WEBHOOK_SECRET_OCID={webhook}", "--env",
                          f"HF_TOKEN_SECRET_OCID={token}", "--env", "WEBHOOK_SECRET", "--dry-run",
                          env={"WEBHOOK_SECRET": "whsec_dGhpcyBpcyBzZWNyZXQ="}))
    env = json.loads(result.stdout)["requests"][2]["body"]["model_deployment_configuration_details"][
        "environment_configuration_details"]["environment_variables"]
    assert env == {"WEBHOOK_SECRET_OCID": webhook, "HF_TOKEN_SECRET_OCID": token, "WEBHOOK_SECRET": "****"}


def test_a_request_signed_with_an_unknown_key_shows_one_clear_error(cloud, tmp_path):
    stranger = api_key(tmp_path / "stranger")  # a valid key the fake was never told about

    result = cloud.run("status", "sd3-medium", credentials=stranger)

    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("OCI error: 401 NotAuthenticated") and "opc-request-id" in line
    assert cloud.data_science.seen()[0].signature_error == "unknown keyId"


def test_security_token_auth_signs_with_the_session_key(cloud, tmp_path):
    session = cloud.data_science.trust(security_token(tmp_path / "session"))
    model = cloud.data_science.add_model(COMPARTMENT_ID, "sd3-medium")
    cloud.data_science.add_deployment(COMPARTMENT_ID, "sd3-medium", model["id"])

    ok(cloud.run("status", "--auth", "security_token", credentials=session))

    assert_all_signed_by(cloud, session.key_id)


def test_resource_principal_auth_as_in_a_notebook_session(cloud, tmp_path):
    principal = cloud.data_science.trust(resource_principal(tmp_path / "rp"))
    model = cloud.data_science.add_model(COMPARTMENT_ID, "sd3-medium")
    cloud.data_science.add_deployment(COMPARTMENT_ID, "sd3-medium", model["id"])

    # No OCI config file exists; a notebook session's own variable names the compartment.
    result = ok(cloud.run("status", "--auth", "resource_principal", credentials=principal,
                          env={**principal.env, "SD3_DEPLOY_COMPARTMENT_ID": "",
                               "NB_SESSION_COMPARTMENT_OCID": COMPARTMENT_ID}))

    assert "state:     ACTIVE" in result.stdout
    assert_all_signed_by(cloud, principal.key_id)


def test_missing_settings_are_named_with_where_to_set_them(cloud):
    result = cloud.run("register", env={"SD3_DEPLOY_PROJECT_ID": "", "SD3_DEPLOY_COMPARTMENT_ID": ""})
    assert result.returncode == 2
    assert "project_id: --project-id, env SD3_DEPLOY_PROJECT_ID or deploy.toml `project_id`" in result.stderr
    assert "compartment_id" in result.stderr and cloud.requests() == []


@pytest.mark.parametrize("command", ["package", "register", "deploy", "up", "status", "update", "delete",
                                     "predict"])
def test_help_of_every_command_explains_it_with_an_example(cloud, command):
    result = ok(cloud.run(command, "--help"))
    assert f"usage: model-deployment.py {command}" in result.stdout
    assert "example:\n  python model-deployment.py " + command in result.stdout
    if command != "package":
        assert "--dry-run" in result.stdout
        assert "--profile" in result.stdout and "OCI_CLI_PROFILE" in result.stdout


def test_top_level_help_lists_every_command(cloud):
    result = ok(cloud.run("--help"))
    for command in ("package", "register", "deploy", "up", "status", "update", "delete", "predict"):
        assert f"\n    {command} " in result.stdout


# --- refusing early ----------------------------------------------------------------------------

def test_up_with_the_untouched_example_config_packages_nothing_and_names_the_placeholders(cloud):
    (cloud.workdir / "deploy.toml").write_text((REPO / "deploy.example.toml").read_text())
    env = {"SD3_DEPLOY_COMPARTMENT_ID": "", "SD3_DEPLOY_PROJECT_ID": ""}  # as on an operator's machine
    for args in (("up", "--dry-run"), ("up",)):
        result = cloud.run(*args, env=env)
        assert result.returncode == 2, result.stderr
        assert "placeholders from deploy.example.toml" in result.stderr and "<unique_id>" in result.stderr
        assert "--compartment-id, env SD3_DEPLOY_COMPARTMENT_ID or deploy.toml `compartment_id`" in result.stderr
    assert not (cloud.workdir / "build").exists(), "packaged before the settings were checked"
    assert cloud.requests() == []


def test_up_without_an_oci_config_says_so_before_packaging(cloud):
    missing = cloud.workdir / "no-such-config"
    result = cloud.run("up", "--image", IMAGE, "--config-file", str(missing),
                       credentials=dataclasses.replace(cloud.credentials, config_file=None))
    assert result.returncode == 2, result.stderr
    assert str(missing) in result.stderr
    assert "packaging" not in result.stderr and not (cloud.workdir / "build").exists()
    assert cloud.requests() == []


def test_a_failing_endpoint_is_retried_a_bounded_number_of_times_and_named(cloud):
    cloud.data_science.outage(503)
    result = cloud.run("status", "ocid1.datasciencemodeldeployment.oc1.iad.aaaadeployment")
    assert result.returncode == 1
    assert result.stderr.startswith("OCI error: 503"), result.stderr
    # The SDK's default retries for minutes (8 attempts with long backoffs); ours stop at 5 attempts or 15 s.
    assert 2 <= len(cloud.data_science.seen("GET")) <= clients.RETRY_ATTEMPTS


def test_status_by_name_without_a_compartment_says_how_to_give_it(cloud):
    result = cloud.run("status", "sd3-medium", env={"SD3_DEPLOY_COMPARTMENT_ID": ""})
    assert result.returncode == 2
    assert "needs compartment_id (--compartment-id, env SD3_DEPLOY_COMPARTMENT_ID or deploy.toml " \
           "`compartment_id`)" in result.stderr
