//! Validated host descriptions of kernel launches: [`ScoreSpec`] and [`TrigSpec`] (house rule R3).
//!
//! A spec holds shapes, strides and the chosen variant, never pointers. Its constructor checks
//! everything the kernels assume (their "Host guarantees"), so a launch only fills the params
//! struct from a spec and a set of addresses. The CUDA and emu backends share these.

use crate::dtype::DType;
use crate::error::{ensure, Error, Result};
use crate::model::PairingStyle;
use crate::score::OffsetAggregation;
use crate::tuning::{Bucket, ChoiceSource, Dispatch};
use crate::variant::{self, ScoreAlgo, Variant, MAX_VECTORS};

use super::params::{ScoreParams, TrigParams, STYLE_HALF, STYLE_INTERLEAVED};

/// Order of the axes inside one block of a paged cache pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageOrder {
    /// `[num_blocks, block_size, Hkv, D]` (vLLM).
    Nhd,
    /// `[num_blocks, Hkv, block_size, D]` (FlashInfer).
    Hnd,
}

/// Where key row `(sequence s, layer l, KV head g, slot n)` lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyLayout {
    /// One `[Hkv, N, D]` tensor per (sequence, layer), with element strides; the key table
    /// holds `S * L` base addresses, sequence-major.
    Contiguous {
        /// Elements between KV heads.
        head_stride: usize,
        /// Elements between slots.
        row_stride: usize,
    },
    /// One block pool per layer (the key table holds `L` pool addresses), a block table
    /// `i32[S, max_blocks]` and `seq_lens`.
    Paged {
        /// Slots per block, 16 to 256.
        block_size: usize,
        /// Axis order inside a block.
        order: PageOrder,
        /// Blocks in each layer's pool.
        num_blocks: usize,
        /// Entries per block-table row.
        max_blocks: usize,
    },
}

/// Whether the weights differ per sequence (each has its own `round_start`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightsScope {
    /// One `[L, H, V, D]` set for every sequence.
    Shared,
    /// `[S, L, H, V, D]`.
    PerSequence,
}

/// The shape of a scoring launch, before validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScoreShape {
    /// Key dtype.
    pub dtype: DType,
    /// Head dimension D.
    pub head_dim: usize,
    /// Layers L.
    pub num_layers: usize,
    /// Attention heads H.
    pub num_heads: usize,
    /// KV heads Hkv (H a multiple of it).
    pub num_kv_heads: usize,
    /// Sequences S.
    pub num_seqs: usize,
    /// Upper bound of every `seq_lens[s]`: sizes the grid and the raw rows.
    pub max_len: usize,
    /// Weight vectors per head: 0 (no trig term), 1 (mean) or J (max).
    pub vectors: usize,
    /// Aggregation the weights were built for.
    pub aggregation: OffsetAggregation,
    /// Pairing style of the stored keys.
    pub style: PairingStyle,
    /// Cache layout.
    pub layout: KeyLayout,
    /// Shared or per-sequence weights.
    pub weights: WeightsScope,
}

/// A validated scoring launch: outputs are `raw` f32 `[S, L, H, max_len]` and `partials`
/// `[S, L, H, num_tiles]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScoreSpec {
    shape: ScoreShape,
    variant: Variant,
    block_keys: usize,
}

impl ScoreSpec {
    /// Check `shape` against what the kernels assume and pick the variant.
    ///
    /// # Errors
    /// `InvalidArgument` naming the first field out of range; `Unsupported` for a head_dim with
    /// no compiled variant.
    pub fn new(shape: ScoreShape) -> Result<Self> {
        Self::tuned(shape, &Dispatch::built_in()).map(|(spec, _)| spec)
    }

