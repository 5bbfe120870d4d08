// Tables built with DOM calls; cell contents are always set with textContent.

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function table(headers, rows) {
  const t = el("table");
  const head = t.createTHead().insertRow();
  for (const h of headers) head.appendChild(el("th", h));
  const body = t.createTBody();
  for (const cells of rows) {
    const tr = body.insertRow();
    for (const c of cells) tr.appendChild(el("td", c, typeof c === "number" ? "num" : undefined));
  }
  return t;
}

const mib = (bytes) => Math.round(bytes / 1048576 * 10) / 10;
const stat = (s) => (s ? `${s.median} / ${s.p90}` : "-");

export function renderBundles(container, manifests) {
  const rows = [];
  for (const m of manifests) {
    if (m.error) {
      rows.push([m.id, "not built", m.error, "", "", ""]);
      continue;
    }
    for (const f of m.files.filter((f) => f.kind === "onnx")) {
      const fid = f.preset ? m.fidelity.by_preset[f.preset] : null;
      rows.push([
        m.id + (m.real_weights ? "" : " (random weights)"),
        `${f.precision}${f.preset ? " " + f.preset : ""}, ${f.cache}`,
        f.name, mib(f.bytes),
        fid ? fid.top1_agreement : "", fid ? fid.ppl_ratio : "",
      ]);
    }
  }
  container.replaceChildren(table(
    ["model", "file is", "file", "MiB", "top-1 agreement with FP32", "perplexity ratio"], rows));
}

// The native row a browser row compares with: same model, file and thread count.
function nativeMedian(rows, r, backend) {
  const n = rows.find((x) => x.backend === backend && x.model === r.model && x.file === r.file &&
    x.threads === r.threads && x.decode_ms_per_token);
  return n ? n.decode_ms_per_token.median : null;
}

// `live`: rows measured in this page (a generation or the benchmark mode), shown last and
// compared with the native rows of the same file and thread count.
// Which native rows the table holds: the first command measures only the default file's ONNX
// Runtime and tract native rows; ./build.sh baselines measures every backend and file.
export function presentRows(data) {
  const backends = [...new Set(data.rows.map((r) => r.backend))].sort();
  const files = new Set(data.rows.map((r) => `${r.model}/${r.file || r.precision}`));
  const full = ["pytorch", "bitsandbytes", "onnxruntime", "tract native"].every((b) => backends.some((x) => x.startsWith(b)));
  return `${data.rows.length} native rows: ${backends.join(", ")}, on ${files.size} file(s). ` +
    (full ? "The full table." : "Not the full table: ./build.sh baselines measures every backend (PyTorch, bitsandbytes, ONNX Runtime, tract) on every file.");
}

