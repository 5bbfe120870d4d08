//! ONNX bytes -> a tract plan, optimized once at load with symbolic lengths.
//!
//! Sequence (S) and past (P) lengths stay symbols, so one optimized plan serves the prefill
//! (S = prompt, P = 0) and every decode step (S = 1, P = tokens so far): never re-optimized.

use std::sync::Arc;

use prost::Message;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::RunOptions;
use tract_onnx::tract_hir::infer::Factoid;
#[cfg(not(target_arch = "wasm32"))]
use tract_linalg::multithread::Executor;

use crate::clock::now_ms;
use crate::convention::Convention;
use crate::error::{Error, Result};
use crate::fold;
use crate::fused;
use crate::normalize;
use crate::pow;
use crate::prefold;
use crate::qmatmul;

pub type Plan = Arc<TypedSimplePlan>;

/// What the engine needs to know of a graph besides its plan.
#[derive(Debug, Clone)]
pub struct Graph {
    pub plan: Plan,
    /// The file's inputs and outputs.
    pub conv: Convention,
    /// The plan's: the file's, less the past inputs and present outputs when the attention ops
    /// keep the cache (`caches`).
    pub io: Convention,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// The cache's element type, as the file declares its past inputs: F32, or F16 in an FP16
    /// export whose cache is FP16 too (transformers.js's fp16 and q4f16 files).
    pub cache_dt: DatumType,
    /// The logits' last axis, where the graph says it: token ids fed must be below it.
    pub vocab: Option<usize>,
    pub nodes: usize,
    /// Milliseconds spent in each load phase, in order (parse, into_typed, declutter, fold,
    /// optimize, fold again, plan): where a slow load goes.
    pub phases: Vec<(&'static str, f64)>,
    /// Block-quantized weights dequantized before tract (prefold.rs).
    pub prefolded: usize,
    /// Weight products moved onto our int8 kernels (qmatmul/): the distilgpt2 study's dynamic
    /// quantization, q8b32's blocks and ONNX Runtime's `MatMulNBits`.
    pub fused: usize,
    /// Embedding lookups on q8b32's blocks (qmatmul/gather.rs), where the table was dequantized
    /// to FP32 at load before.
    pub block_lookups: usize,
    /// Which of those kernels run, e.g. "25 x dynamic-quant avx512vnni" (None: none fused).
    pub kernels: Option<String>,
    /// Nodes on our ops (fused/).
    pub fused_ops: fused::Counts,
    /// The plan computes the logits of the last position only (last_row.rs).
    pub last_logits_only: bool,
    /// Per layer, the plan node whose attention op keeps that layer's key/value cache in its
    /// state, grown in place (fused/attention.rs); empty when the cache goes through the graph's
    /// past inputs and present outputs.
    pub caches: Vec<usize>,
    /// The threads a session's products are cut across (qmatmul/split); natively tract's own
    /// executor gets as many.
    pub threads: usize,
}

impl Graph {
    /// Every layer's cache is kept in its attention op's state (`caches`).
    pub fn cache_in_ops(&self) -> bool {
        !self.caches.is_empty()
    }
}

/// How to prepare the graph (the defaults are the fast path; the others exist to test it).
#[derive(Debug, Clone, Copy)]
pub struct Prepare {
    pub fold_constants: bool,
    pub optimize: bool,
    /// Threads for the matrix products (1: none spawned).
    pub threads: usize,
    /// Run `quantize_dynamic`'s products on our int8 kernels (qmatmul/) rather than tract's
    /// generic integer matmul.
    pub int8_kernels: bool,
    /// Attention's products and GPT-2's GELU on ops of our own (fused/) rather than tract's
    /// packed matmuls and element-wise nodes.
    pub fused_ops: bool,
    /// The LM head on the last position only, where its rows are independent (last_row.rs);
    /// false: the logits of every position fed, as the file says.
    pub last_logits_only: bool,
}

impl Default for Prepare {
    fn default() -> Self {
        Prepare { fold_constants: true, optimize: true, threads: 1, int8_kernels: true, fused_ops: true, last_logits_only: true }
    }
}

fn names<F: Fact + Clone + 'static, O>(model: &tract_onnx::tract_core::model::Graph<F, O>) -> Result<(Vec<String>, Vec<String>)>
where
    O: std::fmt::Debug + std::fmt::Display + AsRef<dyn Op> + AsMut<dyn Op> + Clone + 'static,
{
    let ins = model.input_outlets().map_err(Error::run)?;
    let outs = model.output_outlets().map_err(Error::run)?;
    let ins = ins.iter().map(|o| model.node(o.node).name.clone()).collect();
    let outs = outs
        .iter()
        .map(|o| model.outlet_label(*o).unwrap_or(&model.node(o.node).name).to_string())
        .collect();
    Ok((ins, outs))
}

/// A cache input's declared (batch, kv_heads, past, head_dim): kv_heads and head_dim must be
/// numbers in the file, or be given (`hint`, from the manifest).
fn cache_dims(model: &InferenceModel, ix: usize, hint: Option<(usize, usize)>) -> Result<(usize, usize)> {
    if let Some(h) = hint {
        return Ok(h);
    }
    let fact = model.input_fact(ix).map_err(Error::run)?;
    let dim = |axis: usize| -> Option<usize> {
        let d = fact.shape.dims().nth(axis)?.concretize()?;
        d.to_i64().ok().map(|v| v as usize)
    };
    match (fact.shape.rank().concretize(), dim(1), dim(3)) {
        (Some(4), Some(kv), Some(hd)) => Ok((kv, hd)),
        _ => Err(Error::UnsupportedGraph(format!(
            "cache input {ix} should be (batch, kv_heads, past, head_dim) with numeric kv_heads and \
             head_dim; found {fact:?}"
        ))),
    }
}

/// The element type a past input declares: F32 (or undeclared), or F16.
fn cache_type(model: &InferenceModel, ix: usize) -> Result<DatumType> {
    let fact = model.input_fact(ix).map_err(Error::run)?;
    match fact.datum_type.concretize() {
        None => Ok(f32::datum_type()),
        Some(dt) if dt == f32::datum_type() || dt == f16::datum_type() => Ok(dt),
        Some(dt) => Err(Error::UnsupportedGraph(format!(
            "cache input {ix} is of type {dt:?}; this engine supports float32 and float16 caches"
        ))),
    }
}

/// An ONNX file's bytes, wherever they lie: in memory (`Vec<u8>`), or in a JS array that the
/// wasm engine reads in chunks (src/wasm.rs). Decoding consumes them: the protobuf holds its own
/// copy of every weight and tract will make another, so the file's bytes must not stay beside
/// them (wasm memory never shrinks).
pub trait OnnxBytes {
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Hex, lower case.
    fn sha256(&self) -> String;
    fn decode(self) -> Result<tract_onnx::pb::ModelProto>;
}

impl OnnxBytes for Vec<u8> {
    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }

