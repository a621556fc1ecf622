#!/usr/bin/env bash
# The MLX worker's Python (target/mlx-venv: mlx[cpu], mlx-lm 0.32 whose batch generator the
# worker drives, llguidance for grammars) and the MLX test model, made
# from the Qwen2.5-Coder 0.5B GGUF by scripts/make-mlx-model.py (no MLX model ships on PyPI).
# Idempotent: both are cached under target/.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x target/mlx-venv/bin/python ]; then
  python3 -m venv target/mlx-venv
fi
target/mlx-venv/bin/python -m pip install --quiet --disable-pip-version-check \
  "mlx[cpu]" "mlx-lm>=0.32.2,<0.33" "llguidance>=1.9,<2" gguf tokenizers numpy
OUT=target/test-model/qwen2.5-coder-0.5b-instruct-mlx
if [ ! -f "$OUT/config.json" ]; then
  scripts/fetch-model.sh qwen >/dev/null
  target/mlx-venv/bin/python scripts/make-mlx-model.py \
    target/test-model/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf "$OUT"
fi
echo "MLX model ready: $OUT"