    /// [`Self::new`] with the variant `dispatch` picks for the shape's family (`len` = slots,
    /// `batch` = sequences), and where the choice came from.
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn tuned(shape: ScoreShape, dispatch: &Dispatch) -> Result<(Self, ChoiceSource)> {
        let s = &shape;
        let i32_max = i32::MAX as usize;
        ensure(s.num_layers >= 1 && s.num_layers <= 65535, "layers", "1..=65535", s.num_layers)?;
        ensure(s.num_kv_heads >= 1, "KV heads", ">= 1", s.num_kv_heads)?;
        ensure(
            s.num_heads >= s.num_kv_heads && s.num_heads.is_multiple_of(s.num_kv_heads),
            "attention heads",
            format!("a multiple of the {} KV heads", s.num_kv_heads),
            s.num_heads,
        )?;
        ensure(s.num_layers * s.num_kv_heads <= 65535, "layers x KV heads", "<= 65535", s.num_layers * s.num_kv_heads)?;
        ensure(s.num_seqs >= 1 && s.num_seqs <= 65535, "sequences", "1..=65535", s.num_seqs)?;
        ensure(s.max_len <= i32_max, "max_len", format!("<= {i32_max}"), s.max_len)?;
        let algo = match (s.aggregation, s.vectors) {
            (_, 0) => ScoreAlgo::Mean,
            (OffsetAggregation::Mean, 1) => ScoreAlgo::Mean,
            (OffsetAggregation::Mean, v) => return Err(Error::invalid_argument("weight vectors (mean)", "0 or 1", v)),
            (OffsetAggregation::Max, v) => {
                ensure(v <= MAX_VECTORS, "weight vectors (max: offsets)", format!("1..={MAX_VECTORS}"), v)?;
                ScoreAlgo::Max
            }
        };
        let Some(default) = variant::score_variant(s.dtype, s.head_dim, algo) else {
            return Err(Error::unsupported(format!(
                "head_dim {}: kernels are compiled for {:?}",
                s.head_dim,
                variant::HEAD_DIMS
            )));
        };
        let vec = 16 / s.dtype.size();
        let aligned = |what: &str, v: usize| {
            ensure(v.is_multiple_of(vec), what, format!("a multiple of {vec} elements (16 bytes)"), v)
        };
        match s.layout {
            KeyLayout::Contiguous { head_stride, row_stride } => {
                aligned("key head stride", head_stride)?;
                aligned("key row stride", row_stride)?;
                ensure(row_stride >= s.head_dim, "key row stride", format!(">= head_dim {}", s.head_dim), row_stride)?;
            }
            KeyLayout::Paged { block_size, num_blocks, max_blocks, .. } => {
                check_paged(block_size, num_blocks, max_blocks, s.max_len)?;
            }
        }
        let bucket = Bucket { len: s.max_len, batch: s.num_seqs };
        let (variant, source) =
            dispatch.pick(&default.family(), bucket, &|_| true).unwrap_or((default, ChoiceSource::BuiltIn));
        let block_keys = match variant.kernel {
            variant::Kernel::Score { block_keys, .. } => block_keys,
            _ => unreachable!("a score family holds score kernels"),
        };
        Ok((Self { shape, variant, block_keys }, source))
    }

    /// The validated shape.
    pub fn shape(&self) -> &ScoreShape {
        &self.shape
    }

    /// The variant a launch runs.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// Tiles per row: `ceil(max_len / block_keys)` (at least 1).
    pub fn num_tiles(&self) -> usize {
        self.shape.max_len.div_ceil(self.block_keys).max(1)
    }

    /// Launch grid `(tiles, L * Hkv, S)`.
    pub fn grid(&self) -> (u32, u32, u32) {
        let s = &self.shape;
        (self.num_tiles() as u32, (s.num_layers * s.num_kv_heads) as u32, s.num_seqs as u32)
    }

    /// Threads per block.
    pub fn threads(&self) -> u32 {
        self.variant.threads() as u32
    }

    /// Dynamic shared memory per block, bytes.
    pub fn dynamic_smem_bytes(&self) -> usize {
        self.variant.dynamic_smem_bytes(self.shape.vectors)
    }

    /// Entries of the key address table: `S * L` (contiguous) or `L` (paged).
    pub fn key_table_len(&self) -> usize {
        match self.shape.layout {
            KeyLayout::Contiguous { .. } => self.shape.num_seqs * self.shape.num_layers,
            KeyLayout::Paged { .. } => self.shape.num_layers,
        }
    }

    /// Whether the weights are the bf16 level image (max) rather than f32 vectors (mean).
    pub fn weights_are_levels(&self) -> bool {
        self.variant_algo() == ScoreAlgo::Max
    }

    fn variant_algo(&self) -> ScoreAlgo {
        match self.variant.kernel {
            variant::Kernel::Score { algo, .. } => algo,
            _ => unreachable!("score specs hold score kernels"),
        }
    }

