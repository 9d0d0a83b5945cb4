//! The `reduce` op's host side: [`ReduceSpec`] (validated shape) and, with the `cuda` feature,
//! its launcher on a caller's stream.
//!
//! One launch reduces the per-(layer, head) rows `z` of `num_seqs` sequences of one shape to the
//! rows selection ranks, per sequence exactly [`crate::cpu::reduce::reduce`] followed by the
//! round's `+inf` guards on protected slots (`slot < prefix` or `slot >= window_start`; the
//! prefix per sequence from [`ReduceAddresses::prefixes`] when given).

use crate::error::{ensure, Result};
use crate::policy::{GroupAggregation, SelectionMode};
use crate::variant::{self, Variant};

use super::params::{
    ReduceParams, ReduceShardParams, REDUCE_PER_HEAD, REDUCE_PER_LAYER_PER_HEAD, REDUCE_UNION, SHARD_STEP_FINISH,
    SHARD_STEP_LAYER_SUM, SHARD_STEP_PARTIAL,
};

/// The shape of a `reduce` launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReduceSpec {
    /// Layers L, at least 1.
    pub num_layers: usize,
    /// Attention heads H, a multiple of `num_kv_heads`.
    pub num_heads: usize,
    /// KV heads Hkv, at least 1.
    pub num_kv_heads: usize,
    /// Slots N, at least 1.
    pub len: usize,
    /// Elements between layers of `z`.
    pub layer_stride: usize,
    /// Elements between heads of `z`, `>= len`.
    pub head_stride: usize,
    /// Elements between output rows, `>= len`.
    pub out_stride: usize,
    /// Which rows selection ranks.
    pub mode: SelectionMode,
    /// Per-layer-per-head: max or mean over the group (per-head mode always takes the max).
    pub group: GroupAggregation,
    /// Slots below it get `+inf` (`0..=len`), for every sequence unless
    /// [`ReduceAddresses::prefixes`] gives one per sequence.
    pub prefix: usize,
    /// Slots from it on get `+inf` (`0..=len`; `len` for no window), shared by every sequence.
    pub window_start: usize,
    /// Sequences S of this shape in one launch (the grid's z), `1..=65535`.
    pub num_seqs: usize,
    /// Elements between sequences of `z` (unused when `num_seqs == 1`); `>=` one sequence's
    /// extent otherwise.
    pub z_seq_stride: usize,
    /// Elements between sequences of the output (unused when `num_seqs == 1`); `>=` one
    /// sequence's `(sets - 1) * out_stride + len` otherwise, so sequences do not overlap.
    pub out_seq_stride: usize,
}

/// Addresses of a `reduce` launch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReduceAddresses {
    /// `f32 [z_len]`.
    pub z: u64,
    /// `f32 [out_len]` out.
    pub out: u64,
    /// `i32 [num_seqs]` per-sequence protected prefixes, or 0 (`prefix` for every sequence).
    /// Host guarantee (not checked on the device): every entry in `0..=len`.
    pub prefixes: u64,
}

impl ReduceSpec {
    /// Check everything the kernel assumes.
    ///
    /// # Errors
    /// `InvalidArgument` naming the first field out of range.
    pub fn validate(&self) -> Result<()> {
        let cap = i32::MAX as usize;
        ensure(self.num_layers >= 1 && self.num_layers <= cap, "reduce layers", ">= 1", self.num_layers)?;
        ensure(
            self.num_kv_heads >= 1 && self.num_kv_heads <= 65535,
            "reduce KV heads",
            "1..=65535",
            self.num_kv_heads,
        )?;
        ensure(
            self.num_heads >= self.num_kv_heads
                && self.num_heads.is_multiple_of(self.num_kv_heads)
                && self.num_heads <= cap,
            "reduce heads",
            format!("a multiple of the {} KV heads", self.num_kv_heads),
            self.num_heads,
        )?;
        ensure(self.len >= 1 && self.len <= cap, "reduce slots", ">= 1", self.len)?;
        ensure(self.head_stride >= self.len, "reduce head stride", format!(">= {}", self.len), self.head_stride)?;
        let layer_min = (self.num_heads - 1) * self.head_stride + self.len;
        ensure(
            self.num_layers == 1 || self.layer_stride >= layer_min,
            "reduce layer stride",
            format!(">= {layer_min}"),
            self.layer_stride,
        )?;
        ensure(self.out_stride >= self.len, "reduce out stride", format!(">= {}", self.len), self.out_stride)?;
        ensure(self.prefix <= self.len, "reduce prefix", format!("0..={}", self.len), self.prefix)?;
        ensure(self.window_start <= self.len, "reduce window start", format!("0..={}", self.len), self.window_start)?;
        ensure(self.sets() <= 65535, "reduce rows (layers x KV heads)", "<= 65535", self.sets())?;
        ensure(self.num_seqs >= 1 && self.num_seqs <= 65535, "reduce sequences", "1..=65535", self.num_seqs)?;
        if self.num_seqs > 1 {
            let (z_one, out_one) = (self.seq_z_len(), self.seq_out_len());
            ensure(self.z_seq_stride >= z_one, "reduce z sequence stride", format!(">= {z_one}"), self.z_seq_stride)?;
            ensure(
                self.out_seq_stride >= out_one,
                "reduce out sequence stride",
                format!(">= {out_one}"),
                self.out_seq_stride,
            )?;
        }
        Ok(())
    }

