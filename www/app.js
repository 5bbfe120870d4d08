// The page: model picker, prompt, streamed output, per-token timings, baseline table with the
// browser's rows, benchmark mode. The engine runs in worker.js; this thread only draws.
// Text from the model or from files always goes in with textContent, never as HTML.
import { presentRows, renderBaselines, renderBundles } from "./tables.js";
import { TokenChart } from "./chart.js";

const $ = (id) => document.getElementById(id);
const state = {
  worker: null,
  manifests: [],
  baselines: null,
  root: "models/", // where the bundles are (modelsRoot)
  live: [], // rows measured in this page
  loaded: null, // {info, build}
  running: null, // "generate" | "bench" | "load"
  events: [],
  benchText: null,
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
  $("load").disabled = !!what;
  $("new-chat").disabled = !!what;
  $("stop").disabled = !(what === "generate" || what === "bench");
}

function percentile(sorted, q) {
  if (!sorted.length) return 0;
  const pos = (q / 100) * (sorted.length - 1);
  const lo = Math.floor(pos), hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}

function renderTable() {
  if (!state.baselines) return;
  const filter = { model: $("baseline-model").value, withPast: $("baseline-past").checked };
  renderBaselines($("baselines"), $("machine"), state.baselines, state.live, filter);
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

// ---- worker -------------------------------------------------------------------------------

function startWorker() {
  state.worker?.terminate();
  // ?build=threads|relaxed|simd|nosimd forces a wasm build (to compare them); otherwise the worker picks
  const workerUrl = new URL("./worker.js", import.meta.url);
  const forced = new URLSearchParams(location.search).get("build");
  if (forced) workerUrl.searchParams.set("build", forced);
  state.worker = new Worker(workerUrl, { type: "module" });
  state.worker.onmessage = (e) => onWorkerMessage(e.data);
  state.worker.onerror = (e) => {
    setStatus(`the engine's worker failed: ${e.message || "could not start (module workers need a recent browser)"}`, true);
    setRunning(null);
  };
}

function onWorkerMessage(msg) {
  switch (msg.type) {
    case "status":
      setStatus(msg.text);
      break;
    case "notice":
      notice(msg.text);
      break;
    case "progress": {
      const bar = $("progress");
      bar.hidden = false;
      bar.max = msg.total;
      bar.value = msg.loaded;
      const pct = ((100 * msg.loaded) / msg.total).toFixed(0);
      const mb = (b) => (b / 1e6).toFixed(1);
      $("progress-text").textContent = msg.cached
        ? `${msg.file}: ${mb(msg.total)} MB from the browser's cache`
        : `${msg.file}: ${mb(msg.loaded)} / ${mb(msg.total)} MB (${pct}%)`;
      break;
    }
    case "ready": {
      state.loaded = { info: msg.info, build: msg.build };
      const i = msg.info;
      const phases = (i.load_phases_ms || []).map(([n, ms]) => `${n} ${(ms / 1000).toFixed(1)}`).join(", ");
      setStatus(`ready in ${(i.click_to_ready_ms / 1000).toFixed(1)} s (engine load ${(i.load_ms / 1000).toFixed(1)} s: ${phases})`);
      $("model-info").textContent = `${i.model}${i.real_weights ? "" : " (random weights)"}: ${i.file}, ` +
        `${(i.file_bytes / 1e6).toFixed(1)} MB, ${i.precision ?? "?"}${i.preset ? " " + i.preset : ""}, ` +
        `${i.cache}, ${i.nodes} nodes, context ${i.context}` +
        (i.int8_kernels ? `, int8 kernels: ${i.int8_kernels}` : "") +
        (i.fused_ops ? `, fused ops: ${i.fused_ops}` : "") + `. Engine: wasmlm ${msg.build.version}, ` +
        `tract ${msg.build.tract}, WebAssembly build: ${msg.build.simd === "none" ? "without SIMD" : msg.build.simd}` +
        (msg.build.relaxedCheck ? ` (kernels checked against the scalar one in ${msg.build.relaxedCheck.ms} ms)` : "") +
        `, ${threadsText(msg.build)}` +
        (msg.build.wasmBytes ? `, .wasm ${(msg.build.wasmBytes.raw / 1e6).toFixed(1)} MB (${(msg.build.wasmBytes.gzip / 1e6).toFixed(1)} MB gzipped).` : ".");
      // the table follows the loaded model
      if ([...$("baseline-model").options].some((o) => o.value === i.model)) {
        $("baseline-model").value = i.model;
        renderTable();
      }
      newChat(false); // a new session: the saved conversation, if any, is resumed below
      $("chat").disabled = !i.has_chat_template;
      if (!i.has_chat_template) $("chat").checked = false;
      setRunning(null);
      resume();
      break;
    }
    case "snapshot-done":
      conversation.put({ model: state.loaded?.info.model, file: state.loaded?.info.file, messages: state.messages,
        snapshot: msg.bytes, cacheTokens: msg.cacheTokens, saved: new Date().toISOString() })
        .catch((err) => notice(`The conversation could not be saved in this browser: ${err.message}`));
      break;
    case "restore-done":
      $("context-note").textContent = `Resumed the saved conversation: its KV cache (${msg.cacheTokens} tokens) ` +
        "was restored, nothing was run again.";
      setRunning(null);
      break;
    case "token":
      onToken(msg);
      break;
    case "done":
      onDone(msg);
      break;
    case "bench-progress":
      $("bench-status").textContent = `${msg.backend}: ` + (msg.run === 0 ? "warm-up run…"
        : msg.run === "profile" ? "timing each op…" : `run ${msg.run} of ${msg.of}…`);
      break;
    case "bench-done":
      onBenchDone(msg.row);
      break;
    case "peer-done":
      onPeerDone(msg.row);
      break;
    case "peer-error":
      $("bench-status").textContent += ` — onnxruntime-web: ${msg.message}`;
      state.peerPending = false;
      setRunning(null);
      break;
    case "error":
      if (msg.during === "load") state.loaded = null;
      if (msg.during === "restore") {
        $("context-note").textContent = `The saved KV cache was not restored (${msg.message}): ` +
          "the next turn runs the whole conversation again.";
        setRunning(null);
        break;
      }
      if (msg.during === "chat" && msg.contextFull) {
        onContextFull(msg.message);
        setRunning(null);
        break;
      }
      if (msg.during === "chat" || msg.during === "generate") $("output")?.remove();
      setStatus(`${msg.during}: ${msg.message}`, true);
      if (state.running === "bench") $("bench-status").textContent = "";
      if (msg.fatal) {
        notice("The engine crashed (see the console); it was restarted: load the model again.", "error");
        state.loaded = null;
        startWorker();
      }
      setRunning(null);
      break;
  }
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

function load(source) {
  state.loaded = null;
  setRunning("load");
  $("progress").hidden = true;
  $("progress-text").textContent = "";
  state.worker.postMessage({ type: "load", source });
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
  const problems = [];
  if (onnx.length !== 1) problems.push(onnx.length ? "only one .onnx file at a time" : "an .onnx file");
  if (!tokenizer) problems.push("its tokenizer.json");
  if (problems.length) {
    setStatus(`drop needs ${problems.join(" and ")} (got: ${list.map((f) => f.name).join(", ") || "nothing"})`, true);
    return;
  }
  const context = Number($("user-context").value) || 2048;
  load({ kind: "user", name: onnx[0].name, onnx: onnx[0], tokenizer, config, context });
}

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
  state.worker.postMessage({ type: "restore", bytes: saved.snapshot });
}

function newChat(forget = true) {
  if (forget) conversation.clear().catch(() => {});
  state.messages = [];
  state.pendingTurn = null;
  $("transcript").replaceChildren();
  $("context-full").hidden = true;
  $("context-note").textContent = "";
  if (state.loaded && !state.running) state.worker.postMessage({ type: "reset" });
}
$("new-chat").onclick = () => { if (!state.running) newChat(); };

function send(messages) {
  state.events = [];
  $("stats").replaceChildren();
  $("context-full").hidden = true;
  chart.reset();
  // the reply streams into the newest assistant turn, #output
  $("output")?.removeAttribute("id");
  const reply = turnElement("assistant", "");
  reply.id = "output";
  setRunning("generate");
  if (messages) state.worker.postMessage({ type: "chat", messages, options: options() });
  else state.worker.postMessage({ type: "generate", prompt: state.pendingTurn.content, options: options() });
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

$("stop").onclick = () => state.worker.postMessage({ type: "cancel" });

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
  if (!ev.prefill) chart.push(ev.ms);
  renderStats();
}

function stats(events) {
  const prefill = events.find((e) => e.prefill);
  const decode = events.filter((e) => !e.prefill).map((e) => e.ms);
  const total = decode.reduce((a, b) => a + b, 0);
  const sorted = [...decode].sort((a, b) => a - b);
  return {
    ttft: prefill ? prefill.ms : 0,
    median: percentile(sorted, 50),
    p90: percentile(sorted, 90),
    tps: total > 0 ? (decode.length * 1000) / total : 0,
    decode,
  };
}

function renderStats(extra = []) {
  const s = stats(state.events);
  const items = [
    ["time to first token (prefill)", `${s.ttft.toFixed(1)} ms`],
    ["tokens", String(state.events.length)],
    ["decode ms/token, median", s.median.toFixed(2)],
    ["decode ms/token, p90", s.p90.toFixed(2)],
    ["tokens/s (decode)", s.tps.toFixed(1)],
    ...extra,
  ];
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

function onDone(msg) {
  if (state.running === "generate" && state.pendingTurn) {
    const reply = $("output")?.textContent ?? "";
    if ($("chat").checked) {
      state.messages.push(state.pendingTurn, { role: "assistant", content: reply });
      state.worker.postMessage({ type: "snapshot" }); // then kept with the conversation
    }
    state.pendingTurn = null;
    $("prompt").value = "";
    if (msg.reason === "ContextFull") {
      onContextFull(`The context is full (${msg.cacheTokens} of ${msg.context} tokens): the reply stopped there.`, false);
    }
    if (msg.cacheTokens !== undefined) {
      $("context-note").textContent = `KV cache: ${msg.cacheTokens} of ${msg.context} tokens; this turn's ` +
        `prefill ran ${msg.fedTokens} new token(s) of the ${msg.promptTokens} in the conversation.`;
    }
  }
  renderStats([["prompt tokens", String(msg.promptTokens ?? "")],
    ["prefill tokens (new)", String(msg.fedTokens ?? "")],
    ["cache tokens", String(msg.cacheTokens ?? "")],
    ["stopped by", msg.reason ?? ""]]);
  const s = stats(state.events);
  if (state.loaded && s.decode.length > 0 && state.running === "generate") {
    const round = (x) => Math.round(x * 1000) / 1000;
    const row = {
      ...liveRowBase(state.loaded.info, state.loaded.build), kind: `last generation, ${s.decode.length} decode steps`,
      decode_ms_per_token: { median: round(s.median), p90: round(s.p90), runs: 1 },
      prefill_ms: { median: round(s.ttft), p90: round(s.ttft), runs: 1 },
      prompt_tokens: msg.promptTokens,
    };
    state.live = state.live.filter((r) => !r.kind?.startsWith("last generation")).concat([row]);
    renderTable();
  }
  if (state.running === "bench") $("bench-status").textContent = "cancelled";
  setRunning(null);
}

// ---- benchmark mode -----------------------------------------------------------------------

$("bench").onclick = async () => {
  try {
    if (!state.benchText) {
      const res = await fetch("bench-prompt.txt");
      if (!res.ok) throw new Error(`bench-prompt.txt: HTTP ${res.status}`);
      state.benchText = await res.text();
    }
  } catch (err) {
    $("bench-status").textContent = err.message;
    return;
  }
  $("bench-download").hidden = true;
  $("bench-profile-table").hidden = true;
  setRunning("bench");
  state.peerPending = $("bench-peer").checked;
  state.worker.postMessage({
    type: "bench", text: state.benchText, runs: Number($("bench-runs").value) || 5, peer: state.peerPending,
    profile: $("bench-profile").checked,
  });
};

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
  if (state.peerPending) $("bench-status").textContent += "; now onnxruntime-web on the same file…";
  else setRunning(null);
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

// The optional peer row: onnxruntime-web in this browser, same file, prompt and protocol, run
// right after ours; the table then shows the ratio of the two.
function onPeerDone(row) {
  const { info, build } = state.loaded;
  const full = { ...row, ...liveRowBase(info, build), backend: row.backend, kind: "benchmark mode, peer",
    measured_at: new Date().toISOString() };
  state.live = state.live.filter((r) => !(r.kind === full.kind && r.file === full.file && r.model === full.model))
    .concat([full]);
  renderTable();
  const d = full.decode_ms_per_token;
  $("bench-status").textContent = `${state.benchStatus}; onnxruntime-web: decode ${d.median} ms/token median, ` +
    `prefill ${full.prefill_ms.median} ms`;
  state.peerPending = false;
  setRunning(null);
}

// ---- start --------------------------------------------------------------------------------

// The threaded build needs a cross-origin isolated page: `./build.sh serve` sends the headers; on
// a static host coi-sw.js adds them, which takes one reload after it first installs. Only where
// that build would run (worker.js: from 3 cores on, or ?build=threads); ?isolate=0 skips it (the
// single-threaded build then runs).
async function isolate() {
  if (self.crossOriginIsolated || !("serviceWorker" in navigator) || !window.isSecureContext) return;
  const query = new URLSearchParams(location.search);
  if (query.get("isolate") === "0") return;
  const forced = query.get("build");
  if (forced ? forced !== "threads" : (navigator.hardwareConcurrency || 1) < 3) return;
  if (sessionStorage.getItem("wasmlm-isolation-reload")) {
    notice("This page could not be made cross-origin isolated: the single-threaded build runs.");
    return;
  }
  try {
    await navigator.serviceWorker.register("coi-sw.js");
    await navigator.serviceWorker.ready;
    sessionStorage.setItem("wasmlm-isolation-reload", "1");
    location.reload();
    await new Promise(() => {}); // the reload replaces this page
  } catch (err) {
    notice(`No cross-origin isolation (${err.message}): the single-threaded build runs.`);
  }
}

async function main() {
  if (typeof WebAssembly !== "object") {
    setStatus("This browser has no WebAssembly: the engine cannot run here.", true);
    return;
  }
  await isolate();
  if (self.crossOriginIsolated) sessionStorage.removeItem("wasmlm-isolation-reload");
  startWorker();
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
      state.manifests.push(await fetchJson(`${state.root}${id}/manifest.json`));
    } catch (err) {
      state.manifests.push({ id, error: err.message });
    }
  }
  renderBundles($("bundles"), state.manifests);
  fillPicker();
  setRunning(null);
  try {
    state.baselines = await fetchJson("baselines.json");
    $("baselines-present").textContent = presentRows(state.baselines);
    fillTableFilter();
    renderTable();
  } catch (err) {
    $("baselines").textContent = `${err.message} (run ./build.sh baselines)`;
    $("baselines").className = "error";
  }
}

main();