export function renderBaselines(container, machineEl, data, live = [], filter = {}) {
  const m = data.machine;
  machineEl.textContent = `Native rows measured on ${m.cpu}, ${m.cores} cores (${m.simd.join(" ")}); ` +
    `batch 1, ${data.protocol.prompt_tokens}-token prompt, ${data.protocol.new_tokens} new tokens. ` +
    "Rows marked \u201cthis browser\u201d are measured here, now.";
  const ratio = (r) => {
    if (!(r.live || /wasm/.test(r.backend)) || !r.decode_ms_per_token) return "";
    const parts = [];
    for (const [label, backend] of [["tract native", "tract native"], ["ORT", "onnxruntime"], ["llama.cpp", "llama.cpp"]]) {
      const n = nativeMedian(data.rows, r, backend);
      if (n) parts.push(`${(r.decode_ms_per_token.median / n).toFixed(2)}\u00d7 ${label}`);
    }
    // our benchmark row against the peers measured in this browser on the same model (the same
    // file, or for wllama its GGUF: peer_of)
    const peers = r.live && r.kind === "benchmark mode" ? live.filter((x) => x.kind === "benchmark mode, peer" &&
      x.model === r.model && (x.file === r.file || x.peer_of === r.file) && x.decode_ms_per_token) : [];
    for (const p of peers) {
      parts.push(`${(r.decode_ms_per_token.median / p.decode_ms_per_token.median).toFixed(2)}\u00d7 ${p.backend.split(" ")[0]} (this browser)`);
    }
    return parts.join(", ") || "no native row for this file";
  };
  const keep = (r) => (!filter.model || r.model === filter.model) && (!filter.withPast || r.cache === "with_past");
  const all = data.rows.concat(live.map((r) => ({ ...r, live: true }))).filter(keep);
  const rows = all.map((r) => [
    r.model, r.live ? `${r.backend} (this browser${r.kind ? ", " + r.kind : ""})` : r.backend,
    r.precision || "", r.preset || "", r.cache || "", r.threads,
    r.error ? `failed: ${r.error}` : stat(r.decode_ms_per_token),
    stat(r.prefill_ms || r.latency_ms), r.peak_rss_mib ?? "", r.wasm_memory_mib ?? "", ratio(r),
  ]);
  const t = table(
    ["model", "backend", "precision", "preset", "cache", "threads",
     "decode ms/token (median / p90)", "prefill or no-cache ms", "peak RSS MiB", "wasm memory MiB", "wasm / native (decode)"], rows);
  t.tBodies[0].querySelectorAll("tr").forEach((tr, i) => { if (all[i].live) tr.className = "live"; });
  container.replaceChildren(t);
}

// The comparison people come for: bars for the loaded file's rows, this browser's against the
// native (and Node) rows of the same file. Decode ms/token, then the 32-token prefill (the bench
// protocol's rows only: a chat reply's prefill read another prompt).
export function renderComparison(container, data, live, loaded) {
  container.replaceChildren();
  if (!loaded) {
    container.append(el("p", "Load a model: its rows show here.", "note"));
    return;
  }
  // (a peer's row measured on another form of the same weights names this file as `peer_of`)
  const same = (r) => r.model === loaded.model && (r.file === loaded.file || r.peer_of === loaded.file) &&
    r.decode_ms_per_token && !r.error;
  const rows = live.filter(same).map((r) => ({ ...r, live: true })).concat((data?.rows ?? []).filter(same));
  if (!rows.some((r) => r.live)) {
    container.append(el("p", "Send a message or run the benchmark: this browser's bars join the native ones.", "note"));
  }
  const label = (r) => `${r.backend}${r.live ? ` (this browser${r.kind ? ", " + r.kind : ""})` : ""}, ` +
    `${r.threads} thread${r.threads > 1 ? "s" : ""}`;
  const charts = [
    ["Decode, ms per token (median; shorter is faster)", (r) => r.decode_ms_per_token?.median],
    [`Prefill of a ${data?.protocol?.prompt_tokens ?? 32}-token prompt, ms (median)`,
      (r) => (r.kind?.startsWith("last generation") ? undefined : r.prefill_ms?.median)],
  ];
  for (const [title, pick] of charts) {
    const items = rows.map((r) => ({ r, v: pick(r) })).filter((x) => x.v > 0).sort((a, b) => a.v - b.v);
    if (!items.length) continue;
    const max = Math.max(...items.map((x) => x.v));
    const figure = el("figure", undefined, "bars");
    figure.append(el("figcaption", `${title}: ${loaded.model}, ${loaded.file}`));
    for (const { r, v } of items) {
      const bar = el("div", undefined, r.live ? "bar live" : "bar");
      bar.style.width = `${Math.max(0.5, (100 * v) / max)}%`;
      const track = el("div", undefined, "track");
      track.append(bar);
      figure.append(el("span", label(r), r.live ? "label live" : "label"), track, el("span", v.toFixed(v < 100 ? 2 : 0), "value"));
    }
    container.append(figure);
  }
  if (!container.querySelector("figure") && !rows.length) {
    container.append(el("p", `No measured rows for ${loaded.file} in this site's table.`, "note"));
  }
}
