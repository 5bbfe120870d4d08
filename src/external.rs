//! ONNX external data: weights kept in side files (`model.onnx_data`) rather than inside the
//! graph's protobuf, as exporters write them past 2 GB and as some Hugging Face repositories do for
//! smaller files. The side files' bytes are put into their tensors right after the protobuf is
//! decoded, before any of our rewrites reads a weight; tract never sees a path (a browser has
//! none).

use tract_onnx::pb::{GraphProto, ModelProto, TensorProto};

use crate::error::{Error, Result};
use crate::graph::OnnxBytes;

/// ONNX's `TensorProto.DataLocation.EXTERNAL`.
const EXTERNAL: i32 = 1;

/// A side file's bytes, wherever they lie: in memory, or in a JS array that is read a tensor at
/// a time (src/wasm.rs), never whole in wasm memory.
pub trait SideFile {
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes `offset..offset + len`, within `len()`.
    fn read(&self, offset: u64, len: u64) -> Vec<u8>;
    /// Hex, lower case.
    fn sha256(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        let mut at = 0;
        while at < self.len() {
            let n = (self.len() - at).min(1 << 20);
            hash.update(self.read(at, n));
            at += n;
        }
        hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl SideFile for Vec<u8> {
    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }

    fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        self[offset as usize..(offset + len) as usize].to_vec()
    }
}

pub type SideFiles = Vec<(String, Box<dyn SideFile>)>;

/// An ONNX file with the side files its tensors name (`location`, as the file spells it, with
/// their bytes).
pub struct WithExternal<B> {
    pub onnx: B,
    pub files: SideFiles,
}

impl<B: OnnxBytes> OnnxBytes for WithExternal<B> {
    fn len(&self) -> u64 {
        self.onnx.len() + self.files.iter().map(|(_, b)| b.len()).sum::<u64>()
    }

    /// The ONNX file's own sha256 when it has no side files; else one over the file's and each
    /// side file's (name and sha256), so that a cache snapshot is tied to the weights too.
    fn sha256(&self) -> String {
        let own = self.onnx.sha256();
        if self.files.is_empty() {
            return own;
        }
        let mut all = own.into_bytes();
        for (name, bytes) in &self.files {
            all.extend_from_slice(format!("\n{name}\n{}", bytes.sha256()).as_bytes());
        }
        crate::manifest::sha256_hex(&all)
    }

    fn decode(self) -> Result<ModelProto> {
        let mut proto = self.onnx.decode()?;
        inline(&mut proto, &self.files)?;
        Ok(proto)
    }
}

/// The side files the graph's tensors name, in order of first use.
pub fn locations(proto: &ModelProto) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    visit(proto, &mut |t| {
        if let Some(l) = location(t) {
            if !out.contains(&l) {
                out.push(l);
            }
        }
        Ok(())
    })
    .expect("collecting names does not fail");
    out
}

/// Reads every external tensor's bytes from `files` into its `raw_data`. A tensor whose file is
/// not given, or whose offset and length fall outside it, is an error that names them.
pub fn inline(proto: &mut ModelProto, files: &SideFiles) -> Result<usize> {
    let wanted = locations(proto);
    let missing: Vec<&String> = wanted.iter().filter(|w| !files.iter().any(|(n, _)| same(n, w))).collect();
    if !missing.is_empty() {
        return Err(Error::UnsupportedGraph(format!(
            "the graph keeps weights in external data file(s) {missing:?}, which were not given with it \
             (give them beside the .onnx file, under those names)")));
    }
    let mut count = 0;
    visit_mut(proto, &mut |t| {
        let Some(l) = location(t) else { return Ok(()) };
        let bytes = &files.iter().find(|(n, _)| same(n, &l)).expect("checked above").1;
        let size = bytes.len();
        let field = |key: &str| -> Result<Option<u64>> {
            match t.external_data.iter().find(|e| e.key == key) {
                None => Ok(None),
                Some(e) => e.value.parse().map(Some).map_err(|_| {
                    Error::UnsupportedGraph(format!("tensor {:?}: external data {key} {:?} is not a number", t.name, e.value))
                }),
            }
        };
        let offset = field("offset")?.unwrap_or(0);
        let length = match field("length")? {
            Some(n) => n,
            None => size.saturating_sub(offset),
        };
        offset.checked_add(length).filter(|&e| e <= size).ok_or_else(|| {
            Error::UnsupportedGraph(format!(
                "tensor {:?}: bytes {offset}..{offset}+{length} of {l}, which has {size} bytes (a truncated download?)",
                t.name))
        })?;
        t.raw_data = bytes.read(offset, length);
        t.external_data.clear();
        t.data_location = None;
        count += 1;
        Ok(())
    })?;
    Ok(count)
}

/// "./model.onnx_data" and "model.onnx_data" name the same file.
fn same(given: &str, wanted: &str) -> bool {
    given.trim_start_matches("./") == wanted.trim_start_matches("./")
}

