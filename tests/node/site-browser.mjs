// A built site served by `./build.sh serve` (the isolation headers, so that the threaded build
// runs) and headless Chromium to open it: what the measurement scripts (context-report.mjs,
// files-report.mjs) share.
import { spawn } from "node:child_process";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const repo = resolve(dirname(fileURLToPath(import.meta.url)), "../..");

/** @returns {Promise<{browser: import("playwright-core").Browser, url: string, name: string, close: () => Promise<void>}>} */
export async function openSite(site) {
  const port = 8700 + Math.floor(Math.random() * 200);
  const server = spawn("bash", [resolve(repo, "build.sh"), "serve", site], {
    stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, PORT: String(port) },
  });
  // the server's request log is dropped; its last lines say why, if it does not come up
  let tail = "";
  server.stderr.on("data", (d) => { tail = (tail + d).slice(-2000); });
  const url = `http://127.0.0.1:${port}`;
  let up = false;
  let exited = false;
  server.on("exit", () => { exited = true; });
  for (let i = 0; i < 100 && !up && !exited; i++) {
    try { up = (await fetch(`${url}/index.html`)).ok; } catch { /* not up yet */ }
    if (!up) await new Promise((r) => setTimeout(r, 200));
  }
  if (!up) {
    server.kill();
    throw new Error(`${site}: the server did not come up on ${url}\n${tail}`);
  }
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: ["--headless", "--no-sandbox", "--disable-gpu"] });
  return {
    browser, url, name: `Chromium ${browser.version()}`,
    close: async () => { await browser.close(); server.kill(); },
  };
}
