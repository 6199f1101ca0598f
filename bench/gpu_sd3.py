"""The SD3 Medium pipeline itself on a GPU: seconds per image, memory, and how close to the hardware.

    python bench/gpu_sd3.py                      # on a CUDA GPU: the full-size architecture, every variant
    python bench/gpu_sd3.py --variants "eager fp16,fp16 + fused QKV" --budget-s 560
    python bench/gpu_sd3.py --resume results/gpu_sd3.json --variants "fp16 + torch.compile"
    python bench/gpu_sd3.py --count-flops-only   # anywhere: TFLOP per image of the full-size pipeline

Builds SD3 Medium's architecture from its public configs (transformer 24 layers x 1536, CLIP-L,
CLIP-G, T5-XXL encoder, the 16-channel VAE) with random weights, directly on the device; the
tokenizers are built locally as in `sd3_service.pipelines.tiny`. Nothing is downloaded. For each variant
(dtype, fused QKV projections, torch.compile, channels-last VAE, T5 dropped, model CPU offload, fp8
linear layers) it measures seconds per 1024x1024 image at 28 steps with CFG 7, peak GPU memory, and
compares the decoded image with eager fp32's on the same seed (PSNR, largest pixel difference). It
also times a large matmul on the card (the hardware's usable fp16/bf16 throughput) and counts the
pipeline's FLOPs (torch's FlopCounterMode on the meta device: matmuls, convolutions, attention),
which together give the fraction of the card's matmul throughput a variant achieves.

Each variant runs in its own process: its peak memory and compile caches are its own, an out-of-memory
or a crash loses only that variant, and one that would outrun `--budget-s` (the device machine's
per-call limit) is stopped. The report is rewritten after every variant, with the fp32 reference
image beside it (`<out>.reference.npy`), so a later call can `--resume` it and run only the rest.

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
import os
import signal
import subprocess
import sys
import tempfile
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
REFERENCE = "eager fp32 (reference)"
# Kept back from --budget-s: starting the parent and writing the report after the last variant.
BUDGET_MARGIN_S = 15


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

    from sd3_service.pipelines.tiny import _clip_tokenizer

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

    from sd3_service.pipelines.tiny import _clip_tokenizer, _t5_tokenizer

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


def fp8_matmul_tflops(n: int, seconds: float = 2.0) -> float | None:
    """Measured float8 (e4m3) matmul throughput through torch._scaled_mm, or None where the card has none."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        return None
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()  # _scaled_mm wants b column-major
    one = torch.ones((), device="cuda")
    run = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    calls, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        for _ in range(10):
            run()
        calls += 10
        torch.cuda.synchronize()
    return 2 * n**3 * calls / (time.perf_counter() - began) / 1e12


# -- the variants -----------------------------------------------------------------------------------

@dataclass
class Variant:
    name: str
    dtype: torch.dtype
    fuse_qkv: bool = False
    compile: str | None = None  # torch.compile mode for the transformer, or None for eager
    compile_vae: bool = False  # also compile the VAE decoder (same mode)
    channels_last_vae: bool = False
    drop_t5: bool = False
    offload: bool = False
    fp8: bool = False  # the transformer's linear layers in float8, dynamic per-row scales (torchao)
    needs_cuda: bool = False
    notes: list[str] = field(default_factory=list)


def all_variants() -> list[Variant]:
    """Every variant, cheapest first: a run cut short by its budget still has the eager numbers."""
    f16, bf16 = torch.float16, torch.bfloat16
    tuned = dict(fuse_qkv=True, channels_last_vae=True, compile="max-autotune", compile_vae=True, needs_cuda=True)
    return [
        Variant(REFERENCE, torch.float32),
        Variant("eager fp16", f16),
        Variant("eager bf16", bf16),
        Variant("fp16 + fused QKV", f16, fuse_qkv=True),
        Variant("fp16 + channels-last VAE", f16, channels_last_vae=True),
        Variant("fp16 + T5 dropped", f16, drop_t5=True),
        Variant("fp16 + model CPU offload", f16, offload=True, needs_cuda=True),
        Variant("fp16 + torch.compile", f16, compile="default", needs_cuda=True),
        Variant("fp16 + fused QKV + channels-last VAE + compile max-autotune", f16, **tuned),
        Variant("bf16 + fused QKV + channels-last VAE + compile max-autotune", bf16, **tuned),
        Variant("bf16 + fp8 linear (torchao) + fused QKV + compile max-autotune", bf16, fp8=True, **tuned),
    ]


