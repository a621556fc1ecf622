#!/usr/bin/env bash
# Concurrent streaming clients against three servers on the same model and threads, in one run:
#   1. opta-lmx with batching off (--parallel 1: one request at a time, the rest queued),
#   2. opta-lmx with batching on (--parallel N),
#   3. llama-server --parallel N, built from the same llama.cpp tree (bench/build-llama-tools.sh).
# Each gets two loads: plain prompts, and prompts sharing a ~500-token system prompt (plus an
# idle cold-vs-cached TTFT probe). Prints a table and the ratios the design targets.
#
#   bench/batching.sh        # CLIENTS=6 REQUESTS=4 TOKENS=64 SHARED_WORDS=480 THREADS=<nproc>
#   EXTRA="--batch-invariant" bench/batching.sh    # extra opta-lmx serve flags
set -euo pipefail

CLIENTS=${CLIENTS:-6}
REQUESTS=${REQUESTS:-4}
TOKENS=${TOKENS:-64}
SHARED_WORDS=${SHARED_WORDS:-480}
THREADS=${THREADS:-$(nproc)}
CONTEXT=${CONTEXT:-2048}
EXTRA=${EXTRA:-}
source "$(dirname "$0")/common.sh"

# run NAME: loads against the server on $PORT, results appended to $DIR/results
run() {
  local name=$1
  for shared in 0 "$SHARED_WORDS"; do
    local probe=""
    [ "$shared" != 0 ] && probe="--probe"
    out=$(target/venv/bin/python bench/batching.py --base "http://127.0.0.1:$PORT/v1" \
      --clients "$CLIENTS" --requests "$REQUESTS" --tokens "$TOKENS" --shared-words "$shared" $probe)
    echo "$name shared=$shared $out" | tee -a "$DIR/results" >&2
  done
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
}

serve_opta() {
  PORT=$(free_port)
  target/release/opta-lmx serve --config "$DIR/config.yaml" --models-dir "$DIR" --port "$PORT" \
    --model gemma-3-270m-q4_k_m --parallel "$1" --max-queue 64 --context "$CONTEXT" \
    --threads "$THREADS" --log-level warn --no-prompt-cache $EXTRA &
  PID=$!; wait_up "$PORT"
}

echo "== $CLIENTS clients x $REQUESTS requests x $TOKENS tokens, threads $THREADS" >&2
serve_opta 1; run one-at-a-time
serve_opta "$CLIENTS"; run opta-lmx
PORT=$(free_port)
"$TOOLS/llama-server" -m "$MODEL" --port "$PORT" -t "$THREADS" --parallel "$CLIENTS" \
  -c $((CONTEXT * CLIENTS)) --log-disable >/dev/null 2>&1 &
PID=$!; wait_up "$PORT"; run llama-server

python3 - "$DIR/results" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    name, shared, js = line.split(" ", 2)
    rows[(name, shared.split("=")[1] != "0")] = json.loads(js)
print(f"{'server':<16}{'shared':>7}{'tok/s':>9}{'ttft p50':>10}{'ttft p95':>10}{'errors':>8}{'cached':>8}{'cold ms':>9}{'warm ms':>9}")
for (name, shared), r in rows.items():
    probe = f"{r['cold_ttft_ms']:9.0f}{r['cached_ttft_ms']:9.0f}" if "cold_ttft_ms" in r else ""
    print(f"{name:<16}{str(shared):>7}{r['aggregate_tps']:9.1f}{r['ttft_p50_ms']:10.0f}{r['ttft_p95_ms']:10.0f}{r['errors']:8d}{r['cached_tokens']:8d}{probe}")
for shared in (False, True):
    o, b, l = (rows[(n, shared)] for n in ("opta-lmx", "one-at-a-time", "llama-server"))
    tag = "shared prompt" if shared else "plain prompts"
    print(f"[{tag}] batching vs one-at-a-time: {o['aggregate_tps']/b['aggregate_tps']:.2f}x   "
          f"vs llama-server: {o['aggregate_tps']/l['aggregate_tps']:.2f}x   "
          f"TTFT p95 vs llama-server: {o['ttft_p95_ms']/l['ttft_p95_ms']:.2f}x")
o = rows[("opta-lmx", True)]
print(f"[prefix cache] cached TTFT / cold TTFT: opta-lmx {o['cached_over_cold']:.2f}   "
      f"llama-server {rows[('llama-server', True)]['cached_over_cold']:.2f}")
PY
