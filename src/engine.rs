//! Engine = a prepared graph + its tokenizer + what the manifest says of the model.
//! Sessions (KV caches) are made from it; it is shared, they are not.

use std::sync::Arc;

use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::fused;
use crate::graph::{self, Graph, OnnxBytes, Prepare};
use crate::manifest::Manifest;
use crate::session::Session;
use crate::text::Text;

/// What was loaded, for display and for bench rows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadedInfo {
    pub model: String,
    pub real_weights: bool,
    pub file: String,
    pub file_bytes: u64,
    pub precision: Option<String>,
    pub preset: Option<String>,
    pub cache: Option<String>,
    pub load_ms: f64,
    /// [phase, ms]: checks, then the graph's phases (parse … plan), then the tokenizer.
    pub load_phases_ms: Vec<(String, f64)>,
    pub nodes: usize,
    /// Our int8 kernels in use, if any (see `Graph::kernels`).
    pub int8_kernels: Option<String>,
    /// "N attention products, A attention cores, M GELUs, R rotary embeddings" on our own ops
    /// (fused/), if any.
    pub fused_ops: Option<String>,
    /// The graph's I/O as found: whose names, layers, key/value heads, which extra inputs are
    /// fed, and whether the attention ops keep the cache in place.
    pub layout: String,
}

fn layout(graph: &Graph) -> String {
    use crate::convention::Style;
    let c = &graph.conv;
    let names = match c.style {
        Style::PastKeyIndexed => "this engine's names (past_key_<i>)",
        Style::Optimum => "Optimum's names (past_key_values.<i>.key)",
        Style::NoCache => return "no KV cache (input_ids -> logits): every step reads the whole text again".into(),
    };
    let extra: Vec<&str> = [(c.attention_mask.is_some(), "attention_mask"), (c.position_ids.is_some(), "position_ids")]
        .iter().filter(|(has, _)| *has).map(|(_, n)| *n).collect();
    let fed = if extra.is_empty() { String::new() } else { format!(", {} fed", extra.join(" and ")) };
    let kept = if graph.cache_in_ops() {
        "kept in place by the attention ops"
    } else {
        "passed through the graph's inputs and outputs at each step"
    };
    format!("KV cache with {names}: {} layers, {} key/value heads of {}{fed}; the cache is {kept}",
            c.layers(), graph.kv_heads, graph.head_dim)
}

fn fused_ops(graph: &Graph) -> Option<String> {
    let c = graph.fused_ops;
    if c == fused::Counts::default() {
        return None;
    }
    let grouped = if c.grouped > 0 { format!(" ({} on grouped key/value heads)", c.grouped) } else { String::new() };
    let cache = if c.with_cache > 0 { format!(" ({} keeping the cache)", c.with_cache) } else { String::new() };
    Some(format!("{} attention products{grouped}, {} attention cores{cache}, {} GELUs, {} rotary embeddings", c.products, c.attentions, c.gelus, c.ropes))
}

fn phases(verify: f64, graph: &Graph, tokenizer: f64) -> Vec<(String, f64)> {
    let r = |x: f64| (x * 10.0).round() / 10.0;
    let mut out = vec![("verify sha256".to_string(), r(verify))];
    out.extend(graph.phases.iter().map(|(n, ms)| (n.to_string(), r(*ms))));
    out.push(("tokenizer".into(), r(tokenizer)));
    out
}

pub struct Engine {
    pub graph: Arc<Graph>,
    /// The ONNX file's sha256 (hex): what a session's snapshot is tied to.
    pub sha256: Arc<str>,
    pub text: Text,
    pub eos_ids: Vec<u32>,
    pub context: usize,
    pub info: LoadedInfo,
}

impl Engine {
    /// From bytes (what a browser has): each file is checked against the manifest first. The
    /// ONNX bytes are dropped once decoded (graph::load), so that they do not add to the peak
    /// memory of the rest of the load.
    pub fn from_bytes(
        manifest: &Manifest,
        onnx_name: &str,
        onnx: impl OnnxBytes,
        tokenizer_json: &[u8],
        prep: Prepare,
    ) -> Result<Engine> {
        Engine::from_bytes_hashed(manifest, onnx_name, onnx, tokenizer_json, prep, None, None)
    }

