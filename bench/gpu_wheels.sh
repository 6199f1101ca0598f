#!/usr/bin/env bash
# The wheels bench/gpu_sd3.py needs on the lent GPU machine and that its image lacks (it has torch,
# transformers, tokenizers, safetensors, huggingface_hub, Python 3.12 and no internet). They go into
# .gpu-run/wheels/, which git ignores and the device tool carries; bench/README.md has the commands.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d .gpu-run/wheels \
    diffusers==0.42.1 importlib-metadata==8.7.0 zipp==3.23.0 torchao==0.17.0
ls -l .gpu-run/wheels
