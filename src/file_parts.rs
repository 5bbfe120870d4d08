//! An ONNX file written into the engine's memory as it downloads, part by part (the page's
//! `ModelFile`, src/wasm.rs).
//!
//! Why: a page that downloads the parts into JS `Uint8Array`s and hands the engine the array of
//! them pays for them after the load. Nothing refers to them once the engine has decoded them, but
//! nothing allocates after a load either, so no garbage collection comes to free them, and the
//! renderer holds the whole file in JS memory beside the engine's copy (measured:
//! docs/decisions.md, "Memory at load"). Here each chunk of the download is copied into wasm
//! memory as it arrives and is garbage at once, a few at a time; decoding frees each part as
//! soon as the protobuf has read past it, so the parts and the protobuf together never hold
//! much more than one file.

use std::collections::VecDeque;

use prost::bytes::{Buf, Bytes};

use crate::error::{Error, Result};
use crate::graph::{decode_proto, OnnxBytes};

pub struct FileParts {
    parts: Vec<PartBuf>,
}

struct PartBuf {
    /// What the part must hold.
    size: usize,
    bytes: Vec<u8>,
    /// [`FileParts::finish`]ed.
    done: bool,
}

impl FileParts {
    /// Parts of these sizes, in the file's order; nothing is allocated until a part is written.
    pub fn new(sizes: &[usize]) -> FileParts {
        let parts = sizes.iter().map(|&size| PartBuf { size, bytes: vec![], done: false }).collect();
        FileParts { parts }
    }

    fn part(&mut self, i: usize) -> Result<&mut PartBuf> {
        let n = self.parts.len();
        self.parts.get_mut(i).ok_or_else(|| Error::ModelFile(format!("no part {i}: the file has {n} part(s)")))
    }

    /// Appends `n` bytes to part `i`, written by `fill` into the slice that holds them.
    pub fn write(&mut self, i: usize, n: usize, fill: impl FnOnce(&mut [u8])) -> Result<()> {
        let part = self.part(i)?;
        if part.done {
            return Err(Error::ModelFile(format!("part {i} is finished: restart it to write it again")));
        }
        let at = part.bytes.len();
        if at + n > part.size {
            return Err(Error::ModelFile(format!("part {i} holds {} bytes; {} more would make {}", part.size, n, at + n)));
        }
        if part.bytes.capacity() == 0 {
            part.bytes.reserve_exact(part.size);
        }
        part.bytes.resize(at + n, 0);
        fill(&mut part.bytes[at..]);
        Ok(())
    }

    /// Empties part `i` (a cached copy that failed its check, to be downloaded again).
    pub fn restart(&mut self, i: usize) -> Result<()> {
        let part = self.part(i)?;
        part.bytes = vec![];
        part.done = false;
        Ok(())
    }

    /// Part `i` is complete: nothing more is written to it. An error if it holds fewer bytes
    /// than its size.
    pub fn finish(&mut self, i: usize) -> Result<()> {
        let part = self.part(i)?;
        if part.bytes.len() != part.size {
            return Err(Error::ModelFile(format!("part {i} has {} of its {} bytes", part.bytes.len(), part.size)));
        }
        part.done = true;
        Ok(())
    }

    /// Part `i`'s bytes so far (for the page's WebCrypto, which hashes at native speed where
    /// the `sha2` crate's wasm hashes at ~100 MB/s).
    pub fn bytes(&self, i: usize) -> Option<&[u8]> {
        self.parts.get(i).map(|p| &p.bytes[..])
    }

    /// An error naming the first part not finished, if any.
    pub fn check_complete(&self) -> Result<()> {
        match self.parts.iter().position(|p| !p.done) {
            Some(i) => Err(Error::ModelFile(format!(
                "part {i} of {} is not finished ({} of its {} bytes written)", self.parts.len(), self.parts[i].bytes.len(),
                self.parts[i].size))),
            None => Ok(()),
        }
    }
}

impl OnnxBytes for FileParts {
    fn len(&self) -> u64 {
        self.parts.iter().map(|p| p.size as u64).sum()
    }

    /// Of the whole file.
    fn sha256(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        for p in &self.parts {
            hash.update(&p.bytes);
        }
        crate::manifest::hex(&hash.finalize())
    }

    fn decode(self) -> Result<tract_onnx::pb::ModelProto> {
        self.check_complete()?;
        decode_proto(Draining::new(self.parts.into_iter().map(|p| Bytes::from(p.bytes)).collect()))
    }
}

/// The parts as one `Buf`, each part freed once the read has passed it.
struct Draining {
    parts: VecDeque<Bytes>,
    /// How far into the first part the read is.
    at: usize,
    remaining: usize,
}

impl Draining {
    fn new(parts: VecDeque<Bytes>) -> Draining {
        let remaining = parts.iter().map(Bytes::len).sum();
        let mut d = Draining { parts, at: 0, remaining };
        d.drop_read();
        d
    }

    /// Frees the parts read to their end (and empty ones): the first part left has unread bytes.
    fn drop_read(&mut self) {
        while self.parts.front().is_some_and(|p| self.at == p.len()) {
            self.parts.pop_front();
            self.at = 0;
        }
    }
}

