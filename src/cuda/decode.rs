//! The `decode` op's launch description: [`DecodeSpec`] (a validated [`DecodeShape`], the
//! variants, the split count, the grid, the params) for sparse decode attention over each KV
//! head's slot list (`src/decode.rs` has the formula, `src/cpu/decode.rs` the specification).
//!
//! One launch decodes `S` sequences of one shape over a range of layers (all of them, or the one
//! layer an engine's forward pass is at): grid `(splits, Hkv * row_chunks, S * layers)`, every
//! block reads each listed K and V row of its split once for the `G * T` query rows of its KV
//! head (in chunks of the variant's rows, 8 by default). With more than one split the blocks
//! write parts into a workspace and a second launch (`combine`) merges them; the split count comes from the
//! longest list and the GPU's SM count ([`SplitPolicy`]), so batch 1 with a long list still
//! fills the GPU.
//!
//! Buffers a launch reads (element offsets):
//! - queries `[S, layers, H, T, D]` of [`DecodeShape::query_dtype`], contiguous;
//! - K and V tables: `S * L` tensor addresses (contiguous, sequence-major) or `L` pool addresses
//!   (paged, with a block table `i32 [S, max_blocks]`);
//! - lists `i32 [S, lists, list_capacity]` ascending slots, lengths `i32 [S, lists]` (or every
//!   list full: [`ListLengths::Full`]); dense: `i32 [S]` visible slots per sequence;
//! - sinks `f32 [L, H]`;
//! - outputs o `f32 [S, layers, H, T, Dv]` and lse `f32 [S, layers, H, T]`.

use crate::decode::{DecodeOptions, ListLayout};
use crate::dtype::DType;
use crate::error::{ensure, Error, Result};
use crate::tuning::{Bucket, ChoiceSource, Dispatch};
use crate::variant::{self, Kernel, Variant, DECODE_MAX_DV, DECODE_MAX_SPLITS, HEAD_DIMS};

use super::params::{dtype_code, list_layout_code, DecodeCombineParams, DecodeParams};
use super::plan::CacheLayout;
use super::spec::PageOrder;

/// How long each list is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ListLengths {
    /// Every list holds `list_capacity` entries (the keep sets of a round).
    Full,
    /// `i32 [S, lists]` lengths at [`DecodeAddresses::list_lens`] (ragged lists).
    PerList,
}

/// How many splits a decode uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SplitPolicy {
    /// Enough blocks to cover about two waves of a GPU with `sm_count` SMs, each split at least
    /// one tile; one split when the blocks without splitting already do.
    Auto {
        /// Streaming multiprocessors of the GPU.
        sm_count: usize,
    },
    /// Exactly this many splits (1..=[`DECODE_MAX_SPLITS`]; capped at one tile per split).
    Fixed(usize),
}

/// The shape of a decode.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeShape {
    /// K and V element type.
    pub dtype: DType,
    /// Query element type.
    pub query_dtype: DType,
    /// Sequences S.
    pub num_seqs: usize,
    /// Layers L of the K/V tables, lists and sinks.
    pub num_layers: usize,
    /// Attention heads H.
    pub num_heads: usize,
    /// KV heads Hkv.
    pub num_kv_heads: usize,
    /// Head dimension D of q and K.
    pub head_dim: usize,
    /// Value dimension Dv.
    pub value_dim: usize,
    /// Decode queries per head T.
    pub num_queries: usize,
    /// Slots each sequence's K/V tensors hold (the bound of every list entry).
    pub len: usize,
    /// Where the rows live (strides of `[Hkv, len, dim]` tensors, or block pools).
    pub layout: CacheLayout,
    /// Which list each (layer, KV head) reads.
    pub lists: ListLayout,
    /// Entries between lists (the longest list's length at most); ignored when dense.
    pub list_capacity: usize,
    /// How long each list is.
    pub list_lengths: ListLengths,
    /// Whether sinks `f32 [L, H]` join the normaliser.
    pub sinks: bool,
    /// Scale and soft-capping.
    pub options: DecodeOptions,
    /// How many splits.
    pub splits: SplitPolicy,
}

