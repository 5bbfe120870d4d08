// The page: model picker, a chat with per-token timings, benchmark mode, baseline table with the
// browser's rows. The engine runs in a Web Worker behind the client module wasmlm.js (the same
// one an embedding app uses); this thread only draws. Text from the model or from files always
// goes in with textContent, never as HTML.
import { presentRows, renderBaselines, renderBundles, renderComparison } from "./tables.js";
import { TokenChart } from "./chart.js";
import { WasmLM } from "./wasmlm.js";
import { checkManifest, Peer } from "./protocol.js";

const $ = (id) => document.getElementById(id);
const state = {
  lm: null, // the engine (WasmLM), made again after a fatal error
  abort: null, // the running generation's or bench's AbortController
  manifests: [],
  baselines: null,
  root: "models/", // where the bundles are (modelsRoot)
  live: [], // rows measured in this page
  loaded: null, // {info, build}
  running: null, // "generate" | "bench" | "load" | "restore"
  events: [],
  benchText: null,
  peersPending: [], // the benchmark's peers still to run
  benchLoading: null, // the peer whose file is downloading
};
const chart = new TokenChart($("chart"));

// Where the bundles are: this site's models/ folder, or a folder of the same layout on another
// origin that allows CORS (a CDN, a Hugging Face repository): ?models=URL.
function modelsRoot() {
  const given = new URLSearchParams(location.search).get("models");
  if (!given) return "models/";
  let url;
  try {
    url = new URL(given, location.href);
  } catch {
    throw new Error(`?models=${given}: not a URL`);
  }
  if (url.protocol !== "https:" && url.protocol !== "http:") throw new Error(`?models=${given}: only http(s) URLs`);
  return url.href.endsWith("/") ? url.href : url.href + "/";
}

function useModelsRoot(value) {
  const url = new URL(location.href);
  if (value) url.searchParams.set("models", value);
  else url.searchParams.delete("models");
  location.assign(url.href);
}
$("models-use").onclick = () => useModelsRoot($("models-root").value.trim());
$("models-here").onclick = () => useModelsRoot("");

async function fetchJson(url) {
  const res = await fetch(url, { cache: "no-cache" });
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
  return res.json();
}

function notice(text, kind = "note") {
  const p = document.createElement("p");
  p.className = kind;
  p.textContent = text;
  $("notices").appendChild(p);
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "note";
}

function setRunning(what) {
  state.running = what;
  const ready = !!state.loaded && !what;
  $("generate").disabled = !ready;
  $("bench").disabled = !ready || !state.loaded.info.has_cache;
  $("sweep").disabled = $("bench").disabled;
  $("membw").disabled = !ready || !(state.loaded.build.threadCount > 1);
  $("load").disabled = !!what;
  $("new-chat").disabled = !!what;
  $("stop").disabled = !(what === "generate" || what === "bench" || what === "sweep");
}

function renderTable() {
  const i = state.loaded?.info;
  renderComparison($("comparison"), state.baselines, state.live, i && { model: i.model, file: i.file });
  if (!state.baselines) return;
  const filter = { model: $("baseline-model").value, withPast: $("baseline-past").checked };
  renderBaselines($("baselines"), $("machine"), state.baselines, state.live, filter);
  $("baselines-count").textContent = `${state.baselines.rows.length} native rows, ${state.live.length} from this browser`;
}

function fillTableFilter() {
  const select = $("baseline-model");
  const ids = [...new Set(state.baselines.rows.map((r) => r.model))];
  for (const id of ids) {
    const opt = document.createElement("option");
    opt.value = id;
    opt.textContent = id;
    select.appendChild(opt);
  }
}
$("baseline-model").onchange = renderTable;
$("baseline-past").onchange = renderTable;

// ---- the engine ---------------------------------------------------------------------------

// ?build=threads|relaxed|simd|nosimd forces a wasm build (to compare them); otherwise the engine picks
const forcedBuild = () => new URLSearchParams(location.search).get("build") || undefined;

function engine() {
  if (!state.lm || state.lm.closed) state.lm = new WasmLM({ onNotice: (text) => notice(text) });
  return state.lm;
}

// A request failed: say so; after a fatal error the engine is gone (the next load starts a new one).
function failed(during, err) {
  setStatus(`${during}: ${err.message}`, true);
  if (err.fatal) {
    notice("The engine crashed (see the console); it was restarted: load the model again.", "error");
    state.loaded = null;
  }
}

