// The engine's home: a module Web Worker, so the page never freezes while the model loads,
// optimizes or decodes. Its messages are defined once, in protocol.js; wasmlm.js is the client
// that speaks them.
//
// `source` (load) is {kind:"bundle", base:"models/<id>/", file?: "<onnx file in the manifest>"
// (default: the manifest's default)}, {kind:"hub", repo, dtype?, revision?, endpoint?, context?}
// (hub.js) or {kind:"user", name, onnx: Blob, tokenizer: Blob, config?: Blob, modelConfig?: Blob,
// external?: Blob[] (named by their .name), context}.
import { Req, Msg, Peer, PREFILL_CHUNK, checkManifest } from "./protocol.js";
import { hubSource, resolveBase, onnxPath, externalDataPaths, configContext } from "./hub.js";

const SIMD_PROBE = new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 123, 3, 2, 1, 0, 10,
  10, 1, 8, 0, 65, 0, 253, 15, 253, 98, 11]);
// () -> v128: i32x4.relaxed_dot_i8x16_i7x16_add_s of three splats (opcode 0xfd 0x113)
const RELAXED_PROBE = new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 123, 3, 2, 1, 0, 10,
  19, 1, 17, 0, 65, 0, 253, 15, 65, 0, 253, 15, 65, 0, 253, 17, 253, 147, 2, 11]);
const CACHE_NAME = "wasmlm-models-v1";

let wasm = null; // the wasm-bindgen module
let memory = null; // its WebAssembly.Memory (what a benchmark row reports: it never shrinks)
let build = null; // {simd, version, ...}
let engine = null;
const sessions = new Map(); // id -> the engine's Session (0: made at load)
let nextSession = 1;
let current = null; // the request running: {req, type, cancelled}
let loaded = null; // {base, entry, manifest} of the bundle file loaded (for the peer)

// every message about the running request carries its number
const post = (msg, transfer) => self.postMessage({ req: current?.req, ...msg }, transfer ?? []);

// A macrotask boundary that is not clamped like setTimeout: lets "cancel" in between tokens.
const channel = new MessageChannel();
const pending = [];
channel.port1.onmessage = () => pending.shift()();
const yieldToEvents = () => new Promise((resolve) => { pending.push(resolve); channel.port2.postMessage(0); });

async function loadWasm(request) {
  if (wasm) return;
  if (typeof WebAssembly !== "object") throw new Error("this browser has no WebAssembly");
  let sizes = {};
  try {
    sizes = await (await fetch(new URL("./pkg/sizes.json", import.meta.url))).json();
  } catch {
    // sizes.json is informative, and says which builds dist/ holds; without it: no threads build
  }
  // The threaded build where the page is cross-origin isolated (SharedArrayBuffer: the served
  // COOP/COEP headers, or the service worker coi-sw.js on a static host) and SIMD is there; else
  // the relaxed-SIMD build where WebAssembly.validate accepts relaxed SIMD (the same build but
  // for the ort-dynamic-qint8 preset's INT8 products); else the SIMD128 build where it accepts SIMD;
  // ?build= forces one.
  const simd = WebAssembly.validate(SIMD_PROBE);
  const relaxed = simd && WebAssembly.validate(RELAXED_PROBE);
  const isolated = self.crossOriginIsolated === true && typeof SharedArrayBuffer === "function";
  const has = (o, k) => Object.hasOwn(o, k); // not `in`: ?build=constructor is no build
  const supported = { threads: simd && isolated && has(sizes, "threads"), relaxed: relaxed && has(sizes, "relaxed"), simd, nosimd: true };
  const forced = request.build || new URL(self.location.href).searchParams.get("build");
  if (forced && !has(supported, forced)) throw new Error(`?build=${forced}: expected threads, relaxed, simd or nosimd`);
  if (forced && !supported[forced]) {
    throw new Error(`?build=${forced}: ` + (forced === "simd" ? "this browser has no WebAssembly SIMD"
      : !has(sizes, forced) ? `this site has no ${forced === "threads" ? "threaded" : "relaxed-SIMD"} build`
      : !simd ? "this browser has no WebAssembly SIMD"
      : forced === "relaxed" ? "this browser has no WebAssembly relaxed SIMD"
      : "the page is not cross-origin isolated (no SharedArrayBuffer)"));
  }
  // One core stays with the page, whose main thread draws every token: on 2 cores (Chromium 156,
  // SmolLM2 q8b32) 2 threads decode at ~8.9 ms/token in benchmark mode (1 thread: ~13.8) but at
  // 13.3-14.0 while the page draws each token (1 thread: 13.8-14.7; docs/decisions.md, Threads).
  // So the threaded build is picked from 3 cores on, with a thread per core but one;
  // ?build=threads forces it with 2 threads at least.
  const cores = navigator.hardwareConcurrency || 1;
  const threadCount = request.threads > 0 ? Math.min(request.threads, 8)
    : Math.min(Math.max(cores - 1, forced === "threads" ? 2 : 1), 8);
  let flavour = forced ||
    (supported.threads && threadCount >= 2 ? "threads" : supported.relaxed ? "relaxed" : simd ? "simd" : "nosimd");
  let dir = `./pkg/${flavour}/`;
  wasm = await import(dir + "wasmlm.js");
  ({ memory } = await wasm.default({ module_or_path: new URL(dir + "wasmlm_bg.wasm", import.meta.url) }));
  let relaxedCheck = null;
  if (flavour === "relaxed") {
    // Relaxed SIMD lets browsers differ; our kernel keeps to the inputs where they may not, and
    // this checks it against the scalar kernel before a token is computed (a few ms). On a
    // difference: the SIMD128 build, or an error if ?build=relaxed forced it.
    const t = performance.now();
    try {
      wasm.checkKernels();
      relaxedCheck = { ok: true, ms: Math.round((performance.now() - t) * 10) / 10 };
    } catch (e) {
      if (forced) throw new Error(`?build=relaxed: this browser's relaxed SIMD gives wrong sums: ${e.message || e}`);
      post({ type: Msg.NOTICE, text: `This browser's relaxed SIMD gave a wrong sum (${e.message || e}): the SIMD128 build is used.` });
      flavour = "simd";
      dir = `./pkg/${flavour}/`;
      wasm = await import(dir + "wasmlm.js");
      ({ memory } = await wasm.default({ module_or_path: new URL(dir + "wasmlm_bg.wasm", import.meta.url) }));
    }
  }
  build = { ...wasm.buildInfo(), dir, simdSupported: simd, relaxedSupported: relaxed, relaxedCheck, isolated,
    threadCount: 1, wasmBytes: sizes[flavour] };
  if (flavour === "threads") {
    // this worker and threadCount - 1 Web Workers sharing the module's memory, which take their
    // share of each product (src/qmatmul/split)
    build.threadCount = threadCount;
    post({ type: Msg.STATUS, text: `starting ${build.threadCount - 1} WebAssembly worker thread(s)` });
    await wasm.startThreads(build.threadCount - 1);
  }
  if (!simd) {
    post({ type: Msg.NOTICE, text: "This browser has no WebAssembly SIMD: the slower build without SIMD is used." });
  }
}