    /// As `from_bytes`, with the files' sha256 (hex) computed by the caller where given
    /// (see `Manifest::verify_with`).
    pub fn from_bytes_hashed(
        manifest: &Manifest,
        onnx_name: &str,
        onnx: impl OnnxBytes,
        tokenizer_json: &[u8],
        prep: Prepare,
        onnx_sha256: Option<&str>,
        tokenizer_sha256: Option<&str>,
    ) -> Result<Engine> {
        let t0 = now_ms();
        manifest.verify_digest(onnx_name, onnx.len(), || onnx.sha256(), onnx_sha256)?;
        manifest.verify_with("tokenizer.json", tokenizer_json, tokenizer_sha256)?;
        let t_verified = now_ms();
        let entry = manifest.file(onnx_name)?;
        if entry.kind != "onnx" {
            return Err(Error::Manifest(format!("{onnx_name} is a {} file, not an ONNX graph", entry.kind)));
        }
        let arch = &manifest.architecture;
        let graph = graph::load(onnx, Some((arch.kv_heads, arch.head_dim)), prep)?;
        let t_graph = now_ms();
        let text = Text::from_bytes(tokenizer_json, manifest.tokens.chat_template.clone())?;
        let load_phases_ms = phases(t_verified - t0, &graph, now_ms() - t_graph);
        let info = LoadedInfo {
            model: manifest.id.clone(),
            real_weights: manifest.real_weights,
            file: onnx_name.into(),
            file_bytes: entry.bytes,
            precision: entry.precision.clone(),
            preset: entry.preset.clone(),
            cache: entry.cache.clone(),
            load_ms: now_ms() - t0,
            load_phases_ms,
            nodes: graph.nodes,
            int8_kernels: graph.kernels.clone(),
            fused_ops: fused_ops(&graph),
            layout: layout(&graph),
        };
        Ok(Engine { graph: Arc::new(graph), sha256: entry.sha256.as_str().into(), text, eos_ids: manifest.tokens.eos_ids.clone(),
                    context: arch.context, info })
    }

    /// A user's own files, without a manifest (the page's drag and drop): the cache layout is read
    /// from the graph's declared input shapes, EOS from the usual special tokens (or the
    /// tokenizer_config.json's eos_token), the chat template from `chat_template` (the text of a
    /// chat_template.jinja, where newer repositories keep it) or else tokenizer_config.json, as
    /// transformers reads them. `context` (at least 1) is cut to tokenizer_config.json's
    /// `model_max_length`, if it has one.
    pub fn from_user_files(
        name: &str,
        onnx: impl OnnxBytes,
        tokenizer_json: &[u8],
        tokenizer_config: Option<&[u8]>,
        chat_template: Option<&str>,
        context: usize,
        prep: Prepare,
    ) -> Result<Engine> {
        let t0 = now_ms();
        let config: serde_json::Value = match tokenizer_config {
            Some(bytes) => serde_json::from_slice(bytes)
                .map_err(|e| Error::Tokenizer(format!("tokenizer_config.json is not JSON: {e}")))?,
            None => serde_json::Value::Null,
        };
        // The token's text: a plain string, or an AddedToken object {"content": ...}.
        let token_text = |v: &serde_json::Value| {
            v.as_str().map(String::from).or_else(|| v.get("content")?.as_str().map(String::from))
        };
        if context == 0 {
            return Err(Error::Options("the context must be at least 1 token".into()));
        }
        // tokenizer_config.json's model_max_length bounds it (a value of 1e7 or more is
        // transformers' "no limit" sentinel)
        let limit = config.get("model_max_length").and_then(|v| v.as_f64()).filter(|&n| (1.0..1e7).contains(&n));
        let context = limit.map_or(context, |n| context.min(n as usize));
        let template = chat_template
            .or_else(|| config.get("chat_template").and_then(|v| v.as_str()))
            .map(String::from);
        let text = Text::from_bytes(tokenizer_json, template)?;
        let mut eos_ids: Vec<u32> = config
            .get("eos_token")
            .and_then(token_text)
            .and_then(|t| text.token_id(&t))
            .into_iter()
            .collect();
        if eos_ids.is_empty() {
            eos_ids = ["<|endoftext|>", "<|im_end|>", "<|eot_id|>", "</s>", "<eos>"]
                .iter()
                .filter_map(|t| text.token_id(t))
                .take(1)
                .collect();
        }
        // no manifest gives it: what a session's snapshot is tied to
        let t_hash = now_ms();
        let sha256 = onnx.sha256();
        let hash_ms = now_ms() - t_hash;
        let file_bytes = onnx.len();
        let graph = graph::load(onnx, None, prep)?;
        let load_phases_ms = phases(hash_ms, &graph, t_hash - t0);
        let info = LoadedInfo {
            model: name.into(),
            real_weights: true,
            file: name.into(),
            file_bytes,
            precision: None,
            preset: None,
            cache: Some(if graph.conv.has_cache() { "with_past" } else { "no_past" }.into()),
            load_ms: now_ms() - t0,
            load_phases_ms,
            nodes: graph.nodes,
            int8_kernels: graph.kernels.clone(),
            fused_ops: fused_ops(&graph),
            layout: layout(&graph),
        };
        Ok(Engine { graph: Arc::new(graph), sha256: sha256.into(), text, eos_ids, context, info })
    }

    /// From a bundle folder (native): reads manifest.json, the chosen ONNX file, tokenizer.json.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_dir(dir: &std::path::Path, file: Option<&str>, prep: Prepare) -> Result<Engine> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::MissingFile(path.display().to_string()),
                _ => Error::Io(e),
            })
        };
        let manifest = Manifest::from_json(&String::from_utf8_lossy(&read("manifest.json")?))?;
        let name = file.unwrap_or(&manifest.default.file).to_string();
        Engine::from_bytes(&manifest, &name, read(&name)?, &read("tokenizer.json")?, prep)
    }

    pub fn session(&self) -> Result<Session> {
        Session::new(self.graph.clone(), self.sha256.clone(), self.context)
    }
}
