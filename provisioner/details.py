"""Pure builders: settings in, `oci` request objects out. Nothing here talks to the network."""

from __future__ import annotations

import base64
import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oci import util as oci_util
from oci.data_science import models as ds

from provisioner.artifact import ArtifactInfo
from provisioner.settings import ConfigError, DeploySettings, how_to_set

SERVICE_PORT = 8080  # the container listens here for /predict and /health (docs/architecture.md)
MAX_ENVIRONMENT_BYTES = 2048
MAX_PREDICT_BODY_BYTES = 10 * 1024 * 1024
# Set by the platform inside the container; a deployment may not override them.
RESERVED_ENV_NAMES = frozenset({"MODEL_DEPLOYMENT_OCID", "TENANCY_OCID", "CONTAINER_CUSTOM_IMAGE",
                                "MODEL_SERVING_PYTHON_VERSION"})
ENV_NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
SECRET_NAME_PATTERN = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)
MASK = "****"
DIGEST_PATTERN = re.compile(r"sha256:[0-9a-f]{64}")
SAMPLE_PREDICT_BODY = {"prompt": "A cat holding a sign that says hello World", "num_inference_steps": 10,
                       "guidance_scale": 7.0}


# --- the model and its artifact ---------------------------------------------------------------

def read_project_version(pyproject: Path) -> str:
    """The `[project] version` of a pyproject.toml."""
    try:
        with pyproject.open("rb") as fh:
            return str(tomllib.load(fh)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read the project version from {pyproject}: {exc}") from None


def build_model_details(settings: DeploySettings, artifact: ArtifactInfo, project_version: str) -> ds.CreateModelDetails:
    """The model catalog entry, with the artifact's sha256 and size and the project version as custom metadata."""
    metadata = [
        ds.Metadata(key="artifact_sha256", value=artifact.sha256, category="other",
                    description="sha256 of the model artifact zip"),
        ds.Metadata(key="artifact_bytes", value=str(artifact.size), category="other",
                    description="size of the model artifact zip in bytes"),
        ds.Metadata(key="project_version", value=project_version, category="other",
                    description="version of the sd3-medium-oci project that built the artifact"),
    ]
    return ds.CreateModelDetails(
        compartment_id=settings.compartment_id,
        project_id=settings.project_id,
        display_name=settings.name,
        description=settings.description,
        custom_metadata_list=metadata,
    )


def uses_bucket(settings: DeploySettings, artifact: ArtifactInfo) -> bool:
    """Whether the artifact is too large for create_model_artifact and goes through a bucket."""
    return artifact.size >= settings.large_artifact_threshold


def check_artifact_upload(settings: DeploySettings, artifact: ArtifactInfo, region: str | None) -> None:
    """Refuse, before any call, an upload that cannot work: a large artifact needs a bucket and its region."""
    if not uses_bucket(settings, artifact):
        return
    if not settings.artifact_bucket:
        raise ConfigError(f"the artifact is {artifact.size} bytes, at least large_artifact_threshold "
                          f"({settings.large_artifact_threshold}); set artifact_bucket to upload it through a bucket "
                          f"({how_to_set('artifact_bucket')})")
    if not region:
        raise ConfigError(f"the region of the artifact bucket is unknown; set region ({how_to_set('region')})")


def artifact_object_name(settings: DeploySettings, artifact: ArtifactInfo) -> str:
    """Object name of an artifact in the bucket; content-addressed, so a re-upload of the same zip is harmless."""
    return f"{settings.artifact_prefix}{settings.name}-{artifact.sha256[:16]}.zip"


def artifact_content_disposition(settings: DeploySettings) -> str:
    """Content-Disposition of a direct artifact upload (the file name users get on download)."""
    return f'attachment; filename="{settings.name}.zip"'


def build_export_details(namespace: str, bucket: str, object_name: str, region: str) -> ds.ExportModelArtifactDetails:
    """export_model_artifact's body: import the artifact from `oci://bucket@namespace/object_name`."""
    return ds.ExportModelArtifactDetails(
        artifact_export_details=ds.ArtifactExportDetailsObjectStorage(
            namespace=namespace, source_bucket=bucket, source_object_name=object_name, source_region=region))


# --- the service's environment variables -------------------------------------------------------

def environment_bytes(environment: dict[str, str]) -> int:
    """Size of the env vars as counted against the 2048-byte limit.

    Each variable counts as in a process environment block, `NAME=value` plus a terminating NUL,
    in UTF-8; this is slightly stricter than name + value alone, so what we accept the service accepts.
    """
    return sum(len(f"{name}={value}".encode()) + 1 for name, value in environment.items())


def validate_environment(environment: dict[str, str]) -> None:
    """Refuse env vars that Model Deployment would refuse, naming every problem at once."""
    problems = []
    for name in environment:
        if not (2 <= len(name) < 32):
            problems.append(f"{name!r}: a name must have 2 to 31 characters")
        if not ENV_NAME_PATTERN.fullmatch(name):
            problems.append(f"{name!r}: a name must start with a letter and hold only letters, digits and _")
        if name.endswith("_"):
            problems.append(f"{name!r}: a name must not end with _")
        if name in RESERVED_ENV_NAMES:
            problems.append(f"{name!r}: set by the platform, cannot be overridden")
    size = environment_bytes(environment)
    if size > MAX_ENVIRONMENT_BYTES:
        problems.append(f"the env vars take {size} bytes (NAME=value plus one byte each), over Model "
                        f"Deployment's limit of {MAX_ENVIRONMENT_BYTES}; move large values into the artifact")
    if problems:
        raise ConfigError("invalid environment variables:\n  " + "\n  ".join(problems))


def is_secret_name(name: str) -> bool:
    """Whether an env var holds a secret (HF_TOKEN and the like) that must never be printed; a `*_OCID` names a
    Vault secret (WEBHOOK_SECRET_OCID) and is no secret itself."""
    return bool(SECRET_NAME_PATTERN.search(name)) and not name.upper().endswith("_OCID")


def mask_secrets(value: Any) -> Any:
    """A copy of a to_dict() tree with the values of secret env vars replaced by ****."""
    if isinstance(value, list):
        return [mask_secrets(item) for item in value]
    if not isinstance(value, dict):
        return value
    masked = {}
    for key, item in value.items():
        if key in ("environment_variables", "default_environment_variables", "environment") and isinstance(item, dict):
            masked[key] = {name: (MASK if is_secret_name(name) and v else v) for name, v in item.items()}
        else:
            masked[key] = mask_secrets(item)
    return masked


# --- the deployment ------------------------------------------------------------------------------

def parse_autoscale(text: str) -> tuple[int, int]:
    """`MIN:MAX` → (min, max), with 1 <= MIN <= MAX."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not match:
        raise ConfigError(f"autoscale {text!r}: expected MIN:MAX, e.g. 1:4")
    low, high = int(match[1]), int(match[2])
    if not 1 <= low <= high:
        raise ConfigError(f"autoscale {text!r}: need 1 <= MIN <= MAX")
    return low, high


def build_scaling_policy(settings: DeploySettings) -> ds.ScalingPolicy:
    """A fixed instance count, or with `autoscale` a threshold policy on the deployment's predict metrics."""
    if not settings.autoscale:
        if settings.instance_count < 1:
            raise ConfigError(f"instance_count {settings.instance_count}: must be at least 1")
        return ds.FixedSizeScalingPolicy(instance_count=settings.instance_count)
    low, high = parse_autoscale(settings.autoscale)
    # Predefined rules only know CPU and memory, which say little about a GPU-bound service; the
    # custom MQL rules watch the predict traffic instead.
    rule = ds.CustomMetricExpressionRule(
        scale_out_configuration=ds.CustomExpressionQueryScalingConfiguration(
            query=settings.autoscale_scale_out_query, instance_count_adjustment=1),
        scale_in_configuration=ds.CustomExpressionQueryScalingConfiguration(
            query=settings.autoscale_scale_in_query, instance_count_adjustment=1),
    )
    return ds.AutoScalingPolicy(
        is_enabled=True,
        cool_down_in_seconds=settings.autoscale_cooldown_seconds,
        auto_scaling_policies=[ds.ThresholdBasedAutoScalingPolicyDetails(
            minimum_instance_count=low, maximum_instance_count=high, initial_instance_count=low, rules=[rule])],
    )


def build_log_details(settings: DeploySettings) -> ds.CategoryLogDetails | None:
    """Access and predict logs, when a log group and at least one log are configured."""
    logs = {"access": settings.access_log_id, "predict": settings.predict_log_id}
    if not settings.log_group_id:
        if any(logs.values()):
            raise ConfigError("access_log_id/predict_log_id need log_group_id, the log group they are in "
                              f"({how_to_set('log_group_id')})")
        return None
    if not any(logs.values()):
        raise ConfigError("log_group_id is set but neither access_log_id nor predict_log_id")
    return ds.CategoryLogDetails(**{
        kind: ds.LogDetails(log_id=log_id, log_group_id=settings.log_group_id)
        for kind, log_id in logs.items() if log_id
    })


def _check_image(image: str | None, digest: str | None) -> None:
    if not image:
        raise ConfigError("image is required: --image <region>.ocir.io/<namespace>/<repo>:<tag>")
    if digest and not DIGEST_PATTERN.fullmatch(digest):
        raise ConfigError(f"image_digest {digest!r}: expected sha256: and 64 hex digits")


def build_deployment_details(settings: DeploySettings, model_id: str) -> ds.CreateModelDeploymentDetails:
    """The whole create_model_deployment body; raises ConfigError before anything could be sent."""
    _check_image(settings.image, settings.image_digest)
    validate_environment(settings.environment)
    if settings.bandwidth_mbps < 1:
        raise ConfigError(f"bandwidth_mbps {settings.bandwidth_mbps}: must be at least 1")
    instance = ds.InstanceConfiguration(
        instance_shape_name=settings.shape,
        subnet_id=settings.subnet_id,
        private_endpoint_id=settings.private_endpoint_id,
    )
    environment = ds.OcirModelDeploymentEnvironmentConfigurationDetails(
        image=settings.image,
        image_digest=settings.image_digest,
        server_port=SERVICE_PORT,
        health_check_port=SERVICE_PORT,
        environment_variables=dict(settings.environment) or None,
        # `openai`: Model Deployment also forwards the OpenAI routes (/v1/images/..., /v1/models) to the container.
        predict_api_specification="openai" if settings.api == "openai" else None,
    )
    return ds.CreateModelDeploymentDetails(
        display_name=settings.name,
        description=settings.description,
        project_id=settings.project_id,
        compartment_id=settings.compartment_id,
        model_deployment_configuration_details=ds.SingleModelDeploymentConfigurationDetails(
            model_configuration_details=ds.ModelConfigurationDetails(
                model_id=model_id,
                instance_configuration=instance,
                scaling_policy=build_scaling_policy(settings),
                bandwidth_mbps=settings.bandwidth_mbps,
            ),
            environment_configuration_details=environment,
        ),
        category_log_details=build_log_details(settings),
    )


@dataclass(frozen=True)
class DeploymentChanges:
    """What `update` changes; None leaves a field as it is."""

    model_id: str | None = None
    image: str | None = None
    image_digest: str | None = None
    instance_count: int | None = None
    shape: str | None = None

    def is_empty(self) -> bool:
        return all(value is None for value in vars(self).values())


def build_update_details(changes: DeploymentChanges,
                         current: ds.ModelDeployment | None) -> ds.UpdateModelDeploymentDetails:
    """update_model_deployment's body: the current configuration with `changes` applied.

    Nested objects are sent whole, so unchanged fields are copied from `current`; without `current`
    (dry-run) they show as None and are filled in from the live deployment when sent.
    """
    if changes.is_empty():
        raise ConfigError("nothing to update: give --model, --image (--image-digest), --instance-count or --shape")
    if changes.instance_count is not None and changes.instance_count < 1:
        raise ConfigError(f"instance_count {changes.instance_count}: must be at least 1")
    if changes.image_digest and not DIGEST_PATTERN.fullmatch(changes.image_digest):
        raise ConfigError(f"image_digest {changes.image_digest!r}: expected sha256: and 64 hex digits")
    config = current.model_deployment_configuration_details if current else None
    model_now = config.model_configuration_details if config else None
    env_now = config.environment_configuration_details if config else None

    model_part = None
    if changes.model_id or changes.shape or changes.instance_count is not None:
        instance_now = model_now.instance_configuration if model_now else None
        scaling = model_now.scaling_policy if model_now else None
        if changes.instance_count is not None:
            if isinstance(scaling, ds.AutoScalingPolicy):
                raise ConfigError("the deployment autoscales; change its MIN:MAX instead of --instance-count")
            scaling = ds.FixedSizeScalingPolicy(instance_count=changes.instance_count)
        model_part = ds.UpdateModelConfigurationDetails(
            model_id=changes.model_id or (model_now.model_id if model_now else None),
            instance_configuration=ds.InstanceConfiguration(
                instance_shape_name=changes.shape or (instance_now.instance_shape_name if instance_now else None),
                subnet_id=instance_now.subnet_id if instance_now else None,
                private_endpoint_id=instance_now.private_endpoint_id if instance_now else None,
            ),
            scaling_policy=scaling,
            bandwidth_mbps=model_now.bandwidth_mbps if model_now else None,
        )

    env_part = None
    if changes.image or changes.image_digest:
        if env_now is not None and not isinstance(env_now, ds.OcirModelDeploymentEnvironmentConfigurationDetails):
            raise ConfigError("the deployment does not run a custom container; cannot change its image")
        image = changes.image or (env_now.image if env_now else None)
        # A digest pins one image; the old one would contradict a new image.
        digest = changes.image_digest or (None if changes.image else (env_now.image_digest if env_now else None))
        env_part = ds.UpdateOcirModelDeploymentEnvironmentConfigurationDetails(
            image=image,
            image_digest=digest,
            server_port=env_now.server_port if env_now else None,
            health_check_port=env_now.health_check_port if env_now else None,
            environment_variables=env_now.environment_variables if env_now else None,
            cmd=env_now.cmd if env_now else None,
            entrypoint=env_now.entrypoint if env_now else None,
        )

    return ds.UpdateModelDeploymentDetails(
        model_deployment_configuration_details=ds.UpdateSingleModelDeploymentConfigurationDetails(
            model_configuration_details=model_part,
            environment_configuration_details=env_part,
        ))


# --- calling the deployment ------------------------------------------------------------------

def predict_url(model_deployment_url: str) -> str:
    """The URL a client POSTs to."""
    return model_deployment_url.rstrip("/") + "/predict"


def openai_base_url(model_deployment_url: str) -> str:
    """The `base_url` of the `openai` SDK for a deployment created with `api = "openai"`."""
    return predict_url(model_deployment_url) + "/v1"


def predict_service_endpoint(model_deployment_url: str, deployment_id: str, override: str | None) -> str:
    """scheme://host for the SDK's ModelDeploymentClient, whose predict path is `/<deployment OCID>/predict`."""
    if override:
        return override.rstrip("/")
    url = model_deployment_url.rstrip("/")
    suffix = "/" + deployment_id
    if not url.endswith(suffix):
        raise ConfigError(f"deployment URL {model_deployment_url} does not end with its OCID; "
                          "set OCI_MODEL_DEPLOYMENT_ENDPOINT")
    return url[: -len(suffix)]


def raw_request_command(url: str, body: dict[str, Any], settings: DeploySettings) -> str:
    """A ready-to-paste `oci raw-request` that calls the deployment with the same auth as this tool."""
    parts = ["oci", "raw-request", "--http-method", "POST", "--target-uri", url,
             "--request-body", json.dumps(body)]
    if settings.auth != "api_key":
        parts += ["--auth", settings.auth]
    if settings.auth in ("api_key", "security_token"):
        if settings.profile != "DEFAULT":
            parts += ["--profile", settings.profile]
        if settings.config_file != "~/.oci/config":
            parts += ["--config-file", settings.config_file]
    return shlex.join(parts)


def image_field(value: str, flag: str) -> str:
    """An image flag as the service takes it: an `oci://` URI as is, a file's bytes in base64."""
    if value.startswith("oci://"):
        return value
    path = Path(value).expanduser()
    try:
        return base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path}: {exc.strerror or exc} (give a PNG, JPEG or WebP file, "
                          "or oci://<bucket>@<namespace>/<object>)") from None