/// Addresses of one decode launch (device addresses on the GPU, host addresses under emu).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeAddresses {
    /// u64 `[S * L]` K tensor addresses (paged: `[L]` pools).
    pub keys: u64,
    /// u64 `[S * L]` V tensor addresses (paged: `[L]` pools).
    pub values: u64,
    /// Queries `[S, layers, H, T, D]`.
    pub queries: u64,
    /// f32 `[L, H]` sinks (with [`DecodeShape::sinks`]), else 0.
    pub sinks: u64,
    /// i32 `[S, lists, list_capacity]` lists, else 0 (dense).
    pub lists: u64,
    /// i32 `[S, lists]` lengths ([`ListLengths::PerList`]), else 0.
    pub list_lens: u64,
    /// i32 `[S]` visible slots (dense), else 0.
    pub seq_lens: u64,
    /// i32 `[S, max_blocks]` block table (paged), else 0.
    pub block_table: u64,
    /// f32 `[S, layers, H, T, Dv]` o.
    pub out: u64,
    /// f32 `[S, layers, H, T]` lse.
    pub lse: u64,
    /// The parts of a split decode ([`DecodeSpec::workspace_bytes`] bytes, 16-byte aligned),
    /// else 0.
    pub workspace: u64,
}

/// A validated decode: its variants, split count and launches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeSpec {
    shape: DecodeShape,
    variant: Variant,
    scale: f32,
    row_chunks: usize,
    splits: usize,
    split_len: usize,
}

impl DecodeSpec {
    /// Validate `shape` and choose the split count.
    ///
    /// # Errors
    /// `InvalidArgument` naming the first field out of range; `Unsupported` for a dtype and
    /// head_dim with no compiled variant or a value dim above [`DECODE_MAX_DV`].
    pub fn new(shape: DecodeShape) -> Result<Self> {
        Self::tuned(shape, &Dispatch::built_in()).map(|(spec, _)| spec)
    }

    /// [`Self::new`] with the variant `dispatch` picks for the family `decode <dtype> d<D>`
    /// (`len` = the longest list, or the slots when dense; `batch` = sequences).
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn tuned(shape: DecodeShape, dispatch: &Dispatch) -> Result<(Self, ChoiceSource)> {
        let s = &shape;
        let i32_max = i32::MAX as usize;
        s.options.validate()?;
        ensure(s.num_seqs >= 1 && s.num_seqs <= 65535, "sequences", "1..=65535", s.num_seqs)?;
        ensure(s.num_layers >= 1, "layers", ">= 1", s.num_layers)?;
        ensure(s.num_seqs * s.num_layers <= 65535, "sequences x layers", "<= 65535", s.num_seqs * s.num_layers)?;
        ensure(s.num_kv_heads >= 1, "KV heads", ">= 1", s.num_kv_heads)?;
        ensure(
            s.num_heads >= s.num_kv_heads && s.num_heads.is_multiple_of(s.num_kv_heads),
            "attention heads",
            format!("a multiple of the {} KV heads", s.num_kv_heads),
            s.num_heads,
        )?;
        ensure(s.num_queries >= 1, "queries per head", ">= 1", s.num_queries)?;
        ensure(s.len >= 1 && s.len <= i32_max, "cached slots", format!("1..={i32_max}"), s.len)?;
        let Some(default) = variant::decode_variant(s.dtype, s.head_dim) else {
            return Err(Error::unsupported(format!(
                "decode: head_dim {} ({}): kernels are compiled for head_dim {:?}",
                s.head_dim, s.dtype, HEAD_DIMS
            )));
        };
        let vec = 16 / s.dtype.size();
        if s.value_dim == 0 || !s.value_dim.is_multiple_of(vec) || s.value_dim > DECODE_MAX_DV {
            return Err(Error::unsupported(format!(
                "decode: value dim {}: expected a multiple of {vec} (16 bytes of {}) up to {DECODE_MAX_DV}",
                s.value_dim, s.dtype
            )));
        }
        let aligned = |what: &str, v: usize| {
            ensure(v.is_multiple_of(vec), what, format!("a multiple of {vec} elements (16 bytes)"), v)
        };
        match s.layout {
            CacheLayout::Contiguous { keys, values } => {
                aligned("key head stride", keys.head_stride)?;
                aligned("key row stride", keys.row_stride)?;
                aligned("value head stride", values.head_stride)?;
                aligned("value row stride", values.row_stride)?;
                ensure(keys.row_stride >= s.head_dim, "key row stride", format!(">= {}", s.head_dim), keys.row_stride)?;
                ensure(
                    values.row_stride >= s.value_dim,
                    "value row stride",
                    format!(">= {}", s.value_dim),
                    values.row_stride,
                )?;
            }
            CacheLayout::Paged { block_size, num_blocks, max_blocks, .. } => {
                super::spec::check_paged(block_size, num_blocks, max_blocks, s.len)?;
            }
        }
        if s.lists != ListLayout::Dense {
            ensure(
                s.list_capacity >= 1 && s.list_capacity <= i32_max,
                "list capacity",
                format!("1..={i32_max}"),
                s.list_capacity,
            )?;
        }
        let longest = if s.lists == ListLayout::Dense { s.len } else { s.list_capacity };
        let bucket = Bucket { len: longest, batch: s.num_seqs };
        let (variant, source) =
            dispatch.pick(&default.family(), bucket, &|_| true).unwrap_or((default, ChoiceSource::BuiltIn));
        let (block_rows, threads) = match variant.kernel {
            Kernel::Decode { rows, threads, .. } => (rows, threads),
            _ => unreachable!("a decode family holds decode kernels"),
        };
        let rows = (s.num_heads / s.num_kv_heads) * s.num_queries;
        let row_chunks = rows.div_ceil(block_rows);
        ensure(
            s.num_kv_heads * row_chunks <= 65535,
            "KV heads x query-row chunks",
            "<= 65535",
            s.num_kv_heads * row_chunks,
        )?;
        let tiles = longest.div_ceil(threads).max(1);
        let wanted = match s.splits {
            SplitPolicy::Fixed(n) => {
                ensure((1..=DECODE_MAX_SPLITS).contains(&n), "splits", format!("1..={DECODE_MAX_SPLITS}"), n)?;
                n
            }
            SplitPolicy::Auto { sm_count } => {
                let blocks = s.num_seqs * s.num_layers * s.num_kv_heads * row_chunks;
                let target = 2 * sm_count.max(1);
                if blocks >= target {
                    1
                } else {
                    target.div_ceil(blocks).min(DECODE_MAX_SPLITS)
                }
            }
        };
        let tiles_per_split = tiles.div_ceil(wanted.min(tiles));
        let split_len = tiles_per_split * threads;
        let splits = longest.div_ceil(split_len).max(1);
        let scale = s.options.scale_for(s.head_dim);
        Ok((Self { shape, variant, scale, row_chunks, splits, split_len }, source))
    }

