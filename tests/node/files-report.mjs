// Every INT8 file of a site (ours and other exporters', e.g. the Optimum bundle's q8 and q4) in
// the page's benchmark mode, in headless Chromium: one page per wasm build, each file loaded
// through the client module as an embedding page would (WasmLM.load + lm.bench), the files in
// turn within each round so that their ratios to the default file are taken side by side. Each
// INT8 file also runs in onnxruntime-web, the benchmark mode's peer on the same file, right after
// ours in the same round: the prefill ratio between the two is taken per round.
// docs/browser-files.md, with the machine and the date. `./build.sh benchmarks` runs it. A
// measurement, not a test.
//
//   node tests/node/files-report.mjs SITE --rounds N --runs R --builds B… --out FILE --command TEXT
import { writeFileSync, renameSync } from "node:fs";
import { cpus, totalmem } from "node:os";
import { openSite, options, logger, median } from "./site-browser.mjs";

const args = process.argv.slice(2);
const list = options(args);
const builds = list("--builds");
const rounds = Number(list("--rounds")[0] ?? 3);
const runs = Number(list("--runs")[0] ?? 3);
const out = list("--out")[0];
const command = list("--command").join(" ") || "node tests/node/files-report.mjs";
const site = args[0];
if (!site || !out || !(rounds >= 1) || !(runs >= 1) || builds.length === 0) {
  console.error("usage: node files-report.mjs SITE --rounds N --runs R --builds B… --out FILE --command TEXT");
  process.exit(2);
}
const log = logger("files");

const served = await openSite(site);
const { browser, name: browserName } = served;
const tables = [];
try {
  for (const build of builds) {
    const page = await browser.newPage();
    page.on("console", (m) => { if (m.type() === "error") log("console:", m.text()); });
    await page.goto(`${served.url}/index.html?isolate=0`);
    // the site's files: each bundle's INT8 and INT4 files with a cache, the first bundle's
    // default file first (the reference of the ratios)
    const files = await page.evaluate(async () => {
      const { models } = await (await fetch("models/index.json")).json();
      const found = [];
      for (const model of models) {
        const m = await (await fetch(`models/${model}/manifest.json`)).json();
        const onnx = m.files.filter((f) => f.kind === "onnx" && f.cache === "with_past" && ["int8", "int4"].includes(f.precision));
        for (const f of onnx) {
          found.push({ model, file: f.name, preset: f.preset ?? "", precision: f.precision,
                       reference: model === models[0] && f.name === m.default.file });
        }
      }
      return found.sort((a, b) => b.reference - a.reference);
    });
    if (!files.length || !files[0].reference) throw new Error(`${site}: no default file of the first bundle among the site's files`);
    log(`${build}: ${files.length} files, ${rounds} round(s) of ${runs} run(s) each`);
    const decode = files.map(() => []);
    const prefill = files.map(() => []);
    const ratios = files.map(() => []);
    const ortPrefill = files.map(() => []);
    const ortRatios = files.map(() => []);
    let buildInfo = null;
    for (let round = 0; round < rounds; round++) {
      for (const [i, f] of files.entries()) {
        const r = await page.evaluate(async ({ f, build, runs }) => {
          const { WasmLM } = await import("./wasmlm.js");
          const text = await (await fetch("bench-prompt.txt")).text();
          const { Peer } = await import("./protocol.js");
          const lm = await WasmLM.load({ kind: "bundle", base: `models/${f.model}/`, file: f.file }, { build });
          try {
            const peers = f.precision === "int8" ? [Peer.ORT] : [];
            const { row, peers: rows, peerErrors } = await lm.bench(text, { runs, peers });
            const ort = rows[Peer.ORT];
            if (peers.length && !ort) throw new Error(`onnxruntime-web on ${f.file}: ${peerErrors[Peer.ORT] ?? "no row"}`);
            return { decode: row.decode_ms_per_token.median, prefill: row.prefill_ms.median, build: lm.build,
                     ortPrefill: ort?.prefill_ms.median };
          } finally {
            lm.terminate();
          }
        }, { f, build, runs });
        buildInfo = r.build;
        decode[i].push(r.decode);
        prefill[i].push(r.prefill);
        if (r.ortPrefill !== undefined) {
          ortPrefill[i].push(r.ortPrefill);
          ortRatios[i].push(r.prefill / r.ortPrefill);
        }
        const ort = r.ortPrefill === undefined ? "" : `, prefill ${r.prefill.toFixed(0)} ms against onnxruntime-web's ${r.ortPrefill.toFixed(0)}`;
        log(`${build} round ${round + 1}: ${f.model}/${f.file} ${r.decode.toFixed(2)} ms/token${ort}`);
      }
      for (const i of files.keys()) ratios[i].push(decode[i].at(-1) / decode[0].at(-1));
    }
    const threads = buildInfo?.threadCount ?? 1;
    tables.push({
      where: `${browserName}, ${buildInfo?.simd === "none" ? "no SIMD" : buildInfo?.simd} build, ${threads} thread${threads > 1 ? "s" : ""}`,
      rows: files.map((f, i) => ({ ...f, decode: median(decode[i]), prefill: median(prefill[i]), ratio: median(ratios[i]),
                                   ortPrefill: ortPrefill[i].length ? median(ortPrefill[i]) : null,
                                   ortRatio: ortRatios[i].length ? median(ortRatios[i]) : null })),
    });
    await page.close();
  }
} finally {
  await served.close();
}

const lines = [
  "# Each file in the browser",
  "",
  `Generated by \`${command}\` on ${new Date().toISOString().slice(0, 10)}: ${cpus()[0]?.model ?? "unknown CPU"}, ` +
    `${cpus().length} cores, ${(totalmem() / 2 ** 30).toFixed(0)} GiB. Each file of the site with a KV cache in INT8 or ` +
    `INT4, our bundles' and other exporters' (the Optimum bundle: transformers.js's \`model_quantized.onnx\` and ` +
    `\`model_q4.onnx\`), loaded by the client module and run in the page's benchmark mode (\`lm.bench\`: a 32-token ` +
    `prefill and 63 greedy steps, ${runs} run(s) after a warm-up, median). ${rounds} round(s), the files in turn ` +
    "within each; a file's ratio is its decode over the first file's in the same round (median over rounds). Each INT8 " +
    "file then runs in onnxruntime-web (the benchmark mode's peer, the same file and protocol) in the same round; the " +
    "prefill ratio is ours over onnxruntime-web's, per round, median over rounds.",
  "",
];
for (const t of tables) {
  lines.push(`${t.where}:`, "",
             "| bundle | file | preset | decode ms/token | ratio to the first | 32-token prefill ms | onnxruntime-web's prefill ms | prefill / onnxruntime-web's |",
             "|---|---|---|---|---|---|---|---|");
  for (const r of t.rows) {
    const ort = r.ortPrefill === null ? "| | " : `| ${r.ortPrefill.toFixed(0)} | ${r.ortRatio.toFixed(3)}x `;
    lines.push(`| ${r.model} | ${r.file} | ${r.preset} | ${r.decode.toFixed(2)} | ${r.ratio.toFixed(3)}x | ${r.prefill.toFixed(0)} ${ort}|`);
  }
  lines.push("");
}
writeFileSync(out + ".partial", lines.join("\n"));
renameSync(out + ".partial", out);
log(`${out} written`);