    /// Output rows: Hkv, L * Hkv or 1.
    pub fn sets(&self) -> usize {
        self.mode.num_sets(self.num_layers, self.num_kv_heads)
    }

    /// The variant a launch runs.
    pub fn variant(&self) -> Variant {
        variant::reduce_variant()
    }

    /// Launch grid `(ceil(N / threads), sets, num_seqs)`.
    pub fn grid(&self) -> (u32, u32, u32) {
        (self.len.div_ceil(self.variant().threads()) as u32, self.sets() as u32, self.num_seqs as u32)
    }

    /// f32 elements of one sequence's `z`.
    fn seq_z_len(&self) -> usize {
        (self.num_layers - 1) * self.layer_stride + (self.num_heads - 1) * self.head_stride + self.len
    }

    /// f32 elements of one sequence's output.
    fn seq_out_len(&self) -> usize {
        (self.sets() - 1) * self.out_stride + self.len
    }

    /// f32 elements `z` must hold: `(num_seqs - 1) * z_seq_stride` + one sequence's extent.
    pub fn z_len(&self) -> usize {
        (self.num_seqs - 1) * self.z_seq_stride + self.seq_z_len()
    }

    /// f32 elements the output must hold: `(num_seqs - 1) * out_seq_stride` + one sequence's
    /// `(sets - 1) * out_stride + len`.
    pub fn out_len(&self) -> usize {
        (self.num_seqs - 1) * self.out_seq_stride + self.seq_out_len()
    }

    /// The params struct for `at` (call [`Self::validate`] first).
    pub fn params(&self, at: &ReduceAddresses) -> ReduceParams {
        ReduceParams {
            z: at.z,
            out: at.out,
            layer_stride: self.layer_stride as i64,
            head_stride: self.head_stride as i64,
            out_stride: self.out_stride as i64,
            num_layers: self.num_layers as i32,
            num_heads: self.num_heads as i32,
            num_kv_heads: self.num_kv_heads as i32,
            len: self.len as i32,
            mode: match self.mode {
                SelectionMode::PerHead => REDUCE_PER_HEAD,
                SelectionMode::PerLayerPerHead => REDUCE_PER_LAYER_PER_HEAD,
                SelectionMode::Union => REDUCE_UNION,
            },
            group_mean: i32::from(self.group == GroupAggregation::Mean),
            prefix: self.prefix as i32,
            window_start: self.window_start as i32,
            prefixes: at.prefixes,
            z_seq_stride: self.z_seq_stride as i64,
            out_seq_stride: self.out_seq_stride as i64,
            num_seqs: self.num_seqs as i32,
            pad2: 0,
        }
    }
}

/// What the partial step of a sharded reduction writes (`TRI_SHARD_PART_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShardPart {
    /// f64 sum over the rank's layers of each KV group's max (`per-head`; rows Hkv).
    LayerSums = 0,
    /// Key of each (layer, KV head) group max (rows L * Hkv).
    GroupKeys = 1,
    /// f64 sum over each (layer, KV head) group (`per-layer-per-head` mean; rows L * Hkv).
    GroupSums = 2,
    /// Key of the max over every row (`union`; one row).
    UnionKeys = 3,
}

/// What the finish step reads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FinishFrom {
    /// f64 sums, divided by `divisor` (the global layer count or group size) and rounded once.
    Sums {
        /// The mean's divisor.
        divisor: f64,
    },
    /// Order-preserving keys of maxima.
    Keys,
}

/// One step of a sharded round's reduction (cuda/reduce/shard.cuh).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ShardStep {
    /// z to this rank's part of the reduction.
    Partial(ShardPart),
    /// All-reduced group-max keys `[L * Hkv]` rows to f64 sums over the layers (`[Hkv]` rows).
    LayerSum,
    /// All-reduced keys or sums to the f32 rows selection ranks (`rows` per sequence), with the
    /// `+inf` guards.
    Finish {
        /// Keys or sums.
        from: FinishFrom,
        /// Rows per sequence (the rank's keep sets).
        rows: usize,
    },
}