    /// Weights elements of one sequence: f32 `[L, H, V, D]` (mean) or u16 `[L, H, 3, jpad, D + 8]`
    /// (max, see [`weight_levels`]).
    fn weights_per_seq(&self) -> usize {
        let s = &self.shape;
        if self.weights_are_levels() {
            s.num_layers * s.num_heads * weight_image_len(s.vectors, s.head_dim)
        } else {
            s.num_layers * s.num_heads * s.vectors * s.head_dim
        }
    }

    /// Elements of the weights buffer: f32 for mean, u16 (the level image) for max.
    pub fn weights_len(&self) -> usize {
        let s = &self.shape;
        match s.weights {
            WeightsScope::Shared => self.weights_per_seq(),
            WeightsScope::PerSequence => self.weights_per_seq() * s.num_seqs,
        }
    }

    /// Elements of the norm buffer `[L, H, F]`.
    pub fn norm_len(&self) -> usize {
        self.shape.num_layers * self.shape.num_heads * self.shape.head_dim / 2
    }

    /// Elements of the raw output `[S, L, H, max_len]`.
    pub fn raw_len(&self) -> usize {
        let s = &self.shape;
        s.num_seqs * s.num_layers * s.num_heads * s.max_len
    }

    /// Entries of the partials output `[S, L, H, num_tiles]`.
    pub fn partials_len(&self) -> usize {
        let s = &self.shape;
        s.num_seqs * s.num_layers * s.num_heads * self.num_tiles()
    }

    /// Elements between pool blocks, KV heads and slots: `(block, head, row)` strides.
    pub fn strides(&self) -> (usize, usize, usize) {
        let s = &self.shape;
        match s.layout {
            KeyLayout::Contiguous { head_stride, row_stride } => (0, head_stride, row_stride),
            KeyLayout::Paged { block_size, order: PageOrder::Nhd, .. } => {
                (block_size * s.num_kv_heads * s.head_dim, s.head_dim, s.num_kv_heads * s.head_dim)
            }
            KeyLayout::Paged { block_size, order: PageOrder::Hnd, .. } => {
                (block_size * s.num_kv_heads * s.head_dim, block_size * s.head_dim, s.head_dim)
            }
        }
    }

    /// The params of a launch over these addresses.
    pub fn params(&self, at: &ScoreAddresses) -> ScoreParams {
        let s = &self.shape;
        let (block_stride, head_stride, row_stride) = self.strides();
        let (block_size, bt_stride) = match s.layout {
            KeyLayout::Contiguous { .. } => (0, 0),
            KeyLayout::Paged { block_size, max_blocks, .. } => (block_size, max_blocks),
        };
        let per_seq = self.weights_per_seq() as i64;
        ScoreParams {
            keys: at.keys,
            weights: at.weights,
            norm: at.norm,
            block_table: at.block_table,
            seq_lens: at.seq_lens,
            stat_start: at.stat_start,
            stat_end: at.stat_end,
            raw: at.raw,
            partials: at.partials,
            head_stride: head_stride as i64,
            row_stride: row_stride as i64,
            block_stride: block_stride as i64,
            weights_seq_stride: if s.weights == WeightsScope::PerSequence { per_seq } else { 0 },
            raw_seq_stride: (s.num_layers * s.num_heads * s.max_len) as i64,
            raw_row_stride: s.max_len as i64,
            block_table_stride: bt_stride as i32,
            block_size: block_size as i32,
            num_seqs: s.num_seqs as i32,
            num_layers: s.num_layers as i32,
            num_heads: s.num_heads as i32,
            num_kv_heads: s.num_kv_heads as i32,
            group: (s.num_heads / s.num_kv_heads) as i32,
            num_vectors: s.vectors as i32,
            style: style_code(s.style),
            num_tiles: self.num_tiles() as i32,
        }
    }
}

/// Check a paged layout: blocks of 16 to 256 slots, pools of at most `i32::MAX` blocks, and
/// block-table rows long enough for `slots` slots.
pub(crate) fn check_paged(block_size: usize, num_blocks: usize, max_blocks: usize, slots: usize) -> Result<()> {
    let i32_max = i32::MAX as usize;
    ensure((16..=256).contains(&block_size), "block size", "16..=256", block_size)?;
    ensure(num_blocks >= 1 && num_blocks <= i32_max, "pool blocks", format!("1..={i32_max}"), num_blocks)?;
    ensure(
        max_blocks * block_size >= slots && max_blocks <= i32_max,
        "block-table row",
        format!("at least {} entries for {slots} slots", slots.div_ceil(block_size)),
        max_blocks,
    )
}

