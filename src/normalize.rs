//! Rewrites, on the protobuf before tract reads it, that bring other exporters' graph shapes to
//! ones tract takes:
//!
//! - [`group_query_attention`]: onnxruntime-genai's `GroupQueryAttention`, packed QKV or not;
//! - [`half_gemms`]: an FP16 file's `Gemm`s.

use tract_onnx::pb::{tensor_proto::DataType, AttributeProto, ModelProto, NodeProto, TensorProto};

use crate::proto::replace_nodes;

/// ## onnxruntime-genai's `GroupQueryAttention`
/// Its model builder writes each layer's attention as one `GroupQueryAttention` (com.microsoft),
/// often with Q, K and V packed into its first input. tract's own op takes a prompt with an
/// empty cache or one token with a cache, not a chunk of tokens after a cache, which is how this
/// engine prefills (in chunks, and a chat's next turn on top of its cache). So the node is
/// written out in the standard ops of an eager Llama export, the graph shape the engine's fused
/// paths find ([`crate::fused`]: the rotary embedding, the grouped products, the attention core
/// with its cache kept in place):
///
/// ```text
/// q, k, v: (B, S, heads * D) -> Reshape, Transpose -> (B, heads, S, D)
/// positions = Range(P, P + S)        P: the past keys' length
/// q, k = q cos + rotate_half(q) sin  cos, sin: the node's caches at `positions`, each half twice
/// present_k, present_v = Concat(past, new) along the sequence
/// K, V = present, each key/value head repeated for its group of query heads
/// y = Softmax(Q Kᵀ · scale + mask) V -> Transpose, Reshape -> (B, S, heads * D)
/// mask[s, l] = -3.4e38 where key l lies after position s (or before its window), else 0
/// ```
///
/// The operator's `seqlens_k` and `total_sequence_length` inputs are not read: they describe
/// each batch row's padding, and the engine runs one sequence with no padding, where they say
/// `P + S` (its attention mask is all ones). Expanded when the node is what genai writes for
/// the CPU: FP32 (the past inputs' declared type), the rotary embedding on its own caches and not
/// interleaved, over the whole head, or none; no softcap. Any other is left to tract, whose
/// error then names what it does not take. `H` and `Hkv` are the node's `num_heads` and
/// `kv_num_heads`, so nothing depends on a shape the file may not declare. Returns how many
/// nodes were expanded.
pub fn group_query_attention(model: &mut ModelProto) -> usize {
    let opset = model.opset_import.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map_or(0, |o| o.version);
    let Some(graph) = model.graph.as_mut() else { return 0 };
    let declared: std::collections::HashMap<&str, (i32, Vec<i64>)> =
        graph.input.iter().filter_map(|i| Some((i.name.as_str(), declared_tensor(i)?))).collect();
    let init: std::collections::HashMap<&str, &TensorProto> = graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut replace = std::collections::HashMap::new();
    let mut consts = vec![];
    let mut expanded = 0;
    for (i, n) in graph.node.iter().enumerate() {
        if n.op_type != "GroupQueryAttention" || n.domain != "com.microsoft" || n.input.is_empty() || n.output.is_empty() {
            continue;
        }
        let int = |name: &str, default: i64| n.attribute.iter().find(|a| a.name == name).map_or(default, |a| a.i);
        let float = |name: &str| n.attribute.iter().find(|a| a.name == name).map_or(0.0, |a| a.f);
        let (h, hkv) = (int("num_heads", 0), int("kv_num_heads", 0));
        if h <= 0 || hkv <= 0 || h % hkv != 0 {
            continue;
        }
        let p = if n.name.is_empty() { n.output[0].clone() } else { n.name.clone() };
        let input = |ix: usize| n.input.get(ix).filter(|x| !x.is_empty()).cloned();
        let mut nodes = vec![];
        let (q, k, v) = match (input(1), input(2)) {
            (Some(k), Some(v)) => (n.input[0].clone(), k, v),
            _ => unpack(&p, &n.input[0], h, hkv, &mut nodes, &mut consts),
        };
        let past = (input(3), input(4));
        let past_decl = past.0.as_deref().and_then(|x| declared.get(x));
        // the head size, from the past keys' declared shape
        let d = past_decl.and_then(|(_, dims)| dims.get(3).copied()).filter(|&d| d > 0 && d % 2 == 0);
        let rotary = int("do_rotary", 0) != 0;
        let caches = (input(7), input(8));
        let half = |x: &Option<String>| x.as_deref().and_then(|x| init.get(x)).filter(|t| t.dims.len() == 2).map(|t| (t.data_type, t.dims[1]));
        let rotary_fits = !rotary
            || (int("rotary_interleaved", 0) == 0
                && half(&caches.0).zip(half(&caches.1)).is_some_and(|(c, s)| c == s && c.0 == DataType::Float as i32 && Some(2 * c.1) == d));
        let expandable = opset >= 13
            && past_decl.is_some_and(|(dt, dims)| *dt == DataType::Float as i32 && dims.len() == 4)
            && past.1.is_some()
            && d.is_some()
            && rotary_fits
            && float("softcap") == 0.0
            && n.output.len() == 3
            && n.output.iter().all(|o| !o.is_empty());
        if !expandable {
            if !nodes.is_empty() {
                // packed: the unpacked inputs, for tract's op
                let mut gqa = n.clone();
                gqa.input.resize(gqa.input.len().max(3), String::new());
                gqa.input[..3].clone_from_slice(&[q, k, v]);
                nodes.push(gqa);
                replace.insert(i, nodes);
            }
            continue;
        }
        let d = d.unwrap();
        let scale = match float("scale") {
            s if s != 0.0 => s,
            _ => 1.0 / (d as f32).sqrt(),
        };
        let w = Writer { p: &p, nodes: &mut nodes, consts: &mut consts };
        w.build(Gqa {
            q, k, v,
            past: (past.0.unwrap(), past.1.unwrap()),
            caches: if rotary { Some((caches.0.unwrap(), caches.1.unwrap())) } else { None },
            h, hkv, d, scale,
            window: int("local_window_size", -1),
            outputs: [n.output[0].clone(), n.output[1].clone(), n.output[2].clone()],
        });
        replace.insert(i, nodes);
        expanded += 1;
    }
    graph.initializer.extend(consts);
    replace_nodes(graph, replace);
    if expanded > 0 {
        crate::proto::drop_unread(graph);
    }
    expanded
}

