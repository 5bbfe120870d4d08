//! An ONNX file as the page holds it, a `Uint8Array` in JS memory, read in chunks as it is
//! hashed or decoded (wasm32 only).
//!
//! Passed as a slice, the whole file would first be copied into wasm memory, and wasm memory
//! never shrinks: the copy sets the high-water mark wherever it adds to the peak of the load.
//! Read in chunks, one chunk at a time is in wasm memory besides what the protobuf keeps. On
//! distilgpt2-shape's `report` file (240 MB) wasm memory after load went from 534 to 493 MiB;
//! on SmolLM2 `q8b32` it stayed at 348-349 MiB, where the peak is tract's tensors beside the
//! protobuf's (README, "Memory at load").

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use prost::bytes::Buf;
use sha2::{Digest, Sha256};

use wasm_bindgen::JsCast;

use crate::error::{Error, Result};
use crate::graph::{decode_proto, OnnxBytes};
use crate::manifest::hex;

static CHUNK: AtomicUsize = AtomicUsize::new(4 << 20);

/// Sets the chunk size (for the tests: a small odd one puts boundaries inside every field).
#[doc(hidden)]
pub fn set_chunk_bytes(bytes: usize) {
    CHUNK.store(bytes.max(1), Relaxed);
}

pub struct JsBytes(js_sys::Uint8Array);

impl JsBytes {
    /// wasm-bindgen does not check a `Uint8Array` argument's type: an `ArrayBuffer` or an
    /// `Array` would fail later, inside a call to its missing methods.
    pub fn new(array: js_sys::Uint8Array) -> Result<JsBytes> {
        if !array.is_instance_of::<js_sys::Uint8Array>() {
            return Err(Error::Onnx("its bytes must be a Uint8Array (or a Node Buffer)".into()));
        }
        Ok(JsBytes(array))
    }
}

impl OnnxBytes for JsBytes {
    fn len(&self) -> u64 {
        self.0.length() as u64
    }

    fn sha256(&self) -> String {
        let mut hash = Sha256::new();
        let mut chunks = Chunks::new(&self.0);
        while chunks.has_remaining() {
            let n = chunks.chunk().len();
            hash.update(chunks.chunk());
            chunks.advance(n);
        }
        hex(&hash.finalize())
    }

    fn decode(self) -> Result<tract_onnx::pb::ModelProto> {
        decode_proto(Chunks::new(&self.0))
    }
}

/// The array as a `Buf`: a window of `CHUNK` bytes copied out of it at a time.
struct Chunks<'a> {
    array: &'a js_sys::Uint8Array,
    len: usize,
    /// Where the window starts in the array,
    start: usize,
    window: Vec<u8>,
    /// and how much of it was read.
    at: usize,
}

impl<'a> Chunks<'a> {
    fn new(array: &'a js_sys::Uint8Array) -> Chunks<'a> {
        let mut chunks = Chunks { array, len: array.length() as usize, start: 0, window: vec![], at: 0 };
        chunks.fill(0);
        chunks
    }

    fn fill(&mut self, from: usize) {
        let end = (from + CHUNK.load(Relaxed)).min(self.len);
        self.window.resize(end - from, 0);
        self.array.subarray(from as u32, end as u32).copy_to(&mut self.window);
        (self.start, self.at) = (from, 0);
    }
}

impl Buf for Chunks<'_> {
    fn remaining(&self) -> usize {
        self.len - self.start - self.at
    }

    fn chunk(&self) -> &[u8] {
        &self.window[self.at..]
    }

    /// Past the window's end too (a skipped field): the next window starts where the read is.
    fn advance(&mut self, n: usize) {
        assert!(n <= self.remaining(), "advanced {n} bytes past the end of the ONNX file");
        self.at += n;
        if self.at >= self.window.len() && self.has_remaining() {
            self.fill(self.start + self.at);
        }
    }
}
