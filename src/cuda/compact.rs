//! The `compact` op's launch description: [`CompactSpec`] (validated shapes, the variant, the
//! grid) and, with feature `cuda`, the launcher on a caller's stream.
//!
//! Physical eviction after selection, for all layers and KV heads of [`CompactShape::num_seqs`]
//! sequences of one shape in one launch (grid z = sequence; tables hold `S * L` bases, sequence
//! `s` at `s * L`; keep sets, slot maps and positions stacked per sequence, see
//! [`CompactSpec::keep_seq_stride`] and [`CompactSpec::pos_seq_stride`]; paged: one block-table
//! row of `max_blocks` entries per sequence, blocks distinct across all sequences):
//! each `(layer, KV head)` names a keep set (`set_index`, so per-head, per-layer-per-head and
//! union selections all fit), and K and V rows move as byte copies (any dtype; K and V rows may
//! differ in size).
//!
//! Contract of the two modes (`src/cpu/compact.rs` is the specification):
//!
//! - [`CompactMode::OrderPreserving`]: row `i` receives row `keep[i]`. Out of place
//!   ([`CompactTarget::OutOfPlace`]: the destination must not overlap the source) the rows are
//!   spread over many blocks. In place ([`CompactTarget::InPlace`]) a parallel copy would let a
//!   write land on a row another block has yet to read, so the spec launches one block per
//!   (layer, KV head) that walks its rows in ascending tiles, reading a whole tile before writing
//!   it: safe because `keep[i] >= i`.
//! - [`CompactMode::HoleFilling`] (in place only): kept rows at slots `>= K` fill the evicted
//!   slots `< K`, the i-th such row into the i-th hole; sources and destinations are disjoint,
//!   so any number of blocks run at once, and at most `min(K, N - K)` rows move.
//!
//! Per keep set the launch also writes, when asked, the slot map `i32 [sets, K]` (the original
//! slot now held by each slot: `keep` itself when order-preserving) and the kept positions
//! (`i32` or `i64`, `[sets, N]` in, `[sets, K]` out of place, or rewritten in place).

use crate::error::{ensure, Result};
use crate::tuning::{Bucket, ChoiceSource, Dispatch};
use crate::variant::{self, CompactMode, Kernel, Variant, COMPACT_CHUNKS, COMPACT_THREADS};

use super::params::{CompactParams, CompactTensor};
use super::spec::PageOrder;

/// Whether a compaction writes over its source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CompactTarget {
    /// Destination tables equal the source tables; positions are rewritten in `[sets, N]`.
    InPlace,
    /// A separate destination (order-preserving only); positions go to `[sets, K]`.
    OutOfPlace,
}

/// Element type of the positions compacted alongside the rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PositionType {
    /// `i32`.
    I32,
    /// `i64`.
    I64,
}

impl PositionType {
    /// Bytes per position.
    pub const fn size(self) -> usize {
        match self {
            PositionType::I32 => 4,
            PositionType::I64 => 8,
        }
    }
}

/// Element strides of one contiguous `[Hkv, N, dim]` tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RowStrides {
    /// Elements between KV heads.
    pub head_stride: usize,
    /// Elements between slots.
    pub row_stride: usize,
}

/// Where the rows of a compaction live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CompactLayout {
    /// Per layer one `K[Hkv, N, D]` and one `V[Hkv, N, Dv]` tensor; the destination has its own
    /// strides (equal to the source's in place).
    Contiguous {
        /// K source strides.
        k: RowStrides,
        /// V source strides.
        v: RowStrides,
        /// K destination strides.
        k_dst: RowStrides,
        /// V destination strides.
        v_dst: RowStrides,
    },
    /// Per layer one K and one V block pool (destination pools share the layout), one
    /// block-table row `i32[max_blocks]` of distinct blocks per sequence (rows `max_blocks`
    /// apart; blocks distinct across the sequences of one launch).
    Paged {
        /// Slots per block, 16 to 256.
        block_size: usize,
        /// Axis order inside a block.
        order: PageOrder,
        /// Blocks in each pool.
        num_blocks: usize,
        /// Entries of the block-table row.
        max_blocks: usize,
    },
}

