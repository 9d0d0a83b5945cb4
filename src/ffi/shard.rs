//! The C ABI of sharded rounds (tensor and pipeline parallelism, see [`crate::shard`]): a rank's
//! compressor, the collectives of its plans and the parts of a run.
//!
//! Each rank creates the model's compressor, then its shard's (`triattn_compressor_create_shard`),
//! plans and binds as usual, and runs the round in parts: `triattn_binding_run_part(0)`, then for
//! each reduction `k` of `triattn_plan_get_reduction` an all-reduce of the workspace bytes at
//! `offset` (`count` elements of `dtype`, `op`) across its ranks on the same stream, then
//! `triattn_binding_run_part(k + 1)`. A plan of one part runs with `triattn_binding_run` too.

use super::types::{read_versioned, write_versioned, Versioned};
use super::{boundary, non_null, triattn_binding, triattn_compressor, triattn_plan, triattn_status};
use crate::error::Error;
use crate::shard::{ReduceDType, ReduceOp, ReductionKind, ShardLayout};

/// A rank of a tensor- and pipeline-parallel layout.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct triattn_shard {
    /// `sizeof(triattn_shard)`, set by the caller: the ABI version of this struct (checked on entry).
    pub struct_size: u32,
    /// Tensor-parallel ranks: a divisor of the query heads, and a divisor or multiple of the KV
    /// heads (a multiple replicates each KV head on `tp_size / Hkv` ranks).
    pub tp_size: usize,
    /// Pipeline stages.
    pub pp_size: usize,
    /// Layers of each stage (`pp_size` values summing to the model's layers), or NULL for an
    /// even split.
    pub stage_layers: *const usize,
    /// This rank: `pp_rank * tp_size + tp_rank`.
    pub rank: usize,
}

/// What a collective reduces (see `crate::shard::ReductionKind`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum triattn_reduction_kind {
    /// Per layer and slot, the max over a KV group's query heads spread over ranks.
    GroupMax = 0,
    /// Per layer and slot, the sum over a KV group's query heads (group mean).
    GroupSum = 1,
    /// Per KV head and slot, the sum over the layers of every pipeline stage.
    LayerSum = 2,
    /// Per slot, the max over every layer and head of every rank (union mode).
    UnionMax = 3,
}

/// The all-reduce operation (`ncclMax` / `ncclSum`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum triattn_reduce_op {
    /// Element-wise max.
    Max = 0,
    /// Element-wise sum.
    Sum = 1,
}

/// The element type of a reduction buffer (`ncclInt32` / `ncclFloat64`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum triattn_reduce_dtype {
    /// int32: order-preserving keys of float maxima (an integer max is the float max, NaN
    /// propagating).
    I32 = 0,
    /// double: partial sums.
    F64 = 1,
}

/// One collective between two parts of a sharded plan: all-reduce `count` elements of `dtype`
/// at `workspace + offset` with `op`, in place, across ranks `rank_first + i * rank_stride` for
/// `i < rank_count` (this rank among them).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct triattn_reduction {
    /// `sizeof(triattn_reduction)`, set by the caller before the call: the ABI version of this struct (checked on entry).
    pub struct_size: u32,
    /// What it reduces.
    pub kind: triattn_reduction_kind,
    /// The operation.
    pub op: triattn_reduce_op,
    /// The element type.
    pub dtype: triattn_reduce_dtype,
    /// Elements (every sequence of the plan).
    pub count: usize,
    /// Byte offset of the buffer in the binding's workspace.
    pub offset: usize,
    /// Bytes of the buffer (`count` times the element size).
    pub bytes: usize,
    /// The first rank of the group.
    pub rank_first: usize,
    /// Ranks between members of the group.
    pub rank_stride: usize,
    /// Ranks in the group.
    pub rank_count: usize,
}

// SAFETY: `#[repr(C)]` with `struct_size: u32` first.
unsafe impl Versioned for triattn_shard {
    const NAME: &'static str = "triattn_shard";
}
// SAFETY: as above.
unsafe impl Versioned for triattn_reduction {
    const NAME: &'static str = "triattn_reduction";
}

