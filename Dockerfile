# syntax=docker/dockerfile:1.7
# SD3 Medium text-to-image service for OCI Data Science Model Deployment (BYOC); see docs/container.md.
#   docker build -t sd3-medium:0.1.0 .
#   docker run --gpus all -p 8080:8080 sd3-medium:0.1.0
# Inside MD the model artifact (sd3-medium/) is mounted read-only over WORKDIR; for local runs the copy
# made below is served instead. Layers go from slowest-changing to fastest: a code change rebuilds only
# the last COPY.

# Tag and digest of the linux/amd64+arm64 index (taken from public Dockerfiles; not resolvable here).
ARG BASE_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d
FROM ${BASE_IMAGE}

# The CUDA build of torch: same release as requirements.lock, the variant matching the host's driver
# (cu128: driver >= 570; cu130: driver >= 580).
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu128
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_CUDA}
ARG PYPI_INDEX_URL=https://pypi.org/simple

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HOME=/home/sd3 \
    HF_HOME=/var/lib/sd3/huggingface \
    TORCH_HOME=/var/lib/sd3/torch \
    TORCHINDUCTOR_CACHE_DIR=/var/lib/sd3/torch/inductor \
    TRITON_CACHE_DIR=/var/lib/sd3/triton \
    XDG_CACHE_HOME=/var/lib/sd3/cache \
    BENTOML_HOME=/var/lib/sd3/bentoml \
    IMAGE_DIR=/var/lib/sd3/images \
    SPOOL_DIR=/var/lib/sd3/spool \
    LORA_CACHE_DIR=/var/lib/sd3/loras \
    PORT=8080

# curl: MD's health check runs it inside the container. Debian versions are not pinned: the pinned
# base fixes the release, and its security archive keeps only the newest build of each package.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A fixed non-root user; everything it writes lives under /var/lib/sd3, never in the artifact.
RUN groupadd --gid 1000 sd3 \
    && useradd --uid 1000 --gid sd3 --home-dir /home/sd3 --create-home --shell /usr/sbin/nologin sd3 \
    && mkdir -p /var/lib/sd3/huggingface /var/lib/sd3/torch /var/lib/sd3/torch/inductor /var/lib/sd3/triton /var/lib/sd3/cache \
                /var/lib/sd3/bentoml /var/lib/sd3/images /var/lib/sd3/spool /var/lib/sd3/loras \
                /opt/ds/model/deployed_model \
    && chown -R sd3:sd3 /var/lib/sd3

COPY requirements.lock /opt/sd3/requirements.lock

# torch alone first (the biggest layer, ~4.5 GB unpacked with its CUDA libraries); it changes only with
# TORCH_VERSION, TORCH_CUDA or the lock.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" --extra-index-url "${PYPI_INDEX_URL}" \
        -c /opt/sd3/requirements.lock "torch==${TORCH_VERSION}"

# The runtime dependencies of pyproject.toml, same pins (tests/test_container.py checks they agree);
# a layer of their own so that a change here does not download torch again.
# hadolint ignore=DL3059
RUN pip install --no-cache-dir --index-url "${PYPI_INDEX_URL}" -c /opt/sd3/requirements.lock \
        accelerate==1.15.0 \
        bentoml==1.4.39 \
        diffusers==0.42.1 \
        fastapi==0.165.0 \
        fpng==0.1.0 \
        numpy==2.4.6 \
        oci==2.189.0 \
        peft==0.21.2 \
        pillow==13.0.0 \
        protobuf==7.36.2 \
        pydantic==2.14.4 \
        pydantic-settings==2.16.3 \
        python-json-logger==4.2.0 \
        sentencepiece==0.2.3 \
        standardwebhooks==1.3.0 \
        transformers==5.23.0

USER 1000:1000

# Optional: bake weights into the image (second way of docs/container.md), e.g.
#   --build-arg SD3_BAKE_MODEL=stabilityai/stable-diffusion-3-medium-diffusers --build-arg SD3_BAKE_T5=false \
#   --secret id=hf_token,env=HF_TOKEN
# They land in the Hugging Face cache (exactly the files diffusers loads), and the image then loads them
# offline. The full fp16 pipeline (~15.5 GB) makes the image larger than MD's 16 GB; without the T5
# encoder (SD3_BAKE_T5=false, served with SD3_T5=false) it adds ~6 GB. The token is a build secret: it is
# never stored in a layer, an ENV or a build arg.
ARG SD3_BAKE_MODEL=
ARG SD3_BAKE_T5=true
RUN --mount=type=secret,id=hf_token,uid=1000 \
    if [ -n "${SD3_BAKE_MODEL}" ]; then \
        HF_TOKEN="$(cat /run/secrets/hf_token 2>/dev/null || true)" python -c "$(printf '%s\n' \
            'import sys' \
            'from diffusers import DiffusionPipeline' \
            'no_t5 = {} if sys.argv[2] == "true" else {"text_encoder_3": None, "tokenizer_3": None}' \
            'print(DiffusionPipeline.download(sys.argv[1], **no_t5))')" "${SD3_BAKE_MODEL}" "${SD3_BAKE_T5}"; \
    fi
ENV SD3_MODEL=${SD3_BAKE_MODEL:-auto} \
    SD3_T5=${SD3_BAKE_T5} \
    HF_HUB_OFFLINE=${SD3_BAKE_MODEL:+1}

# The service code, for local runs; MD mounts the artifact here, read-only, over this copy.
WORKDIR /opt/ds/model/deployed_model
COPY sd3-medium/ ./

EXPOSE 8080
# Healthy once the model is loaded and warmed up (/health answers 503 before): MD allows 10 minutes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["sh", "-c", "curl -fsS --max-time 4 http://127.0.0.1:${PORT:-8080}${MODEL_DEPLOY_HEALTH_ENDPOINT:-/health} > /dev/null || exit 1"]
CMD ["sh", "-c", "exec bentoml serve . --host 0.0.0.0 --port ${PORT:-8080}"]
