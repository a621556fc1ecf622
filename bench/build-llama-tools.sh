#!/usr/bin/env bash
# Builds llama-bench, llama-batched-bench, llama-server and llama-quantize with the same native-minus-AMX flags
# as opta-lmx, into target/llama-tools. The llama-cpp-sys-2 crate ships llama.cpp without its
# tools, so the tree comes from the llama-cpp-python sdist on PyPI, which vendors all of it (a
# llama.cpp of about the same date; the version is printed so results can say which).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=target/llama-tools
if [ -x "$OUT/bin/llama-bench" ] && [ -x "$OUT/bin/llama-server" ] && [ -x "$OUT/bin/llama-batched-bench" ] \
  && [ -x "$OUT/bin/llama-quantize" ]; then
  echo "$OUT/bin"
  exit 0
fi
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
CACHE=target/wheel-cache
mkdir -p "$CACHE" target/llama-src
if [ ! -f "$CACHE/llama_cpp_python-$VERSION.tar.gz" ]; then
  python3 -m pip download --quiet --no-deps --no-binary :all: -d "$CACHE" "llama-cpp-python==$VERSION" >&2
fi
if [ ! -d "target/llama-src/llama_cpp_python-$VERSION" ]; then
  tar -xzf "$CACHE/llama_cpp_python-$VERSION.tar.gz" -C target/llama-src
fi
SRC=target/llama-src/llama_cpp_python-$VERSION/vendor/llama.cpp
echo "llama.cpp from llama-cpp-python $VERSION" >&2
FLAGS="-march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$SRC" -B "$OUT" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
  -DCMAKE_C_FLAGS="$FLAGS" -DCMAKE_CXX_FLAGS="$FLAGS" \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$OUT" --target llama-bench llama-server llama-batched-bench llama-quantize -j "$(nproc)" >&2
echo "$OUT/bin"
