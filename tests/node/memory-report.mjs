// What a page pays in memory for a loaded model: this engine on the default bundle's default
// file against wllama (llama.cpp in wasm, the benchmark mode's peer) on the site's Q8_0 GGUF of
// the same weights, each loaded into the same blank document of the site by its own client
// (WasmLM.load; wllama's loadModel), then 8 greedy tokens. Measured: the resident memory (VmRSS)
// of the browser's renderer processes, read from /proc, a few seconds after the tokens. Each
// measurement in a fresh browser, the two engines in turn
// within a round: docs/browser-memory.md, with the machine and the date. `./build.sh benchmarks`
// runs it. A measurement, not a test.
//
//   node tests/node/memory-report.mjs SITE --rounds N --builds B… --out FILE --command TEXT
import { readFileSync, writeFileSync, renameSync } from "node:fs";
import { cpus, totalmem } from "node:os";
import { openSite, options, logger, median } from "./site-browser.mjs";

const args = process.argv.slice(2);
const list = options(args);
const builds = list("--builds");
const rounds = Number(list("--rounds")[0] ?? 3);
const out = list("--out")[0];
const command = list("--command").join(" ") || "node tests/node/memory-report.mjs";
const site = args[0];
if (!site || !out || !(rounds >= 1) || builds.length === 0) {
  console.error("usage: node memory-report.mjs SITE --rounds N --builds B… --out FILE --command TEXT");
  process.exit(2);
}
const log = logger("memory");
const MiB = 2 ** 20;
const SETTLE_MS = 5000;
const N_CTX = 2048; // wllama's context (it allocates its cache for all of it; ours grows with use)
const PROMPT = "The capital of France is";

/** VmRSS of each renderer process of `browser`, in bytes (Chromium's process list, over CDP). */
async function renderersRss(browser) {
  const cdp = await browser.newBrowserCDPSession();
  try {
    const { processInfo } = await cdp.send("SystemInfo.getProcessInfo");
    return processInfo.filter((p) => p.type === "renderer").map((p) => {
      const status = readFileSync(`/proc/${p.id}/status`, "utf8");
      return Number(/^VmRSS:\s+(\d+) kB/m.exec(status)[1]) * 1024;
    });
  } finally {
    await cdp.detach();
  }
}

// In the page: load one engine, generate, and keep it loaded (the measurement is taken meanwhile).
async function loadOurs({ build, prompt }) {
  const { WasmLM } = await import("./wasmlm.js");
  const { models } = await (await fetch("models/index.json")).json();
  const lm = await WasmLM.load({ kind: "bundle", base: `models/${models[0]}/` }, { build });
  let text = "";
  for await (const t of lm.generate(prompt, { max_new_tokens: 8, ignore_eos: true })) text += t.text;
  globalThis.keep = lm;
  return { text, build: `${lm.build.simd} build, 1 thread` };
}

async function loadWllama({ prompt, nCtx }) {
  const { models } = await (await fetch("models/index.json")).json();
  const base = `models/${models[0]}/`;
  const manifest = await (await fetch(`${base}manifest.json`)).json();
  const gguf = manifest.peers?.wllama;
  if (!gguf) throw new Error(`${base}: no GGUF for wllama in the manifest (peers.wllama)`);
  const parts = [];
  for (const p of gguf.parts ?? [gguf]) parts.push(await (await fetch(base + p.name)).blob());
  const dir = new URL("./wllama/", location.href).href;
  const { Wllama } = await import(`${dir}index.js`);
  const w = new Wllama({ "single-thread/wllama.wasm": `${dir}single-thread/wllama.wasm`,
    "multi-thread/wllama.wasm": `${dir}multi-thread/wllama.wasm` },
    { suppressNativeLog: true, logger: { debug() {}, log() {}, warn() {}, error: console.error } });
  await w.loadModel([new Blob(parts)], { n_threads: 1, n_ctx: nCtx });
  parts.length = 0;
  const text = await w.createCompletion(prompt, { nPredict: 8, sampling: { temp: 0 } });
  globalThis.keep = w;
  const version = await fetch(`${dir}package.json`).then((r) => r.json()).then((p) => p.version);
  return { text, build: `wllama ${version}, ${gguf.type}, single-thread, n_ctx ${nCtx}` };
}

async function measure(engine, build) {
  const served = await openSite(site);
  try {
    const page = await served.browser.newPage();
    page.on("console", (m) => { if (m.type() === "error") log("console:", m.text()); });
    // a blank document of the site's origin: neither engine pays for the demo page
    await page.goto(`${served.url}/bench-prompt.txt`);
    await page.setContent("<!doctype html><title>memory</title>");
    const before = (await renderersRss(served.browser)).reduce((a, b) => a + b, 0);
    const r = engine === "wasmlm"
      ? await page.evaluate(loadOurs, { build, prompt: PROMPT })
      : await page.evaluate(loadWllama, { prompt: PROMPT, nCtx: N_CTX });
    await new Promise((res) => setTimeout(res, SETTLE_MS));
    const after = (await renderersRss(served.browser)).reduce((a, b) => a + b, 0);
    return { ...r, before, after, name: served.name };
  } finally {
    await served.close();
  }
}

const rows = new Map();
let browserName = "";
for (let round = 0; round < rounds; round++) {
  for (const [engine, build] of [...builds.map((b) => ["wasmlm", b]), ["wllama", ""]]) {
    const key = `${engine} ${build}`;
    const m = await measure(engine, build);
    browserName = m.name;
    if (!rows.has(key)) rows.set(key, { engine, what: m.build, text: m.text, before: [], after: [] });
    rows.get(key).before.push(m.before);
    rows.get(key).after.push(m.after);
    log(`round ${round + 1}: ${engine} ${m.build}: renderer ${(m.before / MiB).toFixed(0)} -> ${(m.after / MiB).toFixed(0)} MiB (${JSON.stringify(m.text)})`);
  }
}

const lines = [
  "# Memory in the browser",
  "",
  `Generated by \`${command}\` on ${new Date().toISOString().slice(0, 10)}: ${cpus()[0]?.model ?? "unknown CPU"}, ` +
    `${cpus().length} cores, ${(totalmem() / 2 ** 30).toFixed(0)} GiB, ${browserName} (headless). Each engine in a fresh ` +
    "browser, loaded into the same blank document of the site by its own client: this engine's default bundle and file " +
    "(`WasmLM.load`, the worker included), wllama on the site's Q8_0 GGUF of the same weights (`loadModel`, then " +
    `\`createCompletion\`), then 8 greedy tokens of "${PROMPT}". Resident memory (VmRSS) of the browser's renderer ` +
    `processes from /proc: before the load, and ${SETTLE_MS / 1000} s after the tokens (no forced garbage collection: ` +
    `what a page gets). wllama allocates its KV cache for its whole context (${N_CTX} tokens here); this engine's grows ` +
    `with use. ${rounds} round(s), the engines in turn within each; medians.`,
  "",
  "| engine | build | renderer before load, MiB | renderer after, MiB | added by the load, MiB |",
  "|---|---|---|---|---|",
];
for (const r of rows.values()) {
  const added = r.after.map((a, i) => a - r.before[i]);
  lines.push(`| ${r.engine} | ${r.what} | ${(median(r.before) / MiB).toFixed(0)} | ${(median(r.after) / MiB).toFixed(0)} | ${(median(added) / MiB).toFixed(0)} |`);
}
lines.push("");
writeFileSync(out + ".partial", lines.join("\n"));
renameSync(out + ".partial", out);
log(`${out} written`);