/// The shape of a compaction, before validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CompactShape {
    /// Order-preserving or hole-filling.
    pub mode: CompactMode,
    /// In place or into a separate destination.
    pub target: CompactTarget,
    /// Bytes per K and V element (2 for f16/bf16, 4 for f32).
    pub elem_bytes: usize,
    /// Layers L.
    pub num_layers: usize,
    /// KV heads Hkv.
    pub num_kv_heads: usize,
    /// Keep sets.
    pub num_sets: usize,
    /// Slots before compaction, N.
    pub num_slots: usize,
    /// Slots kept, K (every set has K entries).
    pub keep_len: usize,
    /// Elements per K row, D.
    pub key_dim: usize,
    /// Elements per V row, Dv.
    pub value_dim: usize,
    /// Cache layout.
    pub layout: CompactLayout,
    /// Positions compacted alongside, if any.
    pub positions: Option<PositionType>,
    /// Sequences S of this shape in one launch (the grid's z), `1..=65535`.
    pub num_seqs: usize,
}

/// A validated compaction launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompactSpec {
    shape: CompactShape,
    variant: Variant,
    rows_per_tile: usize,
}

/// The addresses a compaction reads and writes (device addresses on the GPU, host addresses
/// under emu); 0 for an absent optional buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactAddresses {
    /// `u64 [S * L]` K source bases (tensors or pools), sequence `s` at `s * L`.
    pub k_src: u64,
    /// `u64 [S * L]` K destination bases (the same table in place).
    pub k_dst: u64,
    /// `u64 [S * L]` V source bases.
    pub v_src: u64,
    /// `u64 [S * L]` V destination bases.
    pub v_dst: u64,
    /// `i32 [S, sets, K]` ascending slots.
    pub keep: u64,
    /// `i32 [L * Hkv]` set of each (layer, KV head), each `< sets`, shared by the sequences.
    pub set_index: u64,
    /// `i32 [S, max_blocks]` (paged), else 0.
    pub block_table: u64,
    /// `i32 [S, sets, K]` out, or 0.
    pub slot_map: u64,
    /// Positions `[S, sets, N]`, or 0.
    pub pos_src: u64,
    /// Positions out: `[S, sets, K]` out of place, `[S, sets, N]` in place (then equal to
    /// `pos_src`).
    pub pos_dst: u64,
}

/// Bytes one block of the built-in variants stages per tile.
const TILE_BYTES: usize = COMPACT_THREADS * COMPACT_CHUNKS * 16;

/// Bytes one block of `variant` stages per tile.
fn tile_bytes(variant: Variant) -> usize {
    match variant.kernel {
        Kernel::Compact { threads, chunks, .. } => threads * chunks * 16,
        _ => unreachable!("a compact family holds compact kernels"),
    }
}

impl CompactSpec {
    /// Check `shape` against what the kernel assumes and pick the variant.
    ///
    /// # Errors
    /// `InvalidArgument` naming the first field out of range.
    pub fn new(shape: CompactShape) -> Result<Self> {
        Self::tuned(shape, &Dispatch::built_in()).map(|(spec, _)| spec)
    }

