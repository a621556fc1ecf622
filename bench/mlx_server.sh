#!/usr/bin/env bash
# opta-lmx's MLX path next to mlx-lm's own server (`python -m mlx_lm server`, the same venv,
# the same MLX model, the same machine), one run:
#   1. the five-turn agent replay (bench/agent_replay.py): TTFT per turn, then each server
#      restarted and turn 4 sent again (opta-lmx restores the prefix from its disk tier);
#   2. six clients at once, sharing a system prompt and with distinct ones: aggregate tokens/s;
#   3. opta-lmx alone: json_schema-constrained decode rate next to free decode;
#   4. opta-lmx alone: prompt lookup (speculation ngram) next to plain decoding on
#      bench/speculation.py's workloads (an edit that re-emits a file, a story), one stream.
# Targets (issue 22): warm turns <= 0.2x a cold turn and <= mlx_lm.server's warm TTFT;
# after-restart <= 0.2x cold; aggregate >= 1.0x mlx_lm.server; constrained >= 0.9x free.
#
#   bench/mlx_server.sh                 # AGENT_TOOLS=30 TOKENS=16
#   AGENT_TOOLS=2 bench/mlx_server.sh   # Linux CPU: MLX prefills a few tokens a second there
#   ONLY=clients bench/mlx_server.sh    # just the six-client rows, raw
#   ONLY=lookup bench/mlx_server.sh     # just the prompt-lookup rows (LOOKUP_TOKENS=128)
set -euo pipefail
AGENT_TOOLS=${AGENT_TOOLS:-30}
TOKENS=${TOKENS:-16}
LLAMA_TOOLS=0 source "$(dirname "$0")/common.sh"
scripts/fetch-mlx.sh >/dev/null
MLX=target/test-model/qwen2.5-coder-0.5b-instruct-mlx
MPY=target/mlx-venv/bin/python
PY=target/venv/bin/python
ln -s "$PWD/$MLX" "$DIR/qwen-mlx"
CACHE="$DIR/.prompt-cache"

