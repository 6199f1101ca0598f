"""Casting a model to its serving dtype the way loading does."""

from __future__ import annotations

import torch


def cast_as_loading_would(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast to `dtype` as `from_pretrained(dtype=...)` does: modules a model keeps in float32 stay there.

    transformers keeps T5's feed-forward output (`wo`) in float32, since it overflows in float16.
    """
    if all(parameter.dtype == dtype for parameter in module.parameters()):
        return
    module.to(dtype)
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    for name, child in module.named_modules():
        if any(part in keep for part in name.split(".")):
            child.to(torch.float32)
