//! The weights of our products packed straight from the protobuf, before tract reads it.
//!
//! Wasm memory never shrinks, so a load costs its peak. When tract read the weights, each was
//! held three times over: the protobuf's bytes, tract's tensor of them (both until the protobuf
//! was dropped), then our packing of the tensor (beside the inference model, until it was
//! typed). The default model's load peaked at 331 MiB of wasm memory for a 137 MiB file.
//!
//! Here each product's weights and scales are packed from the protobuf's bytes, node by node,
//! and the bytes are freed as soon as the last node that reads them is packed; the node keeps
//! only its activations input. tract then never sees the weights: [`attach`] hands each node of
//! the parsed model its packing, found by the node's output name. A product that
//! [`super::rewrite`] made of several sibling products (a layer's q, k and v) lists each one's
//! weights and scales, packed side by side without being joined first. The embedding lookup
//! reads its rows from the LM head's packing when the two share the table (a tied embedding):
//! one copy, where there were two. The dynamic-quantization products (mod.rs) are packed the
//! same way, one per node, and a lookup in a large FP32 table that nothing else reads takes the
//! table's bytes out of the protobuf (gather.rs).

use std::collections::HashMap;
use std::sync::Arc;

use tract_onnx::pb::{tensor_proto::DataType, ModelProto, NodeProto, TensorProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::InferenceModel;

use super::blockq8::{self, panel_scales, BLOCK};
use super::gather::{self, Table};
use super::kernel::{pack_for_best, PackedI8, PANEL};
use super::DynQMatMul;
use crate::proto::drop_unread;

/// A product's weights as the block kernels read them, shared by every op that reads the same
/// initializers the same way.
#[derive(Debug, Clone)]
pub struct BlockWeights {
    pub w: Arc<PackedI8>,
    /// One scale per block of the padded K per column, in panel order ([`panel_scales`]).
    pub scales: Arc<Vec<f32>>,
}

#[derive(Debug, Clone)]
pub enum Packing {
    Blocks(BlockWeights),
    /// The op itself: its weights packed for the best kernel of the build.
    Dynamic(DynQMatMul),
    /// A lookup's own table.
    Table(Table),
}

/// Each packed node's weights, by the node's first output name.
#[derive(Debug, Default)]
pub struct Packs(HashMap<String, Packing>);

/// Packs the weights of every `WasmlmBlockQ8MatMul`, `WasmlmBlockQ8Gather` and
/// `WasmlmDynQMatMul` node of `model` and cuts them from its inputs, and makes each `Gather` of
/// a large FP32 table that only it reads a `WasmlmF32Gather` holding the table's bytes; the
/// initializers that nothing reads any more are removed. An error names the node and what is
/// wrong with its weights.
pub fn pack(model: &mut ModelProto) -> Result<Packs, String> {
    let mut packs = Packs::default();
    let Some(graph) = model.graph.as_mut() else { return Ok(packs) };
    // dead nodes first: a table that only a dead node also reads (MatMulNBits files keep the LM
    // head's `Transpose` of the embedding) is then the lookup's alone
    drop_unread(graph);
    let mut readers: HashMap<String, usize> = HashMap::new();
    for name in graph.node.iter().flat_map(|n| &n.input).chain(graph.output.iter().map(|o| &o.name)) {
        *readers.entry(name.clone()).or_default() += 1;
    }
    let index: HashMap<String, usize> = graph.initializer.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
    // lookups in large FP32 tables that nothing else reads: the table's bytes move out of the
    // protobuf into the op (gather.rs), never copied
    for node in graph.node.iter_mut() {
        let Some(table) = f32_table(node, &index, &readers, &graph.initializer) else { continue };
        let (rows, k) = (graph.initializer[table].dims[0] as usize, graph.initializer[table].dims[1] as usize);
        let bytes = std::mem::take(&mut graph.initializer[table].raw_data);
        *node = NodeProto {
            name: std::mem::take(&mut node.name),
            op_type: gather::F32_OP_TYPE.into(),
            input: vec![node.input[1].clone()],
            output: std::mem::take(&mut node.output),
            ..Default::default()
        };
        packs.0.insert(node.output[0].clone(), Packing::Table(Table::F32 { bytes: Arc::new(bytes), rows, k }));
    }
    // the nodes by what they read, in the graph's order: a tied table's lookup and LM head are
    // packed once, and its bytes freed at once (not after every layer in between)
    let mut groups: Vec<(Vec<String>, Kind, Vec<usize>)> = vec![];
    for (i, node) in graph.node.iter().enumerate() {
        let kind = match node.op_type.as_str() {
            gather::OP_TYPE => Kind::Blocks { nk: true },
            blockq8::OP_TYPE => Kind::Blocks { nk: layout(node)? == "nk" },
            super::OP_TYPE => Kind::Dynamic,
            _ => continue,
        };
        let sources = &node.input[1..];
        let fits = match kind {
            Kind::Blocks { nk } => !sources.is_empty() && sources.len() % 2 == 0 && (!nk || sources.len() == 2),
            Kind::Dynamic => sources.len() == 3,
        };
        if !fits {
            return Err(format!("node {:?} ({}): {} weight inputs, expected {}", node.name, node.op_type, sources.len(),
                               if kind == Kind::Dynamic { "W, its zero point and scale" } else { "pairs of weights and scales" }));
        }
        match groups.iter_mut().find(|g| g.0 == sources && g.1 == kind) {
            Some(g) => g.2.push(i),
            None => groups.push((sources.to_vec(), kind, vec![i])),
        }
    }
    // The graph's last products first. Which order leaves the fewest holes is the allocator's
    // business; measured on the default model (wasm memory after load, 137 MiB file): 179 MiB
    // in the graph's order, 177 in the reverse of the file's (the order the bytes were decoded
    // in), 174 in this one.
    groups.reverse();
    for (sources, kind, members) in groups {
        let first = &graph.node[members[0]];
        let what = |e: String| format!("node {:?} ({}): {e}", first.name, first.op_type);
        // an LM head's table that nothing else reads is packed in its own bytes
        let last = |name: &String| readers[name] == members.len();
        let owned = match index.get(&sources[0]) {
            Some(&i) if kind == (Kind::Blocks { nk: true }) && last(&sources[0]) && !graph.initializer[i].raw_data.is_empty() => {
                Some(std::mem::take(&mut graph.initializer[i].raw_data))
            }
            _ => None,
        };
        let tensor = |name: &str| -> Result<&TensorProto, String> {
            index.get(name).map(|&i| &graph.initializer[i]).ok_or_else(|| what(format!("{name} is not an initializer")))
        };
        let weights = match kind {
            Kind::Blocks { nk } => {
                let pairs = sources.chunks(2).map(|p| Ok((tensor(&p[0])?, tensor(&p[1])?))).collect::<Result<Vec<_>, String>>()?;
                Packing::Blocks(weights_of(&pairs, nk, owned).map_err(what)?)
            }
            Kind::Dynamic => Packing::Dynamic(dynamic_of(tensor(&sources[0])?, tensor(&sources[1])?, tensor(&sources[2])?).map_err(what)?),
        };
        for &i in &members {
            let node = &mut graph.node[i];
            node.input.truncate(1);
            packs.0.insert(node.output[0].clone(), weights.clone());
        }
        for name in &sources {
            let left = readers.get_mut(name).expect("counted above");
            *left -= members.len();
            if *left == 0 {
                // nothing else reads them: the bytes go now, not after the whole pass
                let t = &mut graph.initializer[index[name]];
                *t = TensorProto { name: std::mem::take(&mut t.name), ..Default::default() };
            }
        }
    }
    drop_unread(graph);
    Ok(packs)
}

/// The initializer a `Gather` node looks up along axis 0, if it is an FP32 table (rank 2, its
/// bytes raw, at least [`gather::F32_MIN_BYTES`]) that nothing else reads.
fn f32_table(node: &NodeProto, index: &HashMap<String, usize>, readers: &HashMap<String, usize>,
             initializers: &[TensorProto]) -> Option<usize> {
    let axis = node.attribute.iter().find(|a| a.name == "axis").map_or(0, |a| a.i);
    if node.op_type != "Gather" || !node.domain.is_empty() || node.input.len() != 2 || !(axis == 0 || axis == -2) {
        return None;
    }
    let &i = index.get(&node.input[0])?;
    let t = &initializers[i];
    let size = t.dims.iter().try_fold(4usize, |n, &d| usize::try_from(d).ok().and_then(|d| n.checked_mul(d)));
    let fits = t.data_type == DataType::Float as i32 && t.dims.len() == 2 && t.external_data.is_empty()
        && t.raw_data.len() >= gather::F32_MIN_BYTES && size == Some(t.raw_data.len());
    (fits && readers.get(&node.input[0]) == Some(&1)).then_some(i)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Blocks { nk: bool },
    Dynamic,
}

/// W (K, N) int8, its zero point and scale (one, or one per column) for the dynamic-quantization
/// kernels ([`pack_for_best`]: the relaxed build's packing where the weights allow it).
fn dynamic_of(w: &TensorProto, zp: &TensorProto, scale: &TensorProto) -> Result<DynQMatMul, String> {
    if w.data_type != DataType::Int8 as i32 || w.dims.len() != 2 || w.dims.iter().any(|&d| d <= 0) {
        return Err(format!("weights {} must be int8 (K, N), found type {} and shape {:?}", w.name, w.data_type, w.dims));
    }
    let (k, n) = (w.dims[0] as usize, w.dims[1] as usize);
    let per_column = |t: &TensorProto, dt: DatumType| -> Result<Tensor, String> {
        let v = load(t)?.cast_to_dt(dt).map_err(|e| format!("{}: {e}", t.name))?.into_owned();
        if v.len() != 1 && v.len() != n {
            return Err(format!("{}: {} values, expected one or one per column ({n})", t.name, v.len()));
        }
        Ok(v)
    };
    let zp = values::<i32>(&per_column(zp, i32::datum_type())?)?;
    let scale = values::<f32>(&per_column(scale, f32::datum_type())?)?;
    let loaded: Vec<i8>;
    let bytes = if w.raw_data.is_empty() {
        loaded = values::<i8>(&load(w)?)?;
        &loaded[..]
    } else if w.raw_data.len() == k * n {
        as_i8(&w.raw_data)
    } else {
        return Err(format!("weights {}: {} bytes for shape {:?}", w.name, w.raw_data.len(), w.dims));
    };
    let (packed, kernel) = pack_for_best(bytes, k, n);
    Ok(DynQMatMul { w: Arc::new(packed), w_zp: Arc::new(zp), w_scale: Arc::new(scale), kernel, last_row: false })
}

fn values<T: Datum + Copy>(t: &Tensor) -> Result<Vec<T>, String> {
    t.try_as_plain_ram().and_then(|v| Ok(v.as_slice::<T>()?.to_vec())).map_err(|e| e.to_string())
}

fn layout(node: &NodeProto) -> Result<&str, String> {
    let layout = node.attribute.iter().find(|a| a.name == "layout").map(|a| a.s.as_slice());
    match layout {
        Some(b"kn") => Ok("kn"),
        Some(b"nk") => Ok("nk"),
        _ => Err(format!("node {:?} ({}): layout must be kn or nk", node.name, node.op_type)),
    }
}

/// One packing of (weights, scales) pairs side by side along N. `nk`: one pair, q (N, K/32, 32)
/// and scales (N, K/32, 1). Else q (K/32, 32, N_i) and scales (K/32, 1, N_i), the same K.
/// `owned`: the `nk` weights' bytes, taken out of their initializer, packed where they lie.
fn weights_of(pairs: &[(&TensorProto, &TensorProto)], nk: bool, owned: Option<Vec<u8>>) -> Result<BlockWeights, String> {
    let mut qs: Vec<Vec<i8>> = vec![];
    let mut ss: Vec<Vec<f32>> = vec![];
    // (bytes, N, K/32) per pair; bytes borrowed from the protobuf where they lie raw
    let mut parts: Vec<(usize, usize)> = vec![];
    for (q, s) in pairs {
        if q.data_type != DataType::Int8 as i32 || q.dims.len() != 3 || q.dims.iter().any(|&d| d <= 0) {
            return Err(format!("weights {} must be int8 of rank 3, found type {} and shape {:?}", q.name, q.data_type, q.dims));
        }
        let d: Vec<usize> = q.dims.iter().map(|&d| d as usize).collect();
        let (n, kb, b) = if nk { (d[0], d[1], d[2]) } else { (d[2], d[0], d[1]) };
        if b != BLOCK {
            return Err(format!("weights {}: blocks of {BLOCK} expected, found {b}", q.name));
        }
        let scales = load(s)?.cast_to::<f32>().map_err(|e| format!("scales {}: {e}", s.name))?.into_owned();
        let want: &[usize] = if nk { &[n, kb, 1] } else { &[kb, 1, n] };
        if scales.shape() != want {
            return Err(format!("scales {} of shape {want:?} expected, found {:?}", s.name, scales.shape()));
        }
        let raw = owned.as_ref().unwrap_or(&q.raw_data);
        if raw.is_empty() {
            let t = load(q)?;
            qs.push(values::<i8>(&t).map_err(|e| format!("weights {}: {e}", q.name))?);
        } else if raw.len() != n * kb * b {
            return Err(format!("weights {}: {} bytes for shape {:?}", q.name, raw.len(), q.dims));
        }
        ss.push(values::<f32>(&scales).map_err(|e| format!("scales {}: {e}", s.name))?);
        parts.push((n, kb));
    }
    let kb = parts[0].1;
    if parts.iter().any(|p| p.1 != kb) {
        return Err(format!("weights of different K side by side: {:?}", parts.iter().map(|p| p.1 * BLOCK).collect::<Vec<_>>()));
    }
    if parts[..parts.len() - 1].iter().any(|p| p.0 % PANEL != 0) {
        return Err(format!("weights side by side must have N multiple of {PANEL} but the last: {:?}", parts.iter().map(|p| p.0).collect::<Vec<_>>()));
    }
    let k = kb * BLOCK;
    let w = if let Some(raw) = owned {
        PackedI8::from_n_by_k_owned(into_i8(raw), k, parts[0].0)
    } else {
        let mut loaded = qs.iter();
        let bytes: Vec<&[i8]> = pairs.iter().map(|(q, _)| {
            if q.raw_data.is_empty() {
                loaded.next().expect("loaded above").as_slice()
            } else {
                as_i8(&q.raw_data)
            }
        }).collect();
        pack_borrowed(&bytes, &parts, k, nk)
    };
    // column c of the join: part i's column c - first[i]
    let mut first = vec![0];
    for p in &parts {
        first.push(first.last().unwrap() + p.0);
    }
    let scales = panel_scales(k, w.cols, |c, blk| {
        let i = first.partition_point(|&f| f <= c) - 1;
        let (sv, n, c) = (&ss[i], parts[i].0, c - first[i]);
        if nk { sv[c * kb + blk] } else { sv[blk * n + c] }
    });
    Ok(BlockWeights { w: Arc::new(w), scales: Arc::new(scales) })
}

fn pack_borrowed(bytes: &[&[i8]], parts: &[(usize, usize)], k: usize, nk: bool) -> PackedI8 {
    if nk {
        PackedI8::from_n_by_k(bytes[0], k, parts[0].0)
    } else {
        let parts: Vec<(&[i8], usize)> = bytes.iter().zip(parts).map(|(&b, p)| (b, p.0)).collect();
        PackedI8::from_k_by_n_parts(&parts, k)
    }
}

fn load(t: &TensorProto) -> Result<Tensor, String> {
    // external data is inlined before (external.rs): no file is opened here
    tract_onnx::tensor::load_tensor(&tract_onnx::data_resolver::FopenDataResolver, t, None)
        .map_err(|e| format!("initializer {}: {e:#}", t.name))
}

fn as_i8(b: &[u8]) -> &[i8] {
    // SAFETY: i8 and u8 have the same size and alignment, and every bit pattern is valid
    unsafe { std::slice::from_raw_parts(b.as_ptr() as *const i8, b.len()) }
}

fn into_i8(b: Vec<u8>) -> Vec<i8> {
    let mut b = std::mem::ManuallyDrop::new(b);
    // SAFETY: the same allocation, reinterpreted: i8 and u8 have the same size and alignment
    unsafe { Vec::from_raw_parts(b.as_mut_ptr() as *mut i8, b.len(), b.capacity()) }
}

/// `proto` parsed by `onnx` (which knows this module's ops: [`super::register`]), its block
/// weights packed first: [`pack`], then tract's parse, then [`attach`]. The protobuf is
/// dropped before the weights are attached, so that its bytes never sit beside tract's model.
pub fn parse(onnx: &tract_onnx::Onnx, mut proto: ModelProto) -> Result<InferenceModel, crate::error::Error> {
    use crate::error::Error;
    let packs = pack(&mut proto).map_err(Error::UnsupportedGraph)?;
    // `{:#}`: the chain of contexts that says which op or shape, without a backtrace
    let mut model = onnx.model_for_proto_model(&proto).map_err(|e| Error::UnsupportedGraph(format!("{e:#}")))?;
    drop(proto);
    attach(&mut model, packs).map_err(Error::UnsupportedGraph)?;
    Ok(model)
}

/// Gives each packed node of the parsed model its weights (by its output's name, which tract
/// keeps as the outlet's label); every packing must find its node.
pub fn attach(model: &mut InferenceModel, mut packs: Packs) -> Result<(), String> {
    for id in 0..model.nodes.len() {
        let name = model.nodes[id].op.name();
        if ![blockq8::OP_TYPE, gather::OP_TYPE, gather::F32_OP_TYPE, super::OP_TYPE].contains(&name.as_ref()) {
            continue;
        }
        let label = model.outlet_label(OutletId::new(id, 0)).unwrap_or_default().to_string();
        let unpacked = || format!("node {:?} ({name}): its weights were not packed", model.nodes[id].name);
        let op = match (packs.0.remove(&label), name.as_ref()) {
            (Some(Packing::Blocks(w)), gather::OP_TYPE) => gather::expansion(Table::Blocks(w)),
            (Some(Packing::Table(t)), gather::F32_OP_TYPE) => gather::expansion(t),
            (Some(Packing::Blocks(w)), blockq8::OP_TYPE) => blockq8::expansion(w),
            (Some(Packing::Dynamic(w)), super::OP_TYPE) => super::expansion(w),
            _ => return Err(unpacked()),
        };
        model.nodes[id].op = op;
    }
    match packs.0.keys().next() {
        Some(left) => Err(format!("weights packed for {left:?}, a node the parsed model does not have")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::test_proto::{model, node, value};
    use tract_onnx::pb::{AttributeProto, GraphProto};

    fn raw(name: &str, dt: DataType, dims: &[i64], bytes: Vec<u8>) -> TensorProto {
        TensorProto { name: name.into(), data_type: dt as i32, dims: dims.to_vec(), raw_data: bytes, ..Default::default() }
    }

    fn f32s(name: &str, dims: &[i64], v: &[f32]) -> TensorProto {
        raw(name, DataType::Float, dims, v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    fn layout(n: NodeProto, l: &str) -> NodeProto {
        let mut n = n;
        n.attribute.push(AttributeProto {
            name: "layout".into(),
            r#type: tract_onnx::pb::attribute_proto::AttributeType::String as i32,
            s: l.as_bytes().to_vec(),
            ..Default::default()
        });
        n
    }

    /// A tied table's lookup and LM head share one packing, and the siblings listed side by side
    /// pack as their join; the initializers they read are gone from the protobuf, the nodes keep
    /// their activations input only, and a weight that is not an initializer is refused by name.
    #[test]
    fn tied_tables_pack_once_and_siblings_pack_as_their_join() {
        let (v, k) = (8usize, 64usize);
        let bytes = |n: usize, seed: u64| -> Vec<u8> { (0..n).map(|i| (i as u64 * 2654435761 + seed).rotate_right(11) as u8).collect() };
        let table = bytes(v * k, 1);
        let (a, b) = (bytes(k * 4, 2), bytes(k * 3, 3));
        let scales = |n: usize| (0..n).map(|i| 0.01 + i as f32 * 0.001).collect::<Vec<f32>>();
        let graph = GraphProto {
            node: vec![
                node(gather::OP_TYPE, &["ids", "t", "ts"], "e"),
                layout(node(blockq8::OP_TYPE, &["e", "a", "as", "b", "bs"], "ab"), "kn"),
                layout(node(blockq8::OP_TYPE, &["e", "t", "ts"], "logits"), "nk"),
            ],
            initializer: vec![
                raw("t", DataType::Int8, &[v as i64, 2, 32], table.clone()),
                f32s("ts", &[v as i64, 2, 1], &scales(v * 2)),
                raw("a", DataType::Int8, &[2, 32, 4], a.clone()),
                f32s("as", &[2, 1, 4], &scales(8)),
                raw("b", DataType::Int8, &[2, 32, 3], b.clone()),
                f32s("bs", &[2, 1, 3], &scales(6)),
            ],
            input: vec![value("ids", &[1])],
            output: vec![value("ab", &[1, 7]), value("logits", &[1, v as i64])],
            ..Default::default()
        };
        let mut proto = model(graph.clone());
        let packs = pack(&mut proto).unwrap();
        let g = proto.graph.as_ref().unwrap();
        assert!(g.initializer.is_empty(), "{:?}", g.initializer.iter().map(|t| &t.name).collect::<Vec<_>>());
        assert!(g.node.iter().all(|n| n.input.len() == 1));
        let blocks = |name: &str| match &packs.0[name] {
            Packing::Blocks(w) => w.clone(),
            other => panic!("{name}: {other:?}"),
        };
        assert!(Arc::ptr_eq(&blocks("e").w, &blocks("logits").w));
        let i8s = |b: &[u8]| b.iter().map(|&x| x as i8).collect::<Vec<i8>>();
        assert_eq!(blocks("logits").w.w, PackedI8::from_n_by_k(&i8s(&table), k, v).w);
        let joined: Vec<i8> = (0..k).flat_map(|r| i8s(&a[r * 4..r * 4 + 4]).into_iter().chain(i8s(&b[r * 3..r * 3 + 3]))).collect();
        assert_eq!(blocks("ab").w.w, PackedI8::from_k_by_n(&joined, k, 7).w);
        let (sa, sb) = (scales(8), scales(6));
        assert_eq!(*blocks("ab").scales, panel_scales(k, 7, |c, blk| if c < 4 { sa[blk * 4 + c] } else { sb[blk * 3 + c - 4] }));

        let mut bad = graph;
        bad.initializer.retain(|t| t.name != "bs");
        let e = pack(&mut model(bad)).unwrap_err();
        assert!(e.contains("\"ab\"") && e.contains("bs is not an initializer"), "{e}");
    }

    /// A dynamic-quantization product packs its weights as the kernels do, keeps its zero
    /// point and scale (per tensor or per column), and refuses a scale of another length.
    #[test]
    fn dynamic_products_pack_their_weights() {
        let (k, n) = (64usize, 5usize);
        let w: Vec<u8> = (0..k * n).map(|i| (i as u64 * 2654435761).rotate_right(13) as u8).collect();
        let graph = |scales: Vec<f32>| GraphProto {
            node: vec![node(super::super::OP_TYPE, &["x", "w", "zp", "s"], "y")],
            initializer: vec![
                raw("w", DataType::Int8, &[k as i64, n as i64], w.clone()),
                raw("zp", DataType::Int8, &[], vec![3]),
                f32s("s", &[scales.len() as i64], &scales),
            ],
            input: vec![value("x", &[1, k as i64])],
            output: vec![value("y", &[1, n as i64])],
            ..Default::default()
        };
        let mut proto = model(graph(vec![0.5, 0.25, 0.125, 1.0, 2.0]));
        let packs = pack(&mut proto).unwrap();
        assert!(proto.graph.as_ref().unwrap().initializer.is_empty());
        let Packing::Dynamic(d) = &packs.0["y"] else { panic!("{:?}", packs.0["y"]) };
        let (want, kernel) = pack_for_best(&w.iter().map(|&b| b as i8).collect::<Vec<_>>(), k, n);
        assert_eq!((&d.w.w, d.kernel, &d.w_zp[..], &d.w_scale[..]), (&want.w, kernel, &[3][..], &[0.5, 0.25, 0.125, 1.0, 2.0][..]));
        let e = pack(&mut model(graph(vec![0.5, 0.25]))).unwrap_err();
        assert!(e.contains("\"y\"") && e.contains("2 values, expected one or one per column (5)"), "{e}");
    }

    /// A large FP32 table's lookup takes the initializer's bytes (the same bytes, not a copy,
    /// and gone from the protobuf), a table a dead node also reads is the lookup's alone once the
    /// dead node is dropped; a table another live node reads, a small one or another axis stays
    /// tract's `Gather`.
    #[test]
    fn fp32_tables_move_into_their_lookup() {
        let (v, k) = (4096usize, 64usize);
        let values: Vec<f32> = (0..v * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        let gather = |axis: Option<i64>| {
            let mut n = node("Gather", &["t", "ids"], "e");
            if let Some(axis) = axis {
                n.attribute.push(AttributeProto {
                    name: "axis".into(),
                    r#type: tract_onnx::pb::attribute_proto::AttributeType::Int as i32,
                    i: axis,
                    ..Default::default()
                });
            }
            n
        };
        let graph = |nodes: Vec<NodeProto>, rows: usize| GraphProto {
            node: nodes,
            initializer: vec![f32s("t", &[rows as i64, k as i64], &values[..rows * k])],
            input: vec![value("ids", &[1])],
            output: vec![value("e", &[1, k as i64])],
            ..Default::default()
        };
        // read by the lookup and a dead Transpose
        let mut proto = model(graph(vec![gather(None), node("Transpose", &["t"], "dead")], v));
        let packs = pack(&mut proto).unwrap();
        let g = proto.graph.as_ref().unwrap();
        assert!(g.initializer.is_empty() && g.node.len() == 1);
        assert_eq!((g.node[0].op_type.as_str(), &g.node[0].input[..]), (gather::F32_OP_TYPE, &["ids".to_string()][..]));
        let Packing::Table(Table::F32 { bytes, rows, k: cols }) = &packs.0["e"] else { panic!("{:?}", packs.0["e"]) };
        assert_eq!((*rows, *cols), (v, k));
        assert_eq!(**bytes, values.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>());
        assert!(pack(&mut model(graph(vec![gather(Some(-2))], v))).unwrap().0.contains_key("e"));
        // left to tract: another live reader, another axis, a table under the size
        let mut read_twice = graph(vec![gather(None), node("Transpose", &["t"], "tt")], v);
        read_twice.output.push(value("tt", &[k as i64, v as i64]));
        for g in [read_twice, graph(vec![gather(Some(1))], v), graph(vec![gather(None)], 8)] {
            let mut proto = model(g);
            assert!(pack(&mut proto).unwrap().0.is_empty());
            assert_eq!(proto.graph.as_ref().unwrap().node[0].op_type, "Gather");
            assert!(!proto.graph.as_ref().unwrap().initializer[0].raw_data.is_empty());
        }
    }
}