/// A graph input's declared element type and dimensions (0 where a dimension is symbolic).
fn declared_tensor(v: &tract_onnx::pb::ValueInfoProto) -> Option<(i32, Vec<i64>)> {
    use tract_onnx::pb::{tensor_shape_proto::dimension::Value, type_proto};
    let Some(type_proto::Value::TensorType(t)) = v.r#type.as_ref()?.value.as_ref() else { return None };
    let dims = t.shape.as_ref()?.dim.iter().map(|d| match d.value {
        Some(Value::DimValue(x)) => x,
        _ => 0,
    });
    Some((t.elem_type, dims.collect()))
}

/// Packed QKV `(B, S, (H + 2 Hkv) D)` cut into query, key and value `(B, S, heads D)`:
///
/// ```text
/// qkv --Reshape [0, 0, H + 2 Hkv, -1]--> (B, S, H + 2 Hkv, D)
///     --Split axis 2 [H, Hkv, Hkv]--> three --Reshape [0, 0, -1]--> q, k, v
/// ```
fn unpack(p: &str, qkv: &str, h: i64, hkv: i64, nodes: &mut Vec<NodeProto>, consts: &mut Vec<TensorProto>) -> (String, String, String) {
    let p = format!("{p}.unpacked");
    let (split_shape, flat, sizes) = (format!("{p}.heads_shape"), format!("{p}.flat_shape"), format!("{p}.sizes"));
    consts.push(int64(&split_shape, &[0, 0, h + 2 * hkv, -1]));
    consts.push(int64(&flat, &[0, 0, -1]));
    consts.push(int64(&sizes, &[h, hkv, hkv]));
    let heads_out = format!("{p}.heads");
    let parts: Vec<String> = ["q", "k", "v"].iter().map(|x| format!("{p}.{x}4")).collect();
    let outs: Vec<String> = ["q", "k", "v"].iter().map(|x| format!("{p}.{x}")).collect();
    nodes.push(node("Reshape", vec![qkv.into(), split_shape], vec![heads_out.clone()], vec![]));
    nodes.push(node("Split", vec![heads_out, sizes], parts.clone(), vec![int_attr("axis", 2)]));
    for (part, out) in parts.iter().zip(&outs) {
        nodes.push(node("Reshape", vec![part.clone(), flat.clone()], vec![out.clone()], vec![]));
    }
    (outs[0].clone(), outs[1].clone(), outs[2].clone())
}

