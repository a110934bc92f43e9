#!/usr/bin/env bash
# Wheels a GPU machine needs for benchmarks/gpu_check.py, beyond what a CUDA PyTorch image holds.
#
# A GPU machine with Python 3.12, CUDA torch, CuPy (cupy-cuda13x), Triton, torchvision, timm,
# scikit-learn, matplotlib, safetensors, filelock and tqdm lacks SpikingJelly 2.0, Hydra and its
# OmegaConf/ANTLR runtime, and loguru (SpikingJelly logs with it). Run this once, on any machine
# with pip and the package index (it need not have a GPU), from the repository root:
#
#     bash benchmarks/gpu_check_wheels.sh            # -> .whl/ (git-ignored), about 4 MB
#
# then copy .whl/ next to the checkout on the GPU machine and run there, from the repository root:
#
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#     PYTHONPATH=/tmp/site python3 -P benchmarks/gpu_check.py --out gpu_check_out
#
# The checkout need not be pip-installed: gpu_check.py puts a link named `spikeformers` to it on
# the path. timm is fetched too, pinned to the version the tests ran with, so the GPU machine's
# own timm (whatever its version) does not decide the result.
#
# antlr4-python3-runtime 4.9.3 (the version Hydra 1.3 pins) exists only as a source archive: pip
# builds its pure-Python wheel here. Every other file is a py3-none-any wheel, so the Python and
# platform tags below only keep pip from refusing them for another interpreter.
set -euo pipefail
dest=${1:-.whl}
mkdir -p "$dest"
tags=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps "${tags[@]}" -d "$dest" \
    spikingjelly==2.0.0 hydra-core==1.3.8 omegaconf==2.3.1 loguru==0.7.3 timm==1.0.31
python3 -m pip wheel -q --no-deps --no-binary :all: -w "$dest" antlr4-python3-runtime==4.9.3
ls -l "$dest"