    /// The validated shape.
    pub fn shape(&self) -> &DecodeShape {
        &self.shape
    }

    /// The decode variant.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// The combine variant, when the decode is split.
    pub fn combine_variant(&self) -> Option<Variant> {
        (self.splits > 1).then(variant::decode_combine_variant)
    }

    /// Splits of every list.
    pub fn splits(&self) -> usize {
        self.splits
    }

    /// List entries per split (a multiple of the tile).
    pub fn split_len(&self) -> usize {
        self.split_len
    }

    /// Lists per sequence (0 when dense).
    pub fn num_lists(&self) -> usize {
        self.shape.lists.num_lists(self.shape.num_layers, self.shape.num_kv_heads)
    }

    /// Workspace bytes of a launch over `layers` layers (the parts; 0 with one split).
    pub fn workspace_bytes(&self, layers: usize) -> usize {
        if self.splits == 1 {
            return 0;
        }
        let s = &self.shape;
        let rows = s.num_seqs * layers * s.num_heads * s.num_queries * self.splits;
        (rows * s.value_dim * 4).next_multiple_of(256) + rows * 4
    }

    /// Check a launch's layer range `first_layer..first_layer + layers`.
    pub(crate) fn check_layers(&self, first_layer: usize, layers: usize) -> Result<()> {
        let l = self.shape.num_layers;
        ensure(
            layers >= 1 && first_layer + layers <= l,
            "decode layers",
            format!("a range inside 0..{l}"),
            format!("{first_layer}..{}", first_layer + layers),
        )
    }

    /// Element strides `(block, head, row)` of K and V.
    fn strides(&self) -> [(usize, usize, usize); 2] {
        let s = &self.shape;
        let paged = |dim: usize, block_size: usize, order: PageOrder| match order {
            PageOrder::Nhd => (block_size * s.num_kv_heads * dim, dim, s.num_kv_heads * dim),
            PageOrder::Hnd => (block_size * s.num_kv_heads * dim, block_size * dim, dim),
        };
        match s.layout {
            CacheLayout::Contiguous { keys, values } => {
                [(0, keys.head_stride, keys.row_stride), (0, values.head_stride, values.row_stride)]
            }
            CacheLayout::Paged { block_size, order, .. } => {
                [paged(s.head_dim, block_size, order), paged(s.value_dim, block_size, order)]
            }
        }
    }

