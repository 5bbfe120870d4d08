// End to end, in Debian's headless Chromium (driven by playwright-core; no browser download):
// serve a site made by `./build.sh site` with a plain static server, as a static host would (no
// special headers; every file at most 25 MiB, the model in parts), load the default model (SmolLM2
// INT8 with past) through the page, ask "What is the capital of France?" in chat mode, and check
// that "Paris" streams into the output, that the per-token timings are positive, that the live
// row and the benchmark row land in the baseline table (then the peers': onnxruntime-web on the
// same file and wllama on the site's GGUF of the same weights, in the same browser, with our ratio
// to each), that generated markup ("<b>") shows as
// text, that a reload loads the model from the Cache API, and that the threaded build runs once
// the page's service worker has made it cross-origin isolated. A screenshot goes to
// $WASMLM_SCREENSHOT (default tests/out/e2e.png).
//
//   ./build.sh test-e2e      (builds the site, then runs this with build.sh's limits for a static
//                            host in WASMLM_MAX_FILE_MIB and WASMLM_MAX_SITE_MB)
import { spawn } from "node:child_process";
import { mkdirSync, readdirSync, readFileSync, statSync } from "node:fs";
import { createServer } from "node:net";
import { createServer as createHttpServer } from "node:http";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "../..");
const dist = resolve(process.argv[2] || resolve(repo, "dist"));
const out = resolve(repo, "tests/out");
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
const screenshot = resolve(process.env.WASMLM_SCREENSHOT || resolve(out, "e2e.png"));
mkdirSync(out, { recursive: true });
mkdirSync(dirname(screenshot), { recursive: true });
const hubRoot = resolve(process.env.WASMLM_HUB_ROOT || resolve(repo, "build/test/hub"));
// the static hosts' limits, build.sh's (`./build.sh test-e2e` passes them)
function limit(name) {
  const v = Number(process.env[name]);
  if (!(v > 0)) throw new Error(`${name} is not set: run this test through ./build.sh test-e2e`);
  return v;
}
const MAX_FILE = limit("WASMLM_MAX_FILE_MIB") * 2 ** 20;
const MAX_SITE = limit("WASMLM_MAX_SITE_MB") * 1e6;

function filesOf(dir) {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? filesOf(resolve(dir, e.name)) : [resolve(dir, e.name)]);
}

function log(...args) {
  console.log(`[e2e ${new Date().toISOString().slice(11, 19)}]`, ...args);
}

async function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => { const { port } = s.address(); s.close(() => ok(port)); });
    s.on("error", fail);
  });
}

// isolated: `./build.sh serve`, which sends the cross-origin isolation headers; otherwise a plain
// static server (a static host: the page's service worker must isolate it).
async function serve(port, isolated) {
  const server = isolated
    ? spawn("bash", [resolve(repo, "build.sh"), "serve", dist], { stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, PORT: String(port) } })
    : spawn("python3", ["-m", "http.server", String(port), "--bind", "127.0.0.1", "--directory", dist],
      { stdio: ["ignore", "ignore", "pipe"] });
  for (let i = 0; i < 100; i++) {
    try {
      const res = await fetch(`http://127.0.0.1:${port}/index.html`);
      if (res.ok) {
        assert.equal(res.headers.get("cross-origin-embedder-policy"), isolated ? "require-corp" : null);
        return server;
      }
    } catch { /* not up yet */ }
    await new Promise((r) => setTimeout(r, 100));
  }
  server.kill();
  throw new Error("the static server did not start");
}

// Another origin that serves a site's models/ folder with CORS, as a CDN or a Hugging Face
// repository would; it counts the requests it answers.
async function corsServer(root) {
  const seen = [];
  const server = createHttpServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
    seen.push(path);
    const file = resolve(root, "." + path);
    res.setHeader("Access-Control-Allow-Origin", "*");
    if (!file.startsWith(root) || !statSync(file, { throwIfNoEntry: false })?.isFile()) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "Content-Length": statSync(file).size }).end(readFileSync(file));
  });
  const port = await freePort();
  await new Promise((ok) => server.listen(port, "127.0.0.1", ok));
  return { url: `http://127.0.0.1:${port}/`, seen, close: () => server.close() };
}

// A Hugging Face hub's URL layout, /<owner>/<name>/resolve/<revision>/<path>, over a folder of
// repositories (with CORS, on another origin); it records the paths asked for.
async function hubServer(root) {
  const seen = [];
  const server = createHttpServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
    seen.push(path);
    res.setHeader("Access-Control-Allow-Origin", "*");
    const m = /^\/([^/]+)\/([^/]+)\/resolve\/main\/(.+)$/.exec(path);
    const file = m && resolve(root, m[1], m[2], m[3]);
    if (!file || !file.startsWith(root + "/") || !statSync(file, { throwIfNoEntry: false })?.isFile()) {
      res.writeHead(404).end("Entry not found");
      return;
    }
    res.writeHead(200, { "Content-Length": statSync(file).size }).end(readFileSync(file));
  });
  const port = await freePort();
  await new Promise((ok) => server.listen(port, "127.0.0.1", ok));
  return { url: `http://127.0.0.1:${port}`, seen, close: () => server.close() };
}

