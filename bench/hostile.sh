#!/usr/bin/env bash
# Hostile clients against the server before the hardening and now, one table each, from the
# same model on the same machine in one run (bench/hostile.py says what each row does).
#
#   bench/hostile.sh [BEFORE_COMMIT] [--round 1|2|all]
#     default b371ef2, the last commit before issue 9's fixes (round 1);
#     31d937f is the last before the second round's (round 2, bench/hostile2.py)
set -euo pipefail
cd "$(dirname "$0")/.."

BEFORE=${1:-b371ef2}
ROUND=()
if [ "${2:-}" = "--round" ]; then ROUND=(--round "$3"); fi
MODEL=target/test-model/gemma-3-270m-q4_k_m.gguf
scripts/fetch-model.sh "$MODEL" >/dev/null

# The old tree builds into the same target dir (llama.cpp is reused; only opta-lmx is
# compiled again), and its binary is kept aside before the current one is rebuilt.
SRC=target/hostile-before-src
[ -d "$SRC" ] || git worktree add --detach "$SRC" "$BEFORE" >/dev/null
(cd "$SRC" && git checkout --quiet --detach "$BEFORE" && cargo build --release --quiet --target-dir ../../target)
cp target/release/opta-lmx target/opta-lmx-before
cargo build --release --quiet

python3 bench/hostile.py target/opta-lmx-before "$MODEL" --label "before ($BEFORE)" "${ROUND[@]}"
echo
python3 bench/hostile.py target/release/opta-lmx "$MODEL" --label "now ($(git rev-parse --short HEAD))" "${ROUND[@]}"