/// bf16 levels per weight in the max-mode image (`WEIGHT_LEVELS` in arch.cuh).
pub const WEIGHT_LEVELS: usize = 3;

/// u16 elements of one head's max-mode weight image: `3 × jpad × (D + 8)`, `jpad` = `vectors`
/// rounded up to 8.
pub fn weight_image_len(vectors: usize, head_dim: usize) -> usize {
    WEIGHT_LEVELS * vectors.div_ceil(8) * 8 * (head_dim + 8)
}

/// Round to nearest even f32 -> bf16 bits (`float_to_bf16_bits` in arch.cuh).
fn bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    ((u.wrapping_add(0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

/// The max-mode weight image the score kernel multiplies: each f32 weight `w` as three bf16
/// levels `w0 + w1 + w2` (exactly `w` for normal values), laid out per head as
/// `[level][j][d]` with `jpad` rows and `D + 8` columns, zero padded. `weights` is
/// `[heads, vectors, head_dim]` f32 (e.g. [`crate::score::RoundWeights::weights`] of max mode,
/// `heads = L × H`); the result is `heads × weight_image_len(vectors, head_dim)` u16. The trig
/// kernel writes the same image on the device.
pub fn weight_levels(weights: &[f32], vectors: usize, head_dim: usize) -> Vec<u16> {
    let per_head = vectors * head_dim;
    let heads = weights.len().checked_div(per_head).unwrap_or(0);
    let jpad = vectors.div_ceil(8) * 8;
    let stride = head_dim + 8;
    let image = weight_image_len(vectors, head_dim);
    let mut out = vec![0u16; heads * image];
    for h in 0..heads {
        for j in 0..vectors {
            for d in 0..head_dim {
                let mut x = weights[(h * vectors + j) * head_dim + d];
                for level in 0..WEIGHT_LEVELS {
                    let b = bf16_bits(x);
                    out[h * image + (level * jpad + j) * stride + d] = b;
                    x -= f32::from_bits((b as u32) << 16);
                }
            }
        }
    }
    out
}

/// Inverse of [`weight_levels`]: the f32 weights `[heads, vectors, head_dim]` (sums in f64).
pub fn weights_from_levels(image: &[u16], vectors: usize, head_dim: usize) -> Vec<f32> {
    let len = weight_image_len(vectors, head_dim);
    let jpad = vectors.div_ceil(8) * 8;
    let stride = head_dim + 8;
    let mut out = Vec::with_capacity(image.len() / len.max(1) * vectors * head_dim);
    for img in image.chunks(len.max(1)) {
        for j in 0..vectors {
            for d in 0..head_dim {
                let sum: f64 = (0..WEIGHT_LEVELS)
                    .map(|level| f32::from_bits((img[(level * jpad + j) * stride + d] as u32) << 16) as f64)
                    .sum();
                out.push(sum as f32);
            }
        }
    }
    out
}

pub(crate) fn style_code(style: PairingStyle) -> i32 {
    match style {
        PairingStyle::Half => STYLE_HALF,
        PairingStyle::Interleaved => STYLE_INTERLEAVED,
    }
}

/// The addresses a scoring launch reads and writes (device addresses on the GPU, host addresses
/// under emu); 0 for an absent optional buffer (`block_table` when contiguous, `stat_start`,
/// `stat_end`, `partials`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScoreAddresses {
    /// `u64 [key_table_len]`: base addresses of key elements.
    pub keys: u64,
    /// `f32 [weights_len]` (mean) or `u16 [weights_len]` (max: the level image).
    pub weights: u64,
    /// `f32 [norm_len]`.
    pub norm: u64,
    /// `i32 [S, max_blocks]` (paged).
    pub block_table: u64,
    /// `i32 [S]`, each `<= max_len`.
    pub seq_lens: u64,
    /// `i32 [S]` first z-score candidate slot, or 0 for "from slot 0".
    pub stat_start: u64,
    /// `i32 [S]` one past the last z-score candidate slot (clamped to `seq_lens`), or 0 for
    /// "up to `seq_lens`". Candidates are the slots in `[stat_start, stat_end)`.
    pub stat_end: u64,
    /// `f32 [raw_len]` out.
    pub raw: u64,
    /// `RowPartial [partials_len]` out, or 0.
    pub partials: u64,
}

/// The shape of a weights (trig) launch: one round per sequence.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrigSpec {
    /// Layers L.
    pub num_layers: usize,
    /// Attention heads H.
    pub num_heads: usize,
    /// Head dimension D.
    pub head_dim: usize,
    /// Sequences S (one `round_start` each).
    pub num_seqs: usize,
    /// Offsets J (`1, 2, …, 2^(J-1)`).
    pub num_offsets: usize,
    /// Weight vectors written per head: 0 (trig excluded), 1 (mean) or J (max).
    pub vectors: usize,
    /// Pairing style of the keys the weights will score.
    pub style: PairingStyle,
    /// `σ = s²`.
    pub sigma: f64,
    /// `c = a − |q̄|` (true) or `a`.
    pub norm: crate::score::NormTerm,
}

/// Addresses of a weights launch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrigAddresses {
    /// `f32 [L, H, F]`.
    pub q_mean_real: u64,
    /// `f32 [L, H, F]`.
    pub q_mean_imag: u64,
    /// `f32 [L, H, F]`.
    pub q_abs_mean: u64,
    /// `f64 [F]`.
    pub omega: u64,
    /// `i64 [S]`.
    pub round_start: u64,
    /// Out: `f32 [S, L, H, 1, D]` (mean) or the `u16` level image (max); 0 when V = 0.
    pub weights: u64,
    /// `f32 [L, H, F]` out.
    pub norm: u64,
}

