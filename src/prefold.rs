//! Block-quantized weights dequantized in the ONNX protobuf, before tract sees them.
//!
//! The `q8b32` preset stores each weight as INT8 blocks with an FP16 scale per block, dequantized
//! in the graph by `Reshape(Mul(Cast(int8), Cast(fp16)), shape)` (models/wasmlm_models/
//! onnx_graph.py). tract folds that at load anyway, but inside its type analysis, which clones and
//! compares the large constant tensors element by element: 1.2 s for SmolLM2 natively, 4 s in
//! Chromium (perf: Tensor::eq_dt, memmove, page faults). Here the same product is computed once,
//! in one loop, into an FP32 initializer that replaces the four nodes. The values are the ones
//! tract (and ONNX Runtime) compute: int8 -> f32 exactly, fp16 -> f32 exactly, one f32 product.
//! Anything that does not match the pattern exactly is left to tract.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{tensor_proto::DataType, ModelProto, NodeProto, TensorProto};
use tract_onnx::prelude::f16;

/// Rewrites the pattern in place; returns how many weights were dequantized.
pub fn dequantize_block_weights(model: &mut ModelProto) -> usize {
    let Some(graph) = model.graph.as_mut() else { return 0 };
    let init_ix: HashMap<String, usize> =
        graph.initializer.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
    let mut producer: HashMap<&str, usize> = HashMap::new();
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        for o in &n.output {
            producer.insert(o.as_str(), i);
        }
        for x in &n.input {
            *uses.entry(x.as_str()).or_default() += 1;
        }
    }
    for o in &graph.output {
        *uses.entry(o.name.as_str()).or_default() += 1;
    }
    let single_use = |name: &str| uses.get(name).copied() == Some(1);
    let node = |name: &str, op: &str| -> Option<usize> {
        let &i = producer.get(name)?;
        (graph.node[i].op_type == op && single_use(name)).then_some(i)
    };
    let cast_to_float = |n: &NodeProto| {
        n.attribute.iter().any(|a| a.name == "to" && a.i == DataType::Float as i64) && n.input.len() == 1
    };
    let init = |name: &str| init_ix.get(name).map(|&i| &graph.initializer[i]);

    let mut drop_nodes = vec![];
    let mut drop_inits = HashSet::new();
    let mut new_inits = vec![];
    for (r, reshape) in graph.node.iter().enumerate() {
        if reshape.op_type != "Reshape" || reshape.input.len() != 2 {
            continue;
        }
        let Some(m) = node(&reshape.input[0], "Mul") else { continue };
        let mul = &graph.node[m];
        if mul.input.len() != 2 {
            continue;
        }
        let (Some(c0), Some(c1)) = (node(&mul.input[0], "Cast"), node(&mul.input[1], "Cast")) else { continue };
        if !cast_to_float(&graph.node[c0]) || !cast_to_float(&graph.node[c1]) {
            continue;
        }
        let (Some(a), Some(b), Some(shape)) =
            (init(&graph.node[c0].input[0]), init(&graph.node[c1].input[0]), init(&reshape.input[1]))
        else {
            continue;
        };
        let (q, s) = if a.data_type == DataType::Int8 as i32 { (a, b) } else { (b, a) };
        let Some(raw) = dequantize(q, s) else { continue };
        let Some(dims) = reshape_dims(shape, raw.len() / 4) else { continue };
        new_inits.push(TensorProto {
            name: reshape.output[0].clone(),
            dims,
            data_type: DataType::Float as i32,
            raw_data: raw,
            ..Default::default()
        });
        drop_nodes.extend([r, m, c0, c1]);
        for t in [q, s, shape] {
            if single_use(&t.name) {
                drop_inits.insert(t.name.clone());
            }
        }
    }
    let count = new_inits.len();
    if count == 0 {
        return 0;
    }
    drop_nodes.sort_unstable();
    let mut i = 0;
    graph.node.retain(|_| {
        i += 1;
        drop_nodes.binary_search(&(i - 1)).is_err()
    });
    graph.initializer.retain(|t| !drop_inits.contains(&t.name));
    graph.initializer.extend(new_inits);
    count
}

