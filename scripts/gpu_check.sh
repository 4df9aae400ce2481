#!/usr/bin/env bash
# One command for a CUDA machine: builds a Qwen2.5-0.5B-shaped model (real vocabulary, random weights)
# offline, runs 3 IGPO steps with vLLM on CUDA and the adapter sync through the normal training path, and
# prints the step-time split (time/rollout_s, probe_s, update_s, sync_s, ...) and peak GPU memory.
#   bash scripts/gpu_check.sh                      # defaults (8 questions x 4 episodes, 3 turns, 256 tokens)
#   bash scripts/gpu_check.sh --steps 5 data.group_size=8   # any Hydra override
# Without a GPU it stops at once; `python scripts/gpu_check.py --dry-run` prints the composed run on any machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: needs a CUDA GPU (nvidia-smi lists none). To see the run it would start: $PY scripts/gpu_check.py --dry-run" >&2
  exit 2
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: needs a CUDA GPU, but torch in $PY cannot use it (a CPU build?). Install this machine's" \
       "environment with scripts/install.sh (it picks the 'vllm' extra on CUDA machines)." >&2
  exit 2
fi
"$PY" -c "import vllm, dashscope" 2>/dev/null || {
  echo "gpu_check: vllm or dashscope (the 'models' extra) is missing in $PY; run scripts/install.sh" >&2; exit 2; }
exec "$PY" scripts/gpu_check.py "$@"
