"""LoRA adapters without a server: every form diffusers loads, what fits this model, the catalog, the bounded cache,
the adapters a device keeps loaded, and adapters fused into the weights."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from sd3_service.errors import ServiceError
from sd3_service.lora_files import adapter_misfit
from sd3_service.lora_library import AdapterCache, LoraLibrary
from sd3_service.pipelines.generation import generate_images, generation_arguments
from sd3_service.pipelines.loras import DeviceLoras, fuse_adapters, lora_modules
from sd3_service.pipelines.tiny import build_tiny_pipeline
from sd3_service.spec import ImageRequest, LoraChoice
from sd3_service.storage.encoding import encode_image
from testbed.loras import make_adapter, scaled_copy, sdxl_like, wider_model, with_bad_config, write_weights

REQUEST = ImageRequest(prompt="a harbour", width=256, height=256, num_inference_steps=2)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    folder = tmp_path_factory.mktemp("catalog")
    for seed, name in enumerate(("ink", "wave", "dust"), start=1):
        make_adapter(folder / f"{name}.safetensors", seed=seed)
    return folder


@pytest.fixture(scope="module")
def forms(tmp_path_factory) -> dict[str, Path]:
    """The same weights (seed 1) in every form diffusers' SD3 loader takes, as diffusers and peft write them."""
    folder = tmp_path_factory.mktemp("forms")
    made = {
        "peft": make_adapter(folder / "peft.safetensors", seed=1),
        "diffusers-old": make_adapter(folder / "old.safetensors", seed=1, form="diffusers-old"),
        "text encoders, peft": make_adapter(folder / "te.safetensors", seed=1, text_encoders=True),
        "text encoders, diffusers-old": make_adapter(folder / "te-old.safetensors", seed=1, text_encoders=True,
                                                     form="diffusers-old"),
        "alpha 2x rank in the header": make_adapter(folder / "alpha.safetensors", seed=1, alpha=8),
    }
    made["lora_B times 2"] = scaled_copy(made["peft"], folder / "doubled.safetensors", 2.0)
    return made


@pytest.fixture(scope="module")
def modules():
    return lora_modules(build_tiny_pipeline())


def pixels(pipe) -> np.ndarray:
    return np.asarray(generate_images(pipe, seed=5, **generation_arguments(REQUEST))[0]).astype(int)


def drawn_with(path: Path, scale: float = 1.0) -> np.ndarray:
    library = LoraLibrary(path.parent, modules=lambda: lora_modules(build_tiny_pipeline()))
    pipe = build_tiny_pipeline()
    DeviceLoras(pipe, "cpu").apply(library.resolve((LoraChoice(path.stem, scale),)))
    return pixels(pipe)


def test_every_form_diffusers_loads_fits_and_the_same_weights_draw_the_same_image(forms, modules):
    for form, path in forms.items():
        assert adapter_misfit(path, modules) is None, form
    drawn = {form: drawn_with(path) for form, path in forms.items()}
    # Measured: 0, the same pixels, for each pair (the renaming is exact; alpha 2r is lora_B times 2 at rank r).
    for one, other in (("peft", "diffusers-old"), ("text encoders, peft", "text encoders, diffusers-old"),
                       ("alpha 2x rank in the header", "lora_B times 2")):
        assert np.abs(drawn[one] - drawn[other]).max() == 0, (one, other)
    plain = pixels(build_tiny_pipeline())
    # And each adapts something: the transformer, the text encoders on top, a larger alpha.
    assert len({drawn[form].tobytes() for form in ("peft", "text encoders, peft", "lora_B times 2")} |
               {plain.tobytes()}) == 4


