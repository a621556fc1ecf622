#!/usr/bin/env bash
# Prefill under concurrency: CLIENTS clients each send REQUESTS prompts of their own (a distinct
# ~470-token preamble each, so no prefix cache helps), streaming TOKENS tokens back, against
# opta-lmx and llama-server on the same model (Qwen2.5-Coder 0.5B), sequences and threads, in
# one run. Prints wall time, TTFT p50/p95 and aggregate tokens/s of each and their ratios (the
# target: opta-lmx's wall time and TTFT p50 at most 0.9x llama-server's), and both wall times
# against the compute floor llama-batched-bench measures for the same tokens in the same run.
#
#   bench/prefill.sh          # CLIENTS=6 REQUESTS=3 TOKENS=64 WORDS=360 THREADS=<nproc> ROUNDS=2
set -euo pipefail

CLIENTS=${CLIENTS:-6}
REQUESTS=${REQUESTS:-3}
TOKENS=${TOKENS:-64}
WORDS=${WORDS:-360}
THREADS=${THREADS:-$(nproc)}
CONTEXT=${CONTEXT:-2048}
EXTRA=${EXTRA:-}
# Rounds alternate the two servers; each server's best round is compared, because a shared
# machine's speed drifts by 10-20 % over minutes, more than the differences measured here.
ROUNDS=${ROUNDS:-2}
source "$(dirname "$0")/common.sh"
QWEN=target/test-model/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
scripts/fetch-model.sh qwen "$QWEN" >/dev/null
ln -s "$PWD/$QWEN" "$DIR/qwen.gguf"

measure() {
  local name=$1
  out=$(target/venv/bin/python bench/batching.py --base "http://127.0.0.1:$PORT/v1" --model qwen \
    --clients "$CLIENTS" --requests "$REQUESTS" --tokens "$TOKENS" --distinct-words "$WORDS" \
    --ban 151643,151645)
  echo "$name $out" | tee -a "$DIR/results" >&2
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
}

echo "== $CLIENTS clients x $REQUESTS distinct ~$WORDS-word prompts x $TOKENS tokens, threads $THREADS, $ROUNDS round(s)" >&2
for round in $(seq "$ROUNDS"); do
  PORT=$(free_port)
  target/release/opta-lmx serve --config "$DIR/config.yaml" --models-dir "$DIR" --port "$PORT" \
    --model qwen --parallel "$CLIENTS" --max-queue 64 --context "$CONTEXT" --threads "$THREADS" \
    --log-level warn --no-prompt-cache $EXTRA &
  PID=$!; wait_up "$PORT"; measure opta-lmx
  PORT=$(free_port)
  "$TOOLS/llama-server" -m "$QWEN" --alias qwen --port "$PORT" -t "$THREADS" --parallel "$CLIENTS" \
    -c $((CONTEXT * CLIENTS)) --log-disable >/dev/null 2>&1 &
  PID=$!; wait_up "$PORT"; measure llama-server
done

# The compute floor, in the same run: llama.cpp's own batched bench prefills CLIENTS prompts of
# the same mean length at once and decodes CLIENTS streams, with no server and no waiting. No
# scheduler can serve this load faster than its prompt tokens at that prefill rate plus its
# answer tokens at that decode rate.
NPP=$(python3 -c 'import json,sys; r=json.loads(open(sys.argv[1]).readline().split(" ",1)[1]); print(round(r["prompt_tokens"]/r["requests"]))' "$DIR/results")
"$TOOLS/llama-batched-bench" -m "$QWEN" -t "$THREADS" -c $(((NPP + TOKENS) * CLIENTS + 64)) \
  -npp "$NPP" -ntg "$TOKENS" -npl "$CLIENTS" --output-format jsonl 2>/dev/null | grep "^{" | tail -1 > "$DIR/floor"

python3 - "$DIR/results" "$DIR/floor" <<'PY'
import json, sys
runs = []
for line in open(sys.argv[1]):
    name, js = line.split(" ", 1)
    runs.append((name, json.loads(js)))
f = json.loads(open(sys.argv[2]).read())
print(f"{'server':<14}{'wall s':>8}{'tok/s':>8}{'ttft p50':>10}{'ttft p95':>10}{'errors':>8}")
for name, r in runs:
    print(f"{name:<14}{r['wall_s']:8.1f}{r['aggregate_tps']:8.1f}{r['ttft_p50_ms']:10.0f}{r['ttft_p95_ms']:10.0f}{r['errors']:8d}")
rows = {}
for name, r in runs:  # each server's best round
    if name not in rows or r["wall_s"] < rows[name]["wall_s"]:
        rows[name] = r
print("best round of each:")
o, l = rows["opta-lmx"], rows["llama-server"]
print(f"opta-lmx / llama-server: wall {o['wall_s'] / l['wall_s']:.2f}x, TTFT p50 {o['ttft_p50_ms'] / l['ttft_p50_ms']:.2f}x (target <= 0.90x)")
floor = o["prompt_tokens"] / f["speed_pp"] + o["completion_tokens"] / f["speed_tg"]
print(f"compute floor (llama-batched-bench: prefill {f['speed_pp']:.1f} tok/s, decode x{f['pl']} "
      f"{f['speed_tg']:.1f} tok/s; {o['prompt_tokens']} prompt + {o['completion_tokens']} answer tokens): "
      f"{floor:.1f} s; wall / floor: opta-lmx {o['wall_s'] / floor:.2f}x, llama-server {l['wall_s'] / floor:.2f}x")
PY
