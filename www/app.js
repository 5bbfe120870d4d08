// The page's data views: model bundles (their manifests) and the native baseline table.
// Everything from files goes in as text (textContent), never as HTML.
import { renderBaselines, renderBundles } from "./tables.js";

const MODELS = ["smollm2-135m", "distilgpt2-shape"];

async function fetchJson(url) {
  const res = await fetch(url);
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
  return res.json();
}

function showError(el, err) {
  el.textContent = err.message;
  el.className = "error";
}

async function main() {
  const bundlesEl = document.getElementById("bundles");
  const manifests = [];
  for (const id of MODELS) {
    try {
      manifests.push(await fetchJson(`models/${id}/manifest.json`));
    } catch (err) {
      manifests.push({ id, error: err.message });
    }
  }
  renderBundles(bundlesEl, manifests);
  const tableEl = document.getElementById("baselines");
  try {
    renderBaselines(tableEl, document.getElementById("machine"), await fetchJson("baselines.json"));
  } catch (err) {
    showError(tableEl, err);
  }
}

main();