def test_what_does_not_fit_is_told_apart_in_words_that_say_why(made, modules, tmp_path):
    assert "SDXL or Flux" in adapter_misfit(sdxl_like(tmp_path / "sdxl.safetensors"), modules)
    assert "unknown key names such as 'unet." in adapter_misfit(tmp_path / "sdxl.safetensors", modules)
    assert "wrong model width" in adapter_misfit(wider_model(tmp_path / "wide.safetensors"), modules)
    half = write_weights(tmp_path / "half.safetensors", {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight":
                                                         (4, 64)})
    assert "only part of a LoRA pair" in adapter_misfit(half, modules)
    plain = write_weights(tmp_path / "plain.safetensors", {"transformer.proj_out.weight": (64, 64)})
    assert "is not a LoRA weight" in adapter_misfit(plain, modules)
    elsewhere = write_weights(tmp_path / "other.safetensors", {
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": (4, 16),
        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": (16, 4)})
    assert "unknown key names: it adapts 'transformer.single_transformer_blocks.0.attn.to_q'" in \
        adapter_misfit(elsewhere, modules)
    (tmp_path / "text.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert adapter_misfit(tmp_path / "text.safetensors", modules).startswith("not a safetensors file")
    # What diffusers drops beside weights it loads (DoRA's scales, another model's keys) is dropped here too.
    extra = write_weights(tmp_path / "extra.safetensors", {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (4, 16),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": (16, 4),
        "transformer.transformer_blocks.0.attn.to_q.dora_scale": (1, 16),
        "unet.mid_block.attentions.0.proj_in.lora_A.weight": (4, 320)})
    assert adapter_misfit(extra, modules) is None


def test_the_catalog_names_adapters_by_stem_and_identifies_them_by_content(made, modules, tmp_path):
    library = LoraLibrary(made, modules=lambda: modules)
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
    library = LoraLibrary(made, modules=lambda: modules)
    ink, wave, dust = library.resolve((LoraChoice("ink"), LoraChoice("wave"), LoraChoice("dust")))
    pipe = build_tiny_pipeline()
    plain = sha(pipe)
    device = DeviceLoras(pipe, "cpu (device 0)", max_loaded=2)
    device.apply([ink])
    inked = sha(pipe)
    device.apply([wave])
    assert device.describe() == [ink.sha256, wave.sha256]  # by content: never the name (an oci:// URI) a caller gave
    device.apply([dust])  # a third: the least recently used (ink) is unloaded
    assert device.describe() == [wave.sha256, dust.sha256] and "sha256_" + ink.sha256[:16] not in \
        pipe.get_list_adapters().get("transformer", [])
    device.apply([ink])  # loaded again, the same bytes as the first time
    assert sha(pipe) == inked and device.describe() == [dust.sha256, ink.sha256]
    device.apply([])
    assert sha(pipe) == plain


def test_two_devices_loading_at_once_get_the_same_weights_as_one_alone(made, modules, tmp_path):
    # Two worker threads load adapters together (two devices taking their first adapter requests at once).
    import threading

    library = LoraLibrary(made, modules=lambda: modules)
    adapters = library.resolve((LoraChoice("ink"), LoraChoice("wave", 0.5)))
    alone = build_tiny_pipeline()
    DeviceLoras(alone, "alone").apply(adapters)
    pipes = [build_tiny_pipeline() for _ in range(2)]
    together, inside = threading.Barrier(2), threading.Barrier(2)
    overlapped = []

    def overlapping(load):
        def wrapped(*args, **kwargs):
            try:  # both threads inside a load at once, unless the load lock keeps the second one out
                inside.wait(2)
                overlapped.append(True)
            except threading.BrokenBarrierError:
                pass
            return load(*args, **kwargs)
        return wrapped

    for pipe in pipes:
        pipe.load_lora_weights = overlapping(pipe.load_lora_weights)

    def load(pipe):
        together.wait(30)
        DeviceLoras(pipe, "together").apply(adapters)

    threads = [threading.Thread(target=load, args=(pipe,)) for pipe in pipes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [sha(pipe) for pipe in pipes] == [sha(alone)] * 2 and not overlapped


def test_a_device_sets_adapters_only_when_a_request_asks_for_others_than_the_last(made, modules, tmp_path):
    from dataclasses import replace

    library = LoraLibrary(made, modules=lambda: modules)
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


def test_an_adapter_diffusers_fails_to_load_is_the_requests_400_and_the_device_serves_the_next(made, modules, tmp_path):
    # Its header and shapes fit; peft cannot build the config its header carries, which only a load finds out.
    broken = with_bad_config(made / "ink.safetensors", tmp_path / "broken.safetensors")
    library = LoraLibrary(tmp_path, modules=lambda: modules)
    [adapter] = library.resolve((LoraChoice("broken"),))
    pipe = build_tiny_pipeline()
    plain = sha(pipe)
    device = DeviceLoras(pipe, "cpu (device 0)")
    with pytest.raises(ServiceError) as refused:
        device.apply([adapter])
    assert (refused.value.status, refused.value.field) == (400, "loras.0")
    assert "diffusers could not load this adapter" in refused.value.message and str(broken) not in \
        refused.value.message
    assert pipe.get_list_adapters() == {} and device.describe() == []  # nothing half-loaded stays
    assert sha(pipe) == plain
    [ink] = LoraLibrary(made, modules=lambda: modules).resolve((LoraChoice("ink"),))
    device.apply([ink])
    assert sha(pipe) != plain


def cached(cache: AdapterCache) -> set[str]:
    return {path.stem for path in cache.folder.glob("*.safetensors")}


def test_the_cache_keeps_its_bound_by_removing_the_least_recently_used_files_no_device_holds(tmp_path):
    in_use: set[str] = set()
    cache = AdapterCache(tmp_path / "cache", max_bytes=3000, in_use=lambda: in_use)
    for index, name in enumerate(("a", "b", "c")):
        cache.keep(name * 64, b"x" * 1000)
        os.utime(cache.path(name * 64), (time.time() - 100 + index, time.time() - 100 + index))  # a, then b, then c
    assert cached(cache) == {"a" * 64, "b" * 64, "c" * 64}  # 3000 bytes: at the bound
    assert cache.use("a" * 64) is not None  # a used again: b is now the least recently used
    in_use.add("b" * 64)  # ... but a device has it loaded
    cache.keep("d" * 64, b"x" * 1000)
    assert cached(cache) == {"a" * 64, "b" * 64, "d" * 64}  # c went, the oldest one not in use
    in_use.clear()
    cache.keep("e" * 64, b"x" * 2000)
    assert cached(cache) == {"d" * 64, "e" * 64}
    assert cache.use("c" * 64) is None  # gone: the library downloads it again


def test_a_failed_write_leaves_no_temporary_file_and_stale_ones_are_cleared(tmp_path):
    cache = AdapterCache(tmp_path, max_bytes=10_000)
    cache.path("f" * 64).mkdir()  # where the file should go is taken: the write fails at its last step
    with pytest.raises(OSError):
        cache.keep("f" * 64, b"x" * 100)
    assert [path.name for path in tmp_path.iterdir()] == [cache.path("f" * 64).name]
    stale, fresh = tmp_path / ".tmp-killed", tmp_path / ".tmp-writing"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))  # left by a process killed two hours ago
    AdapterCache(tmp_path, max_bytes=10_000)
    assert not stale.exists() and fresh.exists()  # another process's write in progress is left alone


def test_an_adapter_fused_at_a_scale_draws_what_the_unfused_one_draws_at_that_scale(made, modules):
    [ink] = LoraLibrary(made, modules=lambda: modules).resolve((LoraChoice("ink", 0.7),))
    fused = build_tiny_pipeline()
    fuse_adapters(fused, [ink])
    assert fused.get_list_adapters() == {} and lora_modules(fused) == modules  # no adapter layer is left behind
    unfused = build_tiny_pipeline()
    DeviceLoras(unfused, "cpu").apply([ink])
    plain = pixels(build_tiny_pipeline())
    # Measured: the largest difference is 1 of 255 (float32 sums in another order) at scales -0.5, 0.7, 1 and 2,
    # where the adapter itself moves pixels by 13 to 91 (23 at 0.7).
    assert np.abs(pixels(fused) - pixels(unfused)).max() <= 1 < np.abs(pixels(fused) - plain).max()
    DeviceLoras(fused, "cpu").apply([ink])  # a request's adapter still applies on top
    assert np.abs(pixels(fused) - pixels(unfused)).max() > 1


def test_image_metadata_names_fused_and_requested_adapters_apart_by_content():
    from sd3_service.storage.writer import image_metadata

    adapters = [{"name": "fast", "sha256": "f" * 64, "scale": 1.0, "fused": True},
                {"name": "oci://styles@ns/ink.safetensors", "sha256": "a" * 64, "scale": 0.5}]
    metadata = image_metadata(REQUEST, seed=1, model="tiny", adapters=adapters)
    assert (metadata["lora-fused-0"], metadata["lora-0"]) == (f"{'f' * 64}:1.0", f"{'a' * 64}:0.5")
    assert not any("oci://" in value for value in metadata.values())


def test_an_overwritten_object_is_fetched_again_and_its_old_copy_goes_when_evicted(made, modules, fake, bucket,
                                                                                    tmp_path):
    ink, wave = ((made / f"{name}.safetensors").read_bytes() for name in ("ink", "wave"))
    cache = AdapterCache(tmp_path / "cache", max_bytes=len(ink) + len(wave))
    library = LoraLibrary(tmp_path / "none", cache, frozenset({"images"}), bucket, modules=lambda: modules)
    style = (LoraChoice("oci://images@tenancyns/style.safetensors"),)
    fake.add_object("images", "style.safetensors", ink)
    [first] = library.resolve(style)
    library.release([first])
    fake.add_object("images", "style.safetensors", wave)  # overwritten: a new ETag
    [second] = library.resolve(style)
    library.release([second])
    assert first.sha256 != second.sha256 and cached(cache) == {first.sha256, second.sha256}
    fake.add_object("images", "other.safetensors", (made / "dust.safetensors").read_bytes())
    library.resolve((LoraChoice("oci://images@tenancyns/other.safetensors"),))
    assert first.sha256 not in cached(cache)  # the old copy was the least recently used
    assert len(fake.seen("GET", "/o/style.safetensors")) == 2