opta() {
  PORT=$(free_port)
  OPTA_LMX_PROMPT_CACHE=true OPTA_LMX_MLX_PYTHON="$MPY" target/release/opta-lmx serve \
    --config "$DIR/config.yaml" --models-dir "$DIR" --port "$PORT" --model qwen-mlx \
    --parallel 6 --context 8192 --log-level warn --prompt-cache-dir "$CACHE" &
  PID=$!; wait_up "$PORT"; NAME=qwen-mlx
}
mlxlm() {
  PORT=$(free_port)
  # The same BLAS opta-lmx preloads into its worker (models.mlx.blas: auto), so the two
  # servers differ only in serving.
  BLAS=$(ls /usr/lib/*-linux-gnu/libopenblas.so.0 2>/dev/null | head -1 || true)
  LD_PRELOAD=${BLAS:-${LD_PRELOAD:-}} "$MPY" -m mlx_lm server --model "$MLX" --port "$PORT" --decode-concurrency 6 \
    --prompt-concurrency 6 --log-level WARNING >/dev/null 2>&1 &
  PID=$!; wait_up "$PORT"; NAME=default_model
}
stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; PID=; }

declare -A REPLAY AFTER CLIENTS
lookup() {
  # The same server, speculation chosen per request: plain decoding, then prompt lookup.
  OPTA_LMX_SPECULATION=ngram opta
  for mode in off ngram; do
    LOOKUP[$mode]=$("$PY" bench/speculation.py --base "http://127.0.0.1:$PORT/v1" --model "$NAME" \
      --tokens "${LOOKUP_TOKENS:-128}" --speculation "$mode")
    echo "lookup $mode: ${LOOKUP[$mode]}" >&2
  done
  stop
  python3 - "${LOOKUP[off]}" "${LOOKUP[ngram]}" <<'PYEOF'
import json, sys
off, on = (json.loads(a) for a in sys.argv[1:])
for w in ("edit", "free"):
    same = "same text" if off[w]["text"] == on[w]["text"] else "TEXT DIFFERS"
    print(f"prompt lookup, {w}: {on[w]['tps']:.2f} tok/s vs plain {off[w]['tps']:.2f}: "
          f"{on[w]['tps'] / off[w]['tps']:.2f}x ({same}; target >= 0.97 on free, > 1 on edit)")
PYEOF
}
declare -A LOOKUP
if [ "${ONLY:-}" = lookup ]; then
  lookup
  exit 0
fi
if [ "${ONLY:-}" = clients ]; then
  # Just the six-client rows, raw: aggregate tokens/s is total tokens over the wall time, so
  # the tokens each server generated (an early end of text) and the TTFTs are shown too.
  for server in opta mlxlm; do
    $server
    echo "$server: $("$PY" bench/mlx_server.py --base "http://127.0.0.1:$PORT/v1" --model "$NAME" --tokens "$TOKENS" clients)"
    stop
  done
  exit 0
fi
for server in opta mlxlm; do
  echo "== $server: agent replay ($AGENT_TOOLS tools)" >&2
  $server
  REPLAY[$server]=$("$PY" bench/agent_replay.py --base "http://127.0.0.1:$PORT/v1" --model "$NAME" --tools "$AGENT_TOOLS")
  stop; $server
  answers=$(echo "${REPLAY[$server]}" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["answers"]))')
  AFTER[$server]=$("$PY" bench/agent_replay.py --base "http://127.0.0.1:$PORT/v1" --model "$NAME" --tools "$AGENT_TOOLS" --only-turn 4 --answers "$answers")
  echo "== $server: six clients" >&2
  CLIENTS[$server]=$("$PY" bench/mlx_server.py --base "http://127.0.0.1:$PORT/v1" --model "$NAME" --tokens "$TOKENS" clients)
  if [ "$server" = opta ]; then
    echo "== opta: constrained decode" >&2
    GRAMMAR=$("$PY" bench/mlx_server.py --base "http://127.0.0.1:$PORT/v1" --model "$NAME" --tokens "$TOKENS" grammar)
  fi
  stop
done

python3 - "${REPLAY[opta]}" "${REPLAY[mlxlm]}" "${AFTER[opta]}" "${AFTER[mlxlm]}" \
  "${CLIENTS[opta]}" "${CLIENTS[mlxlm]}" "$GRAMMAR" <<'PYEOF'
import json, sys
ro, rm, ao, am, co, cm, g = (json.loads(a) for a in sys.argv[1:])
print("turn | opta-lmx TTFT ms (cached/prompt) | mlx_lm.server TTFT ms (cached/prompt)")
for i, (a, b) in enumerate(zip(ro["turns"], rm["turns"]), 1):
    print(f"{i} | {a['ttft_ms']:.0f} ({a['cached_tokens']}/{a['prompt_tokens']}) | {b['ttft_ms']:.0f} ({b['cached_tokens']}/{b['prompt_tokens']})")
print(f"4 after restart | {ao['ttft_ms']:.0f} ({ao['cached_tokens']}/{ao['prompt_tokens']}) | {am['ttft_ms']:.0f} ({am['cached_tokens']}/{am['prompt_tokens']})")
cold_o, cold_m = ro["turns"][0]["ttft_ms"], rm["turns"][0]["ttft_ms"]
warm_o = max(t["ttft_ms"] for t in ro["turns"][1:])
warm_m = max(t["ttft_ms"] for t in rm["turns"][1:])
print(f"worst warm turn / cold turn: opta-lmx {warm_o / cold_o:.2f}x (target <= 0.2), mlx_lm.server {warm_m / cold_m:.2f}x")
print(f"worst warm turn opta-lmx / mlx_lm.server: {warm_o / warm_m:.2f}x (target <= 1.0)")
print(f"after restart / cold: opta-lmx {ao['ttft_ms'] / cold_o:.2f}x (target <= 0.2), mlx_lm.server {am['ttft_ms'] / cold_m:.2f}x")
for kind in ["shared", "distinct"]:
    a, b = co[kind]["aggregate_tps"], cm[kind]["aggregate_tps"]
    print(f"six clients, {kind} prompts: opta-lmx {a:.2f} tok/s ({co[kind]['tokens']} tokens in {co[kind]['wall_s']:.0f} s), "
          f"mlx_lm.server {b:.2f} tok/s ({cm[kind]['tokens']} in {cm[kind]['wall_s']:.0f} s): {a / b:.2f}x (target >= 1.0)")
print(f"constrained decode {g['constrained_tps']:.2f} tok/s vs free {g['free_tps']:.2f}: {g['constrained_tps'] / g['free_tps']:.2f}x (target >= 0.9)")
PYEOF
lookup