function showProgress(p) {
  const bar = $("progress");
  bar.hidden = false;
  bar.max = p.total;
  bar.value = p.loaded;
  const pct = ((100 * p.loaded) / p.total).toFixed(0);
  const mb = (b) => (b / 1e6).toFixed(1);
  if (!p.total) bar.removeAttribute("value"); // size unknown (no Content-Length): an indeterminate bar
  $("progress-text").textContent = p.cached
    ? `${p.file}: ${mb(p.total)} MB from the browser's cache`
    : p.total ? `${p.file}: ${mb(p.loaded)} / ${mb(p.total)} MB (${pct}%)` : `${p.file}: ${mb(p.loaded)} MB`;
}

function onReady({ info: i, build }) {
  state.loaded = { info: i, build };
  const phases = (i.load_phases_ms || []).map(([n, ms]) => `${n} ${(ms / 1000).toFixed(1)}`).join(", ");
  setStatus(`ready in ${(i.click_to_ready_ms / 1000).toFixed(1)} s (engine load ${(i.load_ms / 1000).toFixed(1)} s: ${phases})`);
  $("model-info").textContent = `${i.model}${i.real_weights ? "" : " (random weights)"}: ${i.file}, ` +
    `${(i.file_bytes / 1e6).toFixed(1)} MB, ${i.precision ?? "?"}${i.preset ? " " + i.preset : ""}, ` +
    `${i.cache}, ${i.nodes} nodes, context ${i.context}` +
    (i.hub ? `, from ${i.hub.repo} (${i.hub.dtype}, ${i.hub.revision})` : "") +
    (i.family ? `, family ${i.family}` : "") + `. ${i.layout}. Fast paths: ` +
    ([i.int8_kernels && `int8 kernels: ${i.int8_kernels}`, i.fused_ops && `fused ops: ${i.fused_ops}`].filter(Boolean).join(", ") ||
      "none (tract's own ops throughout)") + `. Engine: wasmlm ${build.version}, ` +
    `tract ${build.tract}, WebAssembly build: ${build.simd === "none" ? "without SIMD" : build.simd}` +
    (build.relaxedCheck ? ` (kernels checked against the scalar one in ${build.relaxedCheck.ms} ms)` : "") +
    `, ${threadsText(build)}` +
    (build.wasmBytes ? `, .wasm ${(build.wasmBytes.raw / 1e6).toFixed(1)} MB (${(build.wasmBytes.gzip / 1e6).toFixed(1)} MB gzipped).` : ".");
  // the bars and the table follow the loaded model
  if ([...$("baseline-model").options].some((o) => o.value === i.model)) $("baseline-model").value = i.model;
  renderTable();
  newChat(false); // a new session: the saved conversation, if any, is resumed below
  $("chat").disabled = !i.has_chat_template;
  if (!i.has_chat_template) $("chat").checked = false;
  setRunning(null);
  resume();
}

// ---- model picker and loading ------------------------------------------------------------

function fillPicker() {
  const select = $("model");
  select.replaceChildren();
  for (const m of state.manifests) {
    if (m.error) continue;
    const group = document.createElement("optgroup");
    group.label = m.id + (m.real_weights ? "" : " (random weights)");
    const onnx = m.files.filter((f) => f.kind === "onnx");
    // the bundle's default first, then with past before without, INT8 before FP32
    const rank = (f) => [f.name === m.default.file ? 0 : 1, f.cache === "with_past" ? 0 : 1, f.precision === "int8" ? 0 : 1];
    onnx.sort((a, b) => {
      const [ra, rb] = [rank(a), rank(b)];
      return ra[0] - rb[0] || ra[1] - rb[1] || ra[2] - rb[2];
    });
    for (const f of onnx) {
      const opt = document.createElement("option");
      opt.value = JSON.stringify({ id: m.id, file: f.name });
      opt.textContent = `${m.id}: ${f.precision.toUpperCase()}${f.preset ? " " + f.preset : ""}, ` +
        `${f.cache === "with_past" ? "KV cache" : "no cache"} (${(f.bytes / 1e6).toFixed(0)} MB)` +
        (f.name === m.default.file ? " [default]" : "");
      opt.selected = m.id === state.manifests[0].id && f.name === m.default.file;
      group.appendChild(opt);
    }
    select.appendChild(group);
  }
  if (!select.options.length) setStatus("no model bundle is built: run ./build.sh", true);
}

