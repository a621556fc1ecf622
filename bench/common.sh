# Sourced by the bench scripts: builds what they measure and sets up a models folder.
# After it: MODEL (the Gemma GGUF), TOOLS (llama-bench/llama-server dir), DIR (a temp models
# folder with the model and an empty config.yaml, removed on exit), PID (set it to the server
# being measured: it is killed on exit), free_port, wait_up PORT.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MODEL=target/test-model/gemma-3-270m-q4_k_m.gguf
scripts/fetch-model.sh "$MODEL" >/dev/null
cargo build --release --quiet
# LLAMA_TOOLS=0: a bench that runs none of llama.cpp's tools skips building them.
if [ "${LLAMA_TOOLS:-1}" = 1 ]; then TOOLS=$(bench/build-llama-tools.sh); fi
[ -x target/venv/bin/python ] || python3 -m venv target/venv
target/venv/bin/python -m pip install --quiet --disable-pip-version-check openai

# Measurements start cold: no prefix restored from an earlier run's disk cache (benches that
# measure the disk tier turn it back on for their own server).
export OPTA_LMX_PROMPT_CACHE=false

DIR=$(mktemp -d)
ln -s "$PWD/$MODEL" "$DIR/gemma-3-270m-q4_k_m.gguf"
: > "$DIR/config.yaml"
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# llama-server answers /health, opta-lmx /healthz.
wait_up() { until curl -sf "http://127.0.0.1:$1/health" >/dev/null || curl -sf "http://127.0.0.1:$1/healthz" >/dev/null; do sleep 0.2; done; }
