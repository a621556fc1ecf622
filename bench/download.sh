#!/usr/bin/env bash
# Verified download speed: `opta-lmx download` (stream to staging, SHA-256 while streaming,
# move into place) against `curl -L` + `sha256sum` of the same file from the same local Hub
# (examples/fake_hub.rs, the tests' Hub), in one run. RUNS sets the repetitions.
set -euo pipefail
source "$(dirname "$0")/common.sh"
RUNS=${RUNS:-3}
REPO=google/gemma-3-270m-GGUF
NAME=$(basename "$MODEL")
cargo build --release --quiet --example fake_hub

HUBOUT=$(mktemp)
target/release/examples/fake_hub "$REPO" "$MODEL" >"$HUBOUT" 2>/dev/null &
HUBPID=$!
trap 'kill $HUBPID 2>/dev/null; rm -f "$HUBOUT"; cleanup' EXIT
until [ -s "$HUBOUT" ]; do sleep 0.2; done
HUB=$(cat "$HUBOUT")

PORT=$(free_port)
HF_ENDPOINT=$HUB target/release/opta-lmx serve --config "$DIR/config.yaml" --port "$PORT" \
  --models-dir "$DIR" --log-level warn &
PID=$!
wait_up "$PORT"
URL=http://127.0.0.1:$PORT
SIZE=$(stat -Lc %s "$MODEL")

now() { date +%s.%N; }
TIMES=$DIR/.times
for i in $(seq "$RUNS"); do
  t0=$(now)
  curl -sfL "$HUB/$REPO/resolve/main/$NAME" -o "$DIR/.curl.gguf"
  sha256sum "$DIR/.curl.gguf" >/dev/null
  t1=$(now)
  rm -f "$DIR/.curl.gguf"
  target/release/opta-lmx download "$REPO" --url "$URL" >/dev/null
  t2=$(now)
  target/release/opta-lmx delete "$REPO" --yes --url "$URL" >/dev/null
  echo "$t0 $t1 $t2" >>"$TIMES"
done

python3 - "$SIZE" "$TIMES" <<'PY'
import statistics, sys
size = int(sys.argv[1]) / 1e6
rows = [[float(x) for x in line.split()] for line in open(sys.argv[2])]
c = [t1 - t0 for t0, t1, _ in rows]
o = [t2 - t1 for _, t1, t2 in rows]
mc, mo = statistics.median(c), statistics.median(o)
print(f"file: {size:.0f} MB, {len(c)} runs, medians")
print(f"curl -L + sha256sum:      {mc:6.2f} s  {size / mc:7.1f} MB/s")
print(f"opta-lmx download (CLI):  {mo:6.2f} s  {size / mo:7.1f} MB/s")
print(f"ratio opta / curl+sha256sum time: {mo / mc:.2f}")
PY