async function openCache() {
  if (typeof caches === "undefined") return null; // not a secure context (http other than localhost)
  try {
    return await caches.open(CACHE_NAME);
  } catch {
    return null;
  }
}

const cacheKey = (sha256) => new URL(`./wasmlm-cache/sha256/${sha256}`, self.location.href).href;

function hex(buffer) {
  return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join("");
}

// Where a file's bytes go as they arrive: a Uint8Array of the file's size (the tokenizer, the
// peers' copies), or part `i` of a wasm.ModelFile, in the engine's own memory (the model: JS
// never holds it whole; src/file_parts.rs). `finish` gives the sha256 (hex) of what was written,
// or undefined without WebCrypto (the engine then hashes the array itself); `written` gives the
// bytes, for the Cache API's copy.
function arraySink(size) {
  const bytes = new Uint8Array(size);
  let at = 0;
  return {
    bytes,
    write(chunk) { bytes.set(chunk, at); at += chunk.length; },
    restart() { at = 0; },
    finish: () => sha256(bytes),
    written: () => bytes,
  };
}

function partSink(file, i) {
  // a view of wasm memory, read at once by whoever takes it. WebCrypto and Response take no
  // shared memory (the threaded build's): a copy then, made once for both
  let copy = null;
  const written = () => {
    const bytes = file.part(i);
    const shared = typeof SharedArrayBuffer !== "undefined" && bytes.buffer instanceof SharedArrayBuffer;
    return shared ? (copy ??= bytes.slice()) : bytes;
  };
  return {
    write: (chunk) => file.write(i, chunk),
    restart: () => { copy = null; file.restart(i); },
    async finish() {
      file.finish(i);
      if (!crypto.subtle) return undefined;
      return hex(await crypto.subtle.digest("SHA-256", written()));
    },
    written,
  };
}

// A response body's bytes as they arrive. A download's are read with a BYOB reader into one
// buffer, reused: each chunk of the default reader is a new ArrayBuffer, which stays in the
// worker after a load until a garbage collection, and nothing after a load allocates enough to
// bring one (docs/decisions.md, "Memory at load"). Each view is valid until the next. A cached
// entry's body takes the default reader: in Chromium 156, BYOB reads of the parts' cached
// bodies, four at a time, stopped partway (measured once, not understood).
const READ_BUFFER = 1 << 20;
async function* views(body, { byob }) {
  let reader = null;
  let buffer = null;
  if (byob) {
    try {
      reader = body.getReader({ mode: "byob" });
      buffer = new ArrayBuffer(READ_BUFFER);
    } catch { /* not a byte stream: the default reader */ }
  }
  reader ??= body.getReader();
  try {
    for (;;) {
      const { done, value } = buffer ? await reader.read(new Uint8Array(buffer)) : await reader.read();
      if (done) return;
      if (buffer) buffer = value.buffer; // the read transferred it: the same memory, a new handle
      yield value;
    }
  } finally {
    reader.cancel().catch(() => {}); // a consumer that stopped early: release the body
  }
}

// A response body into `sink`, held to the manifest's size.
async function pour(body, entry, sink, onBytes, { byob = false } = {}) {
  let loaded = 0;
  for await (const value of views(body, { byob })) {
    if (loaded + value.length > entry.bytes) {
      throw new Error(`${entry.name}: the server sent more than the manifest's ${entry.bytes} bytes`);
    }
    sink.write(value);
    loaded += value.length;
    onBytes(loaded);
  }
  if (loaded !== entry.bytes) {
    throw new Error(`${entry.name}: ${loaded} bytes arrived, the manifest says ${entry.bytes} (interrupted download?)`);
  }
}

