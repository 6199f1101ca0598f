"""Authentication and `oci` SDK clients for the provisioner, honouring the endpoint overrides."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import oci

from provisioner.settings import ConfigError, DeploySettings

# Control-plane calls retry what the SDK deems transient, for a bounded time; predict never retries
# (a retried predict would generate again).
HEADER_RESEND_ENV = "OCI_HEADER_PARSING_ERROR_MAX_RETRIES"
PREDICT_TIMEOUT = (10.0, 90.0)  # connect, read; Model Deployment itself cuts a predict at 60 s
RETRY_ATTEMPTS = 5
RETRY_SECONDS = 15  # how long one call retries: an unreachable endpoint is reported in ~20 s, not the SDK's 95 s
CONTROL_PLANE_TIMEOUT = (5.0, 60.0)  # connect, read: a closed or filtered port fails fast


def bounded_retry_strategy():
    """The SDK's retries (timeouts, connection errors, 429, 5xx), but none started after RETRY_SECONDS.

    The SDK's default keeps retrying for minutes where nothing answers (a wrong endpoint, off OCI for an
    instance principal), with nothing on the screen meanwhile.
    """
    return oci.retry.RetryStrategyBuilder(
        max_attempts_check=True, max_attempts=RETRY_ATTEMPTS,
        total_elapsed_time_check=True, total_elapsed_time_seconds=RETRY_SECONDS,
        service_error_check=True,
    ).get_retry_strategy()



@dataclass(frozen=True)
class OciAuth:
    """An SDK config dict and, for token-based auth, the signer that goes with it."""

    config: dict[str, Any]
    signer: Any | None

    @property
    def region(self) -> str | None:
        return self.config.get("region")

    def client_kwargs(self, endpoint: str | None, **extra: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(extra)
        if self.signer is not None:
            kwargs["signer"] = self.signer
        if endpoint:
            kwargs["service_endpoint"] = endpoint
        return kwargs


def config_file_region(settings: DeploySettings) -> str | None:
    """The region named in the OCI config profile, read locally (for dry-run, which builds no signer)."""
    if settings.region:
        return settings.region
    if settings.auth not in ("api_key", "security_token"):
        return None
    try:
        return oci.config.from_file(settings.config_file, settings.profile).get("region")
    except oci.exceptions.ClientError:
        return None


def build_auth(settings: DeploySettings) -> OciAuth:
    """Config and signer for `settings.auth`; raises ConfigError with what to fix."""
    try:
        if settings.auth in ("api_key", "security_token"):
            config = oci.config.from_file(settings.config_file, settings.profile)
            if settings.region:
                config["region"] = settings.region
            signer = None
            if settings.auth == "security_token":
                token_file = config.get("security_token_file")
                if not token_file:
                    raise ConfigError(f"profile {settings.profile} has no security_token_file; "
                                      "run `oci session authenticate` first")
                token = Path(token_file).expanduser().read_text().strip()
                key = oci.signer.load_private_key_from_file(config["key_file"], config.get("pass_phrase"))
                signer = oci.auth.signers.SecurityTokenSigner(token, key)
                oci.config.validate_config(config, signer=signer)
            else:
                oci.config.validate_config(config)
            return OciAuth(config=config, signer=signer)
        if settings.auth == "resource_principal":
            signer = oci.auth.signers.get_resource_principals_signer()
        else:
            signer = oci.auth.signers.InstancePrincipalsSecurityTokenSigner(
                federation_endpoint=settings.federation_endpoint, retry_strategy=bounded_retry_strategy(),
                federation_client_retry_strategy=bounded_retry_strategy())
        return OciAuth(config={"region": settings.region or signer.region}, signer=signer)
    except ConfigError:
        raise
    except (oci.exceptions.ClientError, OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"cannot set up {settings.auth} authentication: {type(exc).__name__}: {exc}") from None


def data_science_client(auth: OciAuth, settings: DeploySettings) -> oci.data_science.DataScienceClient:
    """The Data Science control-plane client."""
    return oci.data_science.DataScienceClient(auth.config, **auth.client_kwargs(
        settings.data_science_endpoint, retry_strategy=bounded_retry_strategy(), timeout=CONTROL_PLANE_TIMEOUT))


def object_storage_client(auth: OciAuth, settings: DeploySettings) -> oci.object_storage.ObjectStorageClient:
    """The Object Storage client (large artifacts, image downloads)."""
    return oci.object_storage.ObjectStorageClient(auth.config, **auth.client_kwargs(
        settings.object_storage_endpoint, retry_strategy=bounded_retry_strategy(), timeout=CONTROL_PLANE_TIMEOUT))


def predict_client(auth: OciAuth, endpoint: str) -> oci.model_deployment.ModelDeploymentClient:
    """A client for one deployment's predict route that never retries: a retry would generate again."""
    return oci.model_deployment.ModelDeploymentClient(
        auth.config,
        **auth.client_kwargs(endpoint, retry_strategy=oci.retry.NoneRetryStrategy(), timeout=PREDICT_TIMEOUT),
    )


@contextlib.contextmanager
def no_resend_on_header_errors() -> Iterator[None]:
    """Turn off the SDK's own re-send of a request whose response headers fail to parse.

    The SDK does that (default twice) whatever the retry strategy, reading this env var at each call;
    a re-sent predict would generate again.
    """
    previous = os.environ.get(HEADER_RESEND_ENV)
    os.environ[HEADER_RESEND_ENV] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(HEADER_RESEND_ENV, None)
        else:
            os.environ[HEADER_RESEND_ENV] = previous
