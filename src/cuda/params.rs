//! Kernel params, mirrored field for field in `cuda/common/params.cuh` (house rule R1).
//!
//! Field order is ABI. Pointers are 64-bit addresses (device addresses on the GPU, host addresses
//! under the emu backend); strides are element counts. Sizes and a few offsets are asserted here
//! and by `static_assert` in the header.

/// Pairing style code (`TRI_STYLE_*`).
pub(crate) const STYLE_HALF: i32 = 0;
/// Pairing style code (`TRI_STYLE_*`).
pub(crate) const STYLE_INTERLEAVED: i32 = 1;

/// Mirrors `tri_row_partial`: count, mean and M2 of one tile's z-score candidates.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RowPartial {
    /// Candidate slots in the tile.
    pub count: f32,
    /// Their mean raw score.
    pub mean: f32,
    /// Sum of squared deviations from `mean`.
    pub m2: f32,
    /// Padding to 16 bytes.
    pub pad: f32,
}
const _: () = assert!(std::mem::size_of::<RowPartial>() == 16);

/// Population statistics of one (sequence, layer, head) row, combined from its tiles.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RowStats {
    /// Candidate slots.
    pub count: f64,
    /// Mean raw score.
    pub mean: f64,
    /// Sum of squared deviations from the mean (population variance is `m2 / count`).
    pub m2: f64,
}

impl RowPartial {
    /// Combine tile partials (Chan et al.), in slice order, in f64.
    pub fn combine(parts: &[RowPartial]) -> RowStats {
        let mut acc = RowStats::default();
        for p in parts.iter().filter(|p| p.count > 0.0) {
            let (nb, mb, m2b) = (p.count as f64, p.mean as f64, p.m2 as f64);
            let n = acc.count + nb;
            let delta = mb - acc.mean;
            acc.mean += delta * nb / n;
            acc.m2 += m2b + delta * delta * acc.count * nb / n;
            acc.count = n;
        }
        acc
    }
}

/// Mirrors `tri_score_params` (cuda/common/params.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScoreParams {
    /// u64 `[S * L]` (contiguous) or `[L]` (paged) addresses of key elements
    pub keys: u64,
    /// f32 `[S?, L, H, V, D]` (mean) or the u16 level image `[S?, L, H, 3, jpad, D + 8]` (max)
    pub weights: u64,
    /// f32 `[L, H, F]`
    pub norm: u64,
    /// i32 `[S, block_table_stride]` or 0
    pub block_table: u64,
    /// i32 `[S]`
    pub seq_lens: u64,
    /// i32 `[S]` or 0
    pub stat_start: u64,
    /// i32 `[S]` or 0 (`seq_lens`)
    pub stat_end: u64,
    /// f32 out
    pub raw: u64,
    /// RowPartial `[S, L, H, num_tiles]` out, or 0
    pub partials: u64,
    /// head stride
    pub head_stride: i64,
    /// row stride
    pub row_stride: i64,
    /// block stride
    pub block_stride: i64,
    /// elements (f32 or u16) between sequences' weights (0: shared)
    pub weights_seq_stride: i64,
    /// raw seq stride
    pub raw_seq_stride: i64,
    /// raw row stride
    pub raw_row_stride: i64,
    /// block table stride
    pub block_table_stride: i32,
    /// block size
    pub block_size: i32,
    /// num seqs
    pub num_seqs: i32,
    /// num layers
    pub num_layers: i32,
    /// num heads
    pub num_heads: i32,
    /// num kv heads
    pub num_kv_heads: i32,
    /// group
    pub group: i32,
    /// num vectors
    pub num_vectors: i32,
    /// style
    pub style: i32,
    /// num tiles
    pub num_tiles: i32,
}
const _: () = assert!(std::mem::size_of::<ScoreParams>() == 160);
const _: () = assert!(std::mem::offset_of!(ScoreParams, head_stride) == 72);
const _: () = assert!(std::mem::offset_of!(ScoreParams, block_table_stride) == 120);