    /// The grid of the decode launch over `layers` layers.
    pub fn grid(&self, layers: usize) -> (u32, u32, u32) {
        let s = &self.shape;
        (self.splits as u32, (s.num_kv_heads * self.row_chunks) as u32, (s.num_seqs * layers) as u32)
    }

    /// The grid of the combine launch over `layers` layers.
    pub fn combine_grid(&self, layers: usize) -> (u32, u32, u32) {
        let s = &self.shape;
        ((s.num_seqs * layers * s.num_heads * s.num_queries) as u32, 1, 1)
    }

    /// The params of the decode launch over layers `first_layer..first_layer + layers`.
    ///
    /// # Errors
    /// `InvalidArgument` for a layer range outside the shape.
    pub fn params(&self, at: &DecodeAddresses, first_layer: usize, layers: usize) -> Result<DecodeParams> {
        self.check_layers(first_layer, layers)?;
        let s = &self.shape;
        let [(kb, kh, kr), (vb, vh, vr)] = self.strides();
        let (block_size, bt_stride) = match s.layout {
            CacheLayout::Contiguous { .. } => (0, 0),
            CacheLayout::Paged { block_size, max_blocks, .. } => (block_size, max_blocks),
        };
        let (h, t, d, dv) = (s.num_heads, s.num_queries, s.head_dim, s.value_dim);
        let parts = self.splits > 1;
        let part_out_bytes = (s.num_seqs * layers * h * t * self.splits * dv * 4).next_multiple_of(256);
        Ok(DecodeParams {
            keys: at.keys,
            values: at.values,
            queries: at.queries,
            sinks: at.sinks,
            lists: at.lists,
            list_lens: at.list_lens,
            seq_lens: at.seq_lens,
            block_table: at.block_table,
            out: at.out,
            lse: at.lse,
            part_out: if parts { at.workspace } else { 0 },
            part_lse: if parts { at.workspace + part_out_bytes as u64 } else { 0 },
            k_head_stride: kh as i64,
            k_row_stride: kr as i64,
            k_block_stride: kb as i64,
            v_head_stride: vh as i64,
            v_row_stride: vr as i64,
            v_block_stride: vb as i64,
            q_seq_stride: (layers * h * t * d) as i64,
            q_layer_stride: (h * t * d) as i64,
            q_head_stride: (t * d) as i64,
            q_token_stride: d as i64,
            list_seq_stride: (self.num_lists() * s.list_capacity) as i64,
            list_stride: s.list_capacity as i64,
            out_seq_stride: (layers * h * t * dv) as i64,
            out_row_stride: dv as i64,
            lse_seq_stride: (layers * h * t) as i64,
            scale: self.scale,
            softcap: s.options.softcap.unwrap_or(0.0),
            num_seqs: s.num_seqs as i32,
            num_layers: s.num_layers as i32,
            first_layer: first_layer as i32,
            launch_layers: layers as i32,
            num_heads: h as i32,
            num_kv_heads: s.num_kv_heads as i32,
            group: (h / s.num_kv_heads) as i32,
            num_queries: t as i32,
            value_dim: dv as i32,
            list_layout: list_layout_code(s.lists),
            num_lists: self.num_lists() as i32,
            list_len: s.list_capacity as i32,
            split_len: self.split_len as i32,
            num_splits: self.splits as i32,
            row_chunks: self.row_chunks as i32,
            block_size: block_size as i32,
            block_table_stride: bt_stride as i32,
            query_dtype: dtype_code(s.query_dtype),
        })
    }

    /// The params of the combine launch (only when split) over the same layers.
    ///
    /// # Errors
    /// As [`Self::params`].
    pub fn combine_params(
        &self,
        at: &DecodeAddresses,
        first_layer: usize,
        layers: usize,
    ) -> Result<Option<DecodeCombineParams>> {
        let p = self.params(at, first_layer, layers)?;
        Ok((self.splits > 1).then_some(DecodeCombineParams {
            part_out: p.part_out,
            part_lse: p.part_lse,
            sinks: p.sinks,
            out: p.out,
            lse: p.lse,
            out_seq_stride: p.out_seq_stride,
            out_row_stride: p.out_row_stride,
            lse_seq_stride: p.lse_seq_stride,
            num_seqs: p.num_seqs,
            first_layer: p.first_layer,
            launch_layers: p.launch_layers,
            num_heads: p.num_heads,
            num_queries: p.num_queries,
            value_dim: p.value_dim,
            num_splits: p.num_splits,
            pad: 0,
        }))
    }
}