async function loadModel(page) {
  await page.waitForSelector("#model option", { state: "attached" });
  await page.click("#load");
  await page.waitForFunction(() => !document.querySelector("#generate").disabled ||
    document.querySelector("#status").className === "error", null, { timeout: 600_000 });
  const status = await page.textContent("#status");
  assert.ok(!(await page.getAttribute("#status", "class")).includes("error"), `load failed: ${status}`);
  return status;
}

// One turn: a new chat first unless `fresh` is false (then the turn continues the conversation).
async function generate(page, prompt, maxNew, { fresh = true } = {}) {
  if (fresh) await page.click("#new-chat");
  await page.fill("#prompt", prompt);
  await page.fill("#max-new-tokens", String(maxNew));
  await page.click("#generate");
  // done: the stats carry "stopped by"
  await page.waitForSelector('#stats dd[data-key="stopped by"]', { timeout: 300_000 });
  const text = await page.textContent("#output");
  const stat = async (key) => Number(await page.textContent(`#stats dd[data-key="${key}"]`).then((t) => t.split(" ")[0]));
  return {
    text,
    ttft: await stat("time to first token (prefill)"),
    median: await stat("decode ms/token, median"),
    p90: await stat("decode ms/token, p90"),
    tokens: await stat("tokens"),
    promptTokens: await stat("prompt tokens"),
    fed: await stat("prefill tokens (new)"),
    cache: await stat("cache tokens"),
    turns: await page.locator("#transcript .turn").count(),
    stoppedBy: await page.textContent('#stats dd[data-key="stopped by"]'),
  };
}

// Opens `url` and waits until the page is usable: where the page wants the threaded build (3
// cores on, or ?build=threads) on a host without the isolation headers, its service worker makes
// it cross-origin isolated after one reload, which must be over before the page is used.
async function open(page, url, wantIsolation, picker = true) {
  await page.goto(url);
  if (wantIsolation) {
    let isolated = false;
    for (let i = 0; i < 120 && !isolated; i++) {
      // the page reloads itself once: a check may land in the old page and fail
      isolated = await page.evaluate(() => self.crossOriginIsolated === true).catch(() => false);
      if (!isolated) await new Promise((r) => setTimeout(r, 250));
    }
    assert.ok(isolated, `${url}: the service worker made the page cross-origin isolated`);
    assert.ok(await page.evaluate(() => !!navigator.serviceWorker.controller), "the service worker controls the page");
  }
  if (picker) await page.waitForSelector("#model option", { state: "attached" });
}

