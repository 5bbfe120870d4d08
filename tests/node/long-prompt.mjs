// A long prompt's prefill and the decode steps after it, in a wasm build under Node (a
// measurement, not a test; the README's "Long prompts" table).
//
//   node tests/node/long-prompt.mjs build/pkg/simd build/models/distilgpt2-shape model.with_past.ort-dynamic-qint8.onnx [--no-fused-ops]
//
// The prompt: the first 2400 characters of models/data/tinyshakespeare.txt (680 tokens for
// GPT-2's tokenizer). Three sessions, each a prefill then three steps.
import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const [pkg, bundle, file, flag] = process.argv.slice(2);
if (!file || (flag && flag !== "--no-fused-ops")) {
  console.error("usage: node long-prompt.mjs PKG BUNDLE FILE [--no-fused-ops]");
  process.exit(2);
}
const repo = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const wasm = await import(resolve(pkg, "wasmlm.js"));
await wasm.default({ module_or_path: readFileSync(resolve(pkg, "wasmlm_bg.wasm")) });
const onnx = readFileSync(resolve(bundle, file));
const tokenizer = readFileSync(resolve(bundle, "tokenizer.json"));
const digest = async (b) => Buffer.from(await crypto.subtle.digest("SHA-256", b)).toString("hex");
const options = { sha256: { [file]: await digest(onnx), "tokenizer.json": await digest(tokenizer) } };
if (flag) options.fused_ops = false;
const engine = wasm.Engine.fromBundle(readFileSync(resolve(bundle, "manifest.json"), "utf8"), file, onnx, tokenizer, options);
const text = readFileSync(resolve(repo, "models/data/tinyshakespeare.txt"), "utf8").slice(0, 2400);
for (let i = 0; i < 3; i++) {
  const s = engine.session();
  const t0 = performance.now();
  s.prefill(text, { max_new_tokens: 4 });
  const prefill = performance.now() - t0;
  const steps = [];
  for (let j = 0; j < 3; j++) {
    const t = performance.now();
    s.next();
    steps.push(performance.now() - t);
  }
  console.log(`${pkg} ${file}${flag ? " " + flag : ""}: ${s.promptTokens} prompt tokens, prefill ${prefill.toFixed(0)} ms, steps ${steps.map((x) => x.toFixed(1)).join(" ")} ms`);
  s.free();
}