/// Mirrors `tri_trig_params` (cuda/common/params.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TrigParams {
    /// f32 `[L, H, F]`
    pub q_mean_real: u64,
    /// f32 `[L, H, F]`
    pub q_mean_imag: u64,
    /// f32 `[L, H, F]`
    pub q_abs_mean: u64,
    /// f64 `[F]`
    pub omega: u64,
    /// i64 `[S]`, read on the device
    pub round_start: u64,
    /// out: f32 `[S, L, H, 1, D]` (mean) or the u16 level image (max), or 0 when V == 0
    pub weights: u64,
    /// f32 `[L, H, F]` out
    pub norm: u64,
    /// sigma
    pub sigma: f64,
    /// num seqs
    pub num_seqs: i32,
    /// num layers
    pub num_layers: i32,
    /// num heads
    pub num_heads: i32,
    /// head dim
    pub head_dim: i32,
    /// num offsets
    pub num_offsets: i32,
    /// num vectors
    pub num_vectors: i32,
    /// style
    pub style: i32,
    /// norm residual
    pub norm_residual: i32,
}
const _: () = assert!(std::mem::size_of::<TrigParams>() == 96);
const _: () = assert!(std::mem::offset_of!(TrigParams, sigma) == 56);

/// Mirrors `tri_select_params` (cuda/common/params.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SelectParams {
    /// f32 `[rows, score_stride]`
    pub scores: u64,
    /// i32 `[rows, keep_stride]` out
    pub keep: u64,
    /// elements between rows of scores
    pub score_stride: i64,
    /// elements between rows of keep
    pub keep_stride: i64,
    /// rows (the grid's x)
    pub num_rows: i32,
    /// slots per row N
    pub len: i32,
    /// slots below it are protected
    pub prefix: i32,
    /// slots from it on are protected
    pub window_start: i32,
    /// kept slots per row K
    pub budget: i32,
    /// multi-block: the radix pass (0..4) of the histogram and scan kernels; 0 otherwise
    pub pass: i32,
    /// multi-block: u32 scratch, [`crate::cuda::select::SelectSpec::scratch_bytes`]; 0 otherwise
    pub scratch: u64,
    /// multi-block: chunks per row (the grid's y); 0 otherwise
    pub num_chunks: i32,
    /// multi-block: slots per chunk; 0 otherwise
    pub chunk_len: i32,
    /// i32 `[rows / rows_per_seq]` per-sequence prefixes, or 0 (`prefix` for every row)
    pub prefixes: u64,
    /// rows per sequence when `prefixes` is set; 0 otherwise
    pub rows_per_seq: i32,
    /// padding
    pub pad3: i32,
}
const _: () = assert!(std::mem::size_of::<SelectParams>() == 88);
const _: () = assert!(std::mem::offset_of!(SelectParams, prefixes) == 72);
const _: () = assert!(std::mem::offset_of!(SelectParams, score_stride) == 16);
const _: () = assert!(std::mem::offset_of!(SelectParams, num_rows) == 32);
const _: () = assert!(std::mem::offset_of!(SelectParams, pass) == 52);
const _: () = assert!(std::mem::offset_of!(SelectParams, scratch) == 56);
const _: () = assert!(std::mem::offset_of!(SelectParams, num_chunks) == 64);

/// Reduction mode code (`TRI_REDUCE_*`).
pub(crate) const REDUCE_PER_HEAD: i32 = 0;
/// Reduction mode code (`TRI_REDUCE_*`).
pub(crate) const REDUCE_PER_LAYER_PER_HEAD: i32 = 1;
/// Reduction mode code (`TRI_REDUCE_*`).
pub(crate) const REDUCE_UNION: i32 = 2;

/// Mirrors `tri_reduce_params` (cuda/common/params.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReduceParams {
    /// f32 `(l, h, n)` at `l * layer_stride + h * head_stride + n`
    pub z: u64,
    /// f32 `[sets, out_stride]` out
    pub out: u64,
    /// elements between layers of z
    pub layer_stride: i64,
    /// elements between heads of z
    pub head_stride: i64,
    /// elements between rows of out
    pub out_stride: i64,
    /// layers L
    pub num_layers: i32,
    /// attention heads H
    pub num_heads: i32,
    /// KV heads Hkv
    pub num_kv_heads: i32,
    /// slots N
    pub len: i32,
    /// `TRI_REDUCE_*`
    pub mode: i32,
    /// per layer per head: 1 mean over the group, 0 max
    pub group_mean: i32,
    /// slots below it get +inf
    pub prefix: i32,
    /// slots from it on get +inf
    pub window_start: i32,
    /// i32 `[num_seqs]` per-sequence prefixes, or 0 (`prefix` for every sequence)
    pub prefixes: u64,
    /// elements between sequences of z
    pub z_seq_stride: i64,
    /// elements between sequences of out
    pub out_seq_stride: i64,
    /// sequences S (the grid's z), >= 1
    pub num_seqs: i32,
    /// padding
    pub pad2: i32,
}
const _: () = assert!(std::mem::size_of::<ReduceParams>() == 104);
const _: () = assert!(std::mem::offset_of!(ReduceParams, prefixes) == 72);
const _: () = assert!(std::mem::offset_of!(ReduceParams, layer_stride) == 16);
const _: () = assert!(std::mem::offset_of!(ReduceParams, num_layers) == 40);

