#!/usr/bin/env bash
# Agent-turn latency: five turns of a coding-CLI-shaped conversation (30 tools, growing
# history) on Qwen2.5-Coder 0.5B, TTFT per turn, against opta-lmx and llama-server (same
# model, threads, context), then each server restarted and turn 4 sent again. opta-lmx's
# prompt cache writes the prefix to disk at shutdown and restores it; llama-server starts
# cold. Prints the table and the ratios the design targets (warm turns and the after-restart
# turn at most 0.2x a cold turn; after-restart at most 0.2x llama-server's).
#
#   bench/agent_replay.sh            # THREADS=<nproc> CONTEXT=8192 SIZE=0.5b
#   SIZE=1.5b bench/agent_replay.sh  # the same on Qwen2.5-Coder 1.5B
set -euo pipefail
THREADS=${THREADS:-$(nproc)}
CONTEXT=${CONTEXT:-8192}
SIZE=${SIZE:-0.5b}
source "$(dirname "$0")/common.sh"
case "$SIZE" in
  0.5b) QWEN=target/test-model/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf; scripts/fetch-model.sh qwen "$QWEN" >/dev/null ;;
  1.5b) QWEN=target/test-model/qwen2.5-coder-1.5b-instruct.gguf; scripts/fetch-model.sh qwen15 "$QWEN" >/dev/null ;;
  *) echo "SIZE is 0.5b or 1.5b" >&2; exit 2 ;;
esac
echo "== Qwen2.5-Coder $SIZE, threads $THREADS" >&2
ln -s "$PWD/$QWEN" "$DIR/qwen.gguf"
CACHE="$DIR/.prompt-cache"
PY=target/venv/bin/python

opta() {
  PORT=$(free_port)
  OPTA_LMX_PROMPT_CACHE=true target/release/opta-lmx serve --config "$DIR/config.yaml" --models-dir "$DIR" --port "$PORT" \
    --model qwen --parallel 2 --context "$CONTEXT" --threads "$THREADS" --log-level warn \
    --prompt-cache-dir "$CACHE" &
  PID=$!; wait_up "$PORT"
}
llama() {
  PORT=$(free_port)
  "$TOOLS/llama-server" -m "$QWEN" --alias qwen --port "$PORT" -t "$THREADS" --parallel 2 \
    -c $((CONTEXT * 2)) --jinja --log-disable >/dev/null 2>&1 &
  PID=$!; wait_up "$PORT"
}
stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; PID=; }

for server in opta llama; do
  $server
  $PY bench/agent_replay.py --base "http://127.0.0.1:$PORT/v1" > "$DIR/$server.json"
  stop
  $server
  # Turn 4 again, after the restart: the same request bytes.
  answers=$(python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["answers"]))' "$DIR/$server.json")
  $PY bench/agent_replay.py --base "http://127.0.0.1:$PORT/v1" --only-turn 4 --answers "$answers" > "$DIR/$server-restart.json"
  stop
done

python3 - "$DIR" <<'PY'
import json, sys, os
d = sys.argv[1]
res = {}
for s in ("opta", "llama"):
    run = json.load(open(os.path.join(d, f"{s}.json")))["turns"]
    after = json.load(open(os.path.join(d, f"{s}-restart.json")))
    res[s] = (run, after)
    print(f"{'opta-lmx' if s == 'opta' else 'llama-server'}")
    for i, t in enumerate(run, 1):
        print(f"  turn {i}: TTFT {t['ttft_ms']:8.0f} ms  prompt {t['prompt_tokens']:5d}  cached {t['cached_tokens']:5d}")
    print(f"  turn 4 after restart: TTFT {after['ttft_ms']:8.0f} ms  prompt {after['prompt_tokens']:5d}  cached {after['cached_tokens']:5d}")
o, l = res["opta"], res["llama"]
cold = o[0][0]["ttft_ms"]
warm = [t["ttft_ms"] for t in o[0][1:]]
print(f"opta-lmx warm turns / cold turn: {', '.join(f'{w / cold:.2f}x' for w in warm)} (target <= 0.20x)")
print(f"opta-lmx after restart / cold turn: {o[1]['ttft_ms'] / cold:.2f}x (target <= 0.20x)")
print(f"opta-lmx after restart / llama-server after restart: {o[1]['ttft_ms'] / l[1]['ttft_ms']:.2f}x (target <= 0.20x)")
PY
