"""The SD3 Medium pipeline itself on a GPU: seconds per image, memory, and how close to the hardware.

    python bench/gpu_sd3.py                      # on a CUDA GPU: the full-size architecture, every variant
    python bench/gpu_sd3.py --variants "eager fp16,fp16 + fused QKV"
    python bench/gpu_sd3.py --count-flops-only   # anywhere: TFLOP per image of the full-size pipeline

Builds SD3 Medium's architecture from its public configs (transformer 24 layers x 1536, CLIP-L,
CLIP-G, T5-XXL encoder, the 16-channel VAE) with random weights, directly on the device; the
tokenizers are built locally as in `sd3_service.tiny_model`. Nothing is downloaded. For each variant
(dtype, fused QKV projections, torch.compile, channels-last VAE, T5 dropped, model CPU offload) it
measures seconds per 1024x1024 image at 28 steps with CFG 7, peak GPU memory, and compares the decoded
image with eager fp32's on the same seed (PSNR, largest pixel difference). It also times a large
matmul on the card (the hardware's usable fp16/bf16 throughput) and counts the pipeline's FLOPs
(torch's FlopCounterMode on the meta device: matmuls, convolutions, attention), which together give
the fraction of the card's matmul throughput a variant achieves.

Random weights: speed and memory are those of the real model (same shapes, same kernels); the images
are noise, and the quality comparison shows numerical drift against fp32, not visual quality.

Without CUDA it runs a reduced configuration (small dimensions, 128x128, 2 steps) on the CPU so
that CI can check that the script works; those numbers say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "sd3-medium"))
from machine import describe_machine, machine_line  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"
NEGATIVE = "blurry, low quality"
WEIGHT_SEED = 0
IMAGE_SEED = 42


# -- the architecture -------------------------------------------------------------------------------

def sd3_medium_configs() -> dict:
    """SD3 Medium's component configs (stabilityai/stable-diffusion-3-medium-diffusers, config.json files)."""
    return {
        "transformer": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                            attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                            caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=1024,
                    scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
                    force_upcast=True),
        # CLIP ViT-L/14 text tower
        "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             projection_dim=768, hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77),
        # OpenCLIP ViT-bigG/14 text tower
        "text_encoder_2": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                               projection_dim=1280, hidden_act="gelu", vocab_size=49408, max_position_embeddings=77),
        # T5 v1.1 XXL, encoder only
        "text_encoder_3": dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                               feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                               relative_attention_max_distance=128, layer_norm_epsilon=1e-6),
    }


def reduced_configs() -> dict:
    """The same classes with small dimensions, for a CPU check of the script (CI)."""
    full = sd3_medium_configs()
    return {
        "transformer": {**full["transformer"], "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
                        "joint_attention_dim": 64, "caption_projection_dim": 32, "pooled_projection_dim": 64,
                        "sample_size": 16, "pos_embed_max_size": 32},
        "vae": {**full["vae"], "block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4,
                "sample_size": 128},
        "text_encoder": {**full["text_encoder"], "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "projection_dim": 32},
        "text_encoder_2": {**full["text_encoder_2"], "hidden_size": 32, "intermediate_size": 37,
                           "num_hidden_layers": 2, "num_attention_heads": 4, "projection_dim": 32},
        "text_encoder_3": {**full["text_encoder_3"], "d_model": 64, "d_ff": 37, "d_kv": 8, "num_heads": 4,
                           "num_layers": 1, "relative_attention_num_buckets": 8},
    }


def build_models(configs: dict) -> dict:
    """The five models, float32, on the current default device (use `with torch.device(...)`)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from sd3_service.tiny_model import _clip_tokenizer, _t5_tokenizer

    _, clip_vocab = _clip_tokenizer()
    # The local tokenizers' special-token ids, so CLIP pools at their end-of-text token.
    special = dict(bos_token_id=clip_vocab - 2, eos_token_id=clip_vocab - 1, pad_token_id=clip_vocab - 1)
    return {
        "transformer": SD3Transformer2DModel(**configs["transformer"]),
        "vae": AutoencoderKL(**configs["vae"]),
        "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder"], **special)),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"], **special)),
        "text_encoder_3": T5EncoderModel(T5Config(**configs["text_encoder_3"], pad_token_id=0, eos_token_id=1,
                                                  decoder_start_token_id=0)),
    }


def build_pipeline(configs: dict, device: str):
    """The whole pipeline in float32 on `device`, random weights from a fixed seed (same weights every build)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from sd3_service.tiny_model import _clip_tokenizer, _t5_tokenizer

    torch.manual_seed(WEIGHT_SEED)
    with torch.device(device):  # parameters are created and initialised on the device: seconds, not minutes
        models = build_models(configs)
    clip_tokenizer, _ = _clip_tokenizer()
    t5_tokenizer, _ = _t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), tokenizer=clip_tokenizer, tokenizer_2=clip_tokenizer,
        tokenizer_3=t5_tokenizer, **models)
    for module in models.values():
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_counts(configs: dict) -> dict[str, int]:
    with torch.device("meta"):
        models = build_models(configs)
    return {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}