    fn sha256(&self) -> String {
        crate::manifest::sha256_hex(self)
    }

    /// Straight from the bytes: tract's `proto_model_for_read` first copies them into a vector
    /// grown by doubling, which held up to 3x the file at once.
    fn decode(self) -> Result<tract_onnx::pb::ModelProto> {
        decode_proto(&self[..])
    }
}

/// A protobuf from any `Buf` (bytes in memory, or chunks of a JS array or of wasm memory).
///
/// As prost's own decoding, except for the `raw_data` of initializers of 8 MiB or more, which is
/// copied once into its vector. prost reads a bytes field through `Buf::copy_to_bytes`, a copy
/// of its own, then copies that into the vector, both copies alive at once. For SmolLM2's 28 MB
/// embedding table, at the start of the file, that set the peak of a load from the page's
/// `ModelFile` (all of the file still in wasm memory then, and wasm memory keeps its peak):
/// 202 MiB after load, 175 with one copy (src/file_parts.rs; docs/decisions.md, "Memory at
/// load").
pub fn decode_proto(mut buf: impl prost::bytes::Buf) -> Result<tract_onnx::pb::ModelProto> {
    use prost::bytes::Buf;
    use tract_onnx::pb::{GraphProto, ModelProto, TensorProto};
    // ONNX's field numbers: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data
    const GRAPH: u32 = 7;
    const INITIALIZER: u32 = 5;
    const RAW_DATA: u32 = 9;
    // tensors this large are copied once (an embedding table); smaller ones as prost does
    const ONE_COPY_FROM: usize = 8 << 20;
    let mut model = ModelProto::default();
    fields(&mut model, &mut buf, GRAPH, |model, g| {
        let graph = model.graph.get_or_insert_with(GraphProto::default);
        fields(graph, g, INITIALIZER, |graph, t| {
            let mut tensor = TensorProto::default();
            fields(&mut tensor, t, RAW_DATA, |tensor, raw| {
                let n = raw.remaining();
                tensor.raw_data = if n >= ONE_COPY_FROM {
                    let mut one = Vec::with_capacity(n);
                    while raw.has_remaining() {
                        let k = raw.chunk().len();
                        one.extend_from_slice(raw.chunk());
                        raw.advance(k);
                    }
                    one
                } else {
                    // prost's two copies: the holes the first ones leave are where the
                    // packings of qmatmul/packs.rs then fit (one copy for every tensor: 205 MiB
                    // after load, against 174)
                    raw.copy_to_bytes(n).to_vec()
                };
                Ok(())
            })?;
            graph.initializer.push(tensor);
            Ok(())
        })
    })?;
    Ok(model)
}

