//! Typed errors with messages a user can act on. The library never prints; callers show these.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("{file}: sha256 is {found}, the manifest says {expected} (corrupt or partial download?)")]
    HashMismatch { file: String, expected: String, found: String },
    #[error("{file}: {size} bytes, the manifest says {expected}")]
    SizeMismatch { file: String, expected: u64, size: u64 },
    #[error("{0}: not found")]
    MissingFile(String),
    #[error("the ONNX file could not be read (truncated or not ONNX?): {0}")]
    Onnx(String),
    #[error("unsupported graph: {0}")]
    UnsupportedGraph(String),
    #[error("tract could not prepare the graph: {0}")]
    Optimize(String),
    #[error("inference failed: {0}")]
    Run(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("the prompt has {tokens} tokens and the model's context is {context}: shorten it")]
    PromptTooLong { tokens: usize, context: usize },
    #[error("the context is full: {held} tokens held, {more} more asked, {context} at most; truncate the cache (drop old turns) or start over")]
    ContextFull { context: usize, held: usize, more: usize },
    #[error("token id {id} is outside the model's vocabulary of {vocab} (a tokenizer of another model?)")]
    TokenId { id: u32, vocab: usize },
    #[error("cache snapshot refused: {0}")]
    Snapshot(String),
    #[error("Hugging Face hub: {0}")]
    Hub(String),
    #[error("invalid option: {0}")]
    Options(String),
    #[error("ModelFile: {0}")]
    ModelFile(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// tract's errors carry a chain of contexts; keep all of it, it is what says where.
    pub(crate) fn run(e: impl std::fmt::Debug) -> Error {
        Error::Run(format!("{e:?}"))
    }
}
