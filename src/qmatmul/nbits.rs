//! ONNX Runtime's `MatMulNBits` (com.microsoft: weights of 4 or 8 bits in blocks along K, one
//! scale per block, zero points optional) on the `q8b32` block kernels.
//!
//! `Y = A @ Wᵀ` with `W[n][k] = (q[n][k] - zp[n][b]) * scale[n][b]`, `b = k / block_size`. Each
//! weight minus its zero point is an integer that fits INT8 for every 4-bit file (|q - zp| <= 15)
//! and for 8-bit files whose zero points leave it in [-128, 127] (symmetric ones: the default
//! zero point 128 is what ORT's quantizer writes). Other 8-bit files keep `q - 128` and subtract
//! the rest of each zero point after the product: `(zp - 128) * scale` times the block's sum of
//! x, two small float products and a `Sub`. A block of 64 or 128 is 2 or 4 blocks of 32 with
//! one scale. So the node becomes `WasmlmBlockQ8MatMul(A, q, scales)`, layout `nk`: the
//! same products as the file's, on the kernels `q8b32` runs (4-bit weights are widened to
//! 8 bits in memory). Anything else stays as the file writes it, for tract's own `MatMulNBits`
//! (4 and 2 bits) to run: float16 activations, `g_idx`, zero points stored as floats, a K that
//! is not a multiple of 32, weights not in the file's raw bytes. Such an 8-bit product is
//! refused with the reason.

use std::collections::HashMap;

use tract_onnx::pb::{tensor_proto::DataType, AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto};

use super::blockq8::{self, BLOCK};
use crate::proto::{drop_unread, replace_nodes};

pub const OP_TYPE: &str = "MatMulNBits";

/// Rewrites in place; returns how many products moved onto the block kernels. An 8-bit product
/// it cannot move is an error that says why: tract runs 4 and 2 bits only.
pub fn fuse(model: &mut ModelProto) -> Result<usize, String> {
    let Some(graph) = model.graph.as_mut() else { return Ok(0) };
    let mut replace: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut added: Vec<TensorProto> = vec![];
    let mut readers: HashMap<String, usize> = HashMap::new();
    for name in graph.node.iter().flat_map(|n| &n.input).chain(graph.output.iter().map(|o| &o.name)) {
        *readers.entry(name.clone()).or_default() += 1;
    }
    for i in 0..graph.node.len() {
        let node = &graph.node[i];
        if node.op_type != OP_TYPE || node.domain != "com.microsoft" {
            continue;
        }
        match rewrite(graph, node) {
            Ok((nodes, tensors)) => {
                // the file's packed weights, once widened, go at once when nothing else reads
                // them (not after every product: wasm memory never shrinks)
                let b = &graph.node[i].input[1];
                if readers.get(b) == Some(&1) {
                    if let Some(t) = graph.initializer.iter_mut().find(|t| t.name == *b) {
                        t.raw_data = vec![];
                    }
                }
                replace.insert(i, nodes);
                added.extend(tensors);
            }
            Err(why) if graph.node[i].attribute.iter().any(|a| a.name == "bits" && a.i == 8) => {
                return Err(format!("{OP_TYPE} node {:?} (8 bits) runs only on the INT8 block kernels, and {why}", graph.node[i].name));
            }
            Err(_) => {}
        }
    }
    let count = replace.len();
    if count > 0 {
        replace_nodes(graph, replace);
        graph.initializer.extend(added);
        drop_unread(graph);
    }
    Ok(count)
}

