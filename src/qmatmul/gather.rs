//! Embedding lookups on tables tract never holds.
//!
//! A `q8b32` file's on its INT8 blocks: `Gather(R, ids)` along axis 0, where `R =
//! Reshape(Mul(Cast(q), Cast(s)), [V, K])` is the block-dequantized table (prefold.rs), becomes
//! `WasmlmBlockQ8Gather(ids, q, s)` ([`super::rewrite::fuse_blocks`]). Before, the whole table
//! was dequantized to FP32 at load for a lookup of one row per token: SmolLM2's 49152 x 576 tied
//! table held 113 MB of FP32 beside its 28 MB of INT8 blocks (which the LM head reads), and took
//! ~90 ms to compute natively. Each row is now computed when it is looked up, with the same f32
//! product as the dequantization (`q as f32 * s as f32`), so the values are identical.
//!
//! Other files' FP32 tables (`quantize_dynamic`'s and MatMulNBits' files keep the embedding in
//! FP32): a `Gather` along axis 0 of a large FP32 initializer that nothing else reads becomes
//! `WasmlmF32Gather(ids)` ([`super::packs::pack`]), whose table is the initializer's bytes, moved
//! out of the protobuf. tract copied them into a tensor of its own while the protobuf was alive:
//! two copies of 113 MB at the load's peak, which wasm memory keeps.

use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use super::blockq8::BLOCK;
use super::kernel::{K_ALIGN, PANEL};
use super::packs::BlockWeights;

/// The op name [`super::rewrite::fuse_blocks`] writes.
pub const OP_TYPE: &str = "WasmlmBlockQ8Gather";
/// The op name [`super::packs::pack`] writes for a lookup in an FP32 table.
pub const F32_OP_TYPE: &str = "WasmlmF32Gather";

/// Tables smaller than this are left to tract's `Gather` (a position table, a small vocabulary).
pub const F32_MIN_BYTES: usize = 1 << 20;

pub(super) fn build(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    // the table comes from packs::attach, once the model is parsed
    ensure!(node.input.len() == 1, "{} takes ids once its table is packed (qmatmul/packs.rs)", node.op_type);
    Ok((expand(Expansion { table: None, op_type: if node.op_type == F32_OP_TYPE { F32_OP_TYPE } else { OP_TYPE } }), vec![]))
}

/// The op for [`super::packs::attach`] to put in the parsed model.
pub(super) fn expansion(table: Table) -> Box<dyn InferenceOp> {
    let op_type = table.op_type();
    expand(Expansion { table: Some(table), op_type })
}

/// A table the lookups read.
#[derive(Debug, Clone)]
pub enum Table {
    /// Packed as an LM head reads it (`nk`), one column per row of the table (shared with the
    /// LM head that reads the same table).
    Blocks(BlockWeights),
    /// `rows` x `k` f32, little-endian, as the initializer held them.
    F32 { bytes: Arc<Vec<u8>>, rows: usize, k: usize },
}

impl Table {
    fn op_type(&self) -> &'static str {
        match self {
            Table::Blocks(_) => OP_TYPE,
            Table::F32 { .. } => F32_OP_TYPE,
        }
    }

    pub fn rows(&self) -> usize {
        match self {
            Table::Blocks(t) => t.w.cols,
            Table::F32 { rows, .. } => *rows,
        }
    }

    pub fn k(&self) -> usize {
        match self {
            Table::Blocks(t) => t.w.k,
            Table::F32 { k, .. } => *k,
        }
    }
}

/// ids (any integer type or TDim, any shape) -> (ids' shape…, K) f32.
#[derive(Debug, Clone)]
struct Expansion {
    table: Option<Table>,
    op_type: &'static str,
}

impl Expansion {
    fn table(&self) -> TractResult<&Table> {
        self.table.as_ref().with_context(|| format!("{}: its table was never attached", self.op_type))
    }
}