/// The shape of one launch of a sharded reduction step; buffers are dense `[S, rows, len]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReduceShardSpec {
    /// The step.
    pub step: ShardStep,
    /// This rank's layers.
    pub num_layers: usize,
    /// This rank's query heads, a multiple of `num_kv_heads`.
    pub num_heads: usize,
    /// This rank's KV heads.
    pub num_kv_heads: usize,
    /// Slots N.
    pub len: usize,
    /// Elements between layers of z (partial).
    pub layer_stride: usize,
    /// Elements between heads of z (partial), `>= len`.
    pub head_stride: usize,
    /// Elements between sequences of z (partial).
    pub z_seq_stride: usize,
    /// Elements between output rows (finish), `>= len`.
    pub out_stride: usize,
    /// Elements between sequences of the output (finish).
    pub out_seq_stride: usize,
    /// Finish: slots below it get `+inf` unless per-sequence prefixes are given.
    pub prefix: usize,
    /// Finish: slots from it on get `+inf`.
    pub window_start: usize,
    /// Sequences S.
    pub num_seqs: usize,
}

/// Addresses of a sharded reduction step (0 for what the step does not touch).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReduceShardAddresses {
    /// f32 z (partial).
    pub z: u64,
    /// i32 keys `[S, rows, len]`.
    pub keys: u64,
    /// f64 sums `[S, rows, len]`.
    pub sums: u64,
    /// f32 output rows (finish).
    pub out: u64,
    /// i32 `[S]` per-sequence prefixes, or 0 (finish).
    pub prefixes: u64,
}

impl ReduceShardSpec {
    /// Rows per sequence the step writes (the grid's y).
    pub fn rows(&self) -> usize {
        let (l, hkv) = (self.num_layers, self.num_kv_heads);
        match self.step {
            ShardStep::Partial(ShardPart::LayerSums) | ShardStep::LayerSum => hkv,
            ShardStep::Partial(ShardPart::GroupKeys | ShardPart::GroupSums) => l * hkv,
            ShardStep::Partial(ShardPart::UnionKeys) => 1,
            ShardStep::Finish { rows, .. } => rows,
        }
    }

    /// i32 keys the step reads or writes (`S * rows_of_keys * len`; 0 when it touches none).
    pub fn keys_len(&self) -> usize {
        let rows = match self.step {
            ShardStep::Partial(ShardPart::GroupKeys | ShardPart::UnionKeys) => self.rows(),
            ShardStep::LayerSum => self.num_layers * self.num_kv_heads,
            ShardStep::Finish { from: FinishFrom::Keys, rows } => rows,
            _ => 0,
        };
        self.num_seqs * rows * self.len
    }

    /// f64 sums the step reads or writes (`S * rows * len`; 0 when it touches none).
    pub fn sums_len(&self) -> usize {
        let rows = match self.step {
            ShardStep::Partial(ShardPart::LayerSums | ShardPart::GroupSums) | ShardStep::LayerSum => self.rows(),
            ShardStep::Finish { from: FinishFrom::Sums { .. }, rows } => rows,
            _ => 0,
        };
        self.num_seqs * rows * self.len
    }

    /// Check everything the kernel assumes.
    ///
    /// # Errors
    /// `InvalidArgument` naming the first field out of range.
    pub fn validate(&self) -> Result<()> {
        let cap = i32::MAX as usize;
        ensure(self.num_layers >= 1 && self.num_layers <= cap, "reduce shard layers", ">= 1", self.num_layers)?;
        ensure(self.num_kv_heads >= 1, "reduce shard KV heads", ">= 1", self.num_kv_heads)?;
        ensure(
            self.num_heads >= self.num_kv_heads
                && self.num_heads.is_multiple_of(self.num_kv_heads)
                && self.num_heads <= cap,
            "reduce shard heads",
            format!("a multiple of the {} KV heads", self.num_kv_heads),
            self.num_heads,
        )?;
        ensure(self.len >= 1 && self.len <= cap, "reduce shard slots", ">= 1", self.len)?;
        ensure(self.rows() >= 1 && self.rows() <= 65535, "reduce shard rows", "1..=65535", self.rows())?;
        ensure(self.num_seqs >= 1 && self.num_seqs <= 65535, "reduce shard sequences", "1..=65535", self.num_seqs)?;
        ensure(
            self.keys_len().max(self.sums_len()) <= cap,
            "reduce shard buffer elements",
            format!("<= {cap}"),
            self.keys_len().max(self.sums_len()),
        )?;
        match self.step {
            ShardStep::Partial(_) => {
                ensure(
                    self.head_stride >= self.len,
                    "reduce shard head stride",
                    format!(">= {}", self.len),
                    self.head_stride,
                )?;
                let layer_min = (self.num_heads - 1) * self.head_stride + self.len;
                ensure(
                    self.num_layers == 1 || self.layer_stride >= layer_min,
                    "reduce shard layer stride",
                    format!(">= {layer_min}"),
                    self.layer_stride,
                )?;
                let one = (self.num_layers - 1) * self.layer_stride + layer_min;
                ensure(
                    self.num_seqs == 1 || self.z_seq_stride >= one,
                    "reduce shard z sequence stride",
                    format!(">= {one}"),
                    self.z_seq_stride,
                )?;
            }
            ShardStep::LayerSum => {}
            ShardStep::Finish { from, rows } => {
                if let FinishFrom::Sums { divisor } = from {
                    ensure(divisor >= 1.0, "reduce shard divisor", ">= 1", divisor)?;
                }
                ensure(
                    self.out_stride >= self.len,
                    "reduce shard out stride",
                    format!(">= {}", self.len),
                    self.out_stride,
                )?;
                let one = (rows - 1) * self.out_stride + self.len;
                ensure(
                    self.num_seqs == 1 || self.out_seq_stride >= one,
                    "reduce shard out sequence stride",
                    format!(">= {one}"),
                    self.out_seq_stride,
                )?;
                ensure(self.prefix <= self.len, "reduce shard prefix", format!("0..={}", self.len), self.prefix)?;
                ensure(
                    self.window_start <= self.len,
                    "reduce shard window start",
                    format!("0..={}", self.len),
                    self.window_start,
                )?;
            }
        }
        Ok(())
    }

