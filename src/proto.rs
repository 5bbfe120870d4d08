//! Helpers for the rewrites made on the ONNX protobuf before tract sees it (pow.rs, prefold.rs,
//! qmatmul/rewrite.rs, fused/).

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{tensor_proto::DataType, GraphProto, NodeProto, TensorProto};

/// Who makes and who reads each value of a graph.
pub(crate) struct Index<'g> {
    graph: &'g GraphProto,
    producer: HashMap<&'g str, usize>,
    /// Node inputs, and the graph's outputs (read by the caller).
    readers: HashMap<&'g str, usize>,
}

impl<'g> Index<'g> {
    pub fn new(graph: &'g GraphProto) -> Index<'g> {
        let mut readers: HashMap<&str, usize> = HashMap::new();
        for x in graph.node.iter().flat_map(|n| &n.input).chain(graph.output.iter().map(|o| &o.name)) {
            *readers.entry(x.as_str()).or_default() += 1;
        }
        let producer =
            graph.node.iter().enumerate().flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i))).collect();
        Index { graph, producer, readers }
    }

    /// The node that makes `name`, if a node does.
    pub fn producer(&self, name: &str) -> Option<&'g NodeProto> {
        self.producer.get(name).map(|&i| &self.graph.node[i])
    }

    /// Whether exactly one node (or the graph's output list) reads `name`.
    pub fn read_once(&self, name: &str) -> bool {
        self.readers.get(name) == Some(&1)
    }
}

/// Whether `n` is an op of ONNX's default domain.
pub(crate) fn default_domain(n: &NodeProto) -> bool {
    n.domain.is_empty() || n.domain == "ai.onnx"
}

/// The value of a one-element FLOAT tensor.
pub(crate) fn scalar_f32(t: &TensorProto) -> Option<f32> {
    if t.data_type != DataType::Float as i32 || t.dims.iter().product::<i64>() != 1 {
        return None;
    }
    match (t.float_data.as_slice(), t.raw_data.as_slice()) {
        (&[v], _) => Some(v),
        (_, &[a, b, c, d]) => Some(f32::from_le_bytes([a, b, c, d])),
        _ => None,
    }
}

/// The values of an INT64 tensor (a Reshape's target shape), from `raw_data` (little-endian) or
/// `int64_data`.
pub(crate) fn int64_values(t: &TensorProto) -> Option<Vec<i64>> {
    if t.data_type != DataType::Int64 as i32 {
        return None;
    }
    Some(if t.raw_data.is_empty() {
        t.int64_data.clone()
    } else {
        t.raw_data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
    })
}

/// The graph's one-element FLOAT constants by name: initializers and `Constant` nodes' outputs.
pub(crate) fn scalar_constants(graph: &GraphProto) -> HashMap<String, f32> {
    let mut constants: HashMap<String, f32> =
        graph.initializer.iter().filter_map(|t| Some((t.name.clone(), scalar_f32(t)?))).collect();
    for n in &graph.node {
        if n.op_type == "Constant" && n.output.len() == 1 {
            let value = n.attribute.iter().find(|a| a.name == "value").and_then(|a| a.t.as_ref());
            if let Some(v) = value.and_then(scalar_f32) {
                constants.insert(n.output[0].clone(), v);
            }
        }
    }
    constants
}

/// Puts `replace[i]` in place of node `i` (none: the node is removed), keeping the others in
/// their order, so a rewrite's nodes stay where the one they replace was.
pub(crate) fn replace_nodes(graph: &mut GraphProto, mut replace: HashMap<usize, Vec<NodeProto>>) {
    let old = std::mem::take(&mut graph.node);
    for (i, n) in old.into_iter().enumerate() {
        match replace.remove(&i) {
            Some(new) => graph.node.extend(new),
            None => graph.node.push(n),
        }
    }
}

/// Removes, to a fixed point, the nodes none of whose outputs is read (the quantizations and
/// scale products the fused nodes no longer need), then the initializers nothing reads.
pub(crate) fn drop_unread(graph: &mut GraphProto) {
    loop {
        let mut read: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
        for n in &graph.node {
            read.extend(n.input.iter().cloned());
        }
        let before = graph.node.len();
        graph.node.retain(|n| n.output.iter().any(|o| !o.is_empty() && read.contains(o)));
        if graph.node.len() == before {
            graph.initializer.retain(|t| read.contains(&t.name));
            return;
        }
    }
}
