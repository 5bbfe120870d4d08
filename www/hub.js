// Models by Hugging Face repository id, laid out as transformers.js's repositories are
// (onnx-community/…): config.json, tokenizer.json, tokenizer_config.json (and chat_template.jinja,
// where newer repositories keep the chat template) at the top, and
// onnx/model<suffix>.onnx for each dtype, with its external data beside it where config.json's
// "transformers.js_config" says so. Files come from `<endpoint>/<repo>/resolve/<revision>/<path>`.
// The worker (worker.js) fetches them; the page and the client module check a source with
// `hubSource` before sending it.

/** A dtype's file suffix, as transformers.js names them. */
export const DTYPES = Object.freeze({
  fp32: "", fp16: "_fp16", q8: "_quantized", int8: "_int8", uint8: "_uint8", q4: "_q4", q4f16: "_q4f16", bnb4: "_bnb4",
});

export const DEFAULT_ENDPOINT = "https://huggingface.co";

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$/;

/**
 * A hub source, checked and completed: {kind: "hub", repo, dtype, revision, endpoint, context?}.
 * Throws an Error that says what is wrong.
 */
export function hubSource({ repo, dtype = "q8", revision = "main", endpoint = DEFAULT_ENDPOINT, context } = {}) {
  repo = String(repo ?? "").trim().replace(/^https:\/\/huggingface\.co\//, "").replace(/\/+$/, "");
  const parts = repo.split("/");
  if (!(parts.length <= 2 && parts.every((p) => NAME.test(p) && !p.includes("..")))) {
    throw new Error(`"${repo}" is not a Hugging Face repository id (owner/name, e.g. onnx-community/SmolLM2-135M-Instruct)`);
  }
  if (!Object.hasOwn(DTYPES, dtype)) throw new Error(`dtype "${dtype}": expected one of ${Object.keys(DTYPES).join(", ")}`);
  if (!/^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}$/.test(revision) || revision.includes("..")) throw new Error(`revision "${revision}": a branch, tag or commit`);
  let url;
  try {
    url = new URL(endpoint);
  } catch {
    throw new Error(`endpoint "${endpoint}": not a URL`);
  }
  if (url.protocol !== "https:" && url.protocol !== "http:") throw new Error(`endpoint "${endpoint}": only http(s)`);
  if (context !== undefined && !(Number.isInteger(context) && context >= 1)) throw new Error(`context ${context}: a whole number of tokens from 1`);
  return { kind: "hub", repo, dtype, revision, endpoint: url.href.replace(/\/+$/, ""), context };
}

/** Where a repository's files are: the folder URL that ends in "/". */
export const resolveBase = (s) => `${s.endpoint}/${s.repo}/resolve/${encodeURIComponent(s.revision)}/`;

/** The ONNX file of a dtype: onnx/model<suffix>.onnx. */
export const onnxPath = (dtype) => `onnx/model${DTYPES[dtype]}.onnx`;

/**
 * The external data files of `path` (e.g. "onnx/model_q4.onnx"), from config.json's
 * "transformers.js_config".use_external_data_format: true or a count of chunks, for all files or
 * per file name. Chunk 0 is "<file>_data", chunk i "<file>_data_<i>".
 */
export function externalDataPaths(config, path) {
  const setting = config?.["transformers.js_config"]?.use_external_data_format;
  const name = path.split("/").pop();
  const v = setting !== null && typeof setting === "object" ? setting[name] ?? setting[name.replace(/\.onnx$/, "")] : setting;
  const chunks = v === true ? 1 : Number.isInteger(v) && v > 0 ? Math.min(v, 64) : 0;
  return Array.from({ length: chunks }, (_, i) => `${path}_data${i ? `_${i}` : ""}`);
}

/** The context a repository's config gives (GPT-2: n_positions), or undefined. */
export function configContext(config) {
  const n = config?.max_position_embeddings ?? config?.n_positions ?? config?.text_config?.max_position_embeddings;
  return Number.isInteger(n) && n > 0 ? n : undefined;
}