/// Sharded reduce step (`TRI_SHARD_STEP_*`).
pub(crate) const SHARD_STEP_PARTIAL: i32 = 0;
/// Sharded reduce step (`TRI_SHARD_STEP_*`).
pub(crate) const SHARD_STEP_LAYER_SUM: i32 = 1;
/// Sharded reduce step (`TRI_SHARD_STEP_*`).
pub(crate) const SHARD_STEP_FINISH: i32 = 2;

/// Mirrors `tri_reduce_shard_params` (cuda/common/params.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ReduceShardParams {
    /// f32 z `(l, h, n)` of sequence s at `s * z_seq_stride + l * layer_stride + h * head_stride + n`
    pub z: u64,
    /// i32 keys `[S, rows, len]`
    pub keys: u64,
    /// f64 sums `[S, rows, len]`
    pub sums: u64,
    /// f32 out `(set, n)` at `s * out_seq_stride + set * out_stride + n`
    pub out: u64,
    /// i32 `[num_seqs]` per-sequence prefixes, or 0
    pub prefixes: u64,
    /// elements between layers of z
    pub layer_stride: i64,
    /// elements between heads of z
    pub head_stride: i64,
    /// elements between sequences of z
    pub z_seq_stride: i64,
    /// elements between rows of out
    pub out_stride: i64,
    /// elements between sequences of out
    pub out_seq_stride: i64,
    /// finish from sums: the divisor of the mean
    pub divisor: f64,
    /// `TRI_SHARD_STEP_*`
    pub step: i32,
    /// partial: `TRI_SHARD_PART_*`; finish: 0 from sums, 1 from keys
    pub part: i32,
    /// layers of this rank
    pub num_layers: i32,
    /// query heads of this rank
    pub num_heads: i32,
    /// KV heads of this rank
    pub num_kv_heads: i32,
    /// slots N
    pub len: i32,
    /// rows per sequence of this step (the grid's y)
    pub rows: i32,
    /// finish: slots below it get +inf
    pub prefix: i32,
    /// finish: slots from it on get +inf
    pub window_start: i32,
    /// sequences S (the grid's z)
    pub num_seqs: i32,
}
const _: () = assert!(std::mem::size_of::<ReduceShardParams>() == 128);
const _: () = assert!(std::mem::offset_of!(ReduceShardParams, layer_stride) == 40);
const _: () = assert!(std::mem::offset_of!(ReduceShardParams, divisor) == 80);
const _: () = assert!(std::mem::offset_of!(ReduceShardParams, step) == 88);

/// z-score flavour code (`TRI_ZSCORE_*`).
pub(crate) const ZSCORE_POPULATION_FLOOR: i32 = 0;
/// z-score flavour code (`TRI_ZSCORE_*`).
pub(crate) const ZSCORE_UNBIASED_CENTRE_FLAT: i32 = 1;

/// Mirrors `tri_normalize_params` (cuda/common/params.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NormalizeParams {
    /// RowPartial `[num_rows, num_tiles]`
    pub partials: u64,
    /// f32 rows at `r * raw_stride`
    pub raw: u64,
    /// f32 rows at `r * out_stride` out (may equal raw)
    pub out: u64,
    /// elements between raw rows
    pub raw_stride: i64,
    /// elements between output rows
    pub out_stride: i64,
    /// rows (the grid)
    pub num_rows: i32,
    /// partials per row
    pub num_tiles: i32,
    /// slots N
    pub len: i32,
    /// `TRI_ZSCORE_*`
    pub flavour: i32,
}
const _: () = assert!(std::mem::size_of::<NormalizeParams>() == 56);
const _: () = assert!(std::mem::offset_of!(NormalizeParams, raw_stride) == 24);
const _: () = assert!(std::mem::offset_of!(NormalizeParams, num_rows) == 40);