    /// [`Self::new`] with the variant `dispatch` picks for the mode's family (`len` = slots,
    /// `batch` = sequences) among those whose tile holds a K and a V row.
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn tuned(shape: CompactShape, dispatch: &Dispatch) -> Result<(Self, ChoiceSource)> {
        let s = &shape;
        let i32_max = i32::MAX as usize;
        ensure(s.num_layers >= 1, "layers", ">= 1", s.num_layers)?;
        ensure(s.num_kv_heads >= 1, "KV heads", ">= 1", s.num_kv_heads)?;
        ensure(s.num_sets >= 1, "keep sets", ">= 1", s.num_sets)?;
        ensure(s.num_seqs >= 1 && s.num_seqs <= 65535, "sequences", "1..=65535", s.num_seqs)?;
        let blocks_y = s.num_layers.saturating_mul(s.num_kv_heads).saturating_add(s.num_sets);
        ensure(blocks_y <= 65535, "layers x KV heads + keep sets", "<= 65535", blocks_y)?;
        ensure(s.num_slots >= 1 && s.num_slots <= i32_max, "slots", format!("1..={i32_max}"), s.num_slots)?;
        ensure(s.keep_len >= 1 && s.keep_len <= s.num_slots, "kept slots", format!("1..={}", s.num_slots), s.keep_len)?;
        ensure(
            s.num_sets.saturating_mul(s.num_slots) <= i32_max,
            "keep sets x slots",
            format!("<= {i32_max}"),
            s.num_sets.saturating_mul(s.num_slots),
        )?;
        ensure(matches!(s.elem_bytes, 1 | 2 | 4 | 8), "element bytes", "1, 2, 4 or 8", s.elem_bytes)?;
        for (what, dim) in [("key row", s.key_dim), ("value row", s.value_dim)] {
            let bytes = dim.saturating_mul(s.elem_bytes);
            ensure(
                bytes >= 16 && bytes % 16 == 0 && bytes <= TILE_BYTES,
                what,
                format!("a multiple of 16 bytes, 16..={TILE_BYTES}"),
                format!("{bytes} bytes"),
            )?;
        }
        if s.mode == CompactMode::HoleFilling {
            ensure(s.target == CompactTarget::InPlace, "hole-filling target", "in place", "out of place")?;
        }
        let aligned = |what: &str, elems: usize| {
            ensure(
                (elems * s.elem_bytes).is_multiple_of(16),
                what,
                "a multiple of 16 bytes",
                format!("{} bytes", elems * s.elem_bytes),
            )
        };
        match s.layout {
            CompactLayout::Contiguous { k, v, k_dst, v_dst } => {
                for (what, st, dim) in [
                    ("key", k, s.key_dim),
                    ("value", v, s.value_dim),
                    ("destination key", k_dst, s.key_dim),
                    ("destination value", v_dst, s.value_dim),
                ] {
                    aligned(&format!("{what} head stride"), st.head_stride)?;
                    aligned(&format!("{what} row stride"), st.row_stride)?;
                    ensure(
                        st.row_stride >= dim,
                        &format!("{what} row stride"),
                        format!(">= the row's {dim} elements"),
                        st.row_stride,
                    )?;
                }
                if s.target == CompactTarget::InPlace {
                    ensure(k_dst == k && v_dst == v, "in-place destination strides", "the source strides", "others")?;
                }
            }
            CompactLayout::Paged { block_size, num_blocks, max_blocks, .. } => {
                ensure((16..=256).contains(&block_size), "block size", "16..=256", block_size)?;
                ensure(num_blocks >= 1 && num_blocks <= i32_max, "pool blocks", format!("1..={i32_max}"), num_blocks)?;
                ensure(
                    max_blocks.saturating_mul(block_size) >= s.num_slots && max_blocks <= i32_max,
                    "block-table row",
                    format!("at least {} entries for {} slots", s.num_slots.div_ceil(block_size), s.num_slots),
                    max_blocks,
                )?;
            }
        }
        let widest = (s.key_dim * s.elem_bytes).max(s.value_dim * s.elem_bytes);
        let default = variant::compact_variant(s.mode);
        let bucket = Bucket { len: s.num_slots, batch: s.num_seqs };
        let (variant, source) = dispatch
            .pick(&default.family(), bucket, &|v| tile_bytes(v) >= widest)
            .unwrap_or((default, ChoiceSource::BuiltIn));
        let rows_per_tile = (tile_bytes(variant) / widest).max(1);
        Ok((Self { shape, variant, rows_per_tile }, source))
    }

    /// The validated shape.
    pub fn shape(&self) -> &CompactShape {
        &self.shape
    }

    /// The variant a launch runs.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// Rows (order-preserving) or movers (hole-filling) per block tile.
    pub fn rows_per_tile(&self) -> usize {
        self.rows_per_tile
    }

    /// Most rows one (layer, KV head) moves: `K` (order-preserving), `min(K, N - K)` (hole).
    pub fn max_moves(&self) -> usize {
        let s = &self.shape;
        match s.mode {
            CompactMode::OrderPreserving => s.keep_len,
            CompactMode::HoleFilling => s.keep_len.min(s.num_slots - s.keep_len),
        }
    }

    /// Launch grid `(row tiles, L * Hkv + sets, S)`; one tile column when order-preserving in
    /// place (see the module docs).
    pub fn grid(&self) -> (u32, u32, u32) {
        let s = &self.shape;
        let tiles = match (s.mode, s.target) {
            (CompactMode::OrderPreserving, CompactTarget::InPlace) => 1,
            _ => self.max_moves().div_ceil(self.rows_per_tile).max(1),
        };
        (tiles as u32, (s.num_layers * s.num_kv_heads + s.num_sets) as u32, s.num_seqs as u32)
    }

