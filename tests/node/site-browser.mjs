// A built site served by `./build.sh serve` (the isolation headers, so that the threaded build
// runs) and headless Chromium to open it, and the command line, log and median the measurement
// scripts (context-report.mjs, files-report.mjs, memory-report.mjs) share.
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

/**
 * The command line's options: `list("--name")` takes the values after each `--name` out of
 * `args` (what is left is the positional arguments).
 */
export function options(args) {
  return (name) => {
    const out = [];
    let i;
    while ((i = args.indexOf(name)) >= 0) {
      args.splice(i, 1);
      while (args[i] && !args[i].startsWith("--")) out.push(args.splice(i, 1)[0]);
    }
    return out;
  };
}

/** A log line on stderr, tagged with the script and the time. */
export const logger = (tag) => (...a) => console.error(`[${tag} ${new Date().toISOString().slice(11, 19)}]`, ...a);

export const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