/// `quantize_dynamic`'s tied LM head: it quantizes the embedding table for its `Gather` (one
/// scale and zero point for the whole table), and the head that reads the same table through a
/// `Transpose` stays an FP32 product of the dequantized table,
/// `MatMul(x, DequantizeLinear(Transpose(table), scale, zero_point))` (Optimum's exports, so
/// transformers.js's q8 files: the head was 6.7 of 15.7 ms per token on SmolLM2). That product
/// is a `MatMulNBits` of 8 bits whose blocks share one scale and zero point: it is written as
/// one (the table's bytes are its `N x K` weights; INT8 tables shifted to UINT8), which [`fuse`]
/// then moves onto the block kernels. Returns how many.
pub fn from_dequantized_heads(model: &mut ModelProto) -> usize {
    let Some(graph) = model.graph.as_mut() else { return 0 };
    let index = crate::proto::Index::new(graph);
    let inits: HashMap<&str, &TensorProto> = graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut replace: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut added: Vec<TensorProto> = vec![];
    for (i, n) in graph.node.iter().enumerate() {
        if n.op_type != "MatMul" || !crate::proto::default_domain(n) || n.input.len() != 2 || inits.contains_key(n.input[0].as_str()) {
            continue;
        }
        let Some(dq) = index.producer(&n.input[1]).filter(|d| d.op_type == "DequantizeLinear" && d.input.len() == 3) else { continue };
        let Some(t) = index.producer(&dq.input[0]).filter(|t| t.op_type == "Transpose") else { continue };
        let perm = t.attribute.iter().find(|a| a.name == "perm").map(|a| a.ints.clone()).unwrap_or(vec![1, 0]);
        let (Some(table), Some(scale), Some(zp)) =
            (inits.get(t.input[0].as_str()), inits.get(dq.input[1].as_str()), inits.get(dq.input[2].as_str()))
        else {
            continue;
        };
        let int8 = table.data_type == DataType::Int8 as i32;
        let one = |x: &TensorProto| x.dims.iter().product::<i64>() == 1;
        if perm != [1, 0] || table.dims.len() != 2 || !(int8 || table.data_type == DataType::Uint8 as i32)
            || zp.data_type != table.data_type || !one(zp) || !one(scale) {
            continue;
        }
        let (rows, cols) = (table.dims[0], table.dims[1]);
        // a (u)int8 scalar: its byte in raw_data, or its value in int32_data
        let zp = zp.raw_data.first().copied().or_else(|| zp.int32_data.first().map(|&v| v as u8));
        let (Some(scale), Some(zp)) = (crate::proto::scalar_f32(scale), zp) else { continue };
        if !(1..=1 << 24).contains(&rows) || !(1..=1 << 24).contains(&cols) || !(cols as usize).is_multiple_of(BLOCK)
            || table.raw_data.len() != (rows * cols) as usize {
            continue;
        }
        let (n_out, k, kb) = (rows as usize, cols as usize, cols as usize / BLOCK);
        let shift = |b: u8| if int8 { b.wrapping_add(128) } else { b };
        let p = &n.output[0];
        let b = TensorProto {
            name: format!("{p}.nbits_b"),
            dims: vec![n_out as i64, kb as i64, BLOCK as i64],
            data_type: DataType::Uint8 as i32,
            raw_data: table.raw_data.iter().map(|&b| shift(b)).collect(),
            ..Default::default()
        };
        let sc = TensorProto {
            name: format!("{p}.nbits_scales"),
            dims: vec![(n_out * kb) as i64],
            data_type: DataType::Float as i32,
            raw_data: scale.to_le_bytes().repeat(n_out * kb),
            ..Default::default()
        };
        let z = TensorProto {
            name: format!("{p}.nbits_zero_points"),
            dims: vec![(n_out * kb) as i64],
            data_type: DataType::Uint8 as i32,
            raw_data: vec![shift(zp); n_out * kb],
            ..Default::default()
        };
        let int = |name: &str, i: usize| AttributeProto {
            name: name.into(),
            r#type: tract_onnx::pb::attribute_proto::AttributeType::Int as i32,
            i: i as i64,
            ..Default::default()
        };
        let node = NodeProto {
            name: format!("{}.nbits", n.name),
            op_type: OP_TYPE.into(),
            domain: "com.microsoft".into(),
            input: vec![n.input[0].clone(), b.name.clone(), sc.name.clone(), z.name.clone()],
            output: n.output.clone(),
            attribute: vec![int("K", k), int("N", n_out), int("bits", 8), int("block_size", BLOCK)],
            ..Default::default()
        };
        replace.insert(i, vec![node]);
        added.extend([b, sc, z]);
    }
    let count = replace.len();
    if count > 0 {
        replace_nodes(graph, replace);
        graph.initializer.extend(added);
        drop_unread(graph);
    }
    count
}

