#!/usr/bin/env bash
# Speculative decoding on Qwen2.5-Coder 1.5B (target) with the 0.5B as draft, in one run:
# opta-lmx with speculation off, n-gram and draft (adaptive, the default), the same two
# verifying every proposal (--speculation-always, to show what blind speculation costs here),
# and llama-server plain, with n-gram (ngram-simple) and with the draft, on the same models
# and threads. Workloads (bench/speculation.py): an edit that re-emits a file, and free
# writing; one stream and STREAMS streams at once; greedy, TOKENS tokens.
# Prints decode tokens/s and each mode's ratio to its own server's plain mode (the target:
# opta-lmx never more than 3 % below off, and ahead of llama-server's same mode).
#
#   bench/speculation.sh        # TOKENS=256 STREAMS=4 THREADS=<nproc> DRAFT_MAX=8
#   MODES="opta-off llama-off" bench/speculation.sh    # only these rows
set -euo pipefail
MODES=${MODES:-}
wanted() { [ -z "$MODES" ] || [[ " $MODES " == *" $1 "* ]]; }
TOKENS=${TOKENS:-256}
STREAMS=${STREAMS:-4}
THREADS=${THREADS:-$(nproc)}
DRAFT_MAX=${DRAFT_MAX:-8}
source "$(dirname "$0")/common.sh"
TARGET=target/test-model/qwen2.5-coder-1.5b-instruct.gguf
DRAFT=target/test-model/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
scripts/fetch-model.sh qwen15 "$TARGET" >/dev/null
scripts/fetch-model.sh qwen "$DRAFT" >/dev/null
ln -s "$PWD/$TARGET" "$DIR/coder-1.5b.gguf"
ln -s "$PWD/$DRAFT" "$DIR/coder-0.5b.gguf"
CONTEXT=2048

run() { # name streams
  target/venv/bin/python bench/speculation.py --base "http://127.0.0.1:$PORT/v1" \
    --model coder-1.5b --tokens "$TOKENS" --streams "$2" | sed "s/^/$1 $2 /" >> "$DIR/results"
  tail -1 "$DIR/results" >&2
}

opta() { # name, then serve flags
  local name=$1; shift
  wanted "$name" || return 0
  PORT=$(free_port)
  target/release/opta-lmx serve --config "$DIR/config.yaml" --models-dir "$DIR" --port "$PORT" \
    --model coder-1.5b --parallel "$STREAMS" --context "$CONTEXT" --threads "$THREADS" \
    --draft-max "$DRAFT_MAX" --log-level warn --no-prompt-cache "$@" &
  PID=$!; wait_up "$PORT"
  run "$name" 1; run "$name" "$STREAMS"
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
}

llama() { # name, then llama-server flags
  local name=$1; shift
  wanted "$name" || return 0
  PORT=$(free_port)
  "$TOOLS/llama-server" -m "$TARGET" --alias coder-1.5b --port "$PORT" -t "$THREADS" \
    --parallel "$STREAMS" -c $((CONTEXT * STREAMS)) --log-disable "$@" >/dev/null 2>&1 &
  PID=$!; wait_up "$PORT"
  run "$name" 1; run "$name" "$STREAMS"
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
}

opta opta-off --speculation off
opta opta-ngram --speculation ngram
opta opta-draft --speculation draft --draft-model coder-0.5b
opta opta-ngram-always --speculation ngram --speculation-always
opta opta-draft-always --speculation draft --draft-model coder-0.5b --speculation-always
llama llama-off
llama llama-ngram --spec-type ngram-simple
llama llama-draft -md "$PWD/$DRAFT" --spec-draft-n-max "$DRAFT_MAX" -td "$THREADS"

python3 - "$DIR/results" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    name, streams, js = line.split(" ", 2)
    rows[(name, int(streams))] = json.loads(js)
print(f"{'mode':<20}{'streams':>8}{'edit tok/s':>12}{'vs off':>8}{'free tok/s':>12}{'vs off':>8}")
for (name, streams), r in rows.items():
    base = rows.get((name.split("-")[0] + "-off", streams))
    if base is None:
        continue
    cells = "".join(f"{r[w]['tps']:12.2f}{r[w]['tps'] / base[w]['tps']:8.2f}" for w in ("edit", "free"))
    print(f"{name:<20}{streams:>8}{cells}")
print("opta-lmx / llama-server, same mode:")
for mode in ("off", "ngram", "draft"):
    for streams in sorted({s for _, s in rows}):
        o, l = rows.get((f"opta-{mode}", streams)), rows.get((f"llama-{mode}", streams))
        if o and l:
            print(f"  {mode:<6} x{streams}: edit {o['edit']['tps'] / l['edit']['tps']:.2f}x, "
                  f"free {o['free']['tps'] / l['free']['tps']:.2f}x")
PY
