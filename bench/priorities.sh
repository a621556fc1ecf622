#!/usr/bin/env bash
# Priorities between clients (issue 24), FIFO (requests.priorities off) against on, in one run,
# on Qwen2.5-Coder 0.5B:
#  - six bots keep every sequence busy with long answers while a coding-agent turn (30 tools,
#    ~4k-token prompt, x-priority high) arrives every GAP seconds: the turns' time to first
#    token against the same turns on an idle server (target with priorities on: <= 1.3x), and
#    the bots' aggregate tokens/s (target on: >= 0.9x FIFO's; also against the bots alone,
#    no agent, over the same window);
#  - one client floods 20 requests, then five clients send one each: each of the five's
#    tokens/s against an equal share of everyone's (target on: >= 0.8x).
#
#   bench/priorities.sh                  # PARALLEL=4 TURNS=5 GAP=20 THREADS=<nproc>
#   ONLY=flood bench/priorities.sh       # just the flood part (ONLY=agent: just the other)
set -euo pipefail
THREADS=${THREADS:-$(nproc)}
PARALLEL=${PARALLEL:-4}
TURNS=${TURNS:-5}
GAP=${GAP:-20}
ONLY=${ONLY:-}
LLAMA_TOOLS=0
source "$(dirname "$0")/common.sh"
QWEN=target/test-model/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
scripts/fetch-model.sh qwen "$QWEN" >/dev/null
ln -s "$PWD/$QWEN" "$DIR/qwen.gguf"
target/venv/bin/python -m pip install --quiet --disable-pip-version-check httpx
PY="../target/venv/bin/python priorities.py"

# A fresh server (fresh disk tier: the product's default, on) with priorities on or off.
serve() { # priorities parallel context
  PORT=$(free_port)
  rm -rf "$DIR/.prompt-cache"
  OPTA_LMX_PROMPT_CACHE=true OPTA_LMX_PRIORITIES=$1 target/release/opta-lmx serve \
    --config "$DIR/config.yaml" --models-dir "$DIR" --port "$PORT" --model qwen \
    --parallel "$2" --context "$3" --threads "$THREADS" --log-level warn \
    --prompt-cache-dir "$DIR/.prompt-cache" &
  PID=$!; wait_up "$PORT"
}
stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; PID=; }
BASE() { echo "http://127.0.0.1:$PORT/v1"; }

if [ "$ONLY" != flood ]; then
  echo "== agent turns beside six bots: parallel $PARALLEL, $TURNS turns every $GAP s, threads $THREADS" >&2
  serve true "$PARALLEL" 6144
  (cd bench && $PY --base "$(BASE)" --phase agent --idle --turns "$TURNS") > "$DIR/idle.json"
  stop
  serve true "$PARALLEL" 6144
  (cd bench && $PY --base "$(BASE)" --phase agent --bots-only --parallel "$PARALLEL" --turns "$TURNS" --gap "$GAP") > "$DIR/bots.json"
  stop
  for mode in false true; do
    serve "$mode" "$PARALLEL" 6144
    (cd bench && $PY --base "$(BASE)" --phase agent --parallel "$PARALLEL" --turns "$TURNS" --gap "$GAP") > "$DIR/agent-$mode.json"
    stop
  done
fi
if [ "$ONLY" != agent ]; then
  echo "== one client floods 20 requests beside five sending one: parallel 6" >&2
  for mode in false true; do
    serve "$mode" 6 1024
    (cd bench && $PY --base "$(BASE)" --phase flood --parallel 6) > "$DIR/flood-$mode.json"
    stop
  done
fi

python3 - "$DIR" "$ONLY" <<'PY'
import json, os, sys, statistics
d, only = sys.argv[1], sys.argv[2]
load = lambda n: json.load(open(os.path.join(d, n)))
if only != "flood":
    idle = load("idle.json")["turns"]
    print("agent turn TTFT (ms): idle | FIFO | priorities on   (prompt tokens, cached on)")
    runs = {m: load(f"agent-{m}.json") for m in ("false", "true")}
    for i, t in enumerate(idle):
        f, o = runs["false"]["turns"][i], runs["true"]["turns"][i]
        print(f"  turn {i + 1}: {t['ttft_ms']:8.0f} | {f['ttft_ms']:8.0f} | {o['ttft_ms']:8.0f}   ({o['prompt_tokens']}, {o['cached_tokens']})")
    for m, name in (("false", "FIFO"), ("true", "priorities on")):
        ratios = [r["ttft_ms"] / t["ttft_ms"] for r, t in zip(runs[m]["turns"], idle)]
        print(f"{name}: agent TTFT / idle: median {statistics.median(ratios):.2f}x, worst {max(ratios):.2f}x"
              f"{' (target <= 1.3x)' if m == 'true' else ''}; bots {runs[m]['bot_tokens_per_s']:.1f} tok/s"
              f" over {runs[m]['window_s']:.0f} s (until the last turn was done)")
    alone = load("bots.json")["bot_tokens_per_s"]
    print(f"bots alone (no agent turns): {alone:.1f} tok/s; FIFO {runs['false']['bot_tokens_per_s'] / alone:.2f}x of it, "
          f"priorities on {runs['true']['bot_tokens_per_s'] / alone:.2f}x")
    print(f"bots' tokens/s, on / FIFO: {runs['true']['bot_tokens_per_s'] / runs['false']['bot_tokens_per_s']:.2f}x (target >= 0.9x)")
if only != "agent":
    for m, name in (("false", "FIFO"), ("true", "priorities on")):
        r = load(f"flood-{m}.json")
        share = r["equal_share_tokens_per_s"]
        ratios = {k: v / share for k, v in sorted(r["quiet_tokens_per_s"].items())}
        print(f"{name}: flood: equal share {share:.1f} tok/s; the five: "
              + ", ".join(f"{v:.2f}x" for v in ratios.values())
              + f"; worst {min(ratios.values()):.2f}x{' (target >= 0.8x)' if m == 'true' else ''}")
PY
