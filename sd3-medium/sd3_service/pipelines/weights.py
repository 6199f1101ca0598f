"""Whether the weights are at hand at start-up, or must come from the Hugging Face hub within MD's limit.

OCI Model Deployment fails a deployment that is not healthy within 10 minutes of the container's start.
The three ways to bring weights (docs/container.md) differ in how much of that they use: a folder in the
artifact or baked into the image costs only the load; a hub download costs its size over the link first.
"""

from __future__ import annotations

import logging

from huggingface_hub import try_to_load_from_cache

MD_START_LIMIT_S = 600
# stabilityai/stable-diffusion-3-medium-diffusers as diffusers downloads it, fp16, from the parameter
# counts: MMDiT 2.0B (4.2 GB), T5-XXL encoder 4.8B (9.5 GB), two CLIP encoders 0.8B (1.6 GB), VAE (0.2 GB).
KNOWN_DOWNLOAD_BYTES = {"stabilityai/stable-diffusion-3-medium-diffusers": 15_500_000_000}
# The link speeds the warning quotes: a fast one, and what a busy hub or a small shape often gives.
FAST_LINK_BYTES_PER_S = 100_000_000
SLOW_LINK_BYTES_PER_S = 20_000_000


def is_cached(repo_id: str, cache_dir: str | None = None) -> bool:
    """True when the repo's pipeline index is in the local Hugging Face cache (downloaded or baked in)."""
    return isinstance(try_to_load_from_cache(repo_id, "model_index.json", cache_dir=cache_dir), str)


def hub_download_warning(repo_id: str, cache_dir: str | None = None) -> str | None:
    """The start-up warning for loading `repo_id` from the hub, or None when it is already cached."""
    if is_cached(repo_id, cache_dir):
        return None
    size = KNOWN_DOWNLOAD_BYTES.get(repo_id)
    if size is None:
        cost = "its size is not known here"
    else:
        fast, slow = size / FAST_LINK_BYTES_PER_S, size / SLOW_LINK_BYTES_PER_S
        cost = (f"about {size / 1e9:.1f} GB: {fast / 60:.0f} min at {FAST_LINK_BYTES_PER_S / 1e6:.0f} MB/s, "
                f"{slow / 60:.0f} min at {SLOW_LINK_BYTES_PER_S / 1e6:.0f} MB/s, before loading starts")
    return (f"Downloading {repo_id} from the Hugging Face hub at start-up ({cost}). OCI Model Deployment "
            f"fails a container that is not healthy within {MD_START_LIMIT_S // 60} minutes: put the weights "
            f"in the model artifact (sd3-medium/model/) or bake them into the image (docs/container.md).")


def warn_if_hub_download(repo_id: str, log: logging.Logger, cache_dir: str | None = None) -> bool:
    """Log `hub_download_warning` when there is one; True when it was logged."""
    warning = hub_download_warning(repo_id, cache_dir)
    if warning:
        log.warning(warning)
    return warning is not None