impl Buf for Draining {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&[], |p| &p[self.at..])
    }

    fn advance(&mut self, mut n: usize) {
        assert!(n <= self.remaining, "advanced {n} bytes past the end of the ONNX file");
        self.remaining -= n;
        while n > 0 {
            let left = self.parts[0].len() - self.at;
            let step = n.min(left);
            self.at += step;
            n -= step;
            self.drop_read();
        }
        self.drop_read();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `bytes` cut at `cuts`, each part written in chunks of `chunk` bytes and finished.
    fn written(bytes: &[u8], cuts: &[usize], chunk: usize) -> FileParts {
        let mut bounds = vec![0];
        bounds.extend_from_slice(cuts);
        bounds.push(bytes.len());
        let sizes: Vec<usize> = bounds.windows(2).map(|w| w[1] - w[0]).collect();
        let mut parts = FileParts::new(&sizes);
        // the last part first: parts arrive in any order
        for i in (0..sizes.len()).rev() {
            for piece in bytes[bounds[i]..bounds[i + 1]].chunks(chunk) {
                parts.write(i, piece.len(), |dst| dst.copy_from_slice(piece)).unwrap();
            }
            parts.finish(i).unwrap();
            assert_eq!(parts.bytes(i).unwrap(), &bytes[bounds[i]..bounds[i + 1]], "part {i}");
        }
        parts
    }

    /// A small ONNX file's protobuf, however it is cut into parts (an empty one, a cut inside
    /// every kind of field), decodes to the same message as the whole file, and the whole
    /// file's sha256 is the same.
    #[test]
    fn parts_decode_as_the_whole_file() {
        use prost::Message;
        use tract_onnx::pb::{GraphProto, ModelProto, NodeProto, TensorProto};
        let tensor = |name: &str, n: usize| TensorProto {
            name: name.into(), data_type: 3, dims: vec![n as i64], raw_data: (0..n).map(|i| (i * 7) as u8).collect(),
            ..Default::default()
        };
        let node = NodeProto { op_type: "MatMul".into(), input: vec!["x".into(), "w".into()], output: vec!["y".into()],
                               ..Default::default() };
        let graph = GraphProto { name: "g".into(), node: vec![node.clone(), node], initializer: vec![tensor("w", 300), tensor("v", 5)],
                                 ..Default::default() };
        let whole = ModelProto { ir_version: 8, producer_name: "test".into(), graph: Some(graph), ..Default::default() };
        let bytes = whole.encode_to_vec();
        assert!(bytes.len() > 320);
        let cuts_list: Vec<Vec<usize>> = vec![
            vec![],
            vec![0],
            vec![1, 1, 2],
            (1..bytes.len()).step_by(7).collect(),
            vec![bytes.len() / 2, bytes.len() / 2, bytes.len()],
        ];
        for cuts in cuts_list {
            let parts = written(&bytes, &cuts, 3);
            assert_eq!(parts.sha256(), crate::manifest::sha256_hex(&bytes), "cuts {cuts:?}");
            assert_eq!(parts.decode().unwrap(), whole, "cuts {cuts:?}");
        }
    }

    /// What the module is for: a part is freed as soon as the read has passed its last byte,
    /// empty parts at once.
    #[test]
    fn read_parts_are_freed() {
        let parts = [&[][..], &[1u8, 2, 3], &[], &[4, 5], &[6]].map(Bytes::copy_from_slice);
        let mut d = Draining::new(VecDeque::from(parts.to_vec()));
        assert_eq!((d.parts.len(), d.remaining(), d.chunk()), (4, 6, &[1u8, 2, 3][..]));
        d.advance(2);
        assert_eq!((d.parts.len(), d.chunk()), (4, &[3u8][..]));
        d.advance(1);
        assert_eq!((d.parts.len(), d.chunk()), (2, &[4u8, 5][..]));
        d.advance(3);
        assert_eq!((d.parts.len(), d.remaining(), d.chunk()), (0, 0, &[][..]));
    }

    #[test]
    fn bad_writes_are_refused() {
        let mut parts = FileParts::new(&[4, 2]);
        let e = parts.write(2, 1, |_| {}).unwrap_err().to_string();
        assert!(e.contains("no part 2: the file has 2 part(s)"), "{e}");
        parts.write(0, 3, |d| d.copy_from_slice(b"abc")).unwrap();
        let e = parts.write(0, 2, |_| {}).unwrap_err().to_string();
        assert!(e.contains("part 0 holds 4 bytes; 2 more would make 5"), "{e}");
        let e = parts.finish(0).unwrap_err().to_string();
        assert!(e.contains("part 0 has 3 of its 4 bytes"), "{e}");
        parts.write(0, 1, |d| d.copy_from_slice(b"d")).unwrap();
        parts.finish(0).unwrap();
        assert_eq!(parts.bytes(0).unwrap(), b"abcd");
        let e = parts.write(0, 1, |_| {}).unwrap_err().to_string();
        assert!(e.contains("part 0 is finished"), "{e}");
        let e = parts.check_complete().unwrap_err().to_string();
        assert!(e.contains("part 1 of 2 is not finished (0 of its 2 bytes written)"), "{e}");
        let e = parts.decode().unwrap_err().to_string();
        assert!(e.contains("part 1 of 2 is not finished"), "{e}");
    }

    /// A restarted part is written anew: the first bytes are gone.
    #[test]
    fn restart_forgets_the_part() {
        let mut parts = FileParts::new(&[3]);
        parts.write(0, 3, |d| d.copy_from_slice(b"xyz")).unwrap();
        parts.finish(0).unwrap();
        parts.restart(0).unwrap();
        parts.write(0, 3, |d| d.copy_from_slice(b"abc")).unwrap();
        parts.finish(0).unwrap();
        assert_eq!(parts.sha256(), crate::manifest::sha256_hex(b"abc"));
    }
}
