// End to end, in Debian's headless Chromium (driven by playwright-core; no browser download):
// serve the built dist/ folder the way `./build.sh serve` does, load the default model (SmolLM2
// INT8 with past) through the page, ask "What is the capital of France?" in chat mode, and check
// that "Paris" streams into the output, that the per-token timings are positive, that the live
// row and the benchmark row land in the baseline table (then the peer's, onnxruntime-web on the
// same file in the same browser, with our ratio to it), and that generated markup ("<b>") shows
// as text, and that a reload loads the model from the Cache API. A screenshot goes to
// tests/out/e2e.png.
//
//   node tests/node/e2e.mjs [dist folder]      (./build.sh test runs it after building dist/)
import { spawn } from "node:child_process";
import { mkdirSync, readFileSync } from "node:fs";
import { createServer } from "node:net";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "../..");
const dist = resolve(process.argv[2] || resolve(repo, "dist"));
const out = resolve(repo, "tests/out");
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
mkdirSync(out, { recursive: true });

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

async function loadModel(page) {
  await page.waitForSelector("#model option", { state: "attached" });
  await page.click("#load");
  await page.waitForFunction(() => !document.querySelector("#generate").disabled ||
    document.querySelector("#status").className === "error", null, { timeout: 600_000 });
  const status = await page.textContent("#status");
  assert.ok(!(await page.getAttribute("#status", "class")).includes("error"), `load failed: ${status}`);
  return status;
}

async function generate(page, prompt, maxNew) {
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
    stoppedBy: await page.textContent('#stats dd[data-key="stopped by"]'),
  };
}