async function load(source) {
  state.loaded = null;
  setRunning("load");
  $("progress").hidden = true;
  $("progress-text").textContent = "";
  try {
    onReady(await engine().loadModel(source, { build: forcedBuild(), onProgress: showProgress, onStatus: (t) => setStatus(t) }));
  } catch (err) {
    failed("load", err);
    state.loaded = null;
    setRunning(null);
  }
}

$("load").onclick = () => {
  if (!$("model").value) return;
  const { id, file } = JSON.parse($("model").value);
  load({ kind: "bundle", base: `${state.root}${id}/`, file });
};

function userFiles(files) {
  const list = Array.from(files);
  const onnx = list.filter((f) => f.name.toLowerCase().endsWith(".onnx"));
  const tokenizer = list.find((f) => f.name === "tokenizer.json");
  const config = list.find((f) => f.name === "tokenizer_config.json");
  const chatTemplate = list.find((f) => f.name === "chat_template.jinja");
  const modelConfig = list.find((f) => f.name === "config.json");
  const external = list.filter((f) => /\.onnx_data(_\d+)?$/.test(f.name) || f.name.endsWith(".onnx.data"));
  const problems = [];
  if (onnx.length !== 1) problems.push(onnx.length ? "only one .onnx file at a time" : "an .onnx file");
  if (!tokenizer) problems.push("its tokenizer.json");
  if (problems.length) {
    setStatus(`drop needs ${problems.join(" and ")} (got: ${list.map((f) => f.name).join(", ") || "nothing"})`, true);
    return;
  }
  const context = Number($("user-context").value) || 2048;
  load({ kind: "user", name: onnx[0].name, onnx: onnx[0], tokenizer, config, chatTemplate, modelConfig, external, context });
}

// A Hugging Face repository (hub.js): the fields, or ?hub=owner/name&dtype=q4 (loaded at once;
// ?hub_endpoint=URL for a mirror with the hub's URL layout)
function loadHub() {
  const params = new URLSearchParams(location.search);
  const repo = $("hub-repo").value.trim();
  if (!repo) return setStatus("type a repository id, e.g. onnx-community/SmolLM2-135M-Instruct", true);
  load({ kind: "hub", repo, dtype: $("hub-dtype").value, endpoint: params.get("hub_endpoint") || undefined,
    revision: params.get("hub_revision") || undefined });
}
$("hub-load").onclick = loadHub;
$("hub-repo").addEventListener("keydown", (e) => { if (e.key === "Enter") loadHub(); });

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (state.running) return setStatus(`busy (${state.running})`, true);
  userFiles(e.dataTransfer.files);
});
$("files").onchange = (e) => userFiles(e.target.files);

// ---- generation ---------------------------------------------------------------------------

function options() {
  const num = (id) => Number($(id).value);
  return {
    chat: $("chat").checked,
    max_new_tokens: num("max-new-tokens"),
    temperature: num("temperature"),
    top_k: num("top-k"),
    top_p: num("top-p"),
    repetition_penalty: num("repetition-penalty"),
    seed: num("seed"),
  };
}

// The conversation: its messages, as the chat template sees them. The worker's session keeps
// the KV cache of what was said; each turn sends the whole conversation and the engine runs
// only what its cache does not hold (done.fedTokens).
state.messages = [];

function turnElement(role, text) {
  const el = document.createElement("pre");
  el.className = `turn ${role}`;
  el.textContent = text; // text, never HTML
  $("transcript").append(el);
  return el;
}

// The conversation and its KV cache's snapshot, kept in IndexedDB so that a reload resumes it
// without running it again (a snapshot from another model file is refused by the engine; the
// next turn then reads the conversation from its text).
const conversation = (() => {
  const request = (mode, fn) => new Promise((resolve, reject) => {
    if (typeof indexedDB === "undefined") return resolve(undefined);
    const open = indexedDB.open("wasmlm", 1);
    open.onupgradeneeded = () => open.result.createObjectStore("conversation");
    open.onerror = () => reject(open.error);
    open.onsuccess = () => {
      const tx = open.result.transaction("conversation", mode);
      const req = fn(tx.objectStore("conversation"));
      tx.oncomplete = () => { open.result.close(); resolve(req.result); };
      tx.onerror = () => { open.result.close(); reject(tx.error); };
    };
  });
  return {
    get: () => request("readonly", (store) => store.get("current")),
    put: (value) => request("readwrite", (store) => store.put(value, "current")),
    clear: () => request("readwrite", (store) => store.delete("current")),
  };
})();

