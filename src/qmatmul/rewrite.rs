//! In the ONNX protobuf, INT8 weight products -> our fused nodes: [`fuse`] for
//! `quantize_dynamic`'s four-node product (below), [`fuse_blocks`] for `q8b32`'s blocks.
//!
//! [`fuse`] matches, names checked end to end (anything else is left to tract as written):
//!
//! ```text
//! (xq, xs, xzp) = DynamicQuantizeLinear(x)
//! y  = MatMulInteger(xq, W, xzp, Wzp)     W: int8 (K, N) initializer; Wzp: int8 initializer
//! yf = Cast(y, to = FLOAT)                 y used here only
//! s  = Mul(xs, Ws)                         Ws: f32 initializer, per tensor or per column
//! z  = Mul(yf, s)                          yf used here only
//! ```
//!
//! becomes `z = WasmlmDynQMatMul(x, W, Wzp, Ws)`. The DynamicQuantizeLinear and the scale Mul
//! go when nothing else reads them (q, k and v projections share one quantization of x).

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{tensor_proto::DataType, GraphProto, ModelProto, NodeProto, TensorProto};

use super::{blockq8, gather, kernel, OP_TYPE};
use crate::proto::{drop_unread, int64_values, replace_nodes};

/// Rewrites in place; returns how many products were fused.
pub fn fuse(model: &mut ModelProto) -> usize {
    let Some(graph) = model.graph.as_mut() else { return 0 };
    let init: HashMap<&str, (i32, usize)> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), (t.data_type, t.dims.iter().product::<i64>() as usize)))
        .collect();
    let mut producer: HashMap<&str, usize> = HashMap::new();
    let mut users: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        for o in &n.output {
            producer.insert(o.as_str(), i);
        }
        for x in &n.input {
            users.entry(x.as_str()).or_default().push(i);
        }
    }
    let graph_outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let only_user = |name: &str| -> Option<usize> {
        match users.get(name).map(|u| u.as_slice()) {
            Some(&[u]) if !graph_outputs.contains(name) => Some(u),
            _ => None,
        }
    };
    let node = |i: usize| &graph.node[i];
    let is_init = |name: &str, dt: DataType| init.get(name).is_some_and(|&(d, _)| d == dt as i32);

    let mut fused: Vec<(usize, NodeProto)> = vec![]; // (position of the final Mul, new node)
    let mut dead: HashSet<usize> = HashSet::new();
    for (m, mmi) in graph.node.iter().enumerate() {
        if mmi.op_type != "MatMulInteger" || mmi.input.len() != 4 || mmi.output.len() != 1 {
            continue;
        }
        let Some(&d) = producer.get(mmi.input[0].as_str()) else { continue };
        let dql = node(d);
        if dql.op_type != "DynamicQuantizeLinear" || dql.output.len() != 3 {
            continue;
        }
        if dql.output[0] != mmi.input[0] || dql.output[2] != mmi.input[2] {
            continue;
        }
        let (w, wzp) = (mmi.input[1].as_str(), mmi.input[3].as_str());
        if !is_init(w, DataType::Int8) || !is_init(wzp, DataType::Int8) {
            continue;
        }
        let Some(c) = only_user(&mmi.output[0]) else { continue };
        let cast = node(c);
        let to_float = cast.attribute.iter().any(|a| a.name == "to" && a.i == DataType::Float as i64);
        if cast.op_type != "Cast" || !to_float {
            continue;
        }
        let Some(u) = only_user(&cast.output[0]) else { continue };
        let mul = node(u);
        if mul.op_type != "Mul" || mul.input.len() != 2 {
            continue;
        }
        let s = if mul.input[0] == cast.output[0] { &mul.input[1] } else { &mul.input[0] };
        let Some(&sm) = producer.get(s.as_str()) else { continue };
        let scale_mul = node(sm);
        if scale_mul.op_type != "Mul" || scale_mul.input.len() != 2 {
            continue;
        }
        let xs = &dql.output[1];
        let ws = if &scale_mul.input[0] == xs { &scale_mul.input[1] } else { &scale_mul.input[0] };
        if !scale_mul.input.contains(xs) || !is_init(ws, DataType::Float) {
            continue;
        }
        fused.push((
            u,
            NodeProto {
                name: format!("{}.fused", mmi.name),
                op_type: OP_TYPE.into(),
                input: vec![dql.input[0].clone(), w.into(), wzp.into(), ws.clone()],
                output: vec![mul.output[0].clone()],
                ..Default::default()
            },
        ));
        dead.extend([m, c, u]);
    }
    let count = fused.len();
    if count == 0 {
        return 0;
    }
    let mut replace: HashMap<usize, Vec<NodeProto>> = fused.into_iter().map(|(i, n)| (i, vec![n])).collect();
    for i in dead {
        replace.entry(i).or_default();
    }
    replace_nodes(graph, replace);
    drop_unread(graph);
    count
}