/// What one expanded `GroupQueryAttention` reads and writes.
struct Gqa {
    q: String,
    k: String,
    v: String,
    past: (String, String),
    /// The rotary embedding's cos and sin caches, (positions, D / 2).
    caches: Option<(String, String)>,
    h: i64,
    hkv: i64,
    d: i64,
    scale: f32,
    /// Keys more than this many positions back are masked; -1 or 0: none.
    window: i64,
    outputs: [String; 3],
}

/// Writes nodes and constants named after the node they replace (`p`).
struct Writer<'a> {
    p: &'a str,
    nodes: &'a mut Vec<NodeProto>,
    consts: &'a mut Vec<TensorProto>,
}

impl Writer<'_> {
    fn name(&self, x: &str) -> String {
        format!("{}.{x}", self.p)
    }

    /// `op(inputs)` into a value named `out` (after the node); returns its name.
    fn op(&mut self, op: &str, inputs: &[&str], out: &str, attrs: Vec<AttributeProto>) -> String {
        let out = self.name(out);
        self.nodes.push(node(op, inputs.iter().map(|s| s.to_string()).collect(), vec![out.clone()], attrs));
        out
    }

    /// `op(inputs)` into the graph value `out`, named as it is.
    fn op_into(&mut self, op: &str, inputs: &[&str], out: &str, attrs: Vec<AttributeProto>) {
        self.nodes.push(node(op, inputs.iter().map(|s| s.to_string()).collect(), vec![out.into()], attrs));
    }

    fn ints(&mut self, name: &str, values: &[i64]) -> String {
        let name = self.name(name);
        self.consts.push(int64(&name, values));
        name
    }

    /// An INT64 scalar (a 0-d tensor).
    fn int(&mut self, name: &str, value: i64) -> String {
        let name = self.name(name);
        self.consts.push(TensorProto { name: name.clone(), data_type: DataType::Int64 as i32, int64_data: vec![value], ..Default::default() });
        name
    }

    fn float(&mut self, name: &str, value: f32) -> String {
        let name = self.name(name);
        self.consts.push(TensorProto { name: name.clone(), data_type: DataType::Float as i32, float_data: vec![value], ..Default::default() });
        name
    }

    /// (B, S, heads * D) -> (B, heads, S, D).
    fn heads(&mut self, x: &str, tag: &str, heads: i64, d: i64) -> String {
        let shape = self.ints(&format!("{tag}.shape"), &[0, 0, heads, d]);
        let r = self.op("Reshape", &[x, &shape], &format!("{tag}.bshd"), vec![]);
        self.op("Transpose", &[&r], &format!("{tag}.bhsd"), vec![ints_attr("perm", &[0, 2, 1, 3])])
    }

    /// `x cos + rotate_half(x) sin`, as Llama's export writes it.
    fn rope(&mut self, x: &str, tag: &str, cos: &str, sin: &str, d: i64) -> String {
        let axes = self.ints(&format!("{tag}.rope.axes"), &[3]);
        let (zero, mid, end) = (self.ints(&format!("{tag}.rope.zero"), &[0]), self.ints(&format!("{tag}.rope.mid"), &[d / 2]), self.ints(&format!("{tag}.rope.end"), &[d]));
        let x1 = self.op("Slice", &[x, &zero, &mid, &axes], &format!("{tag}.rope.x1"), vec![]);
        let x2 = self.op("Slice", &[x, &mid, &end, &axes], &format!("{tag}.rope.x2"), vec![]);
        let neg = self.op("Neg", &[&x2], &format!("{tag}.rope.neg"), vec![]);
        let rot = self.op("Concat", &[&neg, &x1], &format!("{tag}.rope.rotated"), vec![int_attr("axis", 3)]);
        let a = self.op("Mul", &[x, cos], &format!("{tag}.rope.cos"), vec![]);
        let b = self.op("Mul", &[&rot, sin], &format!("{tag}.rope.sin"), vec![]);
        self.op("Add", &[&a, &b], &format!("{tag}.rope"), vec![])
    }

    /// (B, Hkv, L, D) -> (B, H, L, D), each head repeated `group` times.
    fn repeat(&mut self, x: &str, tag: &str, g: &Gqa) -> String {
        let group = g.h / g.hkv;
        if group == 1 {
            return x.into();
        }
        let axis = self.ints(&format!("{tag}.repeat.axis"), &[2]);
        let u = self.op("Unsqueeze", &[x, &axis], &format!("{tag}.repeat.unsqueezed"), vec![]);
        let to = self.ints(&format!("{tag}.repeat.to"), &[1, 1, group, 1, 1]);
        let e = self.op("Expand", &[&u, &to], &format!("{tag}.repeat.expanded"), vec![]);
        let shape = self.ints(&format!("{tag}.repeat.shape"), &[0, g.h, -1, g.d]);
        self.op("Reshape", &[&e, &shape], &format!("{tag}.repeated"), vec![])
    }

    fn build(mut self, g: Gqa) {
        let q = self.heads(&g.q, "q", g.h, g.d);
        let k = self.heads(&g.k, "k", g.hkv, g.d);
        let v = self.heads(&g.v, "v", g.hkv, g.d);
        // positions P .. P + S
        let (two, one) = (self.int("two", 2), self.int("one", 1));
        let past_shape = self.op("Shape", &[&g.past.0], "past_shape", vec![]);
        let past_len = self.op("Gather", &[&past_shape, &two], "past_len", vec![]);
        let q_shape = self.op("Shape", &[&g.q], "q_shape", vec![]);
        let len = self.op("Gather", &[&q_shape, &one], "len", vec![]);
        let total = self.op("Add", &[&past_len, &len], "total", vec![]);
        let positions = self.op("Range", &[&past_len, &total, &one], "positions", vec![]);
        let (q, k) = match &g.caches {
            Some((cos_cache, sin_cache)) => {
                let mut full = |cache: &str, tag: &str| {
                    let half = self.op("Gather", &[cache, &positions], &format!("{tag}.half"), vec![]);
                    self.op("Concat", &[&half, &half], tag, vec![int_attr("axis", 1)])
                };
                let (cos, sin) = (full(cos_cache, "cos"), full(sin_cache, "sin"));
                (self.rope(&q, "q", &cos, &sin, g.d), self.rope(&k, "k", &cos, &sin, g.d))
            }
            None => (q, k),
        };
        self.op_into("Concat", &[&g.past.0, &k], &g.outputs[1], vec![int_attr("axis", 2)]);
        self.op_into("Concat", &[&g.past.1, &v], &g.outputs[2], vec![int_attr("axis", 2)]);
        let keys = self.repeat(&g.outputs[1], "k", &g);
        let values = self.repeat(&g.outputs[2], "v", &g);
        // mask (S, L): key l is hidden from the query at position s if l > s, or l < s - window
        let zero = self.int("zero", 0);
        let cols = self.op("Range", &[&zero, &total, &one], "key_positions", vec![]);
        let axis = self.ints("rows.axis", &[1]);
        let rows = self.op("Unsqueeze", &[&positions, &axis], "query_positions", vec![]);
        let mut hidden = self.op("Greater", &[&cols, &rows], "future", vec![]);
        if g.window > 0 {
            let w = self.int("window", g.window);
            let first = self.op("Sub", &[&rows, &w], "window_start", vec![]);
            let before = self.op("Less", &[&cols, &first], "before_window", vec![]);
            hidden = self.op("Or", &[&hidden, &before], "hidden", vec![]);
        }
        let (low, nothing) = (self.float("mask.hidden", f32::MIN), self.float("mask.visible", 0.0));
        let mask = self.op("Where", &[&hidden, &low, &nothing], "mask", vec![]);
        // the core
        let kt = self.op("Transpose", &[&keys], "keys_t", vec![ints_attr("perm", &[0, 1, 3, 2])]);
        let qk = self.op("MatMul", &[&q, &kt], "qk", vec![]);
        let scale = self.float("scale", g.scale);
        let scaled = self.op("Mul", &[&qk, &scale], "scaled", vec![]);
        let masked = self.op("Add", &[&scaled, &mask], "masked", vec![]);
        let probs = self.op("Softmax", &[&masked], "probs", vec![int_attr("axis", -1)]);
        let y = self.op("MatMul", &[&probs, &values], "context", vec![]);
        let y = self.op("Transpose", &[&y], "context_bshd", vec![ints_attr("perm", &[0, 2, 1, 3])]);
        let flat = self.ints("out.shape", &[0, 0, g.h * g.d]);
        self.op_into("Reshape", &[&y, &flat], &g.outputs[0], vec![]);
    }
}