    /// Threads per block.
    pub fn threads(&self) -> u32 {
        self.variant.threads() as u32
    }

    /// Entries of the keep sets and of the slot map, all sequences: `S * sets * K`.
    pub fn keep_entries(&self) -> usize {
        self.shape.num_seqs * self.keep_seq_stride()
    }

    /// Entries between sequences' keep sets and slot maps: `sets * K`.
    pub fn keep_seq_stride(&self) -> usize {
        self.shape.num_sets * self.shape.keep_len
    }

    /// Entries of the source positions `[S, sets, N]`.
    pub fn positions_len(&self) -> usize {
        self.shape.num_seqs * self.shape.num_sets * self.shape.num_slots
    }

    /// Entries between sequences' position outputs: `sets * N` in place, `sets * K` out of place
    /// (source positions are always `sets * N` apart).
    pub fn pos_seq_stride(&self) -> usize {
        self.shape.num_sets * self.pos_dst_stride()
    }

    /// Entries of the position output: `[S, sets, K]` out of place, `[S, sets, N]` in place.
    pub fn positions_out_len(&self) -> usize {
        self.shape.num_seqs * self.pos_seq_stride()
    }

    /// Entries of the K and V base tables: `S * L`.
    pub fn table_len(&self) -> usize {
        self.shape.num_seqs * self.shape.num_layers
    }

    fn pos_dst_stride(&self) -> usize {
        match self.shape.target {
            CompactTarget::InPlace => self.shape.num_slots,
            CompactTarget::OutOfPlace => self.shape.keep_len,
        }
    }

    /// Byte strides `(block, head, row)` of the K (`value = false`) or V source, and of its
    /// destination `(head, row)`.
    pub fn byte_strides(&self, value: bool) -> ((usize, usize, usize), (usize, usize)) {
        let s = &self.shape;
        let eb = s.elem_bytes;
        let dim = if value { s.value_dim } else { s.key_dim };
        match s.layout {
            CompactLayout::Contiguous { k, v, k_dst, v_dst } => {
                let (src, dst) = if value { (v, v_dst) } else { (k, k_dst) };
                ((0, src.head_stride * eb, src.row_stride * eb), (dst.head_stride * eb, dst.row_stride * eb))
            }
            CompactLayout::Paged { block_size, order, .. } => {
                let block = block_size * s.num_kv_heads * dim * eb;
                let (head, row) = match order {
                    PageOrder::Nhd => (dim * eb, s.num_kv_heads * dim * eb),
                    PageOrder::Hnd => (block_size * dim * eb, dim * eb),
                };
                ((block, head, row), (head, row))
            }
        }
    }

    /// Bytes of each layer's K (`value = false`) or V buffer (each of the `S * L` table
    /// entries) that the launch may touch: the tensor up to its last row (contiguous) or the
    /// whole pool (paged).
    pub fn layer_bytes(&self, value: bool, destination: bool) -> usize {
        let s = &self.shape;
        let dim = if value { s.value_dim } else { s.key_dim };
        let ((block, head, row), (dhead, drow)) = self.byte_strides(value);
        match s.layout {
            CompactLayout::Paged { num_blocks, .. } => num_blocks * block,
            CompactLayout::Contiguous { .. } => {
                let (h, r, n) = if destination && s.target == CompactTarget::OutOfPlace {
                    (dhead, drow, s.keep_len)
                } else {
                    (head, row, s.num_slots)
                };
                (s.num_kv_heads - 1) * h + (n - 1) * r + dim * s.elem_bytes
            }
        }
    }

