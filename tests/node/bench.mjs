// The baseline protocol in Node's V8 (the engine of Chromium): this engine's wasm builds and
// onnxruntime-web (its wasm backend) on the very same ONNX files, rows merged into baselines.json.
//
//   node tests/node/bench.mjs --out build/baselines.json --bundle build/models/distilgpt2-shape \
//        [--bundle …] [--file NAME]… [--runs 5] [--backend tract-simd|tract-nosimd|ort-web]…
//
// Protocol (the native bench's, src/bench.rs): batch 1, the bundle's 32 prompt tokens from
// baselines.json (checked against this engine's own tokenization of the same text), exactly 64
// new tokens greedy with EOS ignored, one warm-up run, then `runs` runs; a run's decode ms/token
// is the mean of its 63 decode steps; median and p90 over runs; 1 thread. Each row runs in its own
// Node process (--row), so its peak RSS (process.resourceUsage().maxRSS) is its own.
import { spawnSync } from "node:child_process";
import { readFileSync, renameSync, writeFileSync } from "node:fs";
import { basename, dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "../..");
const NEW_TOKENS = 64;
const KEY = ["model", "backend", "precision", "preset", "cache", "threads"];

function args(argv) {
  const out = { bundle: [], file: [], backend: [], runs: 5 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const v = () => argv[++i];
    if (a === "--bundle") out.bundle.push(v());
    else if (a === "--file") out.file.push(v());
    else if (a === "--backend") out.backend.push(v());
    else if (a === "--runs") out.runs = Number(v());
    else if (a === "--out") out.out = v();
    else if (a === "--text") out.text = v();
    else if (a === "--row") out.row = JSON.parse(v());
    else throw new Error(`unknown argument ${a}`);
  }
  if (!out.backend.length) out.backend = ["tract-simd", "ort-web"];
  return out;
}

const round = (x) => Math.round(x * 1000) / 1000;
function percentile(sorted, q) {
  if (!sorted.length) return 0;
  const pos = (q / 100) * (sorted.length - 1);
  const lo = Math.floor(pos), hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}
function summary(values) {
  const v = [...values].sort((a, b) => a - b);
  return { median: round(percentile(v, 50)), p90: round(percentile(v, 90)), runs: v.length };
}
const argmax = (data, offset, n) => {
  let best = 0;
  for (let i = 1; i < n; i++) if (data[offset + i] > data[offset + best]) best = i;
  return best;
};

// ---- one row, in its own process -----------------------------------------------------------

async function tractRow(spec) {
  const flavour = spec.backend === "tract-simd" ? "simd" : "nosimd";
  const pkg = resolve(repo, "build/pkg", flavour);
  const wasm = await import(resolve(pkg, "wasmlm.js"));
  const exports = await wasm.default({ module_or_path: readFileSync(resolve(pkg, "wasmlm_bg.wasm")) });
  const build = wasm.buildInfo();
  const manifestText = readFileSync(resolve(spec.bundle, "manifest.json"), "utf8");
  // As the page does: sha256 by the platform's crypto (WebCrypto there, node:crypto here), then
  // compared with the manifest by the engine.
  const onnx = readFileSync(resolve(spec.bundle, spec.file));
  const tokenizer = readFileSync(resolve(spec.bundle, "tokenizer.json"));
  const t0 = performance.now();
  const digest = async (b) => Buffer.from(await crypto.subtle.digest("SHA-256", b)).toString("hex");
  const sha256 = { [spec.file]: await digest(onnx), "tokenizer.json": await digest(tokenizer) };
  const engine = wasm.Engine.fromBundle(manifestText, spec.file, onnx, tokenizer, { sha256 });
  const loadMs = performance.now() - t0;
  const own = Array.from(engine.benchPrompt(readFileSync(spec.text, "utf8")));
  if (JSON.stringify(own) !== JSON.stringify(spec.prompt)) {
    throw new Error(`this engine's prompt ids differ from baselines.json's: ${own} vs ${spec.prompt}`);
  }
  const prompt = Uint32Array.from(spec.prompt);
  const results = [];
  for (let run = 0; run <= spec.runs; run++) {
    const r = engine.benchRun(prompt);
    if (run > 0) results.push(r);
  }
  const row = engine.benchRow(results, prompt.length, `tract wasm ${build.simd} (Node ${process.versions.node})`);
  row.load_ms = round(loadMs);
  row.wasm_memory_mib = Math.round(exports.memory.buffer.byteLength / 1048576);
  return row;
}