async function resume() {
  let saved;
  try {
    saved = await conversation.get();
  } catch (err) {
    notice(`The saved conversation could not be read: ${err.message}`);
    return;
  }
  if (!saved?.messages?.length || !state.loaded || state.running) return;
  state.messages = saved.messages;
  for (const m of saved.messages) turnElement(m.role, m.content);
  $("context-note").textContent = "Resuming the saved conversation…";
  setRunning("restore");
  const session = state.lm.session;
  try {
    await session.restore(saved.snapshot);
    $("context-note").textContent = `Resumed the saved conversation: its KV cache (${session.length} tokens) ` +
      "was restored, nothing was run again.";
  } catch (err) {
    if (err.fatal) failed("restore", err);
    $("context-note").textContent = `The saved KV cache was not restored (${err.message}): ` +
      "the next turn runs the whole conversation again.";
  }
  setRunning(null);
}

// After a chat turn: the conversation and its cache, for a reload to resume.
async function save() {
  // data-saved: the cache length of the last conversation stored ("" while a save runs), which
  // tells a script (the e2e test) when a reload will find the turn
  $("transcript").dataset.saved = "";
  try {
    const snapshot = await state.lm.session.snapshot();
    await conversation.put({ model: state.loaded?.info.model, file: state.loaded?.info.file, messages: state.messages,
      snapshot, cacheTokens: state.lm.session.length, saved: new Date().toISOString() });
    $("transcript").dataset.saved = String(state.lm.session.length);
  } catch (err) {
    notice(`The conversation could not be saved in this browser: ${err.message}`);
  }
}

function newChat(forget = true) {
  if (forget) conversation.clear().catch(() => {});
  state.messages = [];
  state.pendingTurn = null;
  $("transcript").replaceChildren();
  $("context-full").hidden = true;
  $("context-note").textContent = "";
  if (state.loaded && !state.running) state.lm.session.reset().catch((err) => failed("new chat", err));
}
$("new-chat").onclick = () => { if (!state.running) newChat(); };

async function send(messages) {
  state.events = [];
  $("stats").replaceChildren();
  $("context-full").hidden = true;
  chart.reset();
  // the reply streams into the newest assistant turn, #output
  $("output")?.removeAttribute("id");
  const reply = turnElement("assistant", "");
  reply.id = "output";
  setRunning("generate");
  state.abort = new AbortController();
  const opts = { ...options(), signal: state.abort.signal, onToken, onPrefill };
  const stream = messages ? state.lm.chat(messages, opts) : state.lm.generate(state.pendingTurn.content, opts);
  try {
    onDone(await stream.done);
  } catch (err) {
    if (messages && err.contextFull) {
      onContextFull(err.message);
    } else {
      $("output")?.remove();
      failed(messages ? "chat" : "generate", err);
    }
    setRunning(null);
  }
}

// A long prompt is read in chunks: the page says how far, and Stop works in between.
function onPrefill({ fed, of }) {
  $("context-note").textContent = `Reading the prompt: ${fed} of ${of} new tokens…`;
}

$("generate").onclick = () => {
  const content = $("prompt").value;
  if (!content.trim()) return setStatus("type a message first", true);
  const chat = $("chat").checked;
  if (!chat) newChat(); // a one-shot completion
  state.pendingTurn = { role: "user", content };
  turnElement("user", content);
  send(chat ? [...state.messages, state.pendingTurn] : null);
};

$("stop").onclick = () => state.abort?.abort();

// At the context limit: drop the oldest exchange (a user turn and its reply) and send again,
// or start over; never a silent failure.
function onContextFull(message, dropReply = true) {
  if (dropReply) $("output")?.remove();
  $("context-full-text").textContent = message;
  $("context-full").hidden = false;
  $("drop-oldest").disabled = state.messages.length < 2;
}
$("drop-oldest").onclick = () => {
  if (state.running || state.messages.length < 2) return;
  state.messages = state.messages.slice(2);
  const turns = $("transcript").querySelectorAll(".turn");
  turns[0]?.remove();
  turns[1]?.remove();
  send([...state.messages, state.pendingTurn]);
};
$("start-over").onclick = () => {
  if (state.running) return;
  const turn = state.pendingTurn;
  newChat();
  $("prompt").value = turn?.content ?? "";
};