// One file (or part) of the manifest into `sink`: from the Cache API when there and intact,
// else downloaded, checked (size, sha256) and cached under its sha256. A failed check never
// reaches the cache; a cached copy that fails it (a damaged disk cache, a stored entry cut
// short) is deleted and downloaded again. `onBytes(loaded, cached)` follows the bytes. Returns
// the sha256 found (undefined where it could not be computed: no WebCrypto).
async function fetchFile(base, entry, cache, onBytes, sink) {
  const key = cacheKey(entry.sha256);
  if (cache) {
    const hit = await cache.match(key);
    if (hit) {
      let found;
      try {
        await pour(hit.body, entry, sink, (n) => onBytes(n, true));
        found = await sink.finish();
      } catch { /* cut short or too long: damaged */ }
      if (found === entry.sha256) return found;
      sink.restart();
      await cache.delete(key);
      post({ type: Msg.NOTICE, text: `The browser's cached copy of ${entry.name} was damaged; it was deleted and is downloaded again.` });
    }
  }
  // never from the HTTP cache: a rebuilt file under the same name must not come back stale (the
  // Cache API above is keyed by content)
  const res = await fetch(base + entry.name, { cache: "no-store" });
  if (!res.ok) throw new Error(`${base}${entry.name}: HTTP ${res.status} ${res.statusText}`);
  await pour(res.body, entry, sink, (n) => onBytes(n, false), { byob: true });
  const found = await sink.finish();
  if (found && found !== entry.sha256) {
    throw new Error(`${entry.name}: sha256 is ${found}, the manifest says ${entry.sha256} (corrupt download?)`);
  }
  // The Cache API's copy, once the bytes are checked, from where they were written: a copy
  // streamed beside the download is built up in the worker and stays there until a garbage
  // collection (docs/decisions.md, "Memory at load").
  if (!cache) {
    post({ type: Msg.NOTICE, text: "No Cache API here (the page needs https or localhost): the model is kept in memory only." });
  } else {
    try {
      await cache.put(key, new Response(sink.written()));
    } catch (err) {
      post({ type: Msg.NOTICE, text: `${entry.name} is kept in memory only: the browser refused to cache it (${err.name}: ${err.message}).` });
    }
  }
  return found;
}

// Deletes the cached model files (keys under cacheKey) that no cached manifest lists, e.g. the
// files of a bundle since rebuilt; returns how many.
async function prune(cache) {
  const keys = await cache.keys();
  const listed = new Set();
  for (const req of keys) {
    if (!req.url.endsWith("/manifest.json")) continue;
    try {
      const m = JSON.parse(await (await cache.match(req)).text());
      for (const f of m.files ?? []) for (const x of [f, ...(f.parts ?? [])]) listed.add(x.sha256);
    } catch { /* not a manifest: lists nothing */ }
  }
  const prefix = cacheKey("");
  const stale = keys.filter((req) => req.url.startsWith(prefix) && !listed.has(req.url.slice(prefix.length)));
  await Promise.all(stale.map((req) => cache.delete(req)));
  return stale.length;
}

// A progress bar for one manifest entry, whatever its parts: at most one message per 100 ms,
// and the last one always.
function progressOf(entry) {
  let lastPost = 0;
  return (loaded, cached, last = false) => {
    const now = performance.now();
    if (!last && now - lastPost < 100) return;
    lastPost = now;
    post({ type: Msg.PROGRESS, file: entry.name, loaded, total: entry.bytes, cached });
  };
}

const PARALLEL_PARTS = 4;

// One manifest entry's bytes. A file a static site serves in parts (`entry.parts`, each at most
// 25 MiB: docs/decisions.md, "Static hosting") is fetched PARALLEL_PARTS parts at a time, each
// checked and cached on its own. `bytes` is a Uint8Array, or the array of the parts' (the engine
// reads it as one stream); with `wasmFile`, a wasm.ModelFile the parts were written into. Its
// `sha256` is the manifest's when every part was checked against its own, else undefined.
async function fetchEntry(base, entry, cache, { wasmFile = false } = {}) {
  const progress = progressOf(entry);
  const pieces = entry.parts ?? [entry];
  const file = wasmFile ? new wasm.ModelFile(pieces.map((p) => p.bytes)) : null;
  const sinks = pieces.map((p, i) => (file ? partSink(file, i) : arraySink(p.bytes)));
  const loaded = pieces.map(() => 0);
  let cached = true;
  let checked = true;
  const total = () => loaded.reduce((a, b) => a + b, 0);
  let next = 0;
  const lane = async () => {
    while (next < pieces.length) {
      const i = next++;
      const found = await fetchFile(base, pieces[i], cache, (n, hit) => {
        loaded[i] = n;
        cached &&= hit;
        progress(total(), cached);
      }, sinks[i]);
      checked &&= found === pieces[i].sha256;
    }
  };
  try {
    await Promise.all(Array.from({ length: Math.min(PARALLEL_PARTS, pieces.length) }, lane));
  } catch (err) {
    next = pieces.length; // the other lanes stop at their part's end
    file?.free();
    throw err;
  }
  progress(total(), cached, true);
  const bytes = file ?? (entry.parts ? sinks.map((s) => s.bytes) : sinks[0].bytes);
  return { bytes, sha256: checked ? entry.sha256 : undefined };
}

// A file's bytes as one array (for onnxruntime-web, which takes nothing else).
function joined(bytes) {
  if (!Array.isArray(bytes)) return bytes;
  const out = new Uint8Array(bytes.reduce((n, b) => n + b.length, 0));
  let at = 0;
  for (const b of bytes) { out.set(b, at); at += b.length; }
  return out;
}

// WebCrypto's SHA-256 (native speed; the engine's own in wasm runs at ~30 MB/s). Undefined where
// crypto.subtle is missing (not a secure context): the engine then hashes by itself.
async function sha256(bytes) {
  if (!crypto.subtle) return undefined;
  return hex(await crypto.subtle.digest("SHA-256", bytes));
}

// The manifest from the network; without network, the copy cached at the last successful load
// (so a cached model starts offline).
async function fetchManifest(base, cache) {
  const url = new URL(base + "manifest.json", self.location.href).href;
  try {
    const res = await fetch(url, { cache: "no-cache" });
    if (!res.ok) throw new Error(`${base}manifest.json: HTTP ${res.status} (is the model built?)`);
    const text = await res.text();
    checkManifest(JSON.parse(text), url); // not a manifest: an error here, before anything is cached
    if (cache) await cache.put(url, new Response(text)).catch(() => {});
    return text;
  } catch (err) {
    const hit = cache && (await cache.match(url));
    if (!hit) throw err;
    post({ type: Msg.NOTICE, text: `${base}manifest.json could not be fetched (${err.message}); using the cached copy.` });
    return hit.text();
  }
}