/// One node's block product (and the bias's `Add`) with its two new initializers, or why not.
fn rewrite(graph: &GraphProto, node: &NodeProto) -> Result<(Vec<NodeProto>, Vec<TensorProto>), String> {
    let attr = |name: &str| node.attribute.iter().find(|a| a.name == name).map(|a| a.i).ok_or(format!("it has no {name}"));
    // sizes from the file: bounded before any arithmetic on them (2^24 each: no product overflows)
    let size = |name: &str| -> Result<usize, String> {
        let v = attr(name)?;
        (1..=1 << 24).contains(&v).then_some(v as usize).ok_or(format!("its {name} = {v} is not between 1 and 2^24"))
    };
    let (k, n, bits, block) = (size("K")?, size("N")?, attr("bits")?, size("block_size")?);
    if !(bits == 4 || bits == 8) {
        return Err(format!("{bits} bits are not 4 or 8"));
    }
    if k % BLOCK != 0 || block < BLOCK || block % BLOCK != 0 {
        return Err(format!("K = {k} and block_size = {block} must be multiples of {BLOCK}"));
    }
    let input = |ix: usize| node.input.get(ix).filter(|s| !s.is_empty());
    if input(4).is_some() || node.output.len() != 1 {
        return Err("it has a g_idx (columns in an order of their own)".into());
    }
    let init = |ix: usize, what: &str| {
        let name = input(ix).ok_or(format!("it has no {what}"))?;
        graph.initializer.iter().find(|t| t.name == *name).ok_or(format!("its {what} are not in the file's initializers"))
    };
    let b = init(1, "weights")?;
    let scales = init(2, "scales")?;
    let k_blocks = k.div_ceil(block);
    let blob = block * bits as usize / 8;
    if b.data_type != DataType::Uint8 as i32 || b.raw_data.len() != n * k_blocks * blob {
        return Err("its weights are not N x blocks x blob bytes in the file (external data?)".into());
    }
    // float scales: float16 ones mean float16 activations, which the block kernels do not take
    if scales.data_type != DataType::Float as i32 {
        return Err("its scales and activations are not float32".into());
    }
    let s: Vec<f32> = if !scales.raw_data.is_empty() {
        scales.raw_data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    } else {
        scales.float_data.clone()
    };
    if s.len() != n * k_blocks {
        return Err(format!("it has {} scales for {n} x {k_blocks} blocks", s.len()));
    }
    // zero points: uint8, packed as the weights are (per column, ceil(k_blocks * bits / 8) bytes)
    let default_zp = 1i32 << (bits - 1);
    let zp_row = (k_blocks * bits as usize).div_ceil(8);
    let zp: Option<&[u8]> = match input(3) {
        None => None,
        Some(_) => {
            let t = init(3, "zero points")?;
            if t.data_type != DataType::Uint8 as i32 || t.raw_data.len() != n * zp_row {
                return Err("its zero points are not packed uint8".into());
            }
            Some(&t.raw_data)
        }
    };
    let zero = |c: usize, blk: usize| -> i32 {
        match zp {
            None => default_zp,
            Some(z) if bits == 8 => z[c * zp_row + blk] as i32,
            Some(z) => (z[c * zp_row + blk / 2] >> (4 * (blk % 2)) & 15) as i32,
        }
    };
    let raw = &b.raw_data;
    let weight = |c: usize, kk: usize| -> i32 {
        let (blk, at) = (kk / block, kk % block);
        let byte = raw[(c * k_blocks + blk) * blob + at * bits as usize / 8];
        if bits == 8 { byte as i32 } else { (byte >> (4 * (at % 2)) & 15) as i32 }
    };
    // Each weight less its zero point, when all fit INT8 (always at 4 bits); otherwise (8 bits
    // with zero points far from 128) each weight less 128, and the rest of each zero point,
    // `(zp - 128) * scale * Σ x` over the block, subtracted after the product (`shifted`).
    let mut q = vec![0u8; n * k];
    let mut fill = |shifted: bool| {
        for c in 0..n {
            for kk in 0..k {
                let w = weight(c, kk) - if shifted { 128 } else { zero(c, kk / block) };
                if !(-128..=127).contains(&w) {
                    return false;
                }
                q[c * k + kk] = w as i8 as u8;
            }
        }
        true
    };
    // one pass in the common case; a second, shifted, only when a weight left INT8
    let shifted = !fill(false);
    if shifted {
        fill(true);
    }
    let kb = k / BLOCK;
    let mut sc = Vec::with_capacity(n * kb * 4);
    for c in 0..n {
        for b32 in 0..kb {
            sc.extend_from_slice(&s[c * k_blocks + b32 * BLOCK / block].to_le_bytes());
        }
    }
    let name = &node.output[0];
    let q = TensorProto {
        name: format!("{name}.q8"),
        dims: vec![n as i64, kb as i64, BLOCK as i64],
        data_type: DataType::Int8 as i32,
        raw_data: q,
        ..Default::default()
    };
    let sc = TensorProto {
        name: format!("{name}.scales"),
        dims: vec![n as i64, kb as i64, 1],
        data_type: DataType::Float as i32,
        raw_data: sc,
        ..Default::default()
    };
    let bias = input(5);
    let y = if bias.is_some() { format!("{name}.unbiased") } else { name.clone() };
    let product = NodeProto {
        name: format!("{}.blocks", node.name),
        op_type: blockq8::OP_TYPE.into(),
        input: vec![node.input[0].clone(), q.name.clone(), sc.name.clone()],
        output: vec![y.clone()],
        attribute: vec![AttributeProto {
            name: "layout".into(),
            r#type: tract_onnx::pb::attribute_proto::AttributeType::String as i32,
            s: b"nk".to_vec(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut nodes = vec![product];
    let mut tensors = vec![q, sc];
    if shifted {
        // Σ x over each block of 32: x (…, K) @ E (K, K/32) of ones; then @ C (K/32, N), C[b][c]
        // = (zp - 128) * scale of column c's block b
        let product_out = std::mem::replace(&mut nodes[0].output[0], format!("{name}.shifted"));
        let f32_tensor = |name: String, dims: Vec<i64>, v: Vec<f32>| TensorProto {
            name,
            dims,
            data_type: DataType::Float as i32,
            raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ..Default::default()
        };
        let mut ones = vec![0f32; k * kb];
        for kk in 0..k {
            ones[kk * kb + kk / BLOCK] = 1.0;
        }
        let mut rest = vec![0f32; kb * n];
        for b32 in 0..kb {
            let blk = b32 * BLOCK / block;
            for c in 0..n {
                rest[b32 * n + c] = (zero(c, blk) - 128) as f32 * s[c * k_blocks + blk];
            }
        }
        let e = f32_tensor(format!("{name}.block_ones"), vec![k as i64, kb as i64], ones);
        let r = f32_tensor(format!("{name}.zero_point_rest"), vec![kb as i64, n as i64], rest);
        let make = |suffix: &str, op: &str, input: Vec<String>, output: String| NodeProto {
            name: format!("{}.{suffix}", node.name),
            op_type: op.into(),
            input,
            output: vec![output],
            ..Default::default()
        };
        let sums = format!("{name}.block_sums");
        let correction = format!("{name}.zero_point_correction");
        nodes.push(make("block_sums", "MatMul", vec![node.input[0].clone(), e.name.clone()], sums.clone()));
        nodes.push(make("correction", "MatMul", vec![sums, r.name.clone()], correction.clone()));
        nodes.push(make("zero_points", "Sub", vec![format!("{name}.shifted"), correction], product_out));
        tensors.extend([e, r]);
    }
    if let Some(bias) = bias {
        nodes.push(NodeProto {
            name: format!("{}.bias", node.name),
            op_type: "Add".into(),
            input: vec![y, bias.clone()],
            output: vec![name.clone()],
            ..Default::default()
        });
    }
    Ok((nodes, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node whose sizes or bytes do not add up is left alone (or refused at 8 bits) with the
    /// reason, never indexed past its bytes.
    #[test]
    fn a_hostile_node_is_refused_not_read_past_its_bytes() {
        let int = |name: &str, i: i64| AttributeProto { name: name.into(), i, ..Default::default() };
        let node = |k: i64, n: i64, bits: i64| NodeProto {
            name: "mm".into(),
            op_type: OP_TYPE.into(),
            domain: "com.microsoft".into(),
            input: vec!["x".into(), "b".into(), "s".into()],
            output: vec!["y".into()],
            attribute: vec![int("K", k), int("N", n), int("bits", bits), int("block_size", 32)],
            ..Default::default()
        };
        let graph = |raw: usize, scales: usize| GraphProto {
            initializer: vec![
                TensorProto { name: "b".into(), data_type: DataType::Uint8 as i32, raw_data: vec![0; raw], ..Default::default() },
                TensorProto { name: "s".into(), data_type: DataType::Float as i32, raw_data: vec![0; scales * 4], ..Default::default() },
            ],
            ..Default::default()
        };
        let g = graph(64, 2);
        assert!(rewrite(&g, &node(32, 2, 8)).is_ok());
        for (k, n, why) in [(1 << 40, 2, "between 1 and 2^24"), (-32, 2, "between 1 and 2^24"), (32, 0, "between 1 and 2^24"),
                            (64, 2, "N x blocks x blob"), (33, 2, "multiples of 32")] {
            let e = rewrite(&g, &node(k, n, 8)).unwrap_err();
            assert!(e.contains(why), "K={k} N={n}: {e}");
        }
        let mut model = ModelProto { graph: Some(GraphProto { node: vec![node(64, 2, 8)], ..graph(64, 2) }), ..Default::default() };
        assert!(fuse(&mut model).unwrap_err().contains("N x blocks x blob"));
    }

    /// `MatMul(x, DequantizeLinear(Transpose(table), scale, zero_point))` of an INT8 and a UINT8
    /// table (zero points far from the middle, so the shifted path too) runs on the block
    /// kernels and gives tract's FP32 product of the dequantized table within the kernels'
    /// activation rounding.
    #[test]
    fn a_dequantized_head_runs_on_the_block_kernels() {
        use crate::fused::test_proto::{model, node, value};
        use tract_onnx::prelude::*;
        let (n, k) = (5usize, 64usize);
        for (dt, zp) in [(DataType::Int8, -100i32), (DataType::Uint8, 20), (DataType::Uint8, 128)] {
            let table: Vec<u8> = (0..n * k).map(|i| ((i * 37 + 11) % 256) as u8).collect();
            let t = |name: &str, dt: DataType, dims: Vec<i64>, raw: Vec<u8>| TensorProto {
                name: name.into(), data_type: dt as i32, dims, raw_data: raw, ..Default::default()
            };
            let mut tr = node("Transpose", &["table"], "tt");
            tr.attribute.push(AttributeProto {
                name: "perm".into(),
                r#type: tract_onnx::pb::attribute_proto::AttributeType::Ints as i32,
                ints: vec![1, 0],
                ..Default::default()
            });
            let graph = GraphProto {
                node: vec![tr, node("DequantizeLinear", &["tt", "scale", "zp"], "w"), node("MatMul", &["x", "w"], "y")],
                initializer: vec![
                    t("table", dt, vec![n as i64, k as i64], table),
                    t("scale", DataType::Float, vec![], 0.013f32.to_le_bytes().to_vec()),
                    t("zp", dt, vec![], vec![zp as u8]),
                ],
                input: vec![value("x", &[3, k as i64])],
                output: vec![value("y", &[3, n as i64])],
                ..Default::default()
            };
            let run = |mut proto: ModelProto, ours: bool| -> Vec<f32> {
                if ours {
                    assert_eq!(from_dequantized_heads(&mut proto), 1);
                    assert_eq!(fuse(&mut proto).unwrap(), 1);
                    let ops: Vec<String> = proto.graph.as_ref().unwrap().node.iter().map(|n| n.op_type.clone()).collect();
                    assert!(ops.contains(&blockq8::OP_TYPE.to_string()), "{ops:?}");
                }
                let mut onnx = tract_onnx::onnx();
                super::super::register(&mut onnx);
                let plan = super::super::packs::parse(&onnx, proto).unwrap().into_optimized().unwrap().into_runnable().unwrap();
                let x: Vec<f32> = (0..3 * k).map(|i| ((i * 7) % 23) as f32 / 11.0 - 1.0).collect();
                let x = tract_ndarray::Array2::from_shape_vec((3, k), x).unwrap().into_tensor();
                let out = plan.run(tvec!(x.into_tvalue())).unwrap();
                out[0].to_plain_array_view::<f32>().unwrap().iter().copied().collect()
            };
            let (got, want) = (run(model(graph.clone()), true), run(model(graph), false));
            let range = want.iter().fold(0f32, |a, b| a.max(b.abs()));
            let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(d <= 0.01 * range, "{dt:?} zp {zp}: {d} (range {range})");
        }
    }
}