function onToken(ev) {
  state.events.push(ev);
  $("output").append(document.createTextNode(ev.text)); // text, never HTML
  if (ev.prefill) $("context-note").textContent = "";
  else chart.push(ev.ms);
  const first = state.events[0];
  renderStats([
    ["time to first token (prefill)", `${first.ms.toFixed(1)} ms`],
    ["tokens", String(state.events.length)],
    ["last token, ms", ev.ms.toFixed(2)],
  ]);
}

// The summary is the engine's own (done.stats, as the CLI prints it): median, p90, tokens/s.
function renderStats(items) {
  const dl = $("stats");
  dl.replaceChildren();
  for (const [k, v] of items) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    dd.dataset.key = k;
    dl.append(dt, dd);
  }
}

function browserName() {
  const brands = navigator.userAgentData?.brands?.filter((b) => !/Not.A.Brand/i.test(b.brand));
  if (brands?.length) return brands.map((b) => `${b.brand} ${b.version}`).join(", ");
  const m = navigator.userAgent.match(/(Firefox|Edg|Chrome|Chromium|Safari)\/(\d+)/);
  return m ? `${m[1]} ${m[2]}` : navigator.userAgent;
}

// "1 thread", or "2 threads (threaded build)"
function threadsText(build) {
  return build.threadCount > 1 ? `${build.threadCount} threads (threaded build)` : "1 thread";
}

function liveRowBase(info, build) {
  return {
    model: info.model, backend: `tract wasm ${build.simd}${build.threads ? " threads" : ""}`, precision: info.precision,
    preset: info.preset, cache: info.cache, threads: build.threadCount, file: info.file, file_bytes: info.file_bytes,
    browser: browserName(), user_agent: navigator.userAgent,
  };
}

function onDone(done) {
  const s = done.stats ?? { ttft_ms: 0, decode_ms_median: 0, decode_ms_p90: 0, tokens_per_s: 0, new_tokens: 0 };
  if (state.pendingTurn) {
    const reply = $("output")?.textContent ?? "";
    if ($("chat").checked) {
      state.messages.push(state.pendingTurn, { role: "assistant", content: reply });
      save(); // the conversation and its cache, kept for a reload
    }
    state.pendingTurn = null;
    $("prompt").value = "";
    $("context-note").textContent = `KV cache: ${done.length} of ${done.context} tokens; this turn's ` +
      `prefill ran ${done.fedTokens ?? 0} new token(s) of the ${done.promptTokens} in the conversation.`;
    if (done.reason === "ContextFull") {
      onContextFull(`The context is full (${done.length} of ${done.context} tokens): the reply stopped there.`, false);
    }
  }
  renderStats([
    ["time to first token (prefill)", `${s.ttft_ms.toFixed(1)} ms`],
    ["tokens", String(s.new_tokens)],
    ["decode ms/token, median", s.decode_ms_median.toFixed(2)],
    ["decode ms/token, p90", s.decode_ms_p90.toFixed(2)],
    ["tokens/s (decode)", s.tokens_per_s.toFixed(1)],
    ["prompt tokens", String(done.promptTokens ?? "")],
    ["prefill tokens (new)", String(done.fedTokens ?? "")],
    ["cache tokens", String(done.length ?? "")],
    ["stopped by", done.reason ?? ""],
  ]);
  if (state.loaded && s.new_tokens > 1) {
    const round = (x) => Math.round(x * 1000) / 1000;
    const row = {
      ...liveRowBase(state.loaded.info, state.loaded.build), kind: `last generation, ${s.new_tokens - 1} decode steps`,
      decode_ms_per_token: { median: round(s.decode_ms_median), p90: round(s.decode_ms_p90), runs: 1 },
      prefill_ms: { median: round(s.ttft_ms), p90: round(s.ttft_ms), runs: 1 },
      prompt_tokens: done.promptTokens,
    };
    state.live = state.live.filter((r) => !r.kind?.startsWith("last generation")).concat([row]);
    renderTable();
  }
  setRunning(null);
}

// ---- benchmark mode -----------------------------------------------------------------------

// The benchmark's text (tinyshakespeare), fetched once; an error is shown in `status`.
async function benchText(status) {
  try {
    if (!state.benchText) {
      const res = await fetch("bench-prompt.txt");
      if (!res.ok) throw new Error(`bench-prompt.txt: HTTP ${res.status}`);
      state.benchText = await res.text();
    }
    return state.benchText;
  } catch (err) {
    status.textContent = err.message;
    return null;
  }
}