impl TrigSpec {
    /// Check the shape.
    ///
    /// # Errors
    /// `InvalidArgument` naming the first field out of range.
    pub fn validate(&self) -> Result<()> {
        ensure(self.num_layers >= 1 && self.num_layers <= 65535, "layers", "1..=65535", self.num_layers)?;
        ensure(self.num_heads >= 1, "heads", ">= 1", self.num_heads)?;
        ensure(self.head_dim >= 2 && self.head_dim.is_multiple_of(2), "head_dim", "even, >= 2", self.head_dim)?;
        ensure(self.num_seqs >= 1 && self.num_seqs <= 65535, "sequences", "1..=65535", self.num_seqs)?;
        ensure(
            (1..=MAX_VECTORS).contains(&self.num_offsets),
            "offsets",
            format!("1..={MAX_VECTORS}"),
            self.num_offsets,
        )?;
        ensure(
            self.vectors == 0 || self.vectors == 1 || self.vectors == self.num_offsets,
            "weight vectors",
            format!("0, 1 or {}", self.num_offsets),
            self.vectors,
        )?;
        Ok(())
    }

    /// Launch grid `(ceil(F / 32), L, S)`.
    pub fn grid(&self) -> (u32, u32, u32) {
        ((self.head_dim / 2).div_ceil(32) as u32, self.num_layers as u32, self.num_seqs as u32)
    }

    /// Elements of the weights output: f32 `[S, L, H, 1, D]` (mean), u16 level images
    /// `[S, L, H, 3, jpad, D + 8]` (max, see [`weight_levels`]), nothing when `vectors` is 0.
    pub fn weights_len(&self) -> usize {
        let per_head = match self.vectors {
            0 => 0,
            1 => self.head_dim,
            v => weight_image_len(v, self.head_dim),
        };
        self.num_seqs * self.num_layers * self.num_heads * per_head
    }

    /// Elements of each statistics tensor and of the norm output `[L, H, F]`.
    pub fn stats_len(&self) -> usize {
        self.num_layers * self.num_heads * self.head_dim / 2
    }

    /// The params of a launch over these addresses.
    pub fn params(&self, at: &TrigAddresses) -> TrigParams {
        TrigParams {
            q_mean_real: at.q_mean_real,
            q_mean_imag: at.q_mean_imag,
            q_abs_mean: at.q_abs_mean,
            omega: at.omega,
            round_start: at.round_start,
            weights: at.weights,
            norm: at.norm,
            sigma: self.sigma,
            num_seqs: self.num_seqs as i32,
            num_layers: self.num_layers as i32,
            num_heads: self.num_heads as i32,
            head_dim: self.head_dim as i32,
            num_offsets: self.num_offsets as i32,
            num_vectors: self.vectors as i32,
            style: style_code(self.style),
            norm_residual: i32::from(self.norm == crate::score::NormTerm::MeanResidual),
        }
    }
}
