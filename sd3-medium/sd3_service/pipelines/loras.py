"""The LoRA adapters on one device: loaded once, kept up to `LORA_MAX_LOADED`, set per request; and those that
`LORA_FUSE` fuses into the weights once, at load.

Each adapter is loaded into the device's pipeline under a name made from its content's sha256 (so the same
file named two ways is one adapter), on the device's own worker thread, and unloaded when it is the least
recently used beyond the limit. A request's adapters are set active at its scales; a request without any
(or only at scale 0) runs with LoRA disabled, which is exactly the model without adapters.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from sd3_service.errors import invalid_field
from sd3_service.lora_files import COMPONENTS
from sd3_service.pipelines.generation import is_device_failure
from sd3_service.spec import ResolvedLora

log = logging.getLogger("sd3.loras")

# Loading an adapter is not safe on two threads at once: with `low_cpu_mem_usage`, diffusers and peft build its
# layers under accelerate's `init_empty_weights`, which patches `torch.nn.Module` for the whole process (two devices
# loading together were seen to get wrong weights, and to leave the patch behind). So one load at a time, unpatched.
LOADING = threading.Lock()


def adapter_name(sha256: str) -> str:
    return f"sha256_{sha256[:16]}"


def lora_modules(pipe) -> dict[str, tuple[int, int]]:
    """Every linear layer an adapter may adapt, as diffusers names them: `{"transformer.<path>": (in, out)}`."""
    import torch

    modules = {}
    for component in COMPONENTS:
        module = getattr(pipe, component, None)
        if module is None:
            continue
        for name, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear):
                modules[f"{component}.{name}"] = (layer.in_features, layer.out_features)
    return modules


class DeviceLoras:
    """The adapters loaded into one device's pipeline (and so into its image pipelines, which share its modules).

    Args:
        pipe: the device's text-to-image pipeline.
        device: the device's name in log lines.
        max_loaded: adapters kept loaded; the least recently used beyond are unloaded.
    """

    def __init__(self, pipe, device: str, max_loaded: int = 8):
        self.pipe = pipe
        self.device = device
        self.max_loaded = max_loaded
        self.loaded: OrderedDict[str, str] = OrderedDict()  # adapter name -> the name a request gave it
        self._enabled = False
        self._active: tuple | None = None  # the (names, scales) set last, while still so

    def apply(self, adapters: list[ResolvedLora], request_id: str = "") -> None:
        """Make exactly `adapters` active at their scales; none (or scale 0 only): LoRA disabled. Call on the device's
        worker thread, before its generation."""
        active = [adapter for adapter in adapters if adapter.scale != 0]
        if not active:
            if self._enabled:
                self.pipe.disable_lora()
                self._enabled, self._active = False, None
            return
        names = []
        for adapter in active:
            name = adapter_name(adapter.sha256)
            if name not in self.loaded:
                self._load(adapter, name, request_id, field=f"loras.{adapters.index(adapter)}")
            self.loaded.move_to_end(name)
            names.append(name)
        self._unload_beyond_limit(keep=set(names))
        wanted = (tuple(names), tuple(adapter.scale for adapter in active))
        if self._enabled and wanted == self._active:  # as the last request: setting them again walks every layer
            return
        self.pipe.enable_lora()
        self.pipe.set_adapters(list(wanted[0]), adapter_weights=list(wanted[1]))
        self._enabled, self._active = True, wanted

    def describe(self) -> list[str]:
        """The sha256 of each adapter loaded, most recently used last (never the name a caller gave it)."""
        return list(self.loaded.values())

    def _load(self, adapter: ResolvedLora, name: str, request_id: str, field: str) -> None:
        self._active = None  # loading makes the new adapter the active one
        try:
            with LOADING:
                self.pipe.load_lora_weights(adapter.path, adapter_name=name, low_cpu_mem_usage=False)
        except BaseException as exc:
            self._forget(name)  # nothing half-loaded stays behind for the next request
            if isinstance(exc, Exception) and not is_device_failure(exc):  # the file's fault: this request's 4xx
                log.warning("[%s] diffusers could not load LoRA %s (sha256 %s): %s: %s", request_id, adapter.name,
                            adapter.sha256[:16], type(exc).__name__, exc)
                raise invalid_field(field, f"diffusers could not load this adapter: {type(exc).__name__}: "
                                           f"{_first_line(exc)}") from exc
            raise
        self.loaded[name] = adapter.sha256
        log.info("[%s] Loaded LoRA %s (sha256 %s) on %s", request_id, adapter.name, adapter.sha256[:16], self.device)

    def _unload_beyond_limit(self, keep: set[str]) -> None:
        surplus = max(0, len(self.loaded) - self.max_loaded)
        for name in [name for name in self.loaded if name not in keep][:surplus]:  # least recently used first
            self._forget(name)
            log.info("Unloaded LoRA sha256 %s from %s (least recently used beyond LORA_MAX_LOADED=%d)",
                     self.loaded.pop(name)[:16], self.device, self.max_loaded)

    def _forget(self, name: str) -> None:
        self._active = None
        try:
            with LOADING:
                self.pipe.delete_adapters(name)
        except (ValueError, KeyError):
            pass  # it never got as far as being registered


def fuse_adapters(pipe, adapters: list[ResolvedLora]) -> None:
    """Fuse each adapter into the pipeline's weights at its scale (`LORA_FUSE`), leaving no adapter layer behind:
    generations then cost what they cost without adapters, and per-request adapters still apply on top."""
    for adapter in adapters:
        name = "fused_" + adapter_name(adapter.sha256)
        with LOADING:
            pipe.load_lora_weights(adapter.path, adapter_name=name, low_cpu_mem_usage=False)
            pipe.fuse_lora(components=list(COMPONENTS), lora_scale=adapter.scale, adapter_names=[name])
            pipe.unload_lora_weights()  # the fused weights stay; the adapter's own layers go
        log.info("Fused LoRA %s (sha256 %s) at scale %s into the weights", adapter.name, adapter.sha256[:16],
                 adapter.scale)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]