/// `q8b32`'s products (prefold.rs describes the dequantization) -> `WasmlmBlockQ8MatMul` nodes
/// that keep the weights as INT8 blocks (blockq8.rs). Matched:
///
/// ```text
/// R = Reshape(Mul(Cast(q), Cast(s)), shape)   q: int8 initializer, s: fp16 initializer
/// MatMul(x, R)  or  Gemm(x, R, C) (alpha = beta = 1, no transposition)   q: (K/32, 32, N)
/// MatMul(x, Transpose(R, perm = [1, 0]))                                  q: (N, K/32, 32)
/// ```
///
/// The second is the tied LM head, whose R also feeds the embedding's lookup:
///
/// ```text
/// Gather(R, ids, axis = 0), R's shape [V, K]                              q: (V, K/32, 32)
/// ```
///
/// becomes `WasmlmBlockQ8Gather(ids, q, s)` (gather.rs). R goes when nothing else reads it; what
/// still reads it keeps it (prefold.rs then dequantizes it).
///
/// Returns (products, lookups) rewritten.
pub fn fuse_blocks(model: &mut ModelProto) -> (usize, usize) {
    let Some(graph) = model.graph.as_mut() else { return (0, 0) };
    let init: HashMap<&str, (i32, Vec<i64>)> =
        graph.initializer.iter().map(|t| (t.name.as_str(), (t.data_type, t.dims.clone()))).collect();
    // int64 vectors among the initializers (a Reshape's target shape)
    let shape_of: HashMap<&str, Vec<i64>> = graph
        .initializer
        .iter()
        .filter(|t| t.dims.len() == 1)
        .filter_map(|t| Some((t.name.as_str(), int64_values(t)?)))
        .collect();
    let mut producer: HashMap<&str, usize> = HashMap::new();
    let mut users: HashMap<&str, usize> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        for o in &n.output {
            producer.insert(o.as_str(), i);
        }
        for x in &n.input {
            *users.entry(x.as_str()).or_default() += 1;
        }
    }
    let graph_outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let single = |name: &str| users.get(name) == Some(&1) && !graph_outputs.contains(name);
    let made_by = |name: &str, op: &str| producer.get(name).copied().filter(|&i| graph.node[i].op_type == op);
    let attr_i = |n: &NodeProto, name: &str, default: i64| {
        n.attribute.iter().find(|a| a.name == name).map(|a| a.i).unwrap_or(default)
    };
    let attr_f = |n: &NodeProto, name: &str| n.attribute.iter().find(|a| a.name == name).map(|a| a.f).unwrap_or(1.0);
    // R -> (q, s) when R = Reshape(Mul(Cast(q int8), Cast(s fp16)), shape)
    let blocks = |r: &str| -> Option<(String, String, Vec<i64>)> {
        let reshape = &graph.node[made_by(r, "Reshape")?];
        let mul = &graph.node[made_by(&reshape.input[0], "Mul")?];
        if mul.input.len() != 2 {
            return None;
        }
        let mut q = None;
        let mut s = None;
        for x in &mul.input {
            let cast = &graph.node[made_by(x, "Cast")?];
            let src = cast.input.first()?;
            match init.get(src.as_str()) {
                Some((dt, dims)) if *dt == DataType::Int8 as i32 => q = Some((src.clone(), dims.clone())),
                Some((dt, _)) if *dt == DataType::Float16 as i32 => s = Some(src.clone()),
                _ => return None,
            }
        }
        let ((q, dims), s) = (q?, s?);
        (dims.len() == 3).then_some((q, s, dims))
    };
    let block = blockq8::BLOCK as i64;
    let mut replace: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut lookups = 0;
    for (i, node) in graph.node.iter().enumerate() {
        // the embedding: Gather(R, ids) along axis 0, R = (V, K) from q (V, K/32, 32)
        if node.op_type == "Gather" && node.input.len() == 2 && attr_i(node, "axis", 0) == 0 {
            let Some((q, s, dims)) = blocks(&node.input[0]) else { continue };
            let reshape = &graph.node[made_by(&node.input[0], "Reshape").expect("blocks() checked it")];
            // one scale per row and block, (V, K/32, 1): the layout gather.rs reads
            let scales_fit = init.get(s.as_str()).is_some_and(|(_, d)| *d == [dims[0], dims[1], 1]);
            if dims[2] != block || !scales_fit
                || shape_of.get(reshape.input[1].as_str()) != Some(&vec![dims[0], dims[1] * block])
            {
                continue;
            }
            replace.insert(i, vec![NodeProto {
                name: format!("{}.q8", node.name),
                op_type: gather::OP_TYPE.into(),
                input: vec![node.input[1].clone(), q, s],
                output: node.output.clone(),
                ..Default::default()
            }]);
            lookups += 1;
            continue;
        }
        let gemm = node.op_type == "Gemm";
        if !(node.op_type == "MatMul" || gemm) || node.input.len() < 2 {
            continue;
        }
        if gemm && (attr_i(node, "transA", 0) != 0 || attr_i(node, "transB", 0) != 0
            || attr_f(node, "alpha") != 1.0 || attr_f(node, "beta") != 1.0)
        {
            continue;
        }
        let b = node.input[1].as_str();
        let (q, s, layout) = if let Some((q, s, dims)) = blocks(b).filter(|_| single(b)) {
            if dims[1] != block {
                continue;
            }
            (q, s, "kn")
        } else if let Some(t) = made_by(b, "Transpose").filter(|_| single(b) && !gemm) {
            let t = &graph.node[t];
            let perm: Option<&[i64]> = t.attribute.iter().find(|a| a.name == "perm").map(|a| a.ints.as_slice());
            let Some((q, s, dims)) = blocks(&t.input[0]) else { continue };
            if perm != Some(&[1, 0][..]) || dims[2] != block {
                continue;
            }
            (q, s, "nk")
        } else {
            continue;
        };
        let out = node.output[0].clone();
        let bias = node.input.get(2).filter(|c| gemm && !c.is_empty());
        let product = if bias.is_some() { format!("{out}.q8mm") } else { out.clone() };
        let mut new = vec![NodeProto {
            name: format!("{}.q8", node.name),
            op_type: blockq8::OP_TYPE.into(),
            input: vec![node.input[0].clone(), q, s],
            output: vec![product.clone()],
            attribute: vec![tract_onnx::pb::AttributeProto {
                name: "layout".into(),
                r#type: tract_onnx::pb::attribute_proto::AttributeType::String as i32,
                s: layout.as_bytes().to_vec(),
                ..Default::default()
            }],
            ..Default::default()
        }];
        if let Some(c) = bias {
            new.push(NodeProto {
                name: format!("{}.bias", node.name),
                op_type: "Add".into(),
                input: vec![product, c.clone()],
                output: vec![out],
                ..Default::default()
            });
        }
        replace.insert(i, new);
    }
    let count = replace.len();
    if count == 0 {
        return (0, 0);
    }
    replace_nodes(graph, replace);
    let opset = model.opset_import.iter().find(|o| o.domain.is_empty()).map_or(0, |o| o.version);
    let graph = model.graph.as_mut().expect("checked above");
    if opset >= 13 {
        merge_siblings(graph);
    }
    drop_unread(graph);
    (count - lookups, lookups)
}

