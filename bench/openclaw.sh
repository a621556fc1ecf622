#!/usr/bin/env bash
# Six OpenClaw-shaped bots (12 tools, ~11k-token prompts of which 1.9k shared, turns back to
# back) on Qwen2.5-Coder 0.5B against opta-lmx and llama-server (same model, threads, sequences
# and context per sequence): TTFT p50/p95 per call and the aggregate tokens/s, with the ratios.
# Issue 25: cached and short requests must not wait behind other bots' cold prefills.
#
#   bench/openclaw.sh          # BOTS=6 TURNS=2 PROMPT=11000 SHARED=1900 PARALLEL=4 THREADS=<default>
#   PROMPT=3000 bench/openclaw.sh    # the same shape, shorter (a 2-core machine: minutes, not an hour)
set -euo pipefail
BOTS=${BOTS:-6}
TURNS=${TURNS:-2}
PROMPT=${PROMPT:-11000}
SHARED=${SHARED:-1900}
PARALLEL=${PARALLEL:-4}
source "$(dirname "$0")/common.sh"
# Both servers get the thread count opta-lmx picks by default (physical cores less one).
THREADS=${THREADS:-$(python3 -c 'import os; n=os.cpu_count(); print(max(1, n - 1))')}
QWEN=target/test-model/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
scripts/fetch-model.sh qwen "$QWEN" >/dev/null
ln -s "$PWD/$QWEN" "$DIR/qwen.gguf"
CONTEXT=$((PROMPT + PROMPT / 4 + 1024))
PY=target/venv/bin/python
echo "== $BOTS bots x $TURNS turns, ~$PROMPT-token prompts ($SHARED shared), parallel $PARALLEL, context $CONTEXT per sequence, threads $THREADS" >&2

# opta-lmx as shipped: its disk tier of prompt prefixes on (common.sh turns it off for the
# benches that measure cold prefill), beside llama-server's own RAM cache of slot prompts.
opta() {
  PORT=$(free_port)
  OPTA_LMX_PROMPT_CACHE=true target/release/opta-lmx serve --prompt-cache-dir "$DIR/.prompt-cache" --config "$DIR/config.yaml" --models-dir "$DIR" --port "$PORT" \
    --model qwen --parallel "$PARALLEL" --context "$CONTEXT" --threads "$THREADS" --log-level warn &
  PID=$!; wait_up "$PORT"
}
llama() {
  PORT=$(free_port)
  "$TOOLS/llama-server" -m "$QWEN" --alias qwen --port "$PORT" -t "$THREADS" --parallel "$PARALLEL" \
    -c $((CONTEXT * PARALLEL)) --jinja --log-disable >/dev/null 2>&1 &
  PID=$!; wait_up "$PORT"
}
stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; PID=; }
for server in opta llama; do
  $server
  $PY bench/openclaw.py --base "http://127.0.0.1:$PORT/v1" --bots "$BOTS" --turns "$TURNS" \
    --prompt "$PROMPT" --shared "$SHARED" > "$DIR/$server.json"
  stop
done

python3 - "$DIR" <<'PY'
import json, os, statistics, sys
d = sys.argv[1]
res = {s: json.load(open(os.path.join(d, f"{s}.json"))) for s in ("opta", "llama")}
def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]
for s, name in (("opta", "opta-lmx"), ("llama", "llama-server")):
    r = res[s]
    for turn in sorted({c["turn"] for c in r["calls"]}):
        t = [c["ttft_ms"] for c in r["calls"] if c["turn"] == turn]
        cached = sum(c["cached_tokens"] for c in r["calls"] if c["turn"] == turn)
        prompt = sum(c["prompt_tokens"] for c in r["calls"] if c["turn"] == turn)
        print(f"{name:12s} turn {turn + 1}: TTFT p50 {pct(t, 50):8.0f} ms  p95 {pct(t, 95):8.0f} ms  cached {cached}/{prompt} tokens")
    all_t = [c["ttft_ms"] for c in r["calls"]]
    print(f"{name:12s} all calls: TTFT p50 {pct(all_t, 50):8.0f} ms  p95 {pct(all_t, 95):8.0f} ms; {r['tokens_per_s']:.2f} tokens/s over {r['seconds']:.0f} s")
o, l = res["opta"], res["llama"]
ot, lt = [c["ttft_ms"] for c in o["calls"]], [c["ttft_ms"] for c in l["calls"]]
print(f"opta-lmx / llama-server: TTFT p50 {pct(ot, 50) / pct(lt, 50):.2f}x, p95 {pct(ot, 95) / pct(lt, 95):.2f}x; tokens/s {o['tokens_per_s'] / l['tokens_per_s']:.2f}x")
PY
