#!/usr/bin/env bash
# How close the memory guard's estimate (from the GGUF header, before loading) is to what
# llama.cpp then allocates (the buffer sizes it logs) and to the growth of the server's
# resident memory, for several context x parallel settings, in one run.
set -euo pipefail
source "$(dirname "$0")/common.sh"
PORT=$(free_port)
LOG=$DIR/.server.log
target/release/opta-lmx serve --config "$DIR/config.yaml" --port "$PORT" --models-dir "$DIR" \
  --log-level info,llama_cpp_2=info 2>"$LOG" &
PID=$!
wait_up "$PORT"
python3 bench/memory_estimate.py "http://127.0.0.1:$PORT" "$LOG" "$PID"