def count_flops(configs: dict, size: int, steps: int, guidance: bool = True) -> dict[str, float]:
    """FLOPs of one image, per component, counted on the meta device (no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        models = build_models(configs)
    batch = 2 if guidance else 1  # classifier-free guidance runs prompt and negative prompt together
    t = configs["transformer"]
    latent = size // 8
    clip_tokens, t5_tokens = 77, 256
    counts = {}
    with torch.inference_mode(), torch.device("meta"):
        def counted(name, run, times=1):
            with FlopCounterMode(display=False) as counter:
                run()
            counts[name] = counter.get_total_flops() * times

        ids = torch.zeros(batch, clip_tokens, dtype=torch.long)
        counted("text_encoder", lambda: models["text_encoder"](ids, output_hidden_states=True))
        counted("text_encoder_2", lambda: models["text_encoder_2"](ids, output_hidden_states=True))
        counted("text_encoder_3", lambda: models["text_encoder_3"](torch.zeros(batch, t5_tokens, dtype=torch.long)))
        counted("transformer", lambda: models["transformer"](
            hidden_states=torch.zeros(batch, t["in_channels"], latent, latent),
            encoder_hidden_states=torch.zeros(batch, clip_tokens + t5_tokens, t["joint_attention_dim"]),
            pooled_projections=torch.zeros(batch, t["pooled_projection_dim"]),
            timestep=torch.zeros(batch)), times=steps)
        counted("vae_decode", lambda: models["vae"].decode(torch.zeros(1, 16, latent, latent)))
    counts["total"] = sum(counts.values())
    return counts


# -- the hardware -----------------------------------------------------------------------------------

def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(device: str, dtype: torch.dtype, n: int, seconds: float = 2.0) -> float:
    """Measured dense matmul throughput (n x n x n), TFLOP/s: what the card actually sustains."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    calls, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        for _ in range(10):
            a @ b
        calls += 10
        synchronize(device)
    elapsed = time.perf_counter() - began
    return 2 * n**3 * calls / elapsed / 1e12


# -- the variants -----------------------------------------------------------------------------------

@dataclass
class Variant:
    name: str
    dtype: torch.dtype
    fuse_qkv: bool = False
    compile: str | None = None  # torch.compile mode for the transformer, or None for eager
    channels_last_vae: bool = False
    drop_t5: bool = False
    offload: bool = False
    needs_cuda: bool = False
    notes: list[str] = field(default_factory=list)


def all_variants() -> list[Variant]:
    f16, bf16 = torch.float16, torch.bfloat16
    return [
        Variant("eager fp32 (reference)", torch.float32),
        Variant("eager fp16", f16),
        Variant("eager bf16", bf16),
        Variant("fp16 + fused QKV", f16, fuse_qkv=True),
        Variant("fp16 + channels-last VAE", f16, channels_last_vae=True),
        Variant("fp16 + T5 dropped", f16, drop_t5=True),
        Variant("fp16 + torch.compile", f16, compile="default", needs_cuda=True),
        Variant("fp16 + fused QKV + channels-last VAE + compile max-autotune", f16, fuse_qkv=True,
                channels_last_vae=True, compile="max-autotune", needs_cuda=True),
        Variant("bf16 + fused QKV + channels-last VAE + compile max-autotune", bf16, fuse_qkv=True,
                channels_last_vae=True, compile="max-autotune", needs_cuda=True),
        Variant("fp16 + model CPU offload", f16, offload=True, needs_cuda=True),
    ]