/// q (int8) times s (fp16), numpy-broadcast (same rank, s has 1 where it repeats), row-major,
/// as an FP32 tensor's `raw_data` (little-endian), written in one pass.
fn dequantize(q: &TensorProto, s: &TensorProto) -> Option<Vec<u8>> {
    if q.data_type != DataType::Int8 as i32 || s.data_type != DataType::Float16 as i32 {
        return None;
    }
    let (qd, sd) = (&q.dims, &s.dims);
    let n: usize = qd.iter().map(|&d| d as usize).product();
    let sn: usize = sd.iter().map(|&d| d as usize).product();
    if qd.len() != sd.len() || q.raw_data.len() != n || s.raw_data.len() != 2 * sn || n == 0 {
        return None;
    }
    if qd.iter().zip(sd).any(|(&a, &b)| b != a && b != 1) {
        return None;
    }
    let scales: Vec<f32> =
        s.raw_data.chunks_exact(2).map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect();
    // For each axis: the stride in q's flat index, and in s's (0 where s broadcasts).
    let rank = qd.len();
    let mut s_strides = vec![0usize; rank];
    let mut acc = 1;
    for ax in (0..rank).rev() {
        s_strides[ax] = if sd[ax] == 1 { 0 } else { acc };
        acc *= sd[ax] as usize;
    }
    let mut out = vec![0u8; n * 4];
    let mut index = vec![0usize; rank];
    let mut s_at = 0usize;
    for (&byte, o) in q.raw_data.iter().zip(out.chunks_exact_mut(4)) {
        o.copy_from_slice(&(byte as i8 as f32 * scales[s_at]).to_le_bytes());
        // advance the multi-index, keeping s's offset in step
        for ax in (0..rank).rev() {
            index[ax] += 1;
            s_at += s_strides[ax];
            if index[ax] < qd[ax] as usize {
                break;
            }
            s_at -= s_strides[ax] * index[ax];
            index[ax] = 0;
        }
    }
    Some(out)
}

/// A Reshape's target shape (int64 initializer) resolved against `len` elements (0 and -1 are
/// refused: our exporter writes the dims themselves).
fn reshape_dims(shape: &TensorProto, len: usize) -> Option<Vec<i64>> {
    let dims = crate::proto::int64_values(shape)?;
    let ok = dims.iter().all(|&d| d > 0) && dims.iter().product::<i64>() as usize == len;
    ok.then_some(dims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, dt: DataType, dims: &[i64], raw: Vec<u8>) -> TensorProto {
        TensorProto { name: name.into(), data_type: dt as i32, dims: dims.to_vec(), raw_data: raw, ..Default::default() }
    }

    #[test]
    fn broadcast_product_matches_a_direct_computation() {
        // q: (2, 3, 4); s: (2, 1, 4) -> s repeats along axis 1.
        let qv: Vec<i8> = (0..24).map(|i| (i * 11 % 255 - 127) as i8).collect();
        let sv: Vec<f32> = (0..8).map(|i| 0.01 * (i as f32 + 1.0)).collect();
        let q = tensor("q", DataType::Int8, &[2, 3, 4], qv.iter().map(|&v| v as u8).collect());
        let s = tensor("s", DataType::Float16, &[2, 1, 4],
                       sv.iter().flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes()).collect());
        let got: Vec<f32> =
            dequantize(&q, &s).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        for a in 0..2 {
            for b in 0..3 {
                for c in 0..4 {
                    let want = qv[a * 12 + b * 4 + c] as f32 * f16::from_f32(sv[a * 4 + c]).to_f32();
                    assert_eq!(got[a * 12 + b * 4 + c], want, "at {a},{b},{c}");
                }
            }
        }
    }
}