$("bench").onclick = async () => {
  if (!(await benchText($("bench-status")))) return;
  $("bench-download").hidden = true;
  $("bench-profile-table").hidden = true;
  setRunning("bench");
  state.abort = new AbortController();
  state.peersPending = [[Peer.ORT, "bench-peer-ort"], [Peer.WLLAMA, "bench-peer-wllama"]]
    .filter(([, id]) => $(id).checked).map(([peer]) => peer);
  try {
    const r = await state.lm.bench(state.benchText, {
      runs: Number($("bench-runs").value) || 5, peers: state.peersPending, profile: $("bench-profile").checked,
      signal: state.abort.signal, onProgress: onBenchProgress, onRow: onBenchDone, onPeer: onPeerDone,
    });
    if (r.cancelled) $("bench-status").textContent = "cancelled";
  } catch (err) {
    $("bench-status").textContent = "";
    failed("bench", err);
  }
  state.peersPending = [];
  setRunning(null);
};

function onBenchProgress(p) {
  const status = $("bench-status");
  if (p.file) {
    const mb = (n) => (n / 1e6).toFixed(0);
    status.textContent = `${state.benchLoading}: ${p.cached ? "reading" : "downloading"} ${p.file}, ` +
      `${mb(p.loaded)} of ${mb(p.total)} MB…`;
    return;
  }
  if (p.run === "load") state.benchLoading = p.backend;
  status.textContent = `${p.backend}: ` + (p.run === 0 ? "warm-up run…" : p.run === "profile" ? "timing each op…"
    : p.run === "load" ? "loading…" : `run ${p.run} of ${p.of}…`);
}

function onBenchDone(row) {
  const { info, build } = state.loaded;
  const full = {
    ...row, ...liveRowBase(info, build), kind: "benchmark mode",
    decode_ms_per_token: row.decode_ms_per_token, prefill_ms: row.prefill_ms,
    simd_build: build.simd, simd_supported: build.simdSupported, relaxed_simd_supported: build.relaxedSupported,
    hardware_concurrency: navigator.hardwareConcurrency, measured_at: new Date().toISOString(),
  };
  state.live = state.live.filter((r) => !(r.kind === "benchmark mode" && r.file === full.file && r.model === full.model))
    .concat([full]);
  renderTable();
  const d = full.decode_ms_per_token;
  $("bench-status").textContent = `decode ${d.median} ms/token median, ${d.p90} p90 over ${d.runs} runs; ` +
    `prefill ${full.prefill_ms.median} ms (${browserName()}, ${threadsText(build)}, ${build.simd === "none" ? "build without SIMD" : build.simd + " build"})`;
  if (row.profile) renderProfile(row.profile);
  const a = $("bench-download");
  if (a.href) URL.revokeObjectURL(a.href);
  a.href = URL.createObjectURL(new Blob([JSON.stringify(full, null, 2)], { type: "application/json" }));
  a.hidden = false;
  state.benchStatus = $("bench-status").textContent;
  if (state.peersPending.length) $("bench-status").textContent += `; now ${state.peersPending.join(", then ")}…`;
}

// The per-op profile (engine.benchProfile): the 15 costliest ops of a decode step, then the rest.
function renderProfile(p) {
  const table = $("bench-profile-table");
  const shown = p.ops.slice(0, 15);
  const rest = p.ops.slice(15).reduce((a, o) => ({ ms: a.ms + o.ms_per_token, share: a.share + o.share, n: a.n + 1 }),
    { ms: 0, share: 0, n: 0 });
  const cell = (tag, text) => { const c = document.createElement(tag); c.textContent = text; return c; };
  const tr = (cells, tag = "td") => { const r = document.createElement("tr"); cells.forEach((t) => r.append(cell(tag, t))); return r; };
  table.replaceChildren();
  table.append(cell("caption", `Decode time per op, ${p.steps} steps timed node by node (${p.threads} thread${p.threads > 1 ? "s" : ""}): ` +
    `${p.ops_ms_per_token.toFixed(2)} ms/token in ops, ${p.wall_ms_per_token.toFixed(2)} ms/token in all, timing included. ` +
    (self.crossOriginIsolated ? "" : "This page is not cross-origin isolated: the browser's clock is coarse here, so the split is only indicative.")));
  table.append(tr(["op", "ms/token", "share", "calls/token"], "th"));
  for (const o of shown) table.append(tr([o.op, o.ms_per_token.toFixed(3), `${(100 * o.share).toFixed(1)}%`, String(o.calls_per_token)]));
  if (rest.n) table.append(tr([`${rest.n} other ops`, rest.ms.toFixed(3), `${(100 * rest.share).toFixed(1)}%`, ""]));
  table.hidden = false;
}

