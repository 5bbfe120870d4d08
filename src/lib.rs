//! wasmlm: a causal LM's ONNX graph (INT8, with a KV cache) run by tract, natively and in wasm.
//!
//! Manifest + bytes -> Engine (graph optimized once) -> Session (the KV cache) -> Generation
//! (a pull stream of TokenEvents). The library never prints.

pub mod bench;
pub mod clock;
pub mod convention;
pub mod engine;
pub mod error;
pub mod external;
pub mod file_parts;
pub mod fold;
pub mod fused;
pub mod generate;
pub mod graph;
#[cfg(not(target_arch = "wasm32"))]
pub mod hub;
#[cfg(target_arch = "wasm32")]
pub mod js_bytes;
pub mod last_row;
pub mod manifest;
pub mod normalize;
pub mod pow;
pub mod prefold;
mod proto;
pub mod qmatmul;
pub mod sampler;
pub mod session;
pub mod text;
#[cfg(target_arch = "wasm32")]
pub mod wasm;

/// The tract release the engine is pinned to (Cargo.toml), for row labels and the page.
pub const TRACT_VERSION: &str = "0.23.9";

pub use engine::{Engine, LoadedInfo};
pub use error::{Error, Result};
pub use generate::{GenerateOptions, Generation, RunStats, StopReason, TokenEvent};
pub use graph::Prepare;
pub use manifest::Manifest;
pub use sampler::SamplingOptions;
pub use session::Session;
