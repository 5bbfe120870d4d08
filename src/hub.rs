//! Models by Hugging Face repository id, natively (the CLI; `www/hub.js` and `www/worker.js` are
//! the browser's side of the same layout). A repository laid out as transformers.js's are:
//! `config.json`, `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja` (where newer
//! repositories keep the chat template), and `onnx/model<suffix>.onnx` per dtype, with its
//! external data where config.json's `transformers.js_config` says so. Files come from
//! `<endpoint>/<repo>/resolve/<revision>/<path>`, once: they are kept under
//! `<cache>/hub/<host>/<repo>/<revision>/`, each written whole or not at all, and a list of them
//! (`files.json`) is written last, so that a later load reads the folder without the network.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::external::{SideFiles, WithExternal};
use crate::graph::Prepare;

/// A dtype's file suffix, as transformers.js names them.
pub const DTYPES: &[(&str, &str)] = &[
    ("fp32", ""), ("fp16", "_fp16"), ("q8", "_quantized"), ("int8", "_int8"), ("uint8", "_uint8"), ("q4", "_q4"),
    ("q4f16", "_q4f16"), ("bnb4", "_bnb4"),
];

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// A repository, a dtype, a revision and where the hub is.
#[derive(Debug, Clone)]
pub struct HubSource {
    pub repo: String,
    pub dtype: String,
    pub revision: String,
    pub endpoint: String,
}