// The context sweep (lm.sweep): a step at a time, its medians in a table; a stop keeps what was
// measured.
$("sweep").onclick = async () => {
  const status = $("sweep-status");
  const text = await benchText(status);
  if (!text) return;
  setRunning("sweep");
  state.abort = new AbortController();
  try {
    const r = await state.lm.sweep(text, {
      signal: state.abort.signal,
      onProgress: (p) => { status.textContent = `step ${p.step + 1} of ${p.of}: ${p.label}…`; },
    });
    status.textContent = r.cancelled ? "stopped: the figures below are the steps that ran" : "";
    renderSweep(r.sweep);
  } catch (err) {
    status.textContent = "";
    failed("context sweep", err);
  }
  setRunning(null);
};

// The bandwidth probe (lm.membw, the threaded build): what a second worker adds to what a decode
// step can read, beside the decode speed-up the benchmark shows.
$("membw").onclick = async () => {
  const status = $("membw-status");
  setRunning("membw");
  status.textContent = "reading 128 MiB at 1 thread and at all of them, 5 rounds…";
  try {
    const m = await state.lm.membw({ mib: 128, rounds: 5 });
    status.textContent = `memory read: ${m.one.toFixed(1)} GB/s on 1 thread, ${m.many.toFixed(1)} GB/s on ${m.threads} ` +
      `(${m.ratio.toFixed(2)}x; medians of ${m.rounds.length} rounds${m.grew_mib ? `; wasm memory grew ${m.grew_mib} MiB for it` : ""})`;
  } catch (err) {
    status.textContent = "";
    failed("bandwidth probe", err);
  }
  setRunning(null);
};

function renderSweep(v) {
  const { build } = state.loaded;
  const table = $("sweep-table");
  const cell = (tag, text) => { const c = document.createElement(tag); c.textContent = text; return c; };
  const tr = (cells, tag = "td") => { const r = document.createElement("tr"); cells.forEach((t) => r.append(cell(tag, t))); return r; };
  table.replaceChildren(cell("caption", `Context sweep, ${v.file}, ${browserName()}, ${threadsText(build)}, ` +
    `${build.simd === "none" ? "build without SIMD" : build.simd + " build"}; median of ${v.rounds} round${v.rounds === 1 ? "" : "s"}`));
  table.append(tr(["case", "measured", "against the shortest"], "th"));
  for (const d of v.decode) table.append(tr([`decode after ${d.past} tokens`, `${d.ms_per_token.toFixed(2)} ms/token`, d.ratio_to_32 == null ? "" : `${d.ratio_to_32}x`]));
  for (const p of v.prefill) table.append(tr([`prefill of ${p.tokens} tokens`, `${p.tokens_per_s.toFixed(1)} tokens/s`, ""]));
  const c = v.prefill_512_chunked;
  if (c) table.append(tr([`512 tokens in chunks of ${c.chunk}`, `${c.tokens_per_s.toFixed(1)} tokens/s`, `${(c.tokens_per_s / c.at_once_tokens_per_s).toFixed(2)}x at once`]));
  const t = v.second_turn;
  if (t) table.append(tr([`a ${t.turn}-token turn after ${t.history} tokens`, `${t.ms_after_history.toFixed(0)} ms`, `${t.ratio}x on an empty cache (${t.ms_on_empty_cache.toFixed(0)} ms)`]));
  table.hidden = false;
}

// The optional peers' rows, each in this browser on the same model, prompt and protocol, run
// right after ours (onnxruntime-web on the same file, wllama on its GGUF: row.file, row.peer_of);
// the table then shows our ratio to each.
function onPeerDone(peer, row, error) {
  if (error) {
    state.benchStatus += `; ${peer} failed: ${error}`;
  } else {
    const { info, build } = state.loaded;
    const full = { ...liveRowBase(info, build), ...row, kind: "benchmark mode, peer", measured_at: new Date().toISOString() };
    state.live = state.live.filter((r) => !(r.kind === full.kind && r.backend === full.backend && r.model === full.model &&
      r.file === full.file && r.threads === full.threads)).concat([full]);
    renderTable();
    const d = full.decode_ms_per_token;
    state.benchStatus += `; ${peer}: decode ${d.median} ms/token median, prefill ${full.prefill_ms.median} ms`;
  }
  const rest = state.peersPending.slice(state.peersPending.indexOf(peer) + 1);
  $("bench-status").textContent = state.benchStatus + (rest.length ? `; now ${rest.join(", then ")}…` : "");
}

