//! manifest.json of a model bundle (written by models/wasmlm_models/bundle.py): what each file is,
//! its size and sha256, the architecture and the tokens. Nothing is read from a file name.

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub id: String,
    pub real_weights: bool,
    pub architecture: Architecture,
    pub tokens: Tokens,
    pub default: DefaultFile,
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Architecture {
    pub arch: String,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub context: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Tokens {
    pub eos_ids: Vec<u32>,
    pub bos_id: Option<u32>,
    pub chat_template: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DefaultFile {
    pub file: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
    pub kind: String,
    pub precision: Option<String>,
    pub cache: Option<String>,
    pub preset: Option<String>,
}

impl Manifest {
    pub fn from_json(text: &str) -> Result<Manifest> {
        serde_json::from_str(text).map_err(|e| Error::Manifest(e.to_string()))
    }

    pub fn file(&self, name: &str) -> Result<&FileEntry> {
        self.files
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| Error::Manifest(format!("no file named {name} in the bundle")))
    }

    /// The ONNX file of a precision ("fp32" | "int8"), cache ("with_past" | "no_past") and preset
    /// (None: the bundle's default INT8 preset).
    pub fn onnx_file(&self, precision: &str, cache: &str, preset: Option<&str>) -> Result<&FileEntry> {
        let default = self.file(&self.default.file)?.preset.clone();
        let want = if precision == "fp32" { None } else { preset.map(String::from).or(default) };
        self.files
            .iter()
            .find(|f| {
                f.kind == "onnx"
                    && f.precision.as_deref() == Some(precision)
                    && f.cache.as_deref() == Some(cache)
                    && f.preset == want
            })
            .ok_or_else(|| {
                Error::Manifest(format!("no {precision} {cache} file (preset {want:?}) in the bundle"))
            })
    }

    /// Check bytes against the manifest's size and sha256 for `name`.
    pub fn verify(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.verify_with(name, bytes, None)
    }

    /// As `verify`, with the sha256 already computed by the caller (a browser's WebCrypto hashes
    /// at native speed; the sha2 crate in wasm runs at ~30 MB/s, 17 s for a 540 MB file). The
    /// size is still checked here, and the digest is compared with the manifest's here.
    pub fn verify_with(&self, name: &str, bytes: &[u8], sha256: Option<&str>) -> Result<()> {
        self.verify_digest(name, bytes.len() as u64, || sha256_hex(bytes), sha256)
    }

    /// As `verify_with`, from the size and a digest computed only if the caller has none.
    pub fn verify_digest(&self, name: &str, size: u64, digest: impl FnOnce() -> String, sha256: Option<&str>) -> Result<()> {
        let entry = self.file(name)?;
        if size != entry.bytes {
            return Err(Error::SizeMismatch { file: name.into(), expected: entry.bytes, size });
        }
        let found = match sha256 {
            Some(hex_digest) => hex_digest.to_ascii_lowercase(),
            None => digest(),
        };
        if found != entry.sha256 {
            return Err(Error::HashMismatch { file: name.into(), expected: entry.sha256.clone(), found });
        }
        Ok(())
    }
}

/// sha256, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `hex`'s inverse into `out` (exactly 2 x out.len() hex digits).
pub(crate) fn unhex(text: &str, out: &mut [u8]) -> std::result::Result<(), ()> {
    let b = text.as_bytes();
    if b.len() != 2 * out.len() {
        return Err(());
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8).ok_or(());
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(b[2 * i])? << 4 | digit(b[2 * i + 1])?;
    }
    Ok(())
}
