#!/usr/bin/env bash
# MLX worker next to llama.cpp on the same model (bench/mlx.py): single-stream and six-client
# decode tokens/s, and the worker's idle memory. Qwen2.5-Coder 0.5B (MLX copy in float32).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-mlx.sh >/dev/null
cargo build --release --quiet
python3 bench/mlx.py target/release/opta-lmx target/test-model/qwen2.5-coder-0.5b-instruct-mlx \
  target/test-model/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf target/mlx-venv/bin/python "$@"
