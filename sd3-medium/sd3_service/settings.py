"""The service's configuration: one object, read from the environment once at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The folder this file is in: the model artifact, read-only inside OCI Model Deployment.
ARTIFACT_DIR = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Every knob of the service, named as in design.md §3 (environment variable = field name, upper case)."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    sd3_model: str = Field("auto", description="`auto`, `tiny`, a local diffusers folder or a Hugging Face repo id")
    sd3_device: Literal["auto", "cuda", "cpu"] = "auto"
    sd3_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    hf_token: SecretStr | None = Field(None, description="only to download the gated model from the hub")

    bucket_name: str | None = Field(None, description="store images in this Object Storage bucket when set")
    namespace: str | None = None
    object_prefix: str = "sd3/"
    oci_auth: Literal["resource_principal", "instance_principal", "api_key", "security_token"] = "resource_principal"
    oci_profile: str = "DEFAULT"
    oci_config_file: str = "~/.oci/config"
    oci_region: str | None = None
    oci_object_storage_endpoint: str | None = None
    image_dir: Path = Path("./outputs")

    model_deploy_predict_endpoint: str = "/predict"
    model_deploy_health_endpoint: str = "/health"
    max_body_bytes: int = Field(10 * 1024 * 1024, description="OCI Model Deployment caps payloads at 10 MB")
    max_queue: int = Field(4, ge=0, description="requests waiting for the GPU beyond the running one; more get 429")
    idempotency_cache_size: int = Field(1024, ge=0, description="answers remembered by request_id")

    @field_validator("model_deploy_predict_endpoint", "model_deploy_health_endpoint")
    @classmethod
    def _leading_slash(cls, route: str) -> str:
        return route if route.startswith("/") else "/" + route