#[cfg(feature = "cuda")]
// SAFETY: plain integers and floats, `repr(C)`, size and layout pinned above and in params.cuh.
unsafe impl cudarc::driver::DeviceRepr for ScoreParams {}
#[cfg(feature = "cuda")]
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for TrigParams {}
#[cfg(feature = "cuda")]
// SAFETY: plain integers, `repr(C)`, size and layout pinned above and in params.cuh.
unsafe impl cudarc::driver::DeviceRepr for SelectParams {}
#[cfg(feature = "cuda")]
// SAFETY: plain integers, `repr(C)`, size and layout pinned above and in params.cuh.
unsafe impl cudarc::driver::DeviceRepr for ReduceParams {}
#[cfg(feature = "cuda")]
// SAFETY: plain integers, `repr(C)`, size and layout pinned above and in params.cuh.
unsafe impl cudarc::driver::DeviceRepr for NormalizeParams {}
#[cfg(feature = "cuda")]
// SAFETY: plain integers and one f64, `repr(C)`, size and layout pinned above and in params.cuh.
unsafe impl cudarc::driver::DeviceRepr for ReduceShardParams {}
#[cfg(feature = "cuda")]
// SAFETY: four f32, `repr(C)`, 16 bytes as `tri_row_partial`.
unsafe impl cudarc::driver::DeviceRepr for RowPartial {}
#[cfg(feature = "cuda")]
// SAFETY: every bit pattern of four f32 is a valid RowPartial.
unsafe impl cudarc::driver::ValidAsZeroBits for RowPartial {}

/// Mirrors `tri_compact_tensor`: one tensor (K or V) of a compaction, byte strides.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactTensor {
    /// u64 `[L]` source base addresses
    pub src: u64,
    /// u64 `[L]` destination base addresses (the same as `src` in place)
    pub dst: u64,
    /// bytes between KV heads (source)
    pub head_stride: i64,
    /// bytes between slots (source; within a block when paged)
    pub row_stride: i64,
    /// bytes between KV heads (destination)
    pub dst_head_stride: i64,
    /// bytes between slots (destination)
    pub dst_row_stride: i64,
    /// bytes between pool blocks (paged)
    pub block_stride: i64,
    /// bytes copied per row, a multiple of 16
    pub row_bytes: i32,
    /// padding
    pub pad: i32,
}
const _: () = assert!(std::mem::size_of::<CompactTensor>() == 64);

/// Mirrors `tri_compact_params` (cuda/common/params.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactParams {
    /// K rows
    pub k: CompactTensor,
    /// V rows
    pub v: CompactTensor,
    /// i32 `[sets, K]` ascending slots
    pub keep: u64,
    /// i32 `[L * Hkv]` keep set of each (layer, KV head)
    pub set_index: u64,
    /// i32 block-table row (paged) or 0
    pub block_table: u64,
    /// i32 `[sets, K]` out, or 0
    pub slot_map: u64,
    /// i32 or i64 `[sets, N]`, or 0
    pub pos_src: u64,
    /// i32 or i64 out, `(set, i)` at `set * pos_dst_stride + i`, or 0
    pub pos_dst: u64,
    /// elements between sets of `pos_dst`
    pub pos_dst_stride: i64,
    /// L
    pub num_layers: i32,
    /// Hkv
    pub num_kv_heads: i32,
    /// sets
    pub num_sets: i32,
    /// N
    pub num_slots: i32,
    /// K
    pub keep_len: i32,
    /// rows (order-preserving) or movers (hole-filling) per block tile
    pub rows_per_tile: i32,
    /// slots per block; 0 = contiguous
    pub block_size: i32,
    /// 4 (i32) or 8 (i64)
    pub pos_bytes: i32,
    /// sequences S (the grid's z), >= 1; tables hold `S * L` bases, sequence `s` at `s * L`
    pub num_seqs: i32,
    /// entries per block-table row (paged; sequence `s` at `s * block_table_stride`); else 0
    pub block_table_stride: i32,
    /// elements between sequences' keep sets and slot maps
    pub keep_seq_stride: i64,
    /// elements between sequences' position outputs (`pos_src` at `s * sets * N`)
    pub pos_seq_stride: i64,
}
const _: () = assert!(std::mem::size_of::<CompactParams>() == 240);
const _: () = assert!(std::mem::offset_of!(CompactParams, num_seqs) == 216);
const _: () = assert!(std::mem::offset_of!(CompactParams, keep) == 128);
const _: () = assert!(std::mem::offset_of!(CompactParams, num_layers) == 184);