fn int_attr(name: &str, i: i64) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: tract_onnx::pb::attribute_proto::AttributeType::Int as i32, i, ..Default::default() }
}

fn ints_attr(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: tract_onnx::pb::attribute_proto::AttributeType::Ints as i32,
        ints: ints.to_vec(),
        ..Default::default()
    }
}

fn int64(name: &str, values: &[i64]) -> TensorProto {
    TensorProto {
        name: name.into(),
        data_type: DataType::Int64 as i32,
        dims: vec![values.len() as i64],
        int64_data: values.to_vec(),
        ..Default::default()
    }
}

fn node(op: &str, input: Vec<String>, output: Vec<String>, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto { op_type: op.into(), input, output, attribute, ..Default::default() }
}

/// ## FP16 `Gemm`
/// tract's `Gemm` scales `C` by `beta` as an f32 constant, so an FP16 file's `Gemm` (GPT-2's
/// projections, in transformers.js's fp16 and q4f16 files) comes out F32 and the graph no longer
/// type-checks. `Gemm(A, B, C)` with `alpha = beta = 1` and a FLOAT16 `B` initializer becomes
/// `Add(MatMul(A, B or Bᵀ), C)`, what the `Gemm` computes. Returns how many.
pub fn half_gemms(model: &mut ModelProto) -> usize {
    let Some(graph) = model.graph.as_mut() else { return 0 };
    let half: std::collections::HashSet<&str> = graph
        .initializer
        .iter()
        .filter(|t| t.data_type == DataType::Float16 as i32 && t.dims.len() == 2)
        .map(|t| t.name.as_str())
        .collect();
    let mut replace = std::collections::HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        let attr = |name: &str| n.attribute.iter().find(|a| a.name == name);
        let float = |name: &str| attr(name).map_or(1.0, |a| a.f);
        let int = |name: &str| attr(name).map_or(0, |a| a.i);
        if n.op_type != "Gemm" || !crate::proto::default_domain(n) || n.input.len() < 2 || !half.contains(n.input[1].as_str())
            || float("alpha") != 1.0 || float("beta") != 1.0 || int("transA") != 0 {
            continue;
        }
        let p = if n.name.is_empty() { n.output[0].clone() } else { n.name.clone() };
        let mut nodes = vec![];
        let mut b = n.input[1].clone();
        if int("transB") != 0 {
            nodes.push(node("Transpose", vec![b], vec![format!("{p}.b_t")], vec![AttributeProto {
                name: "perm".into(),
                r#type: tract_onnx::pb::attribute_proto::AttributeType::Ints as i32,
                ints: vec![1, 0],
                ..Default::default()
            }]));
            b = format!("{p}.b_t");
        }
        match n.input.get(2).filter(|c| !c.is_empty()) {
            Some(c) => {
                nodes.push(node("MatMul", vec![n.input[0].clone(), b], vec![format!("{p}.ab")], vec![]));
                nodes.push(node("Add", vec![format!("{p}.ab"), c.clone()], n.output.clone(), vec![]));
            }
            None => nodes.push(node("MatMul", vec![n.input[0].clone(), b], n.output.clone(), vec![])),
        }
        replace.insert(i, nodes);
    }
    let count = replace.len();
    replace_nodes(graph, replace);
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::test_proto::{model, node, value};
    use tract_onnx::pb::GraphProto;
    use tract_onnx::prelude::*;

    #[test]
    fn packed_qkv_is_split_by_heads_into_three_inputs() {
        let mut gqa = node("GroupQueryAttention", &["qkv", "", "", "pk", "pv", "lens", "total"], "y");
        gqa.domain = "com.microsoft".into();
        gqa.attribute = vec![int_attr("num_heads", 4), int_attr("kv_num_heads", 2)];
        let mut proto = model(GraphProto { node: vec![gqa.clone()], ..Default::default() });
        // no past inputs declared: not expanded, but unpacked for tract's op
        assert_eq!(group_query_attention(&mut proto), 0);
        let g = proto.graph.unwrap();
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Reshape", "Split", "Reshape", "Reshape", "Reshape", "GroupQueryAttention"]);
        let shape = |name: &str| g.initializer.iter().find(|t| t.name == name).unwrap().int64_data.clone();
        assert_eq!(shape(&g.node[0].input[1]), [0, 0, 8, -1]);
        assert_eq!(shape(&g.node[1].input[1]), [4, 2, 2]);
        let last = g.node.last().unwrap();
        assert_eq!(&last.input[3..], &gqa.input[3..]);
        assert_eq!(last.input[..3], [g.node[2].output[0].clone(), g.node[3].output[0].clone(), g.node[4].output[0].clone()]);
        // with key and value given, nothing to do
        let mut given = gqa.clone();
        given.input[1] = "k".into();
        given.input[2] = "v".into();
        let mut proto = model(GraphProto { node: vec![given.clone()], ..Default::default() });
        assert_eq!(group_query_attention(&mut proto), 0);
        assert_eq!(proto.graph.unwrap().node, [given]);
    }

    /// A genai-shaped node: packed QKV (4 query heads, 2 key/value heads of 8), declared past
    /// inputs, rotary caches of 16 positions.
    fn genai(extra: Vec<AttributeProto>) -> ModelProto {
        let mut gqa = tract_onnx::pb::NodeProto {
            op_type: "GroupQueryAttention".into(),
            domain: "com.microsoft".into(),
            input: ["qkv", "", "", "pk", "pv", "lens", "total", "cos", "sin"].map(String::from).to_vec(),
            output: ["y", "present.key", "present.value"].map(String::from).to_vec(),
            attribute: vec![int_attr("num_heads", 4), int_attr("kv_num_heads", 2), int_attr("do_rotary", 1)],
            ..Default::default()
        };
        gqa.attribute.extend(extra);
        let cache = |name: &str| TensorProto { name: name.into(), data_type: DataType::Float as i32, dims: vec![16, 4], float_data: vec![0.5; 64], ..Default::default() };
        let mut proto = model(GraphProto {
            node: vec![gqa],
            initializer: vec![cache("cos"), cache("sin")],
            input: vec![value("qkv", &[1, 3, 64]), value("pk", &[1, 2, 2, 8]), value("pv", &[1, 2, 2, 8])],
            output: vec![value("y", &[1, 3, 32]), value("present.key", &[1, 2, 5, 8]), value("present.value", &[1, 2, 5, 8])],
            ..Default::default()
        });
        proto.opset_import[0].version = 21;
        proto
    }

    #[test]
    fn a_genai_attention_becomes_the_standard_ops_or_is_left_to_tract() {
        let mut proto = genai(vec![]);
        assert_eq!(group_query_attention(&mut proto), 1);
        let g = proto.graph.as_ref().unwrap();
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert!(!ops.contains(&"GroupQueryAttention") && ops.contains(&"Softmax") && ops.contains(&"Range"), "{ops:?}");
        for (op, count) in [("Neg", 2), ("Expand", 2), ("Concat", 6), ("MatMul", 2)] {
            assert_eq!(ops.iter().filter(|o| **o == op).count(), count, "{op} in {ops:?}");
        }
        // the node's outputs keep their names, made by the last nodes that write them
        let made: Vec<&str> = g.node.iter().flat_map(|n| n.output.iter().map(|o| o.as_str())).collect();
        assert!(["y", "present.key", "present.value"].iter().all(|o| made.contains(o)));
        // tract types the expanded graph with the cache's declared shapes
        let typed = tract_onnx::onnx().model_for_proto_model(&proto).unwrap().into_typed().unwrap();
        assert_eq!(typed.output_fact(0).unwrap().shape.to_tvec(), tvec![1.to_dim(), 3.to_dim(), 32.to_dim()]);
        // what genai does not write for the CPU stays its op, inputs unpacked
        for extra in [int_attr("rotary_interleaved", 1), AttributeProto { name: "softcap".into(), f: 30.0, ..Default::default() }] {
            let mut proto = genai(vec![extra]);
            assert_eq!(group_query_attention(&mut proto), 0);
            let ops: Vec<String> = proto.graph.unwrap().node.iter().map(|n| n.op_type.clone()).collect();
            assert_eq!(ops, ["Reshape", "Split", "Reshape", "Reshape", "Reshape", "GroupQueryAttention"]);
        }
    }

    #[test]
    fn an_fp16_gemm_runs_as_matmul_and_add() {
        let half = |name: &str, dims: &[i64], v: &[f32]| TensorProto {
            name: name.into(),
            data_type: DataType::Float16 as i32,
            dims: dims.to_vec(),
            raw_data: v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect(),
            ..Default::default()
        };
        let w: Vec<f32> = (0..12).map(|i| i as f32 / 8.0 - 0.5).collect();
        let mut gemm = node("Gemm", &["x", "w", "b"], "y");
        gemm.attribute = vec![int_attr("transB", 1)];
        let mut x = value("x", &[2, 4]);
        let mut y = value("y", &[2, 3]);
        for v in [&mut x, &mut y] {
            if let Some(tract_onnx::pb::type_proto::Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) {
                t.elem_type = DataType::Float16 as i32;
            }
        }
        let mut proto = model(GraphProto {
            node: vec![gemm],
            initializer: vec![half("w", &[3, 4], &w), half("b", &[3], &[1.0, -2.0, 0.5])],
            input: vec![x],
            output: vec![y],
            ..Default::default()
        });
        assert_eq!(half_gemms(&mut proto), 1);
        let plan = tract_onnx::onnx().model_for_proto_model(&proto).unwrap().into_optimized().unwrap().into_runnable().unwrap();
        let xs: Vec<f32> = (0..8).map(|i| i as f32 / 4.0 - 1.0).collect();
        let input = tract_ndarray::Array2::from_shape_vec((2, 4), xs.iter().map(|&v| f16::from_f32(v)).collect()).unwrap();
        let out = plan.run(tvec!(input.into_tensor().into_tvalue())).unwrap();
        let got = out[0].cast_to::<f32>().unwrap();
        let got = got.to_plain_array_view::<f32>().unwrap();
        for r in 0..2 {
            for c in 0..3 {
                let want: f32 = (0..4).map(|k| xs[r * 4 + k] * w[c * 4 + k]).sum::<f32>() + [1.0, -2.0, 0.5][c];
                assert!((got[[r, c]] - want).abs() < 1e-2, "({r}, {c}): {} vs {want}", got[[r, c]]);
            }
        }
    }
}
