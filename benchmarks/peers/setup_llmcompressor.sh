#!/usr/bin/env bash
# Build the virtualenv llm-compressor runs in as a peer tool (benchmarks/peers/llmcompressor_gptq.py).
# Usage: bash benchmarks/peers/setup_llmcompressor.sh [VENV_DIR]   (default .peers/llmc-venv)
#
# A venv of its own: llmcompressor 0.14.0.1 pins transformers<=5.17.0 and compressed-tensors==0.19.0,
# while lowbit's venv has transformers 5.24 and compressed-tensors 0.20. torch is installed first and
# pinned to the CPU wheel (an unpinned torch would pull the CUDA build); the versions below are the
# set that installed and ran here (Python 3.11, CPU only), so the peer's numbers are reproducible.
set -euo pipefail

VENV="${1:-.peers/llmc-venv}"
PYTHON="${PYTHON:-python3.11}"
TORCH="torch==2.13.0"
PINS=(
  "llmcompressor==0.14.0.1"
  "compressed-tensors==0.19.0"
  "transformers==5.17.0"
  "datasets==5.2.0"
  "accelerate==1.15.0"
)

start=$(date +%s)
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet "$TORCH"
# Keep torch where it is while the rest resolves (llmcompressor allows torch>=2.10,<=2.14.0).
"$VENV/bin/pip" install --quiet "${PINS[@]}" "$TORCH"
"$VENV/bin/pip" check
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VENV/bin/python" - <<'EOF'
import compressed_tensors, llmcompressor, torch, transformers
from llmcompressor import oneshot  # noqa: F401
from llmcompressor.modifiers.quantization import GPTQModifier  # noqa: F401
print(f"llmcompressor {llmcompressor.__version__}, compressed-tensors {compressed_tensors.__version__}, "
      f"transformers {transformers.__version__}, torch {torch.__version__}")
EOF
echo "peer venv ready at $VENV in $(( $(date +%s) - start )) s"
