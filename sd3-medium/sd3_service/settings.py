"""The service's configuration: one object, read from the environment once at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sd3_service.spec import MAX_LORA_SCALE, LoraChoice

# The folder this file is in: the model artifact, read-only inside OCI Model Deployment.
ARTIFACT_DIR = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Every knob of the service (environment variable = field name, upper case); the README's table lists them."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    sd3_model: str = Field("auto", description="`auto`, `tiny`, a local diffusers folder or a Hugging Face repo id")
    sd3_device: str = Field(
        "auto", pattern=r"^(auto|cuda|(cpu|cuda:\d+)(,(cpu|cuda:\d+))*)$",
        description="`auto`: every CUDA GPU torch sees, else cpu; `cuda`: every CUDA GPU; or a list such as "
                    "`cuda:0,cuda:1` (`cpu,cpu` for tests). One pipeline per device, one shared queue")
    sd3_dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="`auto` is float16 with CUDA devices, float32 on cpu")
    hf_token: SecretStr | None = Field(None, description="only to download the gated model from the hub")
    hf_token_secret_ocid: str | None = Field(None, description="an OCI Vault secret holding HF_TOKEN, read at start "
                                                               "with the service's own credentials (OCI_AUTH)")
    sd3_tiny_gates: Path | None = Field(None, description="tests only, with the tiny model: a prompt starting "
                                        "`hold:<name>` waits after its first step until `<name>.open` exists here")
    # Speed and memory options (docs/benchmarks.md). Off by default until measured on a GPU.
    sd3_compile: bool = Field(False, description="torch.compile the transformer; each new image size compiles first")
    sd3_fuse_qkv: bool = Field(False, description="fuse the transformer's query, key and value projections")
    sd3_t5: bool = Field(True, description="load the T5-XXL text encoder; false saves its memory, follows prompts less")
    sd3_offload: bool = Field(False, description="keep each model on the CPU until it runs (GPUs under ~20 GB; slower)")

    bucket_name: str | None = Field(None, description="store images in this Object Storage bucket when set")
    namespace: str | None = Field(None, description="Object Storage namespace; looked up with the signer when unset")
    object_prefix: str = Field("sd3/", description="prefix of every object name")
    input_buckets: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*$",
        description="comma list of the buckets `oci://` input images may be read from (with the service's own "
                    "credentials, which need `read objects` there); BUCKET_NAME when unset")
    oci_auth: Literal["resource_principal", "instance_principal", "api_key", "security_token"] = Field(
        "resource_principal", description="how the service signs Object Storage calls")
    oci_profile: str = Field("DEFAULT", description="profile of the OCI config file, for `api_key`/`security_token`")
    oci_config_file: str = Field("~/.oci/config", description="OCI config file, for `api_key`/`security_token`")
    oci_region: str | None = Field(None, description="region of the bucket; the signer's region when unset")
    oci_object_storage_endpoint: str | None = Field(None, description="endpoint override (private endpoints, tests)")
    oci_federation_endpoint: str | None = Field(
        None, description="where `instance_principal` gets its session token (tests, a non-default auth endpoint); "
                          "the region's auth service, `https://auth.<region>.oraclecloud.com/v1/x509`, when unset")
    lora_dir: Path | None = Field(None, description="the catalog of LoRA adapters a request may name: "
                                  "`<name>.safetensors` files; the artifact's `loras/` folder when unset")
    lora_buckets: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*$",
        description="comma list of the buckets `oci://` LoRA adapters may be read from; INPUT_BUCKETS when unset")
    lora_max_bytes: int = Field(512 * 1024 * 1024, ge=1, description="the largest LoRA adapter file taken")
    lora_max_loaded: int = Field(8, ge=1, description="LoRA adapters kept loaded on each device; the least recently "
                                 "used beyond are unloaded")
    lora_cache_dir: Path = Field(Path("/var/tmp/sd3-medium/loras"), description="where adapters read from a bucket "
                                 "are kept, by content (outside the read-only artifact)")
    lora_cache_max_bytes: int = Field(4 * 1024**3, ge=1, description="the most LORA_CACHE_DIR holds; past it the "
                                      "least recently used adapters no device has loaded are removed")
    lora_fuse: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}:-?[0-9.]+(,[A-Za-z0-9][A-Za-z0-9._-]{0,127}:-?[0-9.]+)*$",
        description="comma list of `name:scale` adapters of the catalog fused into every device's weights at load "
                    "(a few-step adapter: the fast mode); per-request adapters still apply on top")
    image_dir: Path = Field(Path("./outputs"), description="where images go when BUCKET_NAME is unset; a relative "
                            "path that would fall inside the artifact (`sd3-medium/`) is taken beside it instead")
    spool_dir: Path = Field(Path("/var/tmp/sd3-medium/spool"),
                            description="images not stored yet wait here (outside the read-only artifact) for a retry")
    store_timeout_seconds: float = Field(20.0, ge=2, le=50, description="the longest one image's upload may take, "
                                         "retries included (OCI Model Deployment answers 500 after 60 s)")
    store_params: bool = Field(False, description="also store a JSON sidecar with every parameter, prompt included")
    return_url: bool = Field(False, description="give each stored image a read-only pre-authenticated URL")
    url_ttl_seconds: int = Field(3600, ge=60, description="how long a returned URL works")

    model_deploy_predict_endpoint: str = Field("/predict", description="route of the predict API (OCI MD remaps it)")
    model_deploy_health_endpoint: str = Field("/health", description="route of the health check (OCI MD remaps it)")
    served_model_names: str | None = Field(
        None, description="comma list of the names the OpenAI surface answers to (its `model` field), listed by "
                          "`GET /v1/models`; the served model's id when unset (`sd3-tiny` for the tiny model)")
    max_body_bytes: int = Field(10 * 1024 * 1024, description="OCI Model Deployment caps payloads at 10 MB")
    max_queue: int = Field(4, ge=0, description="requests waiting for a device beyond the one running on each; "
                                                "more get 429")
    idempotency_cache_size: int = Field(1024, ge=0, description="answers this process remembers by request_id "
                                        "(the fast path; the ledger in the store keeps every one)")
    lease_seconds: float = Field(30.0, ge=1, le=600, description="an owner renews its claim on a request while it "
                                 "works; a claim not renewed for this long may be taken over by another instance")
    sync_wait_seconds: float = Field(50.0, ge=0, le=300, description="how long a request that waits for its "
                                     "images waits before it answers 202 with its status (Model Deployment cuts at 60 s)")
    stream_keepalive_seconds: float = Field(15.0, gt=0, le=15, description="the longest a streamed answer stays "
                                                                            "silent: a `: keep-alive` comment then")
    webhook_secret: SecretStr | None = Field(None, description="`whsec_…`: signs webhooks (Standard Webhooks); "
                                                               "without it a request with `webhook` is refused")
    webhook_secret_ocid: str | None = Field(None, description="an OCI Vault secret holding WEBHOOK_SECRET, read at "
                                                              "start with the service's own credentials (OCI_AUTH)")
    webhook_hosts: str | None = Field(None, description="comma list of the hosts webhooks may go to (exact, or "
                                                        "`*.example.com`); any other host is refused")
    webhook_allow_http: bool = Field(False, description="also send webhooks over plain http (https only otherwise)")
    webhook_allow_private: bool = Field(False, description="also send webhooks to loopback, private, link-local "
                                                           "and multicast addresses (refused otherwise)")
    webhook_retry_seconds: float = Field(3600.0, ge=0, description="how long a webhook that is not accepted is "
                                                                   "retried, with growing delays")
    oci_secrets_endpoint: str | None = Field(None, description="OCI Vault secrets endpoint override (private "
                                                               "endpoints, tests)")
    max_jobs: int = Field(64, ge=1, description="accepted requests (queued or running) a server holds; more get 429")
    log_format: Literal["text", "json"] = Field("text", description="the service's log lines: text, or one JSON "
                                                "object per line (`json`), with a `request_finished` line per request")
    ledger_pause_seconds: float = Field(10.0, ge=0, le=600, description="after a failed claim in the ledger, "
                                        "requests are served without it this long (each claim may retry ~6 s)")

    @property
    def allowed_input_buckets(self) -> frozenset[str]:
        if self.input_buckets is not None:
            return frozenset(self.input_buckets.split(","))
        return frozenset({self.bucket_name} if self.bucket_name else ())

    @property
    def allowed_webhook_hosts(self) -> tuple[str, ...]:
        return tuple(host.strip().lower() for host in (self.webhook_hosts or "").split(",") if host.strip())

    @property
    def model_names(self) -> tuple[str, ...]:
        """`SERVED_MODEL_NAMES` as a tuple; empty when unset (the served model's id is used)."""
        return tuple(name.strip() for name in (self.served_model_names or "").split(",") if name.strip())

    @property
    def lora_catalog(self) -> Path:
        return self.lora_dir if self.lora_dir is not None else ARTIFACT_DIR / "loras"

    @property
    def fused_loras(self) -> tuple[LoraChoice, ...]:
        """LORA_FUSE as the adapters to fuse, in its order."""
        choices = []
        for item in (self.lora_fuse or "").split(",") if self.lora_fuse else ():
            name, scale = item.rsplit(":", 1)
            choices.append(LoraChoice(name, float(scale)))
        return tuple(choices)

    @property
    def allowed_lora_buckets(self) -> frozenset[str]:
        if self.lora_buckets is not None:
            return frozenset(self.lora_buckets.split(","))
        return self.allowed_input_buckets

    @field_validator("lora_fuse")
    @classmethod
    def _fuse_scales(cls, fuse: str | None) -> str | None:
        for item in (fuse or "").split(",") if fuse else ():
            name, scale = item.rsplit(":", 1)
            try:
                value = float(scale)
            except ValueError:
                raise ValueError(f"LORA_FUSE: '{item}' needs a number after the colon") from None
            if not -MAX_LORA_SCALE <= value <= MAX_LORA_SCALE:
                raise ValueError(f"LORA_FUSE: '{name}' at {scale}; scales are -{MAX_LORA_SCALE} to {MAX_LORA_SCALE}")
        return fuse

    @field_validator("model_deploy_predict_endpoint", "model_deploy_health_endpoint")
    @classmethod
    def _leading_slash(cls, route: str) -> str:
        return route if route.startswith("/") else "/" + route

    @field_validator("image_dir")
    @classmethod
    def _images_outside_artifact(cls, folder: Path) -> Path:
        # `cd sd3-medium && bentoml serve .` must not write into the artifact (read-only in Model Deployment,
        # and zipped by the provisioner): the default `./outputs` then means the one beside it.
        resolved = folder.expanduser().resolve()
        if not resolved.is_relative_to(ARTIFACT_DIR):
            return folder
        if folder.expanduser().is_absolute():
            raise ValueError(f"IMAGE_DIR must be outside the model artifact {ARTIFACT_DIR}")
        return ARTIFACT_DIR.parent / resolved.relative_to(ARTIFACT_DIR)

    @field_validator("spool_dir", "lora_cache_dir")
    @classmethod
    def _writable_outside_artifact(cls, folder: Path, info) -> Path:
        # The artifact is mounted read-only in OCI Model Deployment; nothing can be written there.
        if folder.expanduser().resolve().is_relative_to(ARTIFACT_DIR):
            raise ValueError(f"{info.field_name.upper()} must be outside the model artifact {ARTIFACT_DIR}")
        return folder
