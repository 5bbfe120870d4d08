//! An ONNX file held in JS memory, read in chunks as it is hashed or decoded
//! (wasm32 only): one `Uint8Array`, or an `Array` of them, the file's parts in order (a static
//! site serves a model in parts of at most 25 MiB: docs/decisions.md, "Static hosting"; the
//! parts are read as one stream and never joined in either memory).
//!
//! A bundle's file does not come this way: the page writes its download into the engine's
//! memory as it arrives (src/file_parts.rs), and so does a user's own ONNX file, read from disk.
//! This reads the bytes an embedding page hands the `Engine` itself, a user's file's external
//! data and a Hugging Face repository's first download.
//!
//! Passed as a slice, the whole file would first be copied into wasm memory, and wasm memory
//! never shrinks: the copy sets the high-water mark wherever it adds to the peak of the load.
//! Read in chunks, one chunk at a time is in wasm memory besides what the protobuf keeps. On
//! distilgpt2-shape's `ort-dynamic-qint8` file (240 MB) wasm memory after load went from 534 to 493 MiB;
//! on SmolLM2 `q8b32` it stayed at 348-349 MiB, where the peak was tract's tensors beside the
//! protobuf's (since packed from the protobuf: qmatmul/packs.rs).

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

pub struct JsBytes {
    parts: Vec<js_sys::Uint8Array>,
    /// Where each part starts in the file, and the file's length last.
    starts: Vec<usize>,
}

impl JsBytes {
    /// wasm-bindgen does not check the argument's type: an `ArrayBuffer` or an `Array` of
    /// numbers would fail later, inside a call to their missing methods.
    pub fn new(value: wasm_bindgen::JsValue) -> Result<JsBytes> {
        let wrong = || Error::Onnx("its bytes must be a Uint8Array (or a Node Buffer), an Array of them, or a ModelFile not yet given to a load".into());
        let parts: Vec<js_sys::Uint8Array> = if value.is_instance_of::<js_sys::Uint8Array>() {
            vec![value.unchecked_into()]
        } else if js_sys::Array::is_array(&value) {
            let array: js_sys::Array = value.unchecked_into();
            array.iter().map(|part| part.dyn_into::<js_sys::Uint8Array>().map_err(|_| wrong())).collect::<Result<_>>()?
        } else {
            return Err(wrong());
        };
        let mut starts = vec![0];
        for part in &parts {
            starts.push(starts.last().unwrap() + part.length() as usize);
        }
        Ok(JsBytes { parts, starts })
    }

    fn total(&self) -> usize {
        *self.starts.last().unwrap()
    }

    /// Copies the file's bytes `from..from + out.len()` into `out`, across parts.
    fn copy_to(&self, from: usize, out: &mut [u8]) {
        let mut done = 0;
        while done < out.len() {
            let at = from + done;
            // the part that holds `at`: the last one starting at or before it (empty parts skipped)
            let i = self.starts.partition_point(|&s| s <= at) - 1;
            let within = at - self.starts[i];
            let n = (self.starts[i + 1] - at).min(out.len() - done);
            self.parts[i].subarray(within as u32, (within + n) as u32).copy_to(&mut out[done..done + n]);
            done += n;
        }
    }
}

impl OnnxBytes for JsBytes {
    fn len(&self) -> u64 {
        self.total() as u64
    }

    fn sha256(&self) -> String {
        let mut hash = Sha256::new();
        let mut chunks = Chunks::new(self);
        while chunks.has_remaining() {
            let n = chunks.chunk().len();
            hash.update(chunks.chunk());
            chunks.advance(n);
        }
        hex(&hash.finalize())
    }

    fn decode(self) -> Result<tract_onnx::pb::ModelProto> {
        decode_proto(Chunks::new(&self))
    }
}

/// The file as a `Buf`: a window of `CHUNK` bytes copied out of it at a time.
struct Chunks<'a> {
    bytes: &'a JsBytes,
    len: usize,
    /// Where the window starts in the file,
    start: usize,
    window: Vec<u8>,
    /// and how much of it was read.
    at: usize,
}

impl<'a> Chunks<'a> {
    fn new(bytes: &'a JsBytes) -> Chunks<'a> {
        let mut chunks = Chunks { bytes, len: bytes.total(), start: 0, window: vec![], at: 0 };
        chunks.fill(0);
        chunks
    }

    fn fill(&mut self, from: usize) {
        let end = (from + CHUNK.load(Relaxed)).min(self.len);
        self.window.resize(end - from, 0);
        self.bytes.copy_to(from, &mut self.window);
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