/// The fields of a message `msg` in `buf`, merged as prost does, except the length-delimited
/// field number `own`, whose bytes `read` takes (all of them).
fn fields<M: Message, B: prost::bytes::Buf>(
    msg: &mut M,
    buf: &mut B,
    own: u32,
    mut read: impl FnMut(&mut M, &mut prost::bytes::buf::Take<&mut B>) -> Result<()>,
) -> Result<()> {
    use prost::encoding::{decode_key, decode_varint, DecodeContext, WireType};
    let err = |e: prost::DecodeError| Error::Onnx(e.to_string());
    while buf.has_remaining() {
        let (tag, wire) = decode_key(buf).map_err(err)?;
        if tag != own || wire != WireType::LengthDelimited {
            msg.merge_field(tag, wire, buf, DecodeContext::default()).map_err(err)?;
            continue;
        }
        let len = decode_varint(buf).map_err(err)?;
        if len > buf.remaining() as u64 {
            return Err(Error::Onnx(format!("a field of {len} bytes where {} are left (a truncated file?)", buf.remaining())));
        }
        read(msg, &mut <&mut B as prost::bytes::Buf>::take(&mut *buf, len as usize))?;
    }
    Ok(())
}

/// The op types this engine's rewrites write into a graph (qmatmul/, fused/) are its own, never
/// ONNX: a file that names one is refused before they run. Their builders trust what the
/// rewrites checked (shapes, a K and N above 0, block sizes), which a file could otherwise
/// bypass. Subgraphs (`If`, `Loop`, `Scan` bodies) and functions are searched too.
fn refuse_own_ops(proto: &tract_onnx::pb::ModelProto) -> Result<()> {
    use tract_onnx::pb::{GraphProto, NodeProto};
    fn check(nodes: &[NodeProto]) -> Result<()> {
        for n in nodes {
            if n.op_type.starts_with("Wasmlm") {
                return Err(Error::UnsupportedGraph(format!(
                    "node {:?} has op type {}: that name is this engine's own (its rewrites make such nodes), \
                     not an ONNX operator, and is refused in an input file", n.name, n.op_type)));
            }
            for a in &n.attribute {
                for g in a.g.iter().chain(&a.graphs) {
                    graph(g)?;
                }
            }
        }
        Ok(())
    }
    fn graph(g: &GraphProto) -> Result<()> {
        check(&g.node)
    }
    if let Some(g) = &proto.graph {
        graph(g)?;
    }
    for f in &proto.functions {
        check(&f.node)?;
    }
    Ok(())
}

/// The most elements a tensor whose shape the file gives as a constant may have (8 GiB of f32):
/// a decoder's masks and caches are far smaller, and its weights are initializers, whose size is
/// the file's own.
pub const MAX_CONSTANT_SHAPE: u64 = 1 << 31;

