#!/usr/bin/env bash
# The default thread count (issue 25): llama.cpp's prefill (pp512) and decode (tg64) rates on
# Qwen2.5-Coder 0.5B at 1..N threads, alone and beside BUSY other processes that each keep one
# core busy (another server, a build, a browser). llama.cpp's threads spin at every barrier
# while they wait for each other, so a thread that loses its core to another process stalls all
# of them: what a default must survive on a shared machine.
#
#   bench/threads.sh                 # THREADS="1 2 .. nproc" BUSY="0 1" REPS=3
set -euo pipefail
cd "$(dirname "$0")/.."
N=$(nproc)
THREADS=${THREADS:-$(seq -s ' ' 1 "$N")}
BUSY=${BUSY:-0 1}
REPS=${REPS:-3}
TOOLS=$(bench/build-llama-tools.sh)
QWEN=target/test-model/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
scripts/fetch-model.sh qwen "$QWEN" >/dev/null
HOGS=()
stop_hogs() { for p in "${HOGS[@]}"; do kill "$p" 2>/dev/null || true; done; HOGS=(); }
trap stop_hogs EXIT
echo "cores: $N; model: $QWEN; tokens/s (mean of $REPS)"
printf "%-6s %-8s %10s %10s\n" busy threads pp512 tg64
for busy in $BUSY; do
  for _ in $(seq 1 "$busy"); do (while :; do :; done) & HOGS+=($!); done
  for t in $THREADS; do
    out=$("$TOOLS/llama-bench" -m "$QWEN" -t "$t" -p 512 -n 64 -r "$REPS" -o json 2>/dev/null)
    python3 - "$busy" "$t" "$out" <<'PY'
import json, sys
busy, t, rows = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
pp = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0)
tg = next(r["avg_ts"] for r in rows if r["n_gen"] > 0)
print(f"{busy:<6} {t:<8} {pp:10.1f} {tg:10.1f}")
PY
  done
  stop_hogs
done