/// The per-cache addresses of a decode: the K/V tensors (copied into the workspace's constants by
/// [`DecodePlan::workspace_image`]) and the buffers whose contents every run reads (their values
/// may change between runs: lists rewritten by a round, lengths by the engine).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecodeCache {
    /// `[S * L]` K tensor addresses (paged: `[L]` pools).
    pub keys: Vec<u64>,
    /// `[S * L]` V tensor addresses (paged: `[L]` pools).
    pub values: Vec<u64>,
    /// f32 `[L, H]` sinks, or 0.
    pub sinks: u64,
    /// i32 `[S, lists, list_capacity]` lists, or 0 (dense) — e.g. a round's keep sets
    /// (`RoundPlan::layout().keep` in its workspace).
    pub lists: u64,
    /// i32 `[S, lists]` lengths ([`ListLengths::PerList`]), or 0.
    pub list_lens: u64,
    /// i32 `[S]` visible slots (dense), or 0.
    pub seq_lens: u64,
    /// i32 `[S, max_blocks]` block table (paged), or 0.
    pub block_table: u64,
}

/// What one run of a bound decode reads and writes besides the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeRun {
    /// The workspace base ([`DecodePlan::workspace_bytes`], aligned to 256, its constants
    /// written from [`DecodePlan::workspace_image`]).
    pub workspace: u64,
    /// Queries `[S, layers, H, T, D]`.
    pub queries: u64,
    /// f32 `[S, layers, H, T, Dv]` out.
    pub out: u64,
    /// f32 `[S, layers, H, T]` out.
    pub lse: u64,
    /// First layer of the run.
    pub first_layer: usize,
    /// Layers of the run (all of them, or the one an engine's forward pass is at).
    pub layers: usize,
}

/// A decode planned once per shape: its spec and workspace layout (the K/V address tables, then
/// the parts of a split decode, sized for every layer at once). [`Self::run`] only launches — no
/// allocation, copy or synchronisation — so it can be captured in a CUDA graph.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodePlan {
    spec: DecodeSpec,
    source: ChoiceSource,
    key_table: usize,
    value_table: usize,
    constants_bytes: usize,
    parts: usize,
    total_bytes: usize,
}

impl DecodePlan {
    /// Plan a decode of `shape`.
    ///
    /// # Errors
    /// As [`DecodeSpec::new`].
    pub fn new(shape: DecodeShape) -> Result<Self> {
        Self::tuned(shape, &Dispatch::built_in())
    }

    /// Plan a decode of `shape` with the variant `dispatch` picks ([`DecodeSpec::tuned`]).
    ///
    /// # Errors
    /// As [`DecodeSpec::new`].
    pub fn tuned(shape: DecodeShape, dispatch: &Dispatch) -> Result<Self> {
        let (spec, source) = DecodeSpec::tuned(shape, dispatch)?;
        let align = super::plan::WORKSPACE_ALIGN;
        let table = spec.table_len() * 8;
        let key_table = 0;
        let value_table = table.next_multiple_of(align);
        let constants_bytes = value_table + table.next_multiple_of(align);
        let parts = constants_bytes;
        let total_bytes = parts + spec.workspace_bytes(shape.num_layers);
        Ok(Self { spec, source, key_table, value_table, constants_bytes, parts, total_bytes })
    }

    /// The spec.
    pub fn spec(&self) -> &DecodeSpec {
        &self.spec
    }

    /// Where the decode variant came from (built-in rule, shipped or user table).
    pub fn variant_source(&self) -> ChoiceSource {
        self.source
    }

    /// Bytes of workspace a run needs (base aligned to [`WORKSPACE_ALIGN`](super::WORKSPACE_ALIGN)).
    pub fn workspace_bytes(&self) -> usize {
        self.total_bytes
    }

    /// Leading bytes of the workspace that [`Self::workspace_image`] fills.
    pub fn constants_bytes(&self) -> usize {
        self.constants_bytes
    }

