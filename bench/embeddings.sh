#!/usr/bin/env bash
# Embeddings throughput, opta-lmx next to `llama-server --embedding` on the same GGUF
# (all-MiniLM-L6-v2, float32) and the same threads, one run: inputs/s for 1, 64 and 1,024
# short inputs per request, one client and eight at once, medians of REPEATS alternating
# runs. Target (issue 23): >= 1.0x.
#
#   bench/embeddings.sh            # REPEATS=3; CELLS="1x1 64x8" for only those cells
set -euo pipefail
source "$(dirname "$0")/common.sh"
scripts/fetch-embed-model.sh >/dev/null
EMBED=all-minilm-l6-v2-f32
ln -s "$PWD/target/test-model/$EMBED.gguf" "$DIR/$EMBED.gguf"
THREADS=$(nproc)
PY=target/venv/bin/python

# Both servers up for the whole run; bench/embeddings.py alternates between them cell by cell
# and reports medians of REPEATS.
PORT=$(free_port)
target/release/opta-lmx serve --config "$DIR/config.yaml" --models-dir "$DIR" --port "$PORT" \
  --model "$EMBED" --threads "$THREADS" --log-level warn &
OPTA_PID=$!; OPTA_PORT=$PORT
trap 'kill "$OPTA_PID" 2>/dev/null; cleanup' EXIT
wait_up "$PORT"

PORT=$(free_port)
# Its batch must hold a 512-token input whole (a non-causal model is not split); eight slots
# so eight clients run at once; --embedding pools and normalises as opta-lmx does.
"$TOOLS/llama-server" -m "target/test-model/$EMBED.gguf" --embedding --port "$PORT" \
  -t "$THREADS" -c 4096 -b 2048 -ub 2048 -np 8 --log-disable >/dev/null 2>&1 &
PID=$!; wait_up "$PORT"

"$PY" bench/embeddings.py --opta "http://127.0.0.1:$OPTA_PORT/v1" \
  --llama "http://127.0.0.1:$PORT/v1" --model "$EMBED" --repeats "${REPEATS:-3}" | sed '$d'
kill "$PID" "$OPTA_PID"; wait "$PID" "$OPTA_PID" 2>/dev/null || true
PID=
