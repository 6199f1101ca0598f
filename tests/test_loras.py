"""LoRA adapters without a server: what fits this model, the catalog, and the adapters a device keeps loaded."""

from __future__ import annotations

import pytest

from sd3_service.errors import ServiceError
from sd3_service.lora_library import LoraLibrary, lora_misfit, safetensors_shapes
from sd3_service.pipelines.generation import generate_images, generation_arguments
from sd3_service.pipelines.loras import DeviceLoras, lora_modules
from sd3_service.pipelines.tiny import build_tiny_pipeline
from sd3_service.spec import ImageRequest, LoraChoice
from sd3_service.storage.encoding import encode_image
from testbed.loras import make_adapter, sdxl_like, wider_model, write_weights

REQUEST = ImageRequest(prompt="a harbour", width=256, height=256, num_inference_steps=2)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    folder = tmp_path_factory.mktemp("catalog")
    for seed, name in enumerate(("ink", "wave", "dust"), start=1):
        make_adapter(folder / f"{name}.safetensors", seed=seed)
    return folder


@pytest.fixture(scope="module")
def modules():
    return lora_modules(build_tiny_pipeline())


def test_an_adapter_made_for_this_model_fits_and_others_are_told_why_not(made, modules, tmp_path):
    assert lora_misfit(safetensors_shapes(made / "ink.safetensors"), modules) is None
    assert "SDXL or Flux" in lora_misfit(safetensors_shapes(sdxl_like(tmp_path / "sdxl.safetensors")), modules)
    assert "features" in lora_misfit(safetensors_shapes(wider_model(tmp_path / "wide.safetensors")), modules)
    half = write_weights(tmp_path / "half.safetensors", {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight":
                                                         (4, 64)})
    assert "only part of a LoRA pair" in lora_misfit(safetensors_shapes(half), modules)
    plain = write_weights(tmp_path / "plain.safetensors", {"transformer.proj_out.weight": (64, 64)})
    assert "not a LoRA weight" in lora_misfit(safetensors_shapes(plain), modules)
    (tmp_path / "text.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="not JSON"):
        safetensors_shapes(tmp_path / "text.safetensors")


def test_the_catalog_names_adapters_by_stem_and_identifies_them_by_content(made, modules, tmp_path):
    library = LoraLibrary(made, tmp_path / "cache", modules=lambda: modules)
    [ink] = library.resolve((LoraChoice("ink", 0.5),))
    assert (ink.name, ink.scale, ink.path) == ("ink", 0.5, str(made / "ink.safetensors"))
    assert [adapter["name"] for adapter in library.describe()] == ["dust", "ink", "wave"]
    for name in ("nowhere", "../ink", "ink.safetensors"):
        with pytest.raises(ServiceError) as missing:
            library.resolve((LoraChoice("ink"), LoraChoice(name)))
        assert (missing.value.status, missing.value.field, missing.value.code) == (404, "loras.1", "lora_not_found")
    with pytest.raises(ServiceError) as bucket:
        library.resolve((LoraChoice("oci://styles@ns/a.safetensors"),))
    assert (bucket.value.status, bucket.value.field) == (400, "loras.0") and "allowed: none" in bucket.value.message


def sha(pipe) -> str:
    return encode_image(generate_images(pipe, seed=5, **generation_arguments(REQUEST))[0], "png").sha256


def test_a_device_keeps_its_most_recent_adapters_and_none_is_exactly_the_plain_model(made, modules, tmp_path):
    library = LoraLibrary(made, tmp_path / "cache", modules=lambda: modules)
    ink, wave, dust = library.resolve((LoraChoice("ink"), LoraChoice("wave"), LoraChoice("dust")))
    pipe = build_tiny_pipeline()
    plain = sha(pipe)
    device = DeviceLoras(pipe, "cpu (device 0)", max_loaded=2)
    device.apply([ink])
    inked = sha(pipe)
    device.apply([wave])
    assert device.describe() == ["ink", "wave"]
    device.apply([dust])  # a third: the least recently used (ink) is unloaded
    assert device.describe() == ["wave", "dust"] and "sha256_" + ink.sha256[:16] not in pipe.get_list_adapters().get(
        "transformer", [])
    device.apply([ink])  # loaded again, the same bytes as the first time
    assert sha(pipe) == inked and device.describe() == ["dust", "ink"]
    device.apply([])
    assert sha(pipe) == plain


def test_two_devices_loading_at_once_get_the_same_weights_as_one_alone(made, modules, tmp_path):
    # Two worker threads load adapters together (two devices taking their first adapter requests at once).
    import threading

    library = LoraLibrary(made, tmp_path / "cache", modules=lambda: modules)
    adapters = library.resolve((LoraChoice("ink"), LoraChoice("wave", 0.5)))
    alone = build_tiny_pipeline()
    DeviceLoras(alone, "alone").apply(adapters)
    pipes = [build_tiny_pipeline() for _ in range(2)]
    together = threading.Barrier(2)

    def load(pipe):
        together.wait(30)
        DeviceLoras(pipe, "together").apply(adapters)

    threads = [threading.Thread(target=load, args=(pipe,)) for pipe in pipes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [sha(pipe) for pipe in pipes] == [sha(alone)] * 2


def test_a_device_sets_adapters_only_when_a_request_asks_for_others_than_the_last(made, modules, tmp_path):
    from dataclasses import replace

    library = LoraLibrary(made, tmp_path / "cache", modules=lambda: modules)
    ink, wave = library.resolve((LoraChoice("ink"), LoraChoice("wave")))
    pipe = build_tiny_pipeline()
    sets = []
    set_adapters = pipe.set_adapters
    pipe.set_adapters = lambda *args, **kwargs: (sets.append(args), set_adapters(*args, **kwargs))  # counts calls
    device = DeviceLoras(pipe, "cpu (device 0)")
    device.apply([ink])
    inked = sha(pipe)
    device.apply([ink])  # the same adapters at the same scales: nothing to set
    assert len(sets) == 1 and sha(pipe) == inked
    device.apply([replace(ink, scale=0.5)])
    halved = sha(pipe)
    assert len(sets) == 2 and halved != inked
    device.apply([wave])  # a load, then back: each is set
    device.apply([ink])
    assert len(sets) == 4 and sha(pipe) == inked
    device.apply([])
    device.apply([ink])  # after a request without adapters
    assert len(sets) == 5 and sha(pipe) == inked