/// Block products that read the same input side by side, as one product and a `Split`: a
/// layer's q, k and v projections, its gate and up. Each column's sum is computed as before
/// (columns are independent in the kernels), but a decode step hands 121 products to the
/// threads instead of 211 (SmolLM2), and the small k and v ones, below the size that splits,
/// are cut across them too: the threaded wasm build decoded SmolLM2 `q8b32` 5-8% faster. `kn`
/// weights only, of the same K, each N but the last a multiple of the kernels' panel: the
/// product lists every member's q and scales (`x, q1, s1, q2, s2, …`), and packs.rs packs them
/// side by side, without joining them in memory first. `Split` takes its sizes as an input
/// from opset 13 on (the caller checks).
fn merge_siblings(graph: &mut GraphProto) {
    let layout_kn = |n: &NodeProto| {
        n.op_type == blockq8::OP_TYPE && n.input.len() == 3
            && n.attribute.iter().any(|a| a.name == "layout" && a.s == b"kn")
    };
    let mut groups: Vec<(String, Vec<usize>)> = vec![];
    for (i, n) in graph.node.iter().enumerate().filter(|(_, n)| layout_kn(n)) {
        match groups.iter_mut().find(|g| g.0 == n.input[0]) {
            Some(g) => g.1.push(i),
            None => groups.push((n.input[0].clone(), vec![i])),
        }
    }
    // (members, N of each member) for the groups whose weights can be packed side by side
    let joinable: Vec<(Vec<usize>, Vec<i64>)> = {
        let dims: HashMap<&str, &[i64]> = graph.initializer.iter().map(|t| (t.name.as_str(), t.dims.as_slice())).collect();
        groups.into_iter().filter(|g| g.1.len() >= 2).filter_map(|(_, members)| {
            let q: Vec<&[i64]> = members.iter().map(|&i| dims.get(graph.node[i].input[1].as_str()).copied()).collect::<Option<_>>()?;
            let n: Vec<i64> = q.iter().map(|d| d.get(2).copied()).collect::<Option<_>>()?;
            let fits = q.iter().all(|d| d.len() == 3 && d[..2] == q[0][..2])
                && n[..n.len() - 1].iter().all(|&c| c % kernel::PANEL as i64 == 0);
            fits.then_some((members, n))
        }).collect()
    };
    if joinable.is_empty() {
        return;
    }
    let mut replace: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut added: Vec<TensorProto> = vec![];
    for (members, n) in joinable {
        let first = graph.node[members[0]].clone();
        let y = format!("{}.joined", first.output[0]);
        let sizes = TensorProto {
            name: format!("{y}.sizes"),
            dims: vec![n.len() as i64],
            data_type: DataType::Int64 as i32,
            int64_data: n.clone(),
            ..Default::default()
        };
        let mut input = vec![first.input[0].clone()];
        input.extend(members.iter().flat_map(|&i| graph.node[i].input[1..3].iter().cloned()));
        let merged = NodeProto {
            name: format!("{}.joined", first.name),
            op_type: blockq8::OP_TYPE.into(),
            input,
            output: vec![y.clone()],
            attribute: first.attribute.clone(),
            ..Default::default()
        };
        let split = NodeProto {
            name: format!("{}.split", first.name),
            op_type: "Split".into(),
            input: vec![y, sizes.name.clone()],
            output: members.iter().map(|&i| graph.node[i].output[0].clone()).collect(),
            attribute: vec![tract_onnx::pb::AttributeProto {
                name: "axis".into(),
                r#type: tract_onnx::pb::attribute_proto::AttributeType::Int as i32,
                i: -1,
                ..Default::default()
            }],
            ..Default::default()
        };
        added.push(sizes);
        replace.insert(members[0], vec![merged, split]);
        replace.extend(members[1..].iter().map(|&i| (i, vec![])));
    }
    replace_nodes(graph, replace);
    graph.initializer.extend(added);
}