def build_predict_body(prompt: str | None, body_json: str | None, overrides: dict[str, Any],
                       images: dict[str, str | None] | None = None) -> dict[str, Any]:
    """The JSON body of a predict call, from --body (JSON text) and/or --prompt, the parameter flags, and the
    image flags (`images`: field -> a file or an `oci://` URI)."""
    body: dict[str, Any] = {}
    if body_json:
        try:
            body = json.loads(body_json)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ConfigError("--body must be a JSON object")
    if prompt is not None:
        body["prompt"] = prompt
    body.update({key: value for key, value in overrides.items() if value is not None})
    flags = {"image": "--image", "mask_image": "--mask"}
    body.update({field: image_field(value, flags.get(field, field)) for field, value in (images or {}).items()
                 if value is not None})
    if not body.get("prompt"):
        raise ConfigError('a prompt is required: --prompt "..." or --body \'{"prompt": "..."}\'')
    if len(json.dumps(body).encode()) > MAX_PREDICT_BODY_BYTES:
        raise ConfigError("the predict body is over Model Deployment's 10 MB limit"
                          + ("; upload a large image to a bucket the deployment reads and pass it as oci://..."
                             if any((images or {}).values()) else ""))
    return body


def request_json(obj: Any) -> Any:
    """An SDK model as printable JSON: `oci.util.to_dict`, unset fields dropped (not sent either), secrets masked."""
    return mask_secrets(_prune_none(oci_util.to_dict(obj)))


def _prune_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _prune_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_prune_none(v) for v in value]
    return value