    /// The variant a launch runs.
    pub fn variant(&self) -> Variant {
        variant::reduce_shard_variant()
    }

    /// Launch grid `(ceil(N / threads), rows, num_seqs)`.
    pub fn grid(&self) -> (u32, u32, u32) {
        (self.len.div_ceil(self.variant().threads()) as u32, self.rows() as u32, self.num_seqs as u32)
    }

    /// f32 elements the output must hold (finish).
    pub fn out_len(&self) -> usize {
        match self.step {
            ShardStep::Finish { rows, .. } => {
                (self.num_seqs - 1) * self.out_seq_stride + (rows - 1) * self.out_stride + self.len
            }
            _ => 0,
        }
    }

    /// The params struct for `at` (call [`Self::validate`] first).
    pub fn params(&self, at: &ReduceShardAddresses) -> ReduceShardParams {
        let (step, part, divisor) = match self.step {
            ShardStep::Partial(part) => (SHARD_STEP_PARTIAL, part as i32, 1.0),
            ShardStep::LayerSum => (SHARD_STEP_LAYER_SUM, 0, 1.0),
            ShardStep::Finish { from: FinishFrom::Sums { divisor }, .. } => (SHARD_STEP_FINISH, 0, divisor),
            ShardStep::Finish { from: FinishFrom::Keys, .. } => (SHARD_STEP_FINISH, 1, 1.0),
        };
        ReduceShardParams {
            z: at.z,
            keys: at.keys,
            sums: at.sums,
            out: at.out,
            prefixes: at.prefixes,
            layer_stride: self.layer_stride as i64,
            head_stride: self.head_stride as i64,
            z_seq_stride: self.z_seq_stride as i64,
            out_stride: self.out_stride as i64,
            out_seq_stride: self.out_seq_stride as i64,
            divisor,
            step,
            part,
            num_layers: self.num_layers as i32,
            num_heads: self.num_heads as i32,
            num_kv_heads: self.num_kv_heads as i32,
            len: self.len as i32,
            rows: self.rows() as i32,
            prefix: self.prefix as i32,
            window_start: self.window_start as i32,
            num_seqs: self.num_seqs as i32,
        }
    }
}

#[cfg(feature = "cuda")]
impl super::runtime::CudaBackend {
    /// Reduce on the GPU over raw device addresses, on the caller's stream (launch only).
    ///
    /// # Errors
    /// `InvalidArgument` for a bad spec; `KernelsUnavailable` for a build without kernels,
    /// `Driver` for a failed load or launch.
    ///
    /// # Safety
    /// `at.z` is device memory of this context holding [`ReduceSpec::z_len`] f32, `at.prefixes`
    /// is 0 or holds `num_seqs` i32 in `0..=len`, `at.out` holds [`ReduceSpec::out_len`] f32 that nothing else accesses until the kernel has run; `stream`
    /// belongs to this context.
    pub unsafe fn launch_reduce_raw(
        &self,
        spec: &ReduceSpec,
        at: &ReduceAddresses,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<()> {
        spec.validate()?;
        let params = spec.params(at);
        // SAFETY: the caller's contract; params from a validated spec.
        unsafe { self.launch(spec.variant(), &params, spec.grid(), 0, stream) }
    }
}