impl tract_onnx::tract_hir::ops::expandable::Expansion for Expansion {
    fn name(&self) -> StaticName {
        self.op_type.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> TractResult<()> {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        let k = self.table()?.k() as i64;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].rank, inputs[0].rank.bex() + 1)?;
        s.given(&inputs[0].rank, move |s, rank| {
            let rank = rank as usize;
            for i in 0..rank {
                s.equals(&outputs[0].shape[i], &inputs[0].shape[i])?;
            }
            s.equals(&outputs[0].shape[rank], k.to_dim())
        })
    }

    fn wire(&self, prefix: &str, target: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let ids = target.outlet_fact(inputs[0])?.datum_type;
        // TDim: positions computed from the symbolic length (GPT-2's position table)
        ensure!(ids.is_integer() || ids == TDim::datum_type(), "{prefix}: ids must be integers, found {ids:?}");
        let op = TableGather { table: self.table()?.clone() };
        target.wire_node(prefix, op, &[inputs[0]])
    }
}

#[derive(Debug, Clone)]
pub struct TableGather {
    pub table: Table,
}

impl PartialEq for TableGather {
    fn eq(&self, other: &Self) -> bool {
        match (&self.table, &other.table) {
            (Table::Blocks(a), Table::Blocks(b)) => Arc::ptr_eq(&a.w, &b.w),
            (Table::F32 { bytes: a, .. }, Table::F32 { bytes: b, .. }) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}
impl Eq for TableGather {}

impl TableGather {
    pub fn rows(&self) -> usize {
        self.table.rows()
    }

    pub fn k(&self) -> usize {
        self.table.k()
    }

    /// Row `id` of the table into `out` (K values). ONNX's Gather: -rows..rows.
    pub fn row(&self, id: i64, out: &mut [f32]) -> TractResult<()> {
        let rows = self.rows();
        let r = if id < 0 { id + rows as i64 } else { id };
        ensure!((0..rows as i64).contains(&r), "{}: index {id} out of range for {rows} rows", self.table.op_type());
        let r = r as usize;
        match &self.table {
            // column r of the packing: runs of K_ALIGN weights, one per chunk of its panel, and
            // its scales one per block in the panel's order (kernel.rs, blockq8.rs)
            Table::Blocks(t) => {
                let w = &*t.w;
                let (p, j) = (r / PANEL, r % PANEL);
                let kbp = w.kp / BLOCK;
                for (b, o) in out[..w.k].chunks_exact_mut(BLOCK).enumerate() {
                    let (kc, off) = (b * BLOCK / K_ALIGN, b * BLOCK % K_ALIGN);
                    let at = ((p * w.kp / K_ALIGN + kc) * PANEL + j) * K_ALIGN + off;
                    let s = t.scales[(p * kbp + b) * PANEL + j];
                    for (o, &q) in o.iter_mut().zip(&w.w[at..at + BLOCK]) {
                        *o = q as f32 * s;
                    }
                }
            }
            Table::F32 { bytes, k, .. } => {
                for (o, b) in out[..*k].iter_mut().zip(bytes[r * k * 4..(r + 1) * k * 4].chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
        }
        Ok(())
    }
}

impl Op for TableGather {
    fn name(&self) -> StaticName {
        self.table.op_type().into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("rows={} K={}", self.rows(), self.k())])
    }

    op_as_typed_op!();
}

impl EvalOp for TableGather {
    op_out_of_plan!();

    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let ids = args_1!(inputs);
        // TDim positions are expressions of the session's lengths: resolved first
        let ids = if ids.datum_type() == TDim::datum_type() {
            let dims = ids.try_as_plain_ram()?;
            let values: Vec<i64> =
                dims.as_slice::<TDim>()?.iter().map(|d| Ok(d.eval(ctx.symbols).to_i64()?)).collect::<TractResult<_>>()?;
            std::borrow::Cow::Owned(Tensor::from_shape(ids.shape(), &values)?)
        } else {
            ids.cast_to::<i64>()?
        };
        let mut shape: TVec<usize> = ids.shape().into();
        shape.push(self.k());
        let mut out = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        if self.k() > 0 {
            let iv = ids.try_as_plain_ram()?;
            let mut ov = out.try_as_plain_ram_mut()?;
            for (&id, row) in iv.as_slice::<i64>()?.iter().zip(ov.as_slice_mut::<f32>()?.chunks_exact_mut(self.k())) {
                self.row(id, row)?;
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for TableGather {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.to_tvec();
        shape.push(self.k().to_dim());
        Ok(tvec!(f32::fact(&shape)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows equal the table dequantized as prefold.rs does (q as f32 times the block's scale,
    /// bit for bit), negative ids count from the end, and an id out of range is an error.
    #[test]
    fn rows_equal_the_dequantized_table() {
        let (rows, k) = (5, 96);
        let q: Vec<i8> = (0..rows * k).map(|i| (i * 37 % 255) as u8 as i8).collect();
        let scales: Vec<f32> = (0..rows * k / BLOCK).map(|i| 0.013 * (i as f32 + 1.0)).collect();
        let w = super::super::kernel::PackedI8::from_n_by_k(&q, k, rows);
        let packed = super::super::blockq8::panel_scales(k, rows, |c, b| scales[c * (k / BLOCK) + b]);
        let op = TableGather { table: Table::Blocks(BlockWeights { w: Arc::new(w), scales: Arc::new(packed) }) };
        let ids = tensor2(&[[3i64, -1], [0, 4]]);
        let out = op.eval(&EvalContext::out_of_plan(), tvec!(ids.into_tvalue())).unwrap().remove(0);
        assert_eq!(out.shape(), &[2, 2, k]);
        let out = out.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        for (slot, r) in [3usize, 4, 0, 4].into_iter().enumerate() {
            for j in 0..k {
                let want = q[r * k + j] as f32 * scales[r * (k / BLOCK) + j / BLOCK];
                assert_eq!(out[slot * k + j].to_bits(), want.to_bits(), "row {r} col {j}");
            }
        }
        for bad in [5i64, -6] {
            let e = op.eval(&EvalContext::out_of_plan(), tvec!(tensor1(&[bad]).into_tvalue()));
            assert!(format!("{:?}", e.unwrap_err()).contains("out of range"), "{bad}");
        }
    }

    /// An FP32 table's rows are its bytes, bit for bit (NaN and -0 included), through the ids'
    /// shape; negative ids count from the end, and an id out of range is an error.
    #[test]
    fn f32_rows_are_the_tables_bytes() {
        let (rows, k) = (6, 5);
        let mut v: Vec<f32> = (0..rows * k).map(|i| i as f32 * 1.25 - 7.0).collect();
        (v[3], v[7]) = (f32::NAN, -0.0);
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let op = TableGather { table: Table::F32 { bytes: Arc::new(bytes), rows, k } };
        assert_eq!(op.name(), F32_OP_TYPE);
        let out = op.eval(&EvalContext::out_of_plan(), tvec!(tensor2(&[[0i32, -5], [5, 1]]).into_tvalue())).unwrap().remove(0);
        assert_eq!(out.shape(), &[2, 2, k]);
        let got: Vec<u32> = out.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().iter().map(|x| x.to_bits()).collect();
        let want: Vec<u32> = [0usize, 1, 5, 1].iter().flat_map(|&r| v[r * k..(r + 1) * k].iter().map(|x| x.to_bits())).collect();
        assert_eq!(got, want);
        for bad in [6i64, -7] {
            let e = op.eval(&EvalContext::out_of_plan(), tvec!(tensor1(&[bad]).into_tvalue()));
            assert!(format!("{:?}", e.unwrap_err()).contains("out of range"), "{bad}");
        }
    }
}
