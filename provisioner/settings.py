"""Provisioner settings: each one from a flag, else an env var, else `deploy.toml`, else its default."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "SD3_DEPLOY_"
# What deploy.example.toml marks as "fill in": `<unique_id>`, `<region-key>`, `<namespace>`, ...
PLACEHOLDER = re.compile(r"<[A-Za-z][\w -]*>")
AUTH_MODES = ("api_key", "security_token", "resource_principal", "instance_principal")
API_SPECIFICATIONS = ("native", "openai")


class ConfigError(Exception):
    """A setting is missing or invalid; the message tells the operator what to change."""


def _setting(default: Any, help: str, *, env: tuple[str, ...] = (), kind: type | None = None) -> Any:
    metadata = {"help": help, "env": env, "kind": kind}
    if kind is dict:
        return field(default_factory=dict, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class DeploySettings:
    """Every knob of the provisioner; flag `--foo-bar`, env `SD3_DEPLOY_FOO_BAR` (plus aliases), toml key `foo_bar`."""

    # Authentication and endpoints.
    auth: str = _setting("api_key", "how to authenticate: " + ", ".join(AUTH_MODES), env=("OCI_CLI_AUTH",))
    profile: str = _setting("DEFAULT", "profile in the OCI config file (api_key, security_token)",
                            env=("OCI_CLI_PROFILE",))
    config_file: str = _setting("~/.oci/config", "OCI config file (api_key, security_token)",
                                env=("OCI_CLI_CONFIG_FILE", "OCI_CONFIG_FILE"))
    region: str | None = _setting(None, "region, e.g. us-ashburn-1 (default: the profile's or the principal's)",
                                  env=("OCI_CLI_REGION", "OCI_REGION"))
    data_science_endpoint: str | None = _setting(None, "Data Science API endpoint override",
                                                 env=("OCI_DATA_SCIENCE_ENDPOINT",))
    object_storage_endpoint: str | None = _setting(None, "Object Storage endpoint override",
                                                   env=("OCI_OBJECT_STORAGE_ENDPOINT",))
    model_deployment_endpoint: str | None = _setting(
        None, "scheme://host of the predict endpoint (private endpoints); default: from the deployment's URL",
        env=("OCI_MODEL_DEPLOYMENT_ENDPOINT",))
    federation_endpoint: str | None = _setting(
        None, "auth service URL for instance_principal tokens; default: the region's (as the OCI CLI's option)",
        env=("OCI_CLI_FEDERATION_ENDPOINT",))

    # Where things go.
    compartment_id: str | None = _setting(None, "compartment OCID of the model and the deployment",
                                          env=("NB_SESSION_COMPARTMENT_OCID",))
    project_id: str | None = _setting(None, "Data Science project OCID", env=("PROJECT_OCID",))
    name: str = _setting("sd3-medium", "display name of the model and of the deployment")
    description: str = _setting("Stable Diffusion 3 Medium text-to-image (BentoML custom container)",
                                "description of the model and of the deployment")

    # The artifact.
    source_dir: Path = _setting(REPO_ROOT / "sd3-medium", "folder zipped into the model artifact")
    artifact: Path = _setting(REPO_ROOT / "build" / "sd3-medium.zip", "where `package` writes the artifact zip")
    project_file: Path = _setting(REPO_ROOT / "pyproject.toml",
                                  "pyproject.toml whose version goes into the model's metadata")
    large_artifact_threshold: int = _setting(
        2_000_000_000, "artifacts of at least this many bytes go through a bucket and export_model_artifact")
    artifact_bucket: str | None = _setting(None, "bucket for artifacts over the threshold")
    artifact_namespace: str | None = _setting(None,
                                              "Object Storage namespace of the artifact bucket (default: looked up)")
    artifact_prefix: str = _setting("model-artifacts/", "object name prefix of uploaded artifacts")
    part_size: int = _setting(128 * 1024 * 1024, "multipart upload part size in bytes")

    # The deployment.
    model: str | None = _setting(None, "model OCID or display name to deploy (default: the newest model named --name)")
    image: str | None = _setting(None, "OCIR image, e.g. iad.ocir.io/<namespace>/sd3-medium:0.1.0")
    image_digest: str | None = _setting(None, "image digest (sha256:...) to pin the image")
    shape: str = _setting("VM.GPU.A10.1", "compute shape of each instance")
    instance_count: int = _setting(1, "fixed number of instances (ignored with --autoscale)")
    autoscale: str | None = _setting(None, "MIN:MAX instances, scaling on predict requests per minute")
    autoscale_scale_out_query: str = _setting(
        'PredictRequestCount[1m]{resourceId = "MODEL_DEPLOYMENT_OCID"}.grouping().sum() > 8',
        "MQL query that adds an instance when true")
    autoscale_scale_in_query: str = _setting(
        'PredictRequestCount[1m]{resourceId = "MODEL_DEPLOYMENT_OCID"}.grouping().sum() < 2',
        "MQL query that removes an instance when true")
    autoscale_cooldown_seconds: int = _setting(600, "seconds between two scaling actions")
    bandwidth_mbps: int = _setting(10, "load balancer bandwidth in Mbps")
    subnet_id: str | None = _setting(None, "subnet OCID (custom networking); default: managed networking")
    private_endpoint_id: str | None = _setting(None, "Data Science private endpoint OCID")
    log_group_id: str | None = _setting(None, "log group OCID of the access and predict logs")
    access_log_id: str | None = _setting(None, "log OCID for access logs")
    predict_log_id: str | None = _setting(None, "log OCID for predict logs (the container's stdout/stderr)")
    environment: dict[str, str] = _setting(None, "the service's env vars", kind=dict)
    api: str = _setting("native", "the routes the deployment forwards: native (/predict, /health) or openai (also "
                                  "the OpenAI Images API under <endpoint>/predict/v1: images/generations, "
                                  "images/edits, models)")

    # Behaviour.
    wait: bool = _setting(True, "wait until the deployment is ACTIVE (or deleted)")
    wait_timeout: float = _setting(3600.0, "seconds to wait for a deployment or work request")
    poll_interval: float = _setting(30.0, "longest pause in seconds between two status polls")
    dry_run: bool = _setting(False, "print the request bodies and send nothing")


# What each command reads (register, deploy and up read them all): a placeholder left in a setting a command does
# not use does not stop it (`status` works with a deploy.toml whose image is still `<region-key>.ocir.io/...`).
_CONNECTION = ("auth", "profile", "config_file", "region", "data_science_endpoint", "object_storage_endpoint",
               "model_deployment_endpoint", "federation_endpoint", "compartment_id", "name")
_WAITING = ("wait", "wait_timeout", "poll_interval")
COMMAND_SETTINGS: dict[str, tuple[str, ...]] = {
    "package": ("source_dir", "artifact"),
    "status": _CONNECTION,
    "update": _CONNECTION + _WAITING,
    "delete": _CONNECTION + _WAITING,
    "predict": _CONNECTION + _WAITING,
}


def env_names(key: str) -> tuple[str, ...]:
    """The env vars read for setting `key`, in order of precedence."""
    meta = DeploySettings.__dataclass_fields__[key].metadata
    return (ENV_PREFIX + key.upper(), *meta["env"])


def setting_help(key: str) -> str:
    """Help text of setting `key` with its default and where else it can be set, for `--help`."""
    f = DeploySettings.__dataclass_fields__[key]
    default = f.default if f.default is not dataclasses.MISSING else None
    text = f.metadata["help"]
    if default not in (None, "", {}) and not isinstance(default, bool):
        in_repo = isinstance(default, Path) and default.is_relative_to(REPO_ROOT)
        shown = default.relative_to(REPO_ROOT) if in_repo else default
        text += f" [default: {shown}]"
    if key != "environment":
        text += f" (env {' or '.join(env_names(key))}; deploy.toml `{key}`)"
    return text.replace("%", "%%")  # argparse formats help with %


def _field_type(key: str) -> type:
    f = DeploySettings.__dataclass_fields__[key]
    if f.metadata["kind"] is not None:
        return f.metadata["kind"]
    default = f.default
    if isinstance(default, bool):
        return bool
    if isinstance(default, Path):
        return Path
    if isinstance(default, (int, float)):
        return type(default)
    return str


def _coerce(key: str, value: Any, origin: str, base_dir: Path) -> Any:
    kind = _field_type(key)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind is int:
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            return int(value)
        if kind is float:
            return float(value)
        if kind is Path:
            path = Path(os.path.expanduser(str(value)))
            return path if path.is_absolute() else base_dir / path
        if kind is dict:
            if not isinstance(value, Mapping):
                raise ValueError("expected a table of NAME = \"value\"")
            return {str(k): str(v) for k, v in value.items()}
        if not isinstance(value, str):
            raise ValueError("expected a string")
        return value
    except ValueError as exc:
        raise ConfigError(f"{key} from {origin}: {value!r} is not valid ({exc})") from None


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a deploy.toml; unknown keys are an error so a typo does not go unnoticed."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    known = {f.name for f in dataclasses.fields(DeploySettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s) {', '.join(unknown)}; "
                          f"known keys: {', '.join(sorted(known))}")
    return data


def parse_env_assignments(items: list[str], environ: Mapping[str, str]) -> dict[str, str]:
    """Turn `--env NAME=VALUE` / `--env NAME` (value from this shell) into a dict."""
    result: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in environ:
                raise ConfigError(f"--env {name}: {name} is not set in this shell (use --env {name}=VALUE)")
            value = environ[name]
        result[name] = value
    return result


def resolve_settings(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    config_path: Path | None,
    *,
    config_required: bool = False,
    command: str | None = None,
) -> DeploySettings:
    """Merge flags (values that are not None), env vars and the config file into one DeploySettings.

    The service env vars merge by name: the config file's `[environment]` table, then `--env` on top.
    `command`: only the settings it reads (`COMMAND_SETTINGS`) are refused for still holding a placeholder.
    """
    file_values: dict[str, Any] = {}
    base_dir = Path.cwd()
    if config_path is not None and (config_required or config_path.exists()):
        file_values = read_config_file(config_path)
        base_dir = config_path.resolve().parent

    values: dict[str, Any] = {}
    for f in dataclasses.fields(DeploySettings):
        key = f.name
        if key == "environment":
            continue
        if flags.get(key) is not None:
            values[key] = _coerce(key, flags[key], f"--{key.replace('_', '-')}", Path.cwd())
            continue
        env_hit = next((name for name in env_names(key) if environ.get(name, "") != ""), None)
        if env_hit is not None:
            values[key] = _coerce(key, environ[env_hit], f"env {env_hit}", Path.cwd())
        elif key in file_values:
            values[key] = _coerce(key, file_values[key], str(config_path), base_dir)

    environment = _coerce("environment", file_values.get("environment", {}), str(config_path), base_dir)
    environment.update(flags.get("environment") or {})
    values["environment"] = environment

    settings = DeploySettings(**values)
    if settings.auth not in AUTH_MODES:
        raise ConfigError(f"auth {settings.auth!r} is not one of {', '.join(AUTH_MODES)}")
    if settings.api not in API_SPECIFICATIONS:
        raise ConfigError(f"api {settings.api!r} is not one of {', '.join(API_SPECIFICATIONS)}")
    refuse_placeholders(settings, COMMAND_SETTINGS.get(command))
    return settings


def how_to_set(key: str) -> str:
    """Where setting `key` can be given: its flag, its env var and its deploy.toml key."""
    return f"--{key.replace('_', '-')}, env {env_names(key)[0]} or deploy.toml `{key}`"


def refuse_placeholders(settings: DeploySettings, keys: tuple[str, ...] | None = None) -> None:
    """Fail, naming each one, when a setting (of `keys`; all by default) still holds a `<placeholder>` of
    deploy.example.toml."""
    lines = []
    for f in dataclasses.fields(DeploySettings):
        if keys is not None and f.name not in keys:
            continue
        value = getattr(settings, f.name)
        if f.name == "environment":
            lines += [f"  [environment] {name} = {text!r}: set it in deploy.toml's [environment] table or with "
                      f"--env {name}=VALUE" for name, text in value.items() if PLACEHOLDER.search(text)]
        elif isinstance(value, str) and PLACEHOLDER.search(value):
            lines.append(f"  {f.name} = {value!r}: set it with {how_to_set(f.name)}")
    if lines:
        raise ConfigError("these settings still hold placeholders from deploy.example.toml; replace each "
                          "<...> with your own value:\n" + "\n".join(lines))


def require(settings: DeploySettings, *keys: str) -> None:
    """Fail with one message naming every missing setting and how to give it."""
    missing = [key for key in keys if getattr(settings, key) in (None, "")]
    if missing:
        lines = [f"  {key}: {how_to_set(key)}" for key in missing]
        raise ConfigError("missing setting(s):\n" + "\n".join(lines))