/// The compressor of one rank: the model's compressor `c` restricted to the query heads, KV heads
/// and layers `shard` gives the rank, with the statistics sliced to match. Plans made from it are
/// the rank's (tables of its layers, tensors of its KV heads) and may run in parts around
/// collectives. Host rounds (`triattn_round_host`) refuse it.
///
/// # Safety
/// `c` is a live compressor; `shard` points to a `triattn_shard` (its `stage_layers` NULL or
/// `pp_size` readable values); `out` points to writable storage for a handle.
#[no_mangle]
pub unsafe extern "C" fn triattn_compressor_create_shard(
    c: *const triattn_compressor,
    shard: *const triattn_shard,
    out: *mut *mut triattn_compressor,
) -> triattn_status {
    boundary(|| {
        non_null("compressor", c)?;
        non_null("shard", shard)?;
        non_null("out", out)?;
        // SAFETY: checked non-null; a live handle and a readable struct (caller contract).
        let (c, s) = unsafe { (&*c, read_versioned("shard", shard)?) };
        if let Some(rank) = &c.shard {
            return Err(Error::invalid_argument(
                "compressor",
                "the model's compressor (not a shard's)",
                format!("the compressor of rank {}", rank.rank),
            ));
        }
        let model = &c.scorer.model;
        let layout = if s.stage_layers.is_null() {
            ShardLayout::new(model, s.tp_size, s.pp_size)?
        } else {
            if s.pp_size == 0 {
                return Err(Error::invalid_argument("shard.pp_size", ">= 1", 0));
            }
            // SAFETY: non-null; `pp_size` readable values (caller contract).
            let stages = unsafe { std::slice::from_raw_parts(s.stage_layers, s.pp_size) };
            ShardLayout::with_stage_layers(model, s.tp_size, stages)?
        };
        let rank = layout.shard(s.rank)?;
        let scorer = rank.scorer(&c.scorer)?;
        let handle = Box::into_raw(Box::new(triattn_compressor {
            device: c.device.clone(),
            dispatch: c.dispatch.clone(),
            config: c.config,
            scorer,
            shard: Some(rank),
        }));
        // SAFETY: non-null (checked) and writable (caller contract).
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// The parts a run of `plan` takes: one more than its collectives (1: it runs whole).
///
/// # Safety
/// `plan` is a live plan; `parts` is writable.
#[no_mangle]
pub unsafe extern "C" fn triattn_plan_get_parts(plan: *const triattn_plan, parts: *mut usize) -> triattn_status {
    boundary(|| {
        non_null("plan", plan)?;
        non_null("parts", parts)?;
        // SAFETY: checked non-null; a live handle and writable output (caller contract).
        unsafe { parts.write(super::device::round_plan(&(*plan).inner).parts()) };
        Ok(())
    })
}

/// Collective `k` of `plan` (`k < parts - 1`): what to all-reduce after part `k`.
///
/// # Safety
/// `plan` is a live plan; `out` points to a writable `triattn_reduction` whose `struct_size` is
/// set.
#[no_mangle]
pub unsafe extern "C" fn triattn_plan_get_reduction(
    plan: *const triattn_plan,
    k: usize,
    out: *mut triattn_reduction,
) -> triattn_status {
    boundary(|| {
        non_null("plan", plan)?;
        non_null("out", out)?;
        // SAFETY: checked non-null; a live handle (caller contract).
        let plan = super::device::round_plan(unsafe { &(*plan).inner });
        let region = plan.reduction_region(k)?;
        let r = &plan.reductions()[k];
        let value = triattn_reduction {
            struct_size: std::mem::size_of::<triattn_reduction>() as u32,
            kind: match r.kind {
                ReductionKind::GroupMax => triattn_reduction_kind::GroupMax,
                ReductionKind::GroupSum => triattn_reduction_kind::GroupSum,
                ReductionKind::LayerSum => triattn_reduction_kind::LayerSum,
                ReductionKind::UnionMax => triattn_reduction_kind::UnionMax,
            },
            op: match r.kind.op() {
                ReduceOp::Max => triattn_reduce_op::Max,
                ReduceOp::Sum => triattn_reduce_op::Sum,
            },
            dtype: match r.kind.dtype() {
                ReduceDType::I32 => triattn_reduce_dtype::I32,
                ReduceDType::F64 => triattn_reduce_dtype::F64,
            },
            count: r.len,
            offset: region.offset,
            bytes: region.bytes,
            rank_first: r.ranks[0],
            rank_stride: if r.ranks.len() > 1 { r.ranks[1] - r.ranks[0] } else { 1 },
            rank_count: r.ranks.len(),
        };
        // SAFETY: checked non-null; writable output (caller contract).
        unsafe { write_versioned("out", out, value) }
    })
}

/// Launch part `part` of a sharded round of `binding` on `stream`: nothing but kernel launches
/// (capturable, like `triattn_binding_run`). Part 0 scores, normalises and reduces up to the
/// first collective; part `k + 1` continues after collective `k`; the last part selects and
/// compacts.
///
/// # Safety
/// As `triattn_binding_run`, for parts in order on one workspace; before part `k + 1` the
/// buffer of reduction `k` holds its all-reduce over the reduction's ranks (ordered before it on
/// `stream`).
#[no_mangle]
pub unsafe extern "C" fn triattn_binding_run_part(
    binding: *const triattn_binding,
    round_start_device: *const i64,
    part: usize,
    stream: *mut std::ffi::c_void,
) -> triattn_status {
    boundary(|| {
        non_null("binding", binding)?;
        // SAFETY: checked non-null; a live handle; the rest is the caller's contract.
        unsafe { super::device::run_part(&(*binding).inner, round_start_device, part, stream) }
    })
}