async function main() {
  // The site as a static host gets it.
  const files = filesOf(dist).map((f) => ({ f, bytes: statSync(f).size }));
  const over = files.filter((x) => x.bytes > MAX_FILE).map((x) => x.f);
  assert.deepEqual(over, [], `files over ${MAX_FILE} bytes`);
  const total = files.reduce((n, x) => n + x.bytes, 0);
  // ./build.sh site by default holds each bundle's default file only; this one (--files int8)
  // holds the other INT8 files too: the limit is held on the default site's share.
  const extra = JSON.parse(readFileSync(resolve(dist, "models/index.json"), "utf8")).models
    .map((id) => JSON.parse(readFileSync(resolve(dist, `models/${id}/manifest.json`), "utf8")))
    .flatMap((m) => m.files.filter((f) => f.kind === "onnx" && f.name !== m.default.file))
    .reduce((n, f) => n + f.bytes, 0);
  assert.ok(total - extra <= MAX_SITE, `the default site is ${total - extra} bytes, over ${MAX_SITE}`);
  const parts = files.filter((x) => /\.part-\d+$/.test(x.f)).length;
  assert.ok(parts > 0, "the default model is served in parts");
  log(`site: ${files.length} files, ${(total / 1e6).toFixed(1)} MB (${((total - extra) / 1e6).toFixed(1)} MB without the non-default files), the largest ${(Math.max(...files.map((x) => x.bytes)) / 2 ** 20).toFixed(1)} MiB, ${parts} model parts`);

  const port = await freePort();
  const servers = [await serve(port, false)];
  const browser = await chromium.launch({
    executablePath: chromiumPath,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"],
  });
  const errors = [];
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 1600 } });
    page.on("pageerror", (e) => errors.push(`pageerror: ${e.message}`));
    page.on("console", (m) => { if (m.type() === "error") errors.push(`console: ${m.text()}`); });
    const url = `http://127.0.0.1:${port}/`;
    const cores = await page.evaluate(() => navigator.hardwareConcurrency);
    log("open", url, `(${cores} cores)`);
    await open(page, url, cores >= 3);
    const picked = JSON.parse(await page.inputValue("#model"));
    assert.equal(picked.id, "smollm2-135m", "the default model is preselected");
    assert.equal(picked.file, "model.with_past.int8.onnx", "the default file is preselected");
    // the table comes after the picker (baselines.json is fetched once the bundles are listed)
    await page.waitForSelector("#baselines table tbody tr", { state: "attached", timeout: 30_000 })
      .catch(async () => assert.fail(`the native baseline table is shown: ${await page.textContent("#baselines")}`));
    assert.match(await page.textContent("#baselines-present"), /rows/, "the page says which native rows are present");

    log("load", picked.file);
    const t0 = Date.now();
    const status = await loadModel(page);
    log(`ready after ${((Date.now() - t0) / 1000).toFixed(1)} s: ${status}`);
    const modelInfo = await page.textContent("#model-info");
    log(modelInfo);
    // Chromium validates SIMD and relaxed SIMD: the page must pick the threaded SIMD128 build from
    // 3 cores on (a thread per core but one; isolated by the service worker), else the
    // relaxed-SIMD one, after its kernel check
    assert.match(modelInfo, cores >= 3 ? new RegExp(`WebAssembly build: simd128, ${Math.min(cores - 1, 8)} threads \\(threaded build\\)`)
      : /WebAssembly build: relaxed-simd \(kernels checked against the scalar one in [\d.]+ ms\), 1 thread\b/,
      `the build for ${cores} cores is loaded`);
    assert.match(await page.textContent("#progress-text"), /MB/, "download progress was shown");

    // 1. The question, in chat mode (the page's default), greedy.
    await page.check("#chat");
    const paris = await generate(page, "What is the capital of France?", 16);
    log("answer:", JSON.stringify(paris));
    assert.match(paris.text, /Paris/, "the answer names Paris");
    assert.ok(paris.ttft > 0 && paris.median > 0 && paris.p90 >= paris.median, "per-token timings are positive");
    assert.ok(paris.tokens > 1);
    assert.ok(await page.locator("#baselines tr.live").count() >= 1, "the live row landed in the table");
    const ratio = await page.locator("#baselines tr.live td").last().textContent();
    assert.match(ratio, /× tract native/, `the live row compares with the native row of the same file: ${ratio}`);

    // 1b. A second turn of the same conversation: its prefill runs only the tokens the cache
    //     does not hold (the new turn, and the template's end of the reply), not the history.
    assert.equal(paris.fed, paris.promptTokens, "a new chat's first turn runs its whole prompt");
    const italy = await generate(page, "And of Italy?", 16, { fresh: false });
    log("second turn:", JSON.stringify(italy));
    assert.equal(italy.turns, 4, "the transcript shows both turns and both replies");
    assert.ok(italy.promptTokens > paris.promptTokens + paris.tokens - 1, "the conversation holds the first exchange");
    assert.ok(italy.fed > 0 && italy.fed <= italy.promptTokens - paris.promptTokens - paris.tokens + 3,
      `the second turn's prefill ran only its new tokens: ${italy.fed} of ${italy.promptTokens}`);
    assert.match(await page.textContent("#context-note"), new RegExp(`ran ${italy.fed} new token`), "the page shows the count");

    // 1c. A reload resumes the conversation from its saved KV cache (IndexedDB): the transcript
    //     is back, nothing is run again, and a third turn runs only its own tokens. The reload
    //     waits for the turn's save (the page stores it after the reply).
    await page.waitForFunction((n) => document.querySelector("#transcript").dataset.saved === String(n), italy.cache,
      { timeout: 30_000 });
    await open(page, url, cores >= 3);
    await loadModel(page);
    await page.waitForFunction(() => /Resumed|not restored/.test(document.querySelector("#context-note").textContent),
      null, { timeout: 60_000 });
    const resumed = await page.textContent("#context-note");
    log("after a reload:", resumed);
    assert.match(resumed, new RegExp(`Resumed the saved conversation: its KV cache \\(${italy.cache} tokens\\)`));
    assert.equal(await page.locator("#transcript .turn").count(), 4, "the transcript is back");
    await page.waitForFunction(() => !document.querySelector("#generate").disabled, null, { timeout: 60_000 });
    const third = await generate(page, "Thank you!", 8, { fresh: false });
    log("third turn, after the reload:", JSON.stringify(third));
    assert.ok(third.fed > 0 && third.fed <= third.promptTokens - italy.cache + 3,
      `the third turn ran only its new tokens: ${third.fed} of ${third.promptTokens}`);

    // 2. Generated markup shows as text, never as HTML.
    const markup = await generate(page, "Write the HTML tag that makes text bold.", 16);
    log("markup answer:", JSON.stringify(markup.text));
    assert.ok(markup.text.includes("<b>"), `the model was expected to write <b>: ${markup.text}`);
    assert.equal(await page.locator("#output *").count(), 0, "no element was created from generated text");
    assert.ok((await page.innerText("#output")).includes("<b>"), "the tag shows as text");

    // 3. Benchmark mode: the native bench's protocol; its row lands in the table, then the
    //    peers' (in this browser: onnxruntime-web on the same file, wllama on the GGUF of the
    //    same weights), and our row names the ratio to each.
    await page.fill("#bench-runs", "3");
    await page.check("#bench-peer-ort");
    await page.check("#bench-peer-wllama");
    // every text the status shows while it runs (the peers' downloads among them)
    await page.evaluate(() => {
      const el = document.querySelector("#bench-status");
      window.__benchTexts = [];
      new MutationObserver(() => window.__benchTexts.push(el.textContent)).observe(el, { childList: true, characterData: true, subtree: true });
    });
    await page.click("#bench");
    await page.waitForSelector("#bench-download:not([hidden])", { timeout: 600_000 });
    await page.waitForFunction(() => !document.querySelector("#bench").disabled, null, { timeout: 600_000 });
    const benchStatus = await page.textContent("#bench-status");
    log("bench:", benchStatus);
    const benchTexts = await page.evaluate(() => window.__benchTexts);
    assert.ok(benchTexts.some((t) => /^wllama: downloading model\.q8_0\.gguf, \d+ of 145 MB…$/.test(t)),
      `the page said how far wllama's GGUF had downloaded: ${benchTexts.filter((t) => /wllama/.test(t)).slice(0, 3).join(" | ")}`);
    assert.doesNotMatch(benchStatus, /failed/, "the peers ran without error");
    assert.match(benchStatus, /onnxruntime-web: decode \d.*wllama: decode \d/, "both peers ran, in order");
    const benchRow = page.locator("#baselines tr.live", { hasText: "benchmark mode)" });
    assert.equal(await benchRow.count(), 1, "the benchmark row is in the table");
    const cells = await benchRow.locator("td").allTextContents();
    log("bench row:", cells.join(" | "));
    const heads = await page.locator("#baselines th").allTextContents();
    const cell = (name) => {
      assert.ok(heads.includes(name), `the table has a "${name}" column: ${heads.join(" | ")}`);
      return cells[heads.indexOf(name)];
    };
    const [median] = cell("decode ms/token (median / p90)").split(" / ").map(Number);
    assert.ok(median > 0, "bench decode median is positive");
    const memory = Number(cell("wasm memory MiB"));
    assert.ok(memory > 100 && memory < 1024, `the row reports the wasm memory: ${memory} MiB`);
    assert.match(cell("wasm / native (decode)"), /× onnxruntime-web \(this browser\), .*× wllama \(this browser\)/,
      "our row compares with each peer's");
    const peerRows = page.locator("#baselines tr.live", { hasText: "benchmark mode, peer" });
    assert.equal(await peerRows.count(), 2, "the two peer rows are in the table");
    for (const [i, backend] of [[0, /^onnxruntime-web .*wasm \(this browser/], [1, /^wllama \S+ \(llama\.cpp\) wasm, Q8_0 \(this browser/]]) {
      const peerCells = await peerRows.nth(i).locator("td").allTextContents();
      log("peer row:", peerCells.join(" | "));
      const peerCell = (name) => peerCells[heads.indexOf(name)];
      assert.match(peerCell("backend"), backend);
      assert.ok(Number(peerCell("decode ms/token (median / p90)").split(" / ")[0]) > 0, "peer decode median is positive");
      assert.ok(Number(peerCell("prefill or no-cache ms").split(" / ")[0]) > 0, "peer prefill median is positive");
    }

    // ... and the bars compare this browser's rows with the native ones of the same file
    const bars = await page.$$eval("#comparison figure", (fs) => fs.map((f) => ({
      caption: f.querySelector("figcaption").textContent,
      labels: [...f.querySelectorAll(".label")].map((l) => l.textContent),
      live: f.querySelectorAll(".bar.live").length,
    })));
    log("bars:", JSON.stringify(bars));
    assert.equal(bars.length, 2, "a decode chart and a prefill chart");
    assert.ok(bars.every((b) => b.live >= 1 && b.labels.some((l) => /^tract native/.test(l))),
      "each chart has this browser's bars beside the native ones");
    assert.ok(bars[0].labels.some((l) => /^wllama .*this browser/.test(l)), "the decode chart has wllama's bar (its GGUF of this file)");
    assert.ok(!(await page.isVisible("#baselines table")), "the full table is collapsed");

    await page.screenshot({ path: screenshot, fullPage: true });

    // 3b. Stop in the middle of a long prefill: the prompt is read in chunks (the page says how
    //     far), Stop ends it between two chunks, and the page goes on.
    await page.click("#new-chat");
    await page.fill("#prompt", "The quick brown fox jumps over the lazy dog. ".repeat(80));
    await page.fill("#max-new-tokens", "8");
    await page.click("#generate");
    await page.waitForFunction(() => /Reading the prompt: \d+ of \d+/.test(document.querySelector("#context-note").textContent),
      null, { timeout: 120_000 });
    const reading = await page.textContent("#context-note");
    await page.click("#stop");
    await page.waitForSelector('#stats dd[data-key="stopped by"]', { timeout: 120_000 });
    const stopped = {
      reading,
      by: await page.textContent('#stats dd[data-key="stopped by"]'),
      prompt: Number(await page.textContent('#stats dd[data-key="prompt tokens"]')),
      cache: Number(await page.textContent('#stats dd[data-key="cache tokens"]')),
      tokens: Number(await page.textContent('#stats dd[data-key="tokens"]')),
    };
    log("stopped mid-prefill:", JSON.stringify(stopped));
    assert.equal(stopped.by, "Cancelled");
    assert.ok(stopped.prompt > 600 && stopped.cache > 0 && stopped.cache < stopped.prompt && stopped.tokens === 0,
      "the prefill stopped part of the way, before any token");
    assert.match(await page.textContent("#context-note"), new RegExp(`prefill ran ${stopped.cache} new token`),
      "the page says how much of the prompt was read");
    assert.ok(!(await page.isDisabled("#generate")), "the page can send again");

    // 3c. The client module as the README embeds it, in this page: a watchdog bound shorter than
    //     any step takes a generation for a hung engine, stops its worker and fails fatally
    //     (what a crashed worker thread of the threaded build would otherwise make: a page
    //     waiting for ever).
    const watchdog = await page.evaluate(async () => {
      const { WasmLM } = await import("./wasmlm.js");
      const lm = await WasmLM.load("models/smollm2-135m/", { watchdogMs: 1 });
      try {
        for await (const t of lm.generate("Once upon a time", { max_new_tokens: 8 })) { /* none expected */ }
        return { error: null };
      } catch (err) {
        let after;
        try { await lm.session.tokens(); } catch (e) { after = e.message; }
        return { error: err.message, fatal: err.fatal, after };
      }
    });
    log("watchdog:", JSON.stringify(watchdog));
    assert.match(watchdog.error ?? "", /the engine sent nothing for 1 ms during a generate/);
    assert.equal(watchdog.fatal, true);
    assert.equal(watchdog.after, watchdog.error, "the stopped client refuses later requests with the same error");

    // 3d. The context sweep (one round, ~1 minute here): a step at a time with its progress,
    //     then every case in its table, the decode ratios against the 32-token past.
    await page.click("#sweep");
    await page.waitForFunction(() => /^step \d+ of \d+: /.test(document.querySelector("#sweep-status").textContent),
      null, { timeout: 60_000 });
    await page.waitForSelector("#sweep-table:not([hidden])", { timeout: 900_000 });
    const sweepRows = await page.$$eval("#sweep-table tr", (rows) => rows.slice(1).map((r) => [...r.cells].map((c) => c.textContent)));
    log("context sweep:", await page.textContent("#sweep-table caption"), JSON.stringify(sweepRows));
    assert.equal(await page.textContent("#sweep-status"), "", "the sweep ran to its end");
    assert.deepEqual(sweepRows.map((r) => r[0]), ["decode after 32 tokens", "decode after 256 tokens", "decode after 1024 tokens",
      "decode after 2048 tokens", "prefill of 128 tokens", "prefill of 512 tokens", "prefill of 1024 tokens",
      "512 tokens in chunks of 64", "a 20-token turn after 1000 tokens"], "every case of the sweep");
    const ms32 = parseFloat(sweepRows[0][1]);
    for (const r of sweepRows.slice(0, 4)) {
      assert.ok(parseFloat(r[1]) > 0 && Math.abs(parseFloat(r[2]) - parseFloat(r[1]) / ms32) < 0.01, `${r[0]}: ${r[1]}, ${r[2]}`);
    }
    assert.ok(!(await page.isDisabled("#generate")), "the page can send again");

    // 4. A reload starts from the Cache API: no download of the model files. The other build:
    //    ?build=threads (or ?build=simd where the threaded one was picked) must answer with the
    //    very same greedy text; the threaded one also runs the benchmark mode.
    //    Before it, the cached tokenizer and one part of the model (a byte flipped; it streams
    //    into the engine's memory, src/file_parts.rs) are damaged, and a file no manifest lists
    //    is put in the cache: the load must heal the first two (deleted, downloaded again) and
    //    delete the third.
    const tampered = await page.evaluate(async () => {
      const manifest = await (await fetch("models/smollm2-135m/manifest.json")).json();
      const model = manifest.files.find((f) => f.name === manifest.default.file);
      const cache = await caches.open("wasmlm-models-v1");
      const damaged = [];
      for (const entry of [manifest.files.find((f) => f.name === "tokenizer.json"), (model.parts ?? [model])[1] ?? model]) {
        const key = new URL(`wasmlm-cache/sha256/${entry.sha256}`, location.href).href;
        const bytes = new Uint8Array(await (await cache.match(key)).arrayBuffer());
        bytes[bytes.length >> 1] ^= 1;
        await cache.put(key, new Response(bytes));
        damaged.push({ name: entry.name, key, sha: entry.sha256 });
      }
      const orphan = new URL(`wasmlm-cache/sha256/${"0".repeat(64)}`, location.href).href;
      await cache.put(orphan, new Response("a file of a bundle since rebuilt"));
      return { damaged, orphan };
    });
    const other = cores >= 3 ? "simd" : "threads";
    await open(page, `${url}?build=${other}`, true);
    await loadModel(page);
    const healed = await page.evaluate(async ({ damaged, orphan }) => {
      const cache = await caches.open("wasmlm-models-v1");
      const hexes = [];
      for (const { key } of damaged) {
        const bytes = await (await cache.match(key)).arrayBuffer();
        hexes.push(Array.from(new Uint8Array(await crypto.subtle.digest("SHA-256", bytes)), (b) => b.toString(16).padStart(2, "0")).join(""));
      }
      return { hexes, orphan: !!(await cache.match(orphan)), notices: document.querySelector("#notices").textContent };
    }, tampered);
    log("cache healed:", JSON.stringify({ ...healed, notices: healed.notices.slice(0, 400) }));
    for (const [i, d] of tampered.damaged.entries()) {
      assert.equal(healed.hexes[i], d.sha, `the damaged ${d.name} was downloaded again and cached intact`);
      assert.ok(healed.notices.includes(`cached copy of ${d.name} was damaged`), `${d.name}: ${healed.notices}`);
    }
    assert.equal(healed.orphan, false, "the file no manifest lists was deleted");
    assert.match(healed.notices, /Deleted 1 cached model file/);
    const otherInfo = await page.textContent("#model-info");
    assert.match(otherInfo, other === "threads" ? /WebAssembly build: simd128, [2-8] threads \(threaded build\)/
      : /WebAssembly build: simd128, 1 thread\b/);
    await page.check("#chat");
    const again = await generate(page, "What is the capital of France?", 16);
    log(`answer, ?build=${other}:`, JSON.stringify(again));
    assert.equal(again.text, paris.text, "the threaded and single-threaded builds give the same greedy text");
    await page.uncheck("#bench-peer-ort");
    await page.uncheck("#bench-peer-wllama");
    await page.check("#bench-profile");
    await page.click("#bench");
    await page.waitForSelector("#bench-download:not([hidden])", { timeout: 600_000 });
    await page.waitForFunction(() => !document.querySelector("#bench").disabled, null, { timeout: 600_000 });
    const otherBench = await page.textContent("#bench-status");
    log(`bench, ?build=${other}:`, otherBench);
    assert.match(otherBench, /^decode \d/, "the other build's benchmark ran");
    // ... with the per-op profile ticked: every q8 block product is timed once per step
    const profile = await page.$$eval("#bench-profile-table tr", (rows) => rows.map((r) => [...r.cells].map((c) => c.textContent).join(" | ")));
    log(`per-op profile, ?build=${other}:`, await page.textContent("#bench-profile-table caption"));
    for (const line of profile.slice(0, 8)) log("  ", line);
    const products = Number(/int8 kernels: (\d+) x q8 blocks/.exec(otherInfo)?.[1]);
    const q8 = await page.locator("#bench-profile-table tr", { hasText: "WasmlmBlockQ8MatMul" }).locator("td").allTextContents();
    assert.ok(products > 0 && q8.length === 4, `the profile lists the q8 block products: ${profile.join(" / ")}`);
    assert.equal(Number(q8[3]), products, "each q8 block product is timed once per step");
    const reloaded = await page.textContent("#progress-text");
    log("after reload:", reloaded);
    // one part of it was damaged above and downloaded again: the progress does not claim the cache
    assert.match(reloaded, /^model\.with_past\.int8\.onnx: ([\d.]+) \/ \1 MB \(100%\)$/, "the reload's progress is the download's");
    assert.deepEqual(errors, [], "no page errors");

    // 4b. The ort-dynamic-qint8 file, whose products the relaxed-SIMD build runs on its relaxed
    //     kernel (the others on SIMD128's): the relaxed, SIMD128 and threaded builds must give the
    //     same greedy text (each computes the integer products exactly).
    const ortq = JSON.stringify({ id: "smollm2-135m", file: "model.with_past.ort-dynamic-qint8.onnx" });
    const ortqAnswers = {};
    for (const b of ["relaxed", "simd", "threads"]) {
      await open(page, `${url}?build=${b}`, true); // the service worker is there: no reload
      await page.selectOption("#model", ortq);
      await loadModel(page);
      if (b !== "relaxed") {
        const cached = await page.textContent("#progress-text");
        assert.match(cached, /from the browser's cache/, `?build=${b}: the second load reads the cache: ${cached}`);
      }
      const info = await page.textContent("#model-info");
      assert.match(info, b === "relaxed" ? /int8 kernels: \d+ x dynamic-quant relaxed-simd\b/ : /int8 kernels: \d+ x dynamic-quant simd128\b/,
        `?build=${b}: the ort-dynamic-qint8 file's products on this build's kernel: ${info}`);
      await page.check("#chat");
      ortqAnswers[b] = await generate(page, "What is the capital of France?", 16);
      log(`ort-dynamic-qint8 file, ?build=${b}:`, JSON.stringify(ortqAnswers[b]));
      // the bandwidth probe: the threaded build's only
      assert.equal(await page.isDisabled("#membw"), b !== "threads", `?build=${b}: the bandwidth probe is offered on the threaded build only`);
      if (b === "threads") {
        await page.click("#membw");
        await page.waitForFunction(() => !document.querySelector("#membw").disabled, null, { timeout: 300_000 });
        const probe = await page.textContent("#membw-status");
        log("bandwidth probe:", probe);
        assert.match(probe, /^memory read: \d+\.\d GB\/s on 1 thread, \d+\.\d GB\/s on [2-8] \(\d\.\d\dx; medians of 5 rounds/);
      }
    }
    assert.match(ortqAnswers.relaxed.text, /Paris/, "the ort-dynamic-qint8 file's answer names Paris");
    assert.equal(ortqAnswers.simd.text, ortqAnswers.relaxed.text, "the relaxed and SIMD128 builds give the same greedy text");
    assert.equal(ortqAnswers.threads.text, ortqAnswers.relaxed.text, "the relaxed and threaded builds give the same greedy text");
    assert.deepEqual(errors, [], "no page errors");

    // 5. A user's own files: bytes that are not ONNX, then a file without its tokenizer, are
    // refused with messages that say so.
    const tokenizer = { name: "tokenizer.json", mimeType: "application/json",
      buffer: readFileSync(resolve(dist, "models/smollm2-135m/tokenizer.json")) };
    await page.setInputFiles("#files", [{ name: "mine.onnx", mimeType: "application/octet-stream",
      buffer: Buffer.from("this is not an ONNX file") }, tokenizer]);
    await page.waitForFunction(() => document.querySelector("#status").className === "error", null, { timeout: 60_000 });
    const bad = await page.textContent("#status");
    log("bad user file:", bad);
    assert.match(bad, /ONNX file could not be read/, "a clear error for bytes that are not ONNX");
    await page.setInputFiles("#files", [{ name: "only.onnx", mimeType: "application/octet-stream", buffer: Buffer.from("x") }]);
    assert.match(await page.textContent("#status"), /needs its tokenizer\.json/, "a clear error without tokenizer.json");
    // 5a. A user's own files that make a model, from disk: the default bundle's file, tokenizer
    //     and chat template (chat_template.jinja, as transformers saves it; the bundle's
    //     tokenizer_config.json has none). The file is read as a stream into the engine's memory
    //     in parts; the chat answer is the bundle's.
    const bundleDir = resolve(repo, "build/models/smollm2-135m");
    await page.setInputFiles("#files", ["model.with_past.int8.onnx", "tokenizer.json", "tokenizer_config.json",
      "chat_template.jinja"].map((f) => resolve(bundleDir, f)));
    // the load disables #load until it ends, either way
    await page.waitForFunction(() => !document.querySelector("#load").disabled, null, { timeout: 600_000 });
    const userStatus = await page.textContent("#status");
    assert.doesNotMatch(await page.getAttribute("#status", "class"), /error/, `the user's files loaded: ${userStatus}`);
    assert.match(await page.textContent("#model-info"), /model\.with_past\.int8\.onnx, 14\d\.\d MB/, "the page names the user's file");
    await page.check("#chat");
    const mine = await generate(page, "What is the capital of France?", 16);
    assert.equal(mine.text, paris.text, "the user's copy of the default model answers as the bundle does");
    log("a user's own files:", userStatus);

    // 5b. Bundles from another origin: ?models=URL reads the index and the manifest there (the
    //     parts, already in the Cache API under their sha256, are not fetched again).
    const cdn = await corsServer(resolve(dist, "models"));
    try {
      await open(page, `${url}?models=${encodeURIComponent(cdn.url)}`, true);
      await loadModel(page);
      assert.ok(cdn.seen.includes("/index.json") && cdn.seen.includes("/smollm2-135m/manifest.json"),
        `the page read the other origin's index and manifest: ${cdn.seen.join(", ")}`);
      assert.equal(await page.inputValue("#models-root"), cdn.url, "the field shows where the bundles come from");
      await page.check("#chat");
      const remote = await generate(page, "What is the capital of France?", 16);
      assert.equal(remote.text, paris.text, "the same answer from the other origin's bundle");
      log("bundles from another origin:", cdn.seen.length, "requests there");
      await open(page, `${url}?models=${encodeURIComponent("javascript:alert(1)")}`, true, false);
      await page.waitForFunction(() => document.querySelector("#status").className === "error");
      assert.match(await page.textContent("#status"), /only http\(s\) URLs/, "a URL of another scheme is refused");
    } finally {
      cdn.close();
    }
    // 5d. A Hugging Face repository by id (?hub=…), from a local server with the hub's URL layout
    //     and CORS (build.sh lays the default bundle out as a transformers.js repository, q8
    //     only): downloaded with progress, run, and the page says what it found; a reload reads
    //     the browser's cache, not the server; a missing dtype and an unreachable hub are clear
    //     errors.
    const hub = await hubServer(hubRoot);
    const errorsBefore = errors.length;
    try {
      const hubUrl = (repo, dtype, endpoint = hub.url) =>
        `${url}?hub=${encodeURIComponent(repo)}&dtype=${dtype}&hub_endpoint=${encodeURIComponent(endpoint)}`;
      const waitLoad = async () => {
        await page.waitForFunction(() => !document.querySelector("#generate").disabled ||
          document.querySelector("#status").className === "error", null, { timeout: 600_000 });
        return page.textContent("#status");
      };
      await open(page, hubUrl("wasmlm-test/smollm2-135m", "q8"), true, false);
      const hubStatus = await waitLoad();
      assert.doesNotMatch(await page.getAttribute("#status", "class"), /error/, `the repository loaded: ${hubStatus}`);
      const hubInfo = await page.textContent("#model-info");
      log("by repository id:", hubInfo);
      assert.match(hubInfo, /^wasmlm-test\/smollm2-135m: onnx\/model_quantized\.onnx, [\d.]+ MB, q8, with_past, .*from wasmlm-test\/smollm2-135m \(q8, main\), family llama\. KV cache with this engine's names \(past_key_<i>\): 30 layers, 3 key\/value heads of 64; the cache is (kept in place by the attention ops|passed through the graph's inputs and outputs at each step)\. Fast paths: int8 kernels: \d+ x dynamic-quant/,
        "the page says what it found: family, cache layout, dtype, fast paths");
      assert.deepEqual(hub.seen.filter((p) => p.endsWith(".onnx")), ["/wasmlm-test/smollm2-135m/resolve/main/onnx/model_quantized.onnx"]);
      assert.match(await page.textContent("#progress-text"), /onnx\/model_quantized\.onnx: .*MB/, "the download's progress was shown");
      await page.check("#chat");
      const fromHub = await generate(page, "What is the capital of France?", 16);
      log("answer, by repository id:", JSON.stringify(fromHub.text));
      assert.equal(fromHub.text, ortqAnswers.relaxed.text, "the same answer as the same file from the site's bundle");
      const requests = hub.seen.length;
      await open(page, hubUrl("wasmlm-test/smollm2-135m", "q8"), true, false);
      await waitLoad();
      assert.equal(hub.seen.length, requests, "a reload reads the browser's cache, not the hub");
      assert.match(await page.textContent("#progress-text"), /from the browser's cache/);
      await open(page, hubUrl("wasmlm-test/smollm2-135m", "q4"), true, false);
      assert.match(await waitLoad(), /HTTP 404: the repository has no q4 file/, "a missing dtype names itself");
      const closed = `http://127.0.0.1:${await freePort()}`;
      const t = Date.now();
      await open(page, hubUrl("wasmlm-test/elsewhere", "q8", closed), true, false);
      const offline = await waitLoad();
      log(`unreachable hub, after ${Date.now() - t} ms:`, offline);
      assert.match(offline, /cannot reach http:\/\/127\.0\.0\.1:\d+ to fetch wasmlm-test\/elsewhere .*offline/, "offline: a clear error");
      await open(page, `${url}?hub=${encodeURIComponent("../../etc")}`, true, false);
      assert.match(await waitLoad(), /is not a Hugging Face repository id/);
    } finally {
      hub.close();
    }
    // the 404 and the refused connection above are the browser's own console errors
    const expected = (e) => /Failed to load resource|ERR_CONNECTION_REFUSED|404/.test(e);
    errors.splice(errorsBefore, errors.length - errorsBefore, ...errors.slice(errorsBefore).filter((e) => !expected(e)));
    assert.deepEqual(errors, [], "no page errors");

    // 5c. ?isolate=0 removes the isolation service worker the threaded build's steps installed.
    assert.ok(await page.evaluate(async () => (await navigator.serviceWorker.getRegistrations()).length) > 0);
    await open(page, `${url}?isolate=0`, false);
    await page.waitForFunction(() => /isolation service worker was removed/.test(document.querySelector("#notices").textContent));
    assert.equal(await page.evaluate(async () => (await navigator.serviceWorker.getRegistrations()).length), 0,
      "?isolate=0 unregistered the service worker");
    assert.deepEqual(errors, [], "no page errors (nor Content-Security-Policy violations)");

    // 6. Where the threaded build would not run (2 cores, no ?build=threads), a new visitor's
    //    page registers no service worker and reloads nothing; `./build.sh serve` sends the
    //    isolation headers itself.
    const fresh = await browser.newContext();
    const plain = await fresh.newPage();
    plain.on("pageerror", (e) => errors.push(`pageerror (new visitor): ${e.message}`));
    if (cores < 3) {
      await open(plain, url, false);
      const registered = await plain.evaluate(async () => (await navigator.serviceWorker.getRegistrations()).length);
      assert.equal(registered, 0, `no service worker on ${cores} cores without ?build=threads`);
      assert.equal(await plain.evaluate(() => self.crossOriginIsolated), false);
      log(`static host, ${cores} cores: no service worker, not isolated`);
    }
    const isolatedPort = await freePort();
    servers.push(await serve(isolatedPort, true));
    await open(plain, `http://127.0.0.1:${isolatedPort}/?isolate=0`, false);
    assert.equal(await plain.evaluate(() => self.crossOriginIsolated), true, "./build.sh serve isolates the page");
    await fresh.close();
    assert.deepEqual(errors, [], "no page errors");
    log("screenshot:", screenshot);
    log("passed");
  } finally {
    await browser.close();
    servers.forEach((s) => s.kill());
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
