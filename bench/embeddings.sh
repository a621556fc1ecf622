#!/usr/bin/env bash
# Embeddings throughput, opta-lmx next to `llama-server --embedding` on the same GGUF
# (all-MiniLM-L6-v2, float32) and the same threads, one run: inputs/s for 1, 64 and 1,024
# short inputs per request, one client and eight at once. Target (issue 23): >= 1.0x.
#
#   bench/embeddings.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
scripts/fetch-embed-model.sh >/dev/null
EMBED=all-minilm-l6-v2-f32
ln -s "$PWD/target/test-model/$EMBED.gguf" "$DIR/$EMBED.gguf"
THREADS=$(nproc)
PY=target/venv/bin/python

PORT=$(free_port)
target/release/opta-lmx serve --config "$DIR/config.yaml" --models-dir "$DIR" --port "$PORT" \
  --model "$EMBED" --threads "$THREADS" --log-level warn &
PID=$!; wait_up "$PORT"
OPTA=$("$PY" bench/embeddings.py --base "http://127.0.0.1:$PORT/v1" --model "$EMBED")
kill "$PID"; wait "$PID" 2>/dev/null || true

PORT=$(free_port)
# Its batch must hold a 512-token input whole (a non-causal model is not split); eight slots
# so eight clients run at once; --embedding pools and normalises as opta-lmx does.
"$TOOLS/llama-server" -m "target/test-model/$EMBED.gguf" --embedding --port "$PORT" \
  -t "$THREADS" -c 4096 -b 2048 -ub 2048 -np 8 --log-disable >/dev/null 2>&1 &
PID=$!; wait_up "$PORT"
LLAMA=$("$PY" bench/embeddings.py --base "http://127.0.0.1:$PORT/v1" --model "$EMBED")
kill "$PID"; wait "$PID" 2>/dev/null || true
PID=

python3 - "$OPTA" "$LLAMA" <<'PY'
import json, sys
o, l = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print("inputs x clients | opta-lmx inputs/s (tokens/s) | llama-server inputs/s (tokens/s) | ratio")
for k in o:
    print(f"{k:>16} | {o[k]['inputs_per_s']:8.1f} ({o[k]['tokens_per_s']:7.0f}) | "
          f"{l[k]['inputs_per_s']:8.1f} ({l[k]['tokens_per_s']:7.0f}) | {o[k]['inputs_per_s'] / l[k]['inputs_per_s']:.2f}x")
PY