/// Mirrors `tri_calibrate_params` (cuda/common/params.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CalibrateParams {
    /// `[H, T, D]` queries (f32, f16 or bf16)
    pub queries: u64,
    /// f64 `[H, D/2]` in/out
    pub sum_real: u64,
    /// f64 `[H, D/2]` in/out
    pub sum_imag: u64,
    /// f64 `[H, D/2]` in/out
    pub sum_abs: u64,
    /// elements between heads
    pub head_stride: i64,
    /// elements between tokens
    pub token_stride: i64,
    /// H
    pub num_heads: i32,
    /// T
    pub num_tokens: i32,
    /// D
    pub head_dim: i32,
    /// style
    pub style: i32,
}
const _: () = assert!(std::mem::size_of::<CalibrateParams>() == 64);
const _: () = assert!(std::mem::offset_of!(CalibrateParams, num_heads) == 48);

#[cfg(feature = "cuda")]
// SAFETY: plain integers, `repr(C)`, size and layout pinned above and in params.cuh.
unsafe impl cudarc::driver::DeviceRepr for CompactParams {}
#[cfg(feature = "cuda")]
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for CalibrateParams {}

/// Query dtype code (`TRI_DTYPE_*`).
pub(crate) const fn dtype_code(dtype: crate::dtype::DType) -> i32 {
    match dtype {
        crate::dtype::DType::F32 => 0,
        crate::dtype::DType::F16 => 1,
        crate::dtype::DType::Bf16 => 2,
    }
}

/// List layout code (`TRI_LIST_*`).
pub(crate) const fn list_layout_code(layout: crate::decode::ListLayout) -> i32 {
    match layout {
        crate::decode::ListLayout::Dense => 0,
        crate::decode::ListLayout::Shared => 1,
        crate::decode::ListLayout::PerKvHead => 2,
        crate::decode::ListLayout::PerLayerKvHead => 3,
    }
}

/// Mirrors `tri_decode_params` (cuda/common/params.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DecodeParams {
    /// u64 `[S * L]` (contiguous) or `[L]` (paged) addresses of K elements
    pub keys: u64,
    /// u64 `[S * L]` or `[L]` addresses of V elements
    pub values: u64,
    /// queries of `query_dtype`, `(s, l, h, t, d)` at the q strides
    pub queries: u64,
    /// f32 `[L, H]` sink logits, or 0
    pub sinks: u64,
    /// i32 lists (list `i` of sequence `s` at `s * list_seq_stride + i * list_stride`), or 0 (dense)
    pub lists: u64,
    /// i32 `[S, num_lists]` list lengths, or 0 (`list_len` each)
    pub list_lens: u64,
    /// i32 `[S]` visible slots of a dense decode
    pub seq_lens: u64,
    /// i32 `[S, block_table_stride]` (paged), else 0
    pub block_table: u64,
    /// f32 o (one split)
    pub out: u64,
    /// f32 lse (one split)
    pub lse: u64,
    /// f32 `[S, L, H, T, splits, Dv]` split parts
    pub part_out: u64,
    /// f32 `[S, L, H, T, splits]` split parts
    pub part_lse: u64,
    /// elements between KV heads of K
    pub k_head_stride: i64,
    /// elements between slots of K
    pub k_row_stride: i64,
    /// elements between pool blocks of K
    pub k_block_stride: i64,
    /// elements between KV heads of V
    pub v_head_stride: i64,
    /// elements between slots of V
    pub v_row_stride: i64,
    /// elements between pool blocks of V
    pub v_block_stride: i64,
    /// query elements between sequences
    pub q_seq_stride: i64,
    /// query elements between layers
    pub q_layer_stride: i64,
    /// query elements between heads
    pub q_head_stride: i64,
    /// query elements between queries
    pub q_token_stride: i64,
    /// list entries between sequences
    pub list_seq_stride: i64,
    /// list entries between lists
    pub list_stride: i64,
    /// f32 elements between sequences' o
    pub out_seq_stride: i64,
    /// f32 elements between (l, h, t) rows of o
    pub out_row_stride: i64,
    /// f32 elements between sequences' lse
    pub lse_seq_stride: i64,
    /// logit scale
    pub scale: f32,
    /// soft-capping, 0: off
    pub softcap: f32,
    /// S
    pub num_seqs: i32,
    /// L: layers of the K/V tables, lists and sinks
    pub num_layers: i32,
    /// first layer of the launch
    pub first_layer: i32,
    /// layers of the launch (q, o, lse and the parts hold these only)
    pub launch_layers: i32,
    /// H
    pub num_heads: i32,
    /// Hkv
    pub num_kv_heads: i32,
    /// G
    pub group: i32,
    /// T
    pub num_queries: i32,
    /// Dv
    pub value_dim: i32,
    /// `TRI_LIST_*`
    pub list_layout: i32,
    /// lists per sequence
    pub num_lists: i32,
    /// entries of every list when `list_lens` is 0
    pub list_len: i32,
    /// list entries per split
    pub split_len: i32,
    /// splits (gridDim.x)
    pub num_splits: i32,
    /// query-row chunks per KV head
    pub row_chunks: i32,
    /// slots per block; 0: contiguous
    pub block_size: i32,
    /// entries per block-table row
    pub block_table_stride: i32,
    /// `TRI_DTYPE_*` of the queries
    pub query_dtype: i32,
}
const _: () = assert!(std::mem::size_of::<DecodeParams>() == 296);
const _: () = assert!(std::mem::offset_of!(DecodeParams, k_head_stride) == 96);
const _: () = assert!(std::mem::offset_of!(DecodeParams, scale) == 216);
const _: () = assert!(std::mem::offset_of!(DecodeParams, query_dtype) == 292);