fn name_ok(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.len() <= 96
        && !s.contains("..")
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

impl HubSource {
    /// Checked: an `owner/name` id, a known dtype, a plain revision, an http(s) endpoint.
    pub fn new(repo: &str, dtype: &str, revision: &str, endpoint: &str) -> Result<HubSource> {
        let bad = |what: String| Err(Error::Options(what));
        let repo = repo.trim().trim_start_matches("https://huggingface.co/").trim_end_matches('/');
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() > 2 || !parts.iter().all(|p| name_ok(p)) {
            return bad(format!("{repo:?} is not a Hugging Face repository id (owner/name, e.g. onnx-community/SmolLM2-135M-Instruct)"));
        }
        if !DTYPES.iter().any(|(d, _)| *d == dtype) {
            let known: Vec<&str> = DTYPES.iter().map(|(d, _)| *d).collect();
            return bad(format!("dtype {dtype:?}: expected one of {}", known.join(", ")));
        }
        if !revision.split('/').all(name_ok) {
            return bad(format!("revision {revision:?}: a branch, tag or commit"));
        }
        let endpoint = endpoint.trim_end_matches('/');
        let host = endpoint.strip_prefix("https://").or_else(|| endpoint.strip_prefix("http://"));
        if host.is_none_or(|h| h.is_empty() || h.contains(['?', '#', ' '])) {
            return bad(format!("endpoint {endpoint:?}: an http(s) URL"));
        }
        Ok(HubSource { repo: repo.into(), dtype: dtype.into(), revision: revision.into(), endpoint: endpoint.into() })
    }

    /// The ONNX file of the dtype: `onnx/model<suffix>.onnx`.
    pub fn onnx_path(&self) -> String {
        let suffix = DTYPES.iter().find(|(d, _)| *d == self.dtype).map_or("", |(_, s)| s);
        format!("onnx/model{suffix}.onnx")
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{}/resolve/{}/{path}", self.endpoint, self.repo, self.revision.replace('/', "%2F"))
    }

    /// Where its files are kept under `cache`.
    pub fn folder(&self, cache: &Path) -> PathBuf {
        let host = self.endpoint.split("://").nth(1).unwrap_or("hub").replace(':', "_");
        cache.join("hub").join(host).join(&self.repo).join(self.revision.replace('/', "%2F"))
    }
}

/// The external data files of `path`, from config.json's
/// `"transformers.js_config".use_external_data_format`: true or a number of chunks, for every
/// file or per file name. Chunk 0 is `<file>_data`, chunk i `<file>_data_<i>`.
pub fn external_data_paths(config: &serde_json::Value, path: &str) -> Vec<String> {
    let setting = &config["transformers.js_config"]["use_external_data_format"];
    let name = path.rsplit('/').next().unwrap_or(path);
    let v = if setting.is_object() {
        setting.get(name).or_else(|| setting.get(name.trim_end_matches(".onnx"))).unwrap_or(&serde_json::Value::Null)
    } else {
        setting
    };
    let chunks = match v {
        serde_json::Value::Bool(true) => 1,
        serde_json::Value::Number(n) => n.as_u64().unwrap_or(0).min(64) as usize,
        _ => 0,
    };
    (0..chunks).map(|i| if i == 0 { format!("{path}_data") } else { format!("{path}_data_{i}") }).collect()
}

/// The context config.json gives (GPT-2's `n_positions`), if any.
pub fn config_context(config: &serde_json::Value) -> Option<usize> {
    ["max_position_embeddings", "n_positions"]
        .iter()
        .find_map(|k| config[k].as_u64())
        .or_else(|| config["text_config"]["max_position_embeddings"].as_u64())
        .filter(|&n| n > 0)
        .map(|n| n as usize)
}

/// A repository's files in the cache folder.
#[derive(Debug)]
pub struct Fetched {
    pub source: HubSource,
    pub dir: PathBuf,
    /// Paths in the repository, as listed in `files.json`.
    pub files: Vec<String>,
    pub config: serde_json::Value,
}

/// What a download reports: (path, bytes so far, bytes in all if the server said).
pub type Progress<'a> = &'a mut dyn FnMut(&str, u64, Option<u64>);

const LIST: &str = "files.json";
/// The chat template, where newer repositories keep it instead of tokenizer_config.json.
pub const CHAT_TEMPLATE: &str = "chat_template.jinja";

/// The repository's files, from the cache folder when a complete copy is there, else
/// downloaded (without the network: an error at once, naming the endpoint).
pub fn fetch(src: &HubSource, cache: &Path, progress: Progress) -> Result<Fetched> {
    let dir = src.folder(cache);
    let read_config = |dir: &Path| -> Result<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)
            .map_err(|e| Error::Hub(format!("{}: config.json is not JSON: {e}", src.repo)))
    };
    let onnx = src.onnx_path();
    if let Ok(list) = std::fs::read(dir.join(LIST)) {
        let files: Vec<String> = serde_json::from_slice(&list).map_err(|e| Error::Hub(format!("{}: {e}", dir.join(LIST).display())))?;
        if files.contains(&onnx) && files.iter().all(|f| dir.join(f).is_file()) {
            return Ok(Fetched { source: src.clone(), config: read_config(&dir)?, dir, files });
        }
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(15)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .user_agent(concat!("wasmlm/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let mut files = vec![];
    download(&agent, src, "config.json", &dir, false, progress)?;
    files.push("config.json".to_string());
    download(&agent, src, "tokenizer.json", &dir, false, progress)?;
    files.push("tokenizer.json".to_string());
    for optional in ["tokenizer_config.json", CHAT_TEMPLATE] {
        if download(&agent, src, optional, &dir, true, progress)? {
            files.push(optional.to_string());
        }
    }
    let config = read_config(&dir)?;
    for path in std::iter::once(onnx.clone()).chain(external_data_paths(&config, &onnx)) {
        download(&agent, src, &path, &dir, false, progress)?;
        files.push(path);
    }
    write_whole(&dir.join(LIST), &serde_json::to_vec_pretty(&files).expect("a list of strings"))?;
    Ok(Fetched { source: src.clone(), dir, files, config })
}

/// Downloads `path` into `dir` (through `<file>.part`, renamed when whole). `optional`: a 404
/// gives false.
fn download(agent: &ureq::Agent, src: &HubSource, path: &str, dir: &Path, optional: bool, progress: Progress) -> Result<bool> {
    let url = src.url(path);
    let mut res = agent.get(&url).call().map_err(|e| {
        Error::Hub(format!(
            "cannot reach {} to fetch {} ({e}): offline? A repository's files are downloaded once, then read from the \
             cache folder; set HF_ENDPOINT for a mirror",
            src.endpoint, src.repo))
    })?;
    let status = res.status().as_u16();
    if status == 404 && optional {
        return Ok(false);
    }
    if status != 200 {
        let hint = match status {
            401 | 403 => " (a gated or private repository: not supported)".to_string(),
            404 if path.starts_with("onnx/") => format!(": the repository has no {} file (transformers.js's name for it)", src.dtype),
            404 if path == "config.json" => " (no such repository, or it has no config.json)".to_string(),
            _ => String::new(),
        };
        return Err(Error::Hub(format!("{url}: HTTP {status}{hint}")));
    }
    let header = |k: &str| res.headers().get(k).and_then(|v| v.to_str().ok()).map(String::from);
    let total = if header("content-encoding").is_some() { None } else { header("content-length").and_then(|v| v.parse::<u64>().ok()) };
    let target = dir.join(path);
    let part = target.with_file_name(format!("{}.part", target.file_name().and_then(|n| n.to_str()).unwrap_or("file")));
    std::fs::create_dir_all(target.parent().expect("a file in the folder"))?;
    let mut out = std::io::BufWriter::new(std::fs::File::create(&part)?);
    let mut reader = res.body_mut().as_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut loaded = 0u64;
    let result = (|| -> Result<()> {
        loop {
            let n = reader.read(&mut buf).map_err(|e| Error::Hub(format!("{url}: the download broke off after {loaded} bytes ({e})")))?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])?;
            loaded += n as u64;
            progress(path, loaded, total);
        }
        if let Some(t) = total.filter(|&t| t != loaded) {
            return Err(Error::Hub(format!("{url}: {loaded} bytes arrived, the server announced {t} (interrupted download?)")));
        }
        out.flush()?;
        out.get_ref().sync_all()?;
        Ok(())
    })();
    drop(out);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    std::fs::rename(&part, &target)?;
    Ok(true)
}

