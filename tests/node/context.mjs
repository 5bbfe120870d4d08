// The context sweep (the engine's bench::context_sweep, as `wasmlm context` runs it natively) in a
// wasm build under Node: decode ms/token after pasts of 32 to 2,048 tokens, prefill tokens/s,
// and a 20-token turn after a 1,000-token conversation. A measurement, not a test.
//
//   node tests/node/context.mjs build/pkg/simd build/models/smollm2-135m [FILE] [--rounds N] [--json]
import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const args = process.argv.slice(2);
const flag = (name) => { const i = args.indexOf(name); return i < 0 ? undefined : args.splice(i, name === "--json" ? 1 : 2).at(-1); };
const json = flag("--json") !== undefined;
const rounds = Number(flag("--rounds") ?? 3);
const [pkg, bundle, fileArg] = args;
if (!bundle || !(rounds >= 1)) {
  console.error("usage: node context.mjs PKG BUNDLE [FILE] [--rounds N] [--json]");
  process.exit(2);
}
const repo = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const wasm = await import(resolve(pkg, "wasmlm.js"));
await wasm.default({ module_or_path: readFileSync(resolve(pkg, "wasmlm_bg.wasm")) });
const manifest = readFileSync(resolve(bundle, "manifest.json"), "utf8");
const file = fileArg ?? JSON.parse(manifest).default.file;
const onnx = readFileSync(resolve(bundle, file));
const tokenizer = readFileSync(resolve(bundle, "tokenizer.json"));
const digest = async (b) => Buffer.from(await crypto.subtle.digest("SHA-256", b)).toString("hex");
const options = { sha256: { [file]: await digest(onnx), "tokenizer.json": await digest(tokenizer) } };
const engine = wasm.Engine.fromBundle(manifest, file, onnx, tokenizer, options);
const text = readFileSync(resolve(repo, "models/data/tinyshakespeare.txt"), "utf8");
const sweep = engine.contextSweep(text, rounds);
for (let i = 0; i < sweep.steps; i++) {
  if (!json) process.stderr.write(`${i + 1}/${sweep.steps} ${sweep.label(i)}\n`);
  sweep.step(i);
}
const v = sweep.result();
if (json) {
  console.log(JSON.stringify({ ...v, build: `${pkg} (Node ${process.versions.node})` }, null, 2));
} else {
  console.log(`${v.model} ${v.file}, ${pkg} in Node ${process.versions.node}, median of ${v.rounds} rounds`);
  for (const d of v.decode) console.log(`decode after ${d.past} tokens: ${d.ms_per_token} ms/token (${d.ratio_to_32}x past 32)`);
  for (const p of v.prefill) console.log(`prefill of ${p.tokens} tokens: ${p.tokens_per_s} tokens/s`);
  const c = v.prefill_512_chunked;
  if (c) console.log(`512 tokens in chunks of ${c.chunk}: ${c.tokens_per_s} tokens/s (at once: ${c.at_once_tokens_per_s})`);
  const t = v.second_turn;
  if (t) console.log(`a ${t.turn}-token turn after ${t.history} tokens: ${t.ms_after_history} ms; on an empty cache ${t.ms_on_empty_cache} ms (${t.ratio}x)`);
}
