"""The GPU benchmark still runs: bench/gpu_sd3.py in its reduced configuration on the CPU, and its full-size
configs count SD3 Medium (fp32 against itself exact).

They check what the scripts report, never how fast anything was (benchcheck/bench_runner.py runs a script).
"""

from __future__ import annotations

import json
import sys

import torch
from bench_runner import REPO, run


def test_full_size_configs_count_sd3_mediums_flops_and_parameters(tmp_path):
    run("gpu_sd3.py", "--count-flops-only", "--out", str(tmp_path / "flops.json"), timeout=120)
    report = json.loads((tmp_path / "flops.json").read_text())
    # About 515 TFLOP (docs/benchmarks.md) per 1024x1024 image at 28 steps with CFG.
    assert 505e12 < report["full_size_flops_per_image"]["total"] < 525e12
    params = report["full_size_parameters"]
    assert 2.0e9 < params["transformer"] < 2.1e9  # "2B" SD3 Medium
    assert 4.7e9 < params["text_encoder_3"] < 4.8e9  # the T5 v1.1 XXL encoder
    assert 0.69e9 < params["text_encoder_2"] < 0.70e9 and 0.12e9 < params["text_encoder"] < 0.13e9

def test_full_size_components_fit_together_at_1024():
    # On the meta device (shapes, no memory): the chain a GPU run goes through, text encoders ->
    # transformer -> VAE, with SD3 Medium's real dimensions, so a lent GPU's minutes are not lost to a typo.
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_sd3

    pipe = gpu_sd3.build_pipeline(gpu_sd3.sd3_medium_configs(), "meta")
    meta = torch.device("meta")
    with torch.inference_mode():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt="a cat", prompt_2=None, prompt_3=None, negative_prompt="a dog", device=meta)
        assert embeds.shape == negative.shape == (1, 77 + 256, 4096)  # CLIP-L+G padded to T5's width, then T5
        assert pooled.shape == (1, 768 + 1280)
        noise = pipe.transformer(hidden_states=torch.zeros(2, 16, 128, 128, device=meta),
                                 encoder_hidden_states=torch.cat([negative, embeds]),
                                 pooled_projections=torch.cat([negative_pooled, pooled]),
                                 timestep=torch.zeros(2, device=meta), return_dict=False)[0]
        assert noise.shape == (2, 16, 128, 128)
        assert pipe.vae.decode(noise[:1], return_dict=False)[0].shape == (1, 3, 1024, 1024)

def test_gpu_benchmark_runs_its_reduced_configuration_over_two_calls_that_resume(tmp_path):
    # The device machine allows 10 minutes a call: a run is split over calls that resume each other. The first call
    # measures the fp32 reference and one variant; the second resumes it and measures the rest.
    first_variants = "eager fp16,fp16 + fused QKV"
    run("gpu_sd3.py", "--reduced", "--variants", first_variants, "--out", str(tmp_path / "first.json"), timeout=300)
    first = json.loads((tmp_path / "first.json").read_text())
    assert [v["variant"] for v in first["variants"]] == ["eager fp32 (reference)", "eager fp16", "fp16 + fused QKV"]
    assert (tmp_path / "first.reference.npy").exists()  # what a later call resumes from

    output = run("gpu_sd3.py", "--reduced", "--resume", str(tmp_path / "first.json"), "--out",
                 str(tmp_path / "gpu.json"), timeout=300)
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["variants"][:3] == first["variants"]  # carried over, not measured again
    assert "eager fp32 (reference) ..." not in output and "eager fp16 ..." not in output and "eager bf16 ..." in output
    variants = {v["variant"]: v for v in report["variants"]}
    reference = variants["eager fp32 (reference)"]
    assert reference["vs_fp32"] == {"finite": True, "psnr_db": float("inf"), "max_abs_diff_8bit": 0,
                                    "mean_abs_diff_8bit": 0.0}
    expected = {"eager fp16", "eager bf16", "fp16 + fused QKV", "fp16 + channels-last VAE", "fp16 + T5 dropped"}
    assert expected <= set(variants)
    for variant in variants.values():
        assert variant["median_s_per_image"] > 0 and variant["vs_fp32"]["finite"]
    # Fusing QKV and the VAE's memory layout change the arithmetic only by rounding; dropping T5 changes the input.
    fp16 = variants["eager fp16"]["vs_fp32"]["psnr_db"]
    assert abs(variants["fp16 + fused QKV"]["vs_fp32"]["psnr_db"] - fp16) < 3
    assert variants["fp16 + T5 dropped"]["vs_fp32"]["psnr_db"] < fp16 - 10
    bf16 = variants["eager bf16"]["vs_fp32"]  # compared with the first call's reference image
    assert bf16["finite"] and 0 < bf16["psnr_db"] < float("inf")
    if not torch.cuda.is_available():
        assert report["configuration"] == "reduced (CPU check)"
        assert report["skipped"] and all(why == "needs CUDA" and ("compile" in name or "offload" in name)
                                         for name, why in report["skipped"].items())

def test_gpu_benchmark_keeps_to_its_time_budget(tmp_path):
    # 15 s of the budget are kept for writing the report: nothing fits in 16 s, and the report says so.
    run("gpu_sd3.py", "--reduced", "--budget-s", "16", "--out", str(tmp_path / "gpu.json"), timeout=120)
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["variants"] == []
    assert report["skipped"]["eager fp16"] == "not started: the time budget (--budget-s) was spent"

def test_a_variant_over_its_time_is_stopped():
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_sd3

    args = gpu_sd3.argparse.Namespace(reduced=True, repeats=None)
    variant = gpu_sd3.all_variants()[0]
    result, image, failure = gpu_sd3.run_variant_process(variant, args, timeout_s=1.0)
    # Stopped, not waited for: the variant needs ~5 s on a CPU, and a finished one would have a result.
    assert result is None and image is None
    assert failure == "stopped after 1 s: the time budget (--budget-s) ran out"