async function load(request) {
  const source = request.source;
  post({ type: Msg.STATUS, text: "loading the WebAssembly engine" });
  await loadWasm(request);
  for (const s of sessions.values()) s.free();
  sessions.clear();
  if (engine) { engine.free(); engine = null; }
  loaded = null;
  const t0 = performance.now();
  let found = {}; // what the page shows besides the engine's info: family, hub
  if (source.kind === "bundle") {
    const cache = await openCache();
    const manifestText = await fetchManifest(source.base, cache);
    const manifest = checkManifest(JSON.parse(manifestText), `${source.base}manifest.json`);
    const find = (name) => {
      const e = manifest.files.find((f) => f.name === name);
      if (!e) throw new Error(`${name} is not in ${manifest.id}'s manifest`);
      return e;
    };
    const file = source.file || manifest.default?.file;
    if (!file) throw new Error(`${source.base}manifest.json names no default file: give source.file`);
    const tokenizer = await fetchEntry(source.base, find("tokenizer.json"), cache);
    let onnx = await fetchEntry(source.base, find(file), cache, { wasmFile: true });
    post({ type: Msg.STATUS, text: `optimizing the graph (${file}); large models take seconds` });
    await yieldToEvents();
    const sha256 = {};
    if (onnx.sha256) sha256[file] = onnx.sha256;
    if (tokenizer.sha256) sha256["tokenizer.json"] = tokenizer.sha256;
    engine = wasm.Engine.fromBundle(manifestText, file, onnx.bytes, joined(tokenizer.bytes), { sha256, threads: build.threadCount });
    onnx = null;
    loaded = { base: source.base, entry: find(file), manifest };
    if (cache) {
      const pruned = await prune(cache).catch(() => 0);
      if (pruned) post({ type: Msg.NOTICE, text: `Deleted ${pruned} cached model file(s) that no model's manifest lists any more.` });
    }
  } else if (source.kind === "hub") {
    found = await loadHub(hubSource(source));
  } else if (source.kind === "user") {
    const read = async (file) => new Uint8Array(await file.arrayBuffer());
    post({ type: Msg.STATUS, text: `reading ${source.name}` });
    const onnx = await readUserFile(source.onnx, source.name);
    const tokenizer = await read(source.tokenizer);
    const config = source.config ? await read(source.config) : undefined;
    const template = source.chatTemplate ? await source.chatTemplate.text() : undefined;
    const modelConfig = source.modelConfig ? JSON.parse(await source.modelConfig.text()) : undefined;
    const external = [];
    for (const f of source.external ?? []) external.push({ name: f.name, bytes: await read(f) });
    post({ type: Msg.STATUS, text: `optimizing the graph (${source.name})` });
    await yieldToEvents();
    engine = wasm.Engine.fromUserFiles(source.name, onnx, tokenizer, config, template, source.context, { threads: build.threadCount }, external);
    found = { family: modelConfig?.model_type };
  } else {
    throw new Error(`source.kind "${source.kind}": expected bundle, hub or user`);
  }
  sessions.set(0, engine.session());
  nextSession = 1;
  warmUpDue = true;
  post({ type: Msg.READY, info: { ...engine.info, ...found, click_to_ready_ms: performance.now() - t0 }, build });
}

// A user's own ONNX file, read from disk as a stream into a wasm.ModelFile in parts of USER_PART
// bytes, as a bundle's download is: JS never holds the file whole (a JS copy would stay in the
// worker as garbage after the load), and the engine frees each part once it has decoded past it.
const USER_PART = 16 << 20;
async function readUserFile(f, name) {
  const sizes = [];
  for (let at = 0; at < f.size; at += USER_PART) sizes.push(Math.min(USER_PART, f.size - at));
  const file = new wasm.ModelFile(sizes.length ? sizes : [0]);
  const progress = progressOf({ name, bytes: f.size });
  let part = 0;
  let inPart = 0;
  let loaded = 0;
  try {
    const reader = f.stream().getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      for (let at = 0; at < value.length;) {
        if (part >= sizes.length) throw new Error(`${name} grew while it was read (over its ${f.size} bytes)`);
        const n = Math.min(value.length - at, sizes[part] - inPart);
        file.write(part, value.subarray(at, at + n));
        at += n;
        inPart += n;
        if (inPart === sizes[part]) { file.finish(part++); inPart = 0; }
      }
      loaded += value.length;
      progress(loaded, false);
    }
    if (loaded !== f.size) throw new Error(`${name}: ${loaded} of its ${f.size} bytes could be read`);
    if (f.size === 0) file.finish(0);
  } catch (err) {
    file.free();
    throw err;
  }
  progress(loaded, false, true);
  return file;
}

// ---- a Hugging Face repository (hub.js) ----------------------------------------------------

// The chat template, where newer repositories keep it instead of tokenizer_config.json (it takes
// precedence, as in transformers; src/hub.rs reads the same file natively).
const CHAT_TEMPLATE = "chat_template.jinja";

// Where a repository's file list is kept once all its files are cached: a manifest in the
// bundles' format (so `prune` keeps the files it lists), under a URL of this site that nothing
// serves.
const hubIndexUrl = (s) => new URL(`./wasmlm-cache/hub/${new URL(s.endpoint).host}/${s.repo}/${encodeURIComponent(s.revision)}/${s.dtype}/manifest.json`,
  self.location.href).href;