    /// The host image of the workspace's constants for `cache`: copy it to the workspace base
    /// once (and again only when the cache moves).
    ///
    /// # Errors
    /// `ShapeMismatch` for address tables of another length; `InvalidArgument` for a missing or
    /// misaligned address (K/V bases 16 bytes, the i32 buffers 4, sinks 4), or one present that
    /// the shape does not read.
    pub fn workspace_image(&self, cache: &DecodeCache) -> Result<Vec<u8>> {
        let count = self.spec.table_len();
        for (what, t) in [("K layer addresses", &cache.keys), ("V layer addresses", &cache.values)] {
            if t.len() != count {
                return Err(Error::shape(what, count, t.len()));
            }
            for (i, &a) in t.iter().enumerate() {
                super::plan::check_address(format!("{what} [{i}]"), a, super::plan::ROW_ALIGN)?;
            }
        }
        self.check_bound(cache)?;
        let mut image = vec![0u8; self.constants_bytes];
        for (at, t) in [(self.key_table, &cache.keys), (self.value_table, &cache.values)] {
            for (i, a) in t.iter().enumerate() {
                image[at + 8 * i..at + 8 * i + 8].copy_from_slice(&a.to_le_bytes());
            }
        }
        Ok(image)
    }

    /// Check that exactly the buffers the shape reads are present, each aligned.
    fn check_bound(&self, c: &DecodeCache) -> Result<()> {
        let s = &self.spec.shape;
        let dense = s.lists == ListLayout::Dense;
        let paged = matches!(s.layout, CacheLayout::Paged { .. });
        let ragged = !dense && s.list_lengths == ListLengths::PerList;
        for (what, addr, wanted) in [
            ("sinks address", c.sinks, s.sinks),
            ("lists address", c.lists, !dense),
            ("list lengths address", c.list_lens, ragged),
            ("seq_lens address", c.seq_lens, dense),
            ("block table address", c.block_table, paged),
        ] {
            match (wanted, addr) {
                (true, 0) => return Err(Error::invalid_argument(what, "a non-null address", "0x0")),
                (false, a) if a != 0 => {
                    return Err(Error::invalid_argument(what, "null (the shape does not read it)", format!("{a:#x}")))
                }
                (true, a) => super::plan::check_address(what, a, 4)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Launch one decode of the cache bound in the workspace (its constants from
    /// [`Self::workspace_image`] of `cache`): the decode kernel and, when split, the combine.
    ///
    /// # Errors
    /// `InvalidArgument` for a misaligned workspace, a layer range outside the shape, or
    /// addresses that do not fit the shape; what the launcher reports.
    ///
    /// # Safety
    /// `run.workspace` is [`Self::workspace_bytes`] of the launcher's memory whose constants hold
    /// the image of `cache`, a live cache of the planned shape; every other address is memory of
    /// that backend of the documented layout; the lists hold slots in `0..len` (paged: covered
    /// by the sequence's block-table row); nothing else writes them until the launches have run.
    pub unsafe fn run<L: super::plan::Launcher>(
        &self,
        launcher: &mut L,
        cache: &DecodeCache,
        run: &DecodeRun,
    ) -> Result<()> {
        super::plan::check_workspace_address(run.workspace)?;
        self.check_bound(cache)?;
        for (what, a) in [("queries address", run.queries), ("o address", run.out), ("lse address", run.lse)] {
            super::plan::check_address(what, a, 4)?;
        }
        let at = DecodeAddresses {
            keys: run.workspace + self.key_table as u64,
            values: run.workspace + self.value_table as u64,
            queries: run.queries,
            sinks: cache.sinks,
            lists: cache.lists,
            list_lens: cache.list_lens,
            seq_lens: cache.seq_lens,
            block_table: cache.block_table,
            out: run.out,
            lse: run.lse,
            workspace: if self.spec.splits > 1 { run.workspace + self.parts as u64 } else { 0 },
        };
        let params = self.spec.params(&at, run.first_layer, run.layers)?;
        let combine = self.spec.combine_params(&at, run.first_layer, run.layers)?;
        // SAFETY: the caller's contract; params built from the validated spec for its variants.
        unsafe {
            launcher.launch(super::plan::Stage::Decode, self.spec.variant, &params, self.spec.grid(run.layers), 0)?;
            if let (Some(p), Some(v)) = (combine, self.spec.combine_variant()) {
                launcher.launch(super::plan::Stage::Combine, v, &p, self.spec.combine_grid(run.layers), 0)?;
            }
        }
        Ok(())
    }
}

impl DecodeSpec {
    /// Entries of each K/V address table: `S * L` (contiguous) or `L` pools (paged).
    pub fn table_len(&self) -> usize {
        match self.shape.layout {
            CacheLayout::Contiguous { .. } => self.shape.num_seqs * self.shape.num_layers,
            CacheLayout::Paged { .. } => self.shape.num_layers,
        }
    }
}