/// `ConstantOfShape` and `Expand` nodes whose shape is a constant of the file (an initializer or
/// a `Constant` node) are refused when that shape holds more than [`MAX_CONSTANT_SHAPE`]
/// elements or overflows: a constant subgraph is evaluated while the plan is prepared (tract's
/// declutter, our constant folding), so such a tensor would be allocated before any check on
/// the typed graph. Shapes computed from the inputs are bounded by the context.
fn bound_constant_shapes(proto: &tract_onnx::pb::ModelProto) -> Result<()> {
    use std::collections::HashMap;
    use tract_onnx::pb::TensorProto;
    let Some(g) = &proto.graph else { return Ok(()) };
    // int64 tensors' values, by name (ONNX's int64 is data_type 7; raw_data little-endian)
    let ints = |t: &TensorProto| -> Option<Vec<i64>> {
        (t.data_type == 7).then(|| {
            if t.raw_data.is_empty() {
                t.int64_data.clone()
            } else {
                t.raw_data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
            }
        })
    };
    let mut consts: HashMap<&str, Vec<i64>> = g.initializer.iter().filter_map(|t| Some((t.name.as_str(), ints(t)?))).collect();
    for n in g.node.iter().filter(|n| n.op_type == "Constant") {
        if let (Some(out), Some(v)) = (n.output.first(), n.attribute.iter().find(|a| a.name == "value").and_then(|a| ints(a.t.as_ref()?))) {
            consts.insert(out.as_str(), v);
        }
    }
    for n in &g.node {
        let shape = match n.op_type.as_str() {
            "ConstantOfShape" => n.input.first(),
            "Expand" => n.input.get(1),
            _ => None,
        };
        let Some(dims) = shape.and_then(|i| consts.get(i.as_str())) else { continue };
        let elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(u64::try_from(d).ok()?));
        if elements.is_none_or(|e| e > MAX_CONSTANT_SHAPE) {
            return Err(Error::UnsupportedGraph(format!(
                "node {:?} ({}) makes a tensor of shape {dims:?}: more than {MAX_CONSTANT_SHAPE} elements, refused",
                n.name, n.op_type)));
        }
    }
    Ok(())
}

/// Parse, type with symbolic S and P, fold constants, optimize, plan.
pub fn load(bytes: impl OnnxBytes, kv_hint: Option<(usize, usize)>, prep: Prepare) -> Result<Graph> {
    // INT8 files from quantize_dynamic carry value_info with their own symbols that clash with
    // ours (docs/decisions.md, "ONNX files: value_info is ignored"): ignore it, and the declared output shapes too; tract infers both.
    let mut phases = Phases::start();
    let mut onnx = tract_onnx::onnx().with_ignore_value_info(true).with_ignore_output_shapes(true);
    qmatmul::register(&mut onnx);
    fused::register(&mut onnx);
    // an empty protobuf is a valid, empty ModelProto: say what was given, not "no graph"
    if bytes.len() == 0 {
        return Err(Error::Onnx("the file is empty (0 bytes)".into()));
    }
    let mut proto = bytes.decode()?;
    // external data not read in by the caller (external.rs): refused with the side files' names
    crate::external::inline(&mut proto, &vec![])?;
    refuse_own_ops(&proto)?;
    bound_constant_shapes(&proto)?;
    pow::cube_powers(&mut proto);
    normalize::group_query_attention(&mut proto);
    normalize::half_gemms(&mut proto);
    let (dynamic, (blocks, block_lookups), nbits) = if prep.int8_kernels {
        (qmatmul::rewrite::fuse(&mut proto), qmatmul::rewrite::fuse_blocks(&mut proto), {
            qmatmul::nbits::from_dequantized_heads(&mut proto);
            qmatmul::nbits::fuse(&mut proto).map_err(Error::UnsupportedGraph)?
        })
    } else {
        (0, (0, 0), 0)
    };
    let prefolded = if prep.fold_constants { prefold::dequantize_block_weights(&mut proto) } else { 0 };
    if prep.fused_ops {
        fused::rewrite(&mut proto);
    }
    phases.mark("parse");
    // the protobuf decoded: what tract refuses now is an op or a shape
    let mut model = qmatmul::packs::parse(&onnx, proto)?;
    phases.mark("pack, to tract");
    let (ins, outs) = names(&model)?;
    let conv = Convention::discover(&ins, &outs)?;
    let s = model.symbols.sym("S");
    let p = model.symbols.sym("P");
    let set = |m: &mut InferenceModel, ix: usize, fact: InferenceFact| {
        m.set_input_fact(ix, fact).map_err(|e| Error::UnsupportedGraph(format!("input {ix}: {e:#}")))
    };
    set(&mut model, conv.input_ids, i64::fact([1.to_dim(), s.to_dim()]).into())?;
    if let Some(ix) = conv.attention_mask {
        set(&mut model, ix, i64::fact([1.to_dim(), p.to_dim() + s.to_dim()]).into())?;
    }
    if let Some(ix) = conv.position_ids {
        set(&mut model, ix, i64::fact([1.to_dim(), s.to_dim()]).into())?;
    }
    let (kv_heads, head_dim) = match conv.past.first() {
        Some(&(k, _)) => cache_dims(&model, k, kv_hint)?,
        None => kv_hint.unwrap_or((0, 0)),
    };
    let cache_dt = match conv.past.first() {
        Some(&(k, _)) => cache_type(&model, k)?,
        None => f32::datum_type(),
    };
    for &(k, v) in &conv.past {
        for ix in [k, v] {
            let shape = [1.to_dim(), kv_heads.to_dim(), p.to_dim(), head_dim.to_dim()];
            set(&mut model, ix, InferenceFact::dt_shape(cache_dt, shape))?;
        }
    }
    let (typed, last_logits_only) = prepare(model, prep, &mut phases)?;
    let (plan_ins, plan_outs) = names(&typed)?;
    let io = Convention::discover(&plan_ins, &plan_outs)?;
    let caches = cache_nodes(&typed, &conv, &ins)?;
    let vocab = typed.output_fact(io.logits).ok().and_then(|f| f.shape.last()?.as_i64().map(|v| v as usize));
    let nodes = typed.nodes.len();
    let kernels = qmatmul::describe(&typed);
    let fused_ops = fused::count(&typed);
    let options = run_options(prep)?;
    let plan = typed.into_runnable_with_options(&options).map_err(|e| Error::Optimize(format!("{e:#}")))?;
    phases.mark("plan");
    Ok(Graph { plan, conv, io, kv_heads, head_dim, cache_dt, vocab, nodes, phases: phases.done, prefolded, fused: dynamic + blocks + nbits, block_lookups, kernels, fused_ops, last_logits_only, caches,
               threads: prep.threads.max(1) })
}

