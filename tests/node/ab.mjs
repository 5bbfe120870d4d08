// Two wasm builds in headless Chromium, alternating, in rounds (a measurement, not a test; the
// numbers in the README's "The threaded build" and "The relaxed-SIMD build"). The builds default
// to the threaded one against the single-threaded SIMD128 one; AB_BUILDS=relaxed,simd picks others.
//
//   ./build.sh site && (cd tests/node && node ab.mjs bench ../../dist distilgpt2-shape:model.with_past.ort-dynamic-qint8.onnx smollm2-135m:model.with_past.int8.onnx)
//   (cd tests/node && node ab.mjs generate ../../dist)     # the default model, the page drawing every token
//   (cd tests/node && node ab.mjs profile ../../dist smollm2-135m:model.with_past.int8.onnx)
//
// AB_ROUNDS=N: N rounds (default 2). bench: the page's benchmark mode, 3 runs, no peer. generate: two 64-token generations per
// build and round, the page's own decode median and p90. profile: bench, then the per-op
// profile ("then time each op"), its 12 costliest ops printed.
import { spawn } from "node:child_process";
import { resolve } from "node:path";
import { chromium } from "playwright-core";

const [mode, distArg, ...files] = process.argv.slice(2);
if (!["bench", "generate", "profile"].includes(mode) || !distArg) {
  console.error("usage: node ab.mjs bench|generate|profile DIST [MODEL:FILE ...]");
  process.exit(2);
}
const builds = (process.env.AB_BUILDS || "threads,simd").split(",");
const repo = resolve(import.meta.dirname, "../..");
const port = 8931;
const server = spawn("bash", [resolve(repo, "build.sh"), "serve", resolve(distArg)],
  { stdio: "ignore", env: { ...process.env, PORT: String(port) } });
await new Promise((r) => setTimeout(r, 1500));
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"] });

async function load(page, build, spec) {
  await page.goto(`http://127.0.0.1:${port}/?build=${build}`);
  await page.waitForSelector("#model option", { state: "attached" });
  if (spec) {
    const [id, file] = spec.split(":");
    const value = await page.evaluate(([id, file]) => [...document.querySelectorAll("#model option")].map((o) => o.value)
      .find((v) => { const j = JSON.parse(v); return j.id === id && j.file === file; }), [id, file]);
    await page.selectOption("#model", value);
  }
  await page.click("#load");
  await page.waitForFunction(() => !document.querySelector("#generate").disabled || document.querySelector("#status").className === "error",
    null, { timeout: 600000 });
  if ((await page.getAttribute("#status", "class")).includes("error")) throw new Error(await page.textContent("#status"));
}

try {
  for (const round of Array.from({ length: Number(process.env.AB_ROUNDS || 2) }, (_, i) => i + 1)) for (const spec of mode === "generate" ? [null] : files) for (const build of builds) {
    const page = await browser.newPage();
    await load(page, build, spec);
    if (mode !== "generate") {
      await page.fill("#bench-runs", "3");
      await page.uncheck("#bench-peer-ort");
      await page.uncheck("#bench-peer-wllama");
      await page.setChecked("#bench-profile", mode === "profile");
      await page.click("#bench");
      await page.waitForSelector("#bench-download:not([hidden])", { timeout: 600000 });
      console.log(round, spec, build, "|", await page.textContent("#bench-status"));
      if (mode === "profile") {
        console.log("   ", await page.textContent("#bench-profile-table caption"));
        for (const r of (await page.$$eval("#bench-profile-table tr", (rows) => rows.map((r) => [...r.cells].map((c) => c.textContent).join(" | ")))).slice(1, 13)) console.log("   ", r);
      }
    } else {
      for (const rep of [1, 2]) {
        await page.fill("#prompt", "Write a long story about a dragon who learns to cook.");
        await page.fill("#max-new-tokens", "64");
        await page.click("#generate");
        await page.waitForSelector('#stats dd[data-key="stopped by"]', { timeout: 300000 });
        const stat = (key) => page.textContent(`#stats dd[data-key="${key}"]`);
        console.log(round, build, rep, "median", await stat("decode ms/token, median"), "p90", await stat("decode ms/token, p90"),
          "tokens", await stat("tokens"));
        await page.evaluate(() => { document.querySelector("#stats").innerHTML = ""; });
      }
    }
    await page.close();
  }
} finally {
  await browser.close();
  server.kill();
}