// A file of the repository whose size and sha256 are not known beforehand: downloaded with
// progress (against Content-Length, when the server sends it), hashed, then cached under its
// sha256. `optional`: a 404 gives null.
async function fetchHubFile(s, path, cache, { optional = false, first = false } = {}) {
  const url = resolveBase(s) + path;
  let res;
  try {
    res = await fetch(url, first ? { signal: AbortSignal.timeout(20_000) } : {});
  } catch (err) {
    const why = err.name === "TimeoutError" ? "no answer in 20 s" : err.message;
    throw new Error(`cannot reach ${s.endpoint} to fetch ${s.repo} (${why}): is this browser offline? A repository's ` +
      "files are kept in the browser after its first load; this one has not been loaded here yet.");
  }
  if (res.status === 404 && optional) return null;
  if (!res.ok) {
    const hint = res.status === 401 || res.status === 403 ? " (a gated or private repository: this page cannot sign in)"
      : res.status === 404 ? await missingHint(s, path) : "";
    throw new Error(`${s.repo}: ${path}: HTTP ${res.status}${hint}`);
  }
  // Content-Length, when sent and not of a compressed body, sizes the buffer once
  const total = res.headers.get("content-encoding") ? 0 : Number(res.headers.get("content-length")) || 0;
  const chunks = [];
  const whole = total ? new Uint8Array(total) : null;
  let loaded = 0;
  let last = 0;
  const reader = res.body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (whole) {
      if (loaded + value.length > total) throw new Error(`${path}: the server sent more than the ${total} bytes it announced`);
      whole.set(value, loaded);
    } else {
      chunks.push(value);
    }
    loaded += value.length;
    if (performance.now() - last > 100) {
      last = performance.now();
      post({ type: Msg.PROGRESS, file: path, loaded, total, cached: false });
    }
  }
  if (total && loaded !== total) throw new Error(`${path}: ${loaded} bytes arrived, the server announced ${total} (interrupted download?)`);
  post({ type: Msg.PROGRESS, file: path, loaded, total: loaded, cached: false });
  const bytes = whole ?? joined(chunks);
  const digest = await sha256(bytes);
  if (cache && digest) {
    try {
      await cache.put(cacheKey(digest), new Response(bytes));
    } catch (err) {
      post({ type: Msg.NOTICE, text: `${path} is kept in memory only: the browser refused to cache it (${err.name}: ${err.message}).` });
    }
  }
  return { name: path, bytes, entry: digest && { name: path, bytes: bytes.length, sha256: digest } };
}

// For a missing file: which ONNX files the repository has, if the hub's API says (best effort).
async function missingHint(s, path) {
  if (!path.startsWith("onnx/")) return ` (no such file in the repository${path === "config.json" ? ", or no such repository" : ""})`;
  try {
    const res = await fetch(`${s.endpoint}/api/models/${s.repo}/tree/${encodeURIComponent(s.revision)}/onnx`, { signal: AbortSignal.timeout(10_000) });
    const names = (await res.json()).map((f) => f.path).filter((p) => p.endsWith(".onnx"));
    if (names.length) return `: no ${s.dtype} file; the repository has ${names.join(", ")}`;
  } catch { /* no API there (a mirror, a static copy): say what was looked for */ }
  return `: the repository has no ${s.dtype} file (transformers.js's name for it)`;
}

async function loadHub(s) {
  const cache = await openCache();
  const indexUrl = hubIndexUrl(s);
  const hit = cache && (await cache.match(indexUrl));
  let files = {};
  if (hit) {
    // every file was cached at the first load: read and check them (no network)
    try {
      const index = checkManifest(await hit.json(), indexUrl);
      for (const entry of index.files) {
        // the graph straight into the engine's memory, as a bundle's
        const got = await fetchEntry(resolveBase(s), entry, cache, { wasmFile: entry.name === onnxPath(s.dtype) });
        files[entry.name] = { name: entry.name, bytes: joined(got.bytes), entry };
      }
    } catch (err) {
      files[onnxPath(s.dtype)]?.bytes.free?.();
      // a file the browser evicted, then changed in the repository: start again from the hub
      await cache.delete(indexUrl);
      post({ type: Msg.NOTICE, text: `The cached copy of ${s.repo} could not be used (${err.message}); it is fetched again.` });
      files = null;
    }
  }
  if (!files || !hit) {
    files = {};
    post({ type: Msg.STATUS, text: `fetching ${s.repo} (${s.dtype}) from ${s.endpoint}` });
    files["config.json"] = await fetchHubFile(s, "config.json", cache, { first: true });
    files["tokenizer.json"] = await fetchHubFile(s, "tokenizer.json", cache);
    for (const name of ["tokenizer_config.json", CHAT_TEMPLATE]) {
      const f = await fetchHubFile(s, name, cache, { optional: true });
      if (f) files[name] = f;
    }
    const config = JSON.parse(new TextDecoder().decode(files["config.json"].bytes));
    const path = onnxPath(s.dtype);
    files[path] = await fetchHubFile(s, path, cache);
    for (const p of externalDataPaths(config, path)) files[p] = await fetchHubFile(s, p, cache);
    const entries = Object.values(files).map((f) => f.entry);
    if (cache && entries.every(Boolean)) {
      // written last: an index names only files that are all in the cache
      const index = { id: s.repo, files: entries, default: { file: path }, hub: { repo: s.repo, revision: s.revision, dtype: s.dtype, endpoint: s.endpoint } };
      await cache.put(indexUrl, new Response(JSON.stringify(index))).catch(() => {});
    }
  }
  let config;
  try {
    config = JSON.parse(new TextDecoder().decode(files["config.json"].bytes));
  } catch (err) {
    throw new Error(`${s.repo}: config.json is not JSON (${err.message})`);
  }
  const path = onnxPath(s.dtype);
  const fromConfig = configContext(config);
  const context = Math.min(s.context ?? fromConfig ?? 2048, fromConfig ?? Infinity);
  const external = externalDataPaths(config, path).map((p) => ({ name: p.split("/").pop(), bytes: files[p].bytes }));
  post({ type: Msg.STATUS, text: `optimizing the graph (${s.repo}, ${path}); large models take seconds` });
  await yieldToEvents();
  const template = files[CHAT_TEMPLATE] && new TextDecoder().decode(files[CHAT_TEMPLATE].bytes);
  engine = wasm.Engine.fromUserFiles(`${s.repo}/${path}`, files[path].bytes, files["tokenizer.json"].bytes,
    files["tokenizer_config.json"]?.bytes, template, context, { threads: build.threadCount }, external);
  return { model: s.repo, file: path, precision: s.dtype, family: config.model_type,
    hub: { repo: s.repo, revision: s.revision, dtype: s.dtype, file: path } };
}