def prepare(pipe, variant: Variant, device: str):
    """Apply a variant to a freshly built float32 pipeline (on `device`, or the CPU for offload)."""
    if variant.drop_t5:
        pipe = type(pipe)(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
        pipe.set_progress_bar_config(disable=True)
    pipe.to(dtype=variant.dtype)
    if variant.offload:
        pipe.to("cpu")
        pipe.enable_model_cpu_offload()
    if variant.fuse_qkv:
        pipe.transformer.fuse_qkv_projections()
    if variant.channels_last_vae:
        pipe.vae.to(memory_format=torch.channels_last)
    if variant.compile:
        torch._dynamo.reset()  # a fresh compile per variant: no guards or recompile budget left from the last one
        if variant.compile == "max-autotune":
            # The inductor settings of diffusers' SD3 speed-up guide.
            import torch._inductor.config as inductor

            inductor.conv_1x1_as_mm = True
            inductor.coordinate_descent_tuning = True
            inductor.epilogue_fusion = False
            inductor.coordinate_descent_check_all_directions = True
        pipe.transformer.compile(mode=variant.compile, fullgraph=True)
    return pipe


def generate(pipe, size: int, steps: int, device: str) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(IMAGE_SEED)
    with torch.inference_mode():
        images = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0,
                      width=size, height=size, generator=generator, output_type="np").images
    synchronize(device)
    return images[0]  # float32 HxWx3 in [0, 1]


def compare(image: np.ndarray, reference: np.ndarray) -> dict:
    """PSNR (dB, over [0, 1]) and the largest and mean 8-bit pixel differences against the reference."""
    if not np.isfinite(image).all():
        return {"finite": False}
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    as_uint8 = lambda x: np.round(np.clip(x, 0, 1) * 255).astype(np.int16)  # noqa: E731 - what a PNG would hold
    difference = np.abs(as_uint8(image) - as_uint8(reference))
    return {"finite": True, "psnr_db": math.inf if mse == 0 else round(10 * math.log10(1 / mse), 2),
            "max_abs_diff_8bit": int(difference.max()), "mean_abs_diff_8bit": round(float(difference.mean()), 3)}