/// Per layer, the node of the attention op that took over the layer's past keys (by the input's
/// name); none when no op did. A plan that lost the past inputs keeps every layer's cache.
fn cache_nodes(typed: &TypedModel, conv: &Convention, ins: &[String]) -> Result<Vec<usize>> {
    use fused::attention::Attention;
    let owner = |input: &str| {
        typed.nodes.iter().find(|n| n.op_as::<Attention>().and_then(|a| a.cache.as_ref()).is_some_and(|c| c.input == input)).map(|n| n.id)
    };
    let found: Vec<Option<usize>> = conv.past.iter().map(|&(k, _)| owner(&ins[k])).collect();
    match found.iter().flatten().count() {
        0 => Ok(vec![]),
        n if n == conv.layers() => Ok(found.into_iter().flatten().collect()),
        n => Err(Error::UnsupportedGraph(format!("the attention ops keep the cache of {n} of {} layers", conv.layers()))),
    }
}

/// Natively, tract's own ops get a rayon pool of `threads` (its f32 matmuls use it), but not its
/// element-wise ops: tract cuts those across the pool from 32,768 values, and a prefill's SiLU
/// then waited on cores our product helpers spin on (qmatmul/split/team.rs) between products.
/// SmolLM2's `ort-dynamic-qint8` file, a 32-token prefill at 2 threads (`wasmlm profile`): SiLU
/// took 0.73-1.06 ms, against 0.35 on one thread and 0.43 with the pool left out.
#[cfg(not(target_arch = "wasm32"))]
fn run_options(prep: Prepare) -> Result<RunOptions> {
    let mut options = RunOptions::default();
    if prep.threads > 1 {
        tract_linalg::multithread::set_threading_element_threshold(usize::MAX);
        options.executor = Some(Executor::multithread(prep.threads));
    }
    Ok(options)
}

#[cfg(all(target_arch = "wasm32", not(feature = "threads")))]
fn run_options(prep: Prepare) -> Result<RunOptions> {
    if prep.threads > 1 {
        return Err(Error::Optimize("this WebAssembly build runs on one thread".into()));
    }
    Ok(RunOptions::default())
}

/// The threaded wasm build: tract's own ops stay on this thread (its executor would share
/// rayon's pool, whose workers are our product helpers there: qmatmul/split/team.rs); the
/// products are cut across `threads` (the session's step runs under split::with_threads).
#[cfg(all(target_arch = "wasm32", feature = "threads"))]
fn run_options(prep: Prepare) -> Result<RunOptions> {
    if prep.threads > 1 {
        crate::qmatmul::split::team::helpers_available(prep.threads).map_err(Error::Optimize)?;
    }
    Ok(RunOptions::default())
}

struct Phases {
    last: Option<f64>,
    done: Vec<(&'static str, f64)>,
}

impl Phases {
    fn start() -> Phases {
        Phases { last: Some(now_ms()), done: vec![] }
    }