// After a load, while no request runs: a short throwaway generation in a session of its own,
// freed after. A wasm function's first calls run slower in V8 (a load's first three decode
// steps took 1.5-2x the later ones, on first and on return visits), so without it a user's
// first answer paid for them. A request stops it between two of its steps (the most it waits
// is one step) and it starts again once the worker is idle, until one has run to its end or a
// generation has run instead. docs/decisions.md has the measurements.
const WARM_UP = { prompt: "Hello", options: { max_new_tokens: 4, ignore_eos: true } };
let warmUpDue = false; // set by a load, cleared by a warm-up run to its end or a generation
let warming = null; // {session} of the warm-up running

async function warmUp() {
  const w = (warming = { session: null });
  try {
    await yieldToEvents();
    if (warming !== w) return;
    w.session = engine.session();
    w.session.begin(WARM_UP.prompt, WARM_UP.options);
    for (let ev = w.session.next(); ev; ev = w.session.next()) {
      await yieldToEvents();
      if (warming !== w) return; // stopped: stopWarmUp freed the session
    }
    warmUpDue = false;
  } catch (err) {
    // the user's first request meets the same error, with a request to report it on
    console.warn("wasmlm: the warm-up after the load failed:", err);
    warmUpDue = false;
  } finally {
    if (warming === w) stopWarmUp();
  }
}

function stopWarmUp() {
  warming?.session?.free();
  warming = null;
}

function sessionOf(id = 0) {
  if (!engine) throw new Error("no model loaded");
  const s = sessions.get(id);
  if (!s) throw new Error(`no session ${id} (freed, or from before the last load)`);
  return s;
}

// One generation: the prefill in chunks of PREFILL_CHUNK tokens (a message each), then a token
// per message; a cancel between any two stops it. The cache keeps what was fed.
async function stream(session, begin) {
  begin();
  for (let p = session.prefillStep(PREFILL_CHUNK); p; p = session.prefillStep(PREFILL_CHUNK)) {
    post({ type: Msg.PREFILL, fed: p.fed, of: p.of });
    await yieldToEvents();
    if (current.cancelled) break;
  }
  let index = 0;
  let ev = current.cancelled ? undefined : session.next();
  while (ev) {
    post({ type: Msg.TOKEN, index: index++, token: ev.id, text: ev.text, ms: ev.ms, prefill: ev.prefill });
    await yieldToEvents();
    if (current.cancelled) break;
    ev = session.next();
  }
  post({ type: Msg.DONE, reason: current.cancelled ? "Cancelled" : session.stopReason, stats: session.stats,
    promptTokens: session.promptTokens, fedTokens: session.fedTokens, length: session.length,
    context: engine.info.context });
}

async function bench({ text, runs = 5, peers = [], profile = false }) {
  if (!engine) throw new Error("no model loaded");
  if (!engine.info.has_cache) throw new Error("the benchmark mode measures graphs with a KV cache; pick a with_past file");
  const prompt = engine.benchPrompt(text);
  const backend = `tract wasm ${build.simd}${build.threads ? " threads" : ""}`;
  const results = [];
  for (let run = 0; run <= runs; run++) {
    post({ type: Msg.BENCH_PROGRESS, run, of: runs, backend });
    await yieldToEvents();
    if (current.cancelled) return { cancelled: true };
    const r = engine.benchRun(prompt);
    if (run > 0) results.push(r); // run 0 is the warm-up
  }
  const row = engine.benchRow(results, prompt.length, backend);
  row.wasm_memory_mib = Math.round(memory.buffer.byteLength / 1048576);
  if (profile) {
    // after the measured runs, so that timing every node does not slow them
    post({ type: Msg.BENCH_PROGRESS, run: "profile", of: runs, backend });
    await yieldToEvents();
    row.profile = engine.benchProfile(prompt);
  }
  post({ type: Msg.BENCH_DONE, row });
  for (const peer of peers) {
    if (current.cancelled) break;
    try {
      if (!PEER_BENCH[peer]) throw new Error(`no peer "${peer}": expected ${Object.values(Peer).join(" or ")}`);
      if (!loaded) throw new Error("the peers run on the page's bundle files only, not on dropped files");
      const row = await PEER_BENCH[peer](Array.from(prompt), runs);
      if (row) post({ type: Msg.PEER_DONE, peer, row });
    } catch (err) {
      post({ type: Msg.PEER_ERROR, peer, message: err instanceof Error ? err.message : String(err) });
    }
  }
  return { cancelled: current.cancelled };
}

// The context sweep (engine.contextSweep: the same code as `wasmlm context`), a step per
// message; a cancel between steps ends it with the medians measured so far.
async function sweep({ text, rounds = 1 }) {
  if (!engine) throw new Error("no model loaded");
  if (!engine.info.has_cache) throw new Error("the context sweep needs a graph with a KV cache; pick a with_past file");
  const sw = engine.contextSweep(text, rounds);
  try {
    for (let step = 0; step < sw.steps; step++) {
      post({ type: Msg.SWEEP_PROGRESS, step, of: sw.steps, label: sw.label(step) });
      await yieldToEvents();
      if (current.cancelled) break;
      sw.step(step);
    }
    return { cancelled: current.cancelled, sweep: sw.result() };
  } finally {
    sw.free();
  }
}

