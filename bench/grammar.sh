#!/usr/bin/env bash
# Decode speed under a JSON-schema grammar next to free text (bench/grammar.py), Qwen 0.5B.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh qwen >/dev/null
cargo build --release --quiet
python3 bench/grammar.py target/release/opta-lmx target/test-model/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf "$@"