def run_variant(configs: dict, variant: Variant, device: str, size: int, steps: int, repeats: int,
                reference: np.ndarray | None) -> tuple[dict, np.ndarray]:
    build_device = device
    pipe = prepare(build_pipeline(configs, build_device), variant, device)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    image = generate(pipe, size, steps, device)  # the first call: compiles, allocates, autotunes
    first_s = time.perf_counter() - began
    if variant.compile:
        generate(pipe, size, steps, device)  # a compiled model may specialise again on its second call
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        image = generate(pipe, size, steps, device)
        times.append(time.perf_counter() - began)
    result = {
        "variant": variant.name, "dtype": str(variant.dtype).removeprefix("torch."), "fuse_qkv": variant.fuse_qkv,
        "compile": variant.compile, "channels_last_vae": variant.channels_last_vae, "drop_t5": variant.drop_t5,
        "offload": variant.offload, "first_call_s": round(first_s, 3),
        "seconds_per_image": [round(t, 4) for t in times], "median_s_per_image": round(float(np.median(times)), 4),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "vs_fp32": compare(image, reference if reference is not None else image),
    }
    del pipe
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result, image


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", help="comma-separated variant names (default: all that the device runs)")
    parser.add_argument("--repeats", type=int, default=None, help="timed generations per variant")
    parser.add_argument("--reduced", action="store_true",
                        help="the small CPU-check configuration even on a GPU (what tests/test_bench.py runs)")
    parser.add_argument("--count-flops-only", action="store_true",
                        help="count the full-size pipeline's FLOPs and parameters (runs anywhere) and stop")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # not one warning per cast of a random-weight model
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    full = sd3_medium_configs()
    flops_full = count_flops(full, 1024, 28)
    params_full = parameter_counts(full)
    print(f"SD3 Medium, 1024x1024, 28 steps, CFG: {flops_full['total'] / 1e12:.1f} TFLOP per image ("
          + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in flops_full.items() if k != "total") + ")")
    print("parameters: " + ", ".join(f"{k} {v / 1e9:.3f} B" for k, v in params_full.items()))
    report = {"benchmark": "gpu_sd3", "full_size_flops_per_image": flops_full,
              "full_size_parameters": params_full}
    if args.count_flops_only:
        report["machine"] = describe_machine()
        return write(report, args.out or HERE / "results" / "sd3_medium_flops.json")

    if cuda and not args.reduced:
        configs, size, steps, repeats, config_name = full, 1024, 28, args.repeats or 3, "full SD3 Medium"
        matmul_n = 8192
    else:
        configs, size, steps, repeats, config_name = reduced_configs(), 128, 2, args.repeats or 1, "reduced (CPU check)"
        matmul_n = 512
    machine = describe_machine()
    print(machine_line(machine))
    print(f"configuration: {config_name}, {size}x{size}, {steps} steps, CFG 7, {repeats} timed run(s) per variant")
    flops = flops_full if configs is full else count_flops(configs, size, steps)
    hardware = {name: round(matmul_tflops(device, dtype, matmul_n), 4)
                for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16),
                                    ("float32", torch.float32))}
    print("measured matmul TFLOP/s: " + ", ".join(f"{k} {v}" for k, v in hardware.items()))

    variants = all_variants()
    if args.variants:
        wanted = [name.strip() for name in args.variants.split(",")]
        unknown = set(wanted) - {v.name for v in variants}
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; known: {[v.name for v in variants]}")
        variants = [v for v in variants if v.name in wanted or v.name == "eager fp32 (reference)"]
    results, skipped, reference = [], {}, None
    for variant in variants:
        if variant.needs_cuda and not cuda:
            skipped[variant.name] = "needs CUDA"
            continue
        print(f"  {variant.name} ...", flush=True)
        try:
            result, image = run_variant(configs, variant, device, size, steps, repeats, reference)
        except Exception as exc:  # noqa: BLE001 - one failing variant (e.g. out of memory) must not lose the rest
            skipped[variant.name] = f"{type(exc).__name__}: {exc}"[:500]
            print(f"    failed: {skipped[variant.name]}")
            continue
        if reference is None:
            reference = image
        dtype_key = result["dtype"]
        result["achieved_tflops"] = round(flops["total"] / result["median_s_per_image"] / 1e12, 3)
        result["fraction_of_measured_matmul"] = round(result["achieved_tflops"] / max(hardware[dtype_key], 1e-9), 3)
        results.append(result)
        quality = result["vs_fp32"]
        print(f"    {result['median_s_per_image']:.3f} s/image, first call {result['first_call_s']:.1f} s, "
              f"{result['fraction_of_measured_matmul']:.0%} of {dtype_key} matmul, "
              + (f"peak {result['peak_gpu_memory_gib']} GiB, " if cuda else "")
              + (f"PSNR {quality['psnr_db']} dB, max diff {quality['max_abs_diff_8bit']}" if quality["finite"]
                 else "NOT FINITE"))

    report.update({"machine": machine, "device": device, "configuration": config_name, "size": size,
                   "steps": steps, "guidance_scale": 7.0, "repeats": repeats, "configs": configs,
                   "flops_per_image": flops, "measured_matmul_tflops": hardware, "matmul_n": matmul_n,
                   "variants": results, "skipped": skipped,
                   "load_average_at_end": describe_machine(())["load_average_1_5_15"]})
    stem = "gpu_sd3" if configs is full else "gpu_sd3-reduced"
    return write(report, args.out or HERE / "results" / f"{stem}.json")


def write(report: dict, path: Path) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