    /// The params of a launch over these addresses.
    pub fn params(&self, at: &CompactAddresses) -> CompactParams {
        let s = &self.shape;
        let tensor = |value: bool, src: u64, dst: u64| {
            let ((block, head, row), (dhead, drow)) = self.byte_strides(value);
            let dim = if value { s.value_dim } else { s.key_dim };
            CompactTensor {
                src,
                dst,
                head_stride: head as i64,
                row_stride: row as i64,
                dst_head_stride: dhead as i64,
                dst_row_stride: drow as i64,
                block_stride: block as i64,
                row_bytes: (dim * s.elem_bytes) as i32,
                pad: 0,
            }
        };
        let (block_size, block_table_stride) = match s.layout {
            CompactLayout::Contiguous { .. } => (0, 0),
            CompactLayout::Paged { block_size, max_blocks, .. } => (block_size, max_blocks),
        };
        CompactParams {
            k: tensor(false, at.k_src, at.k_dst),
            v: tensor(true, at.v_src, at.v_dst),
            keep: at.keep,
            set_index: at.set_index,
            block_table: at.block_table,
            slot_map: at.slot_map,
            pos_src: if s.positions.is_some() { at.pos_src } else { 0 },
            pos_dst: if s.positions.is_some() { at.pos_dst } else { 0 },
            pos_dst_stride: self.pos_dst_stride() as i64,
            num_layers: s.num_layers as i32,
            num_kv_heads: s.num_kv_heads as i32,
            num_sets: s.num_sets as i32,
            num_slots: s.num_slots as i32,
            keep_len: s.keep_len as i32,
            rows_per_tile: self.rows_per_tile as i32,
            block_size: block_size as i32,
            pos_bytes: s.positions.map_or(8, PositionType::size) as i32,
            num_seqs: s.num_seqs as i32,
            block_table_stride: block_table_stride as i32,
            keep_seq_stride: self.keep_seq_stride() as i64,
            pos_seq_stride: self.pos_seq_stride() as i64,
        }
    }
}

#[cfg(feature = "cuda")]
impl super::runtime::CudaBackend {
    /// Compact K and V (and slot maps, positions) on the GPU over raw device addresses, on the
    /// caller's stream: one launch, no allocation, copy or synchronisation.
    ///
    /// # Errors
    /// `KernelsUnavailable` for a build without kernels, `Driver` for a failed load or launch.
    ///
    /// # Safety
    /// Every address in `at` is device memory of this context with the length [`CompactSpec`]
    /// documents (tables of `S * L` bases, each buffer at least [`CompactSpec::layer_bytes`], keep
    /// sets strictly ascending in `[0, N)`, set indices `< sets`, a block-table row of distinct
    /// in-range blocks); the destination does not overlap the source out of place; `stream`
    /// belongs to this context; the buffers stay alive until the kernel has run.
    pub unsafe fn launch_compact_raw(
        &self,
        spec: &CompactSpec,
        at: &CompactAddresses,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<()> {
        let params = spec.params(at);
        // SAFETY: the caller's contract; params from a validated spec for its own variant, no
        // dynamic shared memory.
        unsafe { self.launch(spec.variant(), &params, spec.grid(), 0, stream) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(mode: CompactMode, target: CompactTarget) -> CompactShape {
        let st = RowStrides { head_stride: 64 * 128, row_stride: 128 };
        CompactShape {
            mode,
            target,
            elem_bytes: 2,
            num_layers: 4,
            num_kv_heads: 8,
            num_sets: 8,
            num_slots: 64,
            keep_len: 48,
            key_dim: 128,
            value_dim: 128,
            layout: CompactLayout::Contiguous { k: st, v: st, k_dst: st, v_dst: st },
            positions: Some(PositionType::I64),
            num_seqs: 1,
        }
    }

    #[test]
    fn grids_follow_the_contract() {
        let s = CompactSpec::new(shape(CompactMode::OrderPreserving, CompactTarget::InPlace)).unwrap();
        assert_eq!(s.grid(), (1, 40, 1));
        let s = CompactSpec::new(shape(CompactMode::OrderPreserving, CompactTarget::OutOfPlace)).unwrap();
        assert_eq!(s.rows_per_tile(), 64);
        assert_eq!(s.grid(), (1, 40, 1));
        let s = CompactSpec::new(shape(CompactMode::HoleFilling, CompactTarget::InPlace)).unwrap();
        assert_eq!(s.max_moves(), 16);
        assert!(CompactSpec::new(shape(CompactMode::HoleFilling, CompactTarget::OutOfPlace)).is_err());
        let mut bad = shape(CompactMode::OrderPreserving, CompactTarget::InPlace);
        bad.key_dim = 4;
        assert!(CompactSpec::new(bad).is_err());
        bad.key_dim = 128;
        bad.keep_len = 65;
        assert!(CompactSpec::new(bad).is_err());
    }
}