fn write_whole(path: &Path, bytes: &[u8]) -> Result<()> {
    let part = path.with_extension("part");
    std::fs::write(&part, bytes)?;
    std::fs::rename(&part, path)?;
    Ok(())
}

/// The engine on a fetched repository: its context is config.json's (or `context`, if smaller).
pub fn load(f: &Fetched, context: Option<usize>, prep: Prepare) -> Result<Engine> {
    let read = |p: &str| std::fs::read(f.dir.join(p)).map_err(Error::Io);
    let onnx = f.source.onnx_path();
    let mut side: SideFiles = vec![];
    for p in external_data_paths(&f.config, &onnx) {
        let name = p.rsplit('/').next().unwrap_or(&p).to_string();
        side.push((name, Box::new(read(&p)?)));
    }
    // the files a repository may lack: those `fetch` found
    let optional = |p: &str| if f.files.iter().any(|x| x == p) { read(p).map(Some) } else { Ok(None) };
    let tokenizer_config = optional("tokenizer_config.json")?;
    let chat_template = optional(CHAT_TEMPLATE)?
        .map(|b| String::from_utf8(b).map_err(|_| Error::Tokenizer(format!("{CHAT_TEMPLATE} is not UTF-8"))))
        .transpose()?;
    let from_config = config_context(&f.config);
    let context = match (context, from_config) {
        (Some(c), Some(m)) => c.min(m),
        (c, m) => c.or(m).unwrap_or(2048),
    };
    let name = format!("{}/{onnx}", f.source.repo);
    Engine::from_user_files(&name, WithExternal { onnx: read(&onnx)?, files: side }, &read("tokenizer.json")?,
                            tokenizer_config.as_deref(), chat_template.as_deref(), context, prep)
}

/// `$WASMLM_CACHE`, else `$XDG_CACHE_HOME/wasmlm`, else `~/.cache/wasmlm`.
pub fn default_cache() -> Result<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("WASMLM_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("wasmlm")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/wasmlm")))
        .ok_or_else(|| Error::Hub("no cache folder: set WASMLM_CACHE".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_checked_and_named_as_transformers_js_does() {
        let s = HubSource::new("onnx-community/SmolLM2-135M-Instruct", "q4", "main", "https://huggingface.co/").unwrap();
        assert_eq!(s.onnx_path(), "onnx/model_q4.onnx");
        assert_eq!(s.url("onnx/model_q4.onnx"), "https://huggingface.co/onnx-community/SmolLM2-135M-Instruct/resolve/main/onnx/model_q4.onnx");
        assert_eq!(HubSource::new("gpt2", "fp32", "main", DEFAULT_ENDPOINT).unwrap().onnx_path(), "onnx/model.onnx");
        assert_eq!(HubSource::new("a/b", "q8", "main", DEFAULT_ENDPOINT).unwrap().onnx_path(), "onnx/model_quantized.onnx");
        for (repo, dtype, rev, endpoint) in [("a/../b", "q8", "main", DEFAULT_ENDPOINT), ("a/b/c", "q8", "main", DEFAULT_ENDPOINT),
                                             ("", "q8", "main", DEFAULT_ENDPOINT), ("a/b", "q3", "main", DEFAULT_ENDPOINT),
                                             ("a/b", "q8", "../x", DEFAULT_ENDPOINT), ("a/b", "q8", "main", "ftp://x")] {
            assert!(HubSource::new(repo, dtype, rev, endpoint).is_err(), "{repo} {dtype} {rev} {endpoint}");
        }
    }

    #[test]
    fn external_data_follows_transformers_js_config() {
        let c = |v: serde_json::Value| serde_json::json!({"transformers.js_config": {"use_external_data_format": v}});
        assert!(external_data_paths(&serde_json::json!({}), "onnx/model.onnx").is_empty());
        assert_eq!(external_data_paths(&c(true.into()), "onnx/model.onnx"), ["onnx/model.onnx_data"]);
        assert_eq!(external_data_paths(&c(2.into()), "onnx/model.onnx"), ["onnx/model.onnx_data", "onnx/model.onnx_data_1"]);
        let per_file = c(serde_json::json!({"model_q4.onnx": true}));
        assert_eq!(external_data_paths(&per_file, "onnx/model_q4.onnx"), ["onnx/model_q4.onnx_data"]);
        assert!(external_data_paths(&per_file, "onnx/model.onnx").is_empty());
        assert_eq!(config_context(&serde_json::json!({"max_position_embeddings": 8192})), Some(8192));
        assert_eq!(config_context(&serde_json::json!({"n_positions": 1024})), Some(1024));
    }
}