// ---- start --------------------------------------------------------------------------------

// The threaded build needs a cross-origin isolated page: `./build.sh serve` sends the headers; on
// a static host coi-sw.js adds them, which takes one reload after it first installs. Only where
// that build would run (worker.js: from 3 cores on, or ?build=threads); ?isolate=0 skips it and
// unregisters it if it was there (the single-threaded build then runs).
async function isolate() {
  if (!("serviceWorker" in navigator) || !window.isSecureContext) return;
  const query = new URLSearchParams(location.search);
  if (query.get("isolate") === "0") {
    // remove it: the page is then served as the host sends it, from the next load on
    const ours = (await navigator.serviceWorker.getRegistrations())
      .filter((r) => (r.active ?? r.waiting ?? r.installing)?.scriptURL === new URL("coi-sw.js", location.href).href);
    await Promise.all(ours.map((r) => r.unregister()));
    if (ours.length) notice("The isolation service worker was removed (?isolate=0): the single-threaded build runs from the next load on.");
    return;
  }
  if (self.crossOriginIsolated) return;
  const forced = query.get("build");
  if (forced ? forced !== "threads" : (navigator.hardwareConcurrency || 1) < 3) return;
  if (sessionStorage.getItem("wasmlm-isolation-reload")) {
    notice("This page could not be made cross-origin isolated: the single-threaded build runs.");
    return;
  }
  try {
    await navigator.serviceWorker.register("coi-sw.js", { scope: "./" });
    await navigator.serviceWorker.ready;
    sessionStorage.setItem("wasmlm-isolation-reload", "1");
    location.reload();
    await new Promise(() => {}); // the reload replaces this page
  } catch (err) {
    notice(`No cross-origin isolation (${err.message}): the single-threaded build runs.`);
  }
}

// baselines.json as the tables read it: {rows: [{model, backend, ...}], machine?}.
function checkBaselines(b) {
  const row = (r) => r && typeof r === "object" && typeof r.model === "string" && typeof r.backend === "string";
  if (!b || typeof b !== "object" || !Array.isArray(b.rows) || !b.rows.every(row)) {
    throw new Error("baselines.json is not a table of rows ({rows: [{model, backend, …}]})");
  }
  return b;
}

async function main() {
  if (typeof WebAssembly !== "object") {
    setStatus("This browser has no WebAssembly: the engine cannot run here.", true);
    return;
  }
  await isolate();
  if (self.crossOriginIsolated) sessionStorage.removeItem("wasmlm-isolation-reload");
  engine();
  chart.draw();
  try {
    state.root = modelsRoot();
  } catch (err) {
    setStatus(err.message, true);
    return;
  }
  if (state.root !== "models/") {
    $("models-root").value = state.root;
    $("models-from").open = true;
  }
  let ids = ["smollm2-135m"];
  try {
    ids = (await fetchJson(`${state.root}index.json`)).models;
  } catch (err) {
    if (state.root !== "models/") notice(`${err.message}: trying the default bundle's folder`, "error");
  }
  for (const id of ids) {
    try {
      const url = `${state.root}${id}/manifest.json`;
      state.manifests.push(checkManifest(await fetchJson(url), url));
    } catch (err) {
      state.manifests.push({ id, error: err.message });
    }
  }
  renderBundles($("bundles"), state.manifests);
  fillPicker();
  setRunning(null);
  const params = new URLSearchParams(location.search);
  if (params.get("hub")) {
    $("hub-repo").value = params.get("hub");
    if (params.get("dtype")) $("hub-dtype").value = params.get("dtype");
    if ($("hub-dtype").value !== (params.get("dtype") ?? "q8")) setStatus(`?dtype=${params.get("dtype")}: not a dtype this page knows`, true);
    else loadHub();
  }
  try {
    state.baselines = checkBaselines(await fetchJson("baselines.json"));
    $("baselines-present").textContent = presentRows(state.baselines);
    fillTableFilter();
    renderTable();
  } catch (err) {
    // without a table the page goes on: the chat, the benchmark mode and its bars still work
    state.baselines = null;
    $("baselines").textContent = `${err.message} (run ./build.sh baselines)`;
    $("baselines").className = "error";
  }
}

main();
