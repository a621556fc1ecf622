#!/usr/bin/env bash
# Single-stream decode: opta-lmx (one sequence, streamed through the HTTP API and the openai
# SDK) against llama-bench's `tg` test on the same model and threads, measured in one run.
#
#   bench/single_stream.sh            # THREADS=<n> TOKENS=<n> RUNS=<n> to change
set -euo pipefail

THREADS=${THREADS:-$(nproc)}
TOKENS=${TOKENS:-128}
RUNS=${RUNS:-3}
source "$(dirname "$0")/common.sh"

echo "== llama-bench -p 0 -n $TOKENS -t $THREADS -r $RUNS"
LB=$("$TOOLS/llama-bench" -m "$MODEL" -p 0 -n "$TOKENS" -t "$THREADS" -r "$RUNS" -o json 2>/dev/null)
LB_TPS=$(echo "$LB" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["avg_ts"])')
echo "llama-bench tg$TOKENS: $LB_TPS tokens/s"

PORT=$(free_port)
target/release/opta-lmx serve --config "$DIR/config.yaml" --models-dir "$DIR" --port "$PORT" \
  --model gemma-3-270m-q4_k_m --parallel 1 --context 1024 --threads "$THREADS" --log-level warn &
PID=$!
wait_up "$PORT"

echo "== opta-lmx, 1 stream, $TOKENS tokens, $RUNS runs"
OUT=$(target/venv/bin/python bench/single_stream.py --base "http://127.0.0.1:$PORT/v1" --tokens "$TOKENS" --runs "$RUNS")
echo "$OUT"
python3 - "$LB_TPS" "$OUT" <<'PY'
import json, sys
lb = float(sys.argv[1]); srv = json.loads(sys.argv[2])["decode_tps_mean"]
print(f"opta-lmx decode: {srv:.1f} tokens/s   llama-bench tg: {lb:.1f} tokens/s   ratio: {srv/lb:.2f}x")
PY
