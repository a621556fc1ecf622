#!/usr/bin/env bash
# The coding CLI's model tools (issue 26) against llama.cpp's own, in the same run, same
# model (Qwen2.5-Coder 0.5B Q4_K_M), same threads:
#  - POST /admin/benchmark/run (greedy runs through the scheduler) against llama-bench at the
#    same prompt length and output tokens: how close the server's figures are to the engine's;
#  - POST /admin/quantize (llama.cpp's quantizer in a child process, plus the read-back check,
#    the hash and the move) against llama-quantize on the same file and type.
#
#   bench/admin_benchmark.sh        # THREADS=1 OUT_TOKENS=64 RUNS=3 TYPE=Q4_0
set -euo pipefail
source "$(dirname "$0")/common.sh"
THREADS=${THREADS:-1}
OUT_TOKENS=${OUT_TOKENS:-64}
RUNS=${RUNS:-3}
TYPE=${TYPE:-Q4_0}
QWEN=target/test-model/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
scripts/fetch-model.sh qwen "$QWEN" >/dev/null
ID=qwen2.5-coder-0.5b-instruct-q4_k_m
ln -s "$PWD/$QWEN" "$DIR/$ID.gguf"
PORT=$(free_port)
target/release/opta-lmx serve --port "$PORT" --models-dir "$DIR" --config "$DIR/config.yaml" \
  --threads "$THREADS" --parallel 1 --context 4096 --model "$ID" --no-prompt-cache \
  --audit-file "$DIR/audit.jsonl" 2>"$DIR/server.log" &
PID=$!
wait_up "$PORT"
PROMPT=$(python3 -c 'print(" ".join(["Explain, step by step and with examples, how a hash map handles collisions."] * 30))')
RESULT=$(curl -sf "http://127.0.0.1:$PORT/admin/benchmark/run" -H 'content-type: application/json' \
  -d "$(python3 -c 'import json,sys; print(json.dumps({"model_id": sys.argv[1], "prompt": sys.argv[2], "num_output_tokens": int(sys.argv[3]), "runs": int(sys.argv[4]), "warmup_runs": 1}))' "$ID" "$PROMPT" "$OUT_TOKENS" "$RUNS")")
PTOK=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["stats"]["prompt_tokens"])' "$RESULT")
BENCH=$("$TOOLS/llama-bench" -m "$QWEN" -t "$THREADS" -p "$PTOK" -n "$OUT_TOKENS" -r "$RUNS" -o json 2>/dev/null)

# Quantize: the server's job, then llama-quantize on the same file.
T0=$(date +%s.%N)
JOB=$(curl -sf "http://127.0.0.1:$PORT/admin/quantize" -H 'content-type: application/json' \
  -d "{\"source_model\": \"$ID\", \"quantization\": \"$TYPE\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')
while :; do
  V=$(curl -sf "http://127.0.0.1:$PORT/admin/quantize/$JOB")
  S=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["status"])' "$V")
  [ "$S" = queued ] || [ "$S" = running ] || break
  sleep 0.2
done
T1=$(date +%s.%N)
"$TOOLS/llama-quantize" --allow-requantize "$QWEN" "$DIR/ref-$TYPE.gguf" "$TYPE" "$THREADS" >/dev/null 2>&1
T2=$(date +%s.%N)
python3 - "$RESULT" "$BENCH" "$V" "$T0" "$T1" "$T2" "$DIR/ref-$TYPE.gguf" <<'PY'
import json, os, sys
r, rows, job = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
t0, t1, t2 = map(float, sys.argv[4:7])
s = r["stats"]
pp = next(x["avg_ts"] for x in rows if x["n_prompt"] > 0)
tg = next(x["avg_ts"] for x in rows if x["n_gen"] > 0)
print(f"model {r['model_id']}, {s['prompt_tokens']} prompt tokens, {r['max_tokens']} out, "
      f"{s['runs_completed']} runs after {s['warmup_runs_discarded']} warm-up, threads {r['settings']['threads']}")
print(f"{'':24} {'opta-lmx':>10} {'llama-bench':>12} {'ratio':>7}")
print(f"{'prefill tokens/s':24} {s['prefill_toks_per_sec_mean']:10.1f} {pp:12.1f} {s['prefill_toks_per_sec_mean']/pp:7.2f}")
print(f"{'decode tokens/s':24} {s['toks_per_sec_mean']:10.1f} {tg:12.1f} {s['toks_per_sec_mean']/tg:7.2f}")
print(f"TTFT p50 {s['ttft_p50_sec']*1000:.0f} ms, coherence {s['coherence_flag']}")
ref = os.path.getsize(sys.argv[7])
print(f"quantize {job['quantization']}: {job['status']}, {t1-t0:.1f} s (job {job['duration_sec']:.1f} s) "
      f"vs llama-quantize {t2-t1:.1f} s: {(t1-t0)/(t2-t1):.2f}x; "
      f"{job['output_size_bytes']} bytes vs {ref} ({job['output_size_bytes']/ref:.3f}x), "
      f"{job['source_size_bytes']} before")
PY