def prepare(pipe, variant: Variant, device: str):
    """Apply a variant to a freshly built float32 pipeline, through the service's own placement code.

    The service's dtype cast (what loading keeps in float32 stays there), T5 dropping, offload, QKV fusion
    and VAE slicing come from sd3_service.pipelines.loading; float8, the VAE's memory layout and the compile
    modes are this benchmark's own.
    """
    from sd3_service.pipelines.dtypes import cast_as_loading_would
    from sd3_service.pipelines.loading import LoadedWeights, ModelSource, drop_t5, place_pipeline
    from sd3_service.settings import Settings

    if variant.drop_t5:
        pipe = drop_t5(pipe)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            cast_as_loading_would(component, variant.dtype)
    if variant.offload:
        pipe.to("cpu")  # offload keeps each model on the CPU until it runs
    settings = Settings(sd3_model="tiny", sd3_t5=not variant.drop_t5, sd3_offload=variant.offload,
                        sd3_fuse_qkv=variant.fuse_qkv, sd3_compile=False)  # compile modes: below
    weights = LoadedWeights(pipe=pipe, source=ModelSource("random", "tiny", "benchmark"),
                            dtype=str(variant.dtype).removeprefix("torch."))
    pipe = place_pipeline(weights, device, settings, copy=False).pipe
    if variant.fp8:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        quantize_(pipe.transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    if variant.channels_last_vae:
        pipe.vae.to(memory_format=torch.channels_last)
    if variant.compile:
        if variant.compile == "max-autotune":
            # The inductor settings of diffusers' SD3 speed-up guide.
            import torch._inductor.config as inductor

            inductor.conv_1x1_as_mm = True
            inductor.coordinate_descent_tuning = True
            inductor.epilogue_fusion = False
            inductor.coordinate_descent_check_all_directions = True
        pipe.transformer.compile(mode=variant.compile, fullgraph=True)
        if variant.compile_vae:
            # Not fullgraph: decode's forward hooks and output dataclass may break the graph, which is fine here.
            pipe.vae.decode = torch.compile(pipe.vae.decode, mode=variant.compile)
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


def measure_variant(plan: Plan, variant: Variant, device: str) -> tuple[dict, np.ndarray]:
    """Build, prepare and time one variant in this process: the body of a variant's child process."""
    began_all = time.perf_counter()
    pipe = prepare(build_pipeline(plan.configs, device), variant, device)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    image = generate(pipe, plan.size, plan.steps, device)  # the first call: compiles, allocates, autotunes
    first_s = time.perf_counter() - began
    if variant.compile:
        generate(pipe, plan.size, plan.steps, device)  # a compiled model may specialise again on its second call
    times = []
    # The fp32 reference is there for its image (the quality yardstick); one timed run of it is enough.
    for _ in range(1 if variant.name == REFERENCE else plan.repeats):
        began = time.perf_counter()
        image = generate(pipe, plan.size, plan.steps, device)
        times.append(time.perf_counter() - began)
    return {
        "variant": variant.name, "dtype": str(variant.dtype).removeprefix("torch."), "fuse_qkv": variant.fuse_qkv,
        "compile": variant.compile, "compile_vae": variant.compile_vae, "channels_last_vae": variant.channels_last_vae,
        "drop_t5": variant.drop_t5, "offload": variant.offload, "fp8": variant.fp8,
        "first_call_s": round(first_s, 3), "seconds_per_image": [round(t, 4) for t in times],
        "median_s_per_image": round(float(np.median(times)), 4),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "build_and_measure_s": round(time.perf_counter() - began_all, 1),
    }, image


# -- one process per variant ------------------------------------------------------------------------

@dataclass
class Plan:
    configs: dict
    size: int
    steps: int
    repeats: int
    name: str
    matmul_n: int


def make_plan(cuda: bool, reduced: bool, repeats: int | None) -> Plan:
    if cuda and not reduced:
        return Plan(sd3_medium_configs(), 1024, 28, repeats or 3, "full SD3 Medium", 8192)
    return Plan(reduced_configs(), 128, 2, repeats or 1, "reduced (CPU check)", 512)


def child_main(args) -> None:
    """Run one variant (`--run-variant`) and leave its result, image or error in `--work-dir`."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    work = Path(args.work_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    variant = {v.name: v for v in all_variants()}[args.run_variant]
    try:
        result, image = measure_variant(make_plan(device == "cuda", args.reduced, args.repeats), variant, device)
    except BaseException as exc:  # out of memory, a compile error: the parent records it and goes on
        (work / "error.txt").write_text(f"{type(exc).__name__}: {exc}"[:500])
        raise
    np.save(work / "image.npy", image)
    (work / "result.json").write_text(json.dumps(result))


def run_variant_process(variant: Variant, args, timeout_s: float | None) -> tuple[dict | None, np.ndarray | None, str]:
    """Run one variant in a child process, stopped after `timeout_s`; returns (result, image, failure)."""
    with tempfile.TemporaryDirectory(prefix="gpu_sd3-") as work:
        command = [sys.executable, str(Path(__file__).resolve()), "--run-variant", variant.name, "--work-dir", work]
        if args.reduced:
            command.append("--reduced")
        if args.repeats:
            command += ["--repeats", str(args.repeats)]
        # Its own process group: a stopped compile takes its inductor worker processes with it.
        child = subprocess.Popen(command, start_new_session=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        try:
            code = child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            return None, None, f"stopped after {timeout_s:.0f} s: the time budget (--budget-s) ran out"
        error = Path(work) / "error.txt"
        if code != 0:
            return None, None, error.read_text() if error.exists() else f"exited with status {code}"
        return json.loads((Path(work) / "result.json").read_text()), np.load(Path(work) / "image.npy"), ""


def load_resumed(path: Path | None, plan: Plan) -> tuple[list[dict], np.ndarray | None]:
    """Results of an earlier call to carry on from, and its fp32 reference image when it has one."""
    if path is None:
        return [], None
    earlier = json.loads(path.read_text())
    if (earlier.get("configuration"), earlier.get("size"), earlier.get("steps")) != (plan.name, plan.size, plan.steps):
        raise SystemExit(f"--resume {path}: measured {earlier.get('configuration')} at {earlier.get('size')} px, "
                         f"{earlier.get('steps')} steps; this run is {plan.name} at {plan.size} px, {plan.steps} steps")
    reference_path = reference_image_path(path)
    reference = np.load(reference_path) if reference_path.exists() else None
    results = [r for r in earlier.get("variants", []) if reference is not None or r["variant"] != REFERENCE]
    return results, reference


def reference_image_path(report_path: Path) -> Path:
    return report_path.with_suffix(".reference.npy")


def main(argv=None) -> dict | None:
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", help="comma-separated variant names, run in that order after the fp32 "
                                           "reference (default: all that the device runs)")
    parser.add_argument("--repeats", type=int, default=None, help="timed generations per variant")
    parser.add_argument("--reduced", action="store_true",
                        help="the small CPU-check configuration even on a GPU (what benchcheck/test_gpu_sd3.py runs)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock seconds for the whole run: a variant still running when they are spent "
                             "is stopped, later ones are not started (the device machine allows 600 s a call)")
    parser.add_argument("--resume", type=Path, default=None,
                        help="a report of an earlier call (with its .reference.npy beside it): keep its variants "
                             "and run only the others")
    parser.add_argument("--count-flops-only", action="store_true",
                        help="count the full-size pipeline's FLOPs and parameters (runs anywhere) and stop")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--run-variant", help=argparse.SUPPRESS)  # the child process's side
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_variant:
        child_main(args)
        return None

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

    plan = make_plan(cuda, args.reduced, args.repeats)
    out = args.out or HERE / "results" / ("gpu_sd3.json" if plan.name == "full SD3 Medium" else "gpu_sd3-reduced.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results, reference = load_resumed(args.resume, plan)
    machine = describe_machine()
    print(machine_line(machine))
    print(f"configuration: {plan.name}, {plan.size}x{plan.size}, {plan.steps} steps, CFG 7, {plan.repeats} timed "
          f"run(s) per variant" + (f"; carrying on from {args.resume} ({len(results)} done)" if args.resume else ""))
    flops = flops_full if plan.configs is full else count_flops(plan.configs, plan.size, plan.steps)
    hardware = {name: round(matmul_tflops(device, dtype, plan.matmul_n), 4)
                for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16),
                                    ("float32", torch.float32))}
    fp8 = fp8_matmul_tflops(plan.matmul_n)
    if fp8 is not None:
        hardware["float8_e4m3"] = round(fp8, 4)
    if cuda:
        torch.cuda.empty_cache()  # the children need the card; this process keeps only its context
    print("measured matmul TFLOP/s: " + ", ".join(f"{k} {v}" for k, v in hardware.items()))

    variants = select_variants(parser, args.variants)
    done = {r["variant"] for r in results}
    skipped = {}
    report.update({"machine": machine, "device": device, "configuration": plan.name, "size": plan.size,
                   "steps": plan.steps, "guidance_scale": 7.0, "repeats": plan.repeats, "configs": plan.configs,
                   "flops_per_image": flops, "measured_matmul_tflops": hardware, "matmul_n": plan.matmul_n,
                   "variants": results, "skipped": skipped})
    if reference is not None:
        np.save(reference_image_path(out), reference)
    for variant in variants:
        if variant.name in done:
            continue
        if variant.needs_cuda and not cuda:
            skipped[variant.name] = "needs CUDA"
            continue
        timeout_s = None
        if args.budget_s is not None:
            timeout_s = args.budget_s - BUDGET_MARGIN_S - (time.monotonic() - started)
            if timeout_s < 10:
                skipped[variant.name] = "not started: the time budget (--budget-s) was spent"
                continue
        print(f"  {variant.name} ...", flush=True)
        result, image, failure = run_variant_process(variant, args, timeout_s)
        if result is None:
            skipped[variant.name] = failure
            print(f"    failed: {failure}", flush=True)
            continue
        if variant.name == REFERENCE:
            reference = image
            np.save(reference_image_path(out), reference)
        result["vs_fp32"] = compare(image, reference) if reference is not None else None
        result["measured_on"] = machine.get("gpu") or machine["cpu"]
        result["achieved_tflops"] = round(flops["total"] / result["median_s_per_image"] / 1e12, 3)
        result["fraction_of_measured_matmul"] = round(result["achieved_tflops"] / max(hardware[result["dtype"]], 1e-9), 3)
        results.append(result)
        print("    " + summary_line(result, cuda), flush=True)
        report["load_average_at_end"] = describe_machine(())["load_average_1_5_15"]
        write(report, out, quiet=True)  # after every variant: a call cut short keeps what it measured

    report["load_average_at_end"] = describe_machine(())["load_average_1_5_15"]
    print_table(report)
    return write(report, out)


def select_variants(parser, names: str | None) -> list[Variant]:
    variants = all_variants()
    if not names:
        return variants
    by_name = {v.name: v for v in variants}
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(by_name)}")
    return [by_name[REFERENCE]] + [by_name[name] for name in wanted if name != REFERENCE]


def summary_line(result: dict, cuda: bool) -> str:
    quality = result["vs_fp32"]
    if quality is None:
        drift = "no fp32 reference to compare with"
    elif quality["finite"]:
        drift = f"PSNR {quality['psnr_db']} dB, max diff {quality['max_abs_diff_8bit']}"
    else:
        drift = "NOT FINITE"
    return (f"{result['median_s_per_image']:.3f} s/image, first call {result['first_call_s']:.1f} s, "
            f"{result['fraction_of_measured_matmul']:.0%} of {result['dtype']} matmul, "
            + (f"peak {result['peak_gpu_memory_gib']} GiB, " if cuda else "") + drift)


def print_table(report: dict) -> None:
    """The short table the device machine's reply carries back (its output tail)."""
    print(f"\n{report['configuration']} on {report['machine'].get('gpu') or report['machine']['cpu']}:")
    print(f"{'variant':<64} {'s/image':>8} {'x fp16':>7} {'matmul%':>8} {'GiB':>6} {'PSNR':>7}")
    eager = {r["variant"]: r["median_s_per_image"] for r in report["variants"]}.get("eager fp16")
    for r in report["variants"]:
        quality = r["vs_fp32"] or {}
        print(f"{r['variant'][:64]:<64} {r['median_s_per_image']:>8.3f} "
              f"{(eager / r['median_s_per_image'] if eager else float('nan')):>7.2f} "
              f"{r['fraction_of_measured_matmul']:>8.0%} {r['peak_gpu_memory_gib'] or 0:>6} "
              f"{quality.get('psnr_db', 'n/a')!s:>7}")
    for name, why in report["skipped"].items():
        print(f"{name[:64]:<64} skipped: {why}")


def write(report: dict, path: Path, quiet: bool = False) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(report, indent=2, default=str) + "\n")
    partial.replace(path)
    if not quiet:
        print(f"wrote {path}")
    return report


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