    fn mark(&mut self, name: &'static str) {
        let now = now_ms();
        self.done.push((name, now - self.last.unwrap_or(now)));
        self.last = Some(now);
    }
}

/// The typed model, and whether its logits were cut to the last position.
fn prepare(model: InferenceModel, prep: Prepare, phases: &mut Phases) -> Result<(TypedModel, bool)> {
    let opt = |e: TractError| Error::Optimize(format!("{e:#}"));
    let mut typed = model.into_typed().map_err(opt)?;
    phases.mark("into_typed");
    typed.declutter().map_err(opt)?;
    if prep.fused_ops {
        fused::sdpa::move_scales(&mut typed).map_err(opt)?;
        fused::matmul::absorb_kv_repeats(&mut typed).map_err(opt)?;
        fused::rope::fuse(&mut typed).map_err(opt)?;
        fused::attention::fuse(&mut typed).map_err(opt)?;
    }
    let mut cut = false;
    if prep.last_logits_only {
        let (ins, outs) = names(&typed)?;
        let logits = typed.output_outlets().map_err(Error::run)?[Convention::discover(&ins, &outs)?.logits];
        cut = crate::last_row::cut(&mut typed, logits).map_err(opt)?;
    }
    phases.mark("declutter");
    if prep.fold_constants {
        fold::fold_all_constants(&mut typed).map_err(opt)?;
        phases.mark("fold");
    }
    if prep.optimize {
        typed.optimize().map_err(opt)?;
        if prep.fused_ops {
            fused::binary::fuse(&mut typed).map_err(opt)?;
        }
        phases.mark("optimize");
        if prep.fold_constants {
            // codegen may leave constant-only work (weight packing) in the plan: fold it too.
            fold::fold_all_constants(&mut typed).map_err(opt)?;
            phases.mark("fold again");
        }
    }
    Ok((typed, cut))
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use tract_onnx::pb::{GraphProto, ModelProto, NodeProto, TensorProto};

    /// `decode_proto` reads what prost reads: tensors with their bytes and other fields, a field
    /// it does not know, a graph given in pieces (merged) and a tensor's bytes given twice (the
    /// last kept); and it refuses a truncated file.
    #[test]
    fn decode_proto_equals_prosts() {
        let tensor = |name: &str, n: usize| TensorProto {
            name: name.into(), data_type: 2, dims: vec![n as i64], raw_data: (0..n).map(|i| (i * 13) as u8).collect(),
            doc_string: "d".into(), ..Default::default()
        };
        let node = NodeProto { op_type: "Add".into(), input: vec!["a".into(), "b".into()], output: vec!["c".into()], ..Default::default() };
        let one = ModelProto {
            ir_version: 8, producer_name: "p".into(),
            graph: Some(GraphProto { name: "g".into(), node: vec![node.clone()], initializer: vec![tensor("a", 300), tensor("e", 0)], ..Default::default() }),
            ..Default::default()
        };
        let two = ModelProto {
            graph: Some(GraphProto { node: vec![node], initializer: vec![tensor("b", 70_000)], ..Default::default() }),
            model_version: 3, ..Default::default()
        };
        let mut bytes = one.encode_to_vec();
        bytes.extend(two.encode_to_vec());
        // an unknown field at the top (number 1000, a varint)
        bytes.extend([0xc0, 0x3e, 0x05]);
        let ours = super::decode_proto(&bytes[..]).unwrap();
        assert_eq!(ours, ModelProto::decode(&bytes[..]).unwrap());
        assert_eq!(ours.graph.as_ref().unwrap().initializer.len(), 3);
        // a tensor whose raw_data comes twice (the last wins), in a third piece of the graph
        let field = |tag: u8, payload: &[u8]| {
            let mut out = vec![tag];
            prost::encoding::encode_varint(payload.len() as u64, &mut out);
            out.extend_from_slice(payload);
            out
        };
        let mut twice = tensor("f", 4).encode_to_vec();
        twice.extend(field(0x4a, &[9, 9])); // field 9 (raw_data), length-delimited
        let mut more = bytes.clone();
        more.extend(field(0x3a, &field(0x2a, &twice))); // graph (7) holding an initializer (5)
        let ours = super::decode_proto(&more[..]).unwrap();
        assert_eq!(ours, ModelProto::decode(&more[..]).unwrap());
        assert_eq!(ours.graph.unwrap().initializer[3].raw_data, vec![9, 9]);
        for cut in [1, 10, bytes.len() / 2, bytes.len() - 1] {
            assert!(super::decode_proto(&bytes[..cut]).is_err(), "cut at {cut}");
            assert!(ModelProto::decode(&bytes[..cut]).is_err(), "prost, cut at {cut}");
        }
    }
}