async function ortWebRow(spec) {
  const ort = await import("onnxruntime-web");
  ort.env.wasm.numThreads = 1;
  const manifest = JSON.parse(readFileSync(resolve(spec.bundle, "manifest.json"), "utf8"));
  const entry = manifest.files.find((f) => f.name === spec.file);
  const arch = manifest.architecture;
  const t0 = performance.now();
  const session = await ort.InferenceSession.create(readFileSync(resolve(spec.bundle, spec.file)),
    { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
  const loadMs = performance.now() - t0;
  // Optimum's files also take attention_mask (ones over past + new) and position_ids
  const extra = ["attention_mask", "position_ids"].filter((n) => session.inputNames.includes(n));
  const pastNames = session.inputNames.filter((n) => n !== "input_ids" && !extra.includes(n));
  const presentOf = (name) => name.replace("past_key_values.", "present.").replace("past_", "present_");
  for (const n of pastNames) {
    if (!/^past_(key|value)_\d+$|^past_key_values\.\d+\.(key|value)$/.test(n)) {
      throw new Error(`${spec.file}: input ${n} is not a cache input this bench feeds`);
    }
  }
  const oneRun = async () => {
    let past = Object.fromEntries(pastNames.map((n) =>
      [n, new ort.Tensor("float32", new Float32Array(0), [1, arch.kv_heads, 0, arch.head_dim])]));
    let ids = spec.prompt;
    let held = 0;
    const times = [];
    const int64 = (values) => new ort.Tensor("int64", BigInt64Array.from(values.map(BigInt)), [1, values.length]);
    for (let step = 0; step < NEW_TOKENS; step++) {
      const feeds = { input_ids: int64(ids), ...past };
      const total = held + ids.length;
      if (extra.includes("attention_mask")) feeds.attention_mask = int64(Array(total).fill(1));
      if (extra.includes("position_ids")) feeds.position_ids = int64(Array.from({ length: ids.length }, (_, i) => held + i));
      held = total;
      const t = performance.now();
      const out = await session.run(feeds);
      const logits = out.logits;
      const vocab = logits.dims[2];
      const next = argmax(logits.data, (logits.dims[1] - 1) * vocab, vocab);
      times.push(performance.now() - t);
      past = Object.fromEntries(pastNames.map((n) => [n, out[presentOf(n)]]));
      ids = [next];
    }
    return { prefill_ms: times[0], steps_ms: times.slice(1) };
  };
  const results = [];
  for (let run = 0; run <= spec.runs; run++) {
    const r = await oneRun();
    if (run > 0) results.push(r);
  }
  return {
    model: manifest.id, backend: `onnxruntime-web ${ort.env.versions?.web ?? ""} wasm (Node ${process.versions.node})`.replace("  ", " "),
    precision: entry.precision, preset: entry.preset, cache: entry.cache, threads: 1,
    real_weights: manifest.real_weights, file: spec.file, file_bytes: entry.bytes, load_ms: round(loadMs),
    prompt_tokens: spec.prompt.length, new_tokens: NEW_TOKENS,
    prefill_ms: summary(results.map((r) => r.prefill_ms)),
    decode_ms_per_token: summary(results.map((r) => r.steps_ms.reduce((a, b) => a + b, 0) / r.steps_ms.length)),
  };
}

async function oneRow(spec) {
  const row = spec.backend === "ort-web" ? await ortWebRow(spec) : await tractRow(spec);
  row.peak_rss_mib = Math.round(process.resourceUsage().maxRSS / 1024);
  process.stdout.write(JSON.stringify(row) + "\n");
}

// ---- all rows ------------------------------------------------------------------------------

function main(a) {
  const out = resolve(a.out);
  const table = JSON.parse(readFileSync(out, "utf8"));
  const text = resolve(a.text || resolve(repo, "models/data/tinyshakespeare.txt"));
  const rows = [];
  for (const bundle of a.bundle.map((b) => resolve(b))) {
    const manifest = JSON.parse(readFileSync(resolve(bundle, "manifest.json"), "utf8"));
    const prompt = table.models?.[manifest.id]?.prompt_ids;
    if (!prompt) throw new Error(`${out} has no prompt ids for ${manifest.id}: run ./build.sh baselines first`);
    const files = manifest.files.filter((f) => f.kind === "onnx" && f.cache === "with_past" &&
      (!a.file.length || a.file.includes(f.name)));
    for (const f of files) {
      for (const backend of a.backend) {
        const spec = { bundle, file: f.name, backend, runs: a.runs, prompt, text };
        console.error(`[node bench] ${manifest.id} ${f.name} ${backend}`);
        const p = spawnSync(process.execPath, [fileURLToPath(import.meta.url), "--row", JSON.stringify(spec)],
          { encoding: "utf8", maxBuffer: 1 << 24 });
        let row;
        if (p.status === 0) {
          row = JSON.parse(p.stdout.trim().split("\n").pop());
        } else {
          const err = (p.stderr || "").trim().split("\n").filter(Boolean);
          row = { model: manifest.id, backend, precision: f.precision, preset: f.preset, cache: f.cache, threads: 1,
            file: f.name, error: err.find((l) => /Error/.test(l)) || err.pop() || `exit ${p.status}` };
        }
        console.error(`[node bench]   -> ${JSON.stringify(row.decode_ms_per_token ?? row.error)}`);
        rows.push(row);
      }
    }
  }
  const key = (r) => JSON.stringify(KEY.map((k) => r[k] ?? null));
  const fresh = new Set(rows.map(key));
  table.rows = table.rows.filter((r) => !fresh.has(key(r))).concat(rows);
  writeFileSync(out + ".partial", JSON.stringify(table, null, 2));
  renameSync(out + ".partial", out);
  console.error(`[node bench] ${rows.length} rows merged into ${basename(out)}`);
}

const a = args(process.argv.slice(2));
if (a.row) {
  oneRow(a.row).catch((e) => { console.error(e.stack || String(e)); process.exit(1); });
} else {
  main(a);
}