/// Mirrors `tri_decode_combine_params` (cuda/common/params.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeCombineParams {
    /// f32 `[S, L, H, T, splits, Dv]`
    pub part_out: u64,
    /// f32 `[S, L, H, T, splits]`
    pub part_lse: u64,
    /// f32 `[L, H]`, or 0
    pub sinks: u64,
    /// f32 o, as `DecodeParams::out`
    pub out: u64,
    /// f32 lse, as `DecodeParams::lse`
    pub lse: u64,
    /// f32 elements between sequences' o
    pub out_seq_stride: i64,
    /// f32 elements between rows of o
    pub out_row_stride: i64,
    /// f32 elements between sequences' lse
    pub lse_seq_stride: i64,
    /// S
    pub num_seqs: i32,
    /// first layer of the launch (sink rows)
    pub first_layer: i32,
    /// layers of the parts, o and lse
    pub launch_layers: i32,
    /// H
    pub num_heads: i32,
    /// T
    pub num_queries: i32,
    /// Dv
    pub value_dim: i32,
    /// splits, >= 2
    pub num_splits: i32,
    /// padding
    pub pad: i32,
}
const _: () = assert!(std::mem::size_of::<DecodeCombineParams>() == 96);
const _: () = assert!(std::mem::offset_of!(DecodeCombineParams, num_seqs) == 64);

#[cfg(feature = "cuda")]
// SAFETY: plain integers and floats, `repr(C)`, size and layout pinned above and in params.cuh.
unsafe impl cudarc::driver::DeviceRepr for DecodeParams {}
#[cfg(feature = "cuda")]
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for DecodeCombineParams {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partials_combine_like_one_pass() {
        let xs: Vec<f64> = (0..300).map(|i| 1000.0 + ((i * 37) % 101) as f64 * 0.25).collect();
        let parts: Vec<RowPartial> = xs
            .chunks(64)
            .map(|c| {
                let n = c.len() as f64;
                let m = c.iter().sum::<f64>() / n;
                let m2 = c.iter().map(|x| (x - m) * (x - m)).sum::<f64>();
                RowPartial { count: n as f32, mean: m as f32, m2: m2 as f32, pad: 0.0 }
            })
            .collect();
        let s = RowPartial::combine(&parts);
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
        assert_eq!(s.count, n);
        assert!((s.mean - mean).abs() < 1e-7 * mean);
        assert!((s.m2 / s.count - var).abs() < 1e-5 * var, "{} vs {var}", s.m2 / s.count);
    }
}