// The peers: the browser engines people would pick, each on the same prompt tokens under the same
// protocol as ours: a warm-up run, then `runs` runs of the prompt and 63 greedy steps; the times
// are those of the peer's own calls (the argmax outside them), summarized by the engine's own
// statistics. Each peer is released at the end: it holds its own copy of the weights.
const NEW_TOKENS = 64;

// A peer's runs, then its row: each run empties its cache (`begin`), then feeds the prompt and
// NEW_TOKENS - 1 single tokens, each the one the call before chose; `step(ids)` resolves to
// {ms: the timed call, next: the greedy token}.
async function peerRuns(prompt, runs, backend, begin, step) {
  const results = [];
  for (let run = 0; run <= runs; run++) {
    post({ type: Msg.BENCH_PROGRESS, run, of: runs, backend });
    await yieldToEvents();
    if (current.cancelled) return null;
    await begin();
    let ids = prompt;
    const times = [];
    for (let i = 0; i < NEW_TOKENS; i++) {
      const { ms, next } = await step(ids);
      times.push(ms);
      ids = [next];
    }
    if (run > 0) results.push({ prefill_ms: times[0], steps_ms: times.slice(1) });
  }
  const row = engine.benchRow(results, prompt.length, backend);
  for (const k of ["load_phases_ms", "int8_kernels", "fused_ops", "engine"]) delete row[k];
  return row;
}

