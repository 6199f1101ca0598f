"""What a LoRA file is, as the pinned diffusers decides it: read with `safetensors`, renamed by diffusers' own
SD3 loader, then fitted to this model's layers.

diffusers' `StableDiffusion3Pipeline.load_lora_weights` takes a file in several forms: peft's names
(`transformer.<module>.lora_A.weight` / `lora_B.weight`, what `save_lora_weights` writes today), diffusers'
older names (`<module>.lora.down.weight` / `lora.up.weight`, and `lora_linear_layer.down/up` for the text
encoders), weights for `transformer`, `text_encoder` and `text_encoder_2`, and a `lora_adapter_metadata`
entry (peft's config: rank and alpha) in the header. It drops DoRA's `dora_scale` weights and anything not
under one of those three prefixes. Here the same functions rename the names (on shapes only: no weight is
read), so what is accepted is what diffusers loads; then each layer is checked against the model: that it
has the layer, with those in and out features.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("sd3.loras")

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2")  # the pipeline's parts diffusers' SD3 loader adapts
LORA_PARTS = ("lora_A.weight", "lora_B.weight", "lora_B.bias")  # peft's names, once diffusers has renamed them


class NotAnAdapter(ValueError):
    """Why a file is not a LoRA adapter this model can load, in words for the caller."""


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, read from the file's header by the `safetensors` package (no weight is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error, OSError or ValueError for a bad file
        raise NotAnAdapter(f"not a safetensors file ({exc})") from None


def diffusers_names(shapes: dict[str, tuple[int, ...]], modules: dict[str, tuple[int, int]]) -> dict[str, tuple]:
    """The weights as diffusers' SD3 loader names them before loading (`<component>.<module>.lora_A.weight`),
    by diffusers' own renaming functions; `NotAnAdapter` for what that loader refuses or would load nothing of.

    `modules`: the model's layers (`lora_modules`), which say whether a text encoder's names keep `text_model.`.
    """
    import torch
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    if not shapes:
        raise NotAnAdapter("the file holds no weights")
    # Empty tensors of the right shapes ("meta": no memory) stand in for the weights: the renaming reads names only.
    state = StableDiffusion3Pipeline.lora_state_dict({key: torch.empty(shape, device="meta")
                                                      for key, shape in shapes.items()})
    not_lora = next((key for key in state if "lora" not in key), None)
    if not_lora is not None:  # load_lora_weights' own check
        raise NotAnAdapter(f"not a LoRA adapter: '{not_lora}' is not a LoRA weight (diffusers loads only weights "
                           "whose names say `lora`)")
    renamed: dict[str, tuple] = {}
    for component in COMPONENTS:
        part = {key.removeprefix(f"{component}."): value for key, value in state.items()
                if key.startswith(f"{component}.")}
        if not part:
            continue
        if component == "transformer":  # as `load_lora_adapter`: its first name says which form the file is in
            if "lora_A" not in next(iter(part)):
                part = convert_unet_state_dict_to_peft(part)
        else:  # as `_load_lora_into_text_encoder`
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
            if not any(name.startswith(f"{component}.text_model.") for name in modules):
                part = {key.removeprefix("text_model."): value for key, value in part.items()}
        renamed.update({f"{component}.{key}": tuple(value.shape) for key, value in part.items()})
    dropped = [key for key in state if not key.startswith(tuple(f"{component}." for component in COMPONENTS))]
    if not renamed:
        raise NotAnAdapter(f"not a LoRA adapter of this model: unknown key names such as '{dropped[0]}' (diffusers "
                           f"loads only {', '.join(f'`{c}.`' for c in COMPONENTS)} weights into Stable Diffusion 3; "
                           "an adapter of another model, such as SDXL or Flux?)")
    if dropped:
        log.info("diffusers drops %d weight(s) of this adapter that no SD3 component takes, such as '%s'",
                 len(dropped), dropped[0])
    return renamed


def misfit(renamed: dict[str, tuple], modules: dict[str, tuple[int, int]]) -> str | None:
    """Why weights in diffusers' names do not fit the model's layers (`{"transformer.x.to_q": (in, out)}`), or None
    when every one does: a layer it has, at its in and out features, a whole LoRA pair of one rank."""
    layers: dict[str, dict[str, tuple]] = {}
    for key, shape in renamed.items():
        part = next((part for part in LORA_PARTS if key.endswith("." + part)), None)
        if part is None:
            return f"unknown key names: '{key}' is not a LoRA weight this model's loader takes (`lora_A`/`lora_B`)"
        layers.setdefault(key[: -len(part) - 1], {})[part] = shape
    for layer, parts in sorted(layers.items()):
        if layer not in modules:
            return (f"unknown key names: it adapts '{layer}', which Stable Diffusion 3 Medium does not have "
                    "(an adapter of another model, such as SD3.5 Large or Flux?)")
        if not {"lora_A.weight", "lora_B.weight"} <= set(parts):
            return f"'{layer}' has only part of a LoRA pair (lora_A and lora_B, or lora.down and lora.up)"
        in_features, out_features = modules[layer]
        down, up = parts["lora_A.weight"], parts["lora_B.weight"]
        if len(down) != 2 or len(up) != 2 or down[0] != up[1]:
            return f"'{layer}' is not a LoRA pair: its weights are {list(down)} and {list(up)}"
        if down[1] != in_features or up[0] != out_features:
            return (f"wrong model width: '{layer}' is {in_features} -> {out_features} features in this model, the "
                    f"adapter's weights are {list(down)} and {list(up)} (an adapter of a larger model?)")
    return None


def adapter_misfit(path: Path, modules: dict[str, tuple[int, int]]) -> str | None:
    """Why the file is not a LoRA adapter that fits this model, or None when it is one."""
    try:
        return misfit(diffusers_names(read_shapes(path), modules), modules)
    except NotAnAdapter as exc:
        return str(exc)