fn location(t: &TensorProto) -> Option<String> {
    let external = t.data_location == Some(EXTERNAL) || (!t.external_data.is_empty() && t.raw_data.is_empty());
    if !external {
        return None;
    }
    Some(t.external_data.iter().find(|e| e.key == "location").map_or_else(String::new, |e| e.value.clone()))
}

fn visit(proto: &ModelProto, f: &mut dyn FnMut(&TensorProto) -> Result<()>) -> Result<()> {
    fn graph(g: &GraphProto, f: &mut dyn FnMut(&TensorProto) -> Result<()>) -> Result<()> {
        for t in &g.initializer {
            f(t)?;
        }
        for n in &g.node {
            for a in &n.attribute {
                for t in a.t.iter().chain(&a.tensors) {
                    f(t)?;
                }
                for sub in a.g.iter().chain(&a.graphs) {
                    graph(sub, f)?;
                }
            }
        }
        Ok(())
    }
    match &proto.graph {
        Some(g) => graph(g, f),
        None => Ok(()),
    }
}

fn visit_mut(proto: &mut ModelProto, f: &mut dyn FnMut(&mut TensorProto) -> Result<()>) -> Result<()> {
    fn graph(g: &mut GraphProto, f: &mut dyn FnMut(&mut TensorProto) -> Result<()>) -> Result<()> {
        for t in &mut g.initializer {
            f(t)?;
        }
        for n in &mut g.node {
            for a in &mut n.attribute {
                for t in a.t.iter_mut().chain(a.tensors.iter_mut()) {
                    f(t)?;
                }
                for sub in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                    graph(sub, f)?;
                }
            }
        }
        Ok(())
    }
    match &mut proto.graph {
        Some(g) => graph(g, f),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::pb::{NodeProto, StringStringEntryProto};

    fn ext(name: &str, loc: &str, offset: Option<&str>, length: Option<&str>) -> TensorProto {
        let mut entries = vec![("location", loc)];
        entries.extend(offset.map(|o| ("offset", o)));
        entries.extend(length.map(|l| ("length", l)));
        TensorProto {
            name: name.into(),
            data_location: Some(EXTERNAL),
            external_data: entries.into_iter().map(|(k, v)| StringStringEntryProto { key: k.into(), value: v.into() }).collect(),
            ..Default::default()
        }
    }

    fn model(tensors: Vec<TensorProto>, constant: Option<TensorProto>) -> ModelProto {
        let mut g = GraphProto { initializer: tensors, ..Default::default() };
        if let Some(t) = constant {
            let attr = tract_onnx::pb::AttributeProto { name: "value".into(), t: Some(t), ..Default::default() };
            g.node.push(NodeProto { op_type: "Constant".into(), attribute: vec![attr], ..Default::default() });
        }
        ModelProto { graph: Some(g), ..Default::default() }
    }

    #[test]
    fn side_file_bytes_land_in_their_tensors() {
        let data: Vec<u8> = (0u8..32).collect();
        let mut m = model(vec![ext("a", "m.onnx_data", Some("4"), Some("8")), ext("b", "./m.onnx_data", None, None)],
                          Some(ext("c", "m.onnx_data_1", Some("0"), Some("2"))));
        assert_eq!(locations(&m), vec!["m.onnx_data".to_string(), "./m.onnx_data".into(), "m.onnx_data_1".into()]);
        let files: SideFiles = vec![("m.onnx_data".to_string(), Box::new(data.clone())), ("m.onnx_data_1".to_string(), Box::new(vec![9u8, 8, 7]))];
        assert_eq!(inline(&mut m, &files).unwrap(), 3);
        let g = m.graph.as_ref().unwrap();
        assert_eq!(g.initializer[0].raw_data, data[4..12]);
        assert_eq!(g.initializer[1].raw_data, data);
        assert_eq!(g.node[0].attribute[0].t.as_ref().unwrap().raw_data, vec![9, 8]);
        assert!(locations(&m).is_empty(), "nothing external is left");
    }

    #[test]
    fn a_missing_or_short_side_file_is_named() {
        let mut m = model(vec![ext("w", "big.onnx_data", Some("0"), Some("100"))], None);
        let e = inline(&mut m, &vec![]).unwrap_err().to_string();
        assert!(e.contains("big.onnx_data") && e.contains("not given"), "{e}");
        let e = inline(&mut m, &vec![("big.onnx_data".into(), Box::new(vec![0u8; 99]) as Box<dyn SideFile>)]).unwrap_err().to_string();
        assert!(e.contains("truncated") && e.contains("99 bytes"), "{e}");
        let mut m = model(vec![ext("w", "big.onnx_data", Some("x"), None)], None);
        let e = inline(&mut m, &vec![("big.onnx_data".into(), Box::new(vec![0u8; 8]) as Box<dyn SideFile>)]).unwrap_err().to_string();
        assert!(e.contains("offset") && e.contains("not a number"), "{e}");
    }
}