// onnxruntime-web (its wasm backend, as many threads as ours, shipped in ort/ by ./build.sh site)
// on the very same ONNX file.
async function ortBench(prompt, runs) {
  const ort = await import("./ort/ort.wasm.min.mjs").catch((err) => {
    throw new Error(`onnxruntime-web is not shipped with this page (ort/): ${err.message}`);
  });
  ort.env.wasm.numThreads = build.threadCount; // its own workers where the page is isolated
  ort.env.wasm.wasmPaths = new URL("./ort/", self.location.href).href;
  const { base, entry, manifest } = loaded;
  const arch = manifest.architecture;
  post({ type: Msg.BENCH_PROGRESS, run: "load", of: runs, backend: Peer.ORT });
  const onnx = joined((await fetchEntry(base, entry, await openCache())).bytes);
  const t0 = performance.now();
  const session = await ort.InferenceSession.create(onnx, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
  const loadMs = performance.now() - t0;
  try {
    // Optimum's and transformers.js's exports also take the mask and the positions (int64)
    const extra = ["attention_mask", "position_ids"].filter((n) => session.inputNames.includes(n));
    const pastNames = session.inputNames.filter((n) => n !== "input_ids" && !extra.includes(n));
    const presentOf = (name) => name.replace("past_key_values.", "present.").replace("past_", "present_");
    if (pastNames.some((n) => !/^past_(key|value)_\d+$|^past_key_values\.\d+\.(key|value)$/.test(n))) {
      throw new Error(`${entry.name}: inputs ${session.inputNames.join(", ")}: only input_ids, attention_mask, ` +
        "position_ids and the cache are fed");
    }
    const backend = `onnxruntime-web ${ort.env.versions?.web ?? ""} wasm`.replace("  ", " ");
    let past, length;
    const begin = () => {
      past = Object.fromEntries(pastNames.map((n) =>
        [n, new ort.Tensor("float32", new Float32Array(0), [1, arch.kv_heads, 0, arch.head_dim])]));
      length = 0;
    };
    const int64 = (values) => new ort.Tensor("int64", BigInt64Array.from(values, BigInt), [1, values.length]);
    const step = async (ids) => {
      const feeds = { input_ids: int64(ids), ...past };
      if (extra.includes("attention_mask")) feeds.attention_mask = int64(new Array(length + ids.length).fill(1));
      if (extra.includes("position_ids")) feeds.position_ids = int64(ids.map((_, i) => length + i));
      const t = performance.now();
      const out = await session.run(feeds);
      const ms = performance.now() - t;
      length += ids.length;
      past = Object.fromEntries(pastNames.map((n) => [n, out[presentOf(n)]]));
      const logits = out.logits;
      const vocab = logits.dims[2];
      const offset = (logits.dims[1] - 1) * vocab;
      let next = 0;
      for (let i = 1; i < vocab; i++) if (logits.data[offset + i] > logits.data[offset + next]) next = i;
      return { ms, next };
    };
    const row = await peerRuns(prompt, runs, backend, begin, step);
    if (row) row.load_ms = Math.round(loadMs * 10) / 10;
    return row;
  } finally {
    await session.release();
  }
}

// wllama (llama.cpp in wasm, shipped in wllama/ by ./build.sh site) on the site's GGUF of the same
// weights in llama.cpp's Q8_0 (the manifest's `peers.wllama`: gguf_files.py), as many threads as
// ours where the page is isolated. Our token ids are fed as they are: the GGUF has the same
// vocabulary.
async function wllamaBench(prompt, runs) {
  const { base, manifest } = loaded;
  const gguf = manifest.peers?.wllama;
  if (!gguf) throw new Error(`this site has no GGUF of ${manifest.id} for wllama (./build.sh site adds one for the default model)`);
  const dir = new URL("./wllama/", self.location.href).href;
  const { Wllama } = await import(`${dir}index.js`).catch((err) => {
    throw new Error(`wllama is not shipped with this page (wllama/): ${err.message}`);
  });
  const version = await fetch(`${dir}package.json`).then((r) => r.json()).then((p) => p.version, () => "");
  const w = new Wllama({ "single-thread/wllama.wasm": `${dir}single-thread/wllama.wasm`,
    "multi-thread/wllama.wasm": `${dir}multi-thread/wllama.wasm` },
    { suppressNativeLog: true, logger: { debug() {}, log() {}, warn: console.warn, error: console.error } });
  post({ type: Msg.BENCH_PROGRESS, run: "load", of: runs, backend: Peer.WLLAMA });
  const bytes = (await fetchEntry(base, gguf, await openCache())).bytes;
  const t0 = performance.now();
  try {
    // wllama resolves its wasm paths against `document.baseURI` (it expects a page, not a worker):
    // a stand-in for the load only, so that nothing else here sees a `document`
    globalThis.document = { baseURI: self.location.href };
    try {
      await w.loadModel([new Blob([bytes].flat())], { n_threads: build.threadCount, n_ctx: engine.info.context });
    } finally {
      delete globalThis.document;
    }
    const loadMs = performance.now() - t0;
    const backend = `wllama ${version} (llama.cpp) wasm, ${gguf.type ?? "GGUF"}`;
    const begin = () => w.kvClear();
    const step = async (ids) => {
      const t = performance.now();
      await w.decode(ids, {});
      const ms = performance.now() - t;
      const [top] = await w.getLogits(1);
      return { ms, next: top.token };
    };
    const row = await peerRuns(prompt, runs, backend, begin, step);
    if (row) {
      Object.assign(row, { load_ms: Math.round(loadMs * 10) / 10, file: gguf.name, file_bytes: gguf.bytes,
        peer_of: loaded.entry.name, precision: "int8", preset: gguf.type, threads: w.isMultithread() ? build.threadCount : 1 });
    }
    return row;
  } finally {
    await w.exit();
  }
}

const PEER_BENCH = { [Peer.ORT]: ortBench, [Peer.WLLAMA]: wllamaBench };

// The requests other than load, generate, chat and bench: each answers `ok` with its result.
const simple = {
  [Req.SESSION]: () => {
    if (!engine) throw new Error("no model loaded");
    const id = nextSession++;
    sessions.set(id, engine.session());
    return { session: id, length: 0 };
  },
  [Req.FORK]: (m) => {
    const id = nextSession++;
    sessions.set(id, sessionOf(m.session).fork());
    return { session: id, length: sessions.get(id).length };
  },
  [Req.APPEND]: (m) => {
    const s = sessionOf(m.session);
    const fed = s.append(typeof m.input === "string" ? m.input : Uint32Array.from(m.input));
    return { fed, length: s.length };
  },
  [Req.TRUNCATE]: (m) => {
    const s = sessionOf(m.session);
    s.truncate(m.length);
    return { length: s.length };
  },
  [Req.TOKENS]: (m) => {
    const s = sessionOf(m.session);
    return { tokens: Array.from(s.tokens), length: s.length };
  },
  [Req.RESET]: (m) => {
    sessionOf(m.session).reset();
    return { length: 0 };
  },
  [Req.RESTORE]: (m) => {
    const s = sessionOf(m.session);
    s.restore(m.bytes);
    return { length: s.length };
  },
  [Req.MEMBW]: (m) => {
    if (!engine) throw new Error("no model loaded");
    return { membw: engine.membw(m.mib, m.rounds) };
  },
  [Req.FREE]: (m) => {
    if (!m.session) throw new Error("session 0 lives as long as the model");
    sessionOf(m.session).free();
    sessions.delete(m.session);
    return {};
  },
};

async function run(m) {
  switch (m.type) {
    case Req.LOAD:
      return load(m);
    case Req.GENERATE: {
      const s = sessionOf(m.session);
      return stream(s, () => {
        if (!m.continue) s.reset();
        s.begin(m.prompt ?? "", m.options);
      });
    }
    case Req.CHAT: {
      const s = sessionOf(m.session);
      return stream(s, () => s.beginChat(m.messages, m.options));
    }
    case Req.BENCH:
      return post({ type: Msg.OK, ...(await bench(m)) });
    case Req.SWEEP:
      return post({ type: Msg.OK, ...(await sweep(m)) });
    case Req.SNAPSHOT: {
      const s = sessionOf(m.session);
      const bytes = s.snapshot();
      return post({ type: Msg.OK, bytes, length: s.length }, [bytes.buffer]);
    }
    default:
      if (!simple[m.type]) throw new Error(`unknown request ${m.type}`);
      return post({ type: Msg.OK, ...simple[m.type](m) });
  }
}

self.onmessage = async (e) => {
  const m = e.data;
  if (m.type === Req.CANCEL) {
    if (current && current.req === m.target) current.cancelled = true;
    return;
  }
  if (current) {
    self.postMessage({ req: m.req, type: Msg.ERROR, message: `busy with ${current.type}: cancel it or wait` });
    return;
  }
  current = { req: m.req, type: m.type, cancelled: false };
  stopWarmUp();
  if ([Req.GENERATE, Req.CHAT, Req.BENCH, Req.SWEEP].includes(m.type)) warmUpDue = false;
  try {
    await run(m);
  } catch (err) {
    // The engine's own errors (JsError: a plain Error) and this worker's leave it usable. A trap
    // (WebAssembly.RuntimeError: a Rust panic) or another exception during a call into the
    // engine (a RangeError from its glue, a "recursive use" error) may have left the instance
    // half-way through a call: the client is closed (fatal). A failed load leaves nothing.
    const message = err instanceof Error ? err.message : String(err);
    const plain = err instanceof Error && err.constructor === Error;
    const fatal = err instanceof WebAssembly.RuntimeError || (m.type !== Req.LOAD && !plain);
    // the engine's two context errors (src/error.rs: ContextFull, PromptTooLong); the cache is intact
    const contextFull = /the context is full|tokens and the model's context is/.test(message);
    post({ type: Msg.ERROR, message, fatal, contextFull });
  } finally {
    current = null;
    if (warmUpDue && engine) warmUp();
  }
};