async function main() {
  const port = await freePort();
  const server = await serve(port, true);
  const servers = [server];
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
    log("open", url);
    await page.goto(url);
    await page.waitForSelector("#model option", { state: "attached" });
    const picked = JSON.parse(await page.inputValue("#model"));
    assert.equal(picked.id, "smollm2-135m", "the default model is preselected");
    assert.equal(picked.file, "model.with_past.int8.onnx", "the default file is preselected");
    // the table comes after the picker (baselines.json is fetched once the bundles are listed)
    await page.waitForSelector("#baselines table tbody tr", { state: "attached", timeout: 30_000 })
      .catch(async () => assert.fail(`the native baseline table is shown: ${await page.textContent("#baselines")}`));

    log("load", picked.file);
    const t0 = Date.now();
    const status = await loadModel(page);
    log(`ready after ${((Date.now() - t0) / 1000).toFixed(1)} s: ${status}`);
    const modelInfo = await page.textContent("#model-info");
    log(modelInfo);
    // Chromium validates SIMD and relaxed SIMD, and the served headers isolate the page: the page
    // must pick the threaded SIMD128 build from 3 cores on (a thread per core but one), else the
    // relaxed-SIMD one, after its kernel check
    assert.equal(await page.evaluate(() => self.crossOriginIsolated), true, "./build.sh serve isolates the page");
    const cores = await page.evaluate(() => navigator.hardwareConcurrency);
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

    // 2. Generated markup shows as text, never as HTML.
    const markup = await generate(page, "Write the HTML tag that makes text bold.", 16);
    log("markup answer:", JSON.stringify(markup.text));
    assert.ok(markup.text.includes("<b>"), `the model was expected to write <b>: ${markup.text}`);
    assert.equal(await page.locator("#output *").count(), 0, "no element was created from generated text");
    assert.ok((await page.innerText("#output")).includes("<b>"), "the tag shows as text");

    // 3. Benchmark mode: the native bench's protocol; its row lands in the table, then the
    //    peer's (onnxruntime-web in this browser, same file), and our row names the ratio.
    await page.fill("#bench-runs", "3");
    await page.check("#bench-peer");
    await page.click("#bench");
    await page.waitForSelector("#bench-download:not([hidden])", { timeout: 600_000 });
    await page.waitForFunction(() => !document.querySelector("#bench").disabled, null, { timeout: 600_000 });
    const benchStatus = await page.textContent("#bench-status");
    log("bench:", benchStatus);
    assert.doesNotMatch(benchStatus, /onnxruntime-web: (?!decode)/, "the peer ran without error");
    const benchRow = page.locator("#baselines tr.live", { hasText: "benchmark mode)" });
    assert.equal(await benchRow.count(), 1, "the benchmark row is in the table");
    const cells = await benchRow.locator("td").allTextContents();
    log("bench row:", cells.join(" | "));
    const [median] = cells[6].split(" / ").map(Number);
    assert.ok(median > 0, "bench decode median is positive");
    assert.match(cells[9], /× onnxruntime-web \(this browser\)/, "our row compares with the peer's");
    const peerRow = page.locator("#baselines tr.live", { hasText: "benchmark mode, peer" });
    assert.equal(await peerRow.count(), 1, "the peer row is in the table");
    const peerCells = await peerRow.locator("td").allTextContents();
    log("peer row:", peerCells.join(" | "));
    assert.match(peerCells[1], /^onnxruntime-web/);
    assert.ok(Number(peerCells[6].split(" / ")[0]) > 0, "peer decode median is positive");

    await page.screenshot({ path: resolve(out, "e2e.png"), fullPage: true });

    // 4. A reload starts from the Cache API: no download of the model files. The other build:
    //    ?build=threads (or ?build=simd where the threaded one was picked) must answer with the
    //    very same greedy text; the threaded one also runs the benchmark mode.
    const other = cores >= 3 ? "simd" : "threads";
    await page.goto(`${url}?build=${other}`);
    await loadModel(page);
    const otherInfo = await page.textContent("#model-info");
    assert.match(otherInfo, other === "threads" ? /WebAssembly build: simd128, [2-8] threads \(threaded build\)/
      : /WebAssembly build: simd128, 1 thread\b/);
    await page.check("#chat");
    const again = await generate(page, "What is the capital of France?", 16);
    log(`answer, ?build=${other}:`, JSON.stringify(again));
    assert.equal(again.text, paris.text, "the threaded and single-threaded builds give the same greedy text");
    await page.uncheck("#bench-peer");
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
    const cached = await page.textContent("#progress-text");
    log("after reload:", cached);
    assert.match(cached, /from the browser's cache/, "the second load reads the cache");
    assert.deepEqual(errors, [], "no page errors");

    // 4b. The report preset's file, whose products the relaxed-SIMD build runs on its relaxed
    //     kernel (the others on SIMD128's): the relaxed, SIMD128 and threaded builds must give the
    //     same greedy text (each computes the integer products exactly).
    const report = JSON.stringify({ id: "smollm2-135m", file: "model.with_past.report-int8.onnx" });
    const reportAnswers = {};
    for (const b of ["relaxed", "simd", "threads"]) {
      await page.goto(`${url}?build=${b}`);
      await page.waitForSelector("#model option", { state: "attached" });
      await page.selectOption("#model", report);
      await loadModel(page);
      const info = await page.textContent("#model-info");
      assert.match(info, b === "relaxed" ? /int8 kernels: \d+ x dynamic-quant relaxed-simd\b/ : /int8 kernels: \d+ x dynamic-quant simd128\b/,
        `?build=${b}: the report file's products on this build's kernel: ${info}`);
      await page.check("#chat");
      reportAnswers[b] = await generate(page, "What is the capital of France?", 16);
      log(`report file, ?build=${b}:`, JSON.stringify(reportAnswers[b]));
    }
    assert.match(reportAnswers.relaxed.text, /Paris/, "the report file's answer names Paris");
    assert.equal(reportAnswers.simd.text, reportAnswers.relaxed.text, "the relaxed and SIMD128 builds give the same greedy text");
    assert.equal(reportAnswers.threads.text, reportAnswers.relaxed.text, "the relaxed and threaded builds give the same greedy text");
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

    // 6. A static host sends no isolation headers: where the threaded build would run (3 cores
    //    on, or ?build=threads) the page's service worker (coi-sw.js) adds them, after one
    //    reload, and the page is cross-origin isolated all the same; elsewhere no service worker
    //    is registered (nothing to gain, and no reload).
    const plainPort = await freePort();
    servers.push(await serve(plainPort, false));
    const plain = await browser.newPage();
    plain.on("pageerror", (e) => errors.push(`pageerror (static host): ${e.message}`));
    if (cores < 3) {
      await plain.goto(`http://127.0.0.1:${plainPort}/`);
      await plain.waitForSelector("#model option", { state: "attached" });
      const registered = await plain.evaluate(async () => (await navigator.serviceWorker.getRegistrations()).length);
      assert.equal(registered, 0, `no service worker on ${cores} cores without ?build=threads`);
      assert.equal(await plain.evaluate(() => self.crossOriginIsolated), false);
      log(`static host, ${cores} cores: no service worker, not isolated`);
    }
    await plain.goto(`http://127.0.0.1:${plainPort}/${cores < 3 ? "?build=threads" : ""}`);
    let isolated = false;
    for (let i = 0; i < 120 && !isolated; i++) {
      // the page reloads itself once: a check may land in the old page and fail
      isolated = await plain.evaluate(() => self.crossOriginIsolated === true).catch(() => false);
      if (!isolated) await new Promise((r) => setTimeout(r, 250));
    }
    assert.ok(isolated, "the service worker made the static-host page cross-origin isolated");
    await plain.waitForSelector("#model option", { state: "attached" });
    assert.ok(await plain.evaluate(() => !!navigator.serviceWorker.controller), "the service worker controls the page");
    log("static host: isolated by the service worker");
    assert.deepEqual(errors, [], "no page errors");
    log("screenshot:", resolve(out, "e2e.png"));
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
